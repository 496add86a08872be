"""Counting projects: KeyPointLabels as a project's only control (a point an object, LS's keypoint template). Tessera
refused such configs; now it learns the points as boxes of one size around them and predicts the boxes' centres.
Beside masks, polygons or boxes a KeyPointLabels control stays the smart tool's hint."""
import numpy as np
import pytest

from tessera.backend.dataset import BOX_SHRINK, load_samples, person_made, point_side
from tessera.backend.label_config import Control, parse_label_config
from tessera.backend.regions import instances_to_results, results_to_points
from tessera.model.postprocess import POINT_BOX_PX, point_box_size, points_to_boxes
from tests.test_app import blobs_png, data_uri
from tests.test_decoupled_labels import png_uri

POINTS = ('<View><Image name="image" value="$image"/><KeyPointLabels name="kp" toName="image">'
          '<Label value="Cell"/><Label value="Debris"/></KeyPointLabels></View>')
BOXES_AT = ((5, 5, 15, 20), (25, 30, 40, 50))          # blobs_png's objects: (r0, c0, r1, c1)


@pytest.mark.parametrize("xml,served", [
    (POINTS, {"keypointlabels"}),
    # the smart tool's click beside masks: a hint, never written
    (POINTS.replace("</View>", '<BrushLabels name="m" toName="image"><Label value="Cell"/></BrushLabels></View>'),
     {"brushlabels"}),
    # a <KeyPoint> tool with <Labels>: a counting project too
    ('<View><Image name="image" value="$image"/><KeyPoint name="kp" toName="image"/><Labels name="l" '
     'toName="image"><Label value="Cell"/></Labels></View>', {"keypointlabels"}),
])
def test_keypoints_are_a_projects_output_only_where_they_are_its_only_control(xml, served):
    assert {c.type for c in parse_label_config(xml).controls} == served


def test_each_object_gets_one_point_on_it():
    inst = np.zeros((60, 80), np.int32)
    inst[5:20, 8:30] = 1
    yy, xx = np.mgrid[:60, :80]
    ring = (np.hypot(yy - 38, xx - 55) < 14) & (np.hypot(yy - 38, xx - 62) > 10)     # a crescent: centroid off it
    inst[ring] = 2
    results = instances_to_results(inst, {1: "Cell", 2: "Debris"}, {1: 0.9, 2: 0.8},
                                   Control("keypointlabels", "kp", "image", ("Cell", "Debris")))
    assert [r["type"] for r in results] == ["keypointlabels"] * 2
    points = results_to_points(results, "image", 60, 80, {"Cell": 1, "Debris": 2})
    assert [inst[int(y), int(x)] for x, y, _ in points] == [1, 2] and points[:, 2].tolist() == [1, 2]
    assert abs(points[0, 0] - 19) < 0.01 and abs(points[0, 1] - 12.5) < 0.01     # the rectangle's centre
    assert all(0 < r["value"]["width"] < 10 for r in results)


def test_predict_writes_a_point_on_each_object(client):
    task = {"id": 1, "data": {"image": data_uri(blobs_png())}}
    body = {"tasks": [task], "project": "7.1700000000", "label_config": POINTS.replace('"Cell"', '"Nucleus"'),
            "params": {"context": None}}
    (item,) = client.post("/predict", json=body).json["results"]
    points = [(r["value"]["x"] * 64 / 100, r["value"]["y"] * 48 / 100) for r in item["result"]]
    assert all(r["type"] == "keypointlabels" and r["value"]["keypointlabels"] == ["Nucleus"] for r in item["result"])
    assert np.allclose(sorted(points), [(12.5, 10.0), (40.0, 32.5)], atol=0.01)      # each blob's centre, once
    assert "mislabeling" not in item


def test_a_click_in_a_counting_project_gives_a_point_of_the_clicked_label(client):
    """The keypoint hint's own label (result_label read no `keypointlabels` key before: the first label came
    back whatever the labeller had chosen)."""
    task = {"id": 1, "data": {"image": data_uri(blobs_png())}}
    config = POINTS.replace('"Cell"', '"Nucleus"')
    hint = {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": 64,
            "original_height": 48, "value": {"x": 30 / 64 * 100, "y": 30 / 48 * 100, "keypointlabels": ["Debris"]}}
    body = {"tasks": [task], "project": "7.1700000000", "label_config": config,
            "params": {"context": {"result": [hint]}}}
    (item,) = client.post("/predict", json=body).json["results"]
    (point,) = item["result"]
    assert point["type"] == "keypointlabels" and point["value"]["keypointlabels"] == ["Debris"]
    assert np.allclose((point["value"]["x"] * 64 / 100, point["value"]["y"] * 48 / 100), (40.0, 32.5), atol=0.01)


def test_the_box_a_point_is_learned_as_is_half_the_gap_to_its_neighbour():
    grid = np.array([(x, y) for x in range(0, 200, 20) for y in range(0, 200, 20)], np.float64)
    assert point_box_size([grid]) == 10.0
    assert point_box_size([grid * 0.2]) == POINT_BOX_PX[0] and point_box_size([grid * 10]) == POINT_BOX_PX[1]
    assert point_box_size([np.zeros((1, 2)), np.zeros((0, 2))]) == POINT_BOX_PX[2]      # no image has two
    boxes = points_to_boxes(np.array([[10.0, 20.0, 2]]), 8.0)
    assert boxes.tolist() == [[6.0, 16.0, 14.0, 24.0, 2.0]]


def point_results(points, w=80, h=60, label="Cell"):
    return [{"id": f"p{i}", "from_name": "kp", "to_name": "image", "type": "keypointlabels", "original_width": w,
             "original_height": h, "value": {"x": x / w * 100, "y": y / h * 100, "width": 1,
                                             "keypointlabels": [label]}} for i, (x, y) in enumerate(points)]


