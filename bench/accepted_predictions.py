"""Does a project whose people accept predictions as they are still get new versions? (issue 11, section 2)

Version 1 is trained on a few procedural nuclei images with exact labels; more tasks are then "annotated"
by accepting version 1's predictions unchanged (what a labeller does when they look right), a few more
with exact labels (what a labeller does when they fix them). A candidate warm-starts from version 1 and
trains on the non-held-back tasks; the held-back split is the project's (backend.dataset.split_tasks).
It is judged twice with the same candidate: the old rule (every held-back task is evidence, the
candidate must reach the served score - 0.01) and the new one (backend.training.judge: accepted
predictions are no evidence). Both versions are also scored on unseen images with exact labels, which
is what a promotion should follow.

    .venv/bin/python -m bench.accepted_predictions [--iters 300] [--seeds 3] [--threads 1]

Writes bench/results/accepted_predictions.json.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from tessera.backend.settings import Settings
from tessera.backend.dataset import split_tasks
from tessera.backend.training import judge, train_config, val_score
from bench.common import write_result
from tessera.model.data import Sample, make_nuclei
from tessera.model.inference import Predictor
from tessera.model.train_vqvae import evaluate, train

LABELS = ["Nucleus"]


def one_seed(seed: int, iters: int, n_first: int, n_accepted: int, n_fixed: int, n_test: int, work: Path) -> dict:
    settings = Settings(model_dir=work, device="cpu", train_iters=iters)
    cfg = train_config(settings, iters)
    images = make_nuclei(n_first + n_accepted + n_fixed + n_test, size=128, seed=seed)
    first, rest = images[:n_first], images[n_first:]
    accepted_src, fixed, test = rest[:n_accepted], rest[n_accepted:n_accepted + n_fixed], rest[n_accepted + n_fixed:]
    v1 = train(cfg, first[1:], first[:1], LABELS, work / "v1.pt")
    served = Predictor.from_checkpoint(v1, device="cpu")
    accepted = [Sample(s.image, p.classes, p.instances) for s, p in zip(accepted_src, served.predict(
        [s.image for s in accepted_src]))]
    project = [(str(i + 1), s, True) for i, s in enumerate(first + fixed)] + \
              [(str(len(first) + len(fixed) + i + 1), s, False) for i, s in enumerate(accepted)]
    samples = {tid: Sample(s.image, s.classes, s.instances, id=f"{tid}:image") for tid, s, _ in project}
    made = {f"{tid}:image" for tid, _, person in project if person}
    train_ids, val_ids = split_tasks(sorted(samples, key=int))
    val = [samples[t] for t in val_ids]
    candidate = train(cfg, [samples[t] for t in train_ids], val, LABELS, work / "v2.pt", init_from=v1)
    new_all = val_score(evaluate(candidate, val), 1)
    old_all = val_score(evaluate(v1, val), 1)
    old_rule = new_all >= old_all - settings.promote_tolerance
    metrics = {"val_iou": new_all}
    new_rule, why = judge(candidate, lambda samples: val_score(evaluate(v1, samples), 1), "v1", val, made, LABELS,
                          settings, metrics)
    unseen_new, unseen_old = val_score(evaluate(candidate, test), 1), val_score(evaluate(v1, test), 1)
    return {"seed": seed, "n_val": len(val), "n_val_person_made": metrics["n_val_judged"],
            "val_iou_candidate": round(new_all, 4), "val_iou_served": round(old_all, 4),
            "old_rule_promotes": old_rule, "new_rule_promotes": new_rule, "new_rule_reason": why,
            "unseen_iou_candidate": round(unseen_new, 4), "unseen_iou_served": round(unseen_old, 4),
            "candidate_better_on_unseen": unseen_new > unseen_old}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accepted_predictions", description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--first", type=int, default=5, help="tasks with exact labels that version 1 trains on")
    p.add_argument("--accepted", type=int, default=20, help="tasks annotated by accepting version 1's predictions")
    p.add_argument("--fixed", type=int, default=2, help="more tasks with exact labels (fixed predictions)")
    p.add_argument("--test", type=int, default=40, help="unseen images with exact labels")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    runs = []
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as d:
            runs.append(one_seed(seed, args.iters, args.first, args.accepted, args.fixed, args.test, Path(d)))
        print(runs[-1])
    summary = {k: sum(r[k] for r in runs) for k in ("old_rule_promotes", "new_rule_promotes",
                                                    "candidate_better_on_unseen")}
    write_result("accepted_predictions", {"params": vars(args), "runs": runs, "of_seeds": summary,
                                          "seconds": round(time.time() - t0, 1)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
