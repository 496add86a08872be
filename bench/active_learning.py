"""Active learning where labels still matter: a nuclei project with mixed imaging modalities.

DSB 2018 (../shared/data/dsb2018, 256 px) holds dark-field fluorescence images (~80%) and bright-field
ones (H&E and other stains, brightfield: ~20%) that look nothing alike. A project like this is labelled
for every modality, so quality here is the mean over modalities of the foreground IoU per image
(macro), on a test set with the same number of images of each (the natural-frequency mean is reported
too). Labelling at random mostly picks the common modality; the question is which ordering reaches 95%
of the full-data quality with the fewest labels.

Strategies, each from the same random start set per seed, adding labels in rounds (warm-started
training of a fixed number of iterations per round, as a Tessera run warm-starts from the served
version):
- random;
- score: lowest Tessera task score first (Predictor.predict(...).score, what "Sort by Prediction score"
  orders by without a priority);
- diversity: farthest-first in the label model's image-embedding space (model.acquisition.select);
- priority: uncertainty (1 - score) x distance to the nearest labelled image in that space
  (model.acquisition.priority: per task, so predictions can carry it).
The reference is a model trained from scratch on the whole pool with as many iterations as a curve.
Per seed: labels each strategy needs to reach 95% of the reference (linear interpolation between
rounds); reported as mean and standard deviation over seeds, with the saving against random.

    .venv/bin/python -m bench.active_learning [--seeds 3] [--pool 300] [--iters 50] [--quick]

Writes bench/results/active_learning.json and bench/results/active_learning.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS, SHARED_DATA, write_result

STRATEGIES = ("random", "priority", "score", "diversity")
LABELS = {"random": "random", "score": "lowest Tessera score first", "diversity": "diversity (image embeddings)",
          "priority": "priority (uncertainty x novelty)"}


def modality(image: np.ndarray) -> str:
    """'fluorescence' (grey, dark background) or 'brightfield' (stained colour or a bright background)."""
    x = image.astype(np.float32)
    colourful = (x.max(2) - x.min(2)).mean() > 12
    return "brightfield" if colourful or np.median(x.mean(2)) > 100 else "fluorescence"


def labels_to_reach(curve: list[dict], goal: float, key: str = "quality") -> float | None:
    """Labels where the curve first reaches goal, interpolated linearly between rounds (None: never)."""
    prev = None
    for p in curve:
        if p[key] >= goal:
            if prev is None:
                return float(p["labels"])
            f = (goal - prev[key]) / max(p[key] - prev[key], 1e-9)
            return float(prev["labels"] + f * (p["labels"] - prev["labels"]))
        prev = p
    return None


def quality(m_by_group: dict[str, list[float]]) -> dict:
    groups = {g: float(np.mean(v)) for g, v in m_by_group.items()}
    allv = [x for v in m_by_group.values() for x in v]
    return {"quality": float(np.mean(list(groups.values()))), "iou_natural": float(np.mean(allv)),
            **{f"iou_{g}": v for g, v in groups.items()}}


class Sim:
    """Training, evaluation and selection for one benchmark run."""

    def __init__(self, args, by_id: dict, test: dict[str, list], names: list[str], work: Path):
        from tessera.model.train_vqvae import TrainConfig

        self.args, self.by_id, self.test, self.names, self.work = args, by_id, test, names, work
        self.cfg = TrainConfig(max_iters=args.iters, device="cpu", threads=args.threads, eval_interval=10 ** 9,
                               widths=tuple(int(w) for w in args.widths.split(",")), codebook_size=128,
                               embed_dim=32, crop=96, batch_size=args.batch)
        self.n_fit = 0

    def fit(self, ids: list[str], init: Path | None, name: str, seed: int, iters: int | None = None):
        from tessera.model import metrics
        from tessera.model.inference import Predictor
        from tessera.model.train_vqvae import train

        cfg = dataclasses.replace(self.cfg, seed=seed, max_iters=iters or self.cfg.max_iters)
        t0 = time.time()
        ckpt = train(cfg, [self.by_id[i] for i in ids], [], self.names, self.work / f"{name}.pt", init_from=init)
        t1 = time.time()
        predictor = Predictor.from_checkpoint(ckpt, device="cpu")
        ious = {}
        for g, samples in self.test.items():
            preds = predictor.predict([s.image for s in samples])
            ious[g] = [metrics.iou(p.classes > 0, s.classes > 0) for p, s in zip(preds, samples)]
        self.n_fit += 1
        return ckpt, predictor, {"labels": len(ids), **quality(ious), "train_s": round(t1 - t0, 1),
                                 "eval_s": round(time.time() - t1, 1)}

    def pick(self, strategy: str, predictor, labelled: list[str], pool: list[str], k: int, rng) -> list[str]:
        from tessera.model import acquisition

        if strategy == "random":
            return rng.sample(pool, k)
        images = [self.by_id[i].image for i in pool]
        if strategy == "score":
            scores = [p.score for b in range(0, len(images), 32) for p in predictor.predict(images[b:b + 32])]
            return [pool[j] for j in np.argsort(scores, kind="stable")[:k]]
        emb = acquisition.embed(predictor, images)
        lab = acquisition.embed(predictor, [self.by_id[i].image for i in labelled])
        if strategy == "diversity":
            return [pool[j] for j in acquisition.select(emb, lab, k)]
        scores = np.array([p.score for b in range(0, len(images), 32) for p in predictor.predict(images[b:b + 32])])
        prio = acquisition.priority(emb, lab, scores)
        return [pool[j] for j in np.argsort(-prio, kind="stable")[:k]]

    def curves(self, strategies: list[str], seed: int, start: list[str], start_fit, pool_ids: list[str],
               deadline: float) -> dict[str, list[dict]]:
        """Every strategy's curve, round by round (all strategies finish a round before the next starts,
        so a run stopped at the deadline still compares them at the same label counts)."""
        state = {s: {"ckpt": start_fit[0], "predictor": start_fit[1], "labelled": list(start),
                     "curve": [dict(start_fit[2])], "rng": random.Random(seed * 1000 + 1)} for s in strategies}
        for target in self.args.schedule:
            if target <= len(start):
                continue
            if time.time() > deadline:
                print(f"seed {seed}: budget spent, stopping before {target} labels", flush=True)
                break
            for strategy, st in state.items():
                t0 = time.time()
                taken = set(st["labelled"])
                pool = [i for i in pool_ids if i not in taken]
                picked = self.pick(strategy, st["predictor"], st["labelled"], pool, target - len(taken), st["rng"])
                select_s = time.time() - t0
                st["labelled"] += picked
                st["ckpt"], st["predictor"], point = self.fit(st["labelled"], st["ckpt"],
                                                              f"s{seed}-{strategy}-{target}", seed)
                groups = [modality(self.by_id[i].image) for i in picked]
                point.update({"select_s": round(select_s, 1), "picked_brightfield": groups.count("brightfield"),
                              "picked": len(picked)})
                st["curve"].append(point)
                print(f"seed {seed} {strategy:9s} {_short(point)}", flush=True)
        return {s: st["curve"] for s, st in state.items()}


def _short(p: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in p.items()}


def _load(args) -> tuple[dict, dict[str, list], list[str], list[str], dict]:
    """(samples by id, balanced test set by modality, label names, pool ids, pool modality counts)."""
    from tessera.model.data import load_folder, split_ids

    samples, names = load_folder(args.data)
    by_id = {s.id: s for s in samples}
    train_ids, test_ids = split_ids(sorted(by_id), 0.2)
    test: dict[str, list] = {}
    for i in test_ids:
        test.setdefault(modality(by_id[i].image), []).append(by_id[i])
    n_test = min(args.test_per_modality, *(len(v) for v in test.values()))
    test = {g: v[:n_test] for g, v in sorted(test.items())}
    pool_ids = train_ids[:args.pool]                # split_ids keeps the sorted (hash-like) id order
    mix = {g: sum(modality(by_id[i].image) == g for i in pool_ids) for g in test}
    return by_id, test, names, pool_ids, mix


def run_job(args, job: int | None, strategies: list[str]) -> dict:
    """One process's share: the full-pool reference (job None) or every strategy of one seed."""
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    t0, cpu0 = time.time(), time.process_time()
    by_id, test, names, pool_ids, _ = _load(args)
    work = Path(tempfile.mkdtemp(prefix="tessera-al-"))
    sim = Sim(args, by_id, test, names, work)
    try:
        if job is None:
            rounds = 1 + len([t for t in args.schedule if t > args.start])
            _, _, full = sim.fit(pool_ids, None, "full", 0, iters=rounds * args.iters)
            full["iters"] = rounds * args.iters
            print(f"full pool: {_short(full)}", flush=True)
            return {"full": full, "wall_s": time.time() - t0, "cpu_s": time.process_time() - cpu0, "trainings": 1}
        start = random.Random(job).sample(pool_ids, args.start)
        start_fit = sim.fit(start, None, f"s{job}-start", job)
        print(f"seed {job} start     {_short(start_fit[2])}", flush=True)
        curves = sim.curves(strategies, job, start, start_fit, pool_ids, t0 + args.budget_s)
        return {"curves": curves, "wall_s": time.time() - t0, "cpu_s": time.process_time() - cpu0,
                "trainings": sim.n_fit}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(SHARED_DATA / "dsb2018"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--pool", type=int, default=150, help="unlabelled pool: this many training-split images")
    ap.add_argument("--test-per-modality", type=int, default=12)
    ap.add_argument("--start", type=int, default=4, help="labelled images at the start (random)")
    ap.add_argument("--schedule", default="8,12,16,24", help="labelled images after each round")
    ap.add_argument("--iters", type=int, default=40, help="training iterations per round (warm-started)")
    ap.add_argument("--batch", type=int, default=6, help="training batch size")
    ap.add_argument("--widths", default="8,16,32,48", help="label-model widths (a small model keeps it fast)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--jobs", type=int, default=0, help="processes (seeds and the reference run side by side); "
                                                        "0 = seeds + 1")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated, of {STRATEGIES}")
    ap.add_argument("--budget-s", type=float, default=3600.0,
                    help="wall seconds per seed after which no new round starts (rounds finished so far count)")
    ap.add_argument("--tag", default="", help="write active_learning_<tag>.json/.png instead")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 rounds, a few iterations")
    args = ap.parse_args()
    args.schedule = [int(x) for x in args.schedule.split(",")]
    strategies = [x.strip() for x in args.strategies.split(",") if x.strip()]
    if not strategies or any(x not in STRATEGIES for x in strategies):
        ap.error(f"--strategies takes a comma-separated subset of {STRATEGIES}")
    if args.quick:
        args.seeds, args.schedule, args.iters, args.pool, args.test_per_modality = 1, args.schedule[:2], 4, 40, 4

    from concurrent.futures import ProcessPoolExecutor

    t_all = time.time()
    _, test, _, pool_ids, mix = _load(args)
    n_test = len(next(iter(test.values())))
    print(f"pool {len(pool_ids)} images {mix}; test {n_test} per modality; {args.iters} iters per round")
    jobs = [None] + list(range(args.seeds))
    with ProcessPoolExecutor(max_workers=args.jobs or len(jobs)) as ex:
        done = list(ex.map(run_job, [args] * len(jobs), jobs, [strategies] * len(jobs)))
    full = done[0]["full"]
    n_points = min(len(d["curves"][s]) for d in done[1:] for s in strategies)   # rounds every seed finished
    curves = {s: [d["curves"][s][:n_points] for d in done[1:]] for s in strategies}
    summary = summarise(curves, full)
    print(summary)
    setup = {"data": Path(args.data).name, "pool": len(pool_ids), "pool_modalities": mix,
             "test_per_modality": n_test, "start": args.start, "schedule": args.schedule,
             "iters_per_round": args.iters, "batch": args.batch, "full_iters": full["iters"], "widths": args.widths,
             "threads_per_process": args.threads, "processes": args.jobs or len(jobs), "seeds": args.seeds,
             "budget_s_per_seed": args.budget_s, "quick": args.quick, "trainings": sum(d["trainings"] for d in done),
             "wall_s": round(time.time() - t_all, 1), "cpu_s": round(sum(d["cpu_s"] for d in done), 1),
             "load_avg_1min_at_end": round(os.getloadavg()[0], 1)}
    name = "active_learning" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    reference = RESULTS / "active_learning.json"          # the untagged files hold the reference run
    kept = reference.read_bytes() if name != "active_learning" and reference.exists() else None
    path = write_result("active_learning", {"summary": summary, "setup": setup, "full_data": full, "curves": curves})
    if name != "active_learning":
        path.rename(path.with_name(f"{name}.json"))
        if kept is not None:
            reference.write_bytes(kept)
    plot(curves, full, summary["goal_quality_95pct"], RESULTS / f"{name}.png", setup)


def summarise(curves: dict[str, list[list[dict]]], full: dict) -> dict:
    goal = 0.95 * full["quality"]
    needed = {s: [labels_to_reach(c, goal) for c in cs] for s, cs in curves.items()}
    out = {"full_data_quality": full["quality"], "goal_quality_95pct": goal, "labels_to_95pct": {}, "saving_vs_random": {}}
    for s, per_seed in needed.items():
        reached = [v for v in per_seed if v is not None]
        out["labels_to_95pct"][s] = {"per_seed": per_seed, "mean": float(np.mean(reached)) if reached else None,
                                     "std": float(np.std(reached)) if reached else None,
                                     "reached": f"{len(reached)}/{len(per_seed)}"}
    if "random" in needed:
        cap = max(p["labels"] for cs in curves.values() for c in cs for p in c)
        for s, per_seed in needed.items():
            if s == "random":
                continue
            # a curve that never reaches the goal counts as needing the largest label count (a lower bound)
            sav = [1 - (v if v is not None else cap) / (r if r is not None else cap)
                   for v, r in zip(per_seed, needed["random"])]
            out["saving_vs_random"][s] = {"per_seed": sav, "mean": float(np.mean(sav)), "std": float(np.std(sav))}
    best = max(out["saving_vs_random"].items(), key=lambda kv: kv[1]["mean"], default=(None, {"mean": None}))
    out.update({"best_ordering": best[0], "best_saving_mean": best[1]["mean"],
                "target": ">= 30% fewer labels than random to reach 95% of the full-data quality (mean over seeds)",
                "meets_target": best[1]["mean"] is not None and best[1]["mean"] >= 0.30})
    return out


def plot(curves: dict[str, list[list[dict]]], full: dict, goal: float, path: Path, setup: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for strategy, cs in curves.items():
        xs = [p["labels"] for p in cs[0]]
        ys = np.array([[p["quality"] for p in c] for c in cs])          # (seeds, rounds)
        m, sd = ys.mean(0), ys.std(0)
        ax.plot(xs, m, marker="o", label=LABELS[strategy])
        ax.fill_between(xs, m - sd, m + sd, alpha=0.15)
    ax.axhline(full["quality"], color="grey", linestyle="--", label=f"all {full['labels']} pool images")
    ax.axhline(goal, color="grey", linestyle=":", label="95% of that")
    ax.set_xlabel("labelled images")
    ax.set_ylabel("fg IoU, mean over modalities")
    ax.set_title(f"{setup['data']}: mixed modalities, {setup['seeds']} seeds (mean ± sd)", fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
