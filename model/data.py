"""Datasets: procedural fluorescence-like nuclei and the folder format (images/ + labels/ or masks/).

The folder format is the one of ../shared/data/dsb2018 (Data Science Bowl 2018, BBBC038v1):
`images/<id>.(png|jpg)` + `labels/<id>.png` (instance map) or `masks/<id>.png` (semantic map) with an
optional `classes.json`. `make_nuclei` makes seeded demo data with touching nuclei, so a model has to learn
to separate instances, not just threshold brightness.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


@dataclass
class Sample:
    """One image with its class map and instance map."""
    image: np.ndarray          # (H, W, 3) uint8
    classes: np.ndarray        # (H, W) int32, 0 = background, c = label_names[c - 1]
    instances: np.ndarray      # (H, W) int32, 0 = background, k = k-th object
    id: str = ""
    synthetic: bool = False
    boxes: np.ndarray | None = None  # (N, 5) x0, y0, x1, y1 (px edges), class: a box-labelled sample, whose
                                     # classes / instances hold the boxes' centre regions (model/postprocess.py)
    size: tuple[int, int] | None = None  # the image's original (H, W) where it was decoded smaller
                                         # (TESSERA_MAX_SIDE), as /predict sees it; None: its own size


# ----------------------------------------------------------------------------------------------------
# procedural nuclei

def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth random field in [-1, 1] made by upsampling a coarse random grid."""
    grid = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC).clip(-1, 1)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Chromatin-like texture: blurred noise at two scales, roughly zero mean, unit-ish std."""
    noise = rng.standard_normal((h, w)).astype(np.float32)
    fine = cv2.GaussianBlur(noise, (0, 0), 1.2)
    coarse = cv2.GaussianBlur(noise, (0, 0), 3.5)
    tex = fine / (fine.std() + 1e-6) + 0.7 * coarse / (coarse.std() + 1e-6)
    return tex / 1.5


def _place_nuclei(rng: np.random.Generator, h: int, w: int) -> list[tuple]:
    """Sample nucleus shapes and centres; about half are placed against an earlier one so they touch."""
    scale = min(h, w) / 256
    r_mean = rng.uniform(5.0, 12.0) * max(scale, 0.35)
    n_target = int(rng.integers(5, 41))
    shapes: list[tuple] = []
    for _ in range(n_target * 6):
        if len(shapes) == n_target:
            break
        a = r_mean * rng.uniform(0.7, 1.35)
        b = a * rng.uniform(0.6, 1.0)
        angle = rng.uniform(0, np.pi)
        harmonics = [(k, rng.uniform(0, 0.07), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)]
        if shapes and rng.random() < 0.5:
            # touching / slightly overlapping partner of an existing nucleus
            cy0, cx0, a0 = shapes[int(rng.integers(len(shapes)))][:3]
            direction = rng.uniform(0, 2 * np.pi)
            dist = (0.8 * a0 + 0.8 * b) * rng.uniform(0.85, 1.05)
            cy, cx = cy0 + dist * np.sin(direction), cx0 + dist * np.cos(direction)
        else:
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        if not (-0.3 * a <= cy < h + 0.3 * a and -0.3 * a <= cx < w + 0.3 * a):
            continue
        # reject centres deep inside another nucleus: overlaps stay lens-shaped and instances connected
        if any((cy - s[0]) ** 2 + (cx - s[1]) ** 2 < (0.65 * (s[3] + b)) ** 2 for s in shapes):
            continue
        shapes.append((cy, cx, a, b, angle, harmonics))
    return shapes


def _render_nuclei(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Instance map (argmin of normalised radius among covering nuclei) and summed fluorescence signal."""
    instances = np.zeros((h, w), np.int32)
    best = np.full((h, w), np.inf, np.float32)
    signal = np.zeros((h, w), np.float32)
    for k, (cy, cx, a, b, angle, harmonics) in enumerate(_place_nuclei(rng, h, w), start=1):
        r = int(np.ceil(a * 1.25)) + 1
        y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 1, h)
        x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 1, w)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - cy, xx - cx
        c, s = np.cos(angle), np.sin(angle)
        u, v = c * dx + s * dy, -s * dx + c * dy           # rotated coordinates
        theta = np.arctan2(v, u)
        wobble = 1 + sum(amp * np.cos(k_ * theta + ph) for k_, amp, ph in harmonics)
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2) / wobble  # < 1 inside the nucleus
        inside = rho < 1
        win = inside & (rho < best[y0:y1, x0:x1])
        best[y0:y1, x0:x1][win] = rho[win]
        instances[y0:y1, x0:x1][win] = k
        # domed profile; overlapping nuclei add up (brighter lens) as in fluorescence
        brightness = rng.uniform(0.45, 1.0)
        signal[y0:y1, x0:x1] += inside * brightness * (1 - 0.35 * rho ** 2)
    # drop nuclei that kept too few pixels and make ids contiguous 1..K
    counts = np.bincount(instances.ravel())
    keep = np.flatnonzero(counts >= 12)
    keep = keep[keep > 0]
    remap = np.zeros(len(counts), np.int32)
    remap[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    dropped = (instances > 0) & (remap[instances] == 0)
    signal[dropped] = 0                                       # no unlabelled bright specks
    instances = remap[instances]
    return instances, signal


def _make_one(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (image, instances) pair."""
    instances, signal = _render_nuclei(rng, h, w)
    signal *= 1 + 0.3 * _texture(rng, h, w)
    # dark spots (nucleoli) inside nuclei
    spots = (rng.random((h, w)) < 0.004).astype(np.float32)
    signal *= 1 - 0.6 * cv2.GaussianBlur(spots, (0, 0), 1.5) * 6
    signal = cv2.GaussianBlur(signal.clip(0, None), (0, 0), rng.uniform(0.6, 1.8))
    background = rng.uniform(0.02, 0.12) * (1 + 0.6 * _smooth_field(rng, h, w, 4))
    gy, gx = np.linspace(-1, 1, h, dtype=np.float32)[:, None], np.linspace(-1, 1, w, dtype=np.float32)
    background = background + rng.uniform(-0.05, 0.05) * gy + rng.uniform(-0.05, 0.05) * gx
    x = (background + rng.uniform(0.5, 1.0) * signal).clip(0, None)
    peak = rng.uniform(30, 300)                               # photons at intensity 1: Poisson shot noise
    x = rng.poisson(x * peak).astype(np.float32) / peak
    x += rng.normal(0, rng.uniform(0.003, 0.02), (h, w)).astype(np.float32)
    x = x.clip(0, 1) * rng.uniform(0.35, 1.0)                # random exposure / brightness
    style = rng.random()
    if style < 0.7:                                          # grey fluorescence
        rgb = np.repeat(x[..., None], 3, axis=2)
    elif style < 0.85:                                       # tinted fluorescence (e.g. DAPI blue)
        tint = rng.uniform(0.2, 1.0, 3).astype(np.float32)
        rgb = x[..., None] * (tint / tint.max())
    else:                                                    # stained look: dark purple nuclei on pink
        x = x / max(float(x.max()), 1e-6)
        paper = np.array([0.93, 0.82, 0.88], np.float32) * rng.uniform(0.85, 1.0)
        ink = np.array([0.35, 0.2, 0.55], np.float32) * rng.uniform(0.6, 1.1)
        rgb = paper + x[..., None] * (ink - paper)
    image = (rgb.clip(0, 1) * 255 + 0.5).astype(np.uint8)
    return image, instances


def make_nuclei(n: int, size: int | tuple[int, int] = 256, seed: int = 0) -> list[Sample]:
    """Procedural fluorescence-like nuclei images with instance labels.

    5-40 irregular elliptical nuclei per image, many touching or overlapping (the instance map keeps them
    apart), textured interiors, blur, Poisson + Gaussian noise, uneven background, random brightness.
    `size` is an int or (H, W). Image i depends only on (seed, i), so make_nuclei(3) == make_nuclei(5)[:3].
    """
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if n < 0 or h < 16 or w < 16:
        raise ValueError(f"make_nuclei needs n >= 0 and size >= 16 px per side, got n={n}, size={size}")
    samples = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        image, instances = _make_one(h, w, rng)
        samples.append(Sample(image=image, classes=(instances > 0).astype(np.int32), instances=instances,
                              id=f"nuclei-{seed}-{i:05d}", synthetic=False))
    return samples


def make_nuclei_mosaic(h: int, w: int, tile: int = 256, seed: int = 0) -> Sample:
    """A large (h, w) fluorescence-like image tiled from procedural `tile` px samples: objects keep the size
    they have at `tile` px, so one model scale fits both (native-size tests and benchmarks).

    Only dark-background tiles are used, each stretched to the full grey range, so the mosaic reads as one
    exposure and one modality (a real frame does not mix stained and fluorescent patches)."""
    ny, nx = -(-h // tile), -(-w // tile)
    image = np.zeros((ny * tile, nx * tile, 3), np.uint8)
    instances = np.zeros((ny * tile, nx * tile), np.int32)
    k, i, offset = 0, 0, 0
    while k < ny * nx:
        s = make_nuclei(1, size=tile, seed=seed * 100_003 + i)[0]
        i += 1
        grey = s.image.mean(axis=2)
        lo, med, hi = np.percentile(grey, (1, 50, 99.8))
        if med - lo > 0.3 * (hi - lo):                        # bright background (stained look): skip
            continue
        y, x = divmod(k, nx)
        image[y * tile:(y + 1) * tile, x * tile:(x + 1) * tile] = _stretch(grey)[..., None]
        instances[y * tile:(y + 1) * tile, x * tile:(x + 1) * tile] = np.where(s.instances > 0,
                                                                              s.instances + offset, 0)
        offset += int(s.instances.max())
        k += 1
    instances = instances[:h, :w]
    return Sample(image=image[:h, :w].copy(), classes=(instances > 0).astype(np.int32), instances=instances.copy(),
                  id=f"nuclei-mosaic-{seed}-{h}x{w}")


# ----------------------------------------------------------------------------------------------------
# folder datasets

_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def percentiles(x: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """np.percentile(x, qs) (its default linear method, the same floats), for uint8 from a 256-bin histogram:
    one counting pass instead of a partition per call (1.3 -> 0.2 ms per 520x696 image at the model's scale;
    the request path calls it once per image, and once per grey image decoded)."""
    if x.dtype != np.uint8:
        return [float(v) for v in np.percentile(x, qs)]
    n = x.size
    cum = np.cumsum(np.bincount(x.reshape(-1), minlength=256))
    out = []
    for q in qs:
        at = (n - 1) * (np.float64(q) / 100)             # numpy's virtual index, its floor and weight
        i = int(np.floor(at))
        t = float(at - i)
        a, b = (float(np.searchsorted(cum, k, side="right")) for k in (i, min(i + 1, n - 1)))
        out.append(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)   # numpy's _lerp
    return out


def _stretch(x: np.ndarray) -> np.ndarray:
    """Per-image percentile stretch (0.5..99.8, as normalize_image's) of a grey image to uint8.

    An 8-bit image goes through a 256-entry table of the same float arithmetic (the same bytes as mapping
    every pixel: 5.8 -> ~1 ms per 520x696 frame, most Label Studio microscopy is 8-bit grey)."""
    if x.dtype == np.uint8:
        lo, hi = (np.float64(v) for v in percentiles(x, (0.5, 99.8)))     # np.percentile's floats and type
        return _stretch_values(np.arange(256, dtype=np.uint8), lo, hi)[x]
    lo, hi = np.percentile(x, (0.5, 99.8))
    return _stretch_values(x, lo, hi)


def _stretch_values(x: np.ndarray, lo: np.float64, hi: np.float64) -> np.ndarray:
    if hi <= lo:
        hi = lo + 1.0
    return ((x.astype(np.float32) - lo) * (255.0 / (hi - lo))).clip(0, 255).round().astype(np.uint8)


def image_to_rgb(im: Image.Image) -> np.ndarray:
    """A decoded PIL image -> (H, W, 3) uint8 RGB: colour modes converted, grey ones (8/16-bit, float)
    percentile-stretched, so dark fluorescence uses the uint8 range. Folder datasets and the images
    Label Studio tasks point at (backend/media.py) both come through here."""
    if im.mode not in _GREY_MODES:
        return np.array(im.convert("RGB"), dtype=np.uint8)
    grey = np.asarray(im.convert("L") if im.mode in ("1", "LA", "La") else im)
    if grey.ndim != 2:
        raise ValueError(f"unsupported image mode {im.mode} {grey.shape}; save it as 8/16-bit grey or RGB")
    return cv2.cvtColor(_stretch(grey), cv2.COLOR_GRAY2RGB)          # (H, W) -> (H, W, 3)


def read_image(path: Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB (image_to_rgb), upright as a viewer shows it (its EXIF
    orientation applied, as backend.media.decode_image does)."""
    with Image.open(path) as im:
        try:
            ImageOps.exif_transpose(im, in_place=True)
            return image_to_rgb(im)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _read_map(path: Path) -> np.ndarray:
    """Read a single-channel label/mask PNG (uint8, uint16 or palette) as int32."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
            raise ValueError(f"{path}: label maps must be single-channel (8/16-bit grey or palette), "
                             f"got mode {im.mode}; write the index map with PIL mode 'L' or 'I;16'")
        ImageOps.exif_transpose(im, in_place=True)          # upright, as its image is read
        return np.asarray(im).astype(np.int32)


def _read_classes(root: Path) -> list[str] | None:
    """classes.json as a list of names for 1..C: a list, {"1": name} or {name: 1}."""
    path = root / "classes.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if isinstance(data, list) and all(isinstance(s, str) for s in data):
        return data
    if isinstance(data, dict) and data:
        if all(str(k).isdigit() for k in data):
            index = {int(k): str(v) for k, v in data.items()}
        elif all(isinstance(v, int) for v in data.values()):
            index = {int(v): str(k) for k, v in data.items()}
        else:
            index = {}
        index.pop(0, None)                                    # "0": "background" is implicit
        if index and min(index) >= 1:
            return [index.get(c, f"class_{c}") for c in range(1, max(index) + 1)]
    raise ValueError(f"{path}: expected a list of class names for indices 1..C, {{\"1\": \"name\"}} "
                     f"or {{\"name\": 1}}, got {str(data)[:80]}")


def semantic_instances(classes: np.ndarray) -> np.ndarray:
    """A semantic map's objects: the connected components of each class, numbered 1..K over all classes.

    8-connected, as OpenCV's contours (regions.mask_to_polygons) outline them: pixels touching at a corner
    are one object, one polygon. The folder loader, the GAN's layouts and the label model's targets
    (model/inference.label_map) all turn semantic-only labels into objects here."""
    instances = np.zeros(classes.shape, np.int32)
    next_id = 1
    for c in np.unique(classes):
        if c == 0:
            continue
        n, comp = cv2.connectedComponents((classes == c).astype(np.uint8), connectivity=8)
        instances[comp > 0] = comp[comp > 0] + next_id - 1
        next_id += n - 1
    return instances


def relabel(instances: np.ndarray, min_area: int = 1) -> np.ndarray:
    """Renumber instances 1..K (in order of id), dropping fragments below min_area pixels."""
    if instances.size and instances.dtype.kind in "iu" and 0 <= instances.min() and instances.max() < 1 << 20:
        # the same maps through a count and a lookup table per id: np.unique sorts every pixel (~20 ms per
        # 256 px map, most of an edit's time in `tessera generate`)
        counts = np.bincount(instances.ravel())
        keep = counts >= min_area
        keep[0] = False
        new = np.zeros(len(counts), np.int32)
        new[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        return new[instances]
    ids, inverse, counts = np.unique(instances, return_inverse=True, return_counts=True)
    keep = (ids > 0) & (counts >= min_area)
    new = np.zeros(len(ids), np.int32)
    new[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new[inverse].reshape(instances.shape)


def load_folder(root: str | Path, ids: list[str] | None = None, keep=None) -> tuple[list[Sample], list[str]]:
    """Load `images/<id>.(png|jpg)` + `labels/<id>.png` (instances) and/or `masks/<id>.png` (classes).

    With labels only, classes = labels > 0 and label_names = ["object"] (or classes.json's single name).
    With masks, classes.json names classes 1..C (default class_1..class_C) and instances are the labels if
    present, else connected components per class. ids=None loads every image that has a label file.
    keep: a function each sample goes through as it is read, before the next is (e.g. resized, or kept in a
    memory-mapped file: backend.training.train_from_folder), so that the full-size ones never pile up.
    """
    root = Path(root)
    img_dir, lab_dir, mask_dir = root / "images", root / "labels", root / "masks"
    if not img_dir.is_dir() or not (lab_dir.is_dir() or mask_dir.is_dir()):
        raise ValueError(f"{root}: not a dataset folder; expected images/<id>.png|jpg and labels/<id>.png "
                         f"(instance maps) or masks/<id>.png (semantic maps) + classes.json")
    images = {p.stem: p for p in sorted(img_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTS}
    has_labels, has_masks = lab_dir.is_dir(), mask_dir.is_dir()

    def label_files(i: str) -> tuple[Path | None, Path | None]:
        lab, mask = lab_dir / f"{i}.png", mask_dir / f"{i}.png"
        return (lab if lab.exists() else None), (mask if mask.exists() else None)

    if ids is None:
        ids = [i for i in images if any(label_files(i))]
        if len(ids) < len(images):
            logger.warning("%s: %d images have no label file and are skipped", root, len(images) - len(ids))
        if not ids:
            raise ValueError(f"{root}: no image in images/ has a matching labels/<id>.png or masks/<id>.png")
    missing = [i for i in ids if i not in images or not any(label_files(i))]
    if missing:
        raise ValueError(f"{root}: {len(missing)} ids lack an image or a label file, e.g. {missing[:5]}; "
                         f"each id needs images/<id>.png|jpg and labels/<id>.png or masks/<id>.png")

    names = _read_classes(root)
    samples = []
    for i in ids:
        lab_path, mask_path = label_files(i)
        image = read_image(images[i])
        instances = _read_map(lab_path) if lab_path else None
        classes = _read_map(mask_path) if mask_path else None
        if classes is None:
            classes = (instances > 0).astype(np.int32)
        if instances is None:
            instances = semantic_instances(classes)
        if not (image.shape[:2] == classes.shape == instances.shape):
            raise ValueError(f"{root}: id {i!r} has image {image.shape[:2]} but labels {instances.shape} / "
                             f"masks {classes.shape}; label maps must have the image's size")
        sample = Sample(image=image, classes=classes, instances=instances, id=i)
        samples.append(sample if keep is None else keep(sample))

    n_classes = max(int(s.classes.max()) for s in samples)
    if names is None:
        names = ["object"] if not has_masks else [f"class_{c}" for c in range(1, max(n_classes, 1) + 1)]
    if n_classes > len(names):
        raise ValueError(f"{root}: masks use class index {n_classes} but classes.json names only "
                         f"{len(names)} classes; add the missing names")
    if has_labels and not has_masks and len(names) != 1:
        logger.warning("%s: classes.json names %d classes but there are no masks/; all objects are %r",
                       root, len(names), names[0])
        names = names[:1]
    return samples, names


def split_ids(ids: list[str], val_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Split ids into (train, val) by a stable SHA-1 hash of each id, keeping the input order.

    An id always lands in the same split. If the hash puts nothing in val but there are >= 2 ids and
    val_fraction > 0, the id with the smallest hash goes to val so a held-back set always exists.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")

    def u(i: str) -> float:
        return int.from_bytes(hashlib.sha1(i.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64

    val = {i for i in ids if u(i) < val_fraction}
    if not val and val_fraction > 0 and len(set(ids)) >= 2:
        val = {min(ids, key=u)}
    return [i for i in ids if i not in val], [i for i in ids if i in val]
