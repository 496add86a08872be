"""/predict's finishing and region encoding, rewritten for CPU, held to the formulations they replaced: the same
regions, the same JSON text, on random instance maps and on whole predictions of seeded procedural images."""
import json

import cv2
import numpy as np
import pytest

from tessera.backend.label_config import Control, parse_label_config
from tessera.backend.predictions import _dumps, _plain, prediction_to_results
from tessera.backend.regions import instances_to_results, instances_to_rles, mask_to_polygons
from tessera.model.inference import Prediction, cut_regions, split_instances, task_score
from tessera.model.postprocess import RegionCut, instance_boxes, kept_regions, object_slices
from tests.test_predict_split import _full_image_split
from tests.test_regions import random_instances

POLY = Control("polygonlabels", "poly", "image", ("A", "B"))
CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="Nucleus"/></BrushLabels>
<PolygonLabels name="poly" toName="image"><Label value="Nucleus"/></PolygonLabels>
<RectangleLabels name="bbox" toName="image"><Label value="Nucleus"/></RectangleLabels></View>"""


def _old_cut_regions(pred: Prediction, cut: RegionCut) -> Prediction:
    """cut_regions as it was: areas from a bincount of the whole map, dropped ids remapped through the map."""
    ids = sorted(pred.instance_label)
    if not ids:
        return pred
    if pred.boxes is not None:
        boxes = np.array([pred.boxes[k] for k in ids], np.float64).reshape(-1, 4)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    else:
        boxes = instance_boxes(pred.instances, ids)
        areas = np.bincount(pred.instances.ravel(), minlength=max(ids) + 1)[ids]
    scores = np.array([pred.instance_score.get(k, 0.0) for k in ids])
    classes = np.array([pred.instance_label[k] for k in ids])
    keep = {ids[i] for i in kept_regions(scores, areas, boxes, cut, classes)}
    new_id = np.arange(max(max(ids), int(pred.instances.max())) + 1, dtype=pred.instances.dtype)
    new_id[[k for k in ids if k not in keep]] = 0
    kept = (new_id > 0).astype(np.uint8)
    kept[0] = 1
    return Prediction((pred.classes * np.take(kept, pred.instances)).astype(pred.classes.dtype, copy=False),
                      np.take(new_id, pred.instances), {k: v for k, v in pred.instance_label.items() if k in keep},
                      {k: v for k, v in pred.instance_score.items() if k in keep}, pred.score,
                      None if pred.boxes is None else {k: v for k, v in pred.boxes.items() if k in keep})


def _same_prediction(a: Prediction, b: Prediction) -> None:
    assert np.array_equal(a.instances, b.instances) and a.instances.dtype == b.instances.dtype
    assert np.array_equal(a.classes, b.classes) and a.classes.dtype == b.classes.dtype
    assert (a.instance_label, a.instance_score, a.score, a.boxes) == \
        (b.instance_label, b.instance_score, b.score, b.boxes)


@pytest.mark.parametrize("seed", range(3))
def test_cut_regions_equals_the_whole_map_remap(seed):
    """Random maps with ids the prediction does not list, ids it lists but the map lacks, specks, overlapping
    boxes (NMS), two classes; a mask model and a box model; on copies and in place."""
    rng = np.random.default_rng(seed)
    for t in range(40):
        h, w = (int(v) for v in rng.integers(5, 90, 2))
        inst = random_instances(h, w, int(rng.integers(1, 25)), seed=int(rng.integers(1 << 30)))
        inst[:2, :2] = 60                                  # in the map, not in the prediction
        ids = [int(i) for i in np.unique(inst) if 0 < i < 60] + [70]           # 70: listed, absent
        labels = {k: int(rng.integers(1, 3)) for k in ids}
        classes = np.zeros_like(inst)
        for k, c in labels.items():
            classes[inst == k] = c
        scores = {k: float(rng.random()) for k in ids}
        boxes = None
        if t % 4 == 3:                                      # a box model: its boxes, its painted map
            boxes = {k: tuple(float(v) for v in b) for k, b in zip(ids, instance_boxes(inst, ids))}
            boxes[70] = (1.0, 1.0, 3.0, 4.0)
        cut = RegionCut(min_score=float(rng.uniform(0, 0.8)), min_area=float(rng.integers(0, 30)),
                        nms_iou=float(rng.choice([0.1, 0.5, 1.0])))
        pred = Prediction(classes, inst, labels, scores, 0.5, boxes)
        want = _old_cut_regions(pred, cut)
        _same_prediction(cut_regions(pred, cut), want)
        assert np.array_equal(pred.instances, inst) and np.array_equal(pred.classes, classes)   # untouched
        given = Prediction(classes.copy(), inst.copy(), labels, scores, 0.5, boxes, object_slices(inst, ids))
        got = cut_regions(given, cut, copy=False)
        _same_prediction(got, want)
        if got.slices is not None:
            assert got.slices == object_slices(got.instances, sorted(got.instance_label))


def _old_polygon_results(instances, labels, scores, control, epsilon=0.7):
    """instances_to_results' polygons as they were: every contour simplified and sorted, rounded per region."""
    height, width = instances.shape
    ids = sorted(labels)
    slices = object_slices(instances, ids)
    out = []
    for k in ids:
        sl = slices.get(k)
        if sl is None:
            continue
        polygons = mask_to_polygons(instances[sl] == k, epsilon=epsilon)
        if not polygons:
            continue
        pts = np.round((polygons[0] + (sl[1].start, sl[0].start)) * (100.0 / width, 100.0 / height), 4)
        out.append({"id": f"{control.from_name}-{k}", "from_name": control.from_name, "to_name": control.to_name,
                    "type": control.type, "original_width": width, "original_height": height,
                    "image_rotation": 0, "score": round(float(scores.get(k, 0.0)), 4),
                    "value": {"points": pts.tolist(), "closed": True, "polygonlabels": [labels[k]]}})
    return out


