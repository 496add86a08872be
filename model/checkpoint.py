"""Checkpoint save/load: atomic writes (tmp file in the same directory + fsync + os.replace) and checked loads.

Payload: {"format_version", "kind", "model", "optimizer", "model_config", "train_config", "iter_num",
"best_val_loss", "label_names", ...} (the GAN uses "generator", "discriminator", "opt_g", "opt_d").
Atomic save as in Lightning's `_atomic_save`; loads are `weights_only=True` so a checkpoint can't run code.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry (a rename into it) to disk; a no-op where directories can't be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                                        # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write: Callable[[BinaryIO], object], suffix: str = ".tmp") -> Path:
    """Call write(file) on a fresh tmp file beside `path`, fsync it, then os.replace it onto `path`.

    On any failure the tmp file is removed and the old `path` (if any) is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def save_checkpoint(payload: dict, path: Path) -> Path:
    """Atomically write `payload` (a dict with "kind") to `path`; adds "format_version" if absent."""
    if not isinstance(payload, dict) or not isinstance(payload.get("kind"), str):
        raise ValueError(f"checkpoint payload for {path} must be a dict with a string 'kind' "
                         f"(e.g. 'vqvae' or 'maskgan')")
    payload = {"format_version": FORMAT_VERSION, **payload}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda f: torch.save(payload, f))
    logger.info("saved %s checkpoint %s", payload["kind"], path)
    return path


def load_checkpoint(path: Path, kind: str | None) -> dict:
    """Load a checkpoint on CPU with weights_only=True and check its format_version and kind.

    kind=None accepts any kind. Raises ValueError naming the path; the file is never touched.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist; train a model first or fix the path")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        raise ValueError(f"checkpoint {path} can't be read ({type(e).__name__}: {str(e)[:200]}); "
                         f"it is corrupt or not a Tessera checkpoint") from e
    if not isinstance(payload, dict):
        raise ValueError(f"checkpoint {path} holds a {type(payload).__name__}, not a Tessera payload dict")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format_version {version!r}, this code reads "
                         f"{FORMAT_VERSION}; retrain, or load it with the Tessera release that wrote it")
    if kind is not None and payload.get("kind") != kind:
        raise ValueError(f"checkpoint {path} is of kind {payload.get('kind')!r}, expected {kind!r}")
    return payload
