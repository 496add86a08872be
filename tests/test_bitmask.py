"""BitmaskLabels (Label Studio 1.23's pixel mask tool): a PNG data URL of the image's own size, alpha = painted.
Tessera's PNGs are read back by Pillow as a browser reads them (RGBA, alpha > 0), on odd sizes, objects at the
borders, tiny and huge objects; masks drawn in the editor (8-bit RGBA PNGs, black on transparent) are read as
annotations; a hostile data URL is a ValueError, never a crash or a giant allocation."""
import base64
import io

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from tessera.backend import bitmask
from tessera.backend.label_config import Control, LabelConfigError, parse_label_config
from tessera.backend.regions import instances_to_results, region_to_mask, region_value, results_to_maps
from tests.test_regions import random_instances

BITMASK = Control("bitmasklabels", "mask", "image", ("A", "B"))
BRUSH = Control("brushlabels", "brush", "image", ("A", "B"))


def shown(url: str, height: int, width: int) -> np.ndarray:
    """What the editor paints: the PNG decoded (Pillow, RGBA), pixels with alpha > 0; it must be the image's size."""
    assert url.startswith("data:image/png;base64,")
    im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert im.size == (width, height)
    return np.asarray(im.convert("RGBA"))[..., 3] > 0


def as_data_url(rgba: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    return bitmask.PREFIX + base64.b64encode(buf.getvalue()).decode()


def editor_png(mask: np.ndarray) -> str:
    """A mask as the editor saves it: canvas.toDataURL, black on transparent, 8-bit RGBA."""
    rgba = np.zeros(mask.shape + (4,), np.uint8)
    rgba[mask, 3] = 255
    return as_data_url(rgba)


@pytest.mark.parametrize("h, w", [(1, 1), (7, 9), (97, 153), (520, 696), (1040, 1388), (3001, 4003)])
def test_written_masks_are_what_the_editor_shows_on_any_size(h, w):
    rng = np.random.default_rng(h * w)
    cases = [((0, 0), (h, w)),                                  # the whole image
             ((h - 1, w - 1), (1, 1)),                          # the last pixel
             ((0, w - min(w, 13)), (min(h, 5), min(w, 13)))]    # on the top and right borders
    for _ in range(4):
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        cases.append(((y0, x0), (int(rng.integers(1, h - y0 + 1)), int(rng.integers(1, w - x0 + 1)))))
    for (y0, x0), (ch, cw) in cases:
        crop = rng.random((ch, cw)) < 0.6
        crop[0, 0] = True
        truth = np.zeros((h, w), bool)
        truth[y0:y0 + ch, x0:x0 + cw] = crop
        url = bitmask.data_url(crop, (y0, x0), h, w)
        assert np.array_equal(shown(url, h, w), truth), ((y0, x0), (ch, cw))
        (a, b, c, d), back = bitmask.crop(url, h, w)               # Tessera's own reader of its PNGs
        again = np.zeros((h, w), bool)
        again[a:c, b:d] = back
        assert np.array_equal(again, truth)


def test_regions_round_trip_and_keep_touching_objects_apart():
    inst = random_instances(256, 320, 300, seed=2, max_r=6)
    ids = [int(i) for i in np.unique(inst) if i]
    results = instances_to_results(inst, {i: "A" for i in ids}, {i: 0.5 for i in ids}, BITMASK)
    assert len(results) == len(ids)
    for r in results:
        k = int(r["id"].rsplit("-", 1)[1])
        assert r["type"] == "bitmasklabels" and r["value"]["bitmasklabels"] == ["A"]
        assert (r["original_width"], r["original_height"]) == (320, 256)
        assert np.array_equal(region_to_mask(r, 256, 320), inst == k)
        assert np.array_equal(shown(r["value"]["imageDataURL"], 256, 320), inst == k)
    classes, back = results_to_maps(results, "image", 256, 320, {"A": 1})
    assert np.array_equal(classes > 0, inst > 0) and len(np.unique(back[back > 0])) == len(ids)
    brushes = instances_to_results(inst, {i: "A" for i in ids}, {i: 0.5 for i in ids}, BRUSH)
    assert all(np.array_equal(region_to_mask(a, 256, 320), region_to_mask(b, 256, 320))
               for a, b in zip(results, brushes)), "a bitmask region holds the brush region's pixels"


def test_masks_drawn_in_the_editor_are_read_as_annotations():
    truth = random_instances(120, 90, 6, seed=5, max_r=15)
    results = [{"type": "bitmasklabels", "from_name": "mask", "to_name": "image", "original_width": 90,
                "original_height": 120, "value": {"imageDataURL": editor_png(truth == k), "bitmasklabels": [lab]}}
               for k, lab in zip(range(1, 7), "ABABAB") if (truth == k).any()]
    classes, instances = results_to_maps(results, "image", 120, 90, {"A": 1, "B": 2})
    for r in results:
        m = region_to_mask(r, 120, 90)
        k = np.bincount(truth[m]).argmax()
        assert np.array_equal(m, truth == k)
    assert np.array_equal(classes > 0, truth > 0)
    # a half-transparent stroke counts, a fully transparent pixel does not (alpha > 0, as the editor paints)
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[2:4, 3:6, 3] = 40
    (y0, x0, y1, x1), crop = bitmask.crop(as_data_url(rgba), 10, 10)
    assert (y0, x0, y1, x1) == (2, 3, 4, 6) and crop.all()


def test_a_png_of_another_size_is_read_as_the_editor_draws_it():
    """Drawn at (0, 0) on the image: what lies past the image is cut off, a smaller PNG covers its corner."""
    mask = np.zeros((30, 50), bool)
    mask[5:10, 40:50] = True
    m = region_to_mask({"type": "bitmasklabels", "value": {"imageDataURL": editor_png(mask),
                                                           "bitmasklabels": ["A"]}}, 20, 45)
    assert m.shape == (20, 45) and m.sum() == 5 * 5 and m[5:10, 40:45].all()
    assert bitmask.crop(editor_png(np.zeros((20, 45), bool)), 20, 45) is None


def test_palette_pngs_from_elsewhere_use_their_transparency_table():
    idx = np.zeros((8, 8), np.uint8)
    idx[1:3, 1:3], idx[5:7, 5:7] = 1, 2
    im = Image.fromarray(idx, "P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=bytes([0, 0, 255]))          # 0 and 1 transparent, 2 opaque
    (y0, x0, y1, x1), crop = bitmask.crop(bitmask.PREFIX + base64.b64encode(buf.getvalue()).decode(), 8, 8)
    assert (y0, x0, y1, x1) == (5, 5, 7, 7) and crop.all()


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (a decompression bomb's first bytes)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


@pytest.mark.parametrize("url, error", [
    (None, "PNG data URL"),
    ("https://example.com/mask.png", "PNG data URL"),
    ("data:image/jpeg;base64,AAAA", "PNG data URL"),
    ("data:image/png;base64,***", "base64"),
    ("data:image/png;base64," + base64.b64encode(b"GIF89a not a png").decode(), "not a readable PNG"),
    ("data:image/png;base64," + base64.b64encode(_png_header_only(100_000, 100_000)).decode(), "100000x100000"),
    ("data:image/png;base64," + base64.b64encode(_png_header_only(40, 30)).decode(), "not a readable PNG"),
])
def test_a_hostile_data_url_is_a_value_error(url, error):
    with pytest.raises(ValueError, match=error):
        region_to_mask({"type": "bitmasklabels", "value": {"imageDataURL": url, "bitmasklabels": ["A"]}}, 30, 40)


def test_a_data_url_over_the_cap_is_refused_before_it_is_decoded(monkeypatch):
    monkeypatch.setattr(bitmask, "MAX_URL_CHARS", 100)
    with pytest.raises(ValueError, match="over 100 characters"):
        region_value({"type": "bitmasklabels", "value": {"imageDataURL": bitmask.PREFIX + "A" * 200}})


def test_a_bitmask_config_is_served():
    config = parse_label_config('<View><Image name="image" value="$image" smoothing="false"/>'
                                '<BitmaskLabels name="mask" toName="image"><Label value="Cell"/>'
                                '<Label value="Debris"/></BitmaskLabels></View>')
    (control,) = config.controls
    assert (control.type, control.from_name, control.to_name, control.labels) == \
        ("bitmasklabels", "mask", "image", ("Cell", "Debris"))
    with pytest.raises(LabelConfigError, match="BitmaskLabels"):
        parse_label_config('<View><Image name="image" value="$image"/><Choices name="k" toName="image">'
                           '<Choice value="A"/></Choices></View>')


def test_a_prediction_on_a_capped_image_comes_back_at_the_original_size():
    """As brush RLEs: a 4000x3000 photo decoded to 2048x1536 gets bitmask PNGs of 4000 x 3000 pixels."""
    from tessera.backend.predictions import _regions_at_size
    from tessera.model.inference import Prediction

    H, W, h, w = 3000, 4000, 1536, 2048
    config = parse_label_config('<View><Image name="image" value="$image"/><BitmaskLabels name="mask" '
                                'toName="image"><Label value="A"/></BitmaskLabels></View>')
    truth = np.zeros((H, W), np.uint8)
    cv2.ellipse(truth, (3000, 700), (400, 250), 30, 0, 360, 1, -1)
    cv2.rectangle(truth, (0, 2600), (300, 2999), 1, -1)
    inst = cv2.resize(ndimage.label(truth)[0].astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST)
    pred = Prediction(np.where(inst > 0, 1, 0).astype(np.int32), inst, {1: 1, 2: 1}, {1: 0.9, 2: 0.8}, 0.9)
    pred.slices = {1: (slice(0, 5), slice(0, 5)), 2: (slice(0, 5), slice(0, 5))}   # the cut's, at the working size
    items = _regions_at_size(pred, config, "image", ["A"], (H, W))
    full = ndimage.label(truth)[0]
    assert len(items) == 2
    for item in items:
        m = shown(item["value"]["imageDataURL"], H, W)
        k = np.bincount(full[m]).argmax()
        assert k > 0 and (m & (full == k)).sum() / (m | (full == k)).sum() > 0.97
