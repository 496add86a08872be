"""Tests for model/metrics.py against small hand-computed cases."""
import math

import numpy as np
import pytest

from tessera.model.metrics import (box_ap50, box_ap50_many, box_iou, boxes_from_instances, instance_ap,
                           instance_match, iou, mean_iou, pearson, per_class_iou, spearman)


def test_iou_and_mean_iou():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :4] = True                  # 4 px
    b[0, 2:4] = True
    b[1, 0:2] = True                 # 4 px, 2 shared -> 2 / 6
    assert iou(a, b) == pytest.approx(2 / 6)
    assert iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    true = np.array([[0, 1, 1, 2]])
    pred = np.array([[0, 1, 2, 2]])
    # class 1: inter 1, union 2 -> .5; class 2: inter 1, union 2 -> .5; class 3 absent from both
    np.testing.assert_allclose(per_class_iou(pred, true, 3), [0.5, 0.5, np.nan])
    assert mean_iou(pred, true, 3) == pytest.approx(0.5)
    assert mean_iou(true, true, 2) == 1.0
    assert mean_iou(np.zeros((2, 2), int), np.zeros((2, 2), int), 2) == 1.0
    with pytest.raises(ValueError, match="n_classes"):
        mean_iou(pred, true, 1)


def test_instance_match_hand_case():
    true = np.zeros((6, 6), np.int32)
    true[0:2, 0:2] = 5               # 4 px
    true[0:2, 3:6] = 9               # 6 px
    true[4:6, 4:6] = 2               # 4 px, missed
    pred = np.zeros((6, 6), np.int32)
    pred[0:2, 0:3] = 1               # vs 5: inter 4, union 6 -> .667 (match)
    pred[0:1, 3:6] = 7               # vs 9: inter 3, union 6 -> .5 (match at >= .5)
    pred[3, 0:2] = 8                 # false positive
    r = instance_match(pred, true, 0.5)
    assert (r["matched"], r["n_pred"], r["n_true"]) == (2, 3, 3)
    assert r["recall"] == pytest.approx(2 / 3) and r["precision"] == pytest.approx(2 / 3)
    assert r["mean_matched_iou"] == pytest.approx((4 / 6 + 0.5) / 2)
    assert instance_match(pred, true, 0.6)["matched"] == 1
    empty = np.zeros_like(true)
    assert instance_match(empty, empty)["recall"] == 1.0
    assert instance_match(empty, true)["recall"] == 0.0 and instance_match(empty, true)["precision"] == 1.0
    # DSB score: thresholds .5 -> 2 TP (2/(3+3-2)=.5), .6 -> 1 TP (1/5), >= .7 -> 0
    assert instance_ap(pred, true, (0.5, 0.6, 0.7)) == pytest.approx((0.5 + 0.2 + 0) / 3)
    assert instance_ap(true, true) == 1.0


def test_instance_match_one_to_one_at_low_threshold():
    true = np.array([[1, 1, 2, 2]])
    pred = np.array([[3, 3, 3, 3]])          # IoU .5 with both true objects: only one may match
    assert instance_match(pred, true, 0.3)["matched"] == 1


def test_instance_match_many_instances():
    # its speed on these 400 objects is measured by bench/micro.py, not asserted here
    rng = np.random.default_rng(0)
    true = np.kron(np.arange(1, 401).reshape(20, 20), np.ones((12, 12), np.int32)).astype(np.int32)
    pred = np.roll(true, 2, axis=1) * (rng.random(true.shape) > 0.01)
    r = instance_match(pred, true)
    assert r["n_true"] == 400 and r["matched"] == 400


def test_boxes_from_instances():
    inst = np.zeros((5, 6), np.int32)
    inst[1:3, 2:5] = 40
    inst[4, 0] = 3
    assert boxes_from_instances(inst) == [(0, 4, 1, 5), (2, 1, 5, 3)]     # id 3 then id 40
    assert boxes_from_instances(np.zeros((3, 3), np.int32)) == []
    assert boxes_from_instances(np.full((2, 3), 7)) == [(0, 0, 3, 2)]


def test_box_iou_and_ap50():
    np.testing.assert_allclose(box_iou([[0, 0, 2, 2]], [[1, 0, 3, 2], [5, 5, 6, 6]]), [[2 / 6, 0]])
    true = [[0, 0, 10, 10], [20, 20, 30, 30]]
    assert box_ap50([[0, 0, 10, 10, 0.9], [20, 20, 30, 30, 0.8]], true) == pytest.approx(1.0)
    # a confident false positive first: precision 0, 1/2, 2/3 at recalls 0, .5, 1 -> AP = 2/3
    pred = [[50, 50, 60, 60, 0.99], [0, 0, 10, 10, 0.9], [20, 20, 30, 30, 0.8]]
    assert box_ap50(pred, true) == pytest.approx(2 / 3)
    # duplicate detection of one box counts once; the other box is missed -> AP = .5
    assert box_ap50([[0, 0, 10, 10, 0.9], [0, 0, 10, 9, 0.8]], true) == pytest.approx(0.5)
    assert box_ap50(np.zeros((0, 5)), true) == 0.0
    assert box_ap50([], []) == 1.0 and box_ap50([[0, 0, 1, 1, 0.5]], []) == 0.0
    # over two images: a prediction can only match boxes of its own image
    assert box_ap50_many([[[0, 0, 10, 10, 0.9]], []], [[], [[0, 0, 10, 10]]]) == 0.0


def test_correlations():
    x = [1, 2, 3, 4, 5]
    assert pearson(x, [2, 4, 6, 8, 10]) == pytest.approx(1.0)
    assert pearson(x, [1, 4, 9, 16, 100]) < 1.0
    assert spearman(x, [1, 4, 9, 16, 100]) == pytest.approx(1.0)
    assert spearman(x, [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1], [2]))


def test_instance_iou_matrix_counts_as_the_sort_does():
    """The bincount path == np.unique's on maps with gaps in the ids, one-sided and empty maps, other int
    dtypes, and ids far above the pixel count (which take the sort)."""
    from tessera.model.metrics import _iou_matrix_sorted, instance_iou_matrix

    rng = np.random.default_rng(4)
    for t in range(80):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        ids = rng.choice([0, 1, 2, 3, 7, 40, 41, 99, 10 ** 6][:int(rng.integers(1, 10))], (2, h, w))
        pred, true = (ids[k] * (rng.random((h, w)) < rng.uniform(0, 1)) for k in range(2))
        pred, true = pred.astype(rng.choice([np.int32, np.int64, np.uint16])), true.astype(np.int32)
        got, want = instance_iou_matrix(pred, true), _iou_matrix_sorted(pred.ravel(), true.ravel())
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(got, want))
