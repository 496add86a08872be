"""A project's later version: what a warm-started run of N iterations makes of the served version, at two peak
learning rates. DSB2018 256 px (../shared/data/dsb2018, the fixed split's first 40 validation images): a first
version trained 150 iterations on 10 training images (the product's TrainConfig, one thread), then a warm start
from it on 30 training images for each N and learning rate. Reported: the score promotion compares
(backend.training.val_score: the mean of foreground IoU and instance F1 after the region cut) and the
foreground IoU of the first version and of each later one.

    python -m bench.warm_start --seeds 0 1 --iters 30 120 300 --lrs 3e-3 1e-3
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import fixed_split, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--iters", type=int, nargs="+", default=[30, 120, 300], help="iterations of the later run")
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-3], help="the later run's peak lr")
    ap.add_argument("--name", default="warm_start_lr")
    args = ap.parse_args()

    from tessera.backend import training
    from tessera.backend.settings import Settings
    from tessera.model.train_vqvae import evaluate, train

    torch.set_num_threads(1)
    tr, va, names = fixed_split("dsb2018")
    va = va[:40]
    work = Path(tempfile.mkdtemp(prefix="tessera-warm-start-"))

    def score(ckpt: Path) -> dict:
        m = evaluate(ckpt, va)
        return {"score": round(training.val_score(m, len(names), False, False), 4), "fg_iou": round(m["fg_iou"], 4)}

    runs = []
    try:
        base = training.train_config(Settings(model_dir=work), iters=150)
        for seed in args.seeds:
            first = train(dataclasses.replace(base, seed=seed, threads=1), tr[:10], va, names, work / f"v1_s{seed}.pt")
            before = score(first)
            print("seed", seed, "first version", before, flush=True)
            for n in args.iters:
                for lr in args.lrs:
                    # warm_lr is the peak a warm start takes (TrainConfig.warm_lr): set both to the lr timed
                    cfg = dataclasses.replace(base, seed=seed, threads=1, max_iters=n, eval_interval=max(50, n // 4),
                                              lr=lr, warm_lr=lr)
                    t0 = time.time()
                    later = train(cfg, tr[:30], va, names, work / f"v2_s{seed}_{n}_{lr}.pt", init_from=first)
                    runs.append({"seed": seed, "iters": n, "lr": lr, "first": before, "later": score(later),
                                 "train_s": round(time.time() - t0, 1)})
                    print(json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for n in args.iters:
        for lr in args.lrs:
            rows = [r for r in runs if r["iters"] == n and r["lr"] == lr]
            gain = [r["later"]["score"] - r["first"]["score"] for r in rows]
            scores = [r["later"]["score"] for r in rows]
            summary[f"{n}_iters_lr_{lr:g}"] = {"score_mean": round(float(np.mean(scores)), 4),
                                              "gain_over_first_mean": round(float(np.mean(gain)), 4),
                                              "gain_over_first_std": round(float(np.std(gain)), 4)}
    print(json.dumps(summary, indent=1))
    write_result(args.name, {"summary": summary, "runs": runs, "train_images": {"first": 10, "later": 30},
                             "val_images": len(va)})


if __name__ == "__main__":
    main()
