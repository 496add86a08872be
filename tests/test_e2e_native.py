"""End to end at native size: a real Label Studio 1.23.2 holds 520x696 and 1040x1388 images whose objects
are as small as in training; "Retrieve predictions" must give brush masks of the image's own size that
land on the objects (the model looks at the learned object scale, not at the whole image squeezed to R)."""

import numpy as np
import pytest
from PIL import Image

from tessera.model import metrics
from tessera.model.data import make_nuclei_mosaic
from tessera.model.inference import Predictor
from tests.conftest import CONFIG_ALL
from tests.conftest_ls import brush_instances, predictions, retrieve_predictions, tessera_for, upload_images

pytestmark = pytest.mark.e2e


@pytest.fixture
def tessera(ls_server, trained_model_dir, tmp_path):
    """`tessera serve` with a copy of the trained model store, pointed at the real LS."""
    with tessera_for(ls_server, trained_model_dir, tmp_path) as proc:
        yield proc


def test_native_size_brush_masks_land_on_the_objects(ls_server, ls_api, tessera, trained_model_dir, tmp_path):
    # the fixture model trained on 128 px tiles: native-size images made of the same tiles
    ckpt = next((trained_model_dir / "default" / "versions").glob("v*/model.pt"))
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    assert predictor.scale is not None, "the trained checkpoint stores its object scale"
    truths, paths = [], []
    for i, (h, w) in enumerate([(520, 696), (1040, 1388)]):
        sample = make_nuclei_mosaic(h, w, tile=128, seed=40 + i)
        truths.append(sample.instances)
        paths.append(tmp_path / f"native_{i}.png")
        Image.fromarray(sample.image).save(paths[-1])
    pid = ls_api.projects.create(title="tessera native", label_config=CONFIG_ALL).id
    task_ids = upload_images(ls_api, pid, paths)
    assert ls_api.ml.create(project=pid, url=tessera.url, title="Tessera").state == "CO"
    retrieve_predictions(ls_api, pid)

    for tid, inst in zip(task_ids, truths):
        h, w = inst.shape
        preds = predictions(ls_api, tid)
        assert len(preds) == 1, preds
        brushes = [r for r in preds[0]["result"] if r["type"] == "brushlabels"]
        assert brushes and all(r["original_width"] == w and r["original_height"] == h for r in brushes)
        pred_inst = brush_instances(brushes, h, w)                # decodes only at the image's own size
        fg_iou = metrics.iou(pred_inst > 0, inst > 0)
        match = metrics.instance_match(pred_inst, inst)
        print(f"task {tid} {w}x{h}: {len(brushes)} brush regions for {match['n_true']} objects, "
              f"fg IoU {fg_iou:.3f}, recall@0.5 {match['recall']:.3f}")
        assert fg_iou >= 0.6, f"{w}x{h}: brush masks cover the objects with IoU {fg_iou:.3f}"
        assert match["recall"] >= 0.3, f"{w}x{h}: {match['recall']:.3f} of objects matched at IoU 0.5"
        assert 0.4 * match["n_true"] <= len(brushes) <= 2 * match["n_true"]
    # the same weights squeezed into R x R (how every image was seen before the object scale) miss them
    image = np.asarray(Image.open(paths[0]).convert("RGB"))
    squeezed = Predictor(predictor.model, predictor.label_names, device="cpu", edge_weight=predictor.edge_weight)
    assert metrics.iou(squeezed.predict([image])[0].classes > 0, truths[0] > 0) < 0.5


def test_a_sideways_phone_photo_gets_masks_where_label_studio_shows_its_objects(ls_server, ls_api, tessera,
                                                                                tmp_path):
    """A JPEG stored sideways with EXIF orientation 6 (as phones save portrait photos): the browser shows it
    turned, so the masks must be of the turned image's size and on its objects (before: the stored image's
    size, 520 wide and 696 high, and the objects of the unturned pixels)."""
    sample = make_nuclei_mosaic(520, 696, tile=128, seed=42)
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(sample.image, 1)))     # turned back: 696 high
    exif = stored.getexif()
    exif[0x0112] = 6                                                            # "rotate 90 clockwise to show"
    path = tmp_path / "portrait.jpg"
    stored.save(path, "JPEG", quality=95, exif=exif)
    pid = ls_api.projects.create(title="tessera exif", label_config=CONFIG_ALL).id
    (tid,) = upload_images(ls_api, pid, [path])
    assert ls_api.ml.create(project=pid, url=tessera.url, title="Tessera").state == "CO"
    retrieve_predictions(ls_api, pid)

    (pred,) = predictions(ls_api, tid)
    brushes = [r for r in pred["result"] if r["type"] == "brushlabels"]
    assert brushes and all((r["original_width"], r["original_height"]) == (696, 520) for r in brushes)
    fg_iou = metrics.iou(brush_instances(brushes, 520, 696) > 0, sample.instances > 0)
    print(f"sideways JPEG: {len(brushes)} brush regions, fg IoU {fg_iou:.3f}")
    assert fg_iou >= 0.6, f"brush masks cover the shown objects with IoU {fg_iou:.3f}"
