"""Shared benchmark helpers: machine description, result files, the shared data sets."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED_DATA = REPO.parent / "shared" / "data"


def machine() -> dict:
    """What ran the benchmark: CPU, cores, torch threads, versions, date."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "commit": commit,
            "cuda": torch.cuda.is_available()}


def dataset(name: str) -> Path:
    """../shared/data/<name>, or exit with a clear message when it is not there."""
    path = SHARED_DATA / name
    if not path.is_dir():
        sys.exit(f"benchmark data {path} is missing: the benchmarks need ../shared/data beside the repository")
    return path


def write_result(name: str, payload: dict) -> Path:
    """bench/results/<name>.json with the machine and the command line added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "command": " ".join([Path(sys.executable).name, "-m",
               f"bench.{name}"] + sys.argv[1:]), **payload}
    out.write_text(json.dumps(payload, indent=1, default=float))
    print(f"wrote {out}")
    return out
