"""Edited real images: real objects cut out of labelled images and pasted into other real images, with
exact masks (the pasted pixels are the object's label; what it covers loses its label). Rare labels are
pasted first. References: Cut, Paste and Learn (Dwibedi et al. 2017, https://arxiv.org/abs/1708.01642),
Simple Copy-Paste (Ghiasi et al. 2021, https://arxiv.org/abs/2012.07177).
"""

import logging
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage

from .data import Sample, relabel
from .layouts import ensure_instances

logger = logging.getLogger(__name__)


@dataclass
class Cutout:
    """One real object: its pixels, its mask and its class, cropped to its bounding box."""
    image: np.ndarray        # (h, w, 3) uint8
    mask: np.ndarray         # (h, w) bool
    label: int               # class index 1..C
    source: str              # id of the sample it comes from
    whole: bool = True       # False when the object touches the image border (cut by the frame)
    grey: bool = False       # its image is grey (fluorescence-like); pasted only into grey images


@dataclass
class Edit:
    """An edited image and where its parts come from."""
    sample: Sample
    background: str                                  # id of the sample the background comes from
    objects: list[str] = field(default_factory=list)  # ids of the samples the pasted objects come from
    labels: list[int] = field(default_factory=list)   # class of each pasted object


def is_grey(image: np.ndarray, tol: int = 10) -> bool:
    """True when the channels differ by at most `tol` (grey fluorescence stored as RGB)."""
    return image.ndim == 2 or int(np.abs(image.astype(np.int16) - image[..., :1]).max()) <= tol


def cutouts(samples: list[Sample], min_area: int = 16) -> list[Cutout]:
    """Every labelled object of every sample (objects of fewer than min_area pixels are left out)."""
    out = []
    for s in samples:
        instances = ensure_instances(s.classes, s.instances)
        H, W = instances.shape
        grey = is_grey(s.image)
        for k, sl in enumerate(ndimage.find_objects(instances), start=1):
            if sl is None:
                continue
            mask = instances[sl] == k
            if mask.sum() < min_area:
                continue
            ys, xs = sl
            whole = ys.start > 0 and xs.start > 0 and ys.stop < H and xs.stop < W
            label = int(np.bincount(s.classes[sl][mask]).argmax())
            if label == 0:
                continue
            out.append(Cutout(np.ascontiguousarray(s.image[sl]), mask, label, s.id, whole, grey))
    return out


def _scale_for(cut: Cutout, instances: np.ndarray, rng: np.random.Generator,
               jitter: tuple[float, float]) -> float:
    """Scale that gives the object about the median size of the background's objects (the scale of the
    scene), or its own size when the background has none; never larger than 0.9 x the background."""
    H, W = instances.shape
    areas = np.bincount(instances.ravel())[1:]
    areas = areas[areas > 0]
    s = float(np.sqrt(np.median(areas) / cut.mask.sum())) if len(areas) else 1.0
    s *= rng.uniform(*jitter)
    h, w = cut.mask.shape
    return min(s, 0.9 * H / h, 0.9 * W / w)


def _place(free: np.ndarray, mask: np.ndarray, rng: np.random.Generator, anywhere: bool = True
           ) -> tuple[int, int] | None:
    """Top-left corner for `mask` inside an image of free.shape: where it overlaps no object when there is
    such a place (erosion of the free map by the object's shape), else anywhere (None when not `anywhere`)."""
    h, w = mask.shape
    H, W = free.shape
    fits = cv2.erode(free.astype(np.uint8), mask.astype(np.uint8), anchor=(0, 0),
                     borderType=cv2.BORDER_CONSTANT, borderValue=0)[:H - h + 1, :W - w + 1]
    ys, xs = np.nonzero(fits)
    if len(ys):
        j = int(rng.integers(len(ys)))
        return int(ys[j]), int(xs[j])
    if not anywhere:
        return None
    return int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))


