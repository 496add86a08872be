"""How fast synthetic tasks enter a real Label Studio, side by side (issue #12): the old path (multipart import
that creates the tasks, then one POST /api/predictions and one PATCH of the meta per task) against the one
backend.synthetic_tasks uses now (one multipart upload with commit_to_project=false, one JSON import of all tasks
with predictions and meta). Only the Label Studio part is timed (the same PNGs and the same regions).

    nice -n 10 .venv/bin/python -m bench.synthetic_import [--count 40] [--repeats 2]

With --e2e: `tessera generate` end to end (backend.synthetic_tasks.generate_into_project: reading the project,
the label model and generator, making the images, predictions, upload and import), for each kind and count, in a
fresh project of DSB images annotated with brush labels per run, with a small label model and GAN trained once
(cached in --cache). With --before REV, REV's backend and model (git archive) run alternately with the working
tree's, each run in its own process against the same Label Studio; --profile DIR records each run with py-spy.

    nice -n 10 .venv/bin/python -m bench.synthetic_import --e2e --counts 40 200 --before main --rounds 2
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

from bench.common import REPO, write_result
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


def _one(spec: str) -> None:
    """A child process of --e2e: one generate_into_project, timed; prints its figures as JSON."""
    import json
    from tessera.backend.settings import Settings
    from tessera.backend.synthetic_tasks import generate_into_project

    a = json.loads(spec)
    settings = Settings(label_studio_url=a["url"], label_studio_api_key=a["token"], model_dir=Path(a["model_dir"]),
                        device="cpu", synth_min_iou=a["min_iou"])
    t0, c0 = time.time(), time.process_time()
    out = generate_into_project(settings, str(a["pid"]), count=a["count"], seed=7, kind=a["kind"])
    print("RESULT " + json.dumps({"seconds": time.time() - t0, "cpu_s": time.process_time() - c0,
                                  "make_seconds": out.get("make_seconds"), "created": len(out["created"]),
                                  "failed": out["failed"]}), flush=True)


def _side_path(rev: str, work: Path) -> str:
    """A PYTHONPATH root whose tessera.backend and tessera.model are REV's backend/ and model/."""
    import subprocess
    root = work / f"side-{rev.replace('/', '_')}"
    (root / "tessera").mkdir(parents=True)
    (root / "tessera" / "__init__.py").write_text("")
    archive = subprocess.run(["git", "archive", rev, "backend", "model"], cwd=REPO, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root / "tessera")], input=archive, check=True)
    return str(root)


def _checkpoints(args, real, names) -> tuple[Path, Path]:
    from bench.gan import AUG_ON, fit_gan_iters, fit_label
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    label = cache / f"label_{len(real)}_{args.label_iters}.pt"
    gan = cache / f"gan_{len(real)}_{args.gan_iters}.pt"
    if not label.exists():
        tmp, _ = fit_label(real, names, args.label_iters, AUG_ON, cache / "label_tmp.pt", 1)
        shutil.move(tmp, label)
    if not gan.exists():
        tmp, _ = fit_gan_iters(real, names, args.gan_iters, cache / "gan_tmp.pt", 1)
        shutil.move(tmp, gan)
    return label, gan


