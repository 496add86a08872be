"""What a training run pays for its held-back images at native size: a version's region cut, its figures and
the follow-edges choice run network passes over every held-back image (stop 45: each image went through the
network twice). A first version (nothing served) of procedural nuclei, 20 iterations on ten 256 px images, with
K held-back images of 2048 x 2048 (~370 objects each), through backend.training._train_and_register of git
revision --before and of the current code, alternating, two threads. Reports the seconds a run takes with K and
with no held-back image, and their difference per held-back image; and how many of a project's held-back 2048 px
images a run evaluates under TESSERA_EVAL_MEGAPIXELS (dataset.evaluated_held_back).

    python -m bench.heldback_cost --held 4 --rounds 2 --before 742f5b7 [--later --name heldback_cost_later]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import write_result


def run_once(training, work: Path, train, val, later: bool = False) -> float:
    """Seconds of one run; `later`: a second run, compared with the first one's version, half of its held-back
    images person-made (the first run untimed)."""
    from tessera.backend.settings import Settings

    shutil.rmtree(work, ignore_errors=True)
    judged = {s.id for s in val[::2]} if later else None
    for _ in ([False, True] if later else [True]):
        t0 = time.perf_counter()
        training._train_and_register(Settings(model_dir=work), "default", train, val, ["Nucleus"], "bench",
                                     iters=20, progress=lambda info: None, judged=judged)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--held", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--before", default="742f5b7")
    p.add_argument("--name", default="heldback_cost")
    p.add_argument("--later", action="store_true", help="time a later run (a served version to beat, half of the "
                   "held-back images person-made) instead of a first one")
    args = p.parse_args()
    import torch

    from bench.speed_native import before_module
    from tessera.backend import training
    from tessera.backend.dataset import evaluated_held_back
    from tessera.backend.settings import Settings
    import numpy as np

    from tessera.model.data import Sample, make_nuclei, make_nuclei_mosaic

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="tessera-heldback-"))
    try:
        variants = {"before": before_module(args.before, work, "backend.training"), "after": training}
        train = make_nuclei(10, size=256, seed=3)
        val = [make_nuclei_mosaic(2048, 2048, 512, 50 + k) for k in range(args.held)]
        for k, s in enumerate(val):
            s.id = f"held{k}"
        times: dict = {f"{v}_{k}": [] for v in variants for k in ("none", "held")}
        for r in range(args.rounds):
            for v in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                for k, held in (("none", []), ("held", val)):
                    times[f"{v}_{k}"].append(run_once(variants[v], work / "models", train, held, args.later))
                    print(v, k, round(times[f"{v}_{k}"][-1], 1), flush=True)
        med = {k: statistics.median(t) for k, t in times.items()}
        per = {v: (med[f"{v}_held"] - med[f"{v}_none"]) / args.held for v in variants}
        cap = Settings.model_fields["eval_megapixels"].default
        one = Sample(np.zeros((2048, 2048, 3), np.uint8), np.zeros((2048, 2048), np.int32),
                     np.zeros((2048, 2048), np.int32))
        project = [dataclasses.replace(one, id=f"{k}:image") for k in range(200)]   # 200 held back, arrays shared
        summary = {"run": "later" if args.later else "first", "held_back_images": args.held, "side": 2048,
                   "rounds": args.rounds, "threads": 2,
                   "before_rev": args.before, **{f"{k}_s": round(x, 1) for k, x in med.items()},
                   "before_s_per_held_back_image": round(per["before"], 2),
                   "after_s_per_held_back_image": round(per["after"], 2),
                   "eval_megapixels": cap,
                   "of_200_held_back_2048px_evaluated": len(evaluated_held_back(project, None, cap)),
                   "load_average_end": os.getloadavg()}
        print(summary, flush=True)
        write_result(args.name, {"summary": summary, "times_s": times})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
