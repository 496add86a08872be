"""Few labels + an unlabelled pool on DSB2018 (issue #12): where does a gain come from, self-training or
edited images?

    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python -m bench.few_labels [--iters 150] [--seeds 0 1 2]
    ... -m bench.few_labels --data dsb2018_native --iters 600 --pool 0 --max-val 0   (the issue's setting)

dsb2018 (256 px) or dsb2018_native, fixed split by id hash (model.data.split_ids, 20 % val; the first --max-val val images
score every arm). Per seed, --n-labelled images of the training split are labelled (drawn with the seed);
up to --pool of the others are the unlabelled pool (their labels are never read). Arms, every one trained
with EQUAL label-model iterations and TrainConfig's default augmentation (the product's):
  real_only   the labelled images
  self_train  + pseudo-labels: the real_only model (the teacher) predicts the pool; the --keep-share it is
              most confident on (its task score), with its regions after the learned cut, join the labelled
              images (repeated to about half of each batch; model.self_train)
  edited      + --n-edited edited images (model.edit.Editor over the labelled images), mixed the same way
  both        + pseudo-labels + edited images
  oracle      the labelled images + the whole pool WITH its true labels (each image once): what a perfect
              teacher would give, the bound of any self-training at this budget
Self-training variants (VARIANTS below): st_confident keeps only the pseudo-labels' regions scoring >=
--region-score, st_inpaint also inpaints the dropped regions away (model.self_train.confident_sample),
st_light gives pseudo-labels a quarter of each batch, st_all keeps every pool image, st_round2 is a second
round (the self_train student is the teacher).
--data dsb2018_native: the native-size images (seen at the learned object scale, as the product trains);
--pool 0 makes every other training image unlabelled, --max-val 0 scores on the whole validation split.
Scores: mean per-image foreground IoU and box recall at IoU 0.5 (model.train_vqvae.evaluate), mean ± sd over
seeds, and per-seed gains over real_only. Writes bench/results/few_labels.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import fixed_split, write_result
from tessera.model.data import Sample
from tessera.model.edit import Editor
from tessera.model.inference import Predictor
from tessera.model.self_train import mix, predict_pool, pseudo_label
from tessera.model.train_vqvae import TrainConfig, evaluate, train as train_label

# self-training variants: name -> (keep_share, min_region_score, inpaint, labelled_share, teacher arm);
# None = the command line's --keep-share / --region-score
VARIANTS = {
    "self_train": (None, 0.0, False, 0.5, "real_only"),     # the images the teacher is most sure of, all regions
    "st_confident": (None, None, False, 0.5, "real_only"),  # ... only regions scoring >= --region-score
    "st_inpaint": (None, None, True, 0.5, "real_only"),     # ... the dropped regions inpainted away
    "st_light": (None, 0.0, False, 0.75, "real_only"),      # pseudo-labels a quarter of each batch, not half
    "st_all": (1.0, 0.0, False, 0.5, "real_only"),          # every pool image
    "st_round2": (None, 0.0, False, 0.5, "self_train"),     # a second round: the self_train student teaches
}
ARMS = ("real_only", *VARIANTS, "edited", "both", "oracle")
KEYS = ("fg_iou", "recall", "precision", "instance_f1")


def log(msg: str, t0: list[float] = [time.time()]) -> None:  # noqa: B006 (start time of the run)
    print(f"[{time.time() - t0[0]:6.0f}s] {msg} (load {os.getloadavg()[0]:.1f})", flush=True)


def fit(train: list[Sample], names: list[str], iters: int, out: Path, threads: int, seed: int) -> None:
    """A label model trained on `train` for `iters` iterations into `out`, unless a run with the same
    arguments left it in the cache folder (bench --cache); out's .json holds its training time."""
    if out.exists():
        return
    cfg = TrainConfig(max_iters=iters, eval_interval=10 * iters, log_interval=10 * iters, seed=seed,
                      device="cpu", threads=threads)
    t0 = time.time()
    path = train_label(cfg, train, [], names, out.with_suffix(".tmp.pt"))
    dt = time.time() - t0
    path.rename(out)
    out.with_suffix(".json").write_text(json.dumps({"train_s": dt, "n_train": len(train)}))


