"""Label layouts to generate images from: real layouts with geometric augmentation, layouts decoded by the
label VQ-VAE from recombined code maps, and instance pasting that raises the share of a requested label.
A layout follows the Sample conventions (classes and instances, 0 = background) at the working resolution R.
"""

import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from scipy import ndimage

from .data import relabel, semantic_instances
from .inference import split_instances

logger = logging.getLogger(__name__)


@dataclass
class Layout:
    """A label map to render: classes (R, R) int32 and instances (R, R) int32, as in Sample."""
    classes: np.ndarray
    instances: np.ndarray
    source: str = ""  # how it was made, e.g. "real:<id>", "vq", with "+paste" when instances were pasted


# -----------------------------------------------------------------------------
# geometry on label maps (nearest-neighbour only, so class and instance ids stay exact)

def fit_short_side(arr: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """Resize so that the short side is `size`, aspect kept (the crop to (size, size) comes after)."""
    h, w = arr.shape[:2]
    scale = size / min(h, w)
    out_w, out_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (out_h, out_w) == (h, w):
        return arr
    interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return cv2.resize(arr, (out_w, out_h), interpolation=interp)


def crop_box(shape: tuple[int, int], size: int, rng: np.random.Generator) -> tuple[int, int]:
    """Random top-left corner of a (size, size) crop inside `shape`."""
    return int(rng.integers(0, shape[0] - size + 1)), int(rng.integers(0, shape[1] - size + 1))


def ensure_instances(classes: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """Instances as given, or (semantic-only labels) the connected components of each class."""
    if instances.any() or not classes.any():
        return instances.astype(np.int32)
    return semantic_instances(classes)


def _affine(maps: list[np.ndarray], rng: np.random.Generator, scale: tuple[float, float], shift: float,
            elastic: float) -> list[np.ndarray]:
    """Random scale about the centre + shift (+ optional elastic warp), nearest, background at borders."""
    h, w = maps[0].shape
    s = rng.uniform(*scale)
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 0.0, s)
    m[:, 2] += rng.uniform(-shift, shift, 2) * (h, w)[::-1]
    if elastic <= 0:
        return [cv2.warpAffine(a, m, (w, h), flags=cv2.INTER_NEAREST, borderValue=0) for a in maps]
    # elastic: a smooth random displacement field (Simard et al. 2003) on top of the affine map
    inv = cv2.invertAffineTransform(m)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    map_x = (inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]).astype(np.float32)
    map_y = (inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]).astype(np.float32)
    sigma = h / 16
    for grid in (map_x, map_y):
        grid += cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigma) * elastic * sigma * 4
    return [cv2.remap(a, map_x, map_y, cv2.INTER_NEAREST, borderValue=0) for a in maps]


def augment_layout(classes: np.ndarray, instances: np.ndarray, rng: np.random.Generator,
                   scale: tuple[float, float] = (0.85, 1.2), shift: float = 0.1, elastic: float = 0.0,
                   min_area: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Flips, rot90, affine scale/shift and optional elastic warp of an (R, R) layout."""
    k = int(rng.integers(4))
    maps = [np.rot90(a, k) for a in (classes, instances)]
    if rng.random() < 0.5:
        maps = [a[:, ::-1] for a in maps]
    maps = [np.ascontiguousarray(a, dtype=np.int32) for a in maps]
    if scale != (1.0, 1.0) or shift > 0 or elastic > 0:
        maps = _affine(maps, rng, scale, shift, elastic)
    instances = relabel(maps[1], min_area)
    return np.where(instances > 0, maps[0], 0).astype(np.int32), instances


def logits_to_layout(logits: np.ndarray, min_area: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Label logits (L, H, W) of the VQ-VAE (background, classes 1..C, contact) -> (classes, instances),
    split into objects exactly as the label model's predictions are."""
    probs = torch.from_numpy(logits).float().softmax(0).numpy()
    classes, instances, _, _ = split_instances(probs, logits.shape[0] - 2, min_area)
    return classes.astype(np.int32), instances.astype(np.int32)


def _instance_bank(maps: list[tuple[np.ndarray, np.ndarray]], min_area: int) -> dict[int, list[np.ndarray]]:
    """Binary crops (h, w) uint8 of every whole object (not cut by the border), grouped by class."""
    bank: dict[int, list[np.ndarray]] = {}
    for classes, instances in maps:
        H, W = instances.shape
        for k, sl in enumerate(ndimage.find_objects(instances), start=1):
            if sl is None:
                continue
            ys, xs = sl
            if ys.start == 0 or xs.start == 0 or ys.stop == H or xs.stop == W:
                continue
            obj = (instances[sl] == k).astype(np.uint8)
            if obj.sum() < min_area:
                continue
            c = int(classes[sl][obj > 0][0])
            bank.setdefault(c, []).append(obj)
    return bank


def _paste(classes: np.ndarray, instances: np.ndarray, obj: np.ndarray, label: int, rng: np.random.Generator,
           margin: int) -> bool:
    """Paste a binary object at a random place where it overlaps nothing (with `margin` px gap); in place."""
    h, w = obj.shape
    H, W = instances.shape
    if h > H or w > W:
        return False
    free = (instances == 0).astype(np.uint8)
    if margin > 0:
        free = cv2.erode(free, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8))
    # erosion by the object's own shape, anchored at its top-left: fits[y, x] = object placed at (y, x) is free
    fits = cv2.erode(free, obj, anchor=(0, 0), borderType=cv2.BORDER_CONSTANT, borderValue=0)[:H - h + 1, :W - w + 1]
    ys, xs = np.nonzero(fits)
    if len(ys) == 0:
        return False
    j = int(rng.integers(len(ys)))
    y, x = ys[j], xs[j]
    region = obj > 0
    instances[y:y + h, x:x + w][region] = int(instances.max()) + 1
    classes[y:y + h, x:x + w][region] = label
    return True


