"""Predictor.refine's choice of object: a thin scribble grows to the whole object, a click in a clump the
model merged selects one object, a box bounds its object. The network's output is fixed here (a model that
sees the objects but not the contact between them), so the tests check refine's own logic exactly."""

import cv2
import numpy as np
import pytest
import torch

from tessera.model import metrics
from tessera.model.inference import REFINE_CACHE, REFINE_MAX_ZOOM, Predictor, _cut_necks, head_centres, split_instances
from tessera.model.vqvae import VQVAE, VQVAEConfig

R = 128


def disk(cy: int, cx: int, r: int, shape=(R, R)) -> np.ndarray:
    return cv2.circle(np.zeros(shape, np.uint8), (cx, cy), r, 1, -1).astype(bool)


@pytest.fixture
def scene():
    """(image, objects): two touching nuclei (one merged blob for the model) and an isolated one."""
    a, b, c = disk(50, 40, 14), disk(50, 64, 12), disk(100, 96, 13)
    b &= ~a
    image = np.full((R, R, 3), 10, np.uint8)
    image[a | b | c] = 200
    return image, {"a": a, "b": b, "c": c}


def fixed_predictor(fg: np.ndarray, centres: np.ndarray | None = None) -> Predictor:
    """A Predictor whose network says 'object' exactly on fg, with outlines only where fg meets background;
    `centres` (N, 5: cy, cx, h, w, score in image px), the objects its detection head finds."""
    model = VQVAE(VQVAEConfig(resolution=R, n_labels=3, widths=(8, 8, 8, 8), codebook_size=16, embed_dim=8))
    predictor = Predictor(model, ["nucleus"], device="cpu")
    edge = fg & ~cv2.erode(fg.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    logits = np.full((3, R, R), -8.0, np.float32)
    logits[0][~fg] = 8.0
    logits[1][fg & ~edge] = 8.0
    logits[2][edge] = 8.0
    out = torch.from_numpy(logits)[None]  # (L, R, R) -> (1, L, R, R)
    real = predictor._run_view                # features and codes stay real: the hint-steered fallback needs them
    predictor._run_view = lambda view, stats, key=None, zoom=1.0: (*real(view, stats)[:2], out, (R, R), centres)
    return predictor


def test_thin_scribble_grows_to_the_whole_object(scene):
    image, obj = scene
    predictor = fixed_predictor(obj["a"] | obj["b"] | obj["c"])
    for name in ("a", "c"):
        ys, xs = np.nonzero(obj[name])
        cy, cx = int(ys.mean()), int(xs.mean())
        stroke = cv2.line(np.zeros((R, R), np.uint8), (cx - 6, cy), (cx + 6, cy), 1, 4).astype(bool) & obj[name]
        assert metrics.iou(stroke, obj[name]) < 0.35
        mask, conf = predictor.refine(image, stroke, [], [], label=1)
        assert metrics.iou(mask, obj[name]) >= 0.85, (name, metrics.iou(mask, obj[name]))
        assert 0.0 < conf <= 1.0


def test_click_in_a_clump_selects_one_object(scene):
    image, obj = scene
    predictor = fixed_predictor(obj["a"] | obj["b"] | obj["c"])
    for name, (y, x) in (("a", (50, 36)), ("b", (52, 68))):
        mask, _ = predictor.refine(image, None, [(float(x), float(y))], [], label=1)
        assert metrics.iou(mask, obj[name]) >= 0.85, (name, metrics.iou(mask, obj[name]))
        other = obj["b" if name == "a" else "a"]
        assert (mask & other).sum() <= 0.1 * other.sum()


def test_negative_click_and_box(scene):
    image, obj = scene
    predictor = fixed_predictor(obj["a"] | obj["b"] | obj["c"])
    mask, _ = predictor.refine(image, None, [(36.0, 50.0)], [(36.0, 50.0)], label=1)
    assert not mask.any()
    box = np.zeros((R, R), bool)
    ys, xs = np.nonzero(obj["c"])
    box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    mask, _ = predictor.refine(image, box, [], [], label=1)
    assert metrics.iou(mask, obj["c"]) >= 0.9 and not (mask & ~box).any()


def test_the_heads_objects_split_a_merged_region_that_has_no_neck():
    """Two nuclei side by side merged into one rectangle: its outline has no neck to cut, so only the head's
    two centres in it can part them; a click or a thin scribble on either returns that one, and one centre (or
    none) leaves the region whole."""
    left, right = np.zeros((R, R), bool), np.zeros((R, R), bool)
    left[40:70, 30:55], right[40:70, 55:80] = True, True
    image = np.full((R, R, 3), 10, np.uint8)
    image[left | right] = 200
    centres = np.array([[55.0, 42.0, 30.0, 25.0, 0.9], [55.0, 67.0, 30.0, 25.0, 0.8]])
    for heads, expect_split in ((None, False), (centres[:1], False), (centres, True)):
        predictor = fixed_predictor(left | right, heads)
        for (x, y), obj in (((35.0, 50.0), left), ((75.0, 60.0), right)):
            mask, _ = predictor.refine(image, None, [(x, y)], [], label=1)
            assert metrics.iou(mask, obj if expect_split else left | right) > 0.9, (heads, x, y)
    stroke = cv2.line(np.zeros((R, R), np.uint8), (40, 45), (44, 65), 1, 3).astype(bool)    # not a box
    mask, _ = fixed_predictor(left | right, centres).refine(image, stroke, [], [], label=1)
    assert metrics.iou(mask, left) > 0.9


def test_split_instances_parts_an_object_at_two_head_centres_only():
    """An object holding two of the head's objects is split between them at the middle (in units of their
    boxes); a duplicate peak of one object, a centre on the background and an object with one centre change
    nothing."""
    probs = np.zeros((3, 40, 90), np.float32)
    probs[0] = 1.0
    probs[:, 10:30, 5:55] = np.array([0.0, 1.0, 0.0])[:, None, None]      # one wide object
    probs[:, 10:30, 65:85] = np.array([0.0, 1.0, 0.0])[:, None, None]     # and a lone one
    _, plain, _, _ = split_instances(probs, 1)
    one = np.array([[20.0, 15.0, 20.0, 20.0, 0.9], [21.0, 17.0, 20.0, 20.0, 0.5],   # 2 px apart: one object
                    [20.0, 75.0, 20.0, 20.0, 0.9], [5.0, 45.0, 20.0, 20.0, 0.9]])   # the lone one; background
    _, same, _, _ = split_instances(probs, 1, centres=one)
    assert np.array_equal(same, plain) and len(np.unique(plain)) == 3
    two = np.vstack([one, [[20.0, 45.0, 20.0, 20.0, 0.7]]])
    _, inst, labels, _ = split_instances(probs, 1, centres=two)
    assert len(labels) == 3 and np.array_equal(inst > 0, plain > 0)
    assert inst[20, 10] == inst[20, 29] != inst[20, 31] == inst[20, 50]
    assert inst[20, 75] not in (inst[20, 10], inst[20, 50])
    assert np.array_equal(head_centres(np.array([[10.0, 0, 30, 20, 0.3, 1], [0, 0, 8, 4, 0.9, 1]]), 0.4),
                          [[2.0, 4.0, 4.0, 8.0, 0.9]])


def test_cut_necks_leaves_single_objects_whole():
    ellipse = cv2.ellipse(np.zeros((80, 80), np.uint8), (40, 40), (22, 12), 30, 0, 360, 1, -1).astype(bool)
    assert _cut_necks(ellipse).max() == 1
    pair = disk(40, 28, 12, (80, 80)) | disk(40, 50, 12, (80, 80))
    parts = _cut_necks(pair)
    assert parts.max() == 2 and parts[40, 20] != parts[40, 58]


def counting_predictor(monkeypatch) -> tuple[Predictor, list]:
    """A real (untrained) Predictor whose network passes are counted."""
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(resolution=R, n_labels=3, widths=(8, 8, 8, 8), codebook_size=16, embed_dim=8))
    predictor = Predictor(model, ["nucleus"], device="cpu", bf16=False)
    calls, forward = [], predictor._forward
    monkeypatch.setattr(predictor, "_forward", lambda x: calls.append(x.shape) or forward(x))
    return predictor, calls


