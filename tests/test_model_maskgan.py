"""Mask GAN, layouts, GAN training and the synthesizer: shapes, steps, conditioning, determinism, share."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tessera.model.data import Sample, make_nuclei
from tessera.model.inference import Predictor
from tessera.model.layouts import LayoutSampler, augment_layout, ensure_instances, logits_to_layout, share_of
from tessera.model.maskgan import (Discriminator, Generator, MaskGANConfig, d_hinge_loss, diff_augment,
                           feature_matching_loss, g_hinge_loss, label_maps_to_mask)
from tessera.model.synthesizer import Synthesizer
from tessera.model.train_maskgan import GANTrainConfig, train
from tessera.model.vqvae import VQVAE, VQVAEConfig

torch.set_num_threads(1)


@pytest.fixture
def gan_config():
    """A small 2-class GAN config at R=32."""
    return MaskGANConfig(resolution=32, n_labels=3, z_dim=8, g_channels=8, g_hidden=8, d_channels=8, d_layers=2)


def _two_class(samples, seed=0, p=0.2):
    """Relabel a random share p of the nuclei as class 2."""
    rng = np.random.default_rng(seed)
    out = []
    for s in samples:
        classes = s.classes.copy()
        for k in np.unique(s.instances[s.instances > 0]):
            if rng.random() < p:
                classes[s.instances == k] = 2
        out.append(Sample(s.image, classes, s.instances, s.id))
    return out


def _masks(layouts, config):
    classes = torch.from_numpy(np.stack([lay.classes for lay in layouts]))
    instances = torch.from_numpy(np.stack([lay.instances for lay in layouts]))
    return label_maps_to_mask(classes, instances, config.n_labels, config.boundary)


def test_mask_has_one_hot_and_instance_edges():
    instances = torch.zeros(1, 8, 8, dtype=torch.long)
    instances[0, 2:6, 1:4], instances[0, 2:6, 4:7] = 1, 2  # two touching objects
    mask = label_maps_to_mask((instances > 0).long(), instances, n_labels=2)
    assert mask.shape == (1, 3, 8, 8)
    assert torch.equal(mask[:, :2].sum(1), torch.ones(1, 8, 8))
    assert mask[0, 2, 3, 3] == 1 and mask[0, 2, 3, 4] == 1, "the contact between objects is an edge"
    assert mask[0, 2, 0, 0] == 0, "background is never an edge"
    with pytest.raises(ValueError, match="n_labels"):
        label_maps_to_mask(instances * 3, instances, n_labels=2)


def test_shapes(gan_config):
    G, D = Generator(gan_config), Discriminator(gan_config)
    mask = torch.zeros(2, gan_config.label_nc, 32, 32)
    mask[:, 0] = 1
    fake = G(mask, torch.randn(2, gan_config.z_dim))
    assert fake.shape == (2, 3, 32, 32) and fake.abs().max() <= 1
    logits, feats = D(fake, mask)
    assert logits.dim() == 4 and logits.shape[:2] == (2, 1)
    assert len(feats) == gan_config.d_layers + 1


def test_one_d_step_and_one_g_step_are_finite(gan_config):
    torch.manual_seed(0)
    G, D = Generator(gan_config), Discriminator(gan_config)
    opt_g, opt_d = torch.optim.Adam(G.parameters(), 1e-4), torch.optim.Adam(D.parameters(), 4e-4)
    layouts = LayoutSampler(make_nuclei(2, 64), 32).sample(4, seed=0)
    mask = _masks(layouts, gan_config)
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    fake = G(mask, torch.randn(4, gan_config.z_dim))
    logits_real, feats_real = D(*diff_augment(real, mask))
    d_real, d_fake = d_hinge_loss(logits_real, D(*diff_augment(fake.detach(), mask))[0])
    opt_d.zero_grad()
    (d_real + d_fake).backward()
    opt_d.step()
    logits_fake, feats_fake = D(fake, mask)
    loss_g = g_hinge_loss(logits_fake) + feature_matching_loss(feats_real, feats_fake)
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()
    assert all(torch.isfinite(v) for v in (d_real, d_fake, loss_g))
    assert all(p.grad is not None for p in G.parameters() if p.requires_grad)


def test_the_mask_conditions_the_output_locally():
    # at init, by construction: MaskNorm modulates each pixel from the label map around it
    torch.manual_seed(0)
    G = Generator(MaskGANConfig(resolution=64, n_labels=2, g_channels=8))
    mask = torch.zeros(1, 3, 64, 64)
    mask[:, 0] = 1
    changed = mask.clone()
    changed[:, 0, 40:56, 40:56], changed[:, 1, 40:56, 40:56] = 0, 1  # one new object bottom right
    a, b = G.generate(mask, seed=3), G.generate(changed, seed=3)
    diff = (a - b).abs().mean(1)[0]
    inside, far = diff[40:56, 40:56].mean(), diff[:20, :20].mean()
    assert inside > 3 * far, f"change inside {inside:.4f} vs far away {far:.4f}"


def test_generate_is_deterministic_per_seed(gan_config):
    G = Generator(gan_config)
    mask = torch.zeros(3, gan_config.label_nc, 32, 32)
    mask[:, 0] = 1
    assert torch.equal(G.generate(mask, seed=5), G.generate(mask, seed=5))
    assert not torch.equal(G.generate(mask, seed=5), G.generate(mask, seed=6))
    # image i does not depend on the batch it is generated in
    assert torch.equal(G.generate(mask, seed=5)[1:], G.generate(mask[1:], seed=[5 * 1_000_003 + 1, 5 * 1_000_003 + 2]))


def test_diff_augment_moves_the_mask_with_the_image():
    mask = torch.zeros(4, 3, 16, 16)
    mask[:, 1, 4:10, 5:12] = 1
    x = mask.clone()  # an "image" equal to the label map: translation and cutout must keep them equal
    x_aug, mask_aug = diff_augment(x, mask, "translation,cutout", torch.Generator().manual_seed(0))
    assert torch.equal(x_aug, mask_aug)
    # the same generator state gives the same augmentation
    again = diff_augment(x, mask, "color,translation,cutout", torch.Generator().manual_seed(1))[0]
    assert torch.equal(again, diff_augment(x, mask, "color,translation,cutout", torch.Generator().manual_seed(1))[0])
    with pytest.raises(ValueError, match="unknown"):
        diff_augment(x, mask, "rotate")


def test_augment_layout_keeps_classes_and_instances_consistent():
    s = _two_class(make_nuclei(1, 64))[0]
    classes, instances = augment_layout(s.classes, s.instances, np.random.default_rng(0), elastic=0.5)
    assert classes.shape == (64, 64) and instances.dtype == np.int32
    assert np.array_equal(classes > 0, instances > 0)
    for k in np.unique(instances[instances > 0]):
        assert len(np.unique(classes[instances == k])) == 1, "one class per object"


def test_semantic_only_labels_get_instances():
    classes = np.zeros((16, 16), np.int32)
    classes[2:5, 2:5], classes[8:12, 8:12] = 1, 2
    instances = ensure_instances(classes, np.zeros_like(classes))
    assert instances.max() == 2 and np.array_equal(instances > 0, classes > 0)
    bank = LayoutSampler([Sample(np.zeros((16, 16, 3), np.uint8), classes, np.zeros_like(classes))], 16).bank
    assert sorted(bank) == [1, 2]


def test_logits_to_layout_separates_touching_objects():
    instances = np.zeros((16, 16), np.int32)
    instances[2:10, 2:7], instances[2:10, 7:12] = 1, 2
    labels = (instances > 0).astype(np.int64)
    labels[2:10, 6:8] = 2  # contact class between the two objects
    logits = np.eye(3)[labels].transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    classes, out = logits_to_layout(logits * 10.0, min_area=1)
    assert out.max() == 2 and np.array_equal(out > 0, instances > 0)
    assert set(np.unique(classes)) == {0, 1}


@pytest.mark.parametrize("share", [0.3, 0.6, 1.0])
def test_layout_sampler_honours_label_and_share(share):
    sampler = LayoutSampler(_two_class(make_nuclei(6, 128, seed=1)), 64)
    layouts = sampler.sample(12, label=2, share=share, seed=0)
    assert len(layouts) == 12 and all(lay.classes.shape == (64, 64) for lay in layouts)
    assert all(share_of(lay, 2) >= share - 1e-9 for lay in layouts)
    plain = sampler.sample(12, seed=0)
    assert np.mean([share_of(lay, 2) for lay in plain]) < share
    assert sampler.sample(3, seed=4)[0].source.startswith("real:")
    with pytest.raises(ValueError, match="no whole object"):
        sampler.sample(2, label=3, share=0.5)
    with pytest.raises(ValueError, match="label"):
        sampler.sample(2, share=0.5)


class _FakeCodes:
    """Stands in for the VQ-VAE: a code per 8x8 cell = its majority label, decoded back to one-hot."""

    def encode(self, classes, instances):
        # (B, H, W) -> (B, H/8, W/8): majority of each cell, 0 bg / 1 object
        return (classes.float().view(classes.shape[0], classes.shape[1] // 8, 8, -1, 8).mean((2, 4)) > 0.5).long()

    def decode_codes(self, code_map):
        labels = code_map.repeat_interleave(8, 1).repeat_interleave(8, 2)
        return torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()


def test_layout_sampler_recombines_code_maps():
    sampler = LayoutSampler(make_nuclei(4, 64), 64, codes=_FakeCodes(), p_vq=1.0)
    layouts = sampler.sample(4, seed=0)
    assert [lay.source for lay in layouts] == ["vq"] * 4
    assert all(lay.instances.max() > 0 and lay.classes.max() == 1 for lay in layouts)


def test_layout_sampler_with_the_label_model_as_code_model():
    model = VQVAE(VQVAEConfig(resolution=64, n_labels=3, codebook_size=16, embed_dim=8, widths=(8, 8, 8, 8)))
    predictor = Predictor(model, ["nucleus"], device="cpu")
    layouts = LayoutSampler(make_nuclei(2, 64), 64, codes=predictor, p_vq=1.0).sample(2, label=1, share=0.5, seed=0)
    assert len(layouts) == 2 and all(lay.source.startswith("vq") for lay in layouts)
    assert all(share_of(lay, 1) >= 0.5 for lay in layouts)


def test_from_args():
    cfg = GANTrainConfig.from_args(["--max_iters=7", "--lr_g=0.001", "--boundary=false", "--data=x"])
    assert (cfg.max_iters, cfg.lr_g, cfg.boundary, cfg.data) == (7, 0.001, False, "x")
    with pytest.raises(ValueError, match="unknown GANTrainConfig field"):
        GANTrainConfig.from_args(["--nope=1"])


@dataclass
class _Prediction:
    classes: np.ndarray


class _EchoPredictor:
    """A label model that 'predicts' fixed class maps."""

    def __init__(self, classes):
        self.classes = classes

    def predict(self, images):
        return [_Prediction(c) for c in self.classes[:len(images)]]


def test_train_two_iters_then_synthesize(tmp_path):
    samples = _two_class(make_nuclei(3, 48, seed=2))
    cfg = GANTrainConfig(resolution=32, batch_size=2, max_iters=2, g_channels=8, g_hidden=8, d_channels=8,
                         d_layers=2, z_dim=8, device="cpu", log_interval=1)
    seen = []
    path = train(cfg, samples, ["a", "b"], tmp_path, progress=seen.append)
    assert path.exists() and [p["iter"] for p in seen if p["phase"] == "train"] == [1, 2]
    assert set(seen[0]) == {"phase", "iter", "max_iters", "loss", "eta_s"}

    synth = Synthesizer.from_checkpoint(path, device="cpu")
    assert synth.version == "maskgan-2" and synth.label_names == ["a", "b"]
    layouts = LayoutSampler(samples, 32).sample(3, label=2, share=0.5, seed=1)
    images = synth.render(layouts, seed=7)
    assert len(images) == 3 and images[0].shape == (32, 32, 3) and images[0].dtype == np.uint8
    assert all(np.array_equal(a, b) for a, b in zip(images, synth.render(layouts, seed=7, batch_size=2)))
    assert not np.array_equal(images[0], synth.render(layouts, seed=8)[0])

    perfect = _EchoPredictor([lay.classes for lay in layouts])
    assert synth.self_consistency(images, layouts, perfect, 0.5) == [(True, 1.0)] * 3
    empty = _EchoPredictor([np.zeros_like(lay.classes) for lay in layouts])
    assert all(not keep and iou == 0.0 for keep, iou in synth.self_consistency(images, layouts, empty, 0.5))

    # the imaging grain was fitted with the generator; a checkpoint from before grain (no "grain") renders
    # the generator's images as they were
    assert synth.grain and len(synth.grain["curves"]) == len(samples)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    del ckpt["grain"]
    torch.save(ckpt, tmp_path / "old.pt")
    old = Synthesizer.from_checkpoint(tmp_path / "old.pt", device="cpu")
    assert old.grain is None
    synth.grain = None
    assert all(np.array_equal(a, b) for a, b in zip(old.render(layouts, seed=7), synth.render(layouts, seed=7)))

    # fine-tuning from the checkpoint works; a checkpoint with other labels is refused
    assert train(cfg, samples, ["a", "b"], tmp_path / "ft", init_from=path).exists()
    with pytest.raises(ValueError, match="differs"):
        train(cfg, samples, ["a", "b", "c"], tmp_path / "bad", init_from=path)


# ----------------------------------------------------------------------------------------- edited images

def test_edited_images_have_exact_labels_and_paste_the_rare_label_first():
    from tessera.model.edit import Editor

    samples = _two_class(make_nuclei(6, size=96, seed=4), p=0.1)
    editor = Editor(samples, n_labels=2, max_objects=3)
    counts = np.bincount([c.label for c in editor.bank], minlength=3)
    assert counts[2] < counts[1] and editor.weights[1] > editor.weights[0]  # class 2 is rare, pasted more
    edits = editor.edit(12, seed=1)
    pasted = np.bincount([c for e in edits for c in e.labels], minlength=3)
    assert pasted[2] > pasted[1]
    by_id = {s.id: s for s in samples}
    for e in edits:
        s, bg = e.sample, by_id[e.background]
        assert s.synthetic and s.image.shape == bg.image.shape and s.image.dtype == np.uint8
        assert ((s.classes > 0) == (s.instances > 0)).all()
        # every pixel outside the labelled objects is the background image's own pixel
        changed = (s.image != bg.image).any(-1)
        new_objects = (s.instances > 0) & ((bg.instances == 0) | (s.classes != bg.classes))
        assert not (changed & ~(s.instances > 0)).any()
        assert len(e.objects) == len(e.labels) >= 1 and new_objects.any()
        for k in np.unique(s.instances[s.instances > 0]):  # one class per instance
            assert len(np.unique(s.classes[s.instances == k])) == 1
    assert edits[0].sample.image.tobytes() == editor.edit(1, seed=1)[0].sample.image.tobytes()


def test_edit_with_a_label_pastes_only_that_label():
    from tessera.model.edit import Editor

    samples = _two_class(make_nuclei(4, size=96, seed=5), p=0.3)
    editor = Editor(samples, n_labels=2)
    edits = editor.edit(5, label=2, seed=0)
    assert all(set(e.labels) == {2} for e in edits)
    with pytest.raises(ValueError, match="no object of class"):
        Editor(make_nuclei(2, size=96, seed=5), n_labels=2).edit(1, label=2)


def test_grey_flag_makes_exactly_grey_images_and_bilinear_upsampling_runs():
    config = MaskGANConfig(resolution=32, n_labels=2, z_dim=8, g_channels=8, g_hidden=8, d_channels=8, d_layers=2,
                           upsample="bilinear", grey_flag=True)
    g = Generator(config).eval()
    masks = _masks(make_nuclei(2, size=32, seed=3), config)
    out = g.generate(masks, seed=[1, 2], grey=torch.tensor([True, False]))
    assert out.shape == (2, 3, 32, 32)
    assert torch.equal(out[0, 0], out[0, 1]) and torch.equal(out[0, 1], out[0, 2])
    assert not torch.equal(out[1, 0], out[1, 1])
    with pytest.raises(ValueError, match="upsample"):
        MaskGANConfig(upsample="cubic")


def test_masknorm_folded_offset_is_spade_with_the_z_style():
    """The folded (1 + gamma, z offset) MaskNorm computes SPADE's IN(x) * (1 + gamma + z_gamma) + beta + z_beta."""
    from tessera.model.maskgan import MaskNorm
    torch.manual_seed(0)
    norm = MaskNorm(6, 3, 8, z_dim=4)
    torch.nn.init.normal_(norm.z_gamma_beta.weight)
    x, mask, z = torch.randn(2, 6, 8, 8), torch.rand(2, 3, 16, 16), torch.randn(2, 4)
    m = torch.nn.functional.interpolate(mask, size=(8, 8), mode="nearest")
    gamma, beta = norm.mlp_gamma_beta(norm.mlp_shared(m)).chunk(2, dim=1)
    zg, zb = norm.z_gamma_beta(z)[:, :, None, None].chunk(2, dim=1)
    want = torch.nn.functional.instance_norm(x) * (1 + gamma + zg) + beta + zb
    assert torch.allclose(norm(x, mask, z), want, atol=1e-5)
    assert torch.allclose(norm(x, mask), torch.nn.functional.instance_norm(x) * (1 + gamma) + beta, atol=1e-5)


