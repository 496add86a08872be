"""Active learning where labels still matter: which order of labelling reaches the full-data quality first.

Setting: DSB 2018 at 256 px (../shared/data/dsb2018) holds dark-field fluorescence images (~75%) and
bright-field ones (H&E and other stains: ~25%) that look nothing alike. A project like this is labelled
for every modality, so quality is the mean over modalities of the foreground IoU per image (macro), on a
held-back test set with the same number of images of each (the natural-frequency mean is kept too).
At the natural mix (23% bright-field in the pool) the curve saturates at 2-8 labels (stop 20), so no
ordering can save much. Other settings (issue 11 section 5):
- `--rare brightfield:0.05`: a fluorescence project with a few bright-field slides (a rare modality that
  needs its own labels: a model that saw none scores ~0.3 on it);
- `--data dsb2018_native`: the same images at their native sizes (saturates like 256 px: 2 labels 0.559,
  8 labels 0.686, all 150 0.701; active_learning_native_noise.json);
- `--data pets`: the 3 breeds as 3 classes, quality = IoU of each image's breed, mean over breeds. At 150
  iterations the label model does not tell the breeds apart (4 labels 0.183, all 150 0.202: the full-pool
  model calls every pet an Abyssinian; active_learning_pets_noise.json), so labels do not matter there;
- `--data dsb2018+pets --rare pet:0.1`: a mixed project, pets as a third modality of one class 'object'.

Design (stop 20; the stop-18 run warm-started 30 iterations per round and its curves were noise):
- Every point of a curve is a model trained FROM SCRATCH on that labelled set for a fixed number of
  iterations (--iters) with the seed's training seed, so a point depends only on its labelled set and
  not on the path that led to it. `--noise` measures first how much the quality of one fixed labelled set
  moves with the training seed alone, which sets the iterations (and says which differences are real).
- Per seed: a random start set, then rounds up to each --schedule count; every ordering picks from the
  same pool with the model trained on its own labelled set. The full-pool model (same iterations) is
  trained per seed too; the goal is 95% of its mean over seeds.
- Orderings: random; score (lowest Tessera task score first, what "Sort by Prediction score" gives);
  diversity (greedy k-center on the label model's image embeddings, model.acquisition.select);
  udiv (uncertainty x diversity: k-center weighted by 1 - score); priority (the per-task form a labeller
  can sort by: (1 - score) x distance to the nearest labelled image, top-k, model.acquisition.priority);
  codes (k-center on the square roots of the images' VQ code histograms, model.acquisition.code_histogram).
- Reported, mean ± std over seeds: labels to 95% of the full-data quality (interpolated between rounds;
  a curve that never gets there counts as the largest label count, a lower bound), its saving against
  random (paired per seed), the quality at every label count, and the area under the quality curve
  (mean quality over the label range, trapezoids) with its paired difference to random.

    python -m bench.active_learning [--data dsb2018|dsb2018_native|pets|dsb2018+pets] [--rare GROUP:SHARE,...]
        [--name NAME] [--seeds 0 1 2] [--iters 150] [--jobs 2] [--noise K ...]

Writes bench/results/active_learning_NAME.json (and .png).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
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

STRATEGIES = ("random", "score", "diversity", "priority", "udiv", "codes")
LABELS = {"random": "random", "score": "lowest Tessera score first", "diversity": "diversity (k-center, embeddings)",
          "udiv": "uncertainty x diversity (weighted k-center)", "priority": "priority column (uncertainty x novelty)",
          "codes": "diversity (k-center, VQ code histograms)"}


def modality(image: np.ndarray) -> str:
    """'fluorescence' (grey, dark background) or 'brightfield' (stained colour or a bright background)."""
    x = image.astype(np.float32)
    colourful = (x.max(2) - x.min(2)).mean() > 12
    return "brightfield" if colourful or np.median(x.mean(2)) > 100 else "fluorescence"


def is_pets(data: str) -> bool:
    return Path(data).name == "pets" and "+" not in data


def breed(sample_id: str) -> str:
    """Oxford-IIIT Pet: the breed is the file name before the last '_'."""
    return sample_id.rsplit("_", 1)[0]


def target_mask(classes: np.ndarray, group: str, names: list[str]) -> np.ndarray:
    """The pixels quality is measured on in an image of `group`: its breed's class where the group is a
    label name (Pets: a pet predicted as another breed counts as missed), else every foreground class."""
    return classes == names.index(group) + 1 if group in names else classes > 0


def imbalanced_pool(ids: list[str], group_of, size: int, rare: dict[str, float] | None = None) -> list[str]:
    """The first `size` ids in their given order, with each group of `rare` held to round(size * share) of
    them (a project where some classes or modalities are rare); the others fill the rest in their order."""
    if not rare:
        return ids[:size]
    held = [i for g, share in rare.items() for i in [i for i in ids if group_of(i) == g][:int(round(size * share))]]
    others = [i for i in ids if group_of(i) not in rare][:size - len(held)]
    keep = set(held) | set(others)
    return [i for i in ids if i in keep]


def parse_rare(text: str) -> dict[str, float]:
    """'pet:0.05,brightfield:0.05' -> {'pet': 0.05, 'brightfield': 0.05}."""
    out = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        g, _, share = part.partition(":")
        out[g] = float(share)
    return out


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


def area(curve: list[dict], key: str = "quality") -> float:
    """Mean quality over the curve's label range (trapezoids, label counts as x)."""
    x = np.array([p["labels"] for p in curve], float)
    y = np.array([p[key] for p in curve], float)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0])) if len(x) > 1 else float(y[0])


