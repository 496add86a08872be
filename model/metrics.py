"""Segmentation and detection metrics on numpy arrays: IoU, mean IoU, instance matching, box AP50,
and correlations (for "does confidence track quality?").

Instance overlaps come from one contingency table (np.bincount over joint ids), so hundreds of instances
cost one pass over the pixels. AP50 is VOC-style (all-point interpolated precision, PASCAL VOC 2010+);
instance_ap is the Data Science Bowl 2018 score (TP / (TP + FP + FN) averaged over IoU 0.5..0.95).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.ndimage import find_objects
from scipy.stats import rankdata

Box = tuple[int, int, int, int]


def iou(pred: np.ndarray, true: np.ndarray) -> float:
    """IoU of two boolean masks; 1.0 when both are empty."""
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    assert pred.shape == true.shape, f"shape mismatch {pred.shape} vs {true.shape}"
    union = np.count_nonzero(pred | true)
    return 1.0 if union == 0 else np.count_nonzero(pred & true) / union


def confusion(pred: np.ndarray, true: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes + 1) x (n_classes + 1) pixel counts, rows = true class, cols = predicted (0 = bg)."""
    pred, true = np.asarray(pred).ravel(), np.asarray(true).ravel()
    assert pred.shape == true.shape, f"shape mismatch {pred.shape} vs {true.shape}"
    k = n_classes + 1
    for name, a in (("pred", pred), ("true", true)):
        if a.size and (a.min() < 0 or a.max() >= k):
            raise ValueError(f"{name} has class {a.min()}..{a.max()} outside 0..{n_classes}; "
                             f"pass n_classes = number of foreground labels")
    return np.bincount(true.astype(np.int64) * k + pred, minlength=k * k).reshape(k, k)


def per_class_iou(pred: np.ndarray, true: np.ndarray, n_classes: int) -> np.ndarray:
    """IoU of each foreground class 1..n_classes (NaN where the class is absent from both maps)."""
    cm = confusion(pred, true, n_classes)
    inter = np.diag(cm)[1:].astype(np.float64)
    union = cm.sum(0)[1:] + cm.sum(1)[1:] - inter
    out = np.full(n_classes, np.nan)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def mean_iou(pred_classes: np.ndarray, true_classes: np.ndarray, n_classes: int) -> float:
    """Mean IoU over foreground classes 1..n_classes present in either map; 1.0 if none is present."""
    ious = per_class_iou(pred_classes, true_classes, n_classes)
    ious = ious[~np.isnan(ious)]
    return float(ious.mean()) if ious.size else 1.0