def test_bf16_rendering_gives_the_float32_images_within_a_few_levels():
    """The Synthesizer renders with a bfloat16 copy of the generator where the CPU has bf16 kernels; its uint8
    images stay within 16 levels of float32's anywhere and 1 level on average, with non-zero z styles and noise
    so that every path counts."""
    from tessera.model.synthesizer import Synthesizer
    config = MaskGANConfig(resolution=64, n_labels=2, z_dim=16, g_channels=8, g_hidden=16, upsample="bilinear",
                           grey_flag=True)
    torch.manual_seed(1)
    g = Generator(config)
    for name, p in g.named_parameters():
        if "z_gamma_beta.weight" in name or "noise_scale" in name:
            torch.nn.init.normal_(p, std=0.05)
    layouts = make_nuclei(6, size=64, seed=2)
    full = Synthesizer(g, ["nucleus"], grey_share=0.5, bf16=False)
    half = Synthesizer(g, ["nucleus"], grey_share=0.5, bf16=True)
    assert next(half._render.parameters()).dtype == torch.bfloat16
    assert next(full.generator.parameters()).dtype == torch.float32  # the caller's generator is left as it was
    a = np.stack(full.render(layouts, seed=7)).astype(np.int16)
    b = np.stack(half.render(layouts, seed=7)).astype(np.int16)
    d = np.abs(a - b)
    assert 0 < d.max() <= 16 and d.mean() < 1.0, (int(d.max()), float(d.mean()))  # bf16 did run, and is close


