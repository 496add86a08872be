"""Smart tools in a real Label Studio 1.23.2 and `tessera serve`: a labeller opens a task (LS asks /predict for
a task without a prediction, and Tessera readies the smart tools' network passes for its image), then hints
at an object with a keypoint, a brush stroke and a box; each reply is ONE region, of the hint's own control
(a KeyPointLabels tool, which Tessera does not write: the finest control), lying on the hinted object."""
import cv2
import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle

from tessera.backend import lsclient
from tessera.backend.regions import region_to_mask
from tessera.model.data import make_nuclei
from tests.conftest import CONFIG_ALL
from tests.conftest_ls import connected_project, predictions, tessera_for, wait_for

pytestmark = pytest.mark.e2e
H, W = 160, 200


@pytest.fixture
def tessera(ls_server, trained_model_dir, tmp_path):
    with tessera_for(ls_server, trained_model_dir, tmp_path) as proc:
        yield proc


def _largest_object(instances: np.ndarray) -> np.ndarray:
    ids, areas = np.unique(instances[instances > 0], return_counts=True)
    return instances == ids[np.argmax(areas)]


def _hint(kind: str, obj: np.ndarray) -> tuple[dict, tuple[int, int]]:
    """A smart tool's hint on obj as LS sends it in params.context, and the (y, x) it is centred on."""
    dist = cv2.distanceTransform(np.pad(obj, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    base = {"to_name": "image", "original_width": W, "original_height": H}
    if kind == "keypoint":
        value = {"x": (x + 0.5) / W * 100, "y": (y + 0.5) / H * 100, "width": 0.5, "keypointlabels": ["Nucleus"]}
        return {**base, "type": "keypointlabels", "from_name": "kp", "is_positive": True, "value": value}, (y, x)
    if kind == "brush":
        stroke = cv2.circle(np.zeros((H, W), np.uint8), (int(x), int(y)), 2, 255, -1) * obj
        value = {"format": "rle", "rle": mask2rle(stroke.astype(np.uint8)), "brushlabels": ["Nucleus"]}
        return {**base, "type": "brushlabels", "from_name": "mask", "value": value}, (y, x)
    ys, xs = np.nonzero(obj)
    value = {"x": xs.min() / W * 100, "y": ys.min() / H * 100, "width": (xs.max() + 1 - xs.min()) / W * 100,
             "height": (ys.max() + 1 - ys.min()) / H * 100, "rotation": 0, "rectanglelabels": ["Nucleus"]}
    return {**base, "type": "rectanglelabels", "from_name": "bbox", "value": value}, (y, x)


def test_hints_after_opening_a_task_give_one_region_of_their_control_on_the_object(ls_server, ls_api, tessera):
    samples = make_nuclei(2, size=(H, W), seed=21)
    project = connected_project(ls_api, "tessera smart tools", CONFIG_ALL, tessera.url, samples)
    tid, obj = project["tasks"][0], _largest_object(samples[0].instances)
    assert predictions(ls_api, tid) == []
    ls_api.tasks.get(tid)          # the labeller opens the task: LS asks /predict for it, Tessera warms
    wait_for(lambda: f"task {tid}: smart tools ready" in tessera.log_text(), timeout=60,
             what="the task-open /predict to ready the smart tools")
    assert len(predictions(ls_api, tid)) == 1
    for kind, control, typ in (("keypoint", "mask", "brushlabels"), ("brush", "mask", "brushlabels"),
                               ("box", "bbox", "rectanglelabels")):
        hint, (y, x) = _hint(kind, obj)
        reply = lsclient.interactive(ls_api, project["ml"], tid, {"result": [hint]})
        regions = reply["data"]["result"]
        assert [(r["from_name"], r["type"]) for r in regions] == [(control, typ)], (kind, reply)
        got = region_to_mask(regions[0], H, W)
        assert got[y, x], (kind, "the region misses the hinted point")
        assert (got & obj).sum() >= 0.5 * got.sum(), (kind, "the region lies mostly off the object")
    assert len(predictions(ls_api, tid)) == 1                 # interactive replies are not stored