def test_a_counting_project_trains_on_boxes_around_its_points(settings):
    inst = np.zeros((60, 80), np.int32)
    centres = [(19.0, 12.5), (55.0, 41.0), (8.0, 49.0)]
    for k, (x, y) in enumerate(centres, 1):
        inst[int(y) - 4:int(y) + 4, int(x) - 4:int(x) + 4] = k
    task = {"id": 3, "data": {"image": png_uri(inst)}, "annotations": [{"id": 1, "result": point_results(centres)}]}
    config = parse_label_config(POINTS)
    gaps = [np.hypot(19 - 8, 12.5 - 49), np.hypot(55 - 19, 41 - 12.5), np.hypot(55 - 8, 41 - 49)]
    side = point_side([task], config, 2048)
    assert side == pytest.approx(0.5 * np.median([min(gaps[0], gaps[2]), min(gaps[0], gaps[1]),
                                                  min(gaps[1], gaps[2])]))
    (sample,), _ = load_samples(settings, config, [task])
    assert np.allclose(sample.boxes, points_to_boxes(np.array([[x, y, 1] for x, y in centres]), side), atol=1e-3)
    assert sample.classes[12, 19] == 1 and sample.classes[0, 0] == 0     # the boxes' centres painted
    # a photo larger than TESSERA_MAX_SIDE: the side is measured where the model sees the points
    assert point_side([task], config, 40) == pytest.approx(side / 2)


def test_an_accepted_box_or_point_prediction_is_not_a_persons_judgement(settings):
    """Box and counting projects: a prediction accepted as it was is the model's own output (held back, it would
    score the served model ~1.0 and block every new version); before, box samples never matched one."""
    inst = np.zeros((60, 80), np.int32)
    inst[5:20, 8:30], inst[30:52, 40:70] = 1, 2
    made = {"created_at": "2024-01-01T00:00:00", "model_version": "tessera-p7-v0001"}
    for xml, control in (
            ('<View><Image name="image" value="$image"/><RectangleLabels name="kp" toName="image"><Label value="Cell"/>'
             '</RectangleLabels></View>', Control("rectanglelabels", "kp", "image", ("Cell",))),
            (POINTS, Control("keypointlabels", "kp", "image", ("Cell", "Debris")))):
        config = parse_label_config(xml)
        result = instances_to_results(inst, {1: "Cell", 2: "Cell"}, {1: 0.9, 2: 0.9}, control)
        task = {"id": 4, "data": {"image": png_uri(inst)},
                "annotations": [{"id": 1, "result": result, "created_at": "2024-01-02T00:00:00"}],
                "predictions": [{**made, "result": result}]}
        (sample,), _ = load_samples(settings, config, [task])
        assert not person_made(task, sample, "image", {"Cell": 1, "Debris": 2}), control.type
        for changed in ([{**r, "value": {**r["value"], "x": r["value"]["x"] + 5}} for r in result],   # moved
                        result[:1], []):                                   # one removed, every one removed
            task["annotations"][0]["result"] = changed
            (sample,), _ = load_samples(settings, config, [task])
            assert person_made(task, sample, "image", {"Cell": 1, "Debris": 2}), (control.type, len(changed))


def test_a_box_or_counting_projects_run_trains_no_gan(settings):
    """Their label maps hold the boxes' centre squares: a GAN would make images whose objects no box fits, and its
    tasks would carry the squares as rectangles. The run says why instead of training one."""
    from tessera.backend.gan_runs import gan_part
    from tessera.backend.progress import noop
    from tessera.model.postprocess import box_sample

    image = np.zeros((64, 64, 3), np.uint8)
    samples = [box_sample(image, points_to_boxes(np.array([[20.0, 20.0, 1], [40.0, 44.0, 1]]), 10.0), BOX_SHRINK,
                          str(i)) for i in range(6)]
    out = gan_part(settings, "7", samples, ["Cell"], "test", 20, noop)
    assert out["status"] == "skipped" and "boxes or points" in out["reason"], out


def test_a_counting_models_boxes_have_the_side_its_points_were_learned_at(tmp_path):
    """A point has no size: a counting project's model (TrainConfig.point_side) gives every box that side about the
    centre the head found, in training's held-back choices and when served from its checkpoint alike."""
    from tessera.model.data import make_nuclei
    from tessera.model.inference import Predictor
    from tessera.model.postprocess import RegionCut, box_sample
    from tessera.model.train_vqvae import TrainConfig, train

    side = 7.0
    samples = []
    for s in make_nuclei(8, size=64, seed=5):
        ids = [int(k) for k in np.unique(s.instances) if k]
        pts = np.array([(np.nonzero(s.instances == k)[1].mean() + 0.5, np.nonzero(s.instances == k)[0].mean() + 0.5,
                         1) for k in ids]).reshape(-1, 3)
        samples.append(box_sample(s.image, points_to_boxes(pts, side), BOX_SHRINK, s.id))
    cfg = TrainConfig(max_iters=80, eval_interval=40, log_interval=1000, resolution=64, crop=48, batch_size=4,
                      device="cpu", box_shrink=BOX_SHRINK, box_head=True, threads=1, seed=0, point_side=side)
    pred = Predictor.from_checkpoint(train(cfg, samples[:6], samples[6:], ["Cell"], tmp_path / "m.pt"), device="cpu")
    assert pred.point_side == side
    pred.cut = RegionCut(min_score=0.0, source="none")
    boxes = [b for p in pred.predict([s.image for s in samples]) for b in (p.boxes or {}).values()]
    assert boxes and all(abs((x1 - x0) - side) < 1e-6 and abs((y1 - y0) - side) < 1e-6 for x0, y0, x1, y1 in boxes)