def _resized(cut: Cutout, s: float, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    h, w = max(1, round(cut.mask.shape[0] * s)), max(1, round(cut.mask.shape[1] * s))
    obj = cv2.resize(cut.image, (w, h), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    mask = cv2.resize(cut.mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    return (obj[:, ::-1], mask[:, ::-1]) if flip else (obj, mask)


def paste(image: np.ndarray, classes: np.ndarray, instances: np.ndarray, cut: Cutout, rng: np.random.Generator,
          scale_jitter: tuple[float, float] = (0.7, 1.2), feather: float = 1.0, fit: float = 1.0) -> bool:
    """Paste `cut` into (image, classes, instances), in place, at the scene's object scale, flipped at random.
    fit < 1: where the object overlaps every object of the scene at that scale (a photo filled by one animal),
    it is shrunk in steps of 0.8 down to `fit` x that scale until it finds a free place, so that it stands
    beside the scene's objects instead of covering them (their labels and pixel share stay); it covers them
    only when no scale down to `fit` finds room.
    The object keeps its own pixels: scaling a grey object to the exposure of the scene's objects (stop 24)
    made edited images easier, not harder, to tell from real ones (bench/HISTORY.md, stop 25).
    The label is the object's mask exactly. The image takes the object's pixels with alpha = 2 x (mask blurred by
    `feather` px), clipped to [0, 1] and zero outside the mask: straight edges stay hard, thin parts (tails,
    ears, whiskers) blend with the background, and no pixel outside the label changes."""
    H, W = classes.shape
    s0 = _scale_for(cut, instances, rng, scale_jitter)
    flip = bool(rng.random() < 0.5)
    free = instances == 0
    obj = mask = at = None
    s = s0
    while fit < 1 and s >= fit * s0 and at is None:
        obj, mask = _resized(cut, s, flip)
        fits = mask.any() and mask.shape[0] <= H and mask.shape[1] <= W
        at = _place(free, mask, rng, anywhere=False) if fits else None
        s *= 0.8
    if at is None:
        obj, mask = _resized(cut, s0, flip)
        if mask.shape[0] > H or mask.shape[1] > W or not mask.any():
            return False
        at = _place(free, mask, rng)
    (y, x), (h, w) = at, mask.shape
    alpha = mask.astype(np.float32)
    if feather > 0:  # blur, then zero outside the mask so that no label-less pixel changes
        alpha = cv2.GaussianBlur(alpha, (0, 0), feather) * mask
        alpha = np.clip(alpha * 2, 0, 1)[..., None]
    else:
        alpha = alpha[..., None]
    region = image[y:y + h, x:x + w].astype(np.float32)
    image[y:y + h, x:x + w] = (alpha * obj + (1 - alpha) * region + 0.5).clip(0, 255).astype(np.uint8)
    instances[y:y + h, x:x + w][mask] = int(instances.max()) + 1
    classes[y:y + h, x:x + w][mask] = cut.label
    return True


def label_weights(bank: list[Cutout], n_labels: int) -> np.ndarray:
    """Probability of pasting each class 1..n_labels: inversely proportional to its object count, so the
    rarest labels are pasted most (0 for a class with no object)."""
    counts = np.bincount([c.label for c in bank], minlength=n_labels + 1)[1:].astype(np.float64)
    w = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    if w.sum() == 0:
        raise ValueError("no labelled object to paste: annotate at least one object first")
    return w / w.sum()


class Editor:
    """Makes edited images from labelled samples: a real background with real objects pasted in."""

    def __init__(self, samples: list[Sample], n_labels: int, min_area: int = 16, max_objects: int = 3,
                 scale_jitter: tuple[float, float] = (0.7, 1.2), feather: float = 1.0, fit: float = 1.0,
                 balance: bool = False):
        if not samples:
            raise ValueError("Editor needs at least one labelled sample")
        self.samples, self.n_labels = samples, n_labels
        self.bank = cutouts(samples, min_area)
        self.weights = label_weights(self.bank, n_labels)
        self.max_objects, self.scale_jitter, self.feather = max_objects, scale_jitter, feather
        self.fit = fit          # see paste(): < 1 shrinks an object to stand beside the scene's objects
        self.balance = balance  # see edit(): pasted classes even out the labelled pixels of every class

    def labels(self) -> list[int]:
        """Classes that have an object to paste."""
        return sorted({c.label for c in self.bank})

    def _pick(self, label: int, grey: bool, rng: np.random.Generator) -> Cutout:
        """A random object of class `label`: whole ones first, of the background's colour mode first."""
        pool = [c for c in self.bank if c.label == label]
        for keep in (lambda c: c.whole and c.grey == grey, lambda c: c.grey == grey, lambda c: c.whole):
            if any(keep(c) for c in pool):
                pool = [c for c in pool if keep(c)]
                break
        return pool[int(rng.integers(len(pool)))]

    def _balanced(self, totals: np.ndarray, classes: np.ndarray, rng: np.random.Generator) -> int:
        """The pasteable class with the fewest labelled pixels so far (the samples, the edits made, and this
        image as it is now) among those not yet in this image (so that objects of different classes stand side
        by side in one context, and only their looks tell them apart), else among all; ties at random."""
        here = np.bincount(classes.ravel(), minlength=len(totals))[:len(totals)]
        t = totals + here
        labels = [c for c in self.labels() if here[c] == 0] or self.labels()
        low = [c for c in labels if t[c] == min(t[c] for c in labels)]
        return low[int(rng.integers(len(low)))]

    def edit(self, n: int, label: int | None = None, seed: int = 0) -> list[Edit]:
        """n edited images. With `label`, every pasted object is of that class; without, classes are drawn
        with label_weights (rare first). With `balance`, each object after the first of an image (every
        object without `label`) is of the class with the fewest labelled pixels so far, counting the samples
        and the edits before it, so that a rare label is added without making another class the minority
        (the label model learns one class from its pixel share otherwise: a rare cat breed pasted 30 times
        became the only cat breed it predicted). Backgrounds are any sample."""
        if label is not None and label not in self.labels():
            raise ValueError(f"no object of class {label} to paste; classes with objects: {self.labels()}")
        rng = np.random.default_rng(seed)
        totals = sum(np.bincount(s.classes.ravel().astype(np.int64), minlength=self.n_labels + 1)[:self.n_labels + 1]
                     for s in self.samples) if self.balance else None   # per sample: no copy of every map at once
        out = []
        for _ in range(n):
            k = int(rng.integers(1, self.max_objects + 1))
            picks = [label if label is not None else int(rng.choice(self.n_labels, p=self.weights)) + 1
                     for _ in range(k)] if not self.balance else [label] + [None] * (k - 1)
            bg = self.samples[int(rng.integers(len(self.samples)))]
            image = np.ascontiguousarray(bg.image).copy()
            classes = bg.classes.astype(np.int32).copy()
            instances = ensure_instances(bg.classes, bg.instances).astype(np.int32).copy()
            grey = is_grey(image)
            objects, labels = [], []
            for c in picks:
                c = self._balanced(totals, classes, rng) if c is None else c
                cut = self._pick(c, grey, rng)
                if paste(image, classes, instances, cut, rng, self.scale_jitter, self.feather, self.fit):
                    objects.append(cut.source)
                    labels.append(c)
            instances = relabel(instances)  # covered objects vanish; their visible fragments keep their label
            classes = np.where(instances > 0, classes, 0).astype(np.int32)
            if totals is not None:
                totals += np.bincount(classes.ravel(), minlength=len(totals))[:len(totals)]
            sample = Sample(image, classes, instances, id=f"edit:{bg.id}:{len(out)}", synthetic=True)
            out.append(Edit(sample, bg.id, objects, labels))
        return out