def test_repeat_hints_on_one_image_reuse_the_network_pass(scene, monkeypatch):
    image, obj = scene
    cached, calls = counting_predictor(monkeypatch)
    hints = [(None, [(36.0, 50.0)]), (obj["c"] & disk(100, 96, 4), []), (None, [(68.0, 52.0)])]
    got = [cached.refine(image, h, p, [], label=1) for h, p in hints]
    assert len(calls) == 1                                # one pass for three hints on the same image
    for (h, p), (mask, conf) in zip(hints, got):         # each equals the answer of a cold cache
        fresh, _ = counting_predictor(monkeypatch)
        fresh.model.load_state_dict(cached.model.state_dict())
        mask0, conf0 = fresh.refine(image, h, p, [], label=1)
        assert np.array_equal(mask, mask0) and conf == conf0
    changed = image.copy()
    changed[0, 0] += 1                                    # one pixel differs: a new image, a new pass
    cached.refine(changed, None, [(36.0, 50.0)], [], label=1)
    assert len(calls) == 2


def test_pass_cache_is_bounded(scene, monkeypatch):
    image, _ = scene
    predictor, calls = counting_predictor(monkeypatch)
    for i in range(3 * REFINE_CACHE):
        im = image.copy()
        im[0, 0] = i
        predictor.refine(im, None, [(36.0, 50.0)], [], label=1)
    assert len(calls) == 3 * REFINE_CACHE and len(predictor._views) <= REFINE_CACHE
    predictor.refine(image, None, [(36.0, 50.0)], [], label=1)   # the first image was evicted
    assert len(calls) == 3 * REFINE_CACHE + 1


