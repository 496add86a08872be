"""Label config parsing: what Tessera serves, and clear errors naming the tag for what it does not."""
import pytest

from tessera.backend.label_config import LabelConfigError, parse_label_config
from tests.conftest import CONFIG_ALL

GOOD = [
    (CONFIG_ALL, {("brushlabels", "mask"), ("polygonlabels", "poly"), ("rectanglelabels", "bbox")}, ["Nucleus"]),
    ('<View><Image name="img" value="$url"/><RectangleLabels name="b" toName="img">'
     '<Label value="Cat"/><Label value="Dog" alias="dog"/></RectangleLabels></View>',
     {("rectanglelabels", "b")}, ["Cat", "dog"]),
    ('<View><Image name="a" value="$left"/><Image name="b" value="$right"/>'
     '<BrushLabels name="ma" toName="a"><Label value="X"/></BrushLabels>'
     '<PolygonLabels name="pb" toName="b"><Label value="Y"/></PolygonLabels>'
     '<Choices name="c" toName="a"><Choice value="ok"/></Choices></View>',
     {("brushlabels", "ma"), ("polygonlabels", "pb")}, ["X", "Y"]),
    ('<View><Image name="i" value="$image"/><KeyPointLabels name="kp" toName="i"><Label value="P"/></KeyPointLabels>'
     '<BrushLabels name="m" toName="i"><Label value="P"/></BrushLabels></View>', {("brushlabels", "m")}, ["P"]),
    ('<View><Image name="i" value="$image"/><EllipseLabels name="e" toName="i"><Label value="Cell"/>'
     '</EllipseLabels><BitmaskLabels name="b" toName="i"><Label value="Cell"/></BitmaskLabels></View>',
     {("ellipselabels", "e"), ("bitmasklabels", "b")}, ["Cell"]),
    # a counting project: keypoints alone are its output (beside other controls they are hints, above)
    ('<View><Image name="i" value="$image"/><KeyPointLabels name="kp" toName="i"><Label value="P"/>'
     '</KeyPointLabels></View>', {("keypointlabels", "kp")}, ["P"]),
    # Label Studio's own template "Multi-page document annotation": <Image valueList>, one image per page
    ('<View><RectangleLabels name="r" toName="pdf"><Label value="Title"/></RectangleLabels>'
     '<Image valueList="$pages" name="pdf"/></View>', {("rectanglelabels", "r")}, ["Title"]),
]

BAD = [
    ("", "empty"),
    ("<View><Image", "not valid XML"),
    ('<View><Text name="t" value="$text"/><Labels name="l" toName="t"><Label value="A"/></Labels></View>', "<Text>"),
    # a smart tool's hint alone: nothing to write
    ('<View><Image name="i" value="$image"/><KeyPointLabels name="kp" toName="i" smartOnly="true"><Label value="P"/>'
     '</KeyPointLabels></View>', '<KeyPointLabels smartOnly="true"> (a smart tool\'s hints)'),
    ('<View><Image name="i" value="$image"/><BrushLabels name="m" toName="nope"><Label value="A"/></BrushLabels>'
     '</View>', 'toName="nope"'),
    ('<View><Image name="i" value="image"/><BrushLabels name="m" toName="i"><Label value="A"/></BrushLabels></View>',
     'value="$'),
    ('<View><Image name="i" value="$image"/><BrushLabels name="m" toName="i"></BrushLabels></View>', "no <Label"),
    ('<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><View><Image name="i" value="$image"/>'
     '<BrushLabels name="m" toName="i"><Label value="&e;"/></BrushLabels></View>', "forbidden XML"),
    ('<View><Image name="i" valueList="pages"/><BrushLabels name="m" toName="i"><Label value="A"/></BrushLabels>'
     '</View>', 'valueList="$'),
    # Label Studio's own template "Inventory Tracking"
    ('<View><PolygonLabels name="objects" toName="image" value="$objects"/><Image name="image" value="$image"/>'
     '</View>', "from each task's data"),
]


@pytest.mark.parametrize("xml,controls,labels", GOOD)
def test_good_configs(xml, controls, labels):
    cfg = parse_label_config(xml)
    assert {(c.type, c.from_name) for c in cfg.controls} == controls
    assert cfg.label_names == labels
    for c in cfg.controls:
        assert cfg.image(c.to_name).data_key


@pytest.mark.parametrize("xml,needle", BAD)
def test_bad_configs_name_the_problem(xml, needle):
    with pytest.raises(LabelConfigError) as e:
        parse_label_config(xml)
    assert needle in str(e.value)


def test_every_control_served_is_read_and_written():
    """One list of controls (SUPPORTED_CONTROLS): each has a place in the drawing order and round-trips a region."""
    import numpy as np

    from tessera.backend.label_config import POINT_CONTROLS, SUPPORTED_CONTROLS, Control
    from tessera.backend.regions import PRECISION, instances_to_results, region_to_mask

    assert set(PRECISION) == set(SUPPORTED_CONTROLS.values())
    inst = np.zeros((40, 50), np.int32)
    inst[10:20, 5:25] = 1
    for kind in SUPPORTED_CONTROLS.values():
        (r,) = instances_to_results(inst, {1: "A"}, {1: 0.9}, Control(kind, "c", "image", ("A",)))
        if kind in POINT_CONTROLS:          # a point has no area: it lies on its object
            assert r["type"] == kind and inst[int(r["value"]["y"] * 0.4), int(r["value"]["x"] * 0.5)] == 1
            continue
        assert r["type"] == kind and (region_to_mask(r, 40, 50) & (inst == 1)).sum() / (inst == 1).sum() > 0.9
