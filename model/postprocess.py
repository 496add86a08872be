"""Which predicted regions a labeller keeps, and boxes learned as boxes.

Region cut: every version learns, on its held-back images, the region-score threshold and minimum object
size that maximise F1 (or reach a precision target at the best recall), and boxes that overlap a
higher-scoring box of their class (IoU >= nms_iou) are dropped as the same object seen twice (greedy NMS
per class, as in Faster R-CNN, https://arxiv.org/abs/1506.01497). When every held-back image holds an
object (a photo of a pet always shows its head), the cut may also keep each image's best region whatever
its score: a task with no box at all costs a labeller a whole box to draw, a wrong box one click to
delete, and a score threshold alone leaves the hard images empty. The floor is kept whenever the regions
it adds on the held-back images are right often enough to pay for the deletes (`floor_pays`). The grid
of (size, score, floor) -> precision / recall is kept in the checkpoint, so a precision target set later
picks its cut without retraining.

Boxes as boxes: a box-only project paints each box's centre region (the box shrunk by `shrink` about its
centre) into the label map instead of the whole box, so boxes that overlap keep separate cores (FCOS's
centre sampling, https://arxiv.org/abs/1904.01355; CenterNet, https://arxiv.org/abs/1904.07850). A
predicted core's extent, grown back by 1 / shrink, is the predicted box.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace

import numpy as np

from . import metrics

MATCH_IOU = 0.5
FLOOR_MIN_HIT = 0.25   # the least share of a floor's added regions that must be right for it to pay (floor_pays)
F1_TIE = 0.01          # choose_cut: cuts this close to the best F1 are equals, and the one whose lower of precision
                       # and recall is higher wins (F1 is flat near its top; see choose_cut)
# the cut's score thresholds: steps of 0.05 put DSB native boxes' only balanced cut between two of them (0.3:
# precision / recall 0.853 / 0.816 on the held-back images, 0.35: 0.893 / 0.778; 0.275: 0.830 / 0.829)
SCORE_GRID = tuple(round(float(s), 3) for s in np.arange(0.0, 0.96, 0.025))
FUSE_IOU = 0.55       # fuse_boxes: boxes of one class from different passes this close are one object (WBF's)


@dataclass(frozen=True)
class RegionCut:
    """Regions kept in a prediction: score >= min_score, area >= min_area px, not an NMS duplicate."""
    min_score: float = 0.0
    min_area: float = 0.0          # pixels at the image's own size
    nms_iou: float = 0.5           # 1.0 = off
    min_keep: int = 0              # each image keeps at least its min_keep best regions of min_area, any score
    precision: float = float("nan")  # measured on the held-back images when the cut was learned
    recall: float = float("nan")
    source: str = "default"        # "learned f1", "learned precision>=0.8", "override", "default"

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict | None) -> "RegionCut":
        d = {k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__ and v is not None}
        return cls(**d)


# -----------------------------------------------------------------------------
# boxes


def clashes(boxes: np.ndarray, iou_thr: float, classes: np.ndarray | None = None, chunk: int = 256
            ) -> tuple[np.ndarray, np.ndarray]:
    """Each box's clashes: the other boxes (N, 4) (x0, y0, x1, y1), of its class when `classes` (N,) is given,
    that overlap it by IoU >= iou_thr (> 0), as CSR lists: box i's are cols[start[i]:start[i + 1]], ascending.

    Boxes are swept in order of x0, `chunk` at a time, each chunk against the boxes that start before its
    right-most edge only: a box that starts at or right of another's right edge meets it in no area. An image
    of 2048 x 2048 px holds thousands of candidate boxes (5,502 from bench.speed's model), and one IoU matrix
    over them all cost ~2 s a task, half of it system time (N x N float64 temporaries of 240 MB each, which
    malloc maps afresh from the OS every time); the sweep compares each box with its neighbours in x only."""
    assert iou_thr > 0, f"iou_thr {iou_thr}: every pair clashes at 0"
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    n = len(boxes)
    by_x = np.argsort(boxes[:, 0], kind="stable")
    b = boxes[by_x]
    rows, cols = [], []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        hi = int(np.searchsorted(b[:, 0], b[s:e, 2].max(), side="left"))
        i, j = np.nonzero(metrics.box_iou(b[s:e], b[s:hi]) >= iou_thr)
        i, j = i + s, j + s
        later = j > i                                         # each pair once: (i, j) and (j, i) are added below
        rows.append(i[later]), cols.append(j[later])
    i, j = np.concatenate(rows), np.concatenate(cols)
    i, j = by_x[i], by_x[j]
    if classes is not None:
        c = np.asarray(classes).reshape(-1)
        i, j = i[c[i] == c[j]], j[c[i] == c[j]]
    i, j = np.concatenate([i, j]), np.concatenate([j, i])
    at = np.lexsort((j, i))
    return np.searchsorted(i[at], np.arange(n + 1)), j[at]


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_thr: float, classes: np.ndarray | None = None
            ) -> np.ndarray:
    """Indices of the boxes (N, 4) (x0, y0, x1, y1) kept by greedy NMS, highest score first. With
    `classes` (N,) a box suppresses only boxes of its own class (torchvision's batched_nms): a dog's box
    that overlaps a cat's is another object, not a duplicate.

    Hand-written: torchvision's nms does not import beside the CPU torch wheel here (DESIGN.md); the boxes
    that clash are found by a sweep over x (`clashes`), so thousands of boxes cost what their neighbours do."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    if iou_thr >= 1.0 or len(order) < 2:
        return order
    start, near = clashes(boxes, iou_thr, classes)
    if not len(near):               # nothing to suppress (an instance map's objects, nearly always): all, in order
        return order
    suppressed = np.zeros(len(boxes), bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed[near[start[i]:start[i + 1]]] = True
    return np.array(keep, np.intp)


def fuse_boxes(sets: list[np.ndarray], iou_thr: float = FUSE_IOU) -> np.ndarray:
    """One image's boxes from several passes (each (N_i, 6) rows x0, y0, x1, y1, score, class) -> the fused
    boxes (M, 6), highest score first: weighted box fusion (Solovyev et al. 2019, https://arxiv.org/abs/
    1910.13302). Going down the scores, a box not yet taken gathers the untaken boxes of its class that overlap
    it by IoU >= iou_thr; the group's box is their score-weighted mean and its score their mean times the
    share of the passes that found it (min(k, n) / n), so an object one pass alone saw ranks below one all saw.

    Hand-written: the ensemble-boxes package wants coordinates normalised to [0, 1] and brings pandas and
    numba; the groups come from one sweep over x (`clashes`), as box_nms's."""
    n = len(sets)
    rows = [np.asarray(s, np.float64).reshape(-1, 6) for s in sets]
    allb = np.concatenate(rows) if rows else np.zeros((0, 6))
    if n < 2 or not len(allb):
        return allb[np.argsort(-allb[:, 4], kind="stable")]
    allb = allb[np.argsort(-allb[:, 4], kind="stable")]
    start, near = clashes(allb[:, :4], iou_thr, allb[:, 5])
    whole = (allb[:, 2] > allb[:, 0]) & (allb[:, 3] > allb[:, 1])     # a box of no area overlaps not even itself
    taken = np.zeros(len(allb), bool)
    out = []
    for i in range(len(allb)):
        if taken[i]:
            continue
        group = near[start[i]:start[i + 1]]
        group = np.sort(np.concatenate([[i] if whole[i] else [], group[~taken[group]]]).astype(np.intp))
        taken[group] = True
        s = allb[group, 4]
        box = (allb[group, :4] * s[:, None]).sum(0) / max(s.sum(), 1e-12)
        out.append([*box, s.mean() * min(len(group), n) / n, allb[i, 5]])
    out = np.array(out, np.float64).reshape(-1, 6)
    return out[np.argsort(-out[:, 4], kind="stable")]


def object_slices(instances: np.ndarray, ids: list[int]) -> dict[int, tuple[slice, slice]]:
    """Instance id -> its tight bounding box as (row slice, column slice), in one pass over the map (ids above
    max(ids) are ignored; ids absent from the map get none)."""
    from scipy.ndimage import find_objects

    if not ids:
        return {}
    instances = np.asarray(instances)
    if not np.issubdtype(instances.dtype, np.integer):
        instances = instances.astype(np.int64)
    found = find_objects(instances, max_label=max(ids))
    return {k: found[k - 1] for k in ids if found[k - 1] is not None}


def instance_boxes(instances: np.ndarray, ids: list[int], slices: dict | None = None) -> np.ndarray:
    """Half-open pixel boxes (x0, y0, x1, y1) of the given instance ids: (len(ids), 4) float. `slices`: their
    object_slices, when the caller has them."""
    slices = object_slices(instances, ids) if slices is None else slices
    out = np.zeros((len(ids), 4))
    for n, k in enumerate(ids):
        sl = slices.get(k)
        if sl is not None:
            out[n] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    return out


def grow_boxes(core_boxes: np.ndarray, shrink: float, height: int, width: int) -> np.ndarray:
    """Core boxes (N, 4) -> object boxes: sizes / shrink about the same centres, clipped to the image."""
    b = np.asarray(core_boxes, np.float64).reshape(-1, 4)
    c = (b[:, :2] + b[:, 2:]) / 2
    half = (b[:, 2:] - b[:, :2]) / (2 * shrink)
    out = np.concatenate([c - half, c + half], axis=1)
    return out.clip(0, [width, height, width, height])


def paint_box_cores(boxes: np.ndarray, labels: np.ndarray, height: int, width: int, shrink: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4) (x0, y0, x1, y1, pixel edges) with classes (N,) -> (classes, instances) (H, W) int32
    of their centre regions, instance i + 1 the core of boxes[i]. Larger boxes are painted first, so where cores
    still overlap the smaller object stays visible; every core keeps at least one pixel."""
    classes = np.zeros((height, width), np.int32)
    instances = np.zeros((height, width), np.int32)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    order = np.argsort(-(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), kind="stable")
    for i in order:
        x0, y0, x1, y1 = b[i]
        cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * shrink / 2, (y1 - y0) * shrink / 2
        c0, c1 = int(round(cx - hw)), int(round(cx + hw))
        r0, r1 = int(round(cy - hh)), int(round(cy + hh))
        c0, r0 = min(max(c0, 0), width - 1), min(max(r0, 0), height - 1)
        c1, r1 = min(max(c1, c0 + 1), width), min(max(r1, r0 + 1), height)
        classes[r0:r1, c0:c1] = int(labels[i])
        instances[r0:r1, c0:c1] = i + 1
    return classes, instances


# -----------------------------------------------------------------------------
# applying and learning a cut


def scale_boxes(boxes: dict, factor: float, height: int, width: int) -> dict:
    """Boxes (id -> (x0, y0, x1, y1)) scaled by `factor` about their centres, clipped to the image."""
    out = {}
    for k, (x0, y0, x1, y1) in boxes.items():
        cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * factor / 2, (y1 - y0) * factor / 2
        out[k] = (max(0.0, cx - hw), max(0.0, cy - hh), min(float(width), cx + hw), min(float(height), cy + hh))
    return out


def fit_box_scale(raws: list, samples: list, factors=tuple(np.round(np.arange(0.6, 1.41, 0.05), 2))) -> float:
    """The factor by which a box model's boxes are grown about their centres that matches the most true
    boxes at IoU 0.5 on held-back images (then the highest mean IoU): predicted centre regions come out
    systematically larger or smaller than the painted ones (blur, outline growth), and that bias shows
    directly in box IoU."""
    pairs = [(r, true_objects(s)[0]) for r, s in zip(raws, samples) if r.boxes]
    if not pairs:
        return 1.0
    best, best_key = 1.0, (-1, -1.0)
    for f in factors:
        matched, iou_sum = 0, 0.0
        for r, t in pairs:
            ids = sorted(r.boxes)
            b = np.array([r.boxes[k] for k in ids]) * 1.0
            c, half = (b[:, :2] + b[:, 2:]) / 2, (b[:, 2:] - b[:, :2]) * f / 2
            ious = metrics.box_iou(np.concatenate([c - half, c + half], 1), t)
            m = metrics.greedy_match(ious, MATCH_IOU)
            matched += len(m)
            iou_sum += sum(ious[p, q] for p, q in m)
        key = (matched, iou_sum)
        if key > best_key:
            best, best_key = float(f), key
    return best


def kept_regions(scores: np.ndarray, areas: np.ndarray, boxes: np.ndarray, cut: RegionCut,
                 classes: np.ndarray | None = None) -> np.ndarray:
    """Indices of the regions a cut keeps, highest score first (score and size first, then NMS among the
    survivors, per class when `classes` is given); when fewer than `cut.min_keep` survive, the image's
    min_keep best regions of min_area after NMS.

    Greedy NMS goes by descending score, so the survivors of the score cut are a prefix of the NMS over
    every region of min_area: the floor only takes that prefix further."""
    scores, areas = np.asarray(scores, np.float64), np.asarray(areas, np.float64)
    big = areas >= cut.min_area
    keep = _nms(np.flatnonzero((scores >= cut.min_score) & big), scores, boxes, cut.nms_iou, classes)
    if len(keep) < cut.min_keep:
        keep = _nms(np.flatnonzero(big), scores, boxes, cut.nms_iou, classes)[:cut.min_keep]
    return keep


def _nms(idx: np.ndarray, scores: np.ndarray, boxes: np.ndarray, iou: float, classes: np.ndarray | None
         ) -> np.ndarray:
    """The indices `idx` that survive NMS, highest score first."""
    if len(idx) < 2:
        return idx
    return idx[box_nms(np.asarray(boxes)[idx], scores[idx], iou,
                       None if classes is None else np.asarray(classes)[idx])]


@dataclass
class ImageRecord:
    """One held-back image's raw (uncut) regions against its true objects, for learning a cut."""
    scores: np.ndarray    # (P,)
    areas: np.ndarray     # (P,) px
    boxes: np.ndarray     # (P, 4) predicted boxes
    ious: np.ndarray      # (P, T) IoU with each true object (mask or box IoU)
    true_areas: np.ndarray  # (T,)
    classes: np.ndarray | None = None  # (P,) predicted classes: NMS per class


def count_matches(rec: ImageRecord, keep: np.ndarray) -> int:
    """True objects matched one-to-one at IoU >= MATCH_IOU by the kept regions."""
    if not len(keep) or not rec.ious.shape[1]:
        return 0
    return len(metrics.greedy_match(rec.ious[keep], MATCH_IOU))


def cut_grid(records: list[ImageRecord], nms_iou: float = 0.5) -> list[dict]:
    """Precision / recall / F1 for every (min_area, min_score, min_keep) candidate, pooled over the images.

    Size candidates are 0 and fractions of the small true objects' area (the 5th percentile), so a cut
    never removes objects the people labelled as small. Floor candidates are none and, when every image
    holds an object, one: each image's best region. (Not the fewest objects an image holds: over a few
    dozen held-back images that minimum overstates what the next image holds.)"""
    true_areas = np.concatenate([r.true_areas for r in records]) if records else np.zeros(0)
    small = float(np.percentile(true_areas, 5)) if true_areas.size else 0.0
    area_grid = sorted({0.0} | {round(f * small, 1) for f in (0.1, 0.25, 0.5)})
    floor = int(bool(records) and min(r.ious.shape[1] for r in records) > 0)
    n_true = int(true_areas.size)
    rows = []
    for a in area_grid:
        # greedy NMS goes by descending score, so NMS-then-score-cut equals score-cut-then-NMS: one NMS per size
        kept = [kept_regions(r.scores, r.areas, r.boxes, RegionCut(min_area=a, nms_iou=nms_iou), r.classes)
                for r in records]
        for s in SCORE_GRID:
            passed = [int(np.count_nonzero(r.scores[k] >= s)) for r, k in zip(records, kept)]
            for f in sorted({0, floor}):
                tp = n_pred = 0
                for r, k, n in zip(records, kept, passed):
                    keep = k[:max(n, f)]        # k is in descending score: the score cut is a prefix of it
                    n_pred += len(keep)
                    tp += count_matches(r, keep)
                p = tp / n_pred if n_pred else 1.0
                rc = tp / n_true if n_true else 1.0
                rows.append({"min_area": a, "min_score": s, "min_keep": f, "precision": round(p, 4),
                             "recall": round(rc, 4), "f1": round(2 * p * rc / (p + rc), 4) if p + rc else 0.0,
                             "n_pred": n_pred, "n_true": n_true, "tp": tp})
    return rows


def floor_pays(grid: list[dict]) -> list[dict]:
    """Per size and score cut of the grid, one row: with the floor when the floor pays for itself there (it
    adds regions and at least FLOOR_MIN_HIT of them match an object), else without it. F1 counts a wrong
    region and a missed object alike, but a labeller deletes a wrong box with a click or two and draws a
    missed one: verifying a box takes ~1.6 s, drawing one 7 s with extreme clicking (Papadopoulos et al.,
    https://arxiv.org/abs/1602.08405 and https://arxiv.org/abs/1708.02750), so a region added to an
    otherwise empty task is worth keeping when it is right more than ~2 in 9 times."""
    floors = {(r["min_area"], r["min_score"]): r for r in grid if r.get("min_keep", 0)}
    out = []
    for r in grid:
        if r.get("min_keep", 0):
            continue
        f = floors.get((r["min_area"], r["min_score"]))
        added = 0 if f is None else f["n_pred"] - r["n_pred"]
        out.append(f if added > 0 and _tp(f) - _tp(r) >= FLOOR_MIN_HIT * added else r)
    return out


def _tp(row: dict) -> int:
    """A grid row's matched regions (rows stored before stop 29 have only the rounded precision)."""
    return int(row["tp"]) if "tp" in row else round(row["precision"] * row["n_pred"])


def choose_cut(grid: list[dict], precision_target: float = 0.0, nms_iou: float = 0.5) -> RegionCut:
    """The cut of a grid: best F1, or with precision_target > 0 the best recall among the cuts that reach
    it (the most precise cut when none does). Ties go to the lower thresholds (more kept), then (precision
    target) to no floor. For F1, each threshold has the floor only where it pays (`floor_pays`: every
    held-back image holds an object, and the regions it adds there are right often enough), and F1 picks
    among those rows: among the cuts within F1_TIE of the best F1, the one whose lower of precision and
    recall is the higher. F1 is flat near its top, so the strict best sat anywhere along it: DSB native boxes
    (stop 41) at precision 0.89 / recall 0.76, a missed nucleus for every ~3 wrong boxes saved, where a
    labeller draws a missed box in ~7 s and deletes a wrong one in ~1.6 (floor_pays). A grid stored before
    floors existed has none (min_keep 0)."""
    if not grid:
        return RegionCut(nms_iou=nms_iou)
    if precision_target > 0:
        ok = [r for r in grid if r["precision"] >= precision_target]
        if ok:
            best = max(ok, key=lambda r: (r["recall"], r["f1"], -r["min_score"], -r["min_area"],
                                          -r.get("min_keep", 0)))
            source = f"learned precision>={precision_target:g}"
        else:
            best = max(grid, key=lambda r: (r["precision"], r["recall"]))
            source = f"learned precision>={precision_target:g} (not reached)"
    else:
        rows = floor_pays(grid)
        top = max(r["f1"] for r in rows)
        best = max((r for r in rows if r["f1"] >= top - F1_TIE),
                   key=lambda r: (min(r["precision"], r["recall"]), r["f1"], -r["min_score"], -r["min_area"]))
        source = "learned f1"
    return RegionCut(min_score=best["min_score"], min_area=best["min_area"], nms_iou=nms_iou,
                     min_keep=int(best.get("min_keep", 0)),
                     precision=best["precision"], recall=best["recall"], source=source)


def resolve_cut(stored: dict | None, precision_target: float = 0.0, min_score: float | None = None) -> RegionCut:
    """The cut a predictor applies: the checkpoint's grid re-chosen for `precision_target` (else its
    stored choice), with `min_score` (an operator's override) replacing the learned score threshold and
    floor: the override keeps exactly the regions scoring at least it."""
    stored = stored or {}
    nms = float(stored.get("nms_iou", 0.5))
    if precision_target > 0 and stored.get("grid"):
        cut = choose_cut(stored["grid"], precision_target, nms)
    else:
        cut = RegionCut.from_dict(stored.get("chosen")) if stored.get("chosen") else RegionCut(nms_iou=nms)
    if min_score is not None and min_score >= 0:
        cut = replace(cut, min_score=float(min_score), min_keep=0, precision=float("nan"), recall=float("nan"),
                      source="override")
    return cut


# -----------------------------------------------------------------------------
# held-back evaluation


def box_sample(image: np.ndarray, boxes: np.ndarray, shrink: float, id: str = "", synthetic: bool = False):
    """A box-labelled image -> a Sample whose label map holds the boxes' centre regions (instance i + 1: boxes[i]).

    boxes: (N, 5) rows (x0, y0, x1, y1, class 1..C) in pixel edges."""
    from .data import Sample

    b = np.asarray(boxes, np.float64).reshape(-1, 5)
    classes, instances = paint_box_cores(b[:, :4], b[:, 4].astype(np.int32), *image.shape[:2], shrink)
    return Sample(image=image, classes=classes, instances=instances, id=id, synthetic=synthetic, boxes=b)


POINT_BOX_PX = (6.0, 48.0, 16.0)      # a point's box: at least, at most, and where no image has two points


def point_box_size(points: list[np.ndarray]) -> float:
    """The side (px) of the box a counting project's points are learned as (points_to_boxes): half the median
    distance from a point to the nearest other point of its image, within POINT_BOX_PX. Objects are seldom closer
    together than they are wide, so the box's centre region (box_shrink) lies inside its object and clear of the
    next one's; a point has no size of its own. `points`: each image's (N, 2+) x, y rows."""
    from scipy.spatial import cKDTree

    gaps = [cKDTree(p[:, :2]).query(p[:, :2], k=2)[0][:, 1] for p in points if len(p) >= 2]
    lo, hi, default = POINT_BOX_PX
    return float(np.clip(0.5 * np.median(np.concatenate(gaps)), lo, hi)) if gaps else default


def points_to_boxes(points: np.ndarray, side: float) -> np.ndarray:
    """(N, 3) x, y, class rows -> (N, 5) boxes (x0, y0, x1, y1, class) of `side` px centred on the points: what a
    box model learns a point as (its centre, where the detection head finds the object)."""
    p = np.asarray(points, np.float64).reshape(-1, 3)
    h = side / 2.0
    return np.stack([p[:, 0] - h, p[:, 1] - h, p[:, 0] + h, p[:, 1] + h, p[:, 2]], 1)


def true_objects(sample) -> tuple[np.ndarray, np.ndarray]:
    """(boxes (T, 4), classes (T,)) of a sample's true objects: its boxes, else its instances'."""
    if sample.boxes is not None:
        b = np.asarray(sample.boxes, np.float64).reshape(-1, 5)
        return b[:, :4], b[:, 4].astype(np.int32)
    ids = [int(i) for i in np.unique(sample.instances) if i]
    cls = _majority_class(sample.instances, sample.classes, ids)
    return instance_boxes(sample.instances, ids), cls


def spread_subset(samples: list, n: int) -> list:
    """At most n samples (0 = all) spread evenly over the classes (a sample's class: its most frequent object
    class), in a fixed order by id hash within each class, taken round-robin: the same subset every time, and
    every class in it while n allows. Not the first n by name: on Pets those are all one breed of cat."""
    if not n or len(samples) <= n:
        return list(samples)
    groups: dict[int, list] = {}
    for s in samples:
        cls = true_objects(s)[1]
        groups.setdefault(int(np.bincount(cls).argmax()) if len(cls) else 0, []).append(s)
    queues = [sorted(g, key=lambda s: _subset_hash(s.id)) for _, g in sorted(groups.items())]
    out = []
    while len(out) < n:
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def _subset_hash(i: str) -> int:
    return int.from_bytes(hashlib.sha1(f"subset:{i}".encode()).digest()[:8], "big")


def _majority_class(instances: np.ndarray, classes: np.ndarray, ids: list[int]) -> np.ndarray:
    if not ids:
        return np.zeros(0, np.int32)
    flat_i, flat_c = instances.ravel().astype(np.int64), classes.ravel().astype(np.int64)
    n_c = int(flat_c.max()) + 1
    joint = np.bincount(flat_i * n_c + flat_c, minlength=(max(ids) + 1) * n_c).reshape(-1, n_c)
    joint[:, 0] = 0
    return joint[ids].argmax(1).astype(np.int32)


def pred_objects(pred) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids, boxes (P, 4), areas (P,), scores (P,), classes (P,)) of a Prediction's regions."""
    ids = sorted(pred.instance_label)
    if pred.boxes is not None:
        boxes = np.array([pred.boxes[k] for k in ids], np.float64).reshape(-1, 4)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    else:
        boxes = instance_boxes(pred.instances, ids)
        areas = np.bincount(pred.instances.ravel(), minlength=max(ids, default=0) + 1)[ids].astype(np.float64)
    scores = np.array([pred.instance_score.get(k, 0.0) for k in ids], np.float64)
    classes = np.array([pred.instance_label[k] for k in ids], np.int32)
    return ids, boxes, areas, scores, classes


def image_record(pred, sample) -> ImageRecord:
    """Raw regions of one held-back image against its truth: box IoU for box samples and for a box model's
    regions (a mask model's head judged on the boxes of the true masks), mask IoU else."""
    ids, boxes, areas, scores, classes = pred_objects(pred)
    t_boxes, _ = true_objects(sample)
    if sample.boxes is not None or pred.boxes is not None:
        ious = metrics.box_iou(boxes, t_boxes)
        t_areas = (t_boxes[:, 2] - t_boxes[:, 0]) * (t_boxes[:, 3] - t_boxes[:, 1])
    else:
        full, p_ids, t_ids = metrics.instance_iou_matrix(pred.instances, sample.instances)
        rows = {int(k): n for n, k in enumerate(p_ids)}
        ious = np.zeros((len(ids), len(t_ids)))
        for n, k in enumerate(ids):
            if k in rows:
                ious[n] = full[rows[k]]
        t_areas = np.bincount(sample.instances.ravel())[t_ids].astype(np.float64)
    return ImageRecord(scores, areas, boxes, ious, t_areas, classes)


def detection_metrics(raws: list, cut: RegionCut, samples: list, n_classes: int,
                      label_names: list[str] | None = None) -> dict:
    """Box AP50 (all regions after NMS, per class and mean, and with the classes merged), and after the cut: precision, recall, F1,
    per-class recall, regions per image against the true count, and the classes no region found."""
    nms_only = RegionCut(nms_iou=cut.nms_iou)
    names = label_names or [f"class_{c}" for c in range(1, n_classes + 1)]
    per_class_p = {c: [] for c in range(1, n_classes + 1)}
    per_class_t = {c: [] for c in range(1, n_classes + 1)}
    any_p, any_t = [], []         # every class as one: does it find the objects, whatever it calls them
    tp = n_pred = n_true = 0
    class_tp = np.zeros(n_classes + 1)
    class_true = np.zeros(n_classes + 1)
    for raw, s in zip(raws, samples):
        rec = image_record(raw, s)
        _, boxes, _, scores, classes = pred_objects(raw)
        t_boxes, t_cls = true_objects(s)
        all_keep = kept_regions(scores, rec.areas, boxes, nms_only, classes)
        any_p.append(np.concatenate([boxes[all_keep], scores[all_keep, None]], 1))
        any_t.append(t_boxes)
        for c in per_class_p:
            k = all_keep[classes[all_keep] == c]
            per_class_p[c].append(np.concatenate([boxes[k], scores[k, None]], 1))
            per_class_t[c].append(t_boxes[t_cls == c])
        keep = kept_regions(scores, rec.areas, boxes, cut, classes)
        pairs = metrics.greedy_match(rec.ious[keep], MATCH_IOU) if len(keep) and len(t_cls) else []
        tp, n_pred, n_true = tp + len(pairs), n_pred + len(keep), n_true + len(t_cls)
        for p, t in pairs:
            class_tp[t_cls[t]] += classes[keep[p]] == t_cls[t]
        np.add.at(class_true, t_cls, 1)
    present = [c for c in per_class_p if class_true[c] > 0]
    class_ap = {names[c - 1]: metrics.box_ap50_many(per_class_p[c], per_class_t[c]) for c in present}
    class_recall = {names[c - 1]: float(class_tp[c] / class_true[c]) for c in present}
    precision, recall = tp / max(n_pred, 1), tp / max(n_true, 1)
    return {"box_ap50": float(np.mean(list(class_ap.values()))) if class_ap else 1.0,
            "class_ap50": class_ap, "class_recall": class_recall,
            "agnostic_ap50": metrics.box_ap50_many(any_p, any_t),
            "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(precision + recall, 1e-9),
            "regions_per_image": n_pred / max(len(samples), 1), "true_per_image": n_true / max(len(samples), 1),
            "missed_classes": [n for n, r in class_recall.items() if r == 0.0]}
