"""What Tessera keeps under MODEL_DIR, and the model_version strings Label Studio sees.

    MODEL_DIR/
      default/                  Registry of the default model (serves projects whose label names it fits)
      project-<id>/             Registry of one LS project: versions/v0001/{model.pt, info.json}, current.json,
        .work/                  scratch of training runs in progress (model.registry ignores it)
      .jobs/<key>.lock          flock held while a project trains (several serving processes, one MODEL_DIR)
      cache/media/              downloaded images, bounded (backend.media.DiskCache)

A version of project 3 reads "tessera-p3-v0002" to LS ("tessera-default-v0002" for the default model), a
generator "tessera-p3-gan-v0002": the registry numbers both kinds in one sequence, and a GAN's name must not
read like a newer label model on synthetic tasks. Serving, training, the CLI and the demo all name stores
and versions through this module; model/registry.py knows one directory and nothing of projects.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from tessera.model.registry import Registry

DEFAULT_KEY = "default"
PROJECT_DIR = "project-"     # a project's registry folder: PROJECT_DIR + its key
BEFORE_PROJECT_KEY = "0"               # store a first version is trained under before its LS project id is known
VERSION_PREFIX = "tessera-"     # every model_version Tessera reports starts with this
UNTRAINED = f"{VERSION_PREFIX}untrained"

_PROJECT = re.compile(r"([0-9]{1,12})(?:\.[0-9]{1,20})?")
_VERSION = re.compile(rf"{VERSION_PREFIX}(default|p([0-9]+))-(gan-)?(v[0-9]{{4,}})")


def project_key(project: Any) -> str:
    """LS's project uid "<id>.<created ts>" (or an int id, or a project dict) -> "<id>"."""
    if isinstance(project, dict):
        project = project.get("id")
    if isinstance(project, bool) or project is None:
        raise ValueError("request has no project id")
    if isinstance(project, int):
        project = str(project)
    # ASCII digits only (str.isdigit takes "١" and "²"), a bounded length, one spelling per id ("0007" -> "7"):
    # checked before the key names anything on disk
    m = _PROJECT.fullmatch(project.strip()) if isinstance(project, str) else None
    if m is None:
        raise ValueError(f"project must look like '<id>' or '<id>.<timestamp>' (ASCII digits), "
                         f"got {str(project)[:40]!r}")
    return str(int(m[1]))


def store_key(key: Any) -> str:
    """"default", or the project key of `key` (see project_key)."""
    return DEFAULT_KEY if key == DEFAULT_KEY else project_key(key)


def version_string(key: str, version: str, kind: str = "label") -> str:
    """Store key + stored version -> the model_version LS sees: ("3", "v0002") -> "tessera-p3-v0002",
    ("3", "v0002", "gan") -> "tessera-p3-gan-v0002", ("default", "v0001") -> "tessera-default-v0001"."""
    key = store_key(key)
    owner = DEFAULT_KEY if key == DEFAULT_KEY else f"p{key}"
    return f"{VERSION_PREFIX}{owner}-{'gan-' if kind == 'gan' else ''}{version}"


class ParsedVersion(NamedTuple):
    """A model_version string taken apart."""
    key: str            # "default" or a project key
    version: str        # "v0002"
    kind: str           # "label" | "gan"


def parse_version(name: Any) -> ParsedVersion | None:
    """The inverse of version_string; None for anything else (another backend's version, "tessera-untrained")."""
    m = _VERSION.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        return None
    return ParsedVersion(m[2] or DEFAULT_KEY, m[4], "gan" if m[3] else "label")


def is_label_version(name: Any, key: str | None = None) -> bool:
    """Whether `name` is a Tessera label model's version (of project `key` or the default model, when given)."""
    parsed = parse_version(name)
    return parsed is not None and parsed.kind == "label" and (key is None or parsed.key in (DEFAULT_KEY, store_key(key)))


class Store:
    """The layout of one MODEL_DIR: a Registry per store key, the job locks and the media cache."""

    def __init__(self, model_dir: Path, keep_n: int = 10):
        self.root = Path(model_dir)
        self.keep_n = keep_n
        self._lock = threading.Lock()
        self._registries: dict[str, Registry] = {}

    def registry_dir(self, key: str) -> Path:
        key = store_key(key)
        return self.root / (DEFAULT_KEY if key == DEFAULT_KEY else PROJECT_DIR + key)

    def registry(self, key: str) -> Registry:
        """The Registry of project `key` ("default": the default model's); one object per key and Store,
        so its parsed current.json is shared."""
        from tessera.model.registry import Registry     # imported late: model.registry loads torch; naming needs none

        key = store_key(key)
        with self._lock:
            if key not in self._registries:
                self._registries[key] = Registry(self.registry_dir(key), keep_n=self.keep_n)
            return self._registries[key]

    def serves_any(self, kind: str = "label") -> bool:
        """Whether any project (or the default model) in this MODEL_DIR has a served version of `kind`."""
        if not self.root.is_dir():
            return False
        keys = [d.name.removeprefix(PROJECT_DIR) for d in self.root.iterdir()
                if d.is_dir() and (d.name == DEFAULT_KEY or d.name.startswith(PROJECT_DIR))]
        return any(self.registry(k).current(kind) is not None for k in keys)

    def work_dir(self, key: str) -> Path:
        """Where training runs of `key` write before a version is added (beside the versions, so the
        add is a hard link, not a copy)."""
        return self.registry_dir(key) / ".work"

    @property
    def jobs_dir(self) -> Path:
        return self.root / ".jobs"

    @property
    def overflow_dir(self) -> Path:
        """Which tasks each server process is writing predictions for after a /predict's deadline
        (backend/overflow.py): one file per project and process, read by every process of this MODEL_DIR."""
        return self.root / ".overflow"

    @property
    def media_cache_dir(self) -> Path:
        return self.root / "cache" / "media"

    @property
    def samples_dir(self) -> Path:
        """Training samples past TESSERA_TRAIN_MEMORY_MB (model.sample_store): files unlinked once mapped."""
        return self.root / "cache" / "samples"
