"""Versioned model store: root/versions/v0001/{model.pt, info.json} and an atomic root/current.json pointer.

Safe for several processes sharing the directory (server worker processes, RQ workers on other hosts sharing
MODEL_DIR): add/rollback hold an fcntl.flock on root/.lock; a version is staged in a hidden tmp dir and
renamed into place, and current.json is replaced atomically, so a crash at any point (kill -9, disk full)
leaves either the old or the new state, never a half version or a broken pointer.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from .checkpoint import atomic_write_bytes, fsync_dir
from .lockfile import file_lock

logger = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"^v(\d{4,})$")
KIND_ALIASES = {"vqvae": "label", "label": "label", "maskgan": "gan", "gan": "gan"}

# test seam: called with a step name ("staged", "committed", "switched") inside add(); tests make it sleep
# or raise to simulate a crash at that point. None in normal use.
_fault_hook: Callable[[str], None] | None = None


@dataclass
class VersionInfo:
    """One stored model version."""
    version: str
    created: float
    status: str                 # "current" | "kept" | "rejected"
    metrics: dict = field(default_factory=dict)
    reason: str = ""
    kind: str = "label"         # "label" | "gan"


def _step(name: str) -> None:
    if _fault_hook is not None:
        _fault_hook(name)


def _write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(data, indent=1, sort_keys=True).encode()))


class Registry:
    """Model versions of one project, in one directory (backend.store names one per project)."""

    def __init__(self, root: Path, keep_n: int = 10):
        if keep_n < 1:
            raise ValueError(f"keep_n must be >= 1, got {keep_n}")
        self.root = Path(root)
        self.keep_n = keep_n
        self._current_cache: tuple[tuple, dict] | None = None   # (stat key, parsed current.json)

    @property
    def _versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def _current_file(self) -> Path:
        return self.root / "current.json"

    # ---- reading (no lock: every file a reader sees is complete) ----------------------------------------

    def _read_current(self) -> dict:
        """current.json as {kind: info dict}; re-read only when the file changed (inode/mtime/size)."""
        try:
            st = os.stat(self._current_file)
        except FileNotFoundError:
            return {}
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._current_cache is None or self._current_cache[0] != key:
            try:
                data = json.loads(self._current_file.read_text())
            except FileNotFoundError:          # replaced between stat and read: read the new one next time
                return {}
            self._current_cache = (key, data)
        return self._current_cache[1]

    def current(self, kind: str = "label") -> VersionInfo | None:
        """The served version of `kind`, or None before the first promotion (one small JSON read)."""
        info = self._read_current().get(kind)
        return VersionInfo(**{**info, "status": "current"}) if info else None

    def _load_info(self, version: str, current: dict) -> VersionInfo:
        data = json.loads((self._versions_dir / version / "info.json").read_text())
        rejected = data.pop("rejected", False)
        is_current = current.get(data["kind"], {}).get("version") == version
        status = "current" if is_current else ("rejected" if rejected else "kept")
        return VersionInfo(status=status, **data)

    def _version_names(self) -> list[str]:
        """Committed version dir names, newest first (hidden staging dirs are not versions)."""
        if not self._versions_dir.is_dir():
            return []
        names = [p.name for p in self._versions_dir.iterdir() if _VERSION_RE.match(p.name)]
        return sorted(names, key=lambda n: int(n[1:]), reverse=True)

    def versions(self, kind: str | None = None) -> list[VersionInfo]:
        """All stored versions (of `kind`, or all kinds), newest first."""
        current = self._read_current()
        out = []
        for name in self._version_names():
            try:
                info = self._load_info(name, current)
            except FileNotFoundError:          # pruned by another process while listing
                continue
            if kind is None or info.kind == kind:
                out.append(info)
        return out

    def get(self, version: str) -> VersionInfo:
        """Info of one version; ValueError if it is not stored."""
        self._check_exists(version)
        return self._load_info(version, self._read_current())

    def path(self, version: str) -> Path:
        """Checkpoint file of a stored version."""
        self._check_exists(version)
        return self._versions_dir / version / "model.pt"

    def _check_exists(self, version: str) -> None:
        if not _VERSION_RE.match(str(version)) or not (self._versions_dir / version / "info.json").exists():
            known = ", ".join(self._version_names()[:10]) or "none"
            raise ValueError(f"{self.root}: no version {version!r}; stored versions: {known}")

    # ---- writing (under the lock) ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Exclusive inter-process lock (flock on root/.lock); released by the OS if the process dies."""
        self._versions_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(self.root / ".lock"):
            yield

    def _clean_staging(self) -> None:
        """Remove staging/trash dirs left by crashed writers (safe: only lock holders create them)."""
        for p in self._versions_dir.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                logger.warning("%s: removing leftover %s from an interrupted write", self.root, p.name)
                shutil.rmtree(p, ignore_errors=True)

    def _switch(self, info: VersionInfo) -> None:
        """Atomically point current.json's entry for info.kind at info."""
        current = dict(self._read_current())
        entry = asdict(info)
        entry.pop("status")
        current[info.kind] = entry
        _write_json(self._current_file, current)

    def add(self, checkpoint: Path, metrics: dict, promote: bool, reason: str = "",
            kind: str | None = None) -> VersionInfo:
        """Store `checkpoint` as a new version "v<N>" (the source file is moved in) and, if promote,
        make it current. kind defaults to the checkpoint's own kind ("vqvae" -> "label", "maskgan" -> "gan").
        Keeps the newest keep_n versions per kind plus every current one."""
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise ValueError(f"checkpoint {checkpoint} does not exist; nothing to add to {self.root}")
        try:
            metrics = json.loads(json.dumps(metrics))
        except (TypeError, ValueError) as e:
            raise ValueError(f"metrics must be JSON-serialisable (floats, strings, lists, dicts): {e}") from e
        kind = self._checkpoint_kind(checkpoint) if kind is None else KIND_ALIASES.get(kind, kind)

        with self._lock():
            self._clean_staging()
            names = self._version_names()
            version = f"v{(int(names[0][1:]) + 1) if names else 1:04d}"
            info = VersionInfo(version=version, created=time.time(), status="current" if promote else
                               "rejected", metrics=metrics, reason=reason, kind=kind)
            stage = self._versions_dir / f".tmp-{uuid.uuid4().hex}"
            try:
                stage.mkdir()
                _link_or_copy(checkpoint, stage / "model.pt")
                record = {**asdict(info), "rejected": not promote}
                record.pop("status")
                _write_json(stage / "info.json", record)
                fsync_dir(stage)
                _step("staged")
                os.rename(stage, self._versions_dir / version)     # the version appears atomically
                fsync_dir(self._versions_dir)
            except BaseException:
                shutil.rmtree(stage, ignore_errors=True)
                raise
            _step("committed")
            if promote:
                try:
                    self._switch(info)
                except BaseException:              # e.g. disk full: undo the commit, keep current as it was
                    self._remove(version)
                    raise
                _step("switched")
            checkpoint.unlink(missing_ok=True)     # the checkpoint now lives only in the store
            self._prune(kind)
        logger.info("%s: added %s (%s, %s) %s", self.root, version, kind, info.status, reason)
        return info

    def rollback(self, version: str) -> VersionInfo:
        """Make a stored version (kept or rejected) the current one of its kind."""
        with self._lock():
            info = self.get(version)
            info.status = "current"
            self._switch(info)
        logger.info("%s: current %s is now %s", self.root, info.kind, version)
        return info

    def _prune(self, kind: str) -> None:
        """Delete versions of `kind` beyond the newest keep_n, never a current one."""
        current = {v["version"] for v in self._read_current().values()}
        for info in self.versions(kind)[self.keep_n:]:
            if info.version in current:
                continue
            self._remove(info.version)
            logger.info("%s: pruned %s", self.root, info.version)

    def _remove(self, version: str) -> None:
        """Delete a version dir: renamed away first so it vanishes atomically, then deleted."""
        trash = self._versions_dir / f".trash-{uuid.uuid4().hex}"
        os.rename(self._versions_dir / version, trash)
        shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def _checkpoint_kind(checkpoint: Path) -> str:
        """Registry kind from the checkpoint payload's "kind" (memory-mapped: no full read)."""
        try:
            payload = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for unreadable files
            raise ValueError(f"checkpoint {checkpoint} can't be read ({type(e).__name__}); "
                             f"pass kind='label' or kind='gan' or fix the file") from e
        raw = payload.get("kind") if isinstance(payload, dict) else None
        if not isinstance(raw, str):
            raise ValueError(f"checkpoint {checkpoint} has no 'kind'; pass kind='label' or kind='gan'")
        return KIND_ALIASES.get(raw, raw)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link src to dst (no data copied, src stays intact until the version is committed);
    copy across filesystems. Either way dst is fsynced."""
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())