def raise_share(classes: np.ndarray, instances: np.ndarray, label: int, share: float,
                bank: list[np.ndarray], rng: np.random.Generator, margin: int = 1,
                crowding: float = 1.3) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Paste objects of class `label` (from `bank`) into free space until at least `share` of the objects
    are of that class. The object count may grow to `crowding` x the original (a layout stays about as
    dense as real ones); past that, or when nothing fits, a random object of another class is removed
    first. -> (classes, instances, n_pasted, n_removed). The result has at least one object of `label`."""
    classes, instances = classes.copy(), instances.copy()
    ids = np.unique(instances[instances > 0])
    # instance id -> class, kept up to date instead of re-scanning the map
    label_of = {}
    if len(ids):
        label_of = dict(zip(ids.tolist(), ndimage.maximum(classes, instances, ids).astype(int).tolist()))
    max_objects = max(int(crowding * len(label_of)), len(label_of) + 2)
    n_pasted = n_removed = 0

    def n_label() -> int:
        return sum(c == label for c in label_of.values())

    while not label_of or n_label() < share * len(label_of) - 1e-9:
        others = [k for k, c in label_of.items() if c != label]
        pasted = len(label_of) < max_objects and any(
            _paste(classes, instances, _random_pose(bank[int(rng.integers(len(bank)))], rng), label, rng, margin)
            for _ in range(3))
        if pasted:
            label_of[int(instances.max())] = label
            n_pasted += 1
        elif others:
            k = others[int(rng.integers(len(others)))]
            drop = instances == k
            instances[drop], classes[drop] = 0, 0
            del label_of[k]
            n_removed += 1
            max_objects = max(max_objects, len(label_of) + 1)  # a removal always makes room for a paste
        else:
            break  # nothing fits and nothing to remove: only an object larger than the layout gets here
    return classes, relabel(instances), n_pasted, n_removed


def _random_pose(obj: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    obj = np.rot90(obj, int(rng.integers(4)))
    return np.ascontiguousarray(obj[:, ::-1] if rng.random() < 0.5 else obj)


def share_of(layout: Layout, label: int) -> float:
    """Share of the objects in a layout that are of class `label` (0 when it has none)."""
    ids = np.unique(layout.instances[layout.instances > 0])
    if len(ids) == 0:
        return 0.0
    return len(np.unique(layout.instances[(layout.instances > 0) & (layout.classes == label)])) / len(ids)


# -----------------------------------------------------------------------------

class LayoutSampler:
    """Draws (R, R) layouts: augmented real layouts, VQ-VAE recombinations, plus pasting for a requested label.

    `codes` is anything with `encode(classes, instances) -> LongTensor (B, h, w)` and
    `decode_codes(code_map) -> label logits (B, L, R, R)` (background, classes 1..C, contact): the label
    model's Predictor is one. Without it, or with p_vq=0, every layout is an augmented real one.
    """

    def __init__(self, samples, resolution: int = 128, codes=None, p_vq: float = 0.0,
                 scale: tuple[float, float] = (0.85, 1.2), shift: float = 0.1, elastic: float = 0.0,
                 min_area: int = 4):
        if not samples:
            raise ValueError("LayoutSampler needs at least one labelled sample")
        if not 0.0 <= p_vq <= 1.0:
            raise ValueError(f"p_vq must be in [0, 1], got {p_vq}")
        self.resolution, self.codes, self.p_vq = resolution, codes, p_vq if codes is not None else 0.0
        self.scale, self.shift, self.elastic, self.min_area = tuple(scale), shift, elastic, min_area
        # label maps with the short side at R: crops of them keep the objects' scale of the training images
        self.maps = [(fit_short_side(s.classes.astype(np.int32), resolution, nearest=True),
                      fit_short_side(ensure_instances(s.classes, s.instances), resolution, nearest=True))
                     for s in samples]
        self.ids = [getattr(s, "id", "") or str(i) for i, s in enumerate(samples)]
        self.bank = _instance_bank(self.maps, min_area)
        self.has_label = {c: np.array([(cl == c).any() for cl, _ in self.maps]) for c in self.bank}

    def real(self, rng: np.random.Generator, label: int | None = None) -> Layout:
        """A random crop of a real layout with geometric augmentation (half the time one that has `label`)."""
        pool = np.arange(len(self.maps))
        if label is not None and label in self.has_label and self.has_label[label].any() and rng.random() < 0.5:
            pool = np.flatnonzero(self.has_label[label])
        i = int(pool[rng.integers(len(pool))])
        classes, instances = self.maps[i]
        y, x = crop_box(classes.shape, self.resolution, rng)
        crop = [a[y:y + self.resolution, x:x + self.resolution] for a in (classes, instances)]
        classes, instances = augment_layout(*crop, rng, self.scale, self.shift, self.elastic, self.min_area)
        return Layout(classes, instances, f"real:{self.ids[i]}")

    @torch.no_grad()
    def recombined(self, n: int, rng: np.random.Generator) -> list[Layout]:
        """Encode real layouts, paste rectangles of other layouts' code maps into each code map, decode."""
        base = [self.real(rng) for _ in range(2 * n)]
        classes = torch.from_numpy(np.stack([b.classes for b in base]))
        instances = torch.from_numpy(np.stack([b.instances for b in base]))
        code_map = self.codes.encode(classes, instances)  # (2n, h, w)
        out = code_map[:n].clone()
        h, w = out.shape[-2:]
        for i in range(n):
            for _ in range(int(rng.integers(1, 4))):  # 1-3 tiles, each from another layout, same place
                th, tw = int(rng.integers(h // 4, h // 2 + 1)), int(rng.integers(w // 4, w // 2 + 1))
                y, x = int(rng.integers(0, h - th + 1)), int(rng.integers(0, w - tw + 1))
                out[i, y:y + th, x:x + tw] = code_map[int(rng.integers(n, 2 * n)), y:y + th, x:x + tw]
        logits = self.codes.decode_codes(out).float().cpu().numpy()
        if logits.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"the code model decodes to {logits.shape[-2:]}, the sampler makes "
                             f"{self.resolution} x {self.resolution} layouts: use the label model's resolution")
        layouts = []
        for lg in logits:
            classes, instances = logits_to_layout(lg, self.min_area)
            layouts.append(Layout(classes, instances, "vq"))
        return layouts

    def sample(self, n: int, label: int | None = None, share: float | None = None, seed: int = 0) -> list[Layout]:
        """n layouts; with `label`, at least `share` (default 0.5) of each layout's objects are of that class."""
        if share is not None and label is None:
            raise ValueError("share needs a label: pass label=<class index 1..C> too")
        if label is not None:
            share = 0.5 if share is None else share
            if not 0.0 < share <= 1.0:
                raise ValueError(f"share must be in (0, 1], got {share}")
            if label not in self.bank:
                raise ValueError(f"no whole object of class {label} in the layouts to paste from; "
                                 f"classes with objects: {sorted(self.bank)}")
        rng = np.random.default_rng(seed)
        n_vq = int(rng.binomial(n, self.p_vq)) if self.p_vq > 0 else 0
        layouts = self.recombined(n_vq, rng) if n_vq else []
        layouts += [self.real(rng, label) for _ in range(n - n_vq)]
        layouts = [layouts[j] for j in rng.permutation(n)]
        if label is None:
            return layouts
        out = []
        for lay in layouts:
            classes, instances, n_pasted, n_removed = raise_share(
                lay.classes, lay.instances, label, share, self.bank[label], rng)
            source = lay.source + ("+paste" if n_pasted else "") + ("+drop" if n_removed else "")
            out.append(Layout(classes, instances, source))
        return out