def quality(m_by_group: dict[str, list[float]]) -> dict:
    groups = {g: float(np.mean(v)) for g, v in m_by_group.items()}
    allv = [x for v in m_by_group.values() for x in v]
    return {"quality": float(np.mean(list(groups.values()))), "iou_natural": float(np.mean(allv)),
            **{f"iou_{g}": v for g, v in groups.items()}}


class Sim:
    """Training (from scratch), evaluation and selection for one benchmark process."""

    def __init__(self, args, by_id: dict, test: dict[str, list], names: list[str], work: Path, group_of):
        from tessera.model.train_vqvae import TrainConfig

        self.args, self.by_id, self.test, self.names, self.work = args, by_id, test, names, work
        self.group = group_of
        self.cfg = TrainConfig(max_iters=args.iters, device="cpu", threads=args.threads, eval_interval=10 ** 9,
                               widths=tuple(int(w) for w in args.widths.split(",")), codebook_size=128,
                               embed_dim=32, crop=96, batch_size=args.batch)
        self.n_fit = 0

    def fit(self, ids: list[str], name: str, seed: int):
        """(predictor, point): a model trained from scratch on ids with training seed `seed`, scored."""
        from tessera.model import metrics
        from tessera.model.inference import Predictor
        from tessera.model.train_vqvae import train

        t0 = time.time()
        ckpt = train(dataclasses.replace(self.cfg, seed=seed), [self.by_id[i] for i in ids], [], self.names,
                     self.work / f"{name}.pt")
        t1 = time.time()
        predictor = Predictor.from_checkpoint(ckpt, device="cpu")
        ious = {}
        for g, samples in self.test.items():
            preds = predictor.predict([s.image for s in samples])
            ious[g] = [metrics.iou(target_mask(p.classes, g, self.names), target_mask(s.classes, g, self.names))
                       for p, s in zip(preds, samples)]
        self.n_fit += 1
        ckpt.unlink(missing_ok=True)
        return predictor, {"labels": len(ids), **quality(ious), "train_s": round(t1 - t0, 1),
                           "eval_s": round(time.time() - t1, 1)}

    def _scores(self, predictor, images: list[np.ndarray]) -> np.ndarray:
        return np.array([p.score for b in range(0, len(images), 32) for p in predictor.predict(images[b:b + 32])])

    def pick(self, strategy: str, predictor, labelled: list[str], pool: list[str], k: int, rng) -> list[str]:
        from tessera.model import acquisition

        if strategy == "random":
            return rng.sample(pool, k)
        images = [self.by_id[i].image for i in pool]
        if strategy == "score":
            return [pool[j] for j in np.argsort(self._scores(predictor, images), kind="stable")[:k]]
        labelled_images = [self.by_id[i].image for i in labelled]
        if strategy == "codes":
            hist = acquisition.code_histogram(predictor, images)
            return [pool[j] for j in acquisition.select(hist, acquisition.code_histogram(predictor, labelled_images), k)]
        emb = acquisition.embed(predictor, images)
        lab = acquisition.embed(predictor, labelled_images)
        if strategy == "diversity":
            return [pool[j] for j in acquisition.select(emb, lab, k)]
        scores = self._scores(predictor, images)
        if strategy == "udiv":
            return [pool[j] for j in acquisition.select(emb, lab, k, uncertainty=1.0 - scores)]
        prio = acquisition.priority(emb, lab, scores)                        # "priority": a sortable column
        return [pool[j] for j in np.argsort(-prio, kind="stable")[:k]]

    def curves(self, strategies: list[str], seed: int, start: list[str], start_point: tuple,
               pool_ids: list[str]) -> dict[str, list[dict]]:
        """Every strategy's curve, round by round, each point trained from scratch with this seed."""
        state = {s: {"predictor": start_point[0], "labelled": list(start), "curve": [dict(start_point[1])],
                     "rng": random.Random(seed * 1000 + 1)} for s in strategies}
        for target in self.args.schedule:
            if target <= len(start):
                continue
            for strategy, st in state.items():
                t0 = time.time()
                taken = set(st["labelled"])
                pool = [i for i in pool_ids if i not in taken]
                picked = self.pick(strategy, st["predictor"], st["labelled"], pool, target - len(taken), st["rng"])
                select_s = time.time() - t0
                st["labelled"] += picked
                st["predictor"], point = self.fit(st["labelled"], f"s{seed}-{strategy}-{target}", seed)
                groups = [self.group(i) for i in st["labelled"]]
                point.update({"select_s": round(select_s, 1),
                              "labelled_groups": {g: groups.count(g) for g in self.test}})
                st["curve"].append(point)
                print(f"seed {seed} {strategy:9s} {_short(point)}", flush=True)
        return {s: st["curve"] for s, st in state.items()}


