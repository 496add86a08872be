"""A counting project end to end: a real Label Studio 1.23.2 with a KeyPointLabels-only config (one point an object)
and `tessera serve`. Tasks annotated with a point on each of the generator's discs train a model; "Retrieve
predictions" on tasks nobody annotated gives one point on each disc, after the version's learned region cut."""
from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.conftest_ls import predictions, retrieve_predictions
from tests.test_e2e_boxes import LABELS, N_ANNOTATED, N_NEW, SIZE, trained_project

pytestmark = pytest.mark.e2e

CONFIG_POINTS = """<View><Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image"><Label value="Red"/><Label value="Green"/></KeyPointLabels></View>"""


def point_results(boxes: np.ndarray) -> list[dict]:
    return [{"from_name": "kp", "to_name": "image", "type": "keypointlabels", "original_width": SIZE,
             "original_height": SIZE, "image_rotation": 0,
             "value": {"x": (x0 + x1) / 2 / SIZE * 100, "y": (y0 + y1) / 2 / SIZE * 100, "width": 1.0,
                       "keypointlabels": [LABELS[int(c) - 1]]}}
            for x0, y0, x1, y1, c in boxes]


def test_counting_project_trains_on_points_and_predicts_a_point_on_each_object(ls_server, ls_api, tmp_path):
    proc, pid, tasks, scenes, st = trained_project(ls_server, ls_api, tmp_path, "tessera points", CONFIG_POINTS,
                                                   point_results, seed=16, TESSERA_GAN_MIN_ANNOTATIONS="5")
    try:
        result = st["job"]["last_result"]
        assert result["status"] == "promoted", result
        print(f"counting project: held-back AP50 of the points' boxes {result['metrics'].get('box_ap50')}; "
              f"served: {st['served']}")
        assert st["served"]["metric"].startswith("box AP50 of the points' boxes"), st["served"]
        # points have no area to check an annotation against: no mislabeling score is written
        assert result.get("mislabeling_written", 0) == 0, result
        assert not any("tessera_mislabeling" in (ls_api.tasks.get(t).meta or {}) for t in tasks[:N_ANNOTATED])

        retrieve_predictions(ls_api, pid)
        hits = n_pred = n_true = wrong_label = 0
        for tid, (_, boxes) in zip(tasks[N_ANNOTATED:], scenes[N_ANNOTATED:]):
            (pred,) = predictions(ls_api, tid)
            assert pred["result"] and all(r["type"] == "keypointlabels" for r in pred["result"]), pred
            taken = set()
            for r in sorted(pred["result"], key=lambda r: -r.get("score", 0)):
                x, y = r["value"]["x"] * SIZE / 100, r["value"]["y"] * SIZE / 100
                # on a disc not yet counted: within its radius of its centre (discs never hide each other)
                on = [i for i, (x0, y0, x1, y1, _) in enumerate(boxes) if i not in taken
                      and np.hypot(x - (x0 + x1) / 2, y - (y0 + y1) / 2) <= (x1 - x0) / 2]
                if on:
                    taken.add(on[0])
                    wrong_label += r["value"]["keypointlabels"] != [LABELS[int(boxes[on[0], 4]) - 1]]
            hits, n_pred, n_true = hits + len(taken), n_pred + len(pred["result"]), n_true + len(boxes)
        precision, recall = hits / max(n_pred, 1), hits / n_true
        print(f"retrieved: {n_pred} points for {n_true} objects, precision {precision:.2f} recall {recall:.2f}, "
              f"{wrong_label} of the right discs' labels wrong")
        assert 0.8 * n_true <= n_pred <= 1.2 * n_true, (n_pred, n_true)
        assert precision >= 0.8 and recall >= 0.8, (precision, recall)
        assert wrong_label <= 0.1 * hits
        # no synthetic tasks from points: the run trained no GAN, and asking for pasted objects says why
        assert result["gan"]["status"] == "skipped" and "boxes or points" in result["gan"]["reason"], result["gan"]
        r = httpx.post(f"{proc.url}/generate", json={"project": pid, "count": 2}, timeout=60)
        assert r.status_code == 422 and "boxes or points only" in r.json()["error"], r.text
        assert len(list(ls_api.tasks.list(project=pid))) == N_ANNOTATED + N_NEW
    finally:
        proc.stop()
