"""How many held-back evaluations without a gain a first version should wait before it stops (the plateau stop,
backend/training.py's PLATEAU_EVALS), from one run per seed instead of one run per setting.

    .venv/bin/python -m bench.patience --task dsb_native_boxes --iters 2400 --max-val 30 --seeds 1 2
        [--patience 2 3 4] [--threads 1] [--set KEY=VALUE ...] [--name N]

Each seed trains once with no plateau stop (bench.regions' run, eval every 150 iterations as the product's
first run), keeping a copy of every state that became the best on the held-back images. Training is the same
with or without the stop until the stop comes (the learning-rate schedule follows max_iters, not the stop), so
for each patience P the replayed held-back history says where a run with P would have stopped and which state it
would have kept; that state's region cut is learned again on the held-back images and it is scored on the
validation images exactly as bench.regions scores a run. Writes bench/results/<name>.json (default patience_<task>).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from bench import regions
from bench.common import train_overrides, write_result
from tessera.model import train_vqvae as tv
from tessera.model.checkpoint import load_checkpoint, save_checkpoint
from tessera.model.inference import Predictor
from tessera.model.train_vqvae import raw_predictions


class _best_states:
    """While training: a CPU copy of every state that became the run's best, by iteration."""

    def __init__(self):
        self.states: dict[int, dict] = {}
        self.original = tv._validate

    def __enter__(self):
        def validate(run, frac, last):
            before = run.best_state
            self.original(run, frac, last)
            if run.best_state is not before:
                self.states[run.it] = {k: v.detach().cpu().clone() for k, v in run.best_state.items()}
        tv._validate = validate
        return self

    def __exit__(self, *exc):
        tv._validate = self.original
        return False


def replay(history: list[dict], patience: int) -> tuple[int, int]:
    """(iteration the run stops at, iteration of the state it keeps) with this patience, from the held-back
    evaluations of a run without a stop: _validate's rule (a state counts from the box AP50 on, ties keep the
    later state), then _loop's (stop once `patience` evaluations in a row did not improve)."""
    best, best_it, stale = -1.0, 0, 0
    for h in history:
        if "val_box_ap50" not in h:
            continue
        if h["val_box_ap50"] >= best:
            best, best_it, stale = h["val_box_ap50"], h["iter"], 0
        else:
            stale += 1
        if patience and stale >= patience:
            return h["iter"], best_it
    return history[-1]["iter"], best_it


def score(ckpt: Path, state: dict, held, val, work: Path, tag: str) -> dict:
    """The run's checkpoint with `state` in place of its weights: cut learned on `held`, scored on `val`."""
    payload = load_checkpoint(ckpt, "vqvae")
    payload["model"] = state
    path = work / f"{tag}.pt"
    save_checkpoint(payload, path)
    pred = Predictor.from_checkpoint(path, device="cpu")
    tv.learn_cut(pred, held)
    after, before, cut = regions.with_and_without_cut(pred, val, raw_predictions(pred, val))
    keys = ("box_ap50", "precision", "recall", "f1", "regions_per_image", "true_per_image")
    return {"after_cut": {k: after[k] for k in keys}, "no_cut_recall": before["recall"], "cut": cut.to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="dsb_native_boxes", choices=sorted(regions.TASKS))
    ap.add_argument("--iters", type=int, default=2400)
    ap.add_argument("--eval-interval", type=int, default=150)
    ap.add_argument("--max-val", type=int, default=30)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--patience", nargs="+", type=int, default=[2, 3, 4], help="0 is always added: no stop")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig overrides")
    ap.add_argument("--name", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    name = args.name or f"patience_{args.task}"
    work = Path("/tmp/tessera-bench-regions") / name
    work.mkdir(parents=True, exist_ok=True)
    samples, _ = regions.TASKS[args.task]()
    _, held, val = regions.split_fit_held_val(samples, args.max_val)
    rows = []
    for seed in args.seeds:
        with _best_states() as snap:
            row = regions.run(args.task, 0.0, 0.0, work, args.iters, args.max_val, "head", seed,
                              overrides={**train_overrides(args.set), "eval_interval": args.eval_interval,
                                         "patience": 0})
        ckpt = work / f"{args.task}_head_{seed}_ap.pt"
        history = load_checkpoint(ckpt, "vqvae")["history"]
        out = {"seed": seed, "train_wall_s": row["train_wall_s"], "held_back_history": row["held_back_history"],
               "patience": {}}
        for p in sorted({0, *args.patience}):
            stop_it, kept_it = replay(history, p)
            res = score(ckpt, snap.states[kept_it], held, val, work, f"s{seed}_p{p}")
            out["patience"][str(p)] = {"stopped_at": stop_it, "kept_state": kept_it, **res}
            print(f"seed {seed} patience {p}: stop {stop_it}, state {kept_it}, AP50 "
                  f"{res['after_cut']['box_ap50']:.4f}", flush=True)
        rows.append(out)
        write_result(name, {"task": args.task, "overrides": train_overrides(args.set), "iters": args.iters, "eval_interval": args.eval_interval,
                            "max_val": args.max_val, "threads": args.threads, "rows": rows,
                            "load_avg_1min_after": os.getloadavg()[0]})


if __name__ == "__main__":
    main()