def run_seed(seed: int, train_pool: list[Sample], val: list[Sample], names: list[str], args, work: Path) -> dict:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_pool))
    labelled = [train_pool[i] for i in order[:args.n_labelled]]
    pool = [train_pool[i] for i in order[args.n_labelled:args.n_labelled + (args.pool or len(train_pool))]]
    row: dict = {"seed": seed, "labelled_ids": [s.id for s in labelled], "n_pool": len(pool)}
    work = work / f"{args.data}_it{args.iters}_n{args.n_labelled}_p{len(pool)}_s{seed}"
    work.mkdir(parents=True, exist_ok=True)
    ckpts: dict = {}        # arm -> its checkpoint
    preds: dict = {}        # teacher arm -> its predictions of the pool
    for arm in ["real_only"] + [a for a in args.arms if a != "real_only"]:
        out = work / (f"{arm}_r{args.region_score:g}.pt" if arm in ("st_confident", "st_inpaint") else f"{arm}.pt")
        meta = json.loads(out.with_suffix(".json").read_text()) if out.exists() else {}
        if args.only_cached and not out.exists() and arm != "real_only":
            continue                              # this seed lacks the arm
        ckpts[arm] = out
        if f"row_val{len(val)}" in meta:          # trained and scored by an earlier run (--cache)
            row[arm] = meta[f"row_val{len(val)}"]
        else:
            train, info = arm_set(arm, labelled, pool, names, args, ckpts, preds, row)
            fit(train, names, args.iters, out, args.threads, seed)
            row[arm] = {**score(out, val, len(train)), **info}
            meta = json.loads(out.with_suffix(".json").read_text())
            out.with_suffix(".json").write_text(json.dumps({**meta, f"row_val{len(val)}": row[arm]}))
        log(f"seed {seed} {arm:12s} fg {row[arm]['fg_iou']:.4f} recall {row[arm]['recall']:.4f} "
            f"({row[arm]['train_s']:.0f}s) {row[arm].get('pseudo', '')}")
    return row


def arm_set(arm: str, labelled: list[Sample], pool: list[Sample], names: list[str], args, ckpts: dict,
            preds: dict, row: dict) -> tuple[list[Sample], dict]:
    """An arm's training samples, and what to report about them."""
    extra, info, lab_share = [], {}, 0.5
    if arm in VARIANTS:
        keep, region, inpaint, lab_share, teacher = VARIANTS[arm]
        keep = args.keep_share if keep is None else keep
        region = args.region_score if region is None else region
        if teacher not in ckpts:
            raise SystemExit(f"arm {arm} needs arm {teacher} before it in --arms")
        extra = pseudo_label(None, [s.image for s in pool], [s.id for s in pool], keep_share=keep,
                             min_region_score=region, inpaint_dropped=inpaint,
                             preds=teacher_preds(teacher, ckpts, pool, preds, row))
        info = {"pseudo": pseudo_quality(extra, pool), "keep_share": keep, "region_score": region,
                "inpaint": inpaint, "labelled_share": lab_share, "teacher": teacher}
    elif arm == "oracle":       # the bound of any pseudo-label: every pool image with its true labels
        lab_share, extra = len(labelled) / (len(labelled) + len(pool)), pool
    elif arm in ("edited", "both"):
        extra = [e.sample for e in Editor(labelled, len(names), max_objects=args.max_objects)
                 .edit(args.n_edited, seed=100 + int(row["seed"]))]
        if arm == "both":
            extra += pseudo_label(None, [s.image for s in pool], [s.id for s in pool], keep_share=args.keep_share,
                                  preds=teacher_preds("real_only", ckpts, pool, preds, row))
    return mix(labelled, extra, lab_share), info


