"""End to end with Label Studio's "Labels + tool" configs (a <Labels> beside <Rectangle>, <Brush> or another drawing
tool, as its OCR template has): a real Label Studio 1.23.2 takes the config and Tessera's predictions, each region
stored as the editor stores one (the tool's shape and the <Labels> result under one id), on the objects; a
prediction accepted as an annotation reads back as the same label maps (what a training run reads)."""

import numpy as np
import pytest

from tessera.backend.regions import region_to_mask, results_to_boxes, results_to_maps
from tessera.model import metrics
from tests.conftest_ls import predicted_mosaic

pytestmark = pytest.mark.e2e

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Labels name="label" toName="image"><Label value="Nucleus"/></Labels>
  <Brush name="brush" toName="image"/>
  <Rectangle name="bbox" toName="image"/>
</View>"""


def test_labels_and_tools_predictions_are_stored_as_the_editor_stores_regions(ls_server, ls_api, trained_model_dir,
                                                                              tmp_path):
    sample, tid, pred, log = predicted_mosaic(ls_server, ls_api, trained_model_dir, tmp_path,
                                              "tessera labels + tools", CONFIG, seed=45)
    result = pred["result"]
    by_id: dict[str, list[dict]] = {}
    for r in result:
        by_id.setdefault(r["id"], []).append(r)
    assert by_id, log
    # every region: the tool's shape and its labels, one id, as Result.serialize writes them
    for rid, parts in by_id.items():
        kinds = sorted((r["type"], r["from_name"]) for r in parts)
        assert kinds in ([("brush", "brush"), ("labels", "label")], [("labels", "label"), ("rectangle", "bbox")]), kinds
        shape, labels = sorted(parts, key=lambda r: r["type"] == "labels")
        assert labels["value"]["labels"] == ["Nucleus"]
        assert {k: v for k, v in labels["value"].items() if k != "labels"} == shape["value"]
    h, w = sample.instances.shape
    brushes = [r for r in result if r["type"] == "brush"]
    boxes = [r for r in result if r["type"] == "rectangle"]
    assert brushes and len(boxes) >= len(brushes) // 2
    union = np.logical_or.reduce([region_to_mask(r, h, w) for r in brushes])
    fg_iou = metrics.iou(union, sample.instances > 0)
    print(f"{len(brushes)} masks, {len(boxes)} boxes for {len(np.unique(sample.instances)) - 1} objects, "
          f"fg IoU {fg_iou:.3f}")
    assert fg_iou >= 0.6

    # accepted as it is: Label Studio keeps the pairs, and they read as the maps and boxes the prediction holds
    ls_api.annotations.create(tid, result=result, parent_prediction=pred["id"])
    (ann,) = ls_api.tasks.get(tid).annotations
    assert sorted((r["id"], r["type"]) for r in ann["result"]) == sorted((r["id"], r["type"]) for r in result)
    classes, instances = results_to_maps([r for r in ann["result"] if r["type"] != "rectangle"], "image", h, w,
                                         {"Nucleus": 1})
    assert np.array_equal(classes > 0, union) and len(np.unique(instances)) - 1 == len(brushes)
    read_boxes = results_to_boxes(ann["result"], "image", h, w, {"Nucleus": 1})
    assert len(read_boxes) == len(boxes)
    # a labels result alone is no region: without the <Labels> results nothing is labelled
    unlabelled = [r for r in ann["result"] if r["type"] != "labels"]
    assert not results_to_maps(unlabelled, "image", h, w, {"Nucleus": 1})[0].any()
