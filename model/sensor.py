"""The camera half of a generated image: its grain (sensor noise and fine texture), fitted on the project's
training images when the mask GAN trains, stored in its checkpoint and added to the generator's output.

Why: in the realism benchmark (bench.gan --realism) a small CNN told GAN images from real DSB images at 96.5 %,
and simple statistics show why: the GAN's backgrounds are smooth where real ones carry sensor noise (mean
|Laplacian| on the darker half of the image: AUC 0.97 real vs generated), its nuclei flat where real ones are
textured. A few hundred CPU iterations do not teach the generator that, so it is measured on the real images
and added as a model of the imaging: per bin of intensity rank, the noise variance the generator's image lacks
(per unit of intensity, calibrated by measurement), with the spatial correlation of the real residuals. Labels
are unchanged: it acts on pixel values only. Tried and not kept (README, Realism): a tone curve mapping the
generator's intensity quantiles onto the real ones (brighter than real), and a variance line a + b * mu in
absolute intensity (2-3x too much background noise on generated images).
"""

from __future__ import annotations

import cv2
import numpy as np

SIGMAS = (0.0, 0.5, 0.7, 1.0, 1.4)  # candidate correlation lengths (px) of a grain field
_RES_SIGMA = 1.0  # residual = image - GaussianBlur(image, _RES_SIGMA): the fine structure that is measured
_MU_SIGMA = 2.0  # local mean intensity the variance depends on


_THIRDS = np.full(3, 1 / 3, np.float32)


def _luma(image: np.ndarray) -> np.ndarray:
    # a matrix product: ~25x faster than astype(float32).mean(axis=2) here
    return image.astype(np.float32) @ _THIRDS if image.ndim == 3 else image.astype(np.float32)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(x, (0, 0), sigma, borderType=cv2.BORDER_REFLECT) if sigma > 0 else x


_BANK = 512  # side of the pre-drawn noise tile that grain fields are cut from


def _field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-variance Gaussian noise with correlation length sigma: a random crop (offset, rot90) of a tile
    drawn once per sigma, ~30x faster than drawing and blurring per image (generation speed)."""
    H, W = shape
    if H > _BANK or W > _BANK:  # larger than the tile: drawn afresh
        f = _blur(rng.standard_normal(shape, dtype=np.float32), sigma)
        return f / np.float32(_unit_std(sigma))
    y, x, k = int(rng.integers(_BANK - H + 1)), int(rng.integers(_BANK - W + 1)), int(rng.integers(4))
    return _tile(sigma, k)[y:y + H, x:x + W]


def _tile(sigma: float, k: int = 0) -> np.ndarray:
    """The noise tile of sigma turned by k quarter turns (np.rot90), stored contiguous: a crop of it is
    copied row by row, ~8x faster than through rot90's strided view (add_grain_batch)."""
    key = ("tile", sigma, k)
    if key not in _STD_CACHE:
        if k:
            _STD_CACHE[key] = np.ascontiguousarray(np.rot90(_tile(sigma), k))
        else:
            f = _blur(np.random.default_rng(12345).standard_normal((_BANK, _BANK), dtype=np.float32), sigma)
            _STD_CACHE[key] = f / f.std()
    return _STD_CACHE[key]


_STD_CACHE: dict[tuple, object] = {}   # per-sigma constants and noise tiles, computed once


def _unit_std(sigma: float) -> float:
    """Std of white unit noise after _blur(sigma) (numerically, once per sigma)."""
    key = ("field", sigma)
    if key not in _STD_CACHE:
        w = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
        _STD_CACHE[key] = float(_blur(w, sigma)[16:-16, 16:-16].std())
    return _STD_CACHE[key]


def _residual_gain(sigma: float) -> tuple[float, float]:
    """(variance of the residual, lag-1 autocorrelation of the residual) of a unit-variance field of sigma."""
    key = ("res", sigma)
    if key not in _STD_CACHE:
        f = _field(np.random.default_rng(1), (256, 256), sigma)
        r = (f - _blur(f, _RES_SIGMA))[16:-16, 16:-16]
        _STD_CACHE[key] = (float(r.var()), float((r[:, 1:] * r[:, :-1]).mean() / r.var()))
    return _STD_CACHE[key]


def _closest_sigma(ac: float) -> float:
    return min(SIGMAS, key=lambda s: abs(_residual_gain(s)[1] - ac))


def _blend(mu, p50, p90):
    """Angle (0: dark field, pi/2: bright field) of a pixel of local mean mu, from the image's median and
    90th percentile of mu."""
    return np.clip((mu - p50) / np.maximum(p90 - p50, 1e-3), 0, 1) * np.float32(np.pi / 2)


RANKS = (0, 25, 50, 70, 80, 87, 92, 96, 100)  # bins of a pixel's intensity rank (percentiles of mu) in its image
CALIBRATION_ROUNDS = 3
MAX_REL_SD = 0.15  # grain sd at most this share of the local intensity (+1); 0.25 and 0.35 left speckles


