"""Memory of a training run's samples at project scale: what `load_samples` (a project's annotated tasks ->
images and label maps) and the first training batches hold, with every sample in memory (git revision
--before, and the current code at TESSERA_TRAIN_MEMORY_MB 0) and with the current default cap.

N tasks of procedural nuclei at 2048 x 2048 (~370 objects each, an accepted prediction's brush masks), read
from local files (TESSERA_MEDIA_ROOT). Each variant runs in a child process of its own, optionally in a memory
cgroup of --limit-mb (cgroup v1 or v2, as `docker run --memory` sets one), and reports its peak anonymous
memory (RssAnon: what the kernel can't take back without killing it), its peak resident memory (VmHWM: page
cache of mapped files included), the seconds load_samples took and the milliseconds of a training batch (8
crops, the default TrainConfig at scale 0.6) drawn from what it loaded, or how it died.

    python -m bench.train_memory --tasks 64 --limit-mb 2048 --before 742f5b7
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import REPO, write_result

SIDE = 2048


def make_project(n: int, media: Path) -> list[dict]:
    """n tasks whose images are PNG files under media/, each with an accepted prediction's brush regions."""
    from PIL import Image

    from bench.speed import CONFIG
    from tessera.backend.label_config import parse_label_config
    from tessera.backend.regions import instances_to_results
    from tessera.model.data import make_nuclei_mosaic

    control = next(c for c in parse_label_config(CONFIG).controls if c.type == "brushlabels")
    tasks = []
    for i in range(n):
        s = make_nuclei_mosaic(SIDE, SIDE, 512, 100 + i)
        Image.fromarray(s.image).save(media / f"n{i:04d}.png", compress_level=1)
        labels = {int(k): "Nucleus" for k in np.unique(s.instances) if k}
        tasks.append({"id": i + 1, "data": {"image": f"n{i:04d}.png"},
                      "annotations": [{"id": i + 1, "result": instances_to_results(s.instances, labels, {}, control)}]})
    return tasks


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class AnonPeak(threading.Thread):
    """The largest RssAnon of this process, sampled every 20 ms (the kernel keeps a peak of VmRSS only)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = _status_kb("RssAnon"), threading.Event()

    def run(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, _status_kb("RssAnon"))


def child(args) -> None:
    """One variant in this process: load the project, draw batches, print one JSON line."""
    import torch

    from bench.speed import CONFIG
    from bench.speed_native import reset_peak_rss
    from tessera.model.train_vqvae import Batcher, TrainConfig

    torch.set_num_threads(1)
    tasks = json.loads(Path(args.tasks_file).read_text())
    from tessera.backend.settings import Settings, apply_memory_policy

    apply_memory_policy(Settings())               # glibc's arenas as `tessera serve` sets them
    variant = args.child.removesuffix("_unlimited")
    if variant == "before":
        from bench.speed_native import before_module
        dataset = before_module(args.before, Path(args.work), "backend.dataset")
        settings_mod = before_module(args.before, Path(args.work), "backend.settings")
        config = before_module(args.before, Path(args.work), "backend.label_config").parse_label_config(CONFIG)
        extra = {}
    else:
        from tessera.backend import dataset, settings as settings_mod
        from tessera.backend.label_config import parse_label_config
        config = parse_label_config(CONFIG)
        extra = {"train_memory_mb": args.budget_mb}
    settings = settings_mod.Settings(model_dir=Path(args.work) / f"models-{args.child}", media_root=Path(args.media),
                                     media_cache_mb=0, fetch_threads=4, **extra)
    base_anon, base_rss = _status_kb("RssAnon"), _status_kb("VmRSS")
    reset_peak_rss(os.getpid())                                  # VmHWM from here
    watch = AnonPeak()
    watch.start()
    t0 = time.perf_counter()
    samples, used = dataset.load_samples(settings, config, tasks)
    load_s = time.perf_counter() - t0
    batcher = Batcher(samples, TrainConfig(), 1, seed=0, scale=0.6)
    times = []
    for _ in range(args.batches):
        t = time.perf_counter()
        batcher.get_batch(8, "cpu")
        times.append(time.perf_counter() - t)
    watch.stop.set()
    watch.join()
    print(json.dumps({"samples": len(samples), "load_s": round(load_s, 2),
                      "batch_ms_median": round(1000 * statistics.median(times[2:]), 1),
                      "peak_anon_growth_mb": round((max(watch.peak, _status_kb("RssAnon")) - base_anon) / 1024),
                      "peak_rss_growth_mb": round((_status_kb("VmHWM") - base_rss) / 1024),
                      "sample_mb": round(sum(s.image.nbytes + s.classes.nbytes + s.instances.nbytes
                                             for s in samples) / 2**20)}), flush=True)


def memory_cgroup(limit_mb: int) -> Path | None:
    """A fresh memory cgroup limited to limit_mb (v2 under /sys/fs/cgroup or /sys/fs/cgroup/unified, else v1),
    or None where none can be made here."""
    name = f"tessera-bench-{os.getpid()}"
    for root, limit_file in [(Path("/sys/fs/cgroup"), "memory.max"), (Path("/sys/fs/cgroup/unified"), "memory.max"),
                             (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")]:
        try:
            if limit_file == "memory.max" and "memory" not in (root / "cgroup.controllers").read_text().split():
                continue
            cg = root / name
            cg.mkdir()
            (cg / limit_file).write_text(str(limit_mb * 2**20))
            if (cg / "memory.swap.max").exists():
                (cg / "memory.swap.max").write_text("0")
            return cg
        except OSError:
            continue
    return None


def run_variant(variant: str, args, work: Path, media: Path, tasks_file: Path, budget_mb: int) -> dict:
    """variant: before / all_in_memory / capped in the memory cgroup (if any); <variant>_unlimited outside it."""
    cg = memory_cgroup(args.limit_mb) if args.limit_mb and not variant.endswith("_unlimited") else None
    cmd = [sys.executable, "-m", "bench.train_memory", "--child", variant, "--work", str(work), "--media", str(media),
           "--tasks-file", str(tasks_file), "--budget-mb", str(budget_mb), "--batches", str(args.batches),
           "--before", args.before]
    into = None if cg is None else (lambda: (cg / "cgroup.procs").write_text(str(os.getpid())))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=into, cwd=REPO)
    finally:
        if cg is not None:
            try:
                cg.rmdir()
            except OSError:
                pass
    out: dict = {"variant": variant, "budget_mb": budget_mb, "limit_mb": args.limit_mb if cg else None,
                 "wall_s": round(time.perf_counter() - t0, 1), "returncode": proc.returncode}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        out.update(json.loads(lines[-1]))
    else:
        out["died"] = "killed (SIGKILL: the kernel's OOM killer)" if proc.returncode == -9 else proc.stderr[-600:]
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=64)
    p.add_argument("--limit-mb", type=int, default=0, help="memory cgroup limit per variant (0: none)")
    p.add_argument("--budget-mb", type=int, default=None, help="the capped variant's TESSERA_TRAIN_MEMORY_MB "
                   "(default: the setting's default)")
    p.add_argument("--before", default="742f5b7", help="git revision of the all-in-memory code")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--name", default="train_memory")
    p.add_argument("--variants", default="before,all_in_memory,capped,all_in_memory_unlimited,capped_unlimited")
    p.add_argument("--media-dir", default=None, help="keep the made tasks here and reuse them on the next run")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--media", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tasks-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    from tessera.backend.settings import Settings

    budget = args.budget_mb if args.budget_mb is not None else Settings.model_fields["train_memory_mb"].default
    work = Path(tempfile.mkdtemp(prefix="tessera-train-memory-"))
    try:
        media = Path(args.media_dir) if args.media_dir else work / "media"
        media.mkdir(parents=True, exist_ok=True)
        tasks_file = media / f"tasks-{args.tasks}.json"
        if not tasks_file.exists():
            t0 = time.perf_counter()
            tasks_file.write_text(json.dumps(make_project(args.tasks, media)))
            print(f"{args.tasks} tasks of {SIDE} px made in {time.perf_counter() - t0:.0f} s", flush=True)
        runs = [run_variant(v, args, work, media, tasks_file, budget if v.startswith("capped") else 0)
                for v in args.variants.split(",")]
        free = shutil.disk_usage(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result(args.name, {"summary": {"tasks": args.tasks, "side": SIDE, "limit_mb": args.limit_mb,
                                         "budget_mb": budget, "before_rev": args.before, "threads": 1,
                                         "disk_free_gb_after": round(free.free / 2**30, 1)}, "runs": runs})


if __name__ == "__main__":
    main()
