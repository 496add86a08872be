"""Region cut (score, size, NMS), its learning on held-back images, and boxes learned as box centres."""
from dataclasses import replace

import numpy as np
import pytest

from tessera.model.inference import Prediction, cut_regions
from tessera.model.postprocess import (ImageRecord, RegionCut, box_nms, box_sample, choose_cut, cut_grid,
                               detection_metrics, fuse_boxes, grow_boxes, image_record, paint_box_cores, resolve_cut)


def test_box_nms_drops_overlapping_boxes_of_one_object():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]])
    keep = box_nms(boxes, np.array([0.9, 0.8, 0.7, 0.95]), 0.5)
    assert sorted(keep.tolist()) == [2, 3]          # the two lower-scoring copies of the first box go
    assert sorted(box_nms(boxes, np.ones(4), 1.0).tolist()) == [0, 1, 2, 3]


def test_fuse_boxes_merges_one_objects_boxes_from_several_passes_and_ranks_by_agreement():
    """Three passes of one image: an object all three found becomes one box at their score-weighted mean,
    scored their mean; one only a pass found keeps its box at a third of its score; a box of another class
    over the first object stays its own; the result comes highest score first."""
    a = np.array([[10, 10, 30, 30, 0.9, 1], [60, 60, 80, 80, 0.9, 1], [11, 10, 31, 30, 0.8, 2]], float)
    b = np.array([[12, 10, 32, 30, 0.6, 1]], float)
    c = np.array([[8, 12, 28, 32, 0.3, 1]], float)
    got = fuse_boxes([a, b, c])
    assert got.shape == (3, 6)
    assert np.all(np.diff(got[:, 4]) <= 0)
    first = got[np.isclose(got[:, 4], 0.6)][0]          # (0.9 + 0.6 + 0.3) / 3
    w = np.array([0.9, 0.6, 0.3])
    expect = (np.array([[10, 10, 30, 30], [12, 10, 32, 30], [8, 12, 28, 32]]) * w[:, None]).sum(0) / w.sum()
    assert np.allclose(first[:4], expect) and first[5] == 1
    assert np.allclose(got[np.isclose(got[:, 4], 0.3)][0][:4], [60, 60, 80, 80])      # 0.9 / 3
    other = got[got[:, 5] == 2]
    assert len(other) == 1 and np.isclose(other[0, 4], 0.8 / 3) and np.allclose(other[0, :4], [11, 10, 31, 30])
    # far apart boxes of one class are two objects, and one pass is passed through, highest score first
    assert np.array_equal(fuse_boxes([a[[1, 0]]]), a[[1, 0]][np.argsort(-a[[1, 0], 4], kind="stable")])
    assert fuse_boxes([np.zeros((0, 6)), np.zeros((0, 6))]).shape == (0, 6)


def test_paint_box_cores_keeps_overlapping_boxes_apart_and_grows_back():
    boxes = np.array([[10, 10, 50, 50], [30, 30, 70, 70]], float)    # IoU 0.14, heavily overlapping
    classes, inst = paint_box_cores(boxes, np.array([1, 2]), 80, 80, 0.5)
    assert set(np.unique(inst)) == {0, 1, 2} and set(np.unique(classes)) == {0, 1, 2}
    small_first = paint_box_cores(np.array([[10, 10, 40, 40], [20, 20, 100, 100]], float), np.array([1, 1]),
                                  120, 120, 0.5)[1]          # painted large first; instance i + 1 is boxes[i]'s
    assert small_first[25, 25] == 1 and small_first[60, 60] == 2
    from tessera.model.postprocess import instance_boxes
    core = instance_boxes(inst, [1, 2])
    grown = grow_boxes(core, 0.5, 80, 80)
    assert np.abs(np.sort(grown, 0) - np.sort(boxes, 0)).max() <= 1.0


