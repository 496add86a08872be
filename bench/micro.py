"""Speed of the small hot paths whose limits used to be timed asserts in the tests: procedural data,
instance matching, and job submission (in-process; over Redis when redis-server is on PATH).

    .venv/bin/python -m bench.micro [--quick]

Writes bench/results/micro.json with p50/p95 per path and whether each meets its target.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time

import numpy as np

from bench.common import write_result
from bench.speed import pct, timed

# the limits the tests used to assert, per call
TARGETS_MS = {"make_nuclei_256_per_image": 100.0, "instance_match_400_objects": 500.0,
              "thread_submit": 20.0, "rq_submit": 100.0}


def _rq_submit_times(n: int) -> list[float] | None:
    """RQJobRunner.submit against a throw-away redis-server (no worker: the job just queues)."""
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    from tessera.backend.jobs import RQJobRunner
    from tests.conftest import free_port

    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        runner = RQJobRunner(f"redis://127.0.0.1:{port}/0", run_fn="json:dumps", debounce_s=60)
        end = time.monotonic() + 15
        while True:
            try:
                runner.conn.ping()
                break
            except Exception:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        return timed(lambda: runner.submit("p", "ANNOTATION_CREATED"), n)
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from tessera.backend.jobs import ThreadJobRunner
    from tessera.model.data import make_nuclei
    from tessera.model.metrics import instance_match

    n = 5 if args.quick else 30
    times: dict[str, list[float]] = {}
    times["make_nuclei_256_per_image"] = [t / 10 for t in timed(lambda: make_nuclei(10, 256, seed=2), n)]
    rng = np.random.default_rng(0)
    true = np.kron(np.arange(1, 401).reshape(20, 20), np.ones((12, 12), np.int32)).astype(np.int32)
    pred = np.roll(true, 2, axis=1) * (rng.random(true.shape) > 0.01)
    times["instance_match_400_objects"] = timed(lambda: instance_match(pred, true), n)
    runner = ThreadJobRunner(lambda *a: {}, debounce_s=3600)
    times["thread_submit"] = timed(lambda: runner.submit("p", "ANNOTATION_CREATED"), 20 * n)
    runner.close()
    rq = _rq_submit_times(20 * n)
    if rq is not None:
        times["rq_submit"] = rq
    res: dict = {}
    for name, ts in times.items():
        res[f"{name}_p50_ms"], res[f"{name}_p95_ms"] = pct(ts, 50), pct(ts, 95)
        res[f"{name}_meets_target"] = res[f"{name}_p50_ms"] <= TARGETS_MS[name]
    for k, v in res.items():
        print(f"{k:40s} {v:.3f}" if isinstance(v, float) else f"{k:40s} {v}")
    write_result("micro", {"summary": res, "targets": {f"{k}_p50_ms": f"<= {v:g}" for k, v in TARGETS_MS.items()},
                           "rq_submit_measured": rq is not None, "load_average_1m": os.getloadavg()[0]})


if __name__ == "__main__":
    main()
