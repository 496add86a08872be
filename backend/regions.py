"""Label Studio region JSON <-> label maps: the only code that knows percentages, RLE and from/to names.

Coordinates: LS puts regions in percent of the original image, with (0, 0) the top-left corner of the
top-left pixel. A pixel (row i, col j) is inside a polygon or box when its centre (j + 0.5, i + 0.5) is.
Brush masks use LS's RLE (label_studio_sdk.converter.brush), RGBA, alpha = painted; bitmask masks a PNG data
URL of the image's size, alpha = painted (backend/bitmask.py).
"""
from __future__ import annotations

import math
from typing import Iterable

import cv2
import numpy as np

from tessera.backend import bitmask
from tessera.backend.label_config import PIXEL_CONTROLS, POINT_CONTROLS, TOOL_CONTROLS, Control
from tessera.model.postprocess import object_slices



# ----------------------------------------------------------------------------------------- brush masks

def mask_to_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool -> LS brush RLE (byte for byte what label_studio_sdk's mask2rle makes)."""
    mask = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return crop_to_rle(mask[:0, :0], 0, 0, *mask.shape)
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return crop_to_rle(mask[y0:y1, x0:x1], int(y0), int(x0), *mask.shape)


# LS's brush RLE (thi.ng rle-pack): a 32-bit value count, 5 bits word size - 1, four 4-bit run-length
# field sizes - 1, then per run: 1 bit "repeat", 2 bits field index, the run length - 1, the 8-bit value.
# label_studio_sdk.converter.brush.mask2rle builds this as a Python string of '0'/'1' over the whole
# image (4 values per pixel), ~1.5 ms per region at 520x696 whatever the object's size. Hand-written
# here because no library encodes it from a crop: the runs come from the object's bounding box, the
# zero runs before and after it are arithmetic, and the bit packing is vectorised.
_RLE_SIZES = (3, 4, 8, 16)
_RLE_HEADER = (8 - 1) << 16 | sum((n - 1) << (4 * (3 - i)) for i, n in enumerate(_RLE_SIZES))  # 21 bits
_MAX_RUN = 2 ** 16


def crop_to_rle(crop: np.ndarray, y0: int, x0: int, height: int, width: int) -> list[int]:
    """An object's (h, w) bool crop placed at (y0, x0) in an (height, width) image -> LS brush RLE.

    Costs O(crop area + runs), not O(image area)."""
    h, w = crop.shape
    assert 0 <= y0 and y0 + h <= height and 0 <= x0 and x0 + w <= width, \
        f"crop {crop.shape} at ({y0}, {x0}) does not fit in {height}x{width}"
    # (h, w) -> (h, w + 2) with False on both sides, so runs never cross rows; flat transitions
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = crop
    edges = np.diff(padded, axis=1)                           # (h, w + 1): +1 run start, -1 run end
    r_on, c_on = np.nonzero(edges == 1)
    r_off, c_off = np.nonzero(edges == -1)                    # row-major: starts and ends pair up in order
    starts = (r_on + y0).astype(np.int64) * width + x0 + c_on  # flat pixel index of each run's start
    ends = (r_off + y0).astype(np.int64) * width + x0 + c_off  # exclusive end
    if starts.size:
        # an object touching the right border continues on the next row's left border: merge those runs
        keep = np.ones(starts.size, bool)
        keep[1:] = starts[1:] != ends[:-1]
        starts, ends = starts[keep], ends[np.append(keep[1:], True)]
    # alternating runs: zeros before the first, ones, zeros between, ..., zeros after the last
    bounds = np.concatenate(([0], np.column_stack((starts, ends)).ravel(), [height * width]))
    lengths = np.diff(bounds) * 4                             # 4 values (RGBA) per pixel
    values = np.zeros(lengths.size, np.int64)
    values[1::2] = 255
    nonempty = lengths > 0
    return _pack_runs(lengths[nonempty], values[nonempty], 4 * height * width)


def _pack_runs(lengths: np.ndarray, values: np.ndarray, total: int) -> list[int]:
    """Runs (length >= 4 each) -> the RLE bytes, every run a repeat; runs over 2**16 are split."""
    n_chunks = -(-lengths // _MAX_RUN)                        # ceil
    idx = np.repeat(np.arange(lengths.size), n_chunks)
    first = np.cumsum(n_chunks) - n_chunks
    pos = np.arange(idx.size) - first[idx]                    # chunk number within its run
    chunk = np.minimum(lengths[idx] - pos * _MAX_RUN, _MAX_RUN)
    # run <= 8, 16, 256, else 16 bits; mask2rle writes every chunk of a run over 256 with 16 bits, its last one
    # too (a run of 2**16 + 4 values: 16-bit chunks of 2**16 and 4), so the field follows the run, not the chunk
    field = np.searchsorted(np.array([8, 16, 256]), lengths[idx], side="left")
    nbits = np.array(_RLE_SIZES)[field]
    # one code per chunk: 1 | field (2 bits) | length - 1 (nbits) | value (8 bits)
    codes = (((4 | field) << nbits | (chunk - 1)) << 8) | values[idx]
    widths = 3 + nbits + 8
    codes = np.concatenate(([total, _RLE_HEADER], codes)).astype(np.uint64)
    widths = np.concatenate(([32, 21], widths))
    # left-align each code in 64 bits, unpack them big-endian, keep each code's first `width` bits
    aligned = (codes << (64 - widths).astype(np.uint64)).astype(">u8")
    bits = np.unpackbits(aligned.view(np.uint8).reshape(-1, 8), axis=1)   # (N, 8 bytes) -> (N, 64)
    bits = bits[np.arange(64) < widths[:, None]]
    out = np.packbits(bits).tolist()
    if bits.size % 8 == 0:
        out.append(0)                                         # mask2rle always appends 1-8 zero bits
    return out


def instances_to_rles(instances: np.ndarray, ids: list[int]) -> dict[int, list[int]]:
    """Every listed object of an (H, W) instance map -> its LS brush RLE (what crop_to_rle gives for its
    crop), all objects in one vectorised pass: O(H * W + runs) for the lot instead of a Python-level
    crop_to_rle per object (~0.3 ms each, 14 ms for 50 objects at 520x696). Ids absent from the map get none."""
    height, width = instances.shape
    flat = np.ascontiguousarray(instances).ravel()
    # LS's RLE runs over the flattened image: an object's runs are the maximal segments of its id in
    # row-major order (a run may wrap from a row's right border onto the next row's left one)
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    ends = np.append(starts[1:], flat.size)
    owner = flat[starts].astype(np.int64)
    wanted = np.flatnonzero(np.isin(owner, np.asarray(ids, np.int64)))
    order = wanted[np.argsort(owner[wanted], kind="stable")]      # by object, row-major within it
    owner, starts, ends = owner[order], starts[order].astype(np.int64), ends[order].astype(np.int64)
    if not owner.size:
        return {}
    total = height * width
    first = np.ones(owner.size, bool)
    first[1:] = owner[1:] != owner[:-1]
    last = np.append(first[1:], True)
    gap_after = np.where(last, total, np.append(starts[1:], 0)) - ends
    # per object: zeros before its first run, then (ones, zeros after) per run
    lengths = np.column_stack((ends - starts, gap_after)).ravel()
    values = np.tile(np.array([255, 0], np.int64), owner.size)
    owners = np.repeat(owner, 2)
    at = 2 * np.flatnonzero(first)
    lengths = np.insert(lengths, at, starts[first])
    values = np.insert(values, at, 0)
    owners = np.insert(owners, at, owner[first])
    keep = lengths > 0
    return _pack_many(lengths[keep] * 4, values[keep], owners[keep], 4 * total)


def _pack_many(lengths: np.ndarray, values: np.ndarray, owners: np.ndarray, total: int) -> dict[int, list[int]]:
    """_pack_runs for the runs of many objects at once (owners: each run's object, grouped): {id: RLE}."""
    n_chunks = -(-lengths // _MAX_RUN)
    idx = np.repeat(np.arange(lengths.size), n_chunks)
    first = np.cumsum(n_chunks) - n_chunks
    pos = np.arange(idx.size) - first[idx]
    chunk = np.minimum(lengths[idx] - pos * _MAX_RUN, _MAX_RUN)
    field = np.searchsorted(np.array([8, 16, 256]), lengths[idx], side="left")   # by the run, as _pack_runs
    nbits = np.array(_RLE_SIZES)[field]
    codes = (((4 | field) << nbits | (chunk - 1)) << 8) | values[idx]
    widths = 3 + nbits + 8
    chunk_owner = owners[idx]
    # each object's stream opens with the value count and the header
    starts = np.flatnonzero(np.append(True, chunk_owner[1:] != chunk_owner[:-1]))
    objects = chunk_owner[starts]
    at = np.repeat(starts, 2)
    codes = np.insert(codes, at, np.tile([total, _RLE_HEADER], starts.size)).astype(np.uint64)
    widths = np.insert(widths, at, np.tile([32, 21], starts.size))
    code_owner = np.searchsorted(objects, np.insert(chunk_owner, at, np.repeat(objects, 2)))   # object index
    # every object's bits end on a byte boundary after 1-8 zero bits, as mask2rle's do
    n_bits = np.bincount(code_owner, weights=widths, minlength=objects.size).astype(np.int64)
    pad = 8 - n_bits % 8
    # each code's first bit in the concatenated streams; the codes are written into big-endian 32-bit words
    # (a code of at most 32 bits spans one word or two): a code's share of a word has bits no other code
    # has, so a word is the sum of its shares, exact in float64 (bincount). Stop 23: this replaced one bit
    # per array element (np.unpackbits over 64 bits a code, then a scatter of every bit): 3x less CPU.
    bitpos = np.cumsum(widths) - widths + (np.cumsum(pad) - pad)[code_owner]
    end = (bitpos & 31) + widths                              # <= 63
    shifted = codes << (64 - end).astype(np.uint64)           # the code at its place in a 64-bit window
    word = bitpos >> 5
    n_bytes = (n_bits + pad) // 8
    n_words = -(-int(n_bytes.sum()) // 4)
    words = np.bincount(np.concatenate((word, word + 1)),
                        weights=np.concatenate((shifted >> np.uint64(32), shifted & np.uint64(0xFFFFFFFF))),
                        minlength=n_words + 1)[:n_words]
    packed = words.astype(">u4").view(np.uint8).tolist()
    cuts = np.cumsum(n_bytes).tolist()
    return {int(k): packed[a:b] for k, a, b in zip(objects.tolist(), [0] + cuts[:-1], cuts)}


def rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """LS brush RLE -> (H, W) bool; raises ValueError when the RLE does not fit the image size."""
    mask = np.zeros(height * width, bool)
    for a, b in zip(*rle_runs(rle, height, width)):
        mask[a:b] = True
    return mask.reshape(height, width)


def rle_runs(rle: list[int], height: int, width: int) -> tuple[list[int], list[int]]:
    """LS brush RLE -> the painted pixels (alpha > 0) as runs [start, end) of flat row-major pixel indices, in
    order; ValueError when the RLE does not fit the image size or is truncated or corrupt.

    Decodes what label_studio_sdk.converter.brush.decode_rle does (the round trip is tested against it).
    Hand-written because decode_rle reads the stream one bit at a time in Python and writes all 4 x H x W
    values: 12 ms a brush at 2048 x 2048 px whatever the object's size, 2 s for a task of 168 accepted
    brushes. Here a repeated run costs one step (a literal run one per value) and the image's size nothing."""
    _check_rle(rle)
    data = bytes(rle) + bytes(8)                      # 8 spare bytes: a read never runs off the end
    n_bits, pos = 8 * len(rle), 0

    def read(k: int) -> int:                          # the next k <= 32 bits, big-endian
        nonlocal pos
        if pos + k > n_bits:
            raise ValueError("brush RLE is truncated or corrupt (it ends inside a run)")
        at = pos >> 3
        value = (int.from_bytes(data[at:at + 8], "big") >> (64 - (pos & 7) - k)) & ((1 << k) - 1)
        pos += k
        return value

    # the first 32 bits give the value count (4 per pixel: RGBA), then word size - 1 and 4 run-field sizes - 1
    num = read(32)
    if num != height * width * 4:
        raise ValueError(f"brush RLE holds {num // 4} pixels, the image has {width}x{height}={height * width}")
    word, sizes = read(5) + 1, [read(4) + 1 for _ in range(4)]
    starts, ends = [], []
    i, word_mask = 0, (1 << word) - 1
    while i < num:
        # a run's head (1 bit repeat, 2 bits field, <= 16 bits length - 1, a <= 32-bit value) from one 64-bit
        # window (>= 57 bits past pos): a zero run of a whole image is hundreds of chunks of 2**16 values
        at, skip = pos >> 3, pos & 7
        window = int.from_bytes(data[at:at + 8], "big")      # pos is its bit 63 - skip
        repeat, size = window >> 63 - skip & 1, sizes[window >> 61 - skip & 3]
        j = i + 1 + (window >> 61 - skip - size & (1 << size) - 1)
        if pos + 3 + size + (word if repeat else 0) > n_bits:
            raise ValueError("brush RLE is truncated or corrupt (it ends inside a run)")
        pos += 3 + size
        if repeat:                                    # values i..j-1 all one value (cut at the end, as decode_rle)
            value, j = window >> 61 - skip - size - word & word_mask, min(j, num)
            pos += word
            if value > 255:
                raise ValueError(f"brush RLE value {value} is not a byte")
            if value and j // 4 > i // 4:             # the alphas (value 4p + 3) of pixels i // 4 .. j // 4 - 1
                starts.append(i // 4), ends.append(j // 4)
        else:                                         # j - i values given one by one
            if j > num:
                raise ValueError("brush RLE is truncated or corrupt (a run past the image's end)")
            for t in range(i, j):
                value = read(word)
                if value > 255:
                    raise ValueError(f"brush RLE value {value} is not a byte")
                if value and t % 4 == 3:
                    starts.append(t // 4), ends.append(t // 4 + 1)
        i = j
    return starts, ends


def rle_crop(rle: list[int], height: int, width: int) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """LS brush RLE -> ((y0, x0, y1, x1), the painted pixels' (y1 - y0, x1 - x0) bool crop), the box tight
    (end-exclusive); None when nothing is painted. O(runs + the crop's area), not the image's."""
    starts, ends = rle_runs(rle, height, width)
    if not starts:
        return None
    a, b = np.array(starts, np.int64), np.array(ends, np.int64)
    # a run may wrap over rows: one segment per row it touches, [c0, c1) within that row
    r0, r1 = a // width, (b - 1) // width
    n = r1 - r0 + 1
    run = np.repeat(np.arange(a.size), n)
    row = r0[run] + np.arange(run.size) - np.repeat(np.cumsum(n) - n, n)
    c0 = np.where(row == r0[run], a[run] - row * width, 0)
    c1 = np.where(row == r1[run], b[run] - row * width, width)
    y0, y1, x0, x1 = int(row.min()), int(row.max()) + 1, int(c0.min()), int(c1.max())
    # +1 where a segment starts, -1 where it ends, summed along each row
    edges = np.zeros((y1 - y0, x1 - x0 + 1), np.int32)
    np.add.at(edges, (row - y0, c0 - x0), 1)
    np.add.at(edges, (row - y0, c1 - x0), -1)
    crop = np.cumsum(edges, axis=1)[:, :-1] > 0
    return (y0, x0, y1, x1), crop


# -------------------------------------------------------------------------------------------- polygons

def mask_to_polygons(mask: np.ndarray, epsilon: float = 0.7, min_area: float = 0.0) -> list[np.ndarray]:
    """(H, W) bool -> outer contours as float arrays (N, 2) of pixel-edge (x, y) coordinates, largest first.

    Contours come from OpenCV (pixel centres), simplified with Douglas-Peucker at `epsilon` px
    (0 = exact), and shifted by half a pixel to LS's continuous coordinates. Objects too thin to
    make a polygon (a pixel, a straight line) get their bounding rectangle inset by 0.1 px, which has
    an area in LS and rasterizes back to exactly those pixels.
    """
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return _polygons(contours, epsilon, min_area)


def _polygons(contours, epsilon: float, min_area: float) -> list[np.ndarray]:
    """mask_to_polygons of the mask whose contours these are."""
    polygons = []
    for c in contours:
        area = cv2.contourArea(c)
        c, pts = _contour_points(c, epsilon)
        if area >= min_area:
            polygons.append(((area, len(c)), pts))
    polygons.sort(key=lambda p: p[0], reverse=True)
    return [p for _, p in polygons]


def _contour_points(c: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """An OpenCV contour (N, 1, 2) -> (the contour simplified, its polygon in pixel-edge coordinates)."""
    if epsilon > 0 and len(c) > 8:
        c = cv2.approxPolyDP(c, epsilon, True)
    pts = c.reshape(-1, 2).astype(np.float64)          # (N, 1, 2) -> (N, 2) pixel centres
    if len(pts) < 3:
        x0, y0 = pts.min(axis=0) + 0.1
        x1, y1 = pts.max(axis=0) + 0.9
        pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
    else:
        pts = pts + 0.5
    return c, pts


def polygon_to_mask(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, 2) pixel-edge (x, y) vertices -> (H, W) bool mask.

    Vertices are moved to the nearest pixel centre and filled boundary-inclusive (OpenCV), so the
    polygons `mask_to_polygons` makes come back exactly; a hand-drawn polygon comes back within a pixel.
    """
    return _paste(polygon_crop(points, height, width), height, width)


def polygon_crop(points: np.ndarray, height: int, width: int) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """polygon_to_mask as ((y0, x0, y1, x1), crop) over the vertices' bounding box within the image (not
    tight); None when that is empty. Filled on the crop alone: the same pixels, at the object's cost."""
    if len(points) < 3:
        return None
    centres = np.rint(np.asarray(points, dtype=np.float64) - 0.5)
    centres = np.clip(centres, -1, max(height, width) + 1).astype(np.int32).reshape(-1, 2)
    (x0, y0), (x1, y1) = np.maximum(centres.min(0), 0), np.minimum(centres.max(0) + 1, (width, height))
    if x1 <= x0 or y1 <= y0:
        return None
    crop = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    cv2.fillPoly(crop, [(centres - (x0, y0)).reshape(-1, 1, 2)], 1, lineType=cv2.LINE_8)  # (N, 2) -> (N, 1, 2)
    return (int(y0), int(x0), int(y1), int(x1)), crop.astype(bool)


def _paste(found: tuple[tuple[int, int, int, int], np.ndarray] | None, height: int, width: int) -> np.ndarray:
    """A crop (region_crop's form) in an (H, W) bool mask."""
    out = np.zeros((height, width), dtype=bool)
    if found is not None:
        (y0, x0, y1, x1), crop = found
        out[y0:y1, x0:x1] = crop
    return out


# ----------------------------------------------------------------------------------------------- boxes

def box_to_mask(x: float, y: float, w: float, h: float, height: int, width: int,
                rotation: float = 0.0) -> np.ndarray:
    """A box in pixel-edge coordinates (rotated by `rotation` degrees about its top-left corner, as LS
    does) -> (H, W) bool of the pixels whose centres are inside."""
    return _paste(box_crop(x, y, w, h, height, width, rotation), height, width)


def box_crop(x: float, y: float, w: float, h: float, height: int, width: int, rotation: float = 0.0
             ) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """box_to_mask as ((y0, x0, y1, x1), crop); None when no pixel centre is inside."""
    if rotation % 360 == 0:
        c0, c1 = max(0, math.ceil(x - 0.5)), min(width, math.ceil(x + w - 0.5))
        r0, r1 = max(0, math.ceil(y - 0.5)), min(height, math.ceil(y + h - 0.5))
        return ((r0, c0, r1, c1), np.ones((r1 - r0, c1 - c0), bool)) if r1 > r0 and c1 > c0 else None
    a = math.radians(rotation)
    ca, sa = math.cos(a), math.sin(a)
    corners = [(0, 0), (w, 0), (w, h), (0, h)]
    return polygon_crop(np.array([[x + cx * ca - cy * sa, y + cx * sa + cy * ca] for cx, cy in corners]),
                        height, width)


def ellipse_crop(cx: float, cy: float, rx: float, ry: float, height: int, width: int, rotation: float = 0.0
                 ) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """An ellipse, centre (cx, cy) and semi-axes rx along its own x, ry along its own y in px, turned `rotation`
    degrees about its centre (clockwise on screen, as Label Studio's editor draws it: Konva's rotation, the same
    turn as a rectangle's) -> ((y0, x0, y1, x1), crop) of the pixels whose centres are inside; None when none."""
    if not (rx > 1e-3 and ry > 1e-3):              # thinner than a thousandth of a pixel: no pixel centre in it
        return None
    a = math.radians(rotation)
    ca, sa = math.cos(a), math.sin(a)
    ex, ey = math.hypot(rx * ca, ry * sa), math.hypot(rx * sa, ry * ca)      # the turned ellipse's half extents
    c0, c1 = max(0, math.floor(cx - ex)), min(width, math.ceil(cx + ex))
    r0, r1 = max(0, math.floor(cy - ey)), min(height, math.ceil(cy + ey))
    if r1 <= r0 or c1 <= c0:
        return None
    dx, dy = np.arange(c0, c1)[None, :] + 0.5 - cx, np.arange(r0, r1)[:, None] + 0.5 - cy
    crop = ((dx * ca + dy * sa) / rx) ** 2 + ((dy * ca - dx * sa) / ry) ** 2 <= 1.0
    return ((r0, c0, r1, c1), crop) if crop.any() else None


def _ellipse_value(crop: np.ndarray, y0: int, x0: int) -> tuple[float, float, float, float, float]:
    """The ellipse of an object's pixels with their area and second moments (centre, semi-axes, rotation in
    degrees, [0, 180)): exact for an ellipse, the usual summary of a cell's or nucleus' outline (skimage's
    regionprops), and a pass over the object's pixels only."""
    ys, xs = np.nonzero(crop)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    sxx, syy, sxy = (dx * dx).mean() + 1 / 12, (dy * dy).mean() + 1 / 12, (dx * dy).mean()   # + a pixel's own
    half, gap = (sxx + syy) / 2, math.hypot((sxx - syy) / 2, sxy)
    theta = 0.5 * math.atan2(2 * sxy, sxx - syy)                      # the major axis, from x towards y
    return (float(x0 + cx), float(y0 + cy), 2 * math.sqrt(half + gap), 2 * math.sqrt(max(half - gap, 1 / 12)),
            math.degrees(theta) % 180)


# ------------------------------------------------------------------------------------ LS result JSON

def inner_point(crop: np.ndarray) -> tuple[float, float]:
    """(x, y) of an object's point (px edges, within its crop): its centroid where that lies on the object, else
    the centre of its pixel nearest the centroid (a crescent's centroid is outside it)."""
    ys, xs = np.nonzero(crop)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    if crop[int(cy), int(cx)]:
        return float(cx), float(cy)
    i = int(np.argmin((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2))
    return float(xs[i] + 0.5), float(ys[i] + 0.5)


def _point_value(x: float, y: float, width: int, height: int, label: str) -> dict:
    """A keypoint at (x, y) px; its `width`, the size the editor draws it at (percent of the image's width, as
    the KeyPoint tool stores its strokeWidth), 3 px of the image but at least 0.3% of it."""
    return {"x": _pct(x, width), "y": _pct(y, height), "width": _pct(max(3.0, 0.003 * width), width),
            "keypointlabels": [label]}


def _pct(value: float, size: int) -> float:
    return round(value / size * 100.0, 4)


def _region(control: Control, kind_value: dict, width: int, height: int, score: float, rid: str) -> dict:
    return {
        "id": rid,
        "from_name": control.from_name,
        "to_name": control.to_name,
        "type": control.type,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "score": round(float(score), 4),
        "value": kind_value,
    }


def instances_to_results(instances: np.ndarray, labels: dict[int, str], scores: dict[int, float],
                         control: Control, id_prefix: str = "", polygon_epsilon: float = 0.7,
                         slices: dict[int, tuple[slice, slice]] | None = None) -> list[dict]:
    """An instance map -> one LS region per instance for one control (as_stored: two results of one id for a
    tool with a separate <Labels>).

    `labels` maps instance id -> the control's label value (instances not in it are skipped, e.g. a
    class this control does not have); `scores` maps instance id -> confidence. `slices`: the objects'
    bounding boxes (object_slices of this map for at least these ids), when the caller already has them.
    """
    return as_stored(control, _instances_to_results(instances, labels, scores, control, id_prefix, polygon_epsilon,
                                                    slices))


def _instances_to_results(instances: np.ndarray, labels: dict[int, str], scores: dict[int, float],
                          control: Control, id_prefix: str, polygon_epsilon: float,
                          slices: dict[int, tuple[slice, slice]] | None) -> list[dict]:
    height, width = instances.shape
    results = []
    ids = sorted(int(i) for i in labels if int(i) > 0)
    if not ids:
        return results
    if control.type == "brushlabels":                   # every mask in one vectorised pass
        rles = instances_to_rles(instances, ids)
        return [_region(control, {"format": "rle", "rle": rles[k], "brushlabels": [labels[k]]}, width, height,
                        scores.get(k, 0.0), f"{id_prefix}{control.from_name}-{k}") for k in ids if k in rles]
    # one pass for all bounding boxes: (H, W) -> per-id slices; ids absent from the map get none
    slices = object_slices(instances, ids) if slices is None else slices
    if control.type == "polygonlabels":
        return _polygon_results(instances, ids, labels, scores, control, id_prefix, polygon_epsilon, slices)
    if control.type == "bitmasklabels":                 # a PNG of the image's size, made at the object's cost
        return [_region(control, {"imageDataURL": bitmask.data_url(instances[sl] == k, (sl[0].start, sl[1].start),
                                                                   height, width), "bitmasklabels": [labels[k]]},
                        width, height, scores.get(k, 0.0), f"{id_prefix}{control.from_name}-{k}")
                for k in ids if (sl := slices.get(k)) is not None]
    for k in ids:
        sl = slices.get(k)
        if sl is None:
            continue
        label = labels[k]
        rid = f"{id_prefix}{control.from_name}-{k}"
        oy, ox = sl[0].start, sl[1].start
        if control.type == "rectanglelabels":          # the slice is the object's tight bounding box
            bw, bh = sl[1].stop - ox, sl[0].stop - oy
            value = {"x": _pct(ox, width), "y": _pct(oy, height), "width": _pct(bw, width),
                     "height": _pct(bh, height), "rotation": 0, "rectanglelabels": [label]}
        elif control.type == "ellipselabels":
            cx, cy, rx, ry, rotation = _ellipse_value(instances[sl] == k, oy, ox)
            value = {"x": _pct(cx, width), "y": _pct(cy, height), "radiusX": _pct(rx, width),
                     "radiusY": _pct(ry, height), "rotation": round(rotation, 2), "ellipselabels": [label]}
        elif control.type == "keypointlabels":
            cx, cy = inner_point(instances[sl] == k)
            value = _point_value(ox + cx, oy + cy, width, height, label)
        else:
            raise ValueError(f"unsupported control type {control.type}")
        results.append(_region(control, value, width, height, scores.get(k, 0.0), rid))
    return results


def _polygon_results(instances: np.ndarray, ids: list[int], labels: dict[int, str], scores: dict[int, float],
                     control: Control, id_prefix: str, epsilon: float, slices: dict) -> list[dict]:
    """instances_to_results for a polygon control: each object's largest polygon (mask_to_polygons of its
    mask crop), found for all objects by one findContours over a canvas of their crops.

    A call per crop cost ~24 us of OpenCV's own overhead, more than the tracing (stop 23). The crops sit on
    shelves one zero pixel apart (8-connected parts of two crops never touch), and OpenCV traces each part
    from its first pixel in raster order with its own pixels only: every crop gets the contours, in the order,
    that a call on the crop alone gives (tests/test_encode_identical.py)."""
    height, width = instances.shape
    cells = [(k, slices[k]) for k in ids if k in slices]
    if not cells:
        return []
    cap = max(512, max(sl[1].stop - sl[1].start for _, sl in cells))
    x = y = shelf = 0
    at = []                                              # each crop's (row, column) on the canvas
    for _, (rows, cols) in cells:
        h, w = rows.stop - rows.start, cols.stop - cols.start
        if x and x + w > cap:
            x, y, shelf = 0, y + shelf + 1, 0
        at.append((y, x))
        x, shelf = x + w + 1, max(shelf, h)
    canvas = np.zeros((y + shelf, cap), np.uint8)
    for (k, sl), (cy, cx) in zip(cells, at):
        np.equal(instances[sl], k, out=canvas[cy:cy + sl[0].stop - sl[0].start,
                                              cx:cx + sl[1].stop - sl[1].start].view(bool))
    contours, _ = cv2.findContours(canvas, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    # the crop of each contour: the last crop placed at or before its first point (shelf row, then column)
    keys = np.array([cy * (cap + 1) + cx for cy, cx in at])
    shelf_rows = np.unique(keys // (cap + 1))
    first = np.array([c[0, 0] for c in contours], np.int64).reshape(-1, 2)     # (x, y) of each contour
    row = shelf_rows[np.searchsorted(shelf_rows, first[:, 1], side="right") - 1]
    owner = np.searchsorted(keys, row * (cap + 1) + first[:, 0], side="right") - 1
    parts: dict[int, list] = {}
    for c, i in zip(contours, owner.tolist()):
        parts.setdefault(i, []).append(c)
    found = []                                           # (id, polygon, where its (0, 0) is in the image)
    for i, cs in sorted(parts.items()):
        k, sl = cells[i]
        (cy, cx), oy, ox = at[i], sl[0].start, sl[1].start
        if len(cs) == 1:
            # approxPolyDP of integer points works on their differences: the same points at the canvas as at
            # the crop; and (x + 0.5) + (ox - cx) is exact in float64: the value (crop x + 0.5) + ox had
            if epsilon > 0 and len(cs[0]) > 8:
                cs = [cv2.approxPolyDP(cs[0], epsilon, True)]
            if len(cs[0]) >= 3:
                found.append((k, cs[0].reshape(-1, 2).astype(np.float64) + 0.5, ox - cx, oy - cy))
                continue
        shift = np.array((cx, cy), np.int32)
        cs = [c - shift for c in cs]                     # at the crop, as a call on the crop finds them
        polygon = _contour_points(cs[0], epsilon)[1] if len(cs) == 1 else _polygons(cs, epsilon, 0.0)[0]
        found.append((k, polygon, ox, oy))
    # percent of the image, rounded to 4 decimals as _pct does, in one numpy pass for all polygons (the same
    # elementwise operations as per polygon, the same floats): Python's round() on numpy scalars was three
    # quarters of the polygon time (~0.3 ms a region at 520x696), an np.round and tolist per polygon a tenth
    sizes = [len(pts) for _, pts, _, _ in found]
    origin = np.repeat(np.array([(ox, oy) for _, _, ox, oy in found], np.float64), sizes, axis=0)
    pts = np.round((np.concatenate([pts for _, pts, _, _ in found]) + origin) * (100.0 / width, 100.0 / height),
                   4).tolist()
    cuts = np.cumsum(sizes).tolist()
    return [_region(control, {"points": pts[a:b], "closed": True, "polygonlabels": [labels[k]]}, width, height,
                    scores.get(k, 0.0), f"{id_prefix}{control.from_name}-{k}")
            for (k, _, _, _), a, b in zip(found, [0] + cuts[:-1], cuts)]


def boxes_to_results(boxes: dict[int, tuple[float, float, float, float]], labels: dict[int, str],
                     scores: dict[int, float], control: Control, height: int, width: int,
                     id_prefix: str = "") -> list[dict]:
    """Boxes (id -> (x0, y0, x1, y1) in pixel edges, e.g. a box model's) -> one LS rectangle per box (a keypoint
    at its centre for a KeyPointLabels control). Unlike instances_to_results, boxes may overlap."""
    results = []
    for k in sorted(boxes):
        if k not in labels:
            continue
        x0, y0, x1, y1 = (float(v) for v in boxes[k])
        if x1 <= x0 or y1 <= y0:
            continue
        if control.type == "keypointlabels":       # a counting project: the box model's object centres
            value = _point_value((x0 + x1) / 2, (y0 + y1) / 2, width, height, labels[k])
        else:
            value = {"x": _pct(x0, width), "y": _pct(y0, height), "width": _pct(x1 - x0, width),
                     "height": _pct(y1 - y0, height), "rotation": 0, "rectanglelabels": [labels[k]]}
        rid = f"{id_prefix}{control.from_name}-{k}"
        results.append(_region(control, value, width, height, scores.get(k, 0.0), rid))
    return as_stored(control, results)


def as_stored(control: Control, results: list[dict]) -> list[dict]:
    """Regions written for `control` (each one result of its *labels type) as Label Studio stores them: as they
    are for a *Labels control; for a drawing tool with a separate <Labels> (Control.labels_from), each region as
    the editor serializes one (Result.serialize, 1.23.2): two results of one id, the tool's shape (type
    "rectangle", from the tool) and its labels (type "labels", from the <Labels>, its value the shape again with
    `labels`). Label Studio joins results of one id into one region."""
    if not control.labels_from:
        return results
    tool = next(t for t, kind in TOOL_CONTROLS.items() if kind == control.type)
    out = []
    for r in results:
        shape = {k: v for k, v in r["value"].items() if k != control.type}
        out.append({**r, "type": tool, "value": shape})
        out.append({**r, "from_name": control.labels_from, "type": "labels",
                    "value": {**shape, "labels": r["value"][control.type]}})
    return out


# a tool's shape and the <Labels> result of the same id read as one region of this type (labelled); a keypoint
# is read as a hint, never written
_LABELLED = {**TOOL_CONTROLS, "keypoint": "keypointlabels"}


def labelled(results: Iterable) -> list:
    """Results as Tessera reads them: each region of a drawing tool with a separate <Labels> (two results of one
    id: the shape, type "rectangle" from the tool, and its labels, type "labels") as one result of its *labels
    type ("rectanglelabels", named by the tool, the labels under its own key), as a *Labels control's region is.
    Other results as they are; a "labels" result that no shape of its id pairs with is dropped (nothing to draw
    for Tessera's region types), a shape without labels kept as it is (a hint, or unlabelled: read as nothing)."""
    results = results if isinstance(results, list) else list(results)
    if not any(isinstance(r, dict) and r.get("type") == "labels" for r in results):
        return results
    labels = {}
    for r in results:
        if isinstance(r, dict) and r.get("type") == "labels" and isinstance(r.get("value"), dict):
            labels.setdefault((str(r.get("id")), r.get("to_name")), r["value"].get("labels"))
    out = []
    for r in results:
        if not isinstance(r, dict):
            out.append(r)
            continue
        kind = _LABELLED.get(r.get("type"))
        found = labels.get((str(r.get("id")), r.get("to_name"))) if kind else None
        if kind and isinstance(found, list) and isinstance(r.get("value"), dict):
            out.append({**r, "type": kind, "value": {**r["value"], kind: found}})
        elif r.get("type") != "labels":
            out.append(r)
    return out


def results_to_boxes(results: Iterable[dict], to_name: str, height: int, width: int,
                     label_index: dict[str, int]) -> np.ndarray:
    """Rectangle results of image `to_name` -> (N, 5) rows (x0, y0, x1, y1 px edges, class), every box kept
    even where boxes overlap (a rotated box becomes its axis-aligned bounding box)."""
    rows = []
    for r in labelled(results):
        if not isinstance(r, dict) or r.get("to_name") != to_name \
                or r.get("type") not in ("rectanglelabels", "rectangle"):
            continue
        label = result_label(r)
        if label not in label_index:
            continue
        v = r.get("value") or {}
        x, y = float(v["x"]) * width / 100.0, float(v["y"]) * height / 100.0
        w, h = float(v["width"]) * width / 100.0, float(v["height"]) * height / 100.0
        a = math.radians(float(v.get("rotation", 0) or 0))
        xs = [x + cx * math.cos(a) - cy * math.sin(a) for cx, cy in ((0, 0), (w, 0), (w, h), (0, h))]
        ys = [y + cx * math.sin(a) + cy * math.cos(a) for cx, cy in ((0, 0), (w, 0), (w, h), (0, h))]
        x0, x1 = max(0.0, min(xs)), min(float(width), max(xs))
        y0, y1 = max(0.0, min(ys)), min(float(height), max(ys))
        if x1 - x0 >= 1 and y1 - y0 >= 1:
            rows.append((x0, y0, x1, y1, label_index[label]))
    return np.array(rows, np.float64).reshape(-1, 5)


def results_to_points(results: Iterable[dict], to_name: str, height: int, width: int,
                      label_index: dict[str, int]) -> np.ndarray:
    """Keypoint results of image `to_name` -> (N, 3) rows (x, y px, class): a counting project's objects."""
    rows = []
    for r in labelled(results):
        if not isinstance(r, dict) or r.get("to_name") != to_name or r.get("type") != "keypointlabels":
            continue
        label = result_label(r)
        if label in label_index:
            _, v = region_value(r)
            rows.append((float(v["x"]) * width / 100.0, float(v["y"]) * height / 100.0, label_index[label]))
    return np.array(rows, np.float64).reshape(-1, 3)


# ------------------------------------------------------------------------------- validating input

MAX_RLE_LEN = 64 * 1024 * 1024
MAX_POINTS = 100_000


def _number(value, what: str) -> float:
    """A finite JSON number within +-1e4 (percentages; a little outside 0-100 is fine) or ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or abs(value) > 1e4:
        raise ValueError(f"{what} must be a finite number (percent of the image), got {str(value)[:20]!r}")
    return float(value)


def _check_rle(rle) -> None:
    if not isinstance(rle, list) or not 5 <= len(rle) <= MAX_RLE_LEN:
        raise ValueError("brush value.rle must be a list of byte values (Label Studio's RLE)")
    _rle_bytes(rle)


def _rle_bytes(rle) -> bytes:
    """The RLE's values as bytes (checked in C: a Python-level check of each value cost 0.7 ms a brush at
    2048 x 2048 px); ValueError unless they are integers 0-255 (True and False pass as 1 and 0)."""
    try:
        return bytes(rle)
    except (TypeError, ValueError):
        raise ValueError("brush value.rle must hold integers 0-255") from None


def region_value(result: dict) -> tuple[str, dict]:
    """(type, value) of one LS result item, checked for shape and numbers (not rasterized). ValueError."""
    if not isinstance(result, dict):
        raise ValueError(f"a result item must be an object, got {type(result).__name__}")
    kind, value = result.get("type", ""), result.get("value")
    if not isinstance(value, dict):
        raise ValueError("a result item needs a 'value' object")
    if kind == "labels":        # a <Labels> result: its region's shape again (as_stored) and the labels
        labels = value.get("labels")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ValueError("labels value.labels must be a list of label names")
        shape = _shape_of(value)
        if shape:
            region_value({"type": shape, "value": value})
        return kind, value
    if kind in ("brushlabels", "brush"):
        if value.get("format", "rle") != "rle" or "rle" not in value:
            raise ValueError("brush result without value.rle")
        _check_rle(value["rle"])
    elif kind in ("bitmasklabels", "bitmask"):
        bitmask.check(value.get("imageDataURL"))
    elif kind in ("polygonlabels", "polygon"):
        points = value.get("points", [])
        if not isinstance(points, list) or len(points) > MAX_POINTS or \
                not all(isinstance(p, list) and len(p) == 2 for p in points):
            raise ValueError("polygon value.points must be a list of [x, y] pairs")
        for p in points:
            _number(p[0], "polygon x"), _number(p[1], "polygon y")
    elif kind in ("rectanglelabels", "rectangle"):
        for key in ("x", "y", "width", "height"):
            _number(value.get(key), f"rectangle {key}")
        _number(value.get("rotation", 0) or 0, "rectangle rotation")
    elif kind in ("ellipselabels", "ellipse"):
        for key in ("x", "y", "radiusX", "radiusY"):
            _number(value.get(key), f"ellipse {key}")
        _number(value.get("rotation", 0) or 0, "ellipse rotation")
    elif kind in ("keypointlabels", "keypoint"):
        for key in ("x", "y"):
            if not 0 <= _number(value.get(key), f"keypoint {key}") <= 100:
                raise ValueError(f"keypoint {key} must be within 0-100 (percent of the image)")
    else:
        raise ValueError(f"unsupported result type {str(kind)[:40]!r}")
    return kind, value


def _shape_of(value: dict) -> str:
    """The tool whose shape a <Labels> result's value repeats (Label Studio's region value keys; a keypoint has x, y
    and a width, a rectangle a height too), "" for none."""
    for key, tool in (("rle", "brush"), ("imageDataURL", "bitmask"), ("points", "polygon"), ("radiusX", "ellipse"),
                      ("height", "rectangle"), ("x", "keypoint")):
        if key in value:
            return tool
    return ""


def region_to_mask(result: dict, height: int, width: int) -> np.ndarray:
    """One LS result item (brush, polygon or rectangle) -> (H, W) bool at the given image size."""
    return _paste(region_crop(result, height, width), height, width)


def region_crop(result: dict, height: int, width: int) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """One LS result item -> ((y0, x0, y1, x1), its (y1 - y0, x1 - x0) bool crop), or None when it covers no
    pixel: region_to_mask at the cost of the object, not the image (the box need not be tight)."""
    kind, value = region_value(result)
    if kind in ("brushlabels", "brush"):
        return rle_crop(value["rle"], height, width)
    if kind in ("bitmasklabels", "bitmask"):
        return bitmask.crop(value["imageDataURL"], height, width)
    if kind in ("polygonlabels", "polygon"):
        pts = np.array([[p[0] * width / 100.0, p[1] * height / 100.0] for p in value.get("points", [])],
                       dtype=np.float64).reshape(-1, 2)
        return polygon_crop(pts, height, width)
    if kind in ("ellipselabels", "ellipse"):
        return ellipse_crop(value["x"] * width / 100.0, value["y"] * height / 100.0, value["radiusX"] * width / 100.0,
                            value["radiusY"] * height / 100.0, height, width, float(value.get("rotation", 0) or 0))
    if kind in ("rectanglelabels", "rectangle"):
        return box_crop(value["x"] * width / 100.0, value["y"] * height / 100.0,
                        value["width"] * width / 100.0, value["height"] * height / 100.0,
                        height, width, float(value.get("rotation", 0) or 0))
    raise ValueError(f"result type {kind!r} has no area")


def result_label(result: dict) -> str | None:
    value = result.get("value") if isinstance(result, dict) else None
    if not isinstance(value, dict):
        return None
    for key in (*PRECISION, "labels"):              # each region type's own label key, then the plain one
        labels = value.get(key)
        if isinstance(labels, list) and labels and isinstance(labels[0], str):
            return labels[0]
    return None


# every region type Tessera reads and writes (label_config.SUPPORTED_CONTROLS), finest first: the order an object
# drawn several ways is drawn in (results_to_maps), and a smart tool's reply control (predictions)
PRECISION = {"brushlabels": 0, "bitmasklabels": 0, "polygonlabels": 1, "ellipselabels": 2, "rectanglelabels": 3,
             "keypointlabels": 4}           # a point: no area, never drawn into a label map
DUPLICATE_IOU = 0.6          # a coarser region this close to a finer one is the same object drawn twice


def results_to_maps(results: Iterable[dict], to_name: str, height: int, width: int,
                    label_index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """LS annotation results -> (classes, instances) (H, W) int32 maps for the image `to_name`.

    Every region becomes one instance with class `label_index[label]` (regions whose label is not in it
    are skipped). An object is often drawn several ways (a prediction accepted as is has a brush mask,
    a polygon and a box per object), so finer regions are drawn first (PRECISION: brush and bitmask, polygon,
    ellipse, box), and a coarser region whose IoU with a finer region already drawn (its bounding box, for a box) is
    >= DUPLICATE_IOU is the same object again: skipped. Drawn one over the other, the box would win and
    the map would hold rectangles. A coarser region never paints over a finer one.
    """
    classes = np.zeros((height, width), dtype=np.int32)
    instances = np.zeros((height, width), dtype=np.int32)
    regions = [r for r in labelled(results)
               if isinstance(r, dict) and r.get("to_name") == to_name and r.get("type") in PRECISION
               and r["type"] not in POINT_CONTROLS and result_label(r) in label_index]
    regions.sort(key=lambda r: PRECISION[r["type"]])          # stable: drawing order kept within a type
    several_types = len({r["type"] for r in regions}) > 1
    kept = _Kept(len(regions))
    k = 0
    for r in regions:
        found = region_crop(r, height, width)      # each region at its own box: O(its area), not the image's
        if found is None or not found[1].any():
            continue
        (y0, x0, _, _), crop = found
        t, l, b, rr = _bbox(crop)
        box, crop = (y0 + t, x0 + l, y0 + b, x0 + rr), crop[t:b, l:rr]
        if several_types:
            if _is_duplicate(r["type"], crop, box, kept):
                continue
            kept.add(PRECISION[r["type"]], crop, box)
        at = (slice(box[0], box[2]), slice(box[1], box[3]))
        if r["type"] not in PIXEL_CONTROLS:
            crop &= instances[at] == 0                # in place: the crop kept above is what was drawn
        k += 1
        classes[at][crop] = label_index[result_label(r)]
        instances[at][crop] = k
    return classes, instances


def results_to_maps_at(results: Iterable[dict], to_name: str, size: tuple[int, int], shape: tuple[int, int],
                       label_index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """results_to_maps for an image decoded at `shape` (H', W') from an original of `size` (H, W): the regions
    are drawn at the original size (LS's brush RLE counts the original's pixels), then resampled to the
    decoded image's (nearest: ids stay ids)."""
    classes, instances = results_to_maps(results, to_name, *size, label_index)
    if tuple(size) != tuple(shape):
        wh = (shape[1], shape[0])
        classes = cv2.resize(classes, wh, interpolation=cv2.INTER_NEAREST)
        instances = cv2.resize(instances, wh, interpolation=cv2.INTER_NEAREST)
    return classes, instances


class _Kept:
    """The regions drawn so far: precision, mask crop and box (y0, x0, y1, x1) of each; precisions and boxes
    also as arrays, so the regions a new one overlaps are found in one vectorised test (a Python loop over
    every kept region cost 0.3 s a 2048 px task of 374 objects drawn three ways)."""

    def __init__(self, capacity: int):
        self.crops: list[np.ndarray] = []
        self.precision = np.zeros(capacity, np.int64)
        self.boxes = np.zeros((capacity, 4), np.int64)

    def add(self, precision: int, crop: np.ndarray, box: tuple[int, int, int, int]) -> None:
        n = len(self.crops)
        self.precision[n], self.boxes[n] = precision, box
        self.crops.append(crop)


def _is_duplicate(kind: str, crop: np.ndarray, box: tuple[int, int, int, int], kept: _Kept) -> bool:
    """Whether a region (its mask crop at `box`) is a coarser copy of one of the finer regions `kept`."""
    n = len(kept.crops)
    kb = kept.boxes[:n]
    finer_and_touching = np.flatnonzero((kept.precision[:n] < PRECISION[kind]) & (kb[:, 0] < box[2]) &
                                        (kb[:, 2] > box[0]) & (kb[:, 1] < box[3]) & (kb[:, 3] > box[1]))
    for i in finer_and_touching.tolist():
        kbox = tuple(kb[i].tolist())
        overlap = _box_iou(box, kbox) if kind == "rectanglelabels" else _crop_iou(crop, box, kept.crops[i], kbox)
        if overlap >= DUPLICATE_IOU:
            return True
    return False


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of a non-empty mask, end-exclusive."""
    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return int(ys[0]), int(xs[0]), int(ys[-1]) + 1, int(xs[-1]) + 1


def _crop_iou(a: np.ndarray, abox: tuple, b: np.ndarray, bbox: tuple) -> float:
    """IoU of two masks given as crops at their boxes (only the boxes' overlap can intersect)."""
    y0, x0, y1, x1 = max(abox[0], bbox[0]), max(abox[1], bbox[1]), min(abox[2], bbox[2]), min(abox[3], bbox[3])
    inter = np.count_nonzero(a[y0 - abox[0]:y1 - abox[0], x0 - abox[1]:x1 - abox[1]] &
                             b[y0 - bbox[0]:y1 - bbox[0], x0 - bbox[1]:x1 - bbox[1]])
    return inter / max(np.count_nonzero(a) + np.count_nonzero(b) - inter, 1)


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ih, iw = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if ih <= 0 or iw <= 0:
        return 0.0
    inter = ih * iw
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)
