"""Does the exposure match of pasted grey objects (model/edit.py `_matched`) make edited images harder or easier
to tell from real ones? The realism bench's edited sets (bench.gan --realism: the same images, sources, seeds
and classifier), made twice in one process, with the match and with `_matched` replaced by the identity (the
edits before stop 24), each scored by one real-vs-edited classifier per seed.

    OMP_WAIT_POLICY=PASSIVE python -m bench.realism_match [--cls-seeds 0 1 2] [--cls-iters 300]

Writes bench/results/realism_match.json. No GAN and no label model: only the edited kind of the realism bench.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import dataset, write_result
from bench.gan import centre_crop, classify_real_fake
import tessera.model.edit as edit
from tessera.model.data import load_folder, split_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cls-iters", type=int, default=300)
    ap.add_argument("--cls-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-real-train", type=int, default=150)
    ap.add_argument("--n-real-test", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    # the sets of bench.gan realism(): A and B are the edits' sources, C and D the real images
    samples, names = load_folder(dataset("dsb2018"))
    train_ids, _ = split_ids([s.id for s in samples], 0.2)
    by_id = {s.id: s for s in samples}
    pool = [by_id[i] for i in np.random.default_rng(0).permutation(train_ids)]
    n, nt = args.n_real_train, args.n_real_test
    crop = [centre_crop(s, 128) for s in pool[:60 + n + nt]]
    cA, cB, cC, cD = crop[:30], crop[30:60], crop[60:60 + n], crop[60 + n:]
    real_tr, real_te = [s.image for s in cC], [s.image for s in cD]

    def edited() -> tuple[list, list]:
        return ([e.sample.image for e in edit.Editor(cA, len(names), max_objects=4).edit(n, seed=3)],
                [e.sample.image for e in edit.Editor(cB, len(names), max_objects=4).edit(nt, seed=4)])

    kinds = {"matched": edited()}
    matched = edit._matched
    edit._matched = lambda obj, mask, image, instances: obj      # the edits before stop 24
    try:
        kinds["unmatched"] = edited()
    finally:
        edit._matched = matched
    changed = [float(np.mean([(a != b).any() for a, b in zip(kinds["matched"][i], kinds["unmatched"][i])]))
               for i in (0, 1)]
    res, summary = {"images_changed_by_the_match": {"train": changed[0], "test": changed[1]}}, {}
    for kind, (tr, te) in kinds.items():
        runs = [classify_real_fake(real_tr, tr, real_te, te, args.cls_iters, seed=s) for s in args.cls_seeds]
        accs = [r["test_accuracy"] for r in runs]
        res[kind] = {"test_accuracy": float(np.mean(accs)), "test_accuracy_std": float(np.std(accs)),
                     "test_accuracy_per_seed": accs, "runs": runs}
        summary[f"realism_classifier_acc_edited_{kind}"] = float(np.mean(accs))
        summary[f"realism_classifier_acc_edited_{kind}_std"] = float(np.std(accs))
        print(f"edited, {kind}: {np.mean(accs):.3f} +- {np.std(accs):.3f} {[round(a, 3) for a in accs]}", flush=True)
    summary["wall_s"] = round(time.time() - t0, 1)
    write_result("realism_match", {
        "summary": summary, "realism": res,
        "setup": {"sets": "bench.gan --realism's A/B (edit sources), C/D (real train/test), DSB 2018 128 px",
                  "classifier": "bench.gan.classify_real_fake, one per seed", "threads": args.threads},
        "targets": {"classifier_accuracy": "<= 0.75"}})


if __name__ == "__main__":
    main()
