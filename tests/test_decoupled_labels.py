"""Label Studio's "Labels + tool" configs: a <Labels> beside a drawing tool (<Brush>, <Bitmask>, <Polygon>, <Ellipse>,
<Rectangle>), as its OCR template and each tool's documentation have them. The editor stores such a region as two
results of one id, the tool's shape and the <Labels> result whose value repeats the shape with `labels`
(Result.serialize, label-studio 1.23.2). Tessera was refusing these configs at connect."""
import base64
import io

import numpy as np
import pytest
from PIL import Image

from tessera.backend.dataset import load_samples
from tessera.backend.label_config import SUPPORTED_CONTROLS, TOOL_CONTROLS, Control, LabelConfigError, \
    parse_label_config
from tessera.backend.regions import (instances_to_results, labelled, region_to_mask, region_value, results_to_boxes,
                                     results_to_maps, results_to_points)

TOOLS = """<View>
  <Image name="image" value="$image"/>
  <Labels name="label" toName="image"><Label value="Cell"/><Label value="Debris"/></Labels>
  <Brush name="brush" toName="image"/>
  <Rectangle name="bbox" toName="image" smart="true"/>
</View>"""


def objects(h=60, w=80):
    inst = np.zeros((h, w), np.int32)
    inst[5:20, 8:30] = 1
    inst[30:52, 40:70] = 2
    inst[40:58, 2:14] = 3
    return inst


def editor_region(rid, tool, from_name, shape, labels):
    """A region as the editor stores one for a tool with a separate <Labels>: its shape, then its labels."""
    common = {"id": rid, "to_name": "image", "original_width": 80, "original_height": 60, "image_rotation": 0}
    return [{**common, "from_name": from_name, "type": tool, "value": shape},
            {**common, "from_name": "label", "type": "labels", "value": {**shape, "labels": labels}}]


def test_a_tool_takes_the_labels_of_the_labels_beside_it():
    cfg = parse_label_config(TOOLS)
    assert [(c.type, c.from_name, c.labels, c.labels_from) for c in cfg.controls] == [
        ("brushlabels", "brush", ("Cell", "Debris"), "label"),
        ("rectanglelabels", "bbox", ("Cell", "Debris"), "label")]
    assert cfg.label_names == ["Cell", "Debris"]


def test_tools_pair_with_the_labels_of_their_own_image():
    cfg = parse_label_config("""<View>
      <Image name="a" value="$a"/><Image name="b" value="$b"/>
      <Labels name="la" toName="a"><Label value="A"/></Labels>
      <Labels name="lb" toName="b"><Label value="B1"/><Label value="B2"/></Labels>
      <Labels name="lb2" toName="b"><Label value="C"/></Labels>
      <Polygon name="pa" toName="a"/><Ellipse name="eb" toName="b"/><Bitmask name="mb" toName="b"/>
      <KeyPoint name="kp" toName="a" smart="true"/>
    </View>""")
    assert {(c.type, c.from_name, c.to_name, c.labels, c.labels_from) for c in cfg.controls} == {
        ("polygonlabels", "pa", "a", ("A",), "la"),
        ("ellipselabels", "eb", "b", ("B1", "B2"), "lb"), ("ellipselabels", "eb", "b", ("C",), "lb2"),
        ("bitmasklabels", "mb", "b", ("B1", "B2"), "lb"), ("bitmasklabels", "mb", "b", ("C",), "lb2")}


@pytest.mark.parametrize("xml,needle", [
    # a tool alone draws regions without a label: nothing to learn
    ('<View><Image name="i" value="$image"/><Rectangle name="r" toName="i"/></View>', "<Labels> on the same image"),
    # a <Labels> of another image does not label this one
    ('<View><Image name="i" value="$image"/><Image name="j" value="$other"/><Rectangle name="r" toName="i"/>'
     '<Labels name="l" toName="j"><Label value="A"/></Labels></View>', "<Rectangle>"),
    ('<View><Image name="i" value="$image"/><Brush name="b" toName="i"/><Labels name="l" toName="i" value="$labels"/>'
     '</View>', "from each task's data"),
])
def test_configs_a_tool_cannot_learn_from_say_why(xml, needle):
    with pytest.raises(LabelConfigError) as e:
        parse_label_config(xml)
    assert needle in str(e.value)