def _short(p: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in p.items()}


def _part(root: Path, one_class: bool) -> tuple[list, list[str], object]:
    """(samples, label names, group of an id) of one dataset folder: Pets groups by breed (its breeds are
    its classes, or one class 'object' when one_class), anything else by imaging modality."""
    from tessera.model.data import Sample, load_folder

    if is_pets(str(root)):
        from bench.label_model import load_pets

        samples, names = load_pets(root)
        if one_class:                       # in a mixed project a pet is one more kind of object
            samples = [Sample(s.image, (s.classes > 0).astype(np.int32), s.instances, id=s.id) for s in samples]
            return samples, ["object"], lambda i: "pet"
        return samples, names, breed
    samples, names = load_folder(root)
    by_id = {s.id: s for s in samples}
    return samples, names, lambda i: modality(by_id[i].image)


def load_samples(data: str) -> tuple[dict, list[str], list[str], object]:
    """(samples by id, label names, ids in a fixed hash order, group of an id). data: a folder, or several
    joined by '+' (a mixed project, one class 'object': e.g. dsb2018+pets)."""
    roots = [Path(d) if Path(d).exists() else SHARED_DATA / d for d in data.split("+")]
    parts = [_part(r, one_class=len(roots) > 1) for r in roots]
    by_id, groups = {}, {}
    for samples, _, group_of in parts:
        for s in samples:
            by_id[s.id], groups[s.id] = s, group_of(s.id)
    names = parts[0][1] if len(parts) == 1 else ["object"]
    # DSB's ids are hex, so their sorted order is a hash order (the stop-20 runs' pools); Pets' names sort by
    # breed: a hash of the id mixes the groups in the pool's first N
    hashed = len(roots) > 1 or is_pets(str(roots[0]))
    order = sorted(by_id, key=(lambda i: hashlib.sha1(i.encode()).hexdigest()) if hashed else None)
    return by_id, names, order, groups.__getitem__


def _load(args) -> tuple[dict, dict[str, list], list[str], list[str], dict, object]:
    """(samples by id, balanced test set by group, label names, pool ids, pool group counts, group of an id)."""
    from tessera.model.data import split_ids

    by_id, names, order, group_of = load_samples(args.data)
    train_ids, test_ids = split_ids(order, 0.2)
    test: dict[str, list] = {}
    for i in test_ids:
        test.setdefault(group_of(i), []).append(by_id[i])
    n_test = min(args.test_per_modality, *(len(v) for v in test.values()))
    test = {g: v[:n_test] for g, v in sorted(test.items())}
    pool_ids = imbalanced_pool(train_ids, group_of, args.pool, parse_rare(args.rare))
    mix = {g: sum(group_of(i) == g for i in pool_ids) for g in test}
    return by_id, test, names, pool_ids, mix, group_of


