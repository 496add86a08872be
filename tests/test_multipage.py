"""Label Studio's multi-image tag, `<Image valueList="$pages">` (its "Multi-page document annotation" template and
multi-image segmentation, on by default in 1.23.2): each page of a task is predicted, trained on, checked and
refined as an image of its own, and its regions name the page (`item_index`)."""
import numpy as np
import pytest

from tessera.backend.dataset import load_samples, person_made, sample_image
from tessera.backend.label_config import MAX_PAGES, parse_label_config, task_images
from tessera.backend.predictions import task_image
from tessera.backend.media import MediaError, MediaResolver
from tessera.backend.regions import region_to_mask
from tests.test_app import blobs_png, data_uri

CONFIG = ('<View><Image name="page" valueList="$pages"/><BrushLabels name="mask" toName="page">'
          '<Label value="Nucleus"/></BrushLabels><RectangleLabels name="bbox" toName="page">'
          '<Label value="Nucleus"/></RectangleLabels></View>')
BOXES = [((5, 5, 15, 20),), ((25, 30, 40, 50),), ((5, 40, 20, 60), (30, 5, 45, 15))]   # one layout a page


def pages_task(tid=1, layouts=BOXES):
    return {"id": tid, "data": {"pages": [data_uri(blobs_png(boxes=b)) for b in layouts]}}


def body(tasks, context=None):
    return {"tasks": tasks, "project": "7.1700000000", "label_config": CONFIG,
            "params": {"login": None, "password": None, "context": context}}


def truth(layout, h=48, w=64):
    m = np.zeros((h, w), bool)
    for r0, c0, r1, c1 in layout:
        m[r0:r1, c0:c1] = True
    return m


def test_each_page_is_predicted_and_its_regions_name_it(client):
    res = client.post("/predict", json=body([pages_task()])).json
    (item,) = res["results"]
    regions = item["result"]
    assert {r["item_index"] for r in regions} == {0, 1, 2}
    assert len({r["id"] for r in regions}) == len(regions), "no two pages share a region id"
    for page, layout in enumerate(BOXES):
        brushes = [r for r in regions if r["item_index"] == page and r["type"] == "brushlabels"]
        assert len(brushes) == len(layout)
        union = np.logical_or.reduce([region_to_mask(r, 48, 64) for r in brushes])
        assert np.array_equal(union, truth(layout)), f"page {page}: its own objects"


def test_a_page_that_can_never_load_costs_its_own_regions_alone(client, caplog):
    """One page gone or not an image: the task's other pages are predicted (all its pages got an empty prediction
    before). One that may load later (a host not allowed yet, Label Studio busy): nothing is stored and the task is
    asked again, as for a one-image task."""
    import base64

    from tests.conftest import free_port

    caplog.set_level("WARNING")
    task = pages_task(tid=8)
    task["data"]["pages"][1] = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    (item,) = client.post("/predict", json=body([task])).json["results"]
    assert {r["item_index"] for r in item["result"]} == {0, 2} and item["score"] > 0
    for page in (0, 2):
        brushes = [r for r in item["result"] if r["item_index"] == page and r["type"] == "brushlabels"]
        assert np.array_equal(np.logical_or.reduce([region_to_mask(r, 48, 64) for r in brushes]), truth(BOXES[page]))
    assert "task 8: predicted without 1 of its 3 images: page@1:" in caplog.text
    task["data"]["pages"][1] = f"http://127.0.0.1:{free_port()}/page.png"
    assert client.post("/predict", json=body([task])).json["results"] == [[]]
    task["data"]["pages"] = [task["data"]["pages"][0].replace("data:image/png;base64,", "data:image/png;base64,AA")]
    (item,) = client.post("/predict", json=body([task])).json["results"]
    assert item["result"] == [] and item["score"] == 0


def test_a_hint_on_a_page_refines_that_page(client):
    hint = {"type": "keypointlabels", "from_name": "kp", "to_name": "page", "item_index": 2, "original_width": 64,
            "original_height": 48, "value": {"x": 10 / 64 * 100, "y": 37 / 48 * 100, "keypointlabels": ["Nucleus"]}}
    res = client.post("/predict", json=body([pages_task()], context={"result": [hint]})).json
    (region,) = res["results"][0]["result"]
    assert region["item_index"] == 2 and region["type"] == "brushlabels"
    assert np.array_equal(region_to_mask(region, 48, 64), truth(((30, 5, 45, 15),))), "the object under the click"