def _rank_edges(mu: np.ndarray) -> np.ndarray:
    return np.percentile(mu, RANKS)


def _bin_stats(image: np.ndarray, mu: np.ndarray, edges: np.ndarray) -> list[float]:
    """Clipped mean squared residual (object edges clipped) per bin of mu (0 for an empty bin)."""
    g = _luma(image)
    r2 = (g - _blur(g, _RES_SIGMA)) ** 2
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        v = r2[(mu >= lo) & (mu <= hi)]
        out.append(float(np.minimum(v, np.percentile(v, 98)).mean()) if v.size >= 16 else 0.0)
    return out


def _autocorr(image: np.ndarray, mu: np.ndarray) -> tuple[float | None, float | None]:
    """Lag-1 autocorrelation of the residual in the darker half and in the brightest tenth of mu, on their
    flatter half (object edges left out: their residual is structure, not grain)."""
    g = _luma(image)
    r = g - _blur(g, _RES_SIGMA)
    lag = r[:, 1:] * r[:, :-1]
    grad = np.hypot(*np.gradient(mu))
    out = []
    for m in (mu <= np.percentile(mu, 50), mu >= np.percentile(mu, 90)):
        m = m & (grad <= np.median(grad[m]))
        v = float((r[m] ** 2).mean())
        out.append(float(lag[m[:, 1:]].mean()) / v if v > 1e-3 else None)
    return out[0], out[1]


def fit_grain(real: list[np.ndarray], fake: list[np.ndarray], seed: int = 0) -> dict:
    """Grain for a generator, fitted on pairs (real image, the generator's image of its layout), all (R, R, 3)
    uint8: per pair, the grain variance in each bin of intensity rank (RANKS) such that the fake plus grain
    has the real image's residual (image - blur) variance in that bin, calibrated by measurement
    (CALIBRATION_ROUNDS rounds of: add the grain, measure, scale each bin by real / measured); one correlation
    length for the darker half of the pixels and one for the brightest tenth, from the real residuals.
    Returns {"sigma_dark", "sigma_bright", "ranks", "curves": [[variance / (intensity + 1) per bin], ...]}
    (JSON-able)."""
    if len(real) != len(fake):
        raise ValueError(f"{len(real)} real images but {len(fake)} generated ones")
    ac_dark, ac_bright, pairs = [], [], []
    for r_img, f_img in zip(real, fake):
        mu_r = _blur(_luma(r_img), _MU_SIGMA)
        ad, ab = _autocorr(r_img, mu_r)
        ac_dark += [ad] if ad is not None else []
        ac_bright += [ab] if ab is not None else []
        mu_f = _blur(_luma(f_img), _MU_SIGMA)
        e_r = _rank_edges(mu_r)
        pairs.append((f_img, mu_f, _rank_edges(mu_f), _bin_stats(r_img, mu_r, e_r), (e_r[:-1] + e_r[1:]) / 2))
    grain = {"sigma_dark": _closest_sigma(float(np.median(ac_dark))) if ac_dark else 0.0,
             "sigma_bright": _closest_sigma(float(np.median(ac_bright))) if ac_bright else 0.0,
             "ranks": list(RANKS), "curves": []}
    for f_img, mu_f, edges, target, centres in pairs:  # first guess: the variance the fake lacks, per unit of
        have = _bin_stats(f_img, mu_f, edges)             # the real image's intensity
        grain["curves"].append([max(t - h, 0.01) / (c + 1) for t, h, c in zip(target, have, centres)])
    for rnd in range(CALIBRATION_ROUNDS):
        for i, (f_img, mu_f, edges, target, _) in enumerate(pairs):
            noisy = _apply_batch(f_img[None], mu_f[None], [grain["curves"][i]], grain,
                                 [np.random.default_rng([seed, rnd, i])])[0]
            got = _bin_stats(noisy, mu_f, edges)
            grain["curves"][i] = [float(v * np.clip(t / max(g, 1e-3), 0.5, 2))
                                  for v, t, g in zip(grain["curves"][i], target, got)]
    grain["curves"] = [[float(f"{v:.4g}") for v in c] for c in grain["curves"]]
    return grain


def add_grain(image: np.ndarray, grain: dict | None, seed: int) -> np.ndarray:
    """uint8 (H, W, 3) image + grain drawn from `seed` (one fitted pair's variance per intensity-rank bin;
    the same field in every channel, so grey images stay exactly grey) -> uint8 image. No grain (None or
    empty): the image unchanged."""
    if not grain or not grain.get("curves"):
        return image
    return add_grain_batch([image], grain, [seed])[0]


