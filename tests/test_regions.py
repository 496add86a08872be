"""Label map <-> LS regions: exact round trips on the shapes that break converters."""
import cv2
import numpy as np
import pytest
from scipy import ndimage

from tessera.backend.label_config import Control
from tessera.backend.regions import (box_to_mask, crop_to_rle, instances_to_results, instances_to_rles,
                             mask_to_polygons, mask_to_rle, polygon_to_mask, region_to_mask,
                             results_to_maps, rle_to_mask)
from tessera.model.postprocess import object_slices

BRUSH = Control("brushlabels", "mask", "image", ("A", "B"))
POLY = Control("polygonlabels", "poly", "image", ("A", "B"))
RECT = Control("rectanglelabels", "bbox", "image", ("A", "B"))


def random_instances(h, w, n, seed=0, max_r=12):
    rng = np.random.default_rng(seed)
    inst = np.zeros((h, w), np.int32)
    for k in range(1, n + 1):
        m = np.zeros((h, w), np.uint8)
        cv2.ellipse(m, (int(rng.integers(0, w)), int(rng.integers(0, h))),
                    (int(rng.integers(1, max_r)), int(rng.integers(1, max_r))), float(rng.integers(0, 180)),
                    0, 360, 1, -1)
        inst[m > 0] = k
    return inst


