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
    # Label Studio's own template "Multi-page document annotation": <Image valueList>, one image per page
    ('<View><RectangleLabels name="r" toName="pdf"><Label value="Title"/></RectangleLabels>'
     '<Image valueList="$pages" name="pdf"/></View>', {("rectanglelabels", "r")}, ["Title"]),
]

BAD = [
    ("", "empty"),
    ("<View><Image", "not valid XML"),
    ('<View><Text name="t" value="$text"/><Labels name="l" toName="t"><Label value="A"/></Labels></View>', "<Text>"),
    ('<View><Image name="i" value="$image"/><KeyPointLabels name="kp" toName="i"><Label value="P"/>'
     '</KeyPointLabels></View>', "<KeyPointLabels>"),
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