def instance_iou_matrix(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU between every predicted and true instance: (iou (P, T), pred ids (P,), true ids (T,)), ids ascending.

    Counted with bincounts over the ids (two passes over the maps, pairs over the pixels both cover): np.unique
    sorts every pixel, 0.7 s a 2048 x 2048 map, and each held-back image is measured several times a version.
    Ids far above the pixel count (or negative) fall back to the sort."""
    pred, true = np.asarray(pred), np.asarray(true)
    assert pred.shape == true.shape, f"shape mismatch {pred.shape} vs {true.shape}"
    p, t = pred.ravel(), true.ravel()
    if p.size == 0 or p.dtype.kind not in "iu" or t.dtype.kind not in "iu" \
            or min(p.min(), t.min()) < 0 or max(p.max(), t.max()) > 4 * p.size:
        return _iou_matrix_sorted(p, t)
    area_p, area_t = np.bincount(p.astype(np.intp, copy=False)), np.bincount(t.astype(np.intp, copy=False))
    p_ids, t_ids = np.flatnonzero(area_p[1:]) + 1, np.flatnonzero(area_t[1:]) + 1
    row, col = np.zeros(area_p.size, np.int64), np.zeros(area_t.size, np.int64)
    row[p_ids], col[t_ids] = np.arange(p_ids.size), np.arange(t_ids.size)
    both = (p != 0) & (t != 0)
    inter = np.bincount(row[p[both]] * t_ids.size + col[t[both]], minlength=p_ids.size * t_ids.size)
    inter = inter.reshape(p_ids.size, t_ids.size).astype(np.float64)
    union = area_p[p_ids][:, None] + area_t[t_ids][None, :] - inter
    return inter / np.maximum(union, 1), p_ids.astype(pred.dtype), t_ids.astype(true.dtype)


def _iou_matrix_sorted(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """instance_iou_matrix of two flat maps through np.unique (any ids)."""
    p_ids, p_idx = np.unique(pred, return_inverse=True)    # p_idx: contiguous 0..len-1, 0 <-> bg if present
    t_ids, t_idx = np.unique(true, return_inverse=True)
    n_p, n_t = len(p_ids), len(t_ids)
    joint = np.bincount(p_idx.ravel() * n_t + t_idx.ravel(), minlength=n_p * n_t).reshape(n_p, n_t)
    area_p, area_t = joint.sum(1), joint.sum(0)
    keep_p, keep_t = p_ids != 0, t_ids != 0                  # drop background rows / columns
    inter = joint[keep_p][:, keep_t].astype(np.float64)
    union = area_p[keep_p][:, None] + area_t[keep_t][None, :] - inter
    return inter / np.maximum(union, 1), p_ids[keep_p], t_ids[keep_t]


def greedy_match(ious: np.ndarray, thr: float) -> list[tuple[int, int]]:
    """One-to-one pairs (p, t) with IoU >= thr, best IoU first (unique anyway when thr > 0.5)."""
    ps, ts = np.nonzero(ious >= thr)
    order = np.argsort(-ious[ps, ts], kind="stable")
    used_p, used_t, pairs = set(), set(), []
    for p, t in zip(ps[order], ts[order]):
        if p not in used_p and t not in used_t:
            used_p.add(p)
            used_t.add(t)
            pairs.append((int(p), int(t)))
    return pairs


def instance_match(pred_instances: np.ndarray, true_instances: np.ndarray, thr: float = 0.5) -> dict:
    """Match instances one-to-one at IoU >= thr.

    Returns {"recall", "precision", "f1", "matched", "n_pred", "n_true", "mean_matched_iou"}; recall
    (precision) is 1.0 when there are no true (predicted) instances.
    """
    ious, p_ids, t_ids = instance_iou_matrix(pred_instances, true_instances)
    pairs = greedy_match(ious, thr)
    matched, n_pred, n_true = len(pairs), len(p_ids), len(t_ids)
    recall = matched / n_true if n_true else 1.0
    precision = matched / n_pred if n_pred else 1.0
    f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
    mean_matched = float(np.mean([ious[p, t] for p, t in pairs])) if pairs else 0.0
    return {"recall": recall, "precision": precision, "f1": f1, "matched": matched,
            "n_pred": n_pred, "n_true": n_true, "mean_matched_iou": mean_matched}


def instance_ap(pred_instances: np.ndarray, true_instances: np.ndarray,
                thresholds: Sequence[float] = tuple(np.arange(0.5, 1.0, 0.05))) -> float:
    """Data Science Bowl 2018 score: mean over thresholds of TP / (TP + FP + FN); 1.0 if both empty."""
    ious, p_ids, t_ids = instance_iou_matrix(pred_instances, true_instances)
    if not len(p_ids) and not len(t_ids):
        return 1.0
    scores = []
    for thr in thresholds:
        tp = len(greedy_match(ious, thr))
        scores.append(tp / (len(p_ids) + len(t_ids) - tp))
    return float(np.mean(scores))


def boxes_from_instances(instances: np.ndarray) -> list[Box]:
    """Half-open pixel boxes (x0, y0, x1, y1) of each instance, in increasing id order (x1 = last col + 1)."""
    instances = np.asarray(instances)
    ids, idx = np.unique(instances, return_inverse=True)
    idx = idx.reshape(instances.shape)
    if ids[0] != 0:
        idx = idx + 1                                        # find_objects skips label 0: keep every id
    boxes = []
    for sl in find_objects(idx):
        if sl is not None:
            ys, xs = sl
            boxes.append((xs.start, ys.start, xs.stop, ys.stop))
    return boxes


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (N, M) between boxes a (N, 4) and b (M, 4) given as (x0, y0, x1, y1)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = (x1 - x0).clip(0) * (y1 - y0).clip(0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_ap50_many(preds: Sequence, trues: Sequence) -> float:
    """VOC AP at IoU 0.5 over several images: preds[i] is (N_i, 5) (x0, y0, x1, y1, score), trues[i] (M_i, 4).

    A prediction matches the unmatched true box of its image with the highest IoU >= 0.5, in order of
    decreasing score. AP = area under the monotone precision envelope. No true boxes: 1.0 if there are no
    predictions either, else 0.0.
    """
    assert len(preds) == len(trues), f"{len(preds)} prediction lists for {len(trues)} images"
    n_true = sum(len(np.asarray(t).reshape(-1, 4)) for t in trues)
    records = []                                              # (score, image index, box)
    for i, p in enumerate(preds):
        for row in np.asarray(p, np.float64).reshape(-1, 5):
            records.append((row[4], i, row[:4]))
    if n_true == 0:
        return 1.0 if not records else 0.0
    records.sort(key=lambda r: -r[0])
    true_boxes = [np.asarray(t, np.float64).reshape(-1, 4) for t in trues]
    used = [np.zeros(len(t), bool) for t in true_boxes]
    tp = np.zeros(len(records))
    for k, (_, i, box) in enumerate(records):
        if not len(true_boxes[i]):
            continue
        ious = box_iou(box[None], true_boxes[i])[0]
        ious[used[i]] = -1
        j = int(np.argmax(ious))
        if ious[j] >= 0.5:
            used[i][j] = True
            tp[k] = 1
    ctp = np.cumsum(tp)
    recall = ctp / n_true
    precision = ctp / np.arange(1, len(records) + 1)
    # all-point interpolation: precision envelope, summed over recall steps
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def box_ap50(pred_boxes_with_scores: Sequence, true_boxes: Sequence) -> float:
    """VOC AP at IoU 0.5 for one image: pred (N, 5) rows (x0, y0, x1, y1, score), true (M, 4)."""
    return box_ap50_many([pred_boxes_with_scores], [true_boxes])


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when fewer than 2 points or either side is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.shape == y.shape, f"shape mismatch {x.shape} vs {y.shape}"
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (ties get average ranks); NaN as for pearson."""
    return pearson(rankdata(x), rankdata(y))
