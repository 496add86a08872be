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


# --- the space-to-depth stem (VQVAEConfig.stem_stride, issue 10) ---------------------------------------------


def test_space_to_depth_stem_has_no_full_resolution_level(tiny_config):
    """stem_stride 2: the first level works at R/2 on 12 channels (2x2 blocks), the latents stay at R/8 with one
    level fewer, and the logits come back at R for every pixel (pixel shuffle): at an odd multiple of 8 too."""
    cfg = VQVAEConfig(resolution=32, n_labels=3, codebook_size=16, embed_dim=8, widths=(8, 16, 16), stem_stride=2)
    assert cfg.downsample == 8
    model = VQVAE(cfg).eval()
    assert model.image_encoder.stem.conv1.in_channels == 12
    _, x, image = _batch(cfg)
    x, image = F.pad(x, (0, 8, 0, 16)), F.pad(image, (0, 8, 0, 16))       # 48 x 40: 6 x 5 latent cells
    feats = model.features(image)
    assert [tuple(f.shape[-2:]) for f in feats] == [(24, 20), (12, 10), (6, 5)]
    logits, _, indices = model(x, image)
    assert logits.shape == (2, 3, 48, 40) and indices.shape == (2, 6, 5)
    assert model.segment(image)[0].shape == (2, 3, 48, 40) and model.decode_code(indices).shape == (2, 3, 48, 40)
    # each pixel of a 2x2 block has its own logits: the output is not a 2x upsampling of an R/2 map
    assert not torch.equal(logits[..., 0::2, 0::2], logits[..., 1::2, 1::2])
    with pytest.raises(ValueError):
        VQVAEConfig(resolution=32, widths=(8, 16, 16), stem_stride=3)
    with pytest.raises(ValueError, match="at most 3 widths"):   # latents at R/16: inputs are padded to x8 only
        VQVAEConfig(resolution=32, widths=(8, 16, 16, 16), stem_stride=2)
    with pytest.raises(ValueError):                  # a box head cannot have cells finer than the first level
        VQVAEConfig(resolution=32, widths=(8, 16, 16), stem_stride=2, box_classes=1, box_level=0)


def test_space_to_depth_box_head_keeps_its_cell_size():
    """box_level names the cell size (2 ** level model px) whatever the stem: with stem_stride 2 the head reads
    the first level (R/2) and decodes with stride 2, as a stride-1 model's level-1 head does."""
    for stride, widths in ((1, (8, 16, 16, 16)), (2, (16, 16, 16))):
        model = VQVAE(VQVAEConfig(resolution=64, widths=widths, stem_stride=stride, box_classes=2)).eval()
        heat, size, offset = model.detect(model.features(torch.rand(1, 3, 64, 40)))
        assert model.box_head.stride == 2 and heat.shape == (1, 2, 32, 20) and size.shape == (1, 2, 32, 20)


def test_space_to_depth_model_trains_and_predicts_at_odd_sizes(tmp_path):
    """A stem_stride 2 model through train() and the Predictor, on images of odd sizes: predictions at each
    image's size, the traced pass equal to eager, and the architecture stored in (and rebuilt from) the checkpoint."""
    import numpy as np

    from tessera.model.checkpoint import load_checkpoint
    from tessera.model.data import make_nuclei
    from tessera.model.inference import Predictor
    from tessera.model.train_vqvae import TrainConfig, train

    samples = [make_nuclei(1, size=(90 + 7 * i, 77 + 5 * i), seed=i)[0] for i in range(6)]
    cfg = TrainConfig(max_iters=6, eval_interval=3, log_interval=100, batch_size=4, device="cpu", threads=1,
                      resolution=64, crop=48, widths=(8, 16, 16), stem_stride=2, codebook_size=16, embed_dim=8,
                      bf16=False)
    path = train(cfg, samples[:4], samples[4:], ["Nucleus"], tmp_path / "m.pt")
    assert load_checkpoint(path, "vqvae")["model_config"]["stem_stride"] == 2
    eager = Predictor.from_checkpoint(path, device="cpu")
    traced = Predictor.from_checkpoint(path, device="cpu", trace=True)
    assert eager.model.config.stem_stride == 2
    images = [make_nuclei(1, size=(101, 67), seed=9)[0].image, make_nuclei(1, size=(53, 131), seed=8)[0].image]
    want = eager.predict(images, cut=False)
    assert [p.classes.shape for p in want] == [(101, 67), (53, 131)]
    for _ in range(3):
        for a, b in zip(want, traced.predict(images, cut=False)):
            assert np.array_equal(a.instances, b.instances) and a.score == b.score


def test_a_checkpoint_from_before_the_stem_option_loads_and_predicts_as_before():
    """tests/data/vqvae_stem1_tiny.pt was written by main at 114f57e, before VQVAEConfig.stem_stride existed (its
    model_config has no such key), with the network pass's outputs on its stored image (float32, scale 0.5,
    70 x 90 px: an odd model size) and a box head. It loads strictly and the pass gives the same numbers."""
    from pathlib import Path

    from tessera.model.checkpoint import load_checkpoint
    from tessera.model.inference import Predictor, vqvae_from_checkpoint

    path = Path(__file__).parent / "data" / "vqvae_stem1_tiny.pt"
    ckpt = load_checkpoint(path, "vqvae")
    assert "stem_stride" not in ckpt["model_config"]
    model = vqvae_from_checkpoint(ckpt)
    assert model.config.stem_stride == 1
    pred = Predictor(model, ckpt["label_names"], device="cpu", scale=0.5, bf16=False)
    want = ckpt["expected"]
    with torch.inference_mode():
        x, _ = pred._prepare([want["image"].numpy()])
        logits, (heat, size, offset) = pred._net(x)
    for got, key in ((logits, "logits"), (heat, "heat"), (size, "size"), (offset, "offset")):
        # float32 on another CPU sums the convolutions in another order (an AMD EPYC with AVX-512 differs from
        # the Intel Xeon that wrote the file by ~1e-6); another code path or weight mapping differs by ~1e-1
        torch.testing.assert_close(got, want[key], rtol=1e-4, atol=1e-4)
    assert Predictor.from_checkpoint(path, device="cpu").predict([want["image"].numpy()])[0].classes.shape == (70, 90)


def test_bench_set_overrides_reach_the_architecture():
    """`--set stem_stride=2 widths=32,64,96` (bench.common.train_overrides, as bench.label_model passes it) gives
    a TrainConfig with a tuple of ints, and bools and floats keep their types."""
    from bench.common import train_overrides
    from tessera.model.train_vqvae import TrainConfig

    over = train_overrides(["stem_stride=2", "widths=32,64,96", "flips=false", "contact_weight=5"])
    assert over == {"stem_stride": 2, "widths": (32, 64, 96), "flips": False, "contact_weight": 5.0}
    cfg = TrainConfig(**over)
    assert VQVAEConfig(widths=cfg.widths, stem_stride=cfg.stem_stride).downsample == 8
    with pytest.raises(ValueError):
        train_overrides(["widths=32,x"])
