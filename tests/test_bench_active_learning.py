"""bench.active_learning's arithmetic: labels to a goal, area under a curve, paired savings."""

import numpy as np
import pytest

from bench.active_learning import area, labels_to_reach, summarise


def _curve(points):
    return [{"labels": x, "quality": y} for x, y in points]


def test_labels_to_reach_interpolates_between_rounds_and_says_never():
    c = _curve([(2, 0.5), (4, 0.6), (8, 0.7)])
    assert labels_to_reach(c, 0.65) == pytest.approx(6.0)
    assert labels_to_reach(c, 0.4) == 2.0
    assert labels_to_reach(c, 0.71) is None


def test_area_is_the_mean_quality_over_the_label_range():
    assert area(_curve([(2, 0.5), (4, 0.7), (8, 0.7)])) == pytest.approx((0.6 * 2 + 0.7 * 4) / 6)


def test_savings_are_paired_per_seed_and_a_missed_goal_counts_as_the_last_count():
    full = [{"quality": 1.0}]
    curves = {"random": [_curve([(2, 0.5), (4, 0.9), (8, 0.96)]), _curve([(2, 0.5), (4, 0.6), (8, 0.7)])],
              "other": [_curve([(2, 0.5), (4, 0.96), (8, 0.97)]), _curve([(2, 0.5), (4, 0.6), (8, 0.8)])]}
    s = summarise(curves, full)
    assert s["labels_to_95pct"]["random"]["per_seed"] == pytest.approx([4 + 4 * 0.05 / 0.06, 8.0])
    assert s["labels_to_95pct"]["other"]["per_seed"] == pytest.approx([2 + 2 * 0.45 / 0.46, 8.0])
    saving = s["saving_vs_random"]["other"]
    assert saving["per_seed"][0] == pytest.approx(1 - (2 + 2 * 0.45 / 0.46) / (4 + 4 * 0.05 / 0.06))
    assert saving["per_seed"][1] == 0.0 and saving["seeds_saving"] == "1/2"
    mean_other, mean_random = (2 + 2 * 0.45 / 0.46 + 8) / 2, (4 + 4 * 0.05 / 0.06 + 8) / 2
    assert saving["of_means"] == pytest.approx(1 - mean_other / mean_random)
    assert saving["labels_minus_random"]["mean"] == pytest.approx(mean_other - mean_random)
    assert s["auc_minus_random"]["other"]["seeds_above"] == "2/2" and not s["meets_target"]


def test_target_mask_is_the_breed_class_for_a_label_name_and_the_foreground_otherwise():
    from bench.active_learning import target_mask

    classes = np.array([[0, 1, 2, 3]])
    names = ["Abyssinian", "Bengal", "american_bulldog"]
    assert target_mask(classes, "Bengal", names).tolist() == [[False, False, True, False]]
    assert target_mask(classes, "fluorescence", ["object"]).tolist() == [[False, True, True, True]]


def test_imbalanced_pool_holds_the_rare_group_to_its_share_and_keeps_the_order():
    from bench.active_learning import breed, imbalanced_pool, parse_rare

    ids = [f"{b}_{k}" for k in range(30) for b in ("Abyssinian", "Bengal", "american_bulldog")]
    pool = imbalanced_pool(ids, breed, 30, parse_rare("Bengal:0.1,american_bulldog:0.2"))
    groups = [breed(i) for i in pool]
    assert len(pool) == 30 and groups.count("Bengal") == 3 and groups.count("american_bulldog") == 6
    assert pool == [i for i in ids if i in set(pool)]                   # the given order, not regrouped
    assert imbalanced_pool(ids, breed, 30) == ids[:30]