def test_small_objects_are_refined_closer(scene):
    """The network's objects under REFINE_OBJECT_PX model px across -> refine looks closer (at most
    REFINE_MAX_ZOOM x);
    objects at or above it -> the model's own scale."""
    image, obj = scene
    small = np.zeros((R, R), bool)
    for cy in range(8, R, 16):
        for cx in range(8, R, 16):
            small |= disk(cy, cx, 2)
    for fg, lo, hi in ((obj["a"] | obj["b"] | obj["c"], 1.0, 1.0), (small, 1.2, REFINE_MAX_ZOOM)):
        predictor = fixed_predictor(fg)
        predictor.scale = 1.0                             # a learned scale: the closer look applies
        zoom = predictor._object_zoom(image, (0.0, 1.0, False), "key")
        assert lo <= zoom <= hi, zoom


def test_warm_leaves_the_first_hint_no_network_pass(scene, monkeypatch):
    """What Label Studio's task-open /predict triggers: warm() computes the passes a first hint needs (the
    whole image, and the closer look at small objects), so the first refine runs no network pass and
    answers as a cold one would."""
    image, obj = scene
    warmed, calls = counting_predictor(monkeypatch)
    warmed.scale = 1.0                                     # a learned scale: the zoom pass applies too
    warmed.warm(image)
    n = len(calls)
    assert n >= 1
    hints = [(None, [(36.0, 50.0)]), (obj["c"] & disk(100, 96, 4), [])]
    got = [warmed.refine(image, h, p, [], label=1) for h, p in hints]
    assert len(calls) == n                                 # no pass at all on the hints
    for (h, p), (mask, conf) in zip(hints, got):
        cold, cold_calls = counting_predictor(monkeypatch)
        cold.model.load_state_dict(warmed.model.state_dict())
        cold.scale = 1.0
        mask0, conf0 = cold.refine(image, h, p, [], label=1)
        assert len(cold_calls) == n and np.array_equal(mask, mask0) and conf == conf0
    for i in range(2 * REFINE_CACHE):                     # warming many images keeps the cache bounded
        im = image.copy()
        im[0, 0] = i
        warmed.warm(im)
    assert len(warmed._views) <= REFINE_CACHE


def test_pass_cache_computes_a_key_once_across_threads():
    """A hint that arrives while warm() computes its pass waits for that pass instead of running another."""
    import threading
    import time

    from tessera.model.inference import PassCache

    cache, runs, out = PassCache(4), [], []

    def slow():
        runs.append(1)
        time.sleep(0.2)
        return "pass"

    threads = [threading.Thread(target=lambda: out.append(cache.compute("k", slow))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == ["pass"] * 3 and len(runs) == 1

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.compute("bad", broken)
    assert cache.compute("bad", lambda: "ok") == "ok"     # a failed computation leaves no stale entry


def test_an_object_larger_than_every_window_growth_is_answered():
    """The window grows at most 4 times; an object still touching its edge then is answered from the last
    window the probabilities were made for (it used to fail with an IndexError: the window had grown past
    them)."""
    n = 600                                               # 33 px around the click, 4 doublings: 528 px < 600
    predictor = fixed_predictor(np.ones((R, R), bool))
    real = predictor._run_view
    logits = torch.full((1, 3, n, n), -8.0)
    logits[:, 1] = 8.0                                    # object everywhere, at the image's own scale
    predictor._run_view = lambda view, stats, key=None, zoom=1.0: (*real(view, stats)[:2], logits, (n, n), None)
    image = np.full((n, n, 3), 200, np.uint8)
    mask, conf = predictor.refine(image, None, [(300.0, 300.0)], [], label=1)
    assert mask.shape == (n, n) and mask[300, 300] and mask.sum() >= 250 * 250 and 0.0 < conf <= 1.0