# ----------------------------------------------------------------------------------------- imaging grain

def _smooth_and_grainy(n=6, size=96, seed=0):
    """Pairs (real: smooth nuclei + white noise whose sd grows with the intensity, 1 at 20 and 4 at 150, as
    photon noise does; fake: the smooth nuclei), grey RGB uint8."""
    import cv2
    rng = np.random.default_rng(seed)
    real, fake = [], []
    yy, xx = np.mgrid[:size, :size]
    for _ in range(n):
        objects = np.zeros((size, size), bool)
        for cy, cx in rng.uniform(16, size - 16, (3, 2)):  # three large flat nuclei
            objects |= (yy - cy) ** 2 + (xx - cx) ** 2 < 14 ** 2
        g = cv2.GaussianBlur(np.where(objects, 150.0, 20.0).astype(np.float32), (0, 0), 1)
        noisy = g + rng.normal(size=g.shape) * (1 + 3 * (g - 20) / 130)
        real.append(np.repeat(np.clip(np.rint(noisy), 0, 255).astype(np.uint8)[..., None], 3, axis=2))
        fake.append(np.repeat(np.clip(np.rint(g), 0, 255).astype(np.uint8)[..., None], 3, axis=2))
    return real, fake


def _residual_sd(images, bright: bool):
    import cv2
    out = []
    for im in images:
        g = im[..., 0].astype(np.float32)
        r = g - cv2.GaussianBlur(g, (0, 0), 1.0)
        out.append(r[g > 130] if bright else r[g < 30])
    return float(np.concatenate(out).std())  # pooled over the images