def _pred(instances, scores):
    ids = [int(i) for i in np.unique(instances) if i]
    return Prediction((instances > 0).astype(np.int32), instances.astype(np.int32), {k: 1 for k in ids},
                      dict(zip(ids, scores)), 0.5)


def test_cut_regions_drops_low_scores_and_specks():
    inst = np.zeros((40, 40), np.int32)
    inst[2:12, 2:12] = 1          # real, 100 px
    inst[20:22, 20:22] = 2        # speck, 4 px
    inst[25:35, 25:35] = 3        # low score
    out = cut_regions(_pred(inst, [0.9, 0.95, 0.3]), RegionCut(min_score=0.5, min_area=10))
    assert set(out.instance_label) == {1} and set(np.unique(out.instances)) == {0, 1}
    assert (out.classes > 0).sum() == 100


def test_learned_cut_maximises_f1_and_meets_a_precision_target():
    rng = np.random.default_rng(0)
    records = []
    for _ in range(20):
        # 5 true objects found with scores ~0.85, 10 false positives with scores ~0.6 (some high)
        s_true, s_false = rng.uniform(0.7, 1.0, 5), rng.uniform(0.3, 0.8, 10)
        ious = np.zeros((15, 5))
        ious[np.arange(5), np.arange(5)] = 0.8
        records.append(ImageRecord(np.concatenate([s_true, s_false]), np.full(15, 100.0),
                                   np.arange(60).reshape(15, 4) * 100.0, ious, np.full(5, 100.0)))
    grid = cut_grid(records)
    raw = next(r for r in grid if r["min_score"] == 0 and r["min_area"] == 0)
    assert raw["precision"] == pytest.approx(1 / 3, abs=1e-3) and raw["recall"] == 1.0
    f1 = choose_cut(grid)
    assert f1.min_score >= 0.6 and f1.precision > 0.6 and f1.recall > 0.6
    strict = choose_cut(grid, precision_target=0.95)
    assert strict.precision >= 0.95 and strict.min_score >= f1.min_score
    # the override replaces the learned score threshold; the grid re-chooses for a target at load time
    stored = {"chosen": f1.to_dict(), "grid": grid, "nms_iou": 0.5}
    assert resolve_cut(stored).min_score == f1.min_score
    assert resolve_cut(stored, min_score=0.2).min_score == 0.2
    assert resolve_cut(stored, precision_target=0.95).min_score == strict.min_score


def test_of_cuts_with_nearly_the_best_f1_the_one_that_misses_fewer_objects_or_keeps_fewer_wrong_wins():
    """F1 is flat near its top: the cut kept is the one whose lower of precision and recall is the higher among
    those within F1_TIE of the best, not the strict best (which here misses 6 more of 100 objects to keep
    10 fewer wrong regions)."""
    from tessera.model.postprocess import F1_TIE

    def row(score, tp, n_pred, n_true=100):
        p, r = tp / n_pred, tp / n_true
        return {"min_area": 0.0, "min_score": score, "min_keep": 0, "precision": p, "recall": r,
                "f1": 2 * p * r / (p + r), "n_pred": n_pred, "n_true": n_true, "tp": tp}

    grid = [row(0.2, 90, 140), row(0.3, 82, 100), row(0.4, 76, 84), row(0.5, 60, 62)]
    f1s = sorted(r["f1"] for r in grid)
    assert f1s[-1] == grid[2]["f1"] and f1s[-1] - grid[1]["f1"] < F1_TIE    # 0.3 is within the tie of 0.4's best
    cut = choose_cut(grid)
    assert cut.min_score == 0.3 and (cut.precision, cut.recall) == (0.82, 0.82)
    # a cut further from the best F1 is not an equal, however balanced
    grid[1] = row(0.3, 79, 100)
    assert grid[2]["f1"] - grid[1]["f1"] > F1_TIE and choose_cut(grid).min_score == 0.4
    # the other way round: of two equals, the one with fewer wrong regions where precision is the lower
    grid = [row(0.2, 88, 112), row(0.3, 83, 100), row(0.4, 70, 78)]
    assert max(grid, key=lambda r: r["f1"])["min_score"] == 0.2 and choose_cut(grid).min_score == 0.3


