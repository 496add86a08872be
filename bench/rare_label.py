"""Rare label benchmark (issue #12): do edited real images lift a rare label more than classic remedies?

    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python -m bench.rare_label [--iters 250] [--seeds 0 1 2]

Oxford-IIIT Pet, 3 breeds (fixed split by id hash, 20 % val, --val-per-breed val images of each breed).
Per seed, the training set is RARE_N images of the rare breed and COMMON_N of each other breed, drawn
from the training split with that seed. The label model is trained with EQUAL iterations (so about equal
time: every arm sees the same number of crops) in each arm:
  real_only  the real images, augmentation OFF
  classic    the rare images repeated to the other breeds' count (oversampling), augmentation ON
  edited     the real images + --n-edited edited images (model.edit.Editor: a real training image as the
             background, 1-2 real objects of the rare breed pasted in, exact masks), augmentation ON
  edited_os  edited + the classic oversampling
  balanced   the real images as the product trains on them: augmentation ON and its rarer-class draws
             (TrainConfig.class_balance); the arms above draw their images uniformly, their remedy alone
  edited_bal edited as the product trains on them (the rarer-class draws on)
--fit F shrinks a pasted object (down to F x the photo's object scale) until it stands beside the photo's
animal instead of covering it; --balance pastes, after each edit's rare object, the class with the fewest
pixels not yet in the image; --edited-aug off trains the edited arms without augmentation (model.edit.Editor).
Scores: pooled per-class IoU of each breed over the val images of all breeds (a rare-breed pixel
predicted as another breed, or the reverse, costs), and foreground IoU; per arm the pooled confusion matrix
(rows true bg + breeds, columns predicted) and the training set's pixel share per breed. Writes
bench/results/rare_label.json and bench/results/rare_label_grid.png (real rare images | edited images | labels).
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

from bench.common import RESULTS, code_changes, dataset, write_result
from bench.label_model import BREEDS, load_pets
from tessera.model import metrics
from tessera.model.data import Sample, split_ids
from tessera.model.edit import Editor
from tessera.model.inference import Predictor
from tessera.model.train_vqvae import TrainConfig, train as train_label

AUG_OFF = dict(flips=False, rot90=False, scale_min=1.0, scale_max=1.0, jitter=0.0)
AUG_ON: dict = {}  # TrainConfig defaults: flips, rot90, zoom 0.8-1.25, jitter 0.2
RARE_N, COMMON_N = 3, 15


def log(msg: str, t0: list[float] = [time.time()]) -> None:  # noqa: B006 (start time of the run)
    print(f"[{time.time() - t0[0]:6.0f}s] {msg}", flush=True)


def breed_of(s: Sample) -> str:
    return s.id.rsplit("_", 1)[0]


def pick_train(pool: list[Sample], rare: str, seed: int, rare_n: int = RARE_N) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for b in BREEDS:
        mine = [s for s in pool if breed_of(s) == b]
        n = rare_n if b == rare else COMMON_N
        out += [mine[i] for i in sorted(rng.choice(len(mine), n, replace=False))]
    return out


def fit(train: list[Sample], iters: int, aug: dict, out: Path, threads: int, seed: int,
        class_balance: float = 0.0) -> tuple[Path, float]:
    cfg = TrainConfig(max_iters=iters, eval_interval=10 * iters, log_interval=10 * iters, seed=seed,
                      device="cpu", threads=threads, class_balance=class_balance, **aug)
    t0 = time.time()
    ckpt = train_label(cfg, train, [], list(BREEDS), out)
    return ckpt, time.time() - t0


def score(ckpt: Path, val: list[Sample]) -> dict:
    """Pooled per-class IoU (confusion summed over all val images) and mean per-image foreground IoU."""
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    C = len(BREEDS)
    cm = np.zeros((C + 1, C + 1), np.int64)
    fg = []
    for i in range(0, len(val), 8):
        chunk = val[i:i + 8]
        for s, p in zip(chunk, predictor.predict([s.image for s in chunk])):
            cm += metrics.confusion(p.classes, s.classes, C)
            fg.append(metrics.iou(p.classes > 0, s.classes > 0))
    inter = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - inter
    iou = inter / np.maximum(union, 1)
    return {**{f"iou_{b}": float(iou[c + 1]) for c, b in enumerate(BREEDS)}, "fg_iou": float(np.mean(fg)),
            "miou": float(iou[1:].mean()), "confusion_true_by_pred": cm.tolist()}


def pixel_share(data: list[Sample]) -> dict:
    """Share of the labelled training pixels of each breed (what the unweighted loss sees per image drawn)."""
    n = np.bincount(np.concatenate([s.classes.ravel() for s in data]), minlength=len(BREEDS) + 1)[1:]
    return {b: round(float(n[c] / max(n.sum(), 1)), 3) for c, b in enumerate(BREEDS)}


def save_grid(real: list[Sample], edits: list[Sample], path: Path) -> None:
    """Rows: real rare-breed image | edited image | its label map (colour per class)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = np.array([[0, 0, 0], [230, 80, 60], [60, 200, 90], [70, 110, 230]], np.uint8)
    n = min(len(real), len(edits))
    fig, axes = plt.subplots(n, 3, figsize=(4.5, 1.55 * n), dpi=90)
    for r in range(n):
        for c, (pic, title) in enumerate(((real[r].image, "real (rare breed)"), (edits[r].image, "edited"),
                                          (palette[edits[r].classes], "edited: exact labels"))):
            axes[r, c].imshow(pic, interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(title, fontsize=7, pad=2)
    fig.tight_layout(pad=0.3, h_pad=0.3, w_pad=0.2)
    fig.savefig(path)
    plt.close(fig)


def summarize(rows: list[dict], arms: list[str], rare: str) -> dict:
    out = {}
    for arm in arms:
        for key in [f"iou_{b}" for b in BREEDS] + ["fg_iou", "miou"]:
            v = np.array([r[arm][key] for r in rows])
            out[f"{arm}_{key}_mean"] = float(v.mean())
            out[f"{arm}_{key}_std"] = float(v.std(ddof=1) if len(v) > 1 else 0)
    for arm in arms:
        if arm == "real_only":
            continue
        for base in ("real_only", "classic", "balanced"):
            if base == arm or base not in arms:
                continue
            d = np.array([100 * (r[arm][f"iou_{rare}"] - r[base][f"iou_{rare}"]) for r in rows])
            out[f"{arm}_rare_gain_vs_{base}_points_mean"] = float(d.mean())
            out[f"{arm}_rare_gain_vs_{base}_points_std"] = float(d.std(ddof=1) if len(d) > 1 else 0)
        if "real_only" not in arms:
            continue
        worst = min(100 * (np.mean([r[arm][f"iou_{b}"] for r in rows]) - np.mean([r["real_only"][f"iou_{b}"]
                    for r in rows])) for b in BREEDS if b != rare)
        out[f"{arm}_worst_other_breed_vs_real_only_points"] = float(worst)
    return out


def curve(summary: dict, counts: list[int], rare: str) -> list[dict]:
    """Gain curve rows: edited images n -> rare-breed gain over real_only and the worst other breed's change."""
    rows = [{"n_edited": 0, "rare_gain_points_mean": 0.0, "rare_gain_points_std": 0.0,
             "worst_other_breed_points": 0.0, "rare_iou_mean": summary[f"real_only_iou_{rare}_mean"]}]
    for n in counts:
        arm = f"edited_{n}"
        rows.append({"n_edited": n, "rare_gain_points_mean": summary[f"{arm}_rare_gain_vs_real_only_points_mean"],
                     "rare_gain_points_std": summary[f"{arm}_rare_gain_vs_real_only_points_std"],
                     "worst_other_breed_points": summary[f"{arm}_worst_other_breed_vs_real_only_points"],
                     "rare_iou_mean": summary[f"{arm}_iou_{rare}_mean"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rare", default="Bengal", choices=BREEDS)
    ap.add_argument("--iters", type=int, default=250, help="label-model iterations, every arm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-edited", type=int, default=30, help="edited images added in the edited arms")
    ap.add_argument("--max-objects", type=int, default=2, help="rare objects pasted per edited image (1..)")
    ap.add_argument("--fit", type=float, default=1.0,
                    help="Editor fit: < 1 shrinks a pasted object (down to this share of the scene's scale) to "
                         "stand beside the photo's animal instead of covering it")
    ap.add_argument("--balance", action="store_true",
                    help="Editor balance: objects after an image's first are of the class with the fewest pixels")
    ap.add_argument("--edited-aug", choices=["on", "off"], default="on", help="augmentation of the edited arms")
    ap.add_argument("--rare-n", type=int, default=RARE_N,
                    help="labelled images of the rare breed (COMMON_N: a balanced set, the ceiling of any remedy)")
    ap.add_argument("--val-per-breed", type=int, default=30)
    ap.add_argument("--arms", nargs="+", default=["real_only", "classic", "edited", "edited_os"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--curve", type=int, nargs="+", default=[],
                    help="gain curve: arms edited_<n> (real + the first n edited images, augmentation ON) for "
                         "each n; writes rare_label_curve.json")
    ap.add_argument("--reuse", nargs="*", default=[], help="results JSONs of this benchmark whose arms (same seeds, "
                                                             "training images and iterations) are taken, not retrained")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 iters, 1 seed, 5 val per breed")
    ap.add_argument("--out", default="", help="results name (bench/results/NAME.json) instead of rare_label[_curve]")
    args = ap.parse_args()
    if args.quick:
        args.iters, args.seeds, args.val_per_breed, args.n_edited = 20, [0], 5, 6
        args.curve = [min(n, 6) for n in args.curve]
    if args.curve:
        args.n_edited = max(args.curve)
        args.arms = ["real_only"] + [f"edited_{n}" for n in args.curve]
    torch.set_num_threads(args.threads)
    t_start, work = time.time(), Path(tempfile.mkdtemp(prefix="tessera-bench-rare-"))
    samples, names = load_pets(dataset("pets"))
    assert names == list(BREEDS), names
    train_ids, val_ids = split_ids([s.id for s in samples], 0.2)
    by_id = {s.id: s for s in samples}
    pool = [by_id[i] for i in train_ids]
    val = [s for b in BREEDS for s in [by_id[i] for i in val_ids if breed_of(by_id[i]) == b][:args.val_per_breed]]
    rare_idx = BREEDS.index(args.rare) + 1
    log(f"pets: pool {len(pool)}, val {len(val)}; rare {args.rare} ({args.rare_n} vs {COMMON_N}); "
        f"iters {args.iters}, threads {args.threads}, load {os.getloadavg()[0]:.1f}")
    rows, grid = [], None
    reused = {}
    for path in args.reuse:
        old = json.loads(Path(path).read_text())
        # another model/ gives other models from the same seed: only a run of the same model/ code is reused
        changed = code_changes(old["machine"]["commit"], "model")
        # real_only and classic train the label model alone: model/ files they never import may differ
        label_only = {"model/edit.py", "model/maskgan.py", "model/train_maskgan.py", "model/synthesizer.py",
                      "model/layouts.py", "model/self_train.py"}
        for f in changed:
            if f not in label_only:
                raise SystemExit(f"--reuse {path}: {f} changed since its commit {old['machine']['commit']}; "
                                 f"rerun those arms")
        edit_changed = bool({"model/edit.py", "model/layouts.py"} & set(changed))
        for r in old["rows"]:
            arms = {k: v for k, v in r.items() if isinstance(v, dict)}     # arm -> its scores
            same_edits = all(old["setup"].get(k, d) == v for k, d, v in
                             (("max_objects", None, args.max_objects), ("fit", 1.0, args.fit),
                              ("balance", False, args.balance), ("edited_augmentation", "on", args.edited_aug)))
            if edit_changed or not same_edits:  # its edited arms were made by other edit code or options
                arms = {k: v for k, v in arms.items() if not k.startswith("edited")}
            elif "edited" in arms:  # its edits are a prefix of ours
                arms[f"edited_{old['setup']['n_edited']}"] = arms["edited"]
            # arms of one seed gather over the files; a later file's arm replaces an earlier file's same arm
            for arm, scores in arms.items():
                reused.setdefault(r["seed"], {})[arm] = {"scores": scores, "train_ids": r["train_ids"],
                                                         "iters": old["setup"]["label_iters"], "file": path}
    for seed in args.seeds:
        train = pick_train(pool, args.rare, seed, args.rare_n)
        rare_real = [s for s in train if breed_of(s) == args.rare]
        t0 = time.time()
        edits = Editor(train, len(BREEDS), max_objects=args.max_objects, fit=args.fit,
                       balance=args.balance).edit(args.n_edited, label=rare_idx, seed=100 + seed)
        edit_s = time.time() - t0
        edited = [e.sample for e in edits]
        grid = grid or (rare_real, edited[:3])
        oversampled = train + rare_real * (COMMON_N // args.rare_n - 1)
        aug_ed = AUG_ON if args.edited_aug == "on" else AUG_OFF
        sets = {"real_only": (train, AUG_OFF), "classic": (oversampled, AUG_ON), "edited": (train + edited, aug_ed),
                "edited_os": (oversampled + edited, aug_ed), "balanced": (train, AUG_ON),
                "edited_bal": (train + edited, aug_ed),
                **{f"edited_{n}": (train + edited[:n], aug_ed) for n in args.curve}}
        balance = dict.fromkeys(("balanced", "edited_bal"), TrainConfig.class_balance)  # the product's draws
        row = {"seed": seed, "train_ids": [s.id for s in train], "edit_s": round(edit_s, 2),
               "n_edited": len(edited), "load1_start": round(os.getloadavg()[0], 2)}
        for arm in args.arms:
            data, aug = sets[arm]
            got = reused.get(seed, {}).get(arm)
            if got is not None:  # same seed, same training ids, same iterations: a finished run
                if got["train_ids"] != row["train_ids"] or got["iters"] != args.iters:
                    raise SystemExit(f"--reuse: seed {seed}'s {arm} was trained on other images or iterations")
                row[arm] = {**got["scores"], "reused_from": got["file"]}
                continue
            ckpt, dt = fit(data, args.iters, aug, work / f"{arm}_{seed}.pt", args.threads, seed,
                           balance.get(arm, 0.0))
            row[arm] = {**score(ckpt, val), "train_s": round(dt, 1), "n_train": len(data),
                        "train_pixel_share": pixel_share(data)}
            log(f"seed {seed} {arm:10s} " + " ".join(f"{b} {row[arm][f'iou_{b}']:.4f}" for b in BREEDS) +
                f" fg {row[arm]['fg_iou']:.4f} ({dt:.0f}s)")
        rows.append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if grid is not None and not args.quick and not args.curve:
        save_grid(*grid, RESULTS / "rare_label_grid.png")
    summary = summarize(rows, args.arms, args.rare)
    summary["wall_s"] = round(time.time() - t_start, 1)
    if args.curve:
        summary["curve"] = curve(summary, args.curve, args.rare)
    name = args.out or "rare_label" + ("_curve" if args.curve else "") + ("_quick" if args.quick else "")
    write_result(name, {
        "command": " ".join(["python", "-m", "bench.rare_label"] + sys.argv[1:]),
        "summary": summary, "rows": rows,
        "setup": {"dataset": "pets (Oxford-IIIT Pet, 3 breeds)", "rare": args.rare, "rare_n": args.rare_n,
                  "common_n": COMMON_N, "n_val": len(val), "label_iters": args.iters,
                  "label_batch": TrainConfig.batch_size, "seeds": args.seeds, "n_edited": args.n_edited,
                  "max_objects": args.max_objects, "fit": args.fit, "balance": args.balance,
                  "edited_augmentation": args.edited_aug, "torch_threads": args.threads,
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
                  "equal": "iterations (batch 8, crop 96): every arm sees the same number of training crops"},
        "targets": {"rare_gain_vs_real_only": "+5 IoU points", "rare_gain_vs_classic": "+2 IoU points",
                    "other_breeds": "no breed worse by more than 1 point"}})
    shutil.rmtree(work, ignore_errors=True)
    log(f"done in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
