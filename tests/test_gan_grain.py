"""The imaging grain over a batch (model/sensor.add_grain_batch, what the Synthesizer adds) is each image's grain
alone (add_grain, a batch of one, as fit_grain calibrates with) to the bit, so the batch adds exactly the variance
per intensity-rank bin and the correlation length that were fitted. (Stop 23 checked add_grain and fit_grain
against the per-image implementation they replaced: the same grains and images.)"""
import numpy as np
import pytest
import torch

from tessera.model.data import make_nuclei
from tessera.model.maskgan import Generator, MaskGANConfig
from tessera.model.sensor import _percentiles, add_grain, add_grain_batch, fit_grain
from tessera.model.synthesizer import Synthesizer

torch.set_num_threads(1)


def _pairs(n=8, size=64, seed=0):
    """(real, fake) pairs: smooth nuclei on a dark background (fake), the same with intensity-dependent noise
    (real); every third pair in colour, so both grey and colour images go through."""
    import cv2
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    real, fake = [], []
    for i in range(n):
        objects = np.zeros((size, size), bool)
        for cy, cx in rng.uniform(10, size - 10, (3, 2)):
            objects |= (yy - cy) ** 2 + (xx - cx) ** 2 < 9 ** 2
        g = cv2.GaussianBlur(np.where(objects, 170.0, 15.0).astype(np.float32), (0, 0), 1.2)
        tint = np.array([1.0, 0.8, 1.1] if i % 3 == 2 else [1.0, 1.0, 1.0], np.float32)
        noisy = g + rng.normal(size=g.shape).astype(np.float32) * (1 + 3 * g / 170)
        real.append(np.clip(np.rint(noisy[..., None] * tint), 0, 255).astype(np.uint8))
        fake.append(np.clip(np.rint(g[..., None] * tint), 0, 255).astype(np.uint8))
    return real, fake


@pytest.fixture(scope="module")
def fitted():
    real, fake = _pairs()
    grain = fit_grain(real, fake)
    # correlated grain in the bright tenth (a noise tile turned by rot90 and cropped), white in the dark half
    return fake, {**grain, "sigma_dark": 0.0, "sigma_bright": 1.0}


def test_batch_grain_is_add_grains_grain_to_the_bit(fitted):
    fake, grain = fitted
    images = [fake[i % len(fake)] for i in range(40)]
    seeds = [int(s) for s in np.random.default_rng(3).integers(0, 2 ** 31, 40)]
    batch = add_grain_batch(images, grain, seeds)
    assert len(batch) == 40 and all(b.dtype == np.uint8 and b.shape == im.shape for b, im in zip(batch, images))
    for im, s, b in zip(images, seeds, batch):
        assert np.array_equal(b, add_grain(im, grain, s))
    assert any(not np.array_equal(b, im) for b, im in zip(batch, images))  # grain was added
    # each image's grain comes from its own seed alone: batch order and batch size do not matter
    swapped = add_grain_batch(images[1::-1], grain, seeds[1::-1])
    assert np.array_equal(swapped[0], batch[1]) and np.array_equal(swapped[1], batch[0])
    # grey images stay exactly grey (one field for every channel); single-channel images go through too
    assert all((b == b[..., :1]).all() for b, im in zip(batch, images) if (im == im[..., :1]).all())
    grey = [im[..., 0] for im in images[:4]]
    assert all(np.array_equal(b, add_grain(g, grain, s)) for g, s, b in
               zip(grey, seeds, add_grain_batch(grey, grain, seeds[:4])))


def test_batch_grain_of_mixed_sizes_and_without_grain(fitted):
    fake, grain = fitted
    big = np.ascontiguousarray(np.tile(fake[0], (2, 3, 1)))  # 128 x 192
    out = add_grain_batch([fake[0], big], grain, [5, 6])
    assert np.array_equal(out[0], add_grain(fake[0], grain, 5)) and np.array_equal(out[1], add_grain(big, grain, 6))
    assert add_grain_batch([fake[0]], None, [1])[0] is fake[0] and add_grain_batch([], grain, []) == []
    with pytest.raises(ValueError, match="2 images but 1 seeds"):
        add_grain_batch(fake[:2], grain, [1])


def test_percentiles_are_numpys():
    rng = np.random.default_rng(0)
    q = [0, 25, 50, 70, 80, 87, 92, 96, 100, 50, 90]
    for n in (1, 2, 5, 64, 4096):
        rows = (rng.random((20, n)) * 255).astype(np.float32)
        rows[::2] = np.round(rows[::2] / 8) * 8  # ties, as a flat background has
        want, got = np.percentile(rows, q, axis=1).T, _percentiles(rows, q)
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_synthesizer_adds_the_same_grain_as_before(fitted):
    """Synthesizer.render with a grain: each image is its grain-free render plus add_grain from its seed, as the
    Synthesizer did per image before, across batch boundaries; the same seed renders the same images."""
    _, grain = fitted
    config = MaskGANConfig(resolution=64, n_labels=2, z_dim=8, g_channels=8, g_hidden=8, upsample="bilinear")
    torch.manual_seed(0)
    plain = Synthesizer(Generator(config), ["nucleus"], bf16=False)
    grainy = Synthesizer(plain.generator, ["nucleus"], bf16=False, grain=grain)
    layouts = make_nuclei(5, size=64, seed=1)
    base, out = plain.render(layouts, seed=4, batch_size=2), grainy.render(layouts, seed=4, batch_size=2)
    seeds = [4 * 1_000_003 + i for i in range(5)]
    for b, o, s in zip(base, out, seeds):
        assert np.array_equal(o, add_grain(b, grain, s + 0x5EED))
    assert all(np.array_equal(a, b) for a, b in zip(out, grainy.render(layouts, seed=4)))