def add_grain_batch(images: list[np.ndarray], grain: dict | None, seeds: list[int]) -> list[np.ndarray]:
    """add_grain over a batch, the same images to the bit (tests/test_gan_grain.py): images[i] with the grain
    of seeds[i]. Images of one shape run through numpy together (the percentiles, lookup tables and per-pixel
    maths as a few whole-batch calls instead of ~40 small calls per image; generation speed, issue 12);
    mixed shapes run one image at a time."""
    if len(images) != len(seeds):
        raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
    if not grain or not grain.get("curves") or not images:
        return list(images)
    if len({im.shape for im in images}) > 1:
        return [add_grain(im, grain, s) for im, s in zip(images, seeds)]
    rngs = [np.random.default_rng(s) for s in seeds]
    curves = [grain["curves"][int(r.integers(len(grain["curves"])))] for r in rngs]
    stack = np.stack(images)
    g = np.stack([_luma(im) for im in images])
    mu = np.empty_like(g)
    for i in range(len(images)):
        cv2.GaussianBlur(g[i], (0, 0), _MU_SIGMA, dst=mu[i], borderType=cv2.BORDER_REFLECT)
    return list(_apply_batch(stack, mu, curves, grain, rngs))


def _percentiles(rows: np.ndarray, q: list) -> np.ndarray:
    """np.percentile(rows, q, axis=1).T to the bit (its default 'linear' method, numpy 2's arithmetic step by
    step; tests/test_gan_grain.py compares them) from one sort per row: np.percentile partitions every row
    around 22 ranks, which took a quarter of add_grain's time."""
    s = np.sort(rows, axis=1)
    n = s.shape[1]
    virtual = (n - 1) * np.true_divide(q, s.dtype.type(100))
    prev = np.floor(virtual)
    prev[virtual >= n - 1] = -1  # the last value; numpy's gamma is then taken against index -1, as here
    gamma = virtual - prev
    lo = s[:, prev.astype(np.intp)]
    hi = s[:, np.where(virtual >= n - 1, -1, prev + 1).astype(np.intp)]
    diff = hi - lo
    return np.where(gamma >= 0.5, hi - diff * (1 - gamma), lo + diff * gamma)


def _apply_batch(images: np.ndarray, mu: np.ndarray, curves: list, grain: dict, rngs: list) -> np.ndarray:
    """A stack of images (B, H, W[, 3]) uint8 with their local means (B, H, W), one curve and rng per image ->
    the images with their grain (add_grain_batch; fit_grain calibrates with it one image at a time)."""
    B, H, W = mu.shape
    ranks = list(grain.get("ranks", RANKS))
    # percentiles of the smooth local mean on every other pixel: the same to a fraction of a level, 4x faster
    q = _percentiles(mu[:, ::2, ::2].reshape(B, -1), ranks + [50, 90])  # (B, len(ranks) + 2)
    edges, p50, p90 = q[:, :len(ranks)], q[:, len(ranks)], q[:, len(ranks) + 1]
    xs = (edges[:, :-1] + edges[:, 1:]) / 2  # each bin's centre in this image's intensities
    # per intensity level (0..255; mu rounded): the grain's sd, interpolated in log between bins so that a dim
    # rim next to a bright object stays dim, and the blend of the dark half's correlation with the bright
    # tenth's (unit variance); lookup tables, as the per-pixel maths was most of the time.
    # The curve holds variance per unit of intensity (+1): the grain of a dimmer image is weaker, as photon
    # noise and stained texture are (a fixed variance from a bright donor made speckled halos on dim nuclei);
    # capped at MAX_REL_SD of the intensity: a donor pair whose fake was much dimmer than its real image must
    # not cover a bright nucleus with black and white speckles
    levels = np.arange(256, dtype=np.float64)
    log_curve = np.log(np.maximum(np.asarray(curves, np.float64), 1e-6))
    interp = np.stack([np.interp(levels, x, c) for x, c in zip(xs, log_curve)])
    sd = np.minimum(np.sqrt(np.exp(interp) * (levels + 1)), MAX_REL_SD * (levels + 1))
    theta = _blend(levels, p50[:, None], p90[:, None])
    # one table of B x 256 entries, indexed by image * 256 + level
    a, b = (sd * np.cos(theta)).astype(np.float32).ravel(), (sd * np.sin(theta)).astype(np.float32).ravel()
    idx = np.clip(np.rint(mu), 0, 255).astype(np.intp)
    idx += (np.arange(B) * 256)[:, None, None]
    dark, bright = np.empty((B, H, W), np.float32), np.empty((B, H, W), np.float32)
    for i, rng in enumerate(rngs):  # each image's draws in add_grain's order: its dark field, then its bright one
        dark[i] = _field(rng, (H, W), grain["sigma_dark"])
        bright[i] = _field(rng, (H, W), grain["sigma_bright"])
    n = a[idx] * dark + b[idx] * bright
    # integer pixels: rint(pixel + n) == pixel + rint(n), in int16 once per pixel instead of per channel
    n = np.rint(n).astype(np.int16).reshape(B * H, W)
    if images.ndim == 4:  # the same field in every channel (cv2.merge: ~15x np.repeat here)
        n = cv2.merge([n] * images.shape[3])
    # saturating uint8 + int16 -> uint8 (cv2.add): clip(image + n, 0, 255) in one pass instead of numpy's four
    return cv2.add(images.reshape(n.shape), n, dtype=cv2.CV_8U).reshape(images.shape)