@pytest.mark.parametrize("kind", sorted(SUPPORTED_CONTROLS.values()))
def test_regions_are_written_as_the_editor_stores_them_and_read_back_the_same(kind):
    inst = objects()
    labels, scores = {1: "Cell", 2: "Debris", 3: "Cell"}, {1: 0.9, 2: 0.8, 3: 0.7}
    tool = next(t for t, k in TOOL_CONTROLS.items() if k == kind)
    paired = instances_to_results(inst, labels, scores, Control(kind, tool, "image", ("Cell", "Debris"), "label"))
    plain = instances_to_results(inst, labels, scores, Control(kind, tool, "image", ("Cell", "Debris")))
    assert len(paired) == 2 * len(plain) == 6
    for shape, lab, one in zip(paired[::2], paired[1::2], plain):
        assert shape["id"] == lab["id"] == one["id"] and shape["score"] == lab["score"] == one["score"]
        assert (shape["type"], shape["from_name"], lab["type"], lab["from_name"]) == (tool, tool, "labels", "label")
        assert lab["value"] == {**shape["value"], "labels": one["value"][kind]}
        assert shape["value"] == {k: v for k, v in one["value"].items() if k != kind}
        region_value(shape), region_value(lab)
    index = {"Cell": 1, "Debris": 2}
    if kind == "keypointlabels":            # a counting project's points
        points = results_to_points(paired, "image", 60, 80, index)
        assert np.array_equal(points, results_to_points(plain, "image", 60, 80, index))
        assert [inst[int(y), int(x)] for x, y, _ in points] == [1, 2, 3] and points[:, 2].tolist() == [1, 2, 1]
        return
    for a, b in zip(results_to_maps(paired, "image", 60, 80, index), results_to_maps(plain, "image", 60, 80, index)):
        assert np.array_equal(a, b)
    assert results_to_maps(paired, "image", 60, 80, index)[0].max() == 2


def test_regions_drawn_in_the_editor_are_read_with_their_labels():
    result = (editor_region("a1", "rectangle", "bbox", {"x": 10, "y": 10, "width": 25, "height": 25, "rotation": 0},
                            ["Debris"])
              + editor_region("b2", "polygon", "poly", {"points": [[50, 50], [90, 50], [90, 90], [50, 90]]}, ["Cell"])
              + [{"id": "c3", "from_name": "bbox", "to_name": "image", "type": "rectangle",       # no label chosen
                  "value": {"x": 0, "y": 60, "width": 20, "height": 20}}])
    classes, instances = results_to_maps(result, "image", 60, 80, {"Cell": 1, "Debris": 2})
    assert sorted(np.unique(instances).tolist()) == [0, 1, 2]
    assert classes[10, 15] == 2 and classes[40, 55] == 1 and classes[55, 5] == 0
    boxes = results_to_boxes(result, "image", 60, 80, {"Cell": 1, "Debris": 2})
    assert boxes.tolist() == [[8.0, 6.0, 28.0, 21.0, 2.0]]
    # the labels alone are no region; the order of the two results does not matter
    assert labelled([result[1]]) == []
    assert np.array_equal(results_to_maps(result[1::-1] + result[2:], "image", 60, 80, {"Cell": 1, "Debris": 2})[1],
                          instances)


def test_a_malformed_labels_result_is_a_value_error():
    shape = {"x": 10, "y": 10, "width": 25, "height": 25}
    for value, error in (({**shape, "labels": "Cell"}, "list of label names"),
                         ({**shape, "width": "wide", "labels": ["Cell"]}, "rectangle width"),
                         ({"rle": "nope", "labels": ["Cell"]}, "rle")):
        with pytest.raises(ValueError, match=error):
            region_value({"type": "labels", "value": value})


