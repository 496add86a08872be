"""Predictions a labeller keeps: box AP50 and precision / recall after the learned region cut, on real data.

    .venv/bin/python -m bench.regions --task dsb_boxes [--budget 180 | --iters 300] [--max-val 40] [--name N]
    tasks: dsb_boxes (DSB 2018 trained from boxes only: boxes from the instance maps, masks withheld),
           dsb_masks (DSB 2018 instance masks: the brush / polygon region types),
           pets_heads (Oxford-IIIT Pet head boxes, cat / dog)

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

from bench.common import dataset, write_result
from model import metrics
from model.checkpoint import load_checkpoint
from model.data import Sample, load_folder, read_image, split_ids
from model.inference import Predictor
from model.postprocess import RegionCut, box_sample
from model.train_vqvae import TrainConfig, evaluate, raw_predictions, train as train_vqvae

BOX_SHRINK = 0.6


def dsb(boxes: bool) -> tuple[list[Sample], list[str]]:
    samples, names = load_folder(dataset("dsb2018"))
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


def run(task: str, budget_s: float, precision_target: float, work: Path, iters: int = 0, max_val: int = 0) -> dict:
    samples, names = {"dsb_boxes": lambda: dsb(True), "dsb_masks": lambda: dsb(False),
                      "pets_heads": pets_heads}[task]()
    by_id = {s.id: s for s in samples}
    train_ids, val_ids = split_ids(list(by_id), 0.2)
    fit_keys, held_keys = split_ids([f"held:{i}" for i in train_ids], 0.2)   # another hash than the val split's
    fit_ids, held_ids = [k[5:] for k in fit_keys], [k[5:] for k in held_keys]
    fit, held, val = ([by_id[i] for i in ids] for ids in (fit_ids, held_ids, val_ids))
    if max_val:
        held, val = held[:max_val], val[:max_val]
    box = task != "dsb_masks"
    print(f"{task}: {len(fit)} train, {len(held)} held back (cut), {len(val)} validation; labels {names}", flush=True)
    cfg = TrainConfig(max_iters=iters or 100_000, time_budget_s=0.0 if iters else budget_s,
                      eval_interval=max(50, iters // 4) if iters else 150, device="cpu",
                      box_shrink=BOX_SHRINK if box else 1.0, precision_target=precision_target)
    t0 = time.time()
    ckpt = train_vqvae(cfg, fit, held, names, work / f"{task}.pt")
    wall = time.time() - t0
    done_iters = int(load_checkpoint(ckpt, "vqvae")["iter_num"])
    pred = Predictor.from_checkpoint(ckpt, device="cpu")
    t0 = time.time()
    raws = raw_predictions(pred, val)
    predict_s = time.time() - t0
    after = evaluate(pred, val, raws=raws)
    learned = pred.cut
    pred.cut = RegionCut(nms_iou=learned.nms_iou, source="none")
    before = evaluate(pred, val, raws=raws)
    keys = ("box_ap50", "class_ap50", "precision", "recall", "f1", "regions_per_image", "true_per_image",
            "class_recall", "missed_classes", "fg_iou", "miou", "instance_ap")
    row = {"task": task, "region_type": "rectanglelabels" if box else "brushlabels / polygonlabels",
           "n_train": len(fit), "n_held_back": len(held), "n_val": len(val), "budget_s": 0.0 if iters else budget_s,
           "train_wall_s": round(wall, 1), "train_iters": done_iters, "load_avg_1min_after": os.getloadavg()[0],
           "predict_s_per_image": round(predict_s / max(len(val), 1), 4),
           "learned_cut": learned.to_dict(), "after_cut": {k: after[k] for k in keys},
           "no_cut": {k: before[k] for k in keys if k in ("precision", "recall", "f1", "regions_per_image")}}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", nargs="+", default=["dsb_boxes"], choices=["dsb_boxes", "dsb_masks", "pets_heads"])
    ap.add_argument("--budget", type=float, default=180.0, help="training seconds per task")
    ap.add_argument("--iters", type=int, default=0, help="train this many iterations instead of a time budget "
                                                        "(figures that do not depend on the machine's load)")
    ap.add_argument("--max-val", type=int, default=0, help="cap the held-back and validation images (0 = all)")
    ap.add_argument("--precision-target", type=float, default=0.0, help="0 = the cut maximises F1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="", help="results file bench/results/<name>.json (default regions_<task>)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path("/tmp/tessera-bench-regions")
    work.mkdir(exist_ok=True)
    rows = [run(t, args.budget, args.precision_target, work, args.iters, args.max_val) for t in args.task]
    summary = {f"{r['task']}_{k}": r["after_cut"][k] for r in rows
               for k in ("box_ap50", "precision", "recall", "regions_per_image", "true_per_image")}
    write_result(args.name or f"regions_{'_'.join(args.task)}", {
        "summary": summary, "rows": rows, "box_shrink": BOX_SHRINK,
        "targets": {"dsb_boxes_box_ap50": ">= 0.80", "pets_heads_box_ap50": ">= 0.85",
                    "precision_recall": "precision >= 0.80 at recall >= 0.80 after the learned cut",
                    "regions_per_image": "within 1.2x of the true count"}})


if __name__ == "__main__":
    main()
