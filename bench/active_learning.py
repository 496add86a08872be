"""Active-learning simulation on a folder dataset (DSB 2018 by default): does labelling the tasks Tessera
is least sure of first reach good IoU with fewer labels than labelling at random?

Fixed split (model.data.split_ids, 20% test). Both strategies start from the same 5 random labelled images
and add 5 per round, chosen by (a) the lowest Tessera task score (Predictor.predict(...).score, what LS
sorts by) among the unlabelled pool, or (b) at random. Each round warm-starts from the previous round's
model and trains a fixed number of iterations (as a Tessera run warm-starts from the served version), and
is evaluated on the test images (foreground IoU per image, averaged). The reference is one training from
scratch on ALL training images with the total iterations of a whole curve (rounds x per-round iterations).
Reported per strategy: labels needed to reach 95% of that full-data IoU.

    .venv/bin/python -m bench.active_learning [--data DIR] [--max-labels 50] [--iters 100] [--quick]

Writes bench/results/active_learning.json and bench/results/active_learning.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS, SHARED_DATA, write_result

STRATEGIES = ("uncertainty", "random", "mixed")   # mixed: half lowest score, half random (not run by default)
LABELS = {"uncertainty": "lowest Tessera score first", "random": "random", "mixed": "half lowest score, half random"}


def labels_to_reach(curve: list[dict], goal: float) -> int | None:
    """Fewest labels whose IoU is >= goal (None if the curve never gets there)."""
    return next((p["labels"] for p in curve if p["iou"] >= goal), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(SHARED_DATA / "dsb2018"))
    ap.add_argument("--start", type=int, default=5, help="labelled images at the start")
    ap.add_argument("--step", type=int, default=5, help="images labelled per round")
    ap.add_argument("--max-labels", type=int, default=50)
    ap.add_argument("--iters", type=int, default=100, help="training iterations per round (warm-started)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategies", default="uncertainty,random", help=f"comma-separated, of {STRATEGIES}")
    ap.add_argument("--tag", default="", help="write active_learning_<tag>.json/.png instead")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, a few iterations, small sets")
    args = ap.parse_args()
    strategies = [x.strip() for x in args.strategies.split(",") if x.strip()]
    if not strategies or any(x not in STRATEGIES for x in strategies):
        ap.error(f"--strategies takes a comma-separated subset of {STRATEGIES}")
    if args.quick:
        args.max_labels, args.iters = args.start + args.step, 4

    from model.data import load_folder, split_ids
    from model.train_vqvae import TrainConfig, evaluate, train

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    t_all = time.time()
    samples, names = load_folder(args.data)
    by_id = {s.id: s for s in samples}
    train_ids, test_ids = split_ids(sorted(by_id), 0.2)
    if args.quick:
        train_ids, test_ids = train_ids[:30], test_ids[:8]
    test = [by_id[i] for i in test_ids]
    rng = random.Random(args.seed)
    start = rng.sample(train_ids, args.start)
    cfg = TrainConfig(max_iters=args.iters, device="cpu", seed=args.seed, threads=args.threads)
    work = Path(tempfile.mkdtemp(prefix="tessera-al-"))
    print(f"{len(train_ids)} training images in the pool, {len(test)} test images; {args.iters} iters per round")

    def fit(ids: list[str], init: Path | None, name: str, iters: int | None = None) -> tuple[Path, dict]:
        t0 = time.time()
        c = cfg if iters is None else dataclasses.replace(cfg, max_iters=iters)
        ckpt = train(c, [by_id[i] for i in ids], [], names, work / f"{name}.pt", init_from=init)
        t1 = time.time()
        m = evaluate(ckpt, test)
        return ckpt, {"labels": len(ids), "iou": m["fg_iou"], "iou_pooled": m["fg_iou_pooled"],
                      "instance_f1": m["instance_f1"], "train_s": round(t1 - t0, 1),
                      "eval_s": round(time.time() - t1, 1)}

    try:
        curves, full = _simulate(args, strategies, fit, start, train_ids, by_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    goal = 0.95 * full["iou"]
    needed = {s: labels_to_reach(c, goal) for s, c in curves.items()}
    saving = None
    if needed.get("uncertainty") is not None and needed.get("random") is not None:
        saving = 1.0 - needed["uncertainty"] / needed["random"]
    summary = {"full_data_iou": full["iou"], "goal_iou_95pct": goal, "labels_to_95pct": needed,
               "label_saving_vs_random": saving,
               "target": "uncertainty reaches the 95% mark with >= 30% fewer labels than random",
               "meets_target": saving is not None and saving >= 0.30,
               "note": None if all(v is not None for v in needed.values()) else
               f"a strategy did not reach the 95% mark within {args.max_labels} labels"}
    print(summary)
    payload = {"summary": summary, "setup": {"data": Path(args.data).name, "n_pool": len(train_ids), "n_test": len(test),
                                             "start": args.start, "step": args.step, "max_labels": args.max_labels,
                                             "iters_per_round": args.iters, "threads": args.threads,
                                             "seed": args.seed, "quick": args.quick,
                                             "wall_s": round(time.time() - t_all, 1)},
               "curves": curves, "full_data": full}
    name = "active_learning" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    reference = RESULTS / "active_learning.json"          # the untagged files hold the reference run
    kept = reference.read_bytes() if name != "active_learning" and reference.exists() else None
    path = write_result("active_learning", payload)
    if name != "active_learning":
        path.rename(path.with_name(f"{name}.json"))
        if kept is not None:
            reference.write_bytes(kept)
    plot(curves, full, goal, RESULTS / f"{name}.png", args)


def _simulate(args, strategies: list[str], fit, start: list[str], train_ids: list[str], by_id: dict
              ) -> tuple[dict[str, list[dict]], dict]:
    """The rounds of every strategy from the shared start model, then the full-data reference."""
    from model.inference import Predictor

    ckpt0, point0 = fit(start, None, "start")
    print(f"start: {point0}")
    curves: dict[str, list[dict]] = {}
    for strategy in strategies:
        labelled, ckpt, curve = list(start), ckpt0, [dict(point0)]
        srng = random.Random(args.seed + 1)
        while len(labelled) + args.step <= args.max_labels:
            taken = set(labelled)
            pool = [i for i in train_ids if i not in taken]
            t0 = time.time()
            n_low = {"uncertainty": args.step, "random": 0, "mixed": (args.step + 1) // 2}[strategy]
            picked = []
            if n_low:
                predictor = Predictor.from_checkpoint(ckpt, device="cpu")
                scores = []
                for b in range(0, len(pool), 32):
                    scores += [p.score for p in predictor.predict([by_id[i].image for i in pool[b:b + 32]])]
                picked = [pool[j] for j in np.argsort(scores, kind="stable")[:n_low]]
            picked += srng.sample([i for i in pool if i not in picked], args.step - n_low)
            select_s = time.time() - t0
            labelled += picked
            ckpt, point = fit(labelled, ckpt, f"{strategy}-{len(labelled)}")
            point.update({"select_s": round(select_s, 1), "picked": picked})
            curve.append(point)
            print(f"{strategy:11s} {point}")
        curves[strategy] = curve

    rounds = len(curves[strategies[0]])
    _, full = fit(train_ids, None, "full", iters=rounds * args.iters)
    full.update({"iters": rounds * args.iters})
    print(f"full data: {full}")
    return curves, full


def plot(curves: dict[str, list[dict]], full: dict, goal: float, path: Path, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for strategy, curve in curves.items():
        ax.plot([p["labels"] for p in curve], [p["iou"] for p in curve], marker="o", label=LABELS[strategy])
    ax.axhline(full["iou"], color="grey", linestyle="--", label=f"all {full['labels']} training images")
    ax.axhline(goal, color="grey", linestyle=":", label="95% of that")
    ax.set_xlabel("labelled images")
    ax.set_ylabel("foreground IoU on held-out images")
    ax.set_title(f"Active learning on {Path(args.data).name} ({args.iters} iters per round, warm start)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