def test_pages_past_the_cap_and_fields_that_are_not_lists(settings):
    config = parse_label_config(CONFIG)
    many = {"id": 1, "data": {"pages": ["a.png"] * (MAX_PAGES + 5)}}
    assert [i.page for i in task_images(many, config)] == list(range(MAX_PAGES))
    media = MediaResolver(settings)
    for data in ({"pages": "one.png"}, {"pages": []}, {"other": 1}):
        (view,) = task_images({"id": 2, "data": data}, config)
        err = task_image({"id": 2, "data": data}, view, media)
        assert isinstance(err, MediaError) and "pages" in str(err), err


def test_training_reads_each_pages_annotation_onto_its_page(settings):
    """The annotation's regions are split by item_index: a page's label map holds its own objects only, and a
    page a person changed from the prediction it started from counts as a person's, page by page."""
    from tessera.backend.regions import instances_to_results
    from tessera.backend.label_config import Control
    from scipy import ndimage

    config = parse_label_config(CONFIG)
    brush = Control("brushlabels", "mask", "page", ("Nucleus",))
    result = []
    for page, layout in enumerate(BOXES):
        inst = ndimage.label(truth(layout))[0].astype(np.int32)
        ids = [int(k) for k in np.unique(inst) if k]
        regions = instances_to_results(inst, {k: "Nucleus" for k in ids}, {k: 1.0 for k in ids}, brush)
        result += [{**r, "item_index": page, "id": f"p{page}-{r['id']}"} for r in regions]
    task = {**pages_task(), "annotations": [{"id": 9, "result": result, "created_at": "2026-12-07T10:00:00"}],
            "predictions": [{"model_version": "tessera-p7-v0001", "created_at": "2026-12-07T09:00:00",
                             "result": [r for r in result if r["item_index"] != 1]}]}   # page 1: drawn by a person
    samples, used = load_samples(settings, config, [task])
    assert [s.id for s in samples] == ["1:page@0", "1:page@1", "1:page@2"] and len(used) == 3
    for s, layout in zip(samples, BOXES):
        assert np.array_equal(s.classes > 0, truth(layout)), s.id
        assert len(np.unique(s.instances)) - 1 == len(layout)
        assert sample_image(s.id, config).page == int(s.id[-1])

    # page 1's annotation is not the prediction it started from: a person's; pages 0 and 2 were accepted as they were
    assert [person_made(task, s, sample_image(s.id, config), {"Nucleus": 1}) for s in samples] == [False, True, False]


@pytest.mark.parametrize("page", [0, 2])
def test_a_pages_check_against_its_annotation(client, page):
    """The label check (mislabeling) of an annotated multi-page task compares each page with its own regions:
    an annotation that agrees with every page is not flagged."""
    from scipy import ndimage

    from tessera.backend.label_config import Control
    from tessera.backend.regions import instances_to_results

    brush = Control("brushlabels", "mask", "page", ("Nucleus",))
    result = []
    for p, layout in enumerate(BOXES):
        inst = ndimage.label(truth(layout))[0].astype(np.int32)
        ids = [int(k) for k in np.unique(inst) if k]
        result += [{**r, "item_index": p, "id": f"p{p}-{r['id']}"} for r in
                   instances_to_results(inst, {k: "Nucleus" for k in ids}, {k: 1.0 for k in ids}, brush)]
    agree = {**pages_task(), "annotations": [{"id": 1, "result": result}]}
    wrong = {**pages_task(2), "annotations": [{"id": 2, "result": [r for r in result if r["item_index"] != page]}]}
    items = client.post("/predict", json=body([agree, wrong])).json["results"]
    assert items[0].get("mislabeling", 0) < items[1].get("mislabeling", 0)


def test_a_chunk_holds_about_a_batch_of_images_whatever_the_pages(client, stub_predictor):
    """TESSERA_PREDICT_BATCH (16) counts images: tasks of 6 pages go a task or two a chunk, not 4 tasks (24
    images) as tasks of one image would, so the images in memory do not grow with the pages."""
    tasks = [pages_task(t, layouts=BOXES * 2) for t in range(1, 9)]
    items = client.post("/predict", json=body(tasks)).json["results"]
    assert len(items) == 8 and all({r["item_index"] for r in item["result"]} == set(range(6)) for item in items)
    assert sum(stub_predictor.calls) == 48 and max(stub_predictor.calls) <= 16, stub_predictor.calls
