"""Learning latency: an annotation submitted in Label Studio -> a new promoted version served.

A real Label Studio and `tessera serve` (in-process job runner, the default settings unless given): a
project of 100 procedural 256x256 nuclei images, 99 of them annotated from their exact labels and trained
(the cold first version is timed too); then the 100th annotation is submitted and the clock runs until
/setup (what LS asks before every predict) reports a new version. A run that ends "rejected" does not
change /setup: the annotation of another task is updated and timed again (at most 3 tries).

    .venv/bin/python -m bench.learning_latency [--iters N] [--threads T] [--debounce S] [--n 100] [--tag T]

Writes bench/results/learning_latency.json (the target is <= 120 s on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import RESULTS, write_result

TARGET_S = 120.0


def _status(url: str, pid: int) -> dict:
    return httpx.get(f"{url}/status", params={"project": pid}, timeout=10).json()["job"]


def _version(url: str, pid: int, schema: str) -> str:
    return httpx.post(f"{url}/setup", json={"project": f"{pid}.0", "schema": schema},
                      timeout=10).json()["model_version"]


def _wait_settled(url: str, pid: int, timeout: float) -> dict:
    """Until nothing is scheduled or running; returns the status."""
    end = time.time() + timeout
    while time.time() < end:
        st = _status(url, pid)
        if st["state"] in ("done", "failed", "idle") and not st["pending"]:
            return st
        time.sleep(0.5)
    raise TimeoutError(f"project {pid} still busy after {timeout:.0f} s: {_status(url, pid)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="images in the project (all but one annotated first)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--iters", type=int, default=None, help="TESSERA_TRAIN_ITERS (default: the backend's default)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server (default: torch's)")
    ap.add_argument("--debounce", type=float, default=None, help="TESSERA_DEBOUNCE_S (default: the backend's)")
    ap.add_argument("--tries", type=int, default=3)
    ap.add_argument("--tag", default="", help="write learning_latency_<tag>.json (e.g. a before/after pair)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))        # so that `finally` stops LS and Tessera

    from tessera.backend.lsserver import LabelStudioServer, build_template, default_ls_venv, default_template_dir
    from tessera.backend.settings import Settings
    from tessera.backend.training import run_budget_s, train_config
    from tessera.model.data import make_nuclei
    from tests.conftest import CONFIG_ALL, TesseraProcess
    from tests.conftest_ls import upload_samples
    from tests.test_e2e_learning import gt_results

    work = Path(tempfile.mkdtemp(prefix="tessera-latency-"))
    env = {"MODEL_DIR": str(work / "models"), "TESSERA_LOG_LEVEL": "INFO"}
    if args.iters:
        env["TESSERA_TRAIN_ITERS"] = str(args.iters)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    if args.debounce is not None:
        env["TESSERA_DEBOUNCE_S"] = str(args.debounce)
    defaults = Settings()
    effective = {"train_iters": args.iters or defaults.train_iters,
                 "debounce_s": defaults.debounce_s if args.debounce is None else args.debounce,
                 "promote_tolerance": defaults.promote_tolerance,
                 "predict_torch_threads": args.threads or os.cpu_count(),
                 "train_torch_threads": args.threads or train_config(defaults).threads,
                 "train_budget_s": run_budget_s(defaults),
                 "images": args.n, "size": args.size}
    load_before = os.getloadavg()
    out: dict = {"settings": effective, "target_s": TARGET_S}
    ls = LabelStudioServer(default_ls_venv(), work / "ls", template=build_template(default_ls_venv(),
                                                                                   default_template_dir()))
    ls.start()
    tessera = None
    try:
        env.update({"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token})
        tessera = TesseraProcess(env, work / "tessera.log").wait_up()
        api = ls.client()
        pid = api.projects.create(title="latency", label_config=CONFIG_ALL).id
        samples = make_nuclei(args.n, size=args.size, seed=7)
        tasks = []
        for start in range(0, len(samples), 25):
            tasks += upload_samples(api, pid, [s.image for s in samples[start:start + 25]], f"img{start:03d}")
        api.ml.create(project=pid, url=tessera.url, title="Tessera", is_interactive=False)

        t0 = time.time()
        for i in range(args.n - 1):
            api.annotations.create(tasks[i], result=gt_results(samples[i]))
        t_annotated = time.time()
        st = _wait_settled(tessera.url, pid, 3600)
        first = st["last_result"] or {}
        out["cold"] = {"annotate_99_s": round(t_annotated - t0, 1), "first_version_after_last_annotation_s":
                       round(time.time() - t_annotated, 1), "runs": st["runs"], "result": first}
        print(f"cold: {out['cold']['first_version_after_last_annotation_s']} s after the 99th annotation, "
              f"{st['runs']} run(s), {first.get('status')} {first.get('version')}")

        tries = []
        for attempt in range(args.tries):
            before = _version(tessera.url, pid, CONFIG_ALL)
            runs = _status(tessera.url, pid)["runs"]
            t0 = time.time()
            if attempt == 0:
                api.annotations.create(tasks[-1], result=gt_results(samples[-1]))
            else:                         # an updated annotation is the same event for the loop
                ann = api.annotations.list(tasks[attempt])[0]
                api.annotations.update(ann.id, result=gt_results(samples[attempt]))
            t_sent = time.time()
            while True:
                now = _version(tessera.url, pid, CONFIG_ALL)
                st = _status(tessera.url, pid)
                if now != before or (st["runs"] > runs and st["state"] in ("done", "failed") and not st["pending"]):
                    break
                if time.time() - t0 > 1800:
                    raise TimeoutError("no new version after 30 minutes")
                time.sleep(0.25)
            t_served = time.time()
            st = _wait_settled(tessera.url, pid, 1800)
            result = st["last_result"] or {}
            m = result.get("metrics", {})
            row = {"served_s": round(t_served - t0, 1) if now != before else None, "submit_s": round(t_sent - t0, 2),
                   "status": result.get("status") if st["state"] == "done" else f"failed: {st['last_error']}",
                   "version": result.get("version"), "run_s": result.get("run_s"),
                   "fetch_s": m.get("fetch_s"), "train_s": m.get("train_s"), "compare_s": m.get("compare_s"),
                   "iters": m.get("iter_num"), "n_train": m.get("n_train"), "n_val": m.get("n_val"),
                   "val_iou": m.get("val_iou"), "current_val_iou": m.get("current_val_iou"),
                   "reason": result.get("reason")}
            tries.append(row)
            print(f"try {attempt + 1}: {row}")
            if row["served_s"] is not None:
                break
        out["tries"] = tries
        served = [t["served_s"] for t in tries if t["served_s"] is not None]
        out["latency_s"] = served[0] if served else None
        out["meets_target"] = bool(served) and served[0] <= TARGET_S
        out["load_avg_before"] = [round(x, 2) for x in load_before]
        out["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if tessera is not None:
            tessera.stop()
            shutil.copy(work / "tessera.log", Path(tempfile.gettempdir()) / "tessera-latency.log")
        ls.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"latency {out.get('latency_s')} s (target {TARGET_S} s)")
    reference = RESULTS / "learning_latency.json"          # the untagged file holds the reference run
    kept = reference.read_bytes() if args.tag and reference.exists() else None
    path = write_result("learning_latency", out)
    if args.tag:
        path.rename(path.with_name(f"learning_latency_{args.tag}.json"))
        if kept is not None:
            reference.write_bytes(kept)


if __name__ == "__main__":
    main()