def teacher_preds(teacher: str, ckpts: dict, pool: list[Sample], preds: dict, row: dict) -> list:
    """The teacher arm's predictions of the pool (made once per seed and teacher)."""
    if teacher not in preds:
        t0 = time.time()
        preds[teacher] = predict_pool(Predictor.from_checkpoint(ckpts[teacher], device="cpu"),
                                      [s.image for s in pool])
        row[f"predict_pool_s_{teacher}"] = round(time.time() - t0, 1)
        sc = np.array([p.score for p in preds[teacher]])
        rs = np.concatenate([list(p.instance_score.values()) for p in preds[teacher]] + [[]])
        row[f"pool_scores_{teacher}"] = {"task_score_quartiles": np.percentile(sc, [25, 50, 75]).round(3).tolist(),
                                         "region_score_quartiles": np.percentile(rs, [25, 50, 75]).round(3).tolist()
                                         if len(rs) else []}
        log(f"{teacher} on the pool: {row[f'pool_scores_{teacher}']} ({row[f'predict_pool_s_{teacher}']}s)")
    return preds[teacher]


def score(ckpt: Path, val: list[Sample], n_train: int) -> dict:
    train_s = float(json.loads(ckpt.with_suffix(".json").read_text())["train_s"])
    return {**pick(evaluate(Predictor.from_checkpoint(ckpt, device="cpu"), val)), "train_s": round(train_s, 1),
            "n_train": n_train}


def pseudo_quality(pseudo: list[Sample], pool: list[Sample]) -> dict:
    """How good the pseudo-labels are against the pool's hidden truth (read for this report only, never
    for training): foreground IoU, and the share of true objects they hold a region over."""
    truth = {s.id: s for s in pool}
    ious, found = [], []
    for p in pseudo:
        t = truth[p.id.split(":", 1)[1]]
        pf, tf = p.classes > 0, t.classes > 0
        ious.append(float((pf & tf).sum() / max((pf | tf).sum(), 1)))
        ids = np.unique(t.instances[t.instances > 0])
        found += [bool(pf[t.instances == k].mean() > 0.5) for k in ids]
    return {"kept": len(pseudo), "fg_iou_vs_truth": round(float(np.mean(ious)), 4) if ious else 0.0,
            "true_objects_covered": round(float(np.mean(found)), 4) if found else 0.0}


def pick(m: dict) -> dict:
    return {k: float(m[k]) for k in KEYS}


def summarize(rows: list[dict], arms: list[str]) -> dict:
    """Mean and sd over the seeds that have an arm, and its per-seed gains over real_only in points."""
    out = {}
    for arm in arms:
        have = [r for r in rows if arm in r]
        if not have:
            continue
        out[f"{arm}_n_seeds"] = len(have)
        for k in KEYS:
            v = np.array([r[arm][k] for r in have])
            out[f"{arm}_{k}_mean"], out[f"{arm}_{k}_std"] = float(v.mean()), float(v.std(ddof=1) if len(v) > 1 else 0)
            if arm != "real_only":
                d = 100 * (v - np.array([r["real_only"][k] for r in have]))
                out[f"{arm}_{k}_gain_points_mean"] = float(d.mean())
                out[f"{arm}_{k}_gain_points_std"] = float(d.std(ddof=1) if len(d) > 1 else 0)
    return out