def test_grain_gives_generated_images_the_real_residual_noise_and_keeps_them_grey():
    from tessera.model.sensor import add_grain, fit_grain
    real, fake = _smooth_and_grainy()
    grain = fit_grain(real, fake)
    assert len(grain["curves"]) == len(real) and json_roundtrips(grain)
    out = [add_grain(f, grain, seed=i) for i, f in enumerate(fake)]
    for bright in (True, False):  # the residual of the real images, inside the objects and around them
        want, got, before = _residual_sd(real, bright), _residual_sd(out, bright), _residual_sd(fake, bright)
        assert abs(got - want) < 0.05 * want and abs(got - want) < 0.25 * abs(before - want), (got, want, before)
    assert grain["sigma_dark"] == grain["sigma_bright"] == 0.0  # white noise, as drawn
    assert all(o.dtype == np.uint8 and o.shape == f.shape and (o == o[..., :1]).all() for o, f in zip(out, fake))
    # labels untouched: grain moves pixel values by a few levels only; the same seed gives the same grain
    assert np.abs(out[0].astype(int) - fake[0]).mean() < 5
    assert np.array_equal(out[0], add_grain(fake[0], grain, seed=0))
    assert not np.array_equal(out[0], add_grain(fake[0], grain, seed=1))
    assert add_grain(fake[0], None, seed=0) is fake[0] and add_grain(fake[0], {}, seed=0) is fake[0]


def json_roundtrips(obj) -> bool:
    import json
    return json.loads(json.dumps(obj)) == obj


def test_fit_grain_refuses_unpaired_images():
    from tessera.model.sensor import fit_grain
    real, fake = _smooth_and_grainy(n=2)
    with pytest.raises(ValueError, match="2 real images but 1 generated"):
        fit_grain(real, fake[:1])
