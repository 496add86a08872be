"""Predictions a labeller keeps: box AP50 and precision / recall after the learned region cut, on real data.

    .venv/bin/python -m bench.regions --task dsb_boxes [--budget 180 | --iters 300] [--max-val 40] [--name N]
        [--methods head centres] [--seeds 0 1 2] [--curve] [--set box_max_scale=2 ...]
        [--reuse NAME] [--box-flip off on] [--box-scales learn|off] [--init NAME]
    tasks: dsb_points, dsb_native_points (DSB 2018 as a counting project, KeyPointLabels: one point an object,
           learned as boxes of one side around the points as the product learns them; a point counts where it
           lies on an object no better point took),
           dsb_boxes (DSB 2018 trained from boxes only: boxes from the instance maps, masks withheld; images
           downsampled to 256 px on their long side, a harder stand-in),
           dsb_native_boxes (the same at the images' own size, 256x256 to 1388x1040, as a user's photos come),
           dsb_masks (DSB 2018 instance masks: the brush / polygon region types; a mask model's head boxes, what
           RectangleLabels beside them get, under head_after_cut), dsb_native_masks (the same at native size),
           pets_heads (Oxford-IIIT Pet head boxes, cat / dog)
    methods (box tasks): head (the CenterNet detection head, model/boxhead.py), centres (box centres painted
           into the label map and grown back into boxes, the method before it), baseline (no model: one box of
           the training boxes' median relative size at every image's centre, of the most frequent class)
    --reuse NAME: no training; the checkpoints run --name NAME left (/tmp/tessera-bench-regions/NAME) are
           evaluated again, e.g. with --box-flip off on (a row each: the box head's test-time flip, the cut
           learned again on the held-back images for each)
    --init NAME: each run warm-starts from the checkpoint run --name NAME left (same task, method, seed), as a
           project's later "Start training" runs start from the served version (e.g. --iters 600, the product's
           TESSERA_TRAIN_ITERS)
    --curve: box AP50 on the validation images at every evaluation of the run, against training seconds
           (evaluation time excluded), for "first useful version" (AP50 within 5 points of the run's best)

Split as a project is: the fixed 80/20 split by id hash gives the validation images the figures are
measured on; 20% of the training ids (by the same hash) play the project's held-back tasks, on which the
version picks its best state and learns its region cut. Writes bench/results/<name>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import dataset, train_overrides, write_result
from tessera.model import metrics
from tessera.model.checkpoint import load_checkpoint, save_checkpoint
from tessera.model.data import Sample, load_folder, read_image, split_ids
from tessera.model.inference import Prediction, Predictor
from tessera.model.postprocess import RegionCut, box_sample, instance_boxes, spread_subset, true_objects
from tessera.model import train_vqvae as tv
from tessera.model.postprocess import detection_metrics
from tessera.model.train_vqvae import TrainConfig, evaluate, raw_predictions, train as train_vqvae

BOX_SHRINK = 0.6


def dsb(boxes: bool, native: bool = False) -> tuple[list[Sample], list[str]]:
    """DSB 2018 at 256 px (images downsampled from their native size) or at native size (the same ids, so
    the same fixed split; 256x256 to 1388x1040, evaluated at that size)."""
    samples, names = load_folder(dataset("dsb2018_native" if native else "dsb2018"))
    if not boxes:
        return samples, names
    out = []
    for s in samples:
        b = np.array(metrics.boxes_from_instances(s.instances), np.float64).reshape(-1, 4)
        out.append(box_sample(s.image, np.concatenate([b, np.ones((len(b), 1))], 1), BOX_SHRINK, s.id))
    return out, names


def pets_heads() -> tuple[list[Sample], list[str]]:
    root = dataset("pets")
    heads = json.loads((root / "head_boxes.json").read_text())
    names = ["cat", "dog"]
    out = []
    for name, objs in sorted(heads.items()):
        image = read_image(root / "images" / f"{name}.jpg")
        b = np.array([[o["xmin"], o["ymin"], o["xmax"], o["ymax"], names.index(o["label"]) + 1] for o in objs],
                     np.float64).reshape(-1, 5)
        out.append(box_sample(image, b, BOX_SHRINK, name))
    return out, names


TRUE_INSTANCES: dict[str, np.ndarray] = {}      # a point task's true objects by sample id: what its points count
POINT_SIDE: dict[str, float] = {}                # a point task's box side (TrainConfig.point_side), by task


def dsb_points(native: bool = False) -> tuple[list[Sample], list[str]]:
    """DSB 2018 as a counting project: one point an object (its centroid, the pixel nearest it where the centroid
    is off the object), learned as the product learns a KeyPointLabels project (each point a box of one side,
    postprocess.point_box_size over the training images' points); the instance maps kept to count hits."""
    from tessera.backend.regions import inner_point
    from tessera.model.postprocess import object_slices, point_box_size, points_to_boxes

    samples, names = load_folder(dataset("dsb2018_native" if native else "dsb2018"))
    points = {}
    for s in samples:
        ids = [int(k) for k in np.unique(s.instances) if k]
        found = object_slices(s.instances, ids)
        rows = []
        for k, sl in sorted(found.items()):
            cx, cy = inner_point(s.instances[sl] == k)
            rows.append((sl[1].start + cx, sl[0].start + cy, 1.0))
        points[s.id] = np.array(rows, np.float64).reshape(-1, 3)
        TRUE_INSTANCES[s.id] = s.instances
    train_ids, _ = split_ids([s.id for s in samples], 0.2)
    side = point_box_size([points[i] for i in train_ids])
    POINT_SIDE["dsb_native_points" if native else "dsb_points"] = side
    print(f"points learned as boxes of {side:.1f} px", flush=True)
    return [box_sample(s.image, points_to_boxes(points[s.id], side), BOX_SHRINK, s.id) for s in samples], names


def point_metrics(raws: list, cut: RegionCut, val: list[Sample]) -> dict:
    """A counting project's figures after the cut: each predicted point (the centre of a kept box, best score
    first) is a hit where it lies on a true object no earlier point counted; precision, recall, F1 and the
    predicted / true count per image."""
    from tessera.model.inference import cut_regions
    hits = n_pred = n_true = 0
    ratios = []
    for raw, s in zip(raws, val):
        p = cut_regions(raw, cut)
        inst = TRUE_INSTANCES[s.id]
        h, w = inst.shape
        taken = set()
        for k in sorted(p.instance_label, key=lambda k: -p.instance_score.get(k, 0.0)):
            x0, y0, x1, y1 = p.boxes[k]
            x, y = min(w - 1, max(0, int((x0 + x1) / 2))), min(h - 1, max(0, int((y0 + y1) / 2)))
            if inst[y, x] and int(inst[y, x]) not in taken:
                taken.add(int(inst[y, x]))
        true = len(np.unique(inst)) - 1
        hits, n_pred, n_true = hits + len(taken), n_pred + len(p.instance_label), n_true + true
        ratios.append(len(p.instance_label) / max(true, 1))
    precision, recall = hits / max(n_pred, 1), hits / max(n_true, 1)
    return {"point_precision": round(precision, 4), "point_recall": round(recall, 4),
            "point_f1": round(2 * precision * recall / max(precision + recall, 1e-9), 4),
            "points_per_image": round(n_pred / max(len(val), 1), 2),
            "true_per_image": round(n_true / max(len(val), 1), 2),
            "count_ratio_median": round(float(np.median(ratios)), 3) if ratios else None}


TASKS = {"dsb_boxes": lambda: dsb(True), "dsb_native_boxes": lambda: dsb(True, native=True),
         "dsb_masks": lambda: dsb(False), "dsb_native_masks": lambda: dsb(False, native=True),
         "pets_heads": lambda: pets_heads(), "dsb_points": lambda: dsb_points(),
         "dsb_native_points": lambda: dsb_points(native=True)}
POINT_TASKS = ("dsb_points", "dsb_native_points")
MASK_TASKS = ("dsb_masks", "dsb_native_masks")


def run(task: str, budget_s: float, precision_target: float, work: Path, iters: int = 0, max_val: int = 0,
        method: str = "head", seed: int = 0, curve: bool = False, box_select: bool = True,
        overrides: dict | None = None, reuse: str = "", box_flip: bool | None = None, init: str = "",
        box_scales: str = "") -> dict:
    samples, names = TASKS[task]()
    fit, held, val = split_fit_held_val(samples, max_val)
    box = task not in MASK_TASKS
    if method == "baseline":
        return baseline(task, fit, val, names, seed)
    print(f"{task} {method} seed {seed}: {len(fit)} train, {len(held)} held back (cut), {len(val)} validation; "
          f"labels {names}", flush=True)
    cfg = TrainConfig(**{**dict(max_iters=iters or 100_000, time_budget_s=0.0 if iters else budget_s,
                                eval_interval=(25 if curve else max(50, iters // 4)) if iters else 150, device="cpu",
                                box_shrink=BOX_SHRINK if box else 1.0, precision_target=precision_target,
                                box_head=method == "head", seed=seed, box_select=box_select,
                                point_side=POINT_SIDE.get(task, 0.0)),
                         **(overrides or {})})     # --set may override any of these (the product's first run)
    points = []
    t0 = time.time()
    ckpt_name = f"{task}_{method}_{seed}_{'ap' if box_select else 'iou'}.pt"
    if reuse:
        ckpt = reused(work.parent / reuse / ckpt_name, work / ckpt_name)
    else:
        init_from = work.parent / init / ckpt_name if init else None     # a later run: warm-started
        if init_from is not None and not init_from.is_file():
            raise SystemExit(f"--init: no checkpoint {init_from}")
        with _curve(points, val, names) if curve else _nothing():
            ckpt = train_vqvae(cfg, fit, held, names, work / ckpt_name, init_from=init_from)
    wall = time.time() - t0
    payload = load_checkpoint(ckpt, "vqvae")
    done_iters = int(payload["iter_num"])
    held_history = [{"iter": h["iter"], **{k: round(float(h[k]), 4) for k in ("val_iou_r", "val_box_ap50") if k in h}}
                    for h in payload.get("history") or []]      # the held-back evaluations: what the run kept
    # as the server loads it: with --precision-target, a --reuse'd checkpoint's cuts are chosen again from the
    # grids it stored (the same cuts when it trained with that target)
    pred = Predictor.from_checkpoint(ckpt, device="cpu", precision_target=precision_target)
    scales_choice = payload.get("box_scales")
    if box_flip is not None or box_scales:    # the stored cut was learned with the run's own settings: learn it again
        if box_flip is not None:
            pred.box_flip = pred.has_box_head and box_flip
        if box_scales == "learn":       # chosen again as a version chooses it (checkpoints from before stop 41),
            n = (payload.get("train_config") or {}).get("select_images", TrainConfig().select_images)  # its subset
            scales_choice = tv.choose_box_scales(pred, spread_subset(held, int(n)))
        elif box_scales == "off":
            pred.box_scales = ()
        tv.learn_cut(pred, held, precision_target=precision_target)
    t0 = time.time()
    raws = raw_predictions(pred, val)
    predict_s = time.time() - t0
    after, before, learned = with_and_without_cut(pred, val, raws)
    keys = ("box_ap50", "class_ap50", "agnostic_ap50", "precision", "recall", "f1", "regions_per_image", "true_per_image",
            "class_recall", "missed_classes", "fg_iou", "miou", "instance_ap")
    row = {"task": task, "method": method if box else "masks", "seed": seed,
           "select": "box AP50" if box_select else "seg IoU",
           "region_type": "rectanglelabels" if box else "brushlabels / polygonlabels",
           "n_train": len(fit), "n_held_back": len(held), "n_val": len(val),
           "val_objects": subset_counts(val, names), "held_back_objects": subset_counts(held, names), "budget_s": 0.0 if iters else budget_s,
           "overrides": overrides or {}, "scale": pred.scale, "reused": reuse, "init": init, "box_flip": pred.box_flip,
           "box_scales": list(pred.box_scales), "box_scales_choice": scales_choice,
           "train_wall_s": round(wall, 1), "train_iters": done_iters, "load_avg_1min_after": os.getloadavg()[0],
           "predict_s_per_image": round(predict_s / max(len(val), 1), 4),
           "learned_cut": learned.to_dict(), "after_cut": {k: after[k] for k in keys},
           "no_cut": {k: before[k] for k in keys if k in ("precision", "recall", "f1", "regions_per_image")}}
    if pred.head_beside_masks or "head_box_ap50" in after:   # a mask model's head: what rectangles get
        row["rectangles"] = payload.get("box_cut", {}).get("rectangles")
        row["head_after_cut"] = {k[5:]: after[k] for k in after if k.startswith("head_")}
    if task in POINT_TASKS:
        row["region_type"] = "keypointlabels"
        row["points"] = point_metrics(raws, learned, val)
    row["held_back_history"] = held_history
    row["recall_by_size"] = recall_by_size(raws, learned, val)
    if all(r.head is not None for r in raws):       # the head's boxes beside the masks, after their own cut
        row["head_recall_by_size"] = recall_by_size([r.head for r in raws], pred.box_cut, val)
    if curve:
        row["curve"] = points
    print(json.dumps(row), flush=True)
    return row


def with_and_without_cut(pred: Predictor, val: list[Sample], raws: list) -> tuple[dict, dict, RegionCut]:
    """evaluate() on the same raw predictions after the predictor's learned cut and with no cut (its NMS
    only), and the learned cut."""
    learned = pred.cut
    after = evaluate(pred, val, raws=raws)
    pred.cut = RegionCut(nms_iou=learned.nms_iou, source="none")
    try:
        before = evaluate(pred, val, raws=raws)
    finally:
        pred.cut = learned
    return after, before, learned


def split_fit_held_val(samples: list[Sample], max_val: int = 0) -> tuple[list, list, list]:
    """(train, held back, validation) as a project splits: the fixed 80/20 split by id hash, then 20% of the
    training ids by another hash held back; at most `max_val` held-back and validation images (0 = all)."""
    by_id = {s.id: s for s in samples}
    train_ids, val_ids = split_ids(list(by_id), 0.2)
    fit_keys, held_keys = split_ids([f"held:{i}" for i in train_ids], 0.2)   # another hash than the val split's
    fit_ids, held_ids = [k[5:] for k in fit_keys], [k[5:] for k in held_keys]
    fit, held, val = ([by_id[i] for i in ids] for ids in (fit_ids, held_ids, val_ids))
    if max_val:
        held, val = spread_subset(held, max_val), spread_subset(val, max_val)
    return fit, held, val


def reused(src: Path, dst: Path) -> Path:
    """An earlier run's checkpoint (its --name's work folder), copied to this run's: evaluated again without
    training (decoding changes on the same weights). A `box_context` of False or 0 in its model config (stop
    20's and stop 42's reverted context tries wrote them) is dropped, so that such checkpoints load."""
    if not src.is_file():
        raise SystemExit(f"--reuse: no checkpoint {src}")
    ckpt = load_checkpoint(src, "vqvae")
    if "box_context" in ckpt["model_config"] and not ckpt["model_config"]["box_context"]:
        ckpt["model_config"] = {k: v for k, v in ckpt["model_config"].items() if k != "box_context"}
    save_checkpoint(ckpt, dst)
    return dst


def baseline(task: str, fit: list[Sample], val: list[Sample], names: list[str], seed: int) -> dict:
    """No model: one box per image at the image's centre, of the training boxes' median size relative to
    their images, of the most frequent training class (what a model must beat to have learned anything)."""
    rel, classes = [], []
    for s in fit:
        b, c = true_objects(s)
        H, W = s.image.shape[:2]
        rel += [((x1 - x0) / W, (y1 - y0) / H) for x0, y0, x1, y1 in b]
        classes += c.tolist()
    rw, rh = np.median(np.array(rel), 0)
    cls = int(np.bincount(classes).argmax())
    raws = []
    for s in val:
        H, W = s.image.shape[:2]
        box = (W * (1 - rw) / 2, H * (1 - rh) / 2, W * (1 + rw) / 2, H * (1 + rh) / 2)
        zeros = np.zeros((H, W), np.int32)
        raws.append(Prediction(zeros, zeros, {1: cls}, {1: 1.0}, 1.0, {1: box}))
    m = detection_metrics(raws, RegionCut(), val, len(names), names)
    keys = ("box_ap50", "class_ap50", "agnostic_ap50", "precision", "recall", "f1", "regions_per_image",
            "true_per_image", "class_recall", "missed_classes")
    row = {"task": task, "method": "baseline", "seed": seed, "region_type": "rectanglelabels",
           "n_train": len(fit), "n_val": len(val), "val_objects": subset_counts(val, names),
           "baseline": {"relative_size": [round(float(rw), 4), round(float(rh), 4)], "class": names[cls - 1]},
           "after_cut": {k: m[k] for k in keys}}
    print(json.dumps(row), flush=True)
    return row


def recall_by_size(raws: list, cut: RegionCut, val: list[Sample], edges=(0, 8, 12, 16, 24, 1e9)) -> dict:
    """Recall at IoU 0.5 after the cut per true box size (sqrt of its area, image px), and the share of
    true boxes no kept region overlaps at all (IoU < 0.1): where the misses are."""
    from tessera.model.inference import cut_regions
    sizes, hit, none = [], [], []
    for raw, s in zip(raws, val):
        p = cut_regions(raw, cut)
        t = true_objects(s)[0]
        ids = sorted(p.instance_label)
        if p.boxes is not None:
            b = np.array([p.boxes[k] for k in ids]).reshape(-1, 4)
        else:               # a mask model: its regions' boxes are its instances' (as evaluate() measures them)
            b = instance_boxes(p.instances, ids, p.slices)
        iou = metrics.box_iou(t, b) if len(b) else np.zeros((len(t), 0))
        found = {q for _, q in metrics.greedy_match(iou.T, 0.5)} if len(b) and len(t) else set()
        sizes += np.sqrt((t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])).tolist()
        hit += [j in found for j in range(len(t))]
        none += (iou.max(1) < 0.1 if iou.shape[1] else np.ones(len(t), bool)).tolist()
    sizes, hit, none = map(np.array, (sizes, hit, none))
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        k = (sizes >= lo) & (sizes < hi)
        if k.any():
            out[f"{lo:g}-{hi:g}px" if hi < 1e9 else f">={lo:g}px"] = {
                "n": int(k.sum()), "recall": round(float(hit[k].mean()), 3), "unseen": round(float(none[k].mean()), 3)}
    return out


def subset_counts(samples: list[Sample], names: list[str]) -> dict:
    """Objects per class in a sample list (what the JSON states about its validation subset)."""
    counts = {n: 0 for n in names}
    for s in samples:
        for c in true_objects(s)[1]:
            counts[names[int(c) - 1]] += 1
    return counts


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _curve:
    """While training: after every validation, the box AP50 (all regions after NMS, no cut) of the model
    as it is on the validation images, with the training seconds so far (this evaluation's time excluded)."""

    def __init__(self, points: list, val: list[Sample], names: list[str]):
        self.points, self.val, self.names, self.eval_s = points, val, names, 0.0
        self.original = tv._validate

    def __enter__(self):
        def validate(run, frac, last):
            self.original(run, frac, last)
            t0 = time.time()
            pred = Predictor(run.model, self.names, device="cpu", edge_weight=run.cfg.boundary_weight,
                             scale=run.scale, box_shrink=run.cfg.box_shrink)
            raws = raw_predictions(pred, self.val)
            ap = detection_metrics(raws, RegionCut(), self.val, len(self.names), self.names)["box_ap50"]
            run.model.train()
            tv.freeze_codes(run.model, frac >= run.cfg.vq_phase)
            self.eval_s += time.time() - t0
            self.points.append({"iter": run.it, "train_s": round(time.time() - run.t_start - self.eval_s, 1),
                                "box_ap50": round(ap, 4)})
            print(f"curve: iter {run.it} train {self.points[-1]['train_s']}s AP50 {ap:.3f}", flush=True)
        tv._validate = validate
        return self

    def __exit__(self, *exc):
        tv._validate = self.original
        return False


def summarize(rows: list[dict]) -> dict:
    """Mean and std over seeds per task and method (and test-time flip, when rows differ in it) of the
    headline figures."""
    flips = len({r.get("box_flip") for r in rows}) > 1

    def group_of(r):
        return f"{r['task']}_{r['method']}" + (f"_flip_{'on' if r.get('box_flip') else 'off'}" if flips else "")

    out = {}
    for key in sorted({group_of(r) for r in rows}):
        group = [r for r in rows if group_of(r) == key]
        for k in ("box_ap50", "agnostic_ap50", "precision", "recall", "regions_per_image", "true_per_image"):
            v = [r["after_cut"][k] for r in group]
            out[f"{key}_{k}"] = {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4), "n": len(v)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", nargs="+", default=["dsb_boxes"], choices=sorted(TASKS))
    ap.add_argument("--budget", type=float, default=180.0, help="training seconds per task")
    ap.add_argument("--iters", type=int, default=0, help="train this many iterations instead of a time budget "
                                                        "(figures that do not depend on the machine's load)")
    ap.add_argument("--max-val", type=int, default=0, help="cap the held-back and validation images (0 = all): spread evenly over the "
                         "classes, in a fixed order by id hash within each")
    ap.add_argument("--precision-target", type=float, default=0.0, help="0 = the cut maximises F1; with "
                    "--reuse the stored cuts are chosen again for this target, as TESSERA_PRECISION_TARGET does")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["head"], choices=["head", "centres", "baseline"],
                    help="how box tasks learn boxes (mask tasks ignore it); baseline: no model, one box of "
                         "the median relative size at each image's centre")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--select", choices=["ap", "iou"], default="ap", help="the state a box model keeps: best "
                    "held-back box AP50 (the product's default) or best segmentation IoU (before)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig overrides, e.g. "
                    "box_max_scale=2 (recorded in each row)")
    ap.add_argument("--curve", action="store_true", help="AP50 against training time at every evaluation")
    ap.add_argument("--reuse", default="", metavar="NAME", help="evaluate the checkpoints the run --name NAME "
                    "left in its work folder (same task, method, seed) instead of training")
    ap.add_argument("--box-flip", nargs="+", choices=["on", "off"], default=[], help="a row per setting of "
                    "the box head's test-time flip (Predictor.box_flip), the cut learned again for each "
                    "(default: the checkpoint's own)")
    ap.add_argument("--box-scales", choices=["learn", "off"], default="", help="a box model's extra test-time "
                    "passes (Predictor.box_scales) chosen again on the held-back images as a version chooses "
                    "them, or off; the cut learned again (default: the checkpoint's own)")
    ap.add_argument("--init", default="", metavar="NAME", help="warm-start from the checkpoint the run --name NAME "
                    "left (same task, method, seed), as a project's later runs start from the served version")
    ap.add_argument("--name", default="", help="results file bench/results/<name>.json (default regions_<task>)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path("/tmp/tessera-bench-regions") / (args.name or "default")   # runs side by side do not collide
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    rows = []
    for seed in args.seeds:            # every method once before the next seed; the file is rewritten per row
        for t in args.task:
            for m in (args.methods if t not in MASK_TASKS else ["head"]):
                for flip in [f == "on" for f in args.box_flip] or [None]:
                    rows.append(run(t, args.budget, args.precision_target, work, args.iters, args.max_val, m,
                                    seed, args.curve, args.select == "ap", train_overrides(args.set), args.reuse, flip,
                                    args.init, args.box_scales))
                    _write(args, rows, load_before)


def _write(args, rows: list[dict], load_before: float) -> None:
    write_result(args.name or f"regions_{'_'.join(args.task)}", {
        "summary": summarize(rows), "rows": rows, "box_shrink": BOX_SHRINK, "threads": args.threads,
        "val_subset": (f"at most {args.max_val} validation and held-back images, spread evenly over the classes "
                       "(round-robin; within a class by the SHA-1 of 'subset:<id>')") if args.max_val else "all",
        "load_avg_1min_before": load_before, "load_avg_1min_after": os.getloadavg()[0],
        "targets": {"dsb_boxes_box_ap50": ">= 0.80", "pets_heads_box_ap50": ">= 0.85",
                    "precision_recall": "precision >= 0.80 at recall >= 0.80 after the learned cut",
                    "regions_per_image": "within 1.2x of the true count"}})


if __name__ == "__main__":
    main()