def e2e(args) -> None:
    import json
    import subprocess
    import sys

    from bench.common import fixed_split
    from bench.gan import ls_project

    work = Path(tempfile.mkdtemp(prefix="tessera-bench-e2e-"))
    real, _, names = fixed_split("dsb2018")
    real = real[:args.annotated]
    label_ckpt, gan_ckpt = _checkpoints(args, real, names)
    sides = {"after": os.environ.get("PYTHONPATH", "")}
    if args.before != "none":
        sides = {"before": _side_path(args.before, work), **sides}
    rows = []
    with LabelStudioServer(data_dir=work / "ls-data", template=build_template()) as ls:
        api = lsclient.connect(ls.url, ls.token)
        for rnd in range(args.rounds):
            order = list(sides) if rnd % 2 == 0 else list(sides)[::-1]
            for count in args.counts:
                for kind in args.kinds:
                    for side in order:
                        pid, _ = ls_project(ls, api, real, names, label_ckpt, gan_ckpt, work, args.min_iou,
                                            title=f"{side} {kind} {count} {rnd}")
                        spec = json.dumps({"url": ls.url, "token": ls.token, "model_dir": str(work / "models"),
                                           "pid": pid, "count": count, "kind": kind, "min_iou": args.min_iou})
                        cmd = [sys.executable, "-m", "bench.synthetic_import", "--one", spec]
                        if args.profile:
                            prof = Path(args.profile) / f"{side}_{kind}_{count}_{rnd}.txt"
                            prof.parent.mkdir(parents=True, exist_ok=True)
                            cmd = [args.py_spy, "record", "--idle", "--format", "raw", "--rate", "200", "-o", str(prof),
                                   "--"] + cmd
                        load = os.getloadavg()[0]
                        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": sides[side]},
                                              capture_output=True, text=True)
                        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                        if proc.returncode or not line:  # recorded (an old revision may fail where a new one runs)
                            err = (proc.stderr.strip().splitlines() or ["?"])[-1][:400]
                            rows.append({"side": side, "kind": kind, "count": count, "round": rnd, "error": err})
                            print(rows[-1], flush=True)
                            continue
                        r = json.loads(line[0][7:])
                        tasks = [t for t in lsclient.tasks(api, pid) if (t.get("meta") or {}).get("synthetic")]
                        with_pred = sum(bool(t.get("predictions")) for t in tasks)
                        rows.append({"side": side, "kind": kind, "count": count, "round": rnd, **r,
                                     "tasks_per_s": r["created"] / r["seconds"], "synthetic_tasks_in_ls": len(tasks),
                                     "with_predictions": with_pred, "load1": round(load, 2)})
                        print({k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()},
                              flush=True)
                        if with_pred != r["created"] or len(tasks) != r["created"]:
                            raise RuntimeError(f"{len(tasks)} synthetic tasks, {with_pred} with predictions, "
                                               f"{r['created']} created")
    shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for side in sides:
        for kind in args.kinds:
            for count in args.counts:
                rs = [r for r in rows if (r["side"], r["kind"], r["count"]) == (side, kind, count) and "error" not in r]
                if not rs:
                    summary[f"e2e_{side}_{kind}_{count}_failed"] = True
                    continue
                summary[f"e2e_{side}_{kind}_{count}_tasks_per_s_best"] = max(r["tasks_per_s"] for r in rs)
                summary[f"e2e_{side}_{kind}_{count}_tasks_per_cpu_s_best"] = max(r["created"] / r["cpu_s"] for r in rs)
    write_result(args.out, {
        "summary": summary, "rows": rows,
        "setup": {"annotated_tasks": len(real), "dataset": "dsb2018 training split, 256 px",
                  "label_iters": args.label_iters, "gan_iters": args.gan_iters, "min_iou": args.min_iou,
                  "before": args.before, "rounds": args.rounds, "timed": "generate_into_project in a fresh process "
                  "(reading the project, loading models, making images, predictions, upload, import); CPU s = the "
                  "process's, LS excluded", "torch_threads": "default of the child (cores)"},
        "targets": {"tasks_per_s": ">= 10 with predictions attached"}})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--e2e", action="store_true", help="tessera generate end to end (see the module's doc)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--counts", type=int, nargs="+", default=[40])
    ap.add_argument("--kinds", nargs="+", default=["edited", "generated"])
    ap.add_argument("--before", default="none", help="--e2e: git revision run alternately with the working tree")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--annotated", type=int, default=10, help="--e2e: annotated DSB tasks in each project")
    ap.add_argument("--label-iters", type=int, default=100)
    ap.add_argument("--gan-iters", type=int, default=60)
    ap.add_argument("--min-iou", type=float, default=0.0, help="--e2e: TESSERA_SYNTH_MIN_IOU (0: keep every image)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "tessera-bench-e2e-ckpt"))
    ap.add_argument("--profile", default="", help="--e2e: a folder for py-spy's raw stacks of every run")
    ap.add_argument("--py-spy", default="py-spy")
    ap.add_argument("--out", default="synthetic_e2e")
    args = ap.parse_args()
    if args.one:
        return _one(args.one)
    if args.e2e:
        return e2e(args)
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
