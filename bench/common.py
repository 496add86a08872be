"""Shared benchmark helpers: machine description, result files, the shared data sets, the memory of a
process group and stopping one."""
from __future__ import annotations

import ast
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED_DATA = REPO.parent / "shared" / "data"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# the code a benchmark runs is what its process imported at the start: a commit made while it runs is not it
_START_COMMIT = _git("rev-parse", "--short", "HEAD")
_START_DIRTY = bool(_git("status", "--porcelain", "--untracked-files=no"))


def machine() -> dict:
    """What ran the benchmark: CPU, cores, torch threads, versions, date, and the commit its process started
    on (with `dirty` when tracked files differed from it, `head_when_written` when main moved since)."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
           "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "platform": platform.platform(), "commit": _START_COMMIT,
           "cuda": torch.cuda.is_available()}
    if _START_DIRTY:
        out["dirty"] = True
    head = _git("rev-parse", "--short", "HEAD")
    if head != _START_COMMIT:
        out["head_when_written"] = head
    return out


def dataset(name: str) -> Path:
    """../shared/data/<name>, or exit with a clear message when it is not there."""
    path = SHARED_DATA / name
    if not path.is_dir():
        sys.exit(f"benchmark data {path} is missing: the benchmarks need ../shared/data beside the repository")
    return path


def fixed_split(name: str, max_val: int | None = None) -> tuple[list, list, list[str]]:
    """(train samples, validation samples, label names) of ../shared/data/<name> on the fixed 20 % split by
    id hash (model.data.split_ids); the first max_val validation samples when max_val is given."""
    from tessera.model.data import load_folder, split_ids

    samples, names = load_folder(dataset(name))
    train_ids, val_ids = split_ids([s.id for s in samples], 0.2)
    by_id = {s.id: s for s in samples}
    return [by_id[i] for i in train_ids], [by_id[i] for i in val_ids][:max_val], names


def train_overrides(pairs: list[str]) -> dict:
    """`--set KEY=VALUE ...` strings -> TrainConfig field overrides, each value typed as the field's default."""
    from tessera.model.config import _parse
    from tessera.model.train_vqvae import TrainConfig

    defaults, out = TrainConfig(), {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not hasattr(defaults, key):
            raise SystemExit(f"--set {pair}: TrainConfig has no field {key!r}")
        out[key] = _parse(value, getattr(defaults, key), key)       # tuples as a,b,c (widths=32,64,96)
    return out


def code_changes(commit: str, folder: str, repo: Path = REPO) -> list[str]:
    """The Python files under folder (relative to the repository) whose code differs between commit and the
    working tree; a file whose comments or docstrings alone changed is not one: it trains the same models.
    Exits with git's message when the commit is not known."""
    changed = subprocess.run(["git", "diff", "--name-only", commit, "--", folder], cwd=repo, capture_output=True,
                             text=True)
    if changed.returncode:
        raise SystemExit(f"{commit}: {changed.stderr.strip()}")
    out = []
    for name in changed.stdout.split():
        old = subprocess.run(["git", "show", f"{commit}:{name}"], cwd=repo, capture_output=True, text=True)
        path = repo / name
        if old.returncode or not path.is_file() or _bare_code(old.stdout) != _bare_code(path.read_text()):
            out.append(name)
    return out


def _bare_code(source: str) -> str | None:
    """A Python source's syntax tree without docstrings, as text (None for a file that is not Python)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:]
    return ast.dump(tree)


def write_result(name: str, payload: dict) -> Path:
    """bench/results/<name>.json with the machine and the command line added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)    # the module run with -m, not the file's name
    module = spec.name if spec is not None else f"bench.{name}"
    payload = {"benchmark": name, "machine": machine(),
               "command": " ".join([Path(sys.executable).name, "-m", module] + sys.argv[1:]), **payload}
    out.write_text(json.dumps(payload, indent=1, default=float))
    print(f"wrote {out}")
    return out


def group_peak_rss_kb(pgid: int) -> int:
    """Largest peak RSS (VmHWM of /proc/<pid>/status) of the processes in a process group, in kB: the
    server and the workers it forked."""
    best = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]))
        except (OSError, ProcessLookupError):
            continue
    return best


def stop_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session=True), SIGKILL it if it
    has not exited after `timeout` s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
