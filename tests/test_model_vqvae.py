"""Label VQ-VAE unit tests: shapes, the eval decode invariant, EMA buffers, dead-code restart, overfitting."""

import pytest
import torch
import torch.nn.functional as F

from tessera.model.vqvae import VQVAE, Quantizer, VQVAEConfig

torch.set_num_threads(1)


@pytest.fixture
def tiny_config():
    """A VQ-VAE small enough for millisecond steps."""
    return VQVAEConfig(resolution=32, n_labels=3, codebook_size=16, embed_dim=8, widths=(8, 8, 16, 16),
                       n_predictor_layers=1)


def _batch(config, B=2, seed=0):
    """Random blob label maps (one-hot) and matching images."""
    g = torch.Generator().manual_seed(seed)
    R = config.resolution
    yy, xx = torch.meshgrid(torch.arange(R), torch.arange(R), indexing="ij")
    labels = torch.zeros(B, R, R, dtype=torch.long)
    for b in range(B):
        for _ in range(3):
            cy, cx = torch.randint(4, R - 4, (2,), generator=g).tolist()
            r = int(torch.randint(3, 7, (1,), generator=g))
            labels[b][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
    onehot = F.one_hot(labels, config.n_labels).permute(0, 3, 1, 2).float()
    image = labels[:, None].float().repeat(1, 3, 1, 1) * 0.8 + 0.1 * torch.rand(B, 3, R, R, generator=g)
    return labels, onehot, image


def test_shapes(tiny_config):
    model = VQVAE(tiny_config)
    _, x, image = _batch(tiny_config)
    R, h = tiny_config.resolution, tiny_config.resolution // tiny_config.downsample
    for img in (None, image):
        logits, commit_loss, indices = model(x, img)
        assert logits.shape == (2, tiny_config.n_labels, R, R)
        assert commit_loss.ndim == 0 and commit_loss.item() >= 0
        assert indices.shape == (2, h, h) and indices.dtype == torch.long
    assert model.predict_codes(image).shape == (2, tiny_config.codebook_size, h, h)
    logits, code_logits = model.segment(image)
    assert logits.shape == (2, tiny_config.n_labels, R, R) and code_logits.shape[1] == tiny_config.codebook_size


def test_bad_config():
    with pytest.raises(ValueError):
        VQVAEConfig(resolution=36)
    with pytest.raises(ValueError):
        VQVAEConfig(n_labels=1)


def test_decode_code_matches_forward_in_eval(tiny_config):
    model = VQVAE(tiny_config)
    _, x, image = _batch(tiny_config)
    model.train()
    model(x, image)  # initialise the codebook from data
    model.eval()
    with torch.no_grad():
        for img in (None, image):
            logits, _, indices = model(x, img)
            assert torch.allclose(model.decode_code(indices, img), logits, atol=1e-5)
            z_q, _, _ = model.encode(x)
            assert torch.allclose(model.decode(z_q, img), logits, atol=1e-5)


def test_ema_state_in_state_dict(tiny_config):
    sd = VQVAE(tiny_config).state_dict()
    for name in ("embed", "embed_avg", "cluster_size", "initted"):
        assert f"quantizer.{name}" in sd, f"quantizer.{name} missing from state_dict"
    assert sd["quantizer.embed"].shape == (tiny_config.codebook_size, tiny_config.embed_dim)


def test_ema_moves_codes_toward_data():
    q = Quantizer(4, 2, decay=0.5).train()
    q(torch.zeros(1, 2, 2, 2))  # data init
    target = torch.tensor([3.0, -2.0])
    z = target.view(1, 2, 1, 1).expand(1, 2, 4, 4).contiguous()
    for _ in range(20):
        _, _, indices = q(z)
    used = indices.unique()
    assert len(used) == 1
    assert torch.allclose(q.embed[used[0]], target, atol=1e-2)


def test_dead_code_restart_replaces_unused_codes():
    q = Quantizer(8, 4, decay=0.99, dead_threshold=0.1).train()
    q.initted.fill_(True)
    q.embed.copy_(torch.full((8, 4), 100.0))
    q.embed[0] = 0.0
    q.embed_avg.copy_(q.embed)
    q.cluster_size.fill_(1.0)
    q.cluster_size[1:] = 0.0  # codes 1..7 have never been used
    z = torch.randn(2, 4, 4, 4) * 0.5 + 5.0  # data far from code 0 as well
    q(z)
    data = z.permute(0, 2, 3, 1).reshape(-1, 4)
    dist = torch.cdist(q.embed[1:], data).min(dim=1).values
    assert (dist < 0.1).all(), f"dead codes were not moved onto the data: {dist}"
    assert (q.cluster_size[1:] >= q.dead_threshold - 1e-6).all()
    # after the restart the data is represented by the new codes
    _, commit, indices = q(z)
    assert (indices > 0).any() and commit.item() < 1.0


def test_overfit_one_batch(tiny_config):
    torch.manual_seed(0)
    model = VQVAE(tiny_config)
    labels, x, image = _batch(tiny_config, B=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        logits, commit_loss, _ = model(x)  # no image: the codes alone must carry the layout
        loss = F.cross_entropy(logits, labels) + commit_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], f"loss did not fall enough: {losses[0]:.3f} -> {losses[-1]:.3f}"
