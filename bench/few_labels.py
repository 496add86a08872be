"""Few labels + an unlabelled pool on DSB2018 (issue #12): where does a gain come from, self-training or
edited images?

    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python -m bench.few_labels [--iters 150] [--seeds 0 1 2]

dsb2018 (256 px), fixed split by id hash (model.data.split_ids, 20 % val; the first --max-val val images
score every arm). Per seed, --n-labelled images of the training split are labelled (drawn with the seed);
up to --pool of the others are the unlabelled pool (their labels are never read). Arms, every one trained
with EQUAL label-model iterations and TrainConfig's default augmentation (the product's):
  real_only   the labelled images
  self_train  + pseudo-labels: the real_only model (the teacher) predicts the pool; the --keep-share it is
              most confident on (its task score), with its regions after the learned cut, join the labelled
              images (repeated to about half of each batch; model.self_train)
  edited      + --n-edited edited images (model.edit.Editor over the labelled images), mixed the same way
  both        + pseudo-labels + edited images
Scores: mean per-image foreground IoU and box recall at IoU 0.5 (model.train_vqvae.evaluate), mean ± sd over
seeds, and per-seed gains over real_only. Writes bench/results/few_labels.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import fixed_split, write_result
from tessera.model.data import Sample
from tessera.model.edit import Editor
from tessera.model.inference import Predictor
from tessera.model.self_train import mix, pseudo_label
from tessera.model.train_vqvae import TrainConfig, evaluate, train as train_label

ARMS = ("real_only", "self_train", "edited", "both")
KEYS = ("fg_iou", "recall", "precision", "instance_f1")


def log(msg: str, t0: list[float] = [time.time()]) -> None:  # noqa: B006 (start time of the run)
    print(f"[{time.time() - t0[0]:6.0f}s] {msg} (load {os.getloadavg()[0]:.1f})", flush=True)


def fit(train: list[Sample], names: list[str], iters: int, out: Path, threads: int, seed: int) -> tuple[Path, float]:
    cfg = TrainConfig(max_iters=iters, eval_interval=10 * iters, log_interval=10 * iters, seed=seed,
                      device="cpu", threads=threads)
    t0 = time.time()
    return train_label(cfg, train, [], names, out), time.time() - t0


def run_seed(seed: int, train_pool: list[Sample], val: list[Sample], names: list[str], args, work: Path) -> dict:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_pool))
    labelled = [train_pool[i] for i in order[:args.n_labelled]]
    pool = [train_pool[i] for i in order[args.n_labelled:args.n_labelled + args.pool]]
    row: dict = {"seed": seed, "labelled_ids": [s.id for s in labelled], "n_pool": len(pool)}
    teacher, dt = fit(labelled, names, args.iters, work / f"real_only_{seed}.pt", args.threads, seed)
    predictor = Predictor.from_checkpoint(teacher, device="cpu")
    t0 = time.time()
    pseudo = pseudo_label(predictor, [s.image for s in pool], [s.id for s in pool], keep_share=args.keep_share)
    truth = {s.id: s for s in pool}
    # how good the pseudo-labels are (read only for this report, never for training)
    pl_iou = [float(((p.classes > 0) & (truth[p.id[7:]].classes > 0)).sum()
                    / max(((p.classes > 0) | (truth[p.id[7:]].classes > 0)).sum(), 1)) for p in pseudo]
    row["pseudo"] = {"kept": len(pseudo), "seconds": round(time.time() - t0, 1),
                     "fg_iou_vs_truth_mean": float(np.mean(pl_iou)) if pl_iou else 0.0}
    edited = [e.sample for e in Editor(labelled, len(names), max_objects=args.max_objects)
              .edit(args.n_edited, seed=100 + seed)]
    sets = {"self_train": mix(labelled, pseudo), "edited": mix(labelled, edited),
            "both": mix(labelled, pseudo + edited)}
    row["real_only"] = {**pick(evaluate(predictor, val)), "train_s": round(dt, 1), "n_train": len(labelled)}
    log(f"seed {seed} real_only  fg {row['real_only']['fg_iou']:.4f} recall {row['real_only']['recall']:.4f} "
        f"({dt:.0f}s); pseudo-labels {row['pseudo']}")
    for arm in args.arms:
        if arm == "real_only":
            continue
        ckpt, dt = fit(sets[arm], names, args.iters, work / f"{arm}_{seed}.pt", args.threads, seed)
        row[arm] = {**pick(evaluate(Predictor.from_checkpoint(ckpt, device="cpu"), val)), "train_s": round(dt, 1),
                    "n_train": len(sets[arm])}
        log(f"seed {seed} {arm:10s} fg {row[arm]['fg_iou']:.4f} recall {row[arm]['recall']:.4f} ({dt:.0f}s)")
    return row


def pick(m: dict) -> dict:
    return {k: float(m[k]) for k in KEYS}


def summarize(rows: list[dict], arms: list[str]) -> dict:
    out = {}
    for arm in arms:
        for k in KEYS:
            v = np.array([r[arm][k] for r in rows])
            out[f"{arm}_{k}_mean"], out[f"{arm}_{k}_std"] = float(v.mean()), float(v.std(ddof=1) if len(v) > 1 else 0)
            if arm != "real_only":
                d = 100 * (v - np.array([r["real_only"][k] for r in rows]))
                out[f"{arm}_{k}_gain_points_mean"] = float(d.mean())
                out[f"{arm}_{k}_gain_points_std"] = float(d.std(ddof=1) if len(d) > 1 else 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=150, help="label-model iterations, every arm (and the teacher)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-labelled", type=int, default=10)
    ap.add_argument("--pool", type=int, default=120, help="unlabelled images the teacher predicts")
    ap.add_argument("--keep-share", type=float, default=0.5, help="share of the pool kept as pseudo-labels")
    ap.add_argument("--n-edited", type=int, default=30)
    ap.add_argument("--max-objects", type=int, default=4)
    ap.add_argument("--max-val", type=int, default=60)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 10 iters, 1 seed, pool 8, 5 val")
    args = ap.parse_args()
    if args.quick:
        args.iters, args.seeds, args.pool, args.max_val, args.n_edited = 10, [0], 8, 5, 4
    torch.set_num_threads(args.threads)
    t_start, work = time.time(), Path(tempfile.mkdtemp(prefix="tessera-bench-few-"))
    train_pool, val, names = fixed_split("dsb2018", args.max_val)
    log(f"dsb2018: {len(train_pool)} train, {len(val)} val; {args.n_labelled} labelled, pool {args.pool}; "
        f"iters {args.iters}, threads {args.threads}")
    rows = [run_seed(seed, train_pool, val, names, args, work) for seed in args.seeds]
    summary = summarize(rows, ["real_only"] + [a for a in args.arms if a != "real_only"])
    summary["wall_s"] = round(time.time() - t_start, 1)
    write_result("few_labels" + ("_quick" if args.quick else ""), {
        "summary": summary, "rows": rows,
        "setup": {"dataset": "dsb2018 (256 px)", "split": "split_ids(ids, 0.2)", "n_val": len(val),
                  "n_labelled": args.n_labelled, "pool": args.pool, "keep_share": args.keep_share,
                  "n_edited": args.n_edited, "label_iters": args.iters, "label_batch": TrainConfig.batch_size,
                  "augmentation": "TrainConfig defaults in every arm", "teacher": "the real_only model of the seed",
                  "torch_threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
                  "equal": "iterations: every arm (student) trains --iters from scratch; self-training also "
                           "costs the teacher's run and one prediction pass over the pool"},
        "targets": {"gain_vs_real_only": "+5 points fg IoU and box recall (native size in the issue; 256 px here)"}})
    shutil.rmtree(work, ignore_errors=True)
    log(f"done in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
