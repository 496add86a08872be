"""Parse a Label Studio labeling config into what Tessera can serve: image objects and region controls."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any
from xml.etree.ElementTree import Element

from defusedxml import ElementTree as SafeET
from defusedxml.common import DefusedXmlException

# control tag (lower case) -> result type Tessera writes
SUPPORTED_CONTROLS = {
    "brushlabels": "brushlabels",
    "bitmasklabels": "bitmasklabels",
    "polygonlabels": "polygonlabels",
    "ellipselabels": "ellipselabels",
    "rectanglelabels": "rectanglelabels",
    "keypointlabels": "keypointlabels",
}
# a KeyPointLabels control is a project's own output only where it is its image's one kind of control (counting:
# one point an object, learned from points); beside masks, polygons or boxes it is the smart tool's hint (LS's
# click), as is one marked smartOnly, and nothing is written for it
POINT_CONTROLS = frozenset({"keypointlabels"})
# controls written from a model's boxes where it has them (a box model's, a mask model's detection head): rectangles,
# and a counting project's points at the boxes' centres
BOX_CONTROLS = frozenset({"rectanglelabels", "keypointlabels"})
# a drawing tool used with a separate <Labels> control (Label Studio's "Labels + tool" form, e.g. its OCR template:
# <Labels name="label"> + <Rectangle name="bbox">) -> the region type Tessera handles it as. The editor stores such a
# region as two results of one id: the tool's shape (type "rectangle") and the labels (type "labels", its value the
# same shape with `labels`; Result.serialize, 1.23.2); regions.labelled and regions.as_stored convert.
TOOL_CONTROLS = {
    "brush": "brushlabels",
    "bitmask": "bitmasklabels",
    "polygon": "polygonlabels",
    "ellipse": "ellipselabels",
    "rectangle": "rectanglelabels",
    "keypoint": "keypointlabels",
}
# controls whose regions count the original image's pixels (a brush RLE, a bitmask PNG of the image's size),
# not percentages: written from the instances at the original size, and drawn over coarser regions
PIXEL_CONTROLS = frozenset({"brushlabels", "bitmasklabels"})
OBJECT_TAGS = {"image", "text", "hypertext", "audio", "audioplus", "video", "timeseries", "paragraphs",
               "table", "pdf", "markdown", "html"}


class LabelConfigError(ValueError):
    """A labeling config Tessera cannot serve; the message says which tag and what to change."""


@dataclass(frozen=True)
class Control:
    """One region control: `<BrushLabels name=from_name toName=to_name>` with its label values, or a drawing tool
    (`<Brush name=from_name>`, TOOL_CONTROLS) with the labels of the `<Labels name=labels_from>` beside it."""
    type: str                 # a SUPPORTED_CONTROLS value: "brushlabels", "bitmasklabels", "polygonlabels", ...
    from_name: str
    to_name: str
    labels: tuple[str, ...]
    labels_from: str = ""     # a tool's <Labels> control; "" for a *Labels control, which holds its labels itself


@dataclass(frozen=True)
class ImageObject:
    """An `<Image name=... value="$key">` tag; `data_key` is the task-data field that holds the URL.

    `<Image valueList="$key">` (`many`, Label Studio's multi-image tag) holds a list of URLs, one image per
    page, and its regions name their page as `item_index`. A task's pages of such a tag are views of it with
    `page` set (task_images); each is predicted, trained on and checked as an image of its own."""
    name: str
    data_key: str
    many: bool = False
    page: int | None = None

    @property
    def view_id(self) -> str:
        """This image's part of a sample id: the tag's name, and its page for a multi-image tag."""
        return self.name if self.page is None else f"{self.name}@{self.page}"

    def regions(self, result: Any) -> Any:
        """The regions of an annotation's or prediction's result on this page (all of them for a one-image tag;
        which image tag a region is on, `to_name`, is for the reader of the regions to check)."""
        if not self.many or not isinstance(result, list):
            return result
        page = self.page or 0
        return [r for r in result if isinstance(r, dict) and r.get("item_index", 0) == page]

    def mark(self, regions: list[dict]) -> list[dict]:
        """Regions made for this page, marked with it (item_index) and ids that no other page repeats."""
        if self.many:
            page = self.page or 0
            for r in regions:
                r["item_index"] = page
                r["id"] = f"p{page}-{r['id']}"
        return regions


MAX_PAGES = 64      # the pages of one multi-image tag a task is predicted and trained on (the first ones)


def task_images(task: Any, config: "LabelConfig") -> list[ImageObject]:
    """The images of a task: one per image tag, and one per page of a multi-image tag's list (at most
    MAX_PAGES). A multi-image tag whose field is not a list stays one view: loading it says why it fails."""
    data = task.get("data") if isinstance(task, dict) else None
    out: list[ImageObject] = []
    for img in config.images:
        refs = data.get(img.data_key) if img.many and isinstance(data, dict) else None
        if isinstance(refs, list) and refs:
            out += [replace(img, page=i) for i in range(min(len(refs), MAX_PAGES))]
        else:
            out.append(img)
    return out


@dataclass(frozen=True)
class LabelConfig:
    images: tuple[ImageObject, ...]
    controls: tuple[Control, ...]

    def image(self, name: str) -> ImageObject:
        return next(i for i in self.images if i.name == name)

    def id_prefix(self, control: Control) -> str:
        """What the ids of `control`'s regions start with: "" but for a tool beside two <Labels>, which is two
        controls of one name (the <Labels>' name then, so that no two regions of a task share an id: Label
        Studio would join them into one)."""
        shared = sum(c.from_name == control.from_name and c.to_name == control.to_name for c in self.controls) > 1
        return f"{control.labels_from}-" if shared and control.labels_from else ""

    @property
    def label_names(self) -> list[str]:
        """All label values over all controls, in config order, without duplicates."""
        seen: dict[str, None] = {}
        for c in self.controls:
            for label in c.labels:
                seen.setdefault(label, None)
        return list(seen)


def _labels(tag: Element) -> tuple[str, ...]:
    out = []
    for child in tag.iter():
        if child is tag or child.tag.lower() != "label":
            continue
        value = child.attrib.get("alias") or child.attrib.get("value")
        if value:
            out.append(value)
    return tuple(out)


def _to_names(tag: Element) -> list[str]:
    return [t.strip() for t in tag.attrib.get("toName", "").split(",") if t.strip()]


def _tool_controls(tools: list[Element], label_sets: list[Element], objects: dict[str, str]) -> list[Control]:
    """The controls of drawing tools that take their labels from a <Labels> on the same image: one per tool and
    <Labels> pair (a region's labels name the <Labels> they came from). A tool with no <Labels> on its image
    draws regions without a label, nothing to learn or write: not a control. A <Labels> of dynamic labels
    (value="$...") is refused as for a *Labels control."""
    out: list[Control] = []
    for tag in tools:
        from_name = tag.attrib.get("name", "")
        if not from_name:
            continue
        for to_name in _to_names(tag):
            if objects.get(to_name) != "image":
                continue
            for labels_tag in label_sets:
                labels_name = labels_tag.attrib.get("name", "")
                if not labels_name or to_name not in _to_names(labels_tag):
                    continue
                labels = _labels(labels_tag)
                if not labels and labels_tag.attrib.get("value", "").startswith("$"):
                    raise LabelConfigError(f'<Labels name="{labels_name}" value="{labels_tag.attrib["value"]}"> '
                                           "takes its labels from each task's data; Tessera learns a fixed set: "
                                           'list them as <Label value="..."/> children')
                if labels:
                    out.append(Control(TOOL_CONTROLS[tag.tag.lower()], from_name, to_name, labels, labels_name))
    return out


def _without_hint_points(controls: list[Control], tags: list[Element]) -> list[Control]:
    """The controls Tessera writes: a keypoint control only on an image with no other kind of control (a counting
    project) and not marked smartOnly; elsewhere keypoints are the smart tool's hints (POINT_CONTROLS)."""
    smart_only = {t.attrib.get("name") for t in tags if t.attrib.get("smartOnly", "").lower() == "true"}
    areas = {c.to_name for c in controls if c.type not in POINT_CONTROLS}
    return [c for c in controls if c.type not in POINT_CONTROLS
            or (c.to_name not in areas and c.from_name not in smart_only)]


def parse_label_config(xml: str) -> LabelConfig:
    """Parse `xml` and check that Tessera can serve it; raises LabelConfigError naming the tag otherwise."""
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the label config is empty: send the project's labeling config XML")
    try:
        root = SafeET.fromstring(xml)
    except DefusedXmlException as e:
        raise LabelConfigError(f"the label config uses forbidden XML features ({type(e).__name__})") from e
    except SafeET.ParseError as e:
        raise LabelConfigError(f"the label config is not valid XML: {e}") from e

    objects: dict[str, str] = {}      # name -> tag (lower)
    images: list[ImageObject] = []
    raw_controls: list[Element] = []
    tools: list[Element] = []
    label_sets: list[Element] = []
    unsupported: list[str] = []
    for tag in root.iter():
        kind = tag.tag.lower()
        name = tag.attrib.get("name", "")
        if kind in OBJECT_TAGS and name:
            objects[name] = kind
            if kind == "image":
                many = "valueList" in tag.attrib
                value = tag.attrib["valueList"] if many else tag.attrib.get("value", "")
                if not value.startswith("$") or len(value) < 2:
                    attr = "valueList" if many else "value"
                    raise LabelConfigError(f'<Image name="{name}"> needs {attr}="$<task data key>", got "{value}"')
                images.append(ImageObject(name=name, data_key=value[1:], many=many))
        elif kind in SUPPORTED_CONTROLS:
            raw_controls.append(tag)
        elif "toName" in tag.attrib:
            unsupported.append(tag.tag)
            if kind in TOOL_CONTROLS:
                tools.append(tag)
            elif kind == "labels":
                label_sets.append(tag)

    if not images:
        kinds = sorted({f"<{t.capitalize()}>" for t in objects.values()}) or ["no object tag"]
        raise LabelConfigError(
            f"Tessera serves image projects: the config has no <Image> tag (found {', '.join(kinds)}). "
            "Use an <Image name=... value=\"$image\"/> with BrushLabels, BitmaskLabels, PolygonLabels, "
            "EllipseLabels, RectangleLabels or KeyPointLabels.")
    controls: list[Control] = []
    for tag in raw_controls:
        from_name = tag.attrib.get("name", "")
        to_names = _to_names(tag)
        if not from_name or not to_names:
            raise LabelConfigError(f"<{tag.tag}> needs both name= and toName= attributes")
        labels = _labels(tag)
        if not labels and tag.attrib.get("value", "").startswith("$"):
            raise LabelConfigError(f'<{tag.tag} name="{from_name}" value="{tag.attrib["value"]}"> takes its labels '
                                   "from each task's data; Tessera learns a fixed set: list them as "
                                   '<Label value="..."/> children')
        if not labels:
            raise LabelConfigError(f'<{tag.tag} name="{from_name}"> has no <Label value="..."/> children')
        for to_name in to_names:
            if to_name not in objects:
                raise LabelConfigError(f'<{tag.tag} name="{from_name}"> points toName="{to_name}", '
                                       "which is not an object tag of this config")
            if objects[to_name] != "image":
                raise LabelConfigError(f'<{tag.tag} name="{from_name}"> labels <{objects[to_name]}> '
                                       f'"{to_name}"; Tessera only labels <Image> tags')
            controls.append(Control(SUPPORTED_CONTROLS[tag.tag.lower()], from_name, to_name, labels))
    controls += _tool_controls(tools, label_sets, objects)
    controls = _without_hint_points(controls, [*raw_controls, *tools])
    if not controls:
        hints = [f'<{t.tag} smartOnly="true"> (a smart tool\'s hints)' for t in raw_controls
                 if t.attrib.get("smartOnly", "").lower() == "true"]
        found = ", ".join([f"<{t}>" for t in unsupported] + hints) or "no labeling control"
        raise LabelConfigError(
            f"Tessera predicts BrushLabels, BitmaskLabels, PolygonLabels, EllipseLabels, RectangleLabels and "
            f"KeyPointLabels not marked smartOnly (or a <Brush>, <Bitmask>, <Polygon>, <Ellipse>, <Rectangle> or "
            f"<KeyPoint> tool with a <Labels> on the same image); this config has {found}. "
            "Add one of those controls pointing at the <Image>.")
    used = {c.to_name for c in controls}
    return LabelConfig(images=tuple(i for i in images if i.name in used), controls=tuple(controls))
