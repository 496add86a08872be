"""Scratch directories of training runs, and the clean-up of those that dead runs left behind."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

from tessera.backend.jobs import pid_alive
from tessera.model.registry import Registry

logger = logging.getLogger(__name__)


def work_dir(registry: Registry) -> Path:
    """A fresh scratch dir under <registry>/.work, after removing those of dead runs of this host
    (a run killed with -9 leaves its half-written checkpoint behind)."""
    work = registry.root / ".work"
    work.mkdir(parents=True, exist_ok=True)
    me = process_space()
    for d in work.iterdir():
        owner, _, rest = d.name.rpartition("-pid")
        pid = rest.split("-", 1)[0]
        if owner == me and pid.isdigit() and not pid_alive(int(pid)):
            logger.info("removing %s left by an interrupted run", d)
            shutil.rmtree(d, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=work, prefix=f"{me}-pid{os.getpid()}-"))


def process_space() -> str:
    """Where a pid means something, as a file-name part: host name + pid namespace (containers sharing a
    host name and MODEL_DIR must not judge each other's pids)."""
    try:
        ns = "".join(ch for ch in os.readlink("/proc/self/ns/pid") if ch.isdigit())
    except OSError:
        ns = "0"
    return f"{socket.gethostname()}.{ns}"