def test_detection_metrics_on_box_samples_count_classes_and_misses():
    img = np.zeros((60, 60, 3), np.uint8)
    s = box_sample(img, np.array([[5, 5, 25, 25, 1], [30, 30, 55, 55, 2]]), 0.6)
    assert s.boxes.shape == (2, 5) and s.instances.max() == 2
    pred = Prediction(s.classes, s.instances, {1: 2, 2: 2}, {1: 0.9, 2: 0.8}, 0.9,
                      boxes={1: (30.0, 30.0, 55.0, 55.0), 2: (5.0, 5.0, 25.0, 25.0)})  # both called class 2
    rec = image_record(pred, s)
    assert rec.ious.shape == (2, 2)
    m = detection_metrics([pred], RegionCut(), [s], 2, ["a", "b"])
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["class_recall"] == {"a": 0.0, "b": 1.0} and m["missed_classes"] == ["a"]
    assert m["class_ap50"]["b"] == 1.0 and m["box_ap50"] == 0.5


def test_images_without_predictions_or_objects_count_correctly():
    img = np.zeros((30, 30, 3), np.uint8)
    empty_pred = Prediction(np.zeros((30, 30), np.int32), np.zeros((30, 30), np.int32), {}, {}, 1.0, boxes={})
    with_box = box_sample(img, np.array([[2, 2, 12, 12, 1]]), 0.6)
    no_box = box_sample(img, np.zeros((0, 5)), 0.6)
    for s in (with_box, no_box):
        rec = image_record(empty_pred, s)
        assert rec.ious.shape == (0, len(s.boxes))
    m = detection_metrics([empty_pred, empty_pred], RegionCut(), [with_box, no_box], 1)
    assert m["recall"] == 0.0 and m["regions_per_image"] == 0.0 and m["true_per_image"] == 0.5
    assert cut_grid([image_record(empty_pred, with_box)])[0]["recall"] == 0.0


def test_box_scale_is_learned_from_systematically_too_large_boxes():
    from tessera.model.postprocess import fit_box_scale, scale_boxes
    img = np.zeros((100, 100, 3), np.uint8)
    s = box_sample(img, np.array([[10, 10, 30, 30, 1], [50, 50, 80, 70, 1]]), 0.6)
    too_big = {1: (5.0, 5.0, 35.0, 35.0), 2: (42.5, 45.0, 87.5, 75.0)}       # 1.5x the true sizes
    pred = Prediction(s.classes, s.instances, {1: 1, 2: 1}, {1: 0.9, 2: 0.9}, 0.9, boxes=too_big)
    f = fit_box_scale([pred], [s])
    assert f == pytest.approx(1 / 1.5, abs=0.03)
    fixed = scale_boxes(too_big, f, 100, 100)
    assert np.allclose(fixed[1], (10, 10, 30, 30), atol=1.0)


def test_a_box_model_predicts_grown_boxes_and_refines_into_a_box(monkeypatch):
    from tessera.model.inference import Predictor
    from tessera.model.vqvae import VQVAE, VQVAEConfig

    model = VQVAE(VQVAEConfig(resolution=32, n_labels=3, codebook_size=16, embed_dim=8, widths=(8, 8, 16, 16)))
    p = Predictor(model, ["a"], device="cpu", box_shrink=0.5)
    assert p.box_grow == 2.0
    probs = np.zeros((3, 40, 48), np.float32)
    probs[0] = 1.0
    probs[:, 10:20, 12:22] = [[[0.0]], [[1.0]], [[0.0]]]            # one centre region, 10 x 10 px
    pred = p._prediction(probs)
    assert pred.boxes == {1: (7.0, 5.0, 27.0, 25.0)}                 # grown 2x about its centre
    core = np.zeros((40, 48), bool)
    core[10:20, 12:22] = True                                        # what the network finds: the centre
    monkeypatch.setattr(p, "_refine_view", lambda *a: (core, 1.0))
    hint = np.zeros((40, 48), bool)
    hint[5:25, 7:27] = True                                          # a rough box around the object
    mask, conf = p.refine(np.zeros((40, 48, 3), np.uint8), hint, [], [], 1)
    ys, xs = np.nonzero(mask)
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (5, 25, 7, 27) and mask.sum() == 400
    assert conf == pytest.approx(1.0)


