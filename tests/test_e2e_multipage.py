"""End to end with Label Studio's multi-image tag (`<Image valueList="$pages">`, multi-image segmentation, on by
default in 1.23.2): a real Label Studio 1.23.2 takes the config and a task of three uploaded images, and
"Retrieve predictions" gives each page its own brush masks on its own objects, each region naming its page
(`item_index`), the ids unique across pages."""

import io

import numpy as np
import pytest
from PIL import Image

from tessera.backend import lsclient
from tessera.backend.regions import region_to_mask
from tessera.model import metrics
from tessera.model.data import make_nuclei_mosaic
from tests.conftest_ls import predictions, retrieve_with_tessera

pytestmark = pytest.mark.e2e

CONFIG = """<View>
  <Image name="page" valueList="$pages"/>
  <BrushLabels name="mask" toName="page"><Label value="Nucleus"/></BrushLabels>
</View>"""


def test_each_page_of_a_multi_image_task_gets_masks_on_its_objects(ls_server, ls_api, trained_model_dir, tmp_path):
    samples = [make_nuclei_mosaic(256, 256, tile=128, seed=50 + i) for i in range(3)]
    pid = ls_api.projects.create(title="tessera pages", label_config=CONFIG).id
    files = []
    for i, s in enumerate(samples):
        buf = io.BytesIO()
        Image.fromarray(s.image).save(buf, "PNG")
        files.append((f"page_{i}.png", buf.getvalue()))
    urls = lsclient.upload_files(ls_api, pid, files)
    (tid,) = lsclient.import_tasks(ls_api, pid, [{"data": {"pages": urls}}])
    log = retrieve_with_tessera(ls_server, ls_api, trained_model_dir, tmp_path, pid)

    (pred,) = predictions(ls_api, tid)
    regions = pred["result"]
    assert {r.get("item_index") for r in regions} == {0, 1, 2}, log[-2000:]
    assert len({r["id"] for r in regions}) == len(regions)
    ious = []
    for page, s in enumerate(samples):
        masks = [region_to_mask(r, 256, 256) for r in regions if r["item_index"] == page]
        ious.append(metrics.iou(np.logical_or.reduce(masks), s.instances > 0))
        # a page's masks are its own objects, not another page's
        others = [metrics.iou(np.logical_or.reduce(masks), o.instances > 0) for o in samples if o is not s]
        assert ious[-1] > max(others) + 0.2, (page, ious[-1], others)
    print(f"pages: {len(regions)} regions, fg IoU per page {[round(x, 3) for x in ious]}")
    assert min(ious) >= 0.6