def filled_largest(mask):
    """What one outer polygon can represent: the largest 8-connected part, holes filled."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, lab, range(1, n + 1))
    return ndimage.binary_fill_holes(lab == (np.argmax(sizes) + 1))


CASES = {
    "non-square": (random_instances(97, 153, 30, seed=1), 30),
    "tiny": (np.pad(np.eye(3, dtype=np.int32) * 0 + np.array([[1, 0, 2], [0, 0, 0], [3, 3, 0]]), 5), 3),
    "hundreds": (random_instances(256, 320, 400, seed=2, max_r=5), 400),
    "touching": (np.repeat(np.repeat(np.array([[1, 2], [3, 4]], np.int32), 20, 0), 30, 1), 4),
}


@pytest.mark.parametrize("name", CASES)
def test_brush_round_trip_is_exact(name):
    inst, _ = CASES[name]
    h, w = inst.shape
    ids = [int(i) for i in np.unique(inst) if i]
    results = instances_to_results(inst, {i: "A" for i in ids}, {i: 0.5 for i in ids}, BRUSH)
    assert len(results) == len(ids)
    for r in results:
        k = int(r["id"].rsplit("-", 1)[1])
        assert r["original_width"] == w and r["original_height"] == h
        assert np.array_equal(region_to_mask(r, h, w), inst == k), f"{name}: instance {k} changed"
    classes, back = results_to_maps(results, "image", h, w, {"A": 1})
    assert np.array_equal(classes > 0, inst > 0)
    assert len(np.unique(back[back > 0])) == len(ids)   # touching instances stay separate


@pytest.mark.parametrize("name", CASES)
def test_polygon_round_trip_is_exact_without_simplification(name):
    inst, _ = CASES[name]
    h, w = inst.shape
    ids = [int(i) for i in np.unique(inst) if i]
    results = instances_to_results(inst, {i: "B" for i in ids}, {}, POLY, polygon_epsilon=0)
    assert len(results) == len(ids)
    for r in results:
        k = int(r["id"].rsplit("-", 1)[1])
        assert len(r["value"]["points"]) >= 3
        assert r["value"]["polygonlabels"] == ["B"]
        assert np.array_equal(region_to_mask(r, h, w), filled_largest(inst == k)), f"{name}: polygon {k}"


def test_simplified_polygons_stay_close():
    inst = random_instances(200, 260, 20, seed=3, max_r=30)
    for k in np.unique(inst)[1:]:
        truth = filled_largest(inst == k)
        if truth.sum() < 50:
            continue
        poly = mask_to_polygons(inst == k)[0]
        back = polygon_to_mask(poly, *inst.shape)
        iou = (back & truth).sum() / (back | truth).sum()
        assert iou > 0.85, f"instance {k}: IoU {iou:.3f}"
        assert len(poly) < truth.sum()


@pytest.mark.parametrize("name", CASES)
def test_box_round_trip_is_exact(name):
    inst, _ = CASES[name]
    h, w = inst.shape
    ids = [int(i) for i in np.unique(inst) if i]
    results = instances_to_results(inst, {i: "A" for i in ids}, {}, RECT)
    for r in results:
        k = int(r["id"].rsplit("-", 1)[1])
        rows, cols = np.nonzero(inst == k)
        truth = np.zeros_like(inst, bool)
        truth[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert np.array_equal(region_to_mask(r, h, w), truth)
        v = r["value"]
        assert 0 <= v["x"] and v["x"] + v["width"] <= 100.0001 and v["rotation"] == 0


@pytest.mark.parametrize("name", CASES)
def test_regions_from_given_slices_equal_regions_from_the_map(name):
    """prediction_to_results finds the objects' boxes once for every control; a control given those boxes for
    more ids than it labels (another control's classes) answers as if it had found them itself."""
    inst, _ = CASES[name]
    ids = [int(i) for i in np.unique(inst) if i]
    slices = object_slices(inst, ids)
    labels = {i: "A" for i in ids[::2]}
    for control in (POLY, RECT):
        assert instances_to_results(inst, labels, {}, control, slices=slices) == \
            instances_to_results(inst, labels, {}, control)


def test_empty_mask_gives_no_regions_and_empty_maps():
    empty = np.zeros((40, 60), np.int32)
    for control in (BRUSH, POLY, RECT):
        assert instances_to_results(empty, {}, {}, control) == []
    assert mask_to_polygons(empty > 0) == []
    classes, inst = results_to_maps([], "image", 40, 60, {"A": 1})
    assert classes.shape == (40, 60) and not classes.any() and not inst.any()
    assert not rle_to_mask(mask_to_rle(empty > 0), 40, 60).any()


def test_labels_map_to_classes_and_unknown_labels_are_skipped():
    inst = np.zeros((30, 30), np.int32)
    inst[2:8, 2:8], inst[10:20, 10:20], inst[22:28, 22:28] = 1, 2, 3
    results = instances_to_results(inst, {1: "A", 2: "B"}, {}, BRUSH)   # 3 has no label for this control
    assert len(results) == 2
    results[1]["value"]["brushlabels"] = ["C"]
    classes, back = results_to_maps(results, "image", 30, 30, {"A": 1, "B": 2})
    assert set(np.unique(classes)) == {0, 1}
    assert results_to_maps(results, "other-image", 30, 30, {"A": 1})[0].sum() == 0


def test_rle_of_wrong_size_is_an_error():
    rle = mask_to_rle(np.ones((10, 10), bool))
    with pytest.raises(ValueError, match="pixels"):
        rle_to_mask(rle, 10, 11)


def test_hand_drawn_shapes_rasterize_at_pixel_centres():
    # a box from 10% to 30% of a 50 px wide image covers columns 5..14
    m = box_to_mask(5.0, 2.0, 10.0, 4.0, 20, 50)
    assert m.sum() == 40 and m[2:6, 5:15].all()
    # rotated 90 degrees about the top-left corner: extends to the left
    r = box_to_mask(20.0, 2.0, 10.0, 4.0, 30, 50, rotation=90)
    rows, cols = np.nonzero(r)
    assert set(cols) <= set(range(15, 21)) and set(rows) <= set(range(1, 13)) and r[4:10, 17:19].all()
    tri = polygon_to_mask(np.array([[0, 0], [20, 0], [0, 20]], float), 20, 20)
    assert tri[1, 1] and not tri[18, 18]


def test_a_prediction_accepted_as_is_trains_on_the_masks_not_the_boxes():
    inst = np.zeros((120, 160), np.int32)
    for k, (cx, cy) in enumerate([(20, 20), (34, 22), (80, 60), (120, 90), (131, 95), (60, 100)], start=1):
        m = np.zeros_like(inst, np.uint8)
        cv2.ellipse(m, (cx, cy), (8, 6), 30.0 * k, 0, 360, 1, -1)
        inst[(m > 0) & (inst == 0)] = k                          # touching pairs, none hidden
    ids = [int(i) for i in np.unique(inst) if i]
    labels = {i: "A" for i in ids}
    results = (instances_to_results(inst, labels, {}, RECT) + instances_to_results(inst, labels, {}, POLY)
               + instances_to_results(inst, labels, {}, BRUSH))    # boxes first, as LS may order them
    classes, back = results_to_maps(results, "image", 120, 160, {"A": 1})
    assert np.array_equal(classes > 0, inst > 0)
    assert len(np.unique(back[back > 0])) == len(ids)


def test_box_only_annotations_still_count():
    inst = np.zeros((40, 40), np.int32)
    inst[5:15, 5:15], inst[20:30, 22:35] = 1, 2
    results = instances_to_results(inst, {1: "A", 2: "B"}, {}, RECT)
    classes, back = results_to_maps(results, "image", 40, 40, {"A": 1, "B": 2})
    assert (classes == 1).sum() == 100 and (classes == 2).sum() == 130 and back.max() == 2


def test_one_duplicate_rule_a_thin_objects_box_is_the_same_object():
    """/predict's mislabeling and training read annotations through the same rule: a box around a
    finer region is a copy when its IoU with that region's box is >= DUPLICATE_IOU, however little of
    the box the object covers (a thin diagonal object covers ~1/20 of its box)."""
    thin = np.zeros((40, 40), bool)
    for i in range(20):
        thin[10 + i, 10 + i] = thin[10 + i, 11 + i] = True
    brush, box = (Control(t, n, "image", ("A",)) for t, n in (("brushlabels", "mask"), ("rectanglelabels", "bbox")))
    inst = thin.astype(np.int32)
    results = instances_to_results(inst, {1: "A"}, {1: 1.0}, box) + instances_to_results(inst, {1: "A"}, {1: 1.0}, brush)
    classes, instances = results_to_maps(results, "image", 40, 40, {"A": 1})
    assert np.array_equal(classes > 0, thin) and instances.max() == 1
    far = instances_to_results(np.pad(inst[:20, :20], ((20, 0), (20, 0))), {1: "A"}, {1: 1.0}, box)
    assert results_to_maps(results + far, "image", 40, 40, {"A": 1})[1].max() == 2    # another object: kept


# ------------------------------------------------------------------ brush RLE from the object's crop

def _sdk_rle(mask):
    from label_studio_sdk.converter.brush import mask2rle
    return mask2rle(np.where(mask, 255, 0).astype(np.uint8))


def _decoded(rle, h, w):
    from label_studio_sdk.converter.brush import decode_rle
    flat = decode_rle(rle)
    assert flat.size == h * w * 4
    rgba = flat.reshape(h, w, 4)
    assert (rgba == rgba[:, :, 3:]).all()        # every channel painted like alpha, as mask2rle does
    return rgba[:, :, 3] > 0


def _border_masks():
    """Masks that break run arithmetic: borders, corners, full rows that join across lines, one pixel."""
    h, w = 37, 53
    out = {}
    for name, sl in {"left": np.s_[5:20, 0:7], "right": np.s_[5:20, w - 7:], "top": np.s_[0:4, 10:30],
                     "bottom": np.s_[h - 3:, 10:30], "corner_tl": np.s_[0:3, 0:3], "corner_br": np.s_[h - 3:, w - 3:],
                     "full_rows": np.s_[10:14, :], "full": np.s_[:, :], "pixel": np.s_[36:37, 52:53],
                     "first_pixel": np.s_[0:1, 0:1], "column": np.s_[:, 20:21]}.items():
        m = np.zeros((h, w), bool)
        m[sl] = True
        out[name] = m
    ring = np.zeros((h, w), bool)
    ring[:, :3] = ring[:, -3:] = True            # right border of row r joins the left border of row r + 1
    out["left_right_band"] = ring
    return out


@pytest.mark.parametrize("name", list(_border_masks()))
def test_brush_rle_matches_sdk_on_border_masks(name):
    mask = _border_masks()[name]
    rle = mask_to_rle(mask)
    assert rle == _sdk_rle(mask)
    assert np.array_equal(_decoded(rle, *mask.shape), mask)


def test_brush_rle_matches_sdk_on_random_odd_sizes():
    rng = np.random.default_rng(7)
    for t in range(150):
        h, w = (int(v) for v in rng.integers(1, 45, 2))
        mask = rng.random((h, w)) < rng.random()
        if t % 10 == 0:
            mask[:] = False
        rle = mask_to_rle(mask)
        assert rle == _sdk_rle(mask), f"case {t}: {h}x{w}"
        assert np.array_equal(_decoded(rle, h, w), mask)


@pytest.mark.parametrize("shape,box", [((1040, 1388), (500, 503, 700, 702)),       # tiny object, big image
                                       ((600, 777), (3, 590, 0, 777)),              # huge, touches 3 borders
                                       ((301, 1), (0, 301, 0, 1))])                 # one column image, full
def test_brush_rle_tiny_and_huge_objects_round_trip(shape, box):
    h, w = shape
    y0, y1, x0, x1 = box
    yy, xx = np.mgrid[y0:y1, x0:x1]
    crop = ((yy - (y0 + y1) / 2) ** 2 / max(1, (y1 - y0) / 2) ** 2
            + (xx - (x0 + x1) / 2) ** 2 / max(1, (x1 - x0) / 2) ** 2) <= 1.0   # an ellipse in the box
    if crop.size <= 2 * max(crop.shape):
        crop[:] = True
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = crop
    rle = crop_to_rle(crop, y0, x0, h, w)
    assert rle == mask_to_rle(mask)
    assert np.array_equal(_decoded(rle, h, w), mask)        # runs over 2**16 values are split and rejoined


def test_brush_rle_of_empty_crop_is_an_empty_mask():
    rle = crop_to_rle(np.zeros((4, 5), bool), 3, 3, 20, 30)
    assert rle == _sdk_rle(np.zeros((20, 30), bool))
    assert not _decoded(rle, 20, 30).any()


def test_a_prediction_on_a_capped_image_comes_back_at_the_original_size():
    """TESSERA_MAX_SIDE decodes a 4000x3000 photo to 2048x1536: its regions must still be at 4000x3000 in
    what LS receives (original_width/height, percent coordinates, a brush RLE of 4000 x 3000 pixels)."""
    from tessera.backend.label_config import parse_label_config
    from tessera.backend.predictions import _regions_at_size
    from tessera.model.inference import Prediction

    H, W, h, w = 3000, 4000, 1536, 2048
    config = parse_label_config(
        '<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image"><Label value="A"/>'
        '</BrushLabels><PolygonLabels name="poly" toName="image"><Label value="A"/></PolygonLabels>'
        '<RectangleLabels name="bbox" toName="image"><Label value="A"/></RectangleLabels></View>')
    truth = np.zeros((H, W), np.uint8)
    cv2.ellipse(truth, (3000, 700), (400, 250), 30, 0, 360, 1, -1)
    cv2.rectangle(truth, (0, 2600), (300, 2999), 1, -1)                       # one touches the border
    inst = cv2.resize(ndimage.label(truth)[0].astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST)
    pred = Prediction(np.where(inst > 0, 1, 0).astype(np.int32), inst, {1: 1, 2: 1}, {1: 0.9, 2: 0.8}, 0.9)
    items = _regions_at_size(pred, config, "image", ["A"], (H, W))
    assert sorted(i["type"] for i in items) == ["brushlabels"] * 2 + ["polygonlabels"] * 2 + ["rectanglelabels"] * 2
    full = ndimage.label(truth)[0]
    for item in items:
        assert (item["original_width"], item["original_height"]) == (W, H)
        m = region_to_mask(item, H, W)                          # a brush RLE of another size raises here
        k = np.bincount(full[m]).argmax()
        obj = full == k
        if item["type"] == "rectanglelabels":                  # a box is the object's bounding box
            ys, xs = np.nonzero(obj)
            obj = np.zeros_like(obj)
            obj[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
        assert k > 0 and (m & obj).sum() / (m | obj).sum() > 0.97, item["type"]


def test_all_objects_rle_in_one_pass_matches_sdk_per_object():
    """instances_to_rles (every object of an instance map at once, as /predict encodes brush regions) gives
    each object the SDK's mask2rle bytes: random odd sizes, objects touching each other and every border,
    runs wrapping from one row's right border onto the next row's left one, and ids not asked for."""
    rng = np.random.default_rng(11)
    for t in range(60):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        inst = rng.integers(0, 5, (h, w)) * (rng.random((h, w)) < rng.random())
        if t % 2:                                               # blocky objects: long runs, row wrap-arounds
            inst = np.repeat(np.repeat(inst, 4, 0), 5, 1)[:h, :w]
        asked = [1, 2, 4, 9]                                    # 3 present but not asked, 9 absent
        rles = instances_to_rles(inst.astype(np.int32), asked)
        for k in asked:
            mask = inst == k
            if not mask.any():
                assert k not in rles, f"case {t}: id {k} is absent"
                continue
            assert rles[k] == _sdk_rle(mask), f"case {t}: {h}x{w}, id {k}"
        assert 3 not in rles
    big = np.zeros((1040, 1388), np.int32)
    big[:, -3:] = 1                                             # wraps from row to row
    big[3:900, :] = 3                                           # one run of over 2**16 values
    big[500:503, 700:702] = 2                                   # tiny, inside object 3
    rles = instances_to_rles(big, [1, 2, 3])
    for k in (1, 2, 3):
        assert rles[k] == mask_to_rle(big == k)
        assert np.array_equal(_decoded(rles[k], *big.shape), big == k)


def test_brush_rle_of_a_long_run_with_a_short_remainder_matches_sdk():
    """A run of over 2**16 values whose last chunk is <= 256 values: mask2rle writes that chunk with 16 bits
    too (before, Tessera wrote it with fewer: a byte shorter, decoding alike, not mask2rle's bytes)."""
    for gap in (16384 + 1, 16384 + 64, 2 * 16384 + 3, 16384 + 65):    # pixels: 4 values each
        mask = np.zeros((300, 400), bool)
        mask.ravel()[gap] = True
        mask.ravel()[gap + 1 + 16384 + 2:gap + 16384 + 9] = True
        inst = mask.astype(np.int32)
        assert mask_to_rle(mask) == _sdk_rle(mask), gap
        assert instances_to_rles(inst, [1])[1] == _sdk_rle(mask), gap


# ------------------------------------------------------------ brush RLE read at the object's cost

def _stream(runs, word=8, sizes=(3, 4, 8, 16)):
    """An LS RLE stream of the given runs [(repeat, values)], as LS's frontend encoder (thi.ng rle-pack)
    may write it: repeats and literal runs of any length the fields allow, 1-8 zero bits at the end."""
    total = sum(len(v) for _, v in runs)
    bits = f"{total:032b}{word - 1:05b}" + "".join(f"{n - 1:04b}" for n in sizes)
    for repeat, values in runs:
        field = next(f for f, n in enumerate(sizes) if len(values) - 1 < 2 ** n)
        bits += f"{int(repeat):01b}{field:02b}{len(values) - 1:0{sizes[field]}b}"
        bits += f"{values[0]:0{word}b}" if repeat else "".join(f"{v:0{word}b}" for v in values)
    bits += "0" * (8 - len(bits) % 8)
    return [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]


def test_rle_read_matches_sdk_decode_on_any_runs():
    """rle_to_mask / rle_crop == decode_rle's alpha > 0 on streams of random repeats and literal runs (values
    that differ by channel, alphas of 1-255, runs that end mid-pixel and wrap rows), random field sizes."""
    from label_studio_sdk.converter.brush import decode_rle

    from tessera.backend.regions import rle_crop

    rng = np.random.default_rng(11)
    for t in range(200):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        sizes = tuple(sorted(int(v) for v in rng.integers(1, 17, 4)))
        left, runs = 4 * h * w, []
        while left:
            n = int(min(left, rng.integers(1, 2 ** sizes[-1] + 1), rng.integers(1, 4 * w + 9)))
            repeat = bool(rng.random() < 0.6)
            values = [int(rng.choice([0, 0, 255, rng.integers(1, 256)]))] * n if repeat else \
                [int(v) for v in rng.integers(0, 256, n) * (rng.random(n) < 0.5)]
            runs.append((repeat, values))
            left -= n
        rle = _stream(runs, sizes=sizes)
        want = decode_rle(rle).reshape(h, w, 4)[:, :, 3] > 0
        assert np.array_equal(rle_to_mask(rle, h, w), want)
        found = rle_crop(rle, h, w)
        if not want.any():
            assert found is None
            continue
        (y0, x0, y1, x1), crop = found
        rows, cols = np.flatnonzero(want.any(1)), np.flatnonzero(want.any(0))
        assert (y0, x0, y1, x1) == (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)      # tight
        assert np.array_equal(crop, want[y0:y1, x0:x1])


def test_rle_read_matches_sdk_decode_on_images_of_2048_px():
    """Objects in a large image: the zero runs before and after are hundreds of chunks of 2**16 values."""
    from label_studio_sdk.converter.brush import decode_rle

    inst = random_instances(2048, 1031, 12, seed=3, max_r=300)
    inst[:5, :] = 13                                   # a band along the top border, wrapping every row
    for k, rle in instances_to_rles(inst, list(range(1, 14))).items():
        want = decode_rle(rle).reshape(2048, 1031, 4)[:, :, 3] > 0
        assert np.array_equal(want, inst == k) and np.array_equal(rle_to_mask(rle, 2048, 1031), want)


@pytest.mark.parametrize("rle, error", [
    (_stream([(True, [255] * 36)])[:-3], "truncated"),                      # ends inside a run
    (_stream([(True, [255] * 36), (False, [1, 2, 3, 4])]), "pixels"),       # 40 values for 3 x 3 px
    ([0, 0, 0, 36, 0, 0, 0], "truncated"),
    ([0, 0, 0, 36, 300, 0, 0], "0-255"),
    ([0, 0, 0, 36, 1.5, 0, 0], "0-255"),
])
def test_broken_rle_is_a_value_error(rle, error):
    with pytest.raises(ValueError, match=error):
        rle_to_mask(rle, 3, 3)


def _full_canvas_mask(r, h, w):
    """region_to_mask as it was written before crops (stop 43): every region on a canvas of the image's size."""
    import math

    from label_studio_sdk.converter.brush import decode_rle

    v = r["value"]
    if r["type"] == "brushlabels":
        return decode_rle(v["rle"]).reshape(h, w, 4)[:, :, 3] > 0
    if r["type"] == "polygonlabels":
        pts = np.array([[p[0] * w / 100.0, p[1] * h / 100.0] for p in v["points"]], np.float64).reshape(-1, 2)
    else:
        x, y, bw, bh = v["x"] * w / 100, v["y"] * h / 100, v["width"] * w / 100, v["height"] * h / 100
        a = math.radians(v.get("rotation", 0) or 0)
        pts = np.array([[x + cx * math.cos(a) - cy * math.sin(a), y + cx * math.sin(a) + cy * math.cos(a)]
                        for cx, cy in ((0, 0), (bw, 0), (bw, bh), (0, bh))])
        if (v.get("rotation", 0) or 0) % 360 == 0:
            out = np.zeros((h, w), bool)
            out[max(0, math.ceil(y - 0.5)):min(h, math.ceil(y + bh - 0.5)),
                max(0, math.ceil(x - 0.5)):min(w, math.ceil(x + bw - 0.5))] = True
            return out
    out = np.zeros((h, w), np.uint8)
    if len(pts) >= 3:
        c = np.clip(np.rint(pts - 0.5), -1, max(h, w) + 1).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(out, [c], 1, lineType=cv2.LINE_8)
    return out.astype(bool)


def _full_canvas_maps(results, h, w, index):
    """results_to_maps as it was written before crops (stop 43), on _full_canvas_mask."""
    from tessera.backend.regions import PRECISION, DUPLICATE_IOU, _bbox, _box_iou, _crop_iou

    def _is_duplicate(kind, crop, box, kept):
        for precision, kcrop, kbox in kept:
            if precision >= PRECISION[kind] or _box_iou(box, kbox) == 0.0:
                continue
            overlap = _box_iou(box, kbox) if kind == "rectanglelabels" else _crop_iou(crop, box, kcrop, kbox)
            if overlap >= DUPLICATE_IOU:
                return True
        return False

    classes, instances = np.zeros((h, w), np.int32), np.zeros((h, w), np.int32)
    regions = sorted(results, key=lambda r: PRECISION[r["type"]])
    several = len({r["type"] for r in regions}) > 1
    kept, k = [], 0
    for r in regions:
        mask = _full_canvas_mask(r, h, w)
        if not mask.any():
            continue
        if several:
            box = _bbox(mask)
            crop = mask[box[0]:box[2], box[1]:box[3]]
            if _is_duplicate(r["type"], crop, box, kept):
                continue
            kept.append((PRECISION[r["type"]], crop, box))
        if r["type"] != "brushlabels":
            mask &= instances == 0
        k += 1
        classes[mask], instances[mask] = index[r["value"][r["type"]][0]], k
    return classes, instances


def test_maps_from_crops_equal_maps_from_whole_canvases():
    """results_to_maps on each region's crop == the same on canvases of the image's size: accepted predictions
    (brush + polygon + box of each object), hand-drawn polygons and boxes past the borders, rotated boxes,
    shapes of no area, overlaps where a polygon lies half under a brush."""
    rng = np.random.default_rng(5)
    for t in range(40):
        h, w = (int(v) for v in rng.integers(20, 160, 2))
        inst = random_instances(h, w, int(rng.integers(1, 25)), seed=t, max_r=20)
        labels = {int(k): str(rng.choice(["A", "B"])) for k in np.unique(inst) if k}
        results = []
        for control in (BRUSH, POLY, RECT)[:int(rng.integers(1, 4))]:
            results += instances_to_results(inst, labels, {}, control)
        for _ in range(int(rng.integers(0, 8))):
            x, y = rng.uniform(-20, 110, 2)
            if rng.random() < 0.5:
                pts = (np.array([x, y]) + rng.uniform(-30, 30, (int(rng.integers(1, 7)), 2))).tolist()
                results.append({"type": "polygonlabels", "to_name": "image",
                                "value": {"points": pts, "polygonlabels": ["B"]}})
            else:
                results.append({"type": "rectanglelabels", "to_name": "image", "value": {
                    "x": x, "y": y, "width": float(rng.uniform(0, 40)), "height": float(rng.uniform(0, 40)),
                    "rotation": float(rng.choice([0, 0, 30, 90, 200, 360])), "rectanglelabels": ["A"]}})
        rng.shuffle(results)
        got = results_to_maps(results, "image", h, w, {"A": 1, "B": 2})
        want = _full_canvas_maps(results, h, w, {"A": 1, "B": 2})
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        for r in results:
            assert np.array_equal(region_to_mask(r, h, w), _full_canvas_mask(r, h, w))


ELLIPSE = Control("ellipselabels", "ellipse", "image", ("A", "B"))


@pytest.mark.parametrize("cx, cy, a, b, angle", [(100, 80, 40, 15, 30), (250, 200, 60, 25, 130), (60, 150, 8, 3, 100),
                                                 (200, 150, 20, 20, 0), (300, 100, 30, 10, 90)])
def test_an_object_comes_back_as_its_ellipse(cx, cy, a, b, angle):
    """EllipseLabels: the ellipse of the object's area and second moments, turned as Label Studio turns it."""
    truth = np.zeros((300, 400), np.uint8)
    cv2.ellipse(truth, (cx, cy), (a, b), angle, 0, 360, 1, -1)
    (r,) = instances_to_results(truth.astype(np.int32), {1: "A"}, {1: 0.9}, ELLIPSE)
    assert r["type"] == "ellipselabels" and r["value"]["ellipselabels"] == ["A"]
    back = region_to_mask(r, 300, 400)
    assert (back & (truth > 0)).sum() / (back | (truth > 0)).sum() > 0.97
    assert abs(r["value"]["radiusX"] * 4 - a) < 1.5 and abs(r["value"]["radiusY"] * 3 - b) < 1.5   # px: % of 400, 300
    if a != b:
        assert min(abs(r["value"]["rotation"] - angle % 180), 180 - abs(r["value"]["rotation"] - angle % 180)) < 2


def test_an_ellipse_turns_clockwise_on_screen_like_a_rectangle():
    """Label Studio's editor (Konva) turns an ellipse about its centre by `rotation` degrees clockwise on screen,
    the turn a rectangle's `rotation` makes about its corner: at 90 degrees the long axis is vertical."""
    value = {"x": 50, "y": 50, "radiusX": 20, "radiusY": 5, "ellipselabels": ["A"]}
    flat = region_to_mask({"type": "ellipselabels", "value": value}, 100, 100)
    tall = region_to_mask({"type": "ellipselabels", "value": {**value, "rotation": 90}}, 100, 100)
    assert flat[50, 30] and not flat[30, 50] and tall[30, 50] and not tall[50, 30]
    slanted = region_to_mask({"type": "ellipselabels", "value": {**value, "rotation": 45}}, 100, 100)
    assert slanted[62, 62] and not slanted[38, 62]             # down-right on screen: y grows downwards
    box = region_to_mask({"type": "rectanglelabels", "value": {"x": 50, "y": 50, "width": 20, "height": 2,
                                                              "rotation": 45, "rectanglelabels": ["A"]}}, 100, 100)
    assert box[58, 58] and not box[42, 58]


@pytest.mark.parametrize("value, error", [({"x": 1, "y": 2, "radiusX": "a", "radiusY": 3}, "radiusX"),
                                          ({"x": 1, "y": 2, "radiusX": 1, "radiusY": float("nan")}, "radiusY")])
def test_a_broken_ellipse_is_a_value_error(value, error):
    with pytest.raises(ValueError, match=error):
        region_to_mask({"type": "ellipselabels", "value": value}, 10, 10)


def test_an_ellipse_of_no_pixel_is_no_region():
    assert not region_to_mask({"type": "ellipselabels", "value": {"x": 50, "y": 50, "radiusX": 0, "radiusY": 5,
                                                                  "ellipselabels": ["A"]}}, 10, 10).any()