def test_nms_is_per_class_overlapping_boxes_of_two_classes_both_kept():
    """A cat's box over a dog's (IoU 0.68) is two objects; the same overlap within one class is one."""
    inst = np.zeros((40, 40), np.int32)
    inst[0:20, 0:20], inst[2:20, 2:22] = 1, 2
    boxes = {1: (0.0, 0.0, 20.0, 20.0), 2: (2.0, 2.0, 22.0, 20.0)}
    two = Prediction(np.where(inst == 2, 2, (inst > 0).astype(np.int32)), inst, {1: 1, 2: 2}, {1: 0.9, 2: 0.8},
                     0.5, boxes)
    assert set(cut_regions(two, RegionCut(nms_iou=0.5)).instance_label) == {1, 2}
    one = Prediction((inst > 0).astype(np.int32), inst, {1: 1, 2: 1}, {1: 0.9, 2: 0.8}, 0.5, boxes)
    assert set(cut_regions(one, RegionCut(nms_iou=0.5)).instance_label) == {1}
    b = np.array(list(boxes.values()))
    assert sorted(box_nms(b, np.array([0.9, 0.8]), 0.5, np.array([1, 2])).tolist()) == [0, 1]
    assert box_nms(b, np.array([0.9, 0.8]), 0.5, np.array([2, 2])).tolist() == [0]
    # the metrics the cut is learned and judged by keep both too
    from tessera.model.data import Sample
    truth = Sample(image=np.zeros((40, 40, 3), np.uint8), classes=np.zeros((40, 40), np.int32),
                   instances=np.zeros((40, 40), np.int32),
                   boxes=np.array([[0, 0, 20, 20, 1], [2, 2, 22, 20, 2]], float))
    m = detection_metrics([two], RegionCut(nms_iou=0.5), [truth], 2)
    assert m["recall"] == 1.0 and m["precision"] == 1.0 and m["box_ap50"] == 1.0
    assert image_record(two, truth).classes.tolist() == [1, 2]


def _one_object_images(n: int, hard_score: float) -> list[ImageRecord]:
    """n images of one true object each (region 0). The even ones are easy: the object scores 0.9, beside
    three clutter regions at 0.3. The odd ones are hard: the object scores `hard_score`, beside one clutter
    region at 0.05."""
    records = []
    for i in range(n):
        easy = i % 2 == 0
        scores = np.array([0.9, 0.3, 0.3, 0.3] if easy else [hard_score, 0.05])
        boxes = np.array([[20 * k, 0, 20 * k + 10, 10] for k in range(len(scores))], float)
        ious = np.zeros((len(scores), 1))
        ious[0, 0] = 0.8
        records.append(ImageRecord(scores, np.full(len(scores), 100.0), boxes, ious, np.full(1, 100.0)))
    return records


