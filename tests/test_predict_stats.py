"""The request path's per-image statistics, held to the plain numpy formulations they replace."""
import numpy as np
import pytest

from tessera.model.data import percentiles as _percentiles
from tessera.model.inference import Prediction, cut_regions, image_stats, task_score
from tessera.model.postprocess import RegionCut


@pytest.mark.parametrize("seed", range(4))
def test_histogram_percentiles_are_numpys(seed):
    rng = np.random.default_rng(seed)
    for _ in range(250):
        h, w = rng.integers(1, 70, 2)
        x = (rng.random((h, w, 3)) ** rng.uniform(0.1, 8) * 255).astype(np.uint8)[::2, ::2]
        qs = (0.5, 50, 99.8) if rng.random() < 0.5 else tuple(rng.uniform(0, 100, 3))
        assert _percentiles(x, qs) == [float(v) for v in np.percentile(x, qs)]   # the same floats
    f = rng.random((9, 7, 3)) * 100                                               # not uint8: numpy's own
    assert _percentiles(f, (10, 90)) == [float(v) for v in np.percentile(f, (10, 90))]
    assert image_stats(np.full((5, 5, 3), 7, np.uint8)) == (7.0, 8.0, False)


def _task_score_reference(p_fg, pred_fg, eps=0.05):
    q = np.where(p_fg < eps, 0.0, np.where(p_fg > 1 - eps, 1.0, p_fg.astype(np.float64)))
    return (q[pred_fg].sum() + 1.0) / (pred_fg.sum() + q[~pred_fg].sum() + 1.0)


def test_task_score_is_the_expected_iou():
    rng = np.random.default_rng(0)
    for k in range(40):
        p = (rng.random((rng.integers(1, 300), rng.integers(1, 300))) ** rng.uniform(0.2, 5)).astype(np.float32)
        pred = p > rng.uniform(0, 1) if k % 10 else np.zeros(p.shape, bool)
        assert task_score(p, pred) == pytest.approx(_task_score_reference(p, pred), rel=1e-6)
    sure = np.zeros((50, 50), np.float32)
    sure[10:20, 10:20] = 0.99
    assert task_score(sure, sure > 0.5) == 1.0                       # confident everywhere: 1
    assert task_score(np.full((50, 50), 0.5, np.float32), sure > 0.5) < 0.1


def test_the_cut_drops_exactly_the_dropped_ids():
    rng = np.random.default_rng(1)
    inst = rng.integers(0, 30, (64, 80)).astype(np.int32)
    inst[:4, :4] = 41                                     # an id in the map that the prediction does not list
    ids = list(range(1, 30))
    scores = {k: float(rng.random()) for k in ids}
    pred = Prediction(np.where(inst > 0, 1, 0).astype(np.int32), inst, {k: 1 for k in ids}, scores, 0.5)
    out = cut_regions(pred, RegionCut(min_score=0.5, nms_iou=1.0))
    gone = [k for k in ids if scores[k] < 0.5]
    assert gone and set(out.instance_label) == set(ids) - set(gone)
    dropped = np.isin(inst, gone)
    assert np.array_equal(out.instances, np.where(dropped, 0, inst))
    assert np.array_equal(out.classes, np.where(dropped, 0, pred.classes))