def run_job(args, job: tuple, strategies: list[str]) -> dict:
    """One process's share: ("seed", s) = every strategy's curve of seed s and that seed's full-pool
    model; ("noise", k, s) = k fixed labelled images (the first k of a fixed random order), seed s."""
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    t0, cpu0 = time.time(), time.process_time()
    by_id, test, names, pool_ids, _, group_of = _load(args)
    work = Path(tempfile.mkdtemp(prefix="tessera-al-"))
    sim = Sim(args, by_id, test, names, work, group_of)
    try:
        if job[0] == "noise":
            ids = random.Random(12345).sample(pool_ids, len(pool_ids))[:job[1]] if job[1] else pool_ids
            _, point = sim.fit(ids, f"noise-{job[1]}-{job[2]}", job[2])
            print(f"noise {len(ids)} labels seed {job[2]}: {_short(point)}", flush=True)
            return {"noise": point, "k": len(ids), "seed": job[2]}
        seed = job[1]
        full = None
        if not args.full_from:
            _, full = sim.fit(pool_ids, f"s{seed}-full", seed)
            print(f"seed {seed} full pool {_short(full)}", flush=True)
        start = random.Random(seed).sample(pool_ids, args.start)
        start_point = sim.fit(start, f"s{seed}-start", seed)
        print(f"seed {seed} start     {_short(start_point[1])}", flush=True)
        curves = sim.curves(strategies, seed, start, start_point, pool_ids)
        return {"seed": seed, "full": full, "curves": curves, "wall_s": time.time() - t0,
                "cpu_s": time.process_time() - cpu0, "trainings": sim.n_fit}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _ms(values) -> dict:
    v = [float(x) for x in values]
    return {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v}


def summarise(curves: dict[str, list[list[dict]]], fulls: list[dict]) -> dict:
    """curves: strategy -> per seed -> points. Labels to 95% of the mean full-pool quality, savings against
    random (paired per seed), quality per label count and area under the curve, mean ± std over seeds."""
    full_q = [f["quality"] for f in fulls]
    goal = 0.95 * float(np.mean(full_q))
    cap = max(p["labels"] for cs in curves.values() for c in cs for p in c)
    needed = {s: [labels_to_reach(c, goal) for c in cs] for s, cs in curves.items()}
    capped = {s: [v if v is not None else float(cap) for v in per_seed] for s, per_seed in needed.items()}
    out = {"full_data_quality": _ms(full_q), "goal_quality_95pct": goal, "labels_to_95pct": {},
           "saving_vs_random": {}, "quality_per_labels": {}, "area_under_curve": {}, "auc_minus_random": {}}
    for s, cs in curves.items():
        out["labels_to_95pct"][s] = {**_ms(capped[s]), "reached": f"{sum(v is not None for v in needed[s])}/{len(cs)}",
                                     "note": "never reached counts as the largest label count (a lower bound)"}
        xs = [p["labels"] for p in cs[0]]
        out["quality_per_labels"][s] = {str(x): _ms([c[j]["quality"] for c in cs]) for j, x in enumerate(xs)}
        out["area_under_curve"][s] = _ms([area(c) for c in cs])
    if "random" in curves:
        for s in curves:
            if s == "random":
                continue
            sav = [1 - v / r for v, r in zip(capped[s], capped["random"])]
            # the mean of per-seed ratios is heavy-tailed when random reaches the goal after one pick in some
            # seeds and not by the last count in others; the saving of the means and the paired label
            # difference are given beside it
            out["saving_vs_random"][s] = {**_ms(sav), "seeds_saving": f"{sum(x > 0 for x in sav)}/{len(sav)}",
                                          "of_means": 1 - float(np.mean(capped[s])) / float(np.mean(capped["random"])),
                                          "labels_minus_random": _ms(np.subtract(capped[s], capped["random"]))}
            d = [area(c) - area(r) for c, r in zip(curves[s], curves["random"])]
            out["auc_minus_random"][s] = {**_ms(d), "seeds_above": f"{sum(x > 0 for x in d)}/{len(d)}"}
    best = max(out["saving_vs_random"].items(), key=lambda kv: kv[1]["mean"], default=(None, {"mean": None}))
    out.update({"best_ordering": best[0], "best_saving_mean": best[1]["mean"],
                "target": ">= 30% fewer labels than random to reach 95% of the full-data quality (mean over seeds)",
                "meets_target": best[1]["mean"] is not None and best[1]["mean"] >= 0.30})
    return out