def test_a_cut_learns_to_keep_each_images_best_region_when_every_image_holds_an_object():
    """A score threshold alone leaves the hard images empty (a whole box to draw each); when every held-back
    image holds an object, the cut learns to keep each image's best region whatever its score."""
    records = _one_object_images(10, hard_score=0.2)
    grid = cut_grid(records)
    assert {r["min_keep"] for r in grid} == {0, 1}
    cut = choose_cut(grid)
    assert cut.min_keep == 1 and cut.min_score > 0.3
    assert cut.precision == 1.0 and cut.recall == 1.0
    without = max((r for r in grid if r["min_keep"] == 0), key=lambda r: r["f1"])
    assert without["recall"] == 0.5                  # what the best threshold alone gives

    inst = np.zeros((40, 40), np.int32)
    inst[2:12, 2:12], inst[20:30, 20:30], inst[3:12, 2:12] = 1, 2, 3     # 3 duplicates 1, a little weaker
    hard = _pred(inst, [0.2, 0.1, 0.15])
    hard = Prediction(hard.classes, hard.instances, hard.instance_label, hard.instance_score, hard.score,
                      boxes={1: (2.0, 2.0, 12.0, 12.0), 2: (20.0, 20.0, 30.0, 30.0), 3: (2.0, 3.0, 12.0, 12.0)})
    assert set(cut_regions(hard, cut).instance_label) == {1}                 # its best region, NMS still on
    assert set(cut_regions(hard, replace(cut, min_keep=2)).instance_label) == {1, 2}
    assert cut_regions(hard, replace(cut, min_keep=0)).instance_label == {}
    # an operator's score threshold is literal: no floor
    stored = {"chosen": cut.to_dict(), "grid": grid, "nms_iou": 0.5}
    assert resolve_cut(stored).min_keep == 1 and resolve_cut(stored, min_score=0.5).min_keep == 0
    assert RegionCut.from_dict({"min_score": 0.3}).min_keep == 0             # a cut stored before floors


def test_the_floor_is_kept_where_its_regions_pay_for_the_deletes_even_when_f1_would_drop_it():
    """Six easy images of three objects found at 0.9, and six hard images whose best region (0.2) is the
    object in two of them. F1 prefers leaving the hard images empty (0.857 against 0.833), but a floor
    region right one time in three saves more drawing than its deletes cost (FLOOR_MIN_HIT)."""
    def image(scores, hits, n_true):
        ious = np.zeros((len(scores), n_true))
        for p, t in hits:
            ious[p, t] = 0.8
        boxes = np.array([[20 * k, 0, 20 * k + 10, 10] for k in range(len(scores))], float)
        return ImageRecord(np.array(scores), np.full(len(scores), 100.0), boxes, ious, np.full(n_true, 100.0))

    easy = [image([0.9, 0.9, 0.9, 0.3], [(0, 0), (1, 1), (2, 2)], 3) for _ in range(6)]
    hard = [image([0.2, 0.1], [(0, 0)] if i < 2 else [(1, 0)], 1) for i in range(6)]
    grid = cut_grid(easy + hard)
    without = max((r for r in grid if r["min_keep"] == 0), key=lambda r: r["f1"])
    assert (without["precision"], without["recall"]) == (1.0, 0.75)
    cut = choose_cut(grid)
    assert cut.min_keep == 1 and cut.min_score > 0.3
    assert (cut.precision, cut.recall) == (round(20 / 24, 4), round(20 / 24, 4))
    assert choose_cut(grid, precision_target=0.9).min_keep == 0    # a precision target is the user's: as asked
    # right one time in six: below FLOOR_MIN_HIT, no floor
    hard = [image([0.2, 0.1], [(0, 0)] if i < 1 else [(1, 0)], 1) for i in range(6)]
    assert choose_cut(cut_grid(easy + hard)).min_keep == 0


def test_no_floor_when_a_held_back_image_holds_no_object_or_it_does_not_pay():
    empty = ImageRecord(np.array([0.1]), np.full(1, 100.0), np.array([[0, 0, 10, 10]], float), np.zeros((1, 0)),
                        np.zeros(0))
    grid = cut_grid(_one_object_images(10, hard_score=0.2) + [empty])
    assert {r["min_keep"] for r in grid} == {0}
    # the hard images' best region is clutter, not the object: the floor would only add wrong boxes
    assert choose_cut(cut_grid(_one_object_images(10, hard_score=0.02))).min_keep == 0