def save(args, rows: list[dict], n_val: int, t_start: float) -> None:
    """bench/results/<--name>.json of the seeds done."""
    summary = summarize(rows, ["real_only"] + [a for a in args.arms if a != "real_only"])
    summary["wall_s"] = round(time.time() - t_start, 1)
    argv = sys.argv
    if args.cache:      # the recorded command names no folder of this machine
        sys.argv = [("CACHE_DIR" if a == args.cache else a) for a in sys.argv]
    write_result(args.name, {
        "summary": summary, "rows": rows,
        "setup": {"dataset": args.data + (" (native sizes, learned object scale)" if "native" in args.data
                                          else " (256 px)"),
                  "split": "split_ids(ids, 0.2)", "n_val": n_val, "n_labelled": args.n_labelled,
                  "pool": rows[0]["n_pool"] if rows else 0, "keep_share": args.keep_share,
                  "region_score": args.region_score, "variants": {k: dict(zip(
                      ("keep_share", "min_region_score", "inpaint", "labelled_share", "teacher"), v))
                      for k, v in VARIANTS.items() if k in args.arms},
                  "n_edited": args.n_edited, "label_iters": args.iters, "label_batch": TrainConfig.batch_size,
                  "augmentation": "TrainConfig defaults in every arm", "teacher": "the real_only model of the seed",
                  "torch_threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
                  "equal": "iterations: every arm (student) trains --iters from scratch, the same batch size; "
                           "self-training also costs the teacher's run and one prediction pass over the pool "
                           "(a second round: two of each)",
                  "train_s_note": "a checkpoint reused from --cache reports the training time of the run that made it",
                  **({"collected": "--only-cached: every arm's checkpoint was trained by an earlier run of this "
                                   "bench with the same data, iterations, labelled count, pool, seed and --cache "
                                   "(runs of a few seeds and arms side by side, each 1 thread); this run scored "
                                   "them on the same validation split"} if args.only_cached else {})},
        "targets": {"gain_vs_real_only": "+5 points fg IoU and box recall (DSB2018 native size)"}})
    sys.argv = argv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="dsb2018", choices=["dsb2018", "dsb2018_native"],
                    help="dsb2018 (256 px) or dsb2018_native (native sizes, seen at the learned object scale)")
    ap.add_argument("--iters", type=int, default=150, help="label-model iterations, every arm (and the teacher)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-labelled", type=int, default=10)
    ap.add_argument("--pool", type=int, default=120, help="unlabelled images the teacher predicts (0: all the rest)")
    ap.add_argument("--keep-share", type=float, default=0.5, help="share of the pool kept as pseudo-labels")
    ap.add_argument("--region-score", type=float, default=0.7,
                    help="st_confident / st_inpaint: regions scoring under this are dropped from pseudo-labels")
    ap.add_argument("--n-edited", type=int, default=30)
    ap.add_argument("--max-objects", type=int, default=4)
    ap.add_argument("--max-val", type=int, default=60, help="validation images (0: all)")
    ap.add_argument("--arms", nargs="+", default=["real_only", "self_train", "edited", "both"], choices=ARMS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default="", help="folder that keeps each arm's checkpoint for later runs with the "
                    "same data, iterations, labelled count, pool and seed (default: a temporary folder)")
    ap.add_argument("--only-cached", action="store_true", help="with --cache: collect the arms already trained "
                    "there (scoring those not yet scored), train nothing but a missing real_only")
    ap.add_argument("--name", default="few_labels", help="results file bench/results/<name>.json")
    ap.add_argument("--quick", action="store_true", help="smoke run: 10 iters, 1 seed, pool 8, 5 val")
    args = ap.parse_args()
    if args.quick:
        args.iters, args.seeds, args.pool, args.max_val, args.n_edited = 10, [0], 8, 5, 4
        args.name += "_quick"
    torch.set_num_threads(args.threads)
    t_start = time.time()
    work = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="tessera-bench-few-"))
    train_pool, val, names = fixed_split(args.data, args.max_val or None)
    log(f"{args.data}: {len(train_pool)} train, {len(val)} val; {args.n_labelled} labelled, pool {args.pool or 'all'}; "
        f"iters {args.iters}, threads {args.threads}")
    rows = []
    for seed in args.seeds:     # the results file is rewritten after each seed: a stopped run keeps its seeds
        rows.append(run_seed(seed, train_pool, val, names, args, work))
        save(args, rows, len(val), t_start)
    if not args.cache:
        shutil.rmtree(work, ignore_errors=True)
    log(f"done in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