def summarise_noise(done: list[dict]) -> dict:
    out = {}
    for k in sorted({d["k"] for d in done}):
        out[str(k)] = _ms([d["noise"]["quality"] for d in done if d["k"] == k])
        out[str(k)]["train_s"] = float(np.mean([d["noise"]["train_s"] for d in done if d["k"] == k]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(SHARED_DATA / "dsb2018"))
    ap.add_argument("--name", default="dsb", help="writes bench/results/active_learning_NAME.json/.png")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pool", type=int, default=150, help="unlabelled pool: this many training-split images")
    ap.add_argument("--test-per-modality", type=int, default=24)
    ap.add_argument("--rare", default="", metavar="GROUP:SHARE,...",
                    help="groups (modalities; Pets: breeds; a mixed project's 'pet') held rare in the pool, each to "
                         "SHARE of it")
    ap.add_argument("--start", type=int, default=2, help="labelled images at the start (random)")
    ap.add_argument("--schedule", default="3,4,6,8", help="labelled images after each round")
    ap.add_argument("--iters", type=int, default=150, help="training iterations of every model (from scratch)")
    ap.add_argument("--batch", type=int, default=8, help="training batch size")
    ap.add_argument("--widths", default="8,16,32,48", help="label-model widths (a small model keeps it fast)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--jobs", type=int, default=2, help="processes (seeds side by side)")
    ap.add_argument("--strategies", default="random,score,diversity,priority", help=f"comma-separated, of {STRATEGIES}")
    ap.add_argument("--noise", type=int, nargs="*", default=None, metavar="K",
                    help="instead: the quality of the same K labelled images (0 = the whole pool) per seed")
    ap.add_argument("--full-from", default="", metavar="NAME",
                    help="take the full-pool models' quality from a --noise run's active_learning_NAME.json (same "
                         "iterations, batch and widths, K = 0) instead of training them again")
    ap.add_argument("--combine", nargs="+", default=None, metavar="NAME",
                    help="instead: summarise the curves of earlier runs active_learning_NAME.json together")
    args = ap.parse_args()
    args.schedule = [int(x) for x in args.schedule.split(",")]
    strategies = [x.strip() for x in args.strategies.split(",") if x.strip()]
    if not strategies or any(x not in STRATEGIES for x in strategies):
        ap.error(f"--strategies takes a comma-separated subset of {STRATEGIES}")

    if args.combine:
        return combine(args)
    from concurrent.futures import ProcessPoolExecutor

    t_all = time.time()
    _, test, _, pool_ids, mix, _ = _load(args)
    n_test = len(next(iter(test.values())))
    print(f"pool {len(pool_ids)} images {mix}; test {n_test} per modality; {args.iters} iters per model", flush=True)
    if args.noise is not None:
        jobs = [("noise", k, s) for k in args.noise for s in args.seeds]
    else:
        jobs = [("seed", s) for s in args.seeds]
    with ProcessPoolExecutor(max_workers=args.jobs) as ex:
        done = list(ex.map(run_job, [args] * len(jobs), jobs, [strategies] * len(jobs)))
    setup = {"data": "+".join(Path(d).name for d in args.data.split("+")), "pool": len(pool_ids), "pool_modalities": mix,
             "rare": parse_rare(args.rare) or None,
             "test_per_modality": n_test, "start": args.start, "schedule": args.schedule,
             "iters_per_model": args.iters, "from_scratch": True, "batch": args.batch, "widths": args.widths,
             "threads_per_process": args.threads, "processes": args.jobs, "seeds": args.seeds,
             "wall_s": round(time.time() - t_all, 1), "load_avg_1min_at_end": round(os.getloadavg()[0], 1)}
    if args.noise is not None:
        summary = summarise_noise(done)
        print(summary)
        write_result(f"active_learning_{args.name}", {"summary": {"quality_of_fixed_labelled_set": summary},
                                                      "setup": setup, "runs": done})
        return
    curves = {s: [d["curves"][s] for d in done] for s in strategies}
    fulls = full_from(args.full_from, setup) if args.full_from else [d["full"] for d in done]
    summary = summarise(curves, fulls)
    print({k: v for k, v in summary.items() if k != "quality_per_labels"})
    setup.update({"trainings": sum(d["trainings"] for d in done), "cpu_s": round(sum(d["cpu_s"] for d in done), 1)})
    write_result(f"active_learning_{args.name}", {"summary": summary, "setup": setup, "full_data": fulls,
                                                  "curves": curves})
    plot(curves, summary, RESULTS / f"active_learning_{args.name}.png", setup)


def full_from(name: str, setup: dict) -> list[dict]:
    """The full-pool points of a --noise run with the same training setup."""
    import json

    ref = json.loads((RESULTS / f"active_learning_{name}.json").read_text())
    for key in ("iters_per_model", "batch", "widths", "pool", "test_per_modality", "data", "pool_modalities"):
        if ref["setup"].get(key) != setup.get(key):
            raise SystemExit(f"--full-from {name}: its {key} is {ref['setup'].get(key)}, this run's {setup.get(key)}")
    fulls = [r["noise"] for r in ref["runs"] if r["k"] == setup["pool"]]
    if not fulls:
        raise SystemExit(f"--full-from {name}: it has no whole-pool run (--noise 0)")
    setup["full_from"] = f"active_learning_{name}.json"
    return fulls


def combine(args) -> None:
    """One summary of the seeds of several runs with the same setup (each run kept under ~15 minutes)."""
    import json

    runs = [json.loads((RESULTS / f"active_learning_{n}.json").read_text()) for n in args.combine]
    strategies = list(runs[0]["curves"])
    curves = {s: [c for r in runs for c in r["curves"][s]] for s in strategies}
    fulls = runs[0]["full_data"] if all(r["full_data"] == runs[0]["full_data"] for r in runs) else \
        [f for r in runs for f in r["full_data"]]
    setup = {**runs[0]["setup"], "seeds": [s for r in runs for s in r["setup"]["seeds"]],
             "combined_from": [f"active_learning_{n}.json" for n in args.combine],
             "wall_s": [r["setup"]["wall_s"] for r in runs], "cpu_s": [r["setup"].get("cpu_s") for r in runs],
             "load_avg_1min_at_end": [r["setup"]["load_avg_1min_at_end"] for r in runs]}
    summary = summarise(curves, fulls)
    print({k: v for k, v in summary.items() if k != "quality_per_labels"})
    write_result(f"active_learning_{args.name}", {"summary": summary, "setup": setup, "full_data": fulls,
                                                  "curves": curves})
    plot(curves, summary, RESULTS / f"active_learning_{args.name}.png", setup)


def plot(curves: dict[str, list[list[dict]]], summary: dict, path: Path, setup: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for strategy, cs in curves.items():
        xs = [p["labels"] for p in cs[0]]
        ys = np.array([[p["quality"] for p in c] for c in cs])          # (seeds, rounds)
        m, sd = ys.mean(0), ys.std(0)
        ax.plot(xs, m, marker="o", label=LABELS[strategy])
        ax.fill_between(xs, m - sd, m + sd, alpha=0.12)
    ax.axhline(summary["full_data_quality"]["mean"], color="grey", linestyle="--",
               label=f"all {setup['pool']} pool images")
    ax.axhline(summary["goal_quality_95pct"], color="grey", linestyle=":", label="95% of that")
    ax.set_xlabel("labelled images")
    ax.set_ylabel("IoU of each image's breed, mean over breeds" if setup["data"] == "pets"
                  else "fg IoU, mean over modalities")
    rare = setup.get("rare") or {}
    rare = {rare: setup["rare_share"]} if isinstance(rare, str) else rare     # the first runs' form: --rare G --rare-share X
    rare = ", rare " + ", ".join(f"{g} {x:.0%}" for g, x in rare.items()) if rare else ""
    ax.set_title(f"{setup['data']}{rare}: {setup['iters_per_model']} iterations per model, "
                 f"{len(setup['seeds'])} seeds (mean ± sd)", fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
