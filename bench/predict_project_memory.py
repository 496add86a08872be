"""`tessera predict --project N` on a project whose tasks carry earlier versions' predictions: its peak memory,
its wall time and when it writes its first prediction, at git revision --before and with the current code.

A real Label Studio 1.23.2 (tests/conftest_ls's server); two identical projects of --tasks 520x696 tasks of
procedural nuclei (~116 objects), each task with --versions earlier predictions of brush, polygon and box
regions for every object (~0.2 MB of JSON each, as a label model's are), so the project lists ~0.6 MB a task.
Each revision runs `tessera predict --project` as a child process on a project of its own (the order swapped
with --swap), writing the served version's prediction for every task; reported: its peak RSS (ru_maxrss), its
wall time, and the seconds until Label Studio holds its first prediction. Then --annotated of the tasks get an
annotation, and a training run's listing of them is timed as before and as now.

    python -m bench.predict_project_memory --tasks 600 --versions 3 --before 2ad7a25
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import REPO, write_result
from bench.speed_native import before_tree, package_root


def old_predictions(versions: int, pid: int) -> list[list[dict]]:
    """Per image (8 mosaics), `versions` predictions of earlier label-model versions of project `pid`."""
    from bench.speed import CONFIG
    from tessera.backend.label_config import parse_label_config
    from tessera.backend.regions import instances_to_results
    from tessera.model.data import make_nuclei_mosaic

    controls = parse_label_config(CONFIG).controls
    out = []
    for k in range(8):
        s = make_nuclei_mosaic(520, 696, 256, 11 + k)
        labels = {int(i): "Nucleus" for i in np.unique(s.instances) if i}
        result = [r for c in controls for r in instances_to_results(s.instances, labels, {i: 0.9 for i in labels}, c)]
        out.append([{"model_version": f"tessera-p{pid}-v{v + 1:04d}", "score": 0.5, "result": result}
                    for v in range(versions)])
    return out


def make_project(ls, title: str, pngs: list, n: int, versions: int) -> tuple[int, int]:
    """A project of n tasks naming the 8 images, each with `versions` earlier predictions: (its id, its first
    task's id)."""
    from bench.speed import CONFIG
    from tessera.backend import lsclient

    pid = ls.projects.create(title=title, label_config=CONFIG).id
    urls = lsclient.upload_files(ls, pid, pngs)
    preds = old_predictions(versions, pid)
    ids = []
    for start in range(0, n, 25):
        ids += lsclient.import_tasks(ls, pid, [{"data": {"image": urls[i % 8]}, "predictions": preds[i % 8]}
                                               for i in range(start, min(n, start + 25))])
    return pid, min(ids)


def first_prediction_s(ls, task: int, t0: float, served: str, stop: threading.Event, out: dict) -> None:
    """Polls Label Studio until the project's first task has a prediction of `served` (the listing's order
    is the tasks' ids, so it is the first predicted): seconds since t0."""
    from tessera.backend.lsclient import _request

    while not stop.is_set():
        r = _request(ls, "GET", "api/predictions/", params={"task": task})
        if any(p.get("model_version") == served for p in r.json()):
            out["first_prediction_s"] = time.perf_counter() - t0
            return
        time.sleep(0.5)


def run_predict(tree: Path, work: Path, tag: str, env: dict, ls, project: tuple[int, int], served: str) -> dict:
    """`tessera predict --project pid` from `tree`'s code, in a child process: wall, peak RSS, first write."""
    exe = str(Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "tessera")
    if not Path(exe).exists():
        exe = str(REPO / ".venv" / "bin" / "tessera")
    child_env = {**os.environ, **env, "PYTHONPATH": str(package_root(tree, work / f"pp-{tag}"))}
    stop, seen = threading.Event(), {}
    t0 = time.perf_counter()
    pid, first_task = project
    watcher = threading.Thread(target=first_prediction_s, args=(ls, first_task, t0, served, stop, seen), daemon=True)
    watcher.start()
    proc = subprocess.Popen([exe, "predict", "--project", str(pid)], env=child_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out = {}
    reader = threading.Thread(target=lambda: out.update(stdout=proc.stdout.read(), stderr=proc.stderr.read()))
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    stop.set()
    watcher.join(5)
    if proc.returncode != 0:
        raise RuntimeError(f"{tag}: tessera predict failed: {out['stderr'][-2000:]}")
    result = json.loads(out["stdout"])
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "first_prediction_s": round(seen.get("first_prediction_s", float("nan")), 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "result": result}


def training_listing(ls, pid: int, n: int) -> dict:
    """A training run's listing once n of the project's tasks are annotated: seconds and bytes of JSON as the
    code before this stop listed (every task, pages of 25, annotated ones kept) and as it lists now (Label
    Studio filters the annotated ones, pages by bytes)."""
    from tessera.backend import lsclient

    box = [{"from_name": "bbox", "to_name": "image", "type": "rectanglelabels", "original_width": 696,
            "original_height": 520, "value": {"x": 10, "y": 20, "width": 5, "height": 5, "rotation": 0,
                                              "rectanglelabels": ["Nucleus"]}}]
    ids = sorted(t["id"] for t in lsclient.tasks(ls, pid))
    for tid in ids[::max(1, len(ids) // n)][:n]:
        ls.annotations.create(tid, result=box)
    out = {"annotated": n, "tasks": len(ids)}
    for name, kwargs in (("all_pages_of_25", {"page_size": 25, "page_bytes": 0}), ("annotated_only", {})):
        t0 = time.perf_counter()
        listed = [t for t in lsclient.tasks(ls, pid, only_annotated=name == "annotated_only", **kwargs)
                  if t.get("annotations")]
        out[name] = {"s": round(time.perf_counter() - t0, 1), "tasks": len(listed)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=600)
    ap.add_argument("--versions", type=int, default=3, help="earlier predictions a task carries")
    ap.add_argument("--before", default="2ad7a25", help="git revision timed as 'before'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--swap", action="store_true", help="run the current code first")
    ap.add_argument("--annotated", type=int, default=30, help="tasks annotated for the training listing's figure")
    ap.add_argument("--name", default="predict_project_memory")
    args = ap.parse_args()

    from bench.speed import bench_model
    from bench.speed_native import mosaic_pngs, started_ls
    from tessera.backend import lsclient

    work, server = started_ls("tessera-predict-project-")
    try:
        bench_model(work)
        pngs = mosaic_pngs()
        ls = server.client(timeout=600)
        trees = {"before": before_tree(args.before, work / "before"), "after": REPO}
        order = ["after", "before"] if args.swap else ["before", "after"]
        t0 = time.perf_counter()
        projects = {v: make_project(ls, f"bulk {v}", pngs, args.tasks, args.versions) for v in order}
        import_s = time.perf_counter() - t0
        listing: dict = {}
        listed = sum(len(json.dumps(t)) for t in lsclient.tasks(ls, projects["after"][0], listing=listing))
        env = {"MODEL_DIR": str(work / "models"), "LABEL_STUDIO_URL": server.url,
               "LABEL_STUDIO_API_KEY": server.token, "OMP_NUM_THREADS": str(args.threads),
               "OMP_WAIT_POLICY": "PASSIVE"}
        served = "tessera-default-v0001"
        runs = {}
        for v in order:
            runs[v] = run_predict(trees[v], work, v, env, ls, projects[v], served)
            print(v, json.dumps(runs[v]), flush=True)
        res = {"training_listing": training_listing(ls, projects["after"][0], args.annotated)}
        res.update({"tasks": args.tasks, "earlier_predictions_a_task": args.versions, "threads": args.threads,
               "listing_json_mb": round(listed / 1e6, 1), "listing_pages": len(listing["sizes"]),
               "import_s": round(import_s, 1), "before_rev": args.before, "order": order, **runs,
               "ratio_peak_rss_after_to_before": runs["after"]["peak_rss_mb"] / runs["before"]["peak_rss_mb"],
               "ratio_wall_after_to_before": runs["after"]["wall_s"] / runs["before"]["wall_s"]})
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1), flush=True)
    write_result(args.name, {"summary": res})


if __name__ == "__main__":
    main()
