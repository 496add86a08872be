"""split_instances works on the foreground pixels only (flat indices) for speed; these tests hold it to the
plain full-image formulation it replaced, on random probability maps of odd sizes."""
import cv2
import numpy as np
import pytest

from tessera.model.inference import _grow_cores, split_instances


def _full_image_split(probs, n_classes, min_area=4, edge_weight=1.0, edge_share=0.5, grow_steps=8):
    """The full-image formulation (stop 20's code): every test a whole-image array operation."""
    p_bg, p_cls, p_edge = probs[0], probs[1:n_classes + 1], probs[n_classes + 1]
    fg = p_bg < 0.5
    core = fg & (p_edge * edge_weight * (1 - edge_share) < edge_share * p_cls.sum(0))
    n_core, inst = cv2.connectedComponents(core.astype(np.uint8), connectivity=4)
    rest = fg & ~core
    if rest.any():
        grow, kernel = inst.astype(np.float32), np.ones((3, 3), np.uint8)
        for _ in range(grow_steps if n_core > 1 else 0):
            near = cv2.dilate(grow, kernel)
            take = rest & (grow == 0) & (near > 0)
            if not take.any():
                break
            grow[take] = near[take]
        inst = grow.astype(np.int32)
        _, extra = cv2.connectedComponents((rest & (inst == 0)).astype(np.uint8), connectivity=8)
        inst[extra > 0] = extra[extra > 0] + n_core - 1
    where = np.flatnonzero(inst)
    ids = inst.ravel()[where]
    n = int(ids.max()) + 1 if ids.size else 1
    counts = np.bincount(ids, minlength=n)
    mass = np.stack([np.bincount(ids, p.ravel()[where], minlength=n) for p in p_cls])
    fg_mass = np.bincount(ids, 1 - p_bg.ravel()[where], minlength=n)
    keep = counts >= min_area
    keep[0] = False
    remap = np.zeros(n, np.int32)
    remap[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    label_of = np.where(keep, mass.argmax(0) + 1, 0).astype(np.int32)
    score_of = (fg_mass / np.maximum(counts, 1))[keep]
    return (label_of[inst], remap[inst], {i + 1: int(c) for i, c in enumerate(label_of[keep])},
            {i + 1: float(v) for i, v in enumerate(score_of)})


def _random_probs(rng, n_classes: int, h: int, w: int) -> np.ndarray:
    """Smooth random label probabilities (blobs with outlines), sharp or soft."""
    logits = rng.normal(size=(n_classes + 2, h, w)).astype(np.float32)
    if min(h, w) > 3:
        sigma = float(rng.choice([0.5, 1.0, 2.0, 4.0]))
        logits = np.stack([cv2.GaussianBlur(c, (0, 0), sigma) for c in logits])
    logits = logits * float(rng.choice([1.0, 5.0, 20.0]))
    logits[0] += rng.normal() * 2
    p = np.exp(logits - logits.max(0))
    return (p / p.sum(0)).astype(np.float32)


@pytest.mark.parametrize("seed", range(4))
def test_split_instances_equals_the_full_image_formulation(seed):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        n_classes, h, w = int(rng.integers(1, 4)), int(rng.integers(1, 80)), int(rng.integers(1, 80))
        probs = _random_probs(rng, n_classes, h, w)
        kw = dict(min_area=int(rng.integers(1, 6)), edge_weight=float(rng.choice([1.0, 3.0])),
                  grow_steps=int(rng.integers(0, 9)))
        ours, ref = split_instances(probs, n_classes, **kw), _full_image_split(probs, n_classes, **kw)
        for a, b in zip(ours[:2], ref[:2]):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        assert ours[2] == ref[2] and ours[3] == ref[3]


def test_grow_cores_is_a_dilation_restricted_to_the_pixels_to_claim():
    """Two cores at the image's corners, a band of pixels to claim between them: each step claims the pixels
    next to a labelled one (the larger label where two meet), nothing outside the band, and stops after
    `steps`."""
    inst = np.zeros((5, 9), np.int32)
    inst[:, 0], inst[:, 8] = 1, 2
    band = np.zeros((5, 9), bool)
    band[:, 1:8] = True
    band[2, 4] = False                                    # a hole: never claimed, and claims pass around it
    todo = np.flatnonzero(band)
    one = _grow_cores(inst, todo, 1)
    assert (one[:, 1] == 1).all() and (one[:, 7] == 2).all() and (one[:, 2:7] == 0).all()
    full = _grow_cores(inst, todo, 8)
    assert full[2, 4] == 0 and (full[band] > 0).all()
    assert (full[:, :4] == 1).all() and (full[:, 5:] == 2).all() and full[0, 4] == 2    # ties: the larger label
    assert np.array_equal(inst[:, [0, 8]], full[:, [0, 8]]) and _grow_cores(inst, todo, 0).sum() == inst.sum()
