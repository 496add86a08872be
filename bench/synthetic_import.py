"""How fast synthetic tasks enter a real Label Studio, side by side (issue #12): the old path (multipart import
that creates the tasks, then one POST /api/predictions and one PATCH of the meta per task) against the one
backend.synthetic_tasks uses now (one multipart upload with commit_to_project=false, one JSON import of all tasks
with predictions and meta). Only the Label Studio part is timed (the same PNGs and the same regions).

    nice -n 10 .venv/bin/python -m bench.synthetic_import [--count 40] [--repeats 2]
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import write_result
from tessera.backend.label_config import parse_label_config
from label_studio_sdk.client import LabelStudio

from tessera.backend import lsclient
from tessera.backend.lsserver import LabelStudioServer, build_template
from tessera.backend.regions import instances_to_results
from bench.gan import LS_CONFIG
from tessera.model.data import make_nuclei


def _payload(count: int, seed: int) -> tuple[list[tuple[str, bytes]], list[list[dict]]]:
    config = parse_label_config(LS_CONFIG)
    pngs, results = [], []
    for i, s in enumerate(make_nuclei(count, size=128, seed=seed)):
        buf = io.BytesIO()
        Image.fromarray(s.image).save(buf, "PNG", compress_level=1)
        pngs.append((f"synth_{seed}_{i:03d}.png", buf.getvalue()))
        ids = [int(k) for k in np.unique(s.instances) if k]
        results.append([r for c in config.controls
                         for r in instances_to_results(s.instances, {k: "Nucleus" for k in ids}, {}, c)])
    return pngs, results


def old_path(client: LabelStudio, pid: int, pngs, results) -> int:
    ids = lsclient.upload_images(client, pid, pngs)
    for tid, result in zip(ids, results):
        lsclient.create_prediction(client, tid, result, 0.9, "bench")
        client.tasks.update(str(tid), meta={"synthetic": True, "synthetic_kind": "edited"})
    return len(ids)


def new_path(client: LabelStudio, pid: int, pngs, results) -> int:
    urls = lsclient.upload_files(client, pid, pngs)
    tasks = [{"data": {"image": u}, "meta": {"synthetic": True, "synthetic_kind": "edited"},
              "predictions": [{"result": r, "score": 0.9, "model_version": "bench"}]} for u, r in zip(urls, results)]
    return len(lsclient.import_tasks(client, pid, tasks))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tessera-bench-import-"))
    rows = []
    with LabelStudioServer(data_dir=work / "ls-data", template=build_template()) as ls:
        client = lsclient.connect(ls.url, ls.token)
        for rep in range(args.repeats):
            for name, fn in (("old", old_path), ("new", new_path)) if rep % 2 == 0 else \
                    (("new", new_path), ("old", old_path)):
                pid = client.projects.create(title=f"import {name} {rep}", label_config=LS_CONFIG).id
                pngs, results = _payload(args.count, seed=rep)
                load = os.getloadavg()[0]
                t0 = time.time()
                n = fn(client, pid, pngs, results)
                dt = time.time() - t0
                tasks = list(lsclient.tasks(client, pid))
                assert len(tasks) == n == args.count and all(t["predictions"] and t["meta"]["synthetic"] for t in tasks)
                rows.append({"path": name, "repeat": rep, "tasks": n, "seconds": round(dt, 2),
                             "tasks_per_s": n / dt, "load1": round(load, 2)})
                print(rows[-1], flush=True)
    shutil.rmtree(work, ignore_errors=True)
    rate = {p: float(np.mean([r["tasks_per_s"] for r in rows if r["path"] == p])) for p in ("old", "new")}
    write_result("synthetic_import", {
        "summary": {"old_tasks_per_s": rate["old"], "new_tasks_per_s": rate["new"],
                    "speedup": rate["new"] / rate["old"]},
        "rows": rows, "setup": {"count": args.count, "repeats": args.repeats, "regions": "brush + polygon + box per "
                                "nucleus (procedural 128 px images)", "timed": "Label Studio requests only"},
        "targets": {"tasks_per_s": ">= 10 with predictions attached"}})


if __name__ == "__main__":
    main()