@pytest.mark.parametrize("seed", range(3))
def test_polygons_equal_the_per_region_formulation(seed):
    """Objects in several parts (the largest part's polygon), with holes, one pixel or one line thin (the inset
    rectangle), touching the borders, at odd sizes; epsilon 0 and 0.7."""
    rng = np.random.default_rng(seed)
    for t in range(30):
        h, w = (int(v) for v in rng.integers(3, 120, 2))
        inst = random_instances(h, w, int(rng.integers(1, 40)), seed=int(rng.integers(1 << 30)),
                                max_r=int(rng.integers(2, 20)))
        if t % 3 == 0:                                      # scattered pixels: objects in many parts
            inst = np.where(rng.random((h, w)) < 0.1, rng.integers(1, 6, (h, w)), inst).astype(np.int32)
        inst[rng.integers(0, h), :] = 90                    # a one-pixel line across the image
        ids = [int(i) for i in np.unique(inst) if i]
        labels = {k: "A" for k in ids}
        scores = {k: float(rng.random()) for k in ids}
        for eps in (0.0, 0.7):
            assert instances_to_results(inst, labels, scores, POLY, polygon_epsilon=eps) == \
                _old_polygon_results(inst, labels, scores, POLY, eps)


def test_brush_rles_of_huge_and_many_objects_decode_back():
    """The word-packed RLE streams: runs over 2**16 values, a thousand objects of one pixel, an object of
    every pixel (mask2rle's bytes are the reference: tests/test_regions.py)."""
    from label_studio_sdk.converter.brush import decode_rle

    inst = np.zeros((300, 400), np.int32)
    inst.ravel()[::113] = np.arange(1, inst.size // 113 + 2)[:inst.ravel()[::113].size]
    full = np.ones((257, 255), np.int32)
    for m in (inst, full):
        ids = [int(i) for i in np.unique(m) if i]
        rles = instances_to_rles(m, ids)
        for k in ids[:: max(1, len(ids) // 50)]:
            alpha = decode_rle(rles[k]).reshape(*m.shape, 4)[:, :, 3]
            assert np.array_equal(alpha > 0, m == k)


def test_item_json_text_is_json_dumps():
    """_dumps writes what json.dumps(separators=(",", ":"), default=_plain) writes: odd strings (non-ASCII,
    control characters, quotes, slashes, surrogate pairs), numpy scalars and arrays, rounded floats."""
    rng = np.random.default_rng(0)
    item = {"result": [{"id": s, "value": {"points": np.round(rng.uniform(0, 100, (50, 2)), 4).tolist(),
                                           "labels": [s]}, "score": round(float(rng.random()), 4)}
                       for s in ("Núcleo", "a/b", "\u2028", "\x00\x1f", '"\\', "日本", "\U0001F600", "<&>")],
            "score": np.float32(0.25), "n": np.int64(7), "a": np.arange(3), "b": np.bool_(True), "z": -0.0,
            "big": 2 ** 63, "none": None, "model_version": "default@v3"}
    assert _dumps(item) == json.dumps(item, separators=(",", ":"), default=_plain)
    with pytest.raises(TypeError):
        _dumps({"x": object()})


def _probs(rng, h: int, w: int) -> np.ndarray:
    """Smooth label probabilities (background, one class, boundary) with blob-shaped objects."""
    logits = rng.normal(size=(3, h // 4 + 1, w // 4 + 1)).astype(np.float32) * 4
    logits = np.stack([cv2.resize(cv2.GaussianBlur(c, (0, 0), 1.0), (w, h)) for c in logits])
    logits[0] += 1.5
    p = np.exp(logits - logits.max(0))
    return (p / p.sum(0)).astype(np.float32)


@pytest.mark.parametrize("seed", range(2))
def test_task_items_equal_the_old_path_end_to_end(seed):
    """Split, cut and every region type of a native-size prediction: the LS results' JSON text of the new
    path (cut in place, polygons in one pass, word-packed RLE, _dumps) against the old one's."""
    from tests.test_regions import _sdk_rle

    rng = np.random.default_rng(seed)
    config = parse_label_config(CONFIG)
    for h, w in ((520, 696), (97, 131)):
        probs = _probs(rng, h, w)
        classes, inst, labels, scores = split_instances(probs, 1, 4, 3.0)
        raw = Prediction(classes, inst, labels, scores, task_score(1 - probs[0], inst > 0))
        cut = RegionCut(min_score=float(np.median(list(scores.values()))) if scores else 0.0, nms_iou=0.5)
        old = _old_cut_regions(raw, cut)
        new = cut_regions(Prediction(classes.copy(), inst.copy(), labels, scores, raw.score), cut, copy=False)
        assert len(old.instance_label) > 5 or h < 100
        got = json.dumps(prediction_to_results(new, config, "image", ["Nucleus"]), separators=(",", ":"))
        names = {k: "Nucleus" for k in old.instance_label}
        brush = [{"id": f"mask-{k}", "from_name": "mask", "to_name": "image", "type": "brushlabels",
                  "original_width": w, "original_height": h, "image_rotation": 0,
                  "score": round(float(old.instance_score[k]), 4),
                  "value": {"format": "rle", "rle": _sdk_rle(old.instances == k), "brushlabels": ["Nucleus"]}}
                 for k in sorted(names)]
        rect = instances_to_results(old.instances, names, old.instance_score, config.controls[2])
        want = brush + _old_polygon_results(old.instances, names, old.instance_score, config.controls[1]) + rect
        assert got == json.dumps(want, separators=(",", ":"))
        assert _dumps({"result": json.loads(got)}) == json.dumps({"result": json.loads(got)}, separators=(",", ":"))


@pytest.mark.parametrize("seed", range(3))
def test_split_areas_are_the_objects_pixel_counts(seed):
    """split_instances' areas (what the region cut reads instead of counting) are each object's pixel count, and
    its maps are the same with or without them; maps with no core at all (every object outline only) too."""
    rng = np.random.default_rng(seed)
    for t in range(30):
        h, w = (int(v) for v in rng.integers(4, 90, 2))
        probs = _probs(rng, h, w)
        if t % 3 == 0:                                       # no core: the boundary class wins every object pixel
            probs[2] += probs[1]
            probs[1] = 0
        *maps, areas = split_instances(probs, 1, 4, 3.0, with_areas=True)
        plain = split_instances(probs, 1, 4, 3.0)
        full = _full_image_split(probs, 1, 4, 3.0)                # the formulation of tests/test_predict_split
        assert np.array_equal(maps[0], full[0]) and np.array_equal(maps[1], full[1]) and maps[2:] == list(full[2:])
        assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(maps, plain))
        counts = np.bincount(maps[1].ravel(), minlength=len(areas) + 1)
        assert areas == {k: int(counts[k]) for k in maps[2]}


def _greedy_nms(boxes, scores, iou_thr, classes=None):
    """Greedy NMS spelled out: by descending score (stable), a box stays unless a box kept before it, of its
    class, overlaps it by iou_thr or more; every box stays when iou_thr >= 1 or there is one box."""
    from tessera.model import metrics

    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    if iou_thr >= 1.0 or len(order) < 2:
        return order
    iou = metrics.box_iou(np.asarray(boxes, np.float64), np.asarray(boxes, np.float64))
    same = (lambda i, j: True) if classes is None else (lambda i, j: classes[i] == classes[j])
    keep: list = []
    for j in order:
        if not any(same(i, j) and iou[i, j] >= iou_thr for i in keep):
            keep.append(j)
    return np.array(keep, np.intp)


def test_box_nms_without_clashes_keeps_the_loops_answer():
    from tessera.model.postprocess import box_nms

    rng = np.random.default_rng(0)
    for t in range(300):
        n = int(rng.integers(0, 30))
        xy = rng.uniform(0, 200, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(0, 40, (n, 2)) * (t % 7 != 0)], 1)   # some of zero size
        scores = rng.random(n).round(1)                                                      # ties
        classes = rng.integers(0, 2, n) if t % 2 else None
        thr = float(rng.choice([0.1, 0.3, 0.5, 0.9]))
        got, want = box_nms(boxes, scores, thr, classes), _greedy_nms(boxes, scores, thr, classes)
        assert np.array_equal(got, want) and got.dtype == want.dtype


def test_clashes_are_the_iou_matrix_pairs():
    """The x sweep finds exactly the pairs one IoU matrix holds at or above the threshold, of one class when
    classes are given, whatever the chunk: touching and nested boxes, equal x0s, boxes of no size."""
    from tessera.model import metrics
    from tessera.model.postprocess import clashes

    rng = np.random.default_rng(1)
    for t in range(60):
        n = int(rng.integers(0, 400))
        xy = rng.integers(0, 300, (n, 2)).astype(np.float64)                 # integer corners: equal x0s, touching
        boxes = np.concatenate([xy, xy + rng.integers(0, 60, (n, 2)) * (rng.random((n, 1)) > 0.05)], 1)
        classes = rng.integers(0, 3, n) if t % 2 else None
        thr = float(rng.choice([0.05, 0.3, 0.5, 1.0]))
        iou = metrics.box_iou(boxes, boxes)
        want = (iou >= thr) & ~np.eye(n, dtype=bool)
        if classes is not None:
            want &= classes[:, None] == classes[None, :]
        for chunk in (1, 7, 256):
            start, near = clashes(boxes, thr, classes, chunk=chunk)
            got = np.zeros((n, n), bool)
            got[np.repeat(np.arange(n), np.diff(start)), near] = True
            assert np.array_equal(got, want) and len(near) == want.sum()
            assert all(np.all(np.diff(near[start[i]:start[i + 1]]) > 0) for i in range(n))


def test_box_nms_of_many_boxes_keeps_the_loops_answer():
    """Hundreds of overlapping boxes (more than one chunk of the sweep): the loop's greedy answer."""
    from tessera.model.postprocess import box_nms

    rng = np.random.default_rng(2)
    for t in range(6):
        n = 700
        xy = rng.uniform(0, 400, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 50, (n, 2))], 1)
        scores = rng.random(n).round(2)
        classes = rng.integers(0, 2, n) if t % 2 else None
        got, want = box_nms(boxes, scores, 0.5, classes), _greedy_nms(boxes, scores, 0.5, classes)
        assert np.array_equal(got, want) and len(want) < n


def _dense_fuse(sets, iou_thr):
    """fuse_boxes over one IoU matrix, as it was written before the sweep (stop 41)."""
    from tessera.model import metrics

    n = len(sets)
    allb = np.concatenate([np.asarray(s, np.float64).reshape(-1, 6) for s in sets])
    allb = allb[np.argsort(-allb[:, 4], kind="stable")]
    near = (metrics.box_iou(allb[:, :4], allb[:, :4]) >= iou_thr) & (allb[:, None, 5] == allb[None, :, 5])
    taken, out = np.zeros(len(allb), bool), []
    for i in range(len(allb)):
        if not taken[i]:
            group = np.flatnonzero(near[i] & ~taken)
            taken[group] = True
            s = allb[group, 4]
            out.append([*(allb[group, :4] * s[:, None]).sum(0) / max(s.sum(), 1e-12), s.mean() * min(len(group), n) / n,
                        allb[i, 5]])
    out = np.array(out, np.float64).reshape(-1, 6)
    return out[np.argsort(-out[:, 4], kind="stable")]


def test_fuse_boxes_of_many_boxes_is_the_iou_matrix_answer():
    from tessera.model.postprocess import FUSE_IOU, fuse_boxes

    rng = np.random.default_rng(3)
    for t in range(8):
        sets = []
        for _ in range(int(rng.integers(2, 4))):
            n = int(rng.integers(100, 400))
            xy = rng.uniform(0, 500, (n, 2))
            sets.append(np.concatenate([xy, xy + rng.uniform(4, 40, (n, 2)), rng.random((n, 1)).round(2),
                                        rng.integers(0, 2, (n, 1))], 1))
        np.testing.assert_array_equal(fuse_boxes(sets), _dense_fuse(sets, FUSE_IOU))


def test_task_score_of_the_instances_is_task_score():
    """_task_score_of(p_bg, instances, object pixels) == task_score(1 - p_bg, instances > 0), the same float, on
    probabilities at and around the clipping thresholds."""
    from tessera.model.inference import _task_score_of

    rng = np.random.default_rng(0)
    for t in range(60):
        h, w = (int(v) for v in rng.integers(1, 120, 2))
        p_bg = (rng.random((h, w)) ** rng.uniform(0.2, 5)).astype(np.float32)
        p_bg.ravel()[:: 7] = rng.choice(np.array([0.05, 0.95, 0.0, 1.0], np.float32), p_bg.ravel()[:: 7].size)
        inst = (rng.integers(0, 9, (h, w)) * (p_bg < rng.uniform(0, 1))).astype(np.int32)
        assert _task_score_of(p_bg, inst, int(np.count_nonzero(inst))) == task_score(1 - p_bg, inst > 0)
