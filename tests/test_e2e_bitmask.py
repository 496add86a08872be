"""End to end with Label Studio 1.23's BitmaskLabels tool (pixel masks stored as PNG data URLs) and EllipseLabels
beside it: a real Label Studio 1.23.2 takes the config and Tessera's predictions, "Retrieve predictions" gives one
bitmask per object of the image's own size on the objects and one ellipse per object over it, and a prediction
accepted as an annotation is read back pixel for pixel (what a training run reads)."""

import numpy as np
import pytest

from tessera.backend.regions import region_to_mask, results_to_maps
from tessera.model import metrics
from tests.conftest_ls import predicted_mosaic

pytestmark = pytest.mark.e2e

CONFIG = """<View>
  <Image name="image" value="$image" smoothing="false"/>
  <BitmaskLabels name="mask" toName="image"><Label value="Nucleus"/></BitmaskLabels>
  <EllipseLabels name="ellipse" toName="image"><Label value="Nucleus"/></EllipseLabels>
</View>"""


def test_bitmask_predictions_land_on_the_objects_and_come_back_as_annotations(ls_server, ls_api, trained_model_dir,
                                                                              tmp_path):
    sample, tid, pred, log = predicted_mosaic(ls_server, ls_api, trained_model_dir, tmp_path, "tessera bitmask",
                                              CONFIG, seed=44)
    regions = [r for r in pred["result"] if r["type"] == "bitmasklabels"]
    ellipses = [r for r in pred["result"] if r["type"] == "ellipselabels"]
    h, w = sample.instances.shape
    assert regions and all(r["type"] == "bitmasklabels" and r["from_name"] == "mask" for r in regions), log
    assert all((r["original_width"], r["original_height"]) == (w, h) for r in regions)
    masks = [region_to_mask(r, h, w) for r in regions]
    union = np.logical_or.reduce(masks)
    fg_iou = metrics.iou(union, sample.instances > 0)
    print(f"{len(regions)} bitmask regions for {len(np.unique(sample.instances)) - 1} objects, fg IoU {fg_iou:.3f}")
    assert fg_iou >= 0.6
    # an ellipse per object, over the same objects (a nucleus is about an ellipse)
    assert len(ellipses) == len(regions) and all(r["from_name"] == "ellipse" for r in ellipses)
    drawn = np.logical_or.reduce([region_to_mask(r, h, w) for r in ellipses])
    print(f"ellipses: fg IoU {metrics.iou(drawn, sample.instances > 0):.3f}")
    assert metrics.iou(drawn, sample.instances > 0) >= 0.6 and metrics.iou(drawn, union) >= 0.8
    assert all(np.count_nonzero(a & b) == 0 for i, a in enumerate(masks) for b in masks[i + 1:]), \
        "one region per object, none painted over another"

    # the prediction accepted as it is: Label Studio stores the PNGs untouched, and they read as the same maps
    ls_api.annotations.create(tid, result=pred["result"], parent_prediction=pred["id"])
    (ann,) = ls_api.tasks.get(tid).annotations
    bitmasks = [r for r in ann["result"] if r["type"] == "bitmasklabels"]
    classes, instances = results_to_maps(bitmasks, "image", h, w, {"Nucleus": 1})
    assert np.array_equal(classes > 0, union) and len(np.unique(instances)) - 1 == len(regions)
    # both kinds together: each ellipse is the same object as a finer bitmask, so it adds no object
    classes, instances = results_to_maps(ann["result"], "image", h, w, {"Nucleus": 1})
    assert len(np.unique(instances)) - 1 <= len(regions) + len(regions) // 10