def png_uri(inst):
    buf = io.BytesIO()
    Image.fromarray(np.where(inst[..., None] > 0, 230, 20).astype(np.uint8).repeat(3, 2)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_training_reads_the_regions_of_a_labels_and_tools_project(settings):
    inst = objects()
    brush = Control("brushlabels", "brush", "image", ("Cell", "Debris"), "label")
    result = instances_to_results(inst, {1: "Cell", 2: "Debris", 3: "Cell"}, {}, brush)
    task = {"id": 5, "data": {"image": png_uri(inst)}, "annotations": [{"id": 1, "result": result}]}
    (sample,), _ = load_samples(settings, parse_label_config(TOOLS), [task])
    assert np.array_equal(sample.classes, np.choose(inst, [0, 1, 2, 1]))
    # a box-only one (<Labels> + <Rectangle>) learns its boxes as boxes
    boxes_only = parse_label_config('<View><Image name="image" value="$image"/><Rectangle name="bbox" toName="image"/>'
                                    '<Labels name="label" toName="image"><Label value="Cell"/></Labels></View>')
    rect = instances_to_results(inst, {1: "Cell", 2: "Cell", 3: "Cell"}, {}, boxes_only.controls[0])
    task = {"id": 6, "data": {"image": png_uri(inst)}, "annotations": [{"id": 2, "result": rect}]}
    (sample,), _ = load_samples(settings, boxes_only, [task])
    assert np.allclose(sample.boxes, [[8, 5, 30, 20, 1], [40, 30, 70, 52, 1], [2, 40, 14, 58, 1]], atol=1e-3)


def test_a_smart_tools_hint_with_its_labels_gets_one_region_back(client):
    """A keypoint hint with its <Labels> result (422 before: "unsupported result type 'labels'") -> one region of
    the finest tool, as the shape and its labels under one id."""
    inst = np.zeros((48, 64), np.int32)
    inst[5:15, 5:20] = 1
    inst[25:40, 30:50] = 2
    task = {"id": 1, "data": {"image": png_uri(inst)}}
    point = {"x": 10 / 64 * 100, "y": 10 / 48 * 100, "width": 1}
    hint = [{"id": "h", "type": "keypoint", "from_name": "kp", "to_name": "image", "is_positive": True,
             "original_width": 64, "original_height": 48, "value": point},
            {"id": "h", "type": "labels", "from_name": "label", "to_name": "image", "original_width": 64,
             "original_height": 48, "value": {**point, "labels": ["Nucleus"]}}]
    config = ('<View><Image name="image" value="$image"/><Labels name="label" toName="image"><Label value="Nucleus"/>'
              '</Labels><Brush name="brush" toName="image"/><KeyPoint name="kp" toName="image" smart="true"/></View>')
    body = {"tasks": [task], "project": "7.1700000000", "label_config": config,
            "params": {"context": {"result": hint}}}
    r = client.post("/predict", json=body)
    assert r.status_code == 200, r.json
    (item,) = r.json["results"]
    shape, labels = item["result"]
    assert shape["id"] == labels["id"] and (shape["type"], labels["type"]) == ("brush", "labels")
    assert labels["value"]["labels"] == ["Nucleus"] and labels["from_name"] == "label"
    assert region_to_mask(shape, 48, 64).sum() == 150 and region_to_mask(shape, 48, 64)[10, 10]


def test_a_tool_beside_two_labels_sets_writes_regions_of_unique_ids(client):
    """Two <Labels> on one image make the tool two controls of one name; a label in both gives each object a region
    of each, never two regions of one id (Label Studio would join them into one)."""
    config = ('<View><Image name="image" value="$image"/><Brush name="brush" toName="image"/>'
              '<Labels name="cells" toName="image"><Label value="Nucleus"/></Labels>'
              '<Labels name="again" toName="image"><Label value="Nucleus"/></Labels></View>')
    inst = np.zeros((48, 64), np.int32)
    inst[5:15, 5:20], inst[25:40, 30:50] = 1, 2
    body = {"tasks": [{"id": 1, "data": {"image": png_uri(inst)}}], "project": "7.1700000000", "label_config": config,
            "params": {"context": None}}
    (item,) = client.post("/predict", json=body).json["results"]
    shapes = [r for r in item["result"] if r["type"] == "brush"]
    assert len(shapes) == 4 and len({r["id"] for r in shapes}) == 4
    assert sorted(r["from_name"] for r in item["result"] if r["type"] == "labels") == ["again"] * 2 + ["cells"] * 2
