"""Tessera settings: every environment variable is read once, here, into a frozen dataclass."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from backend.urls import UnsafeURL, parse_host_entry, parse_http_url

# name -> (default, help); the README's configuration table is this list
ENV_VARS: dict[str, tuple[str, str]] = {
    "LABEL_STUDIO_URL": ("", "Label Studio's URL as this backend reaches it (e.g. http://label-studio:8080). "
                             "Needed for training, `tessera predict/generate` and media outside a request."),
    "LABEL_STUDIO_API_KEY": ("", "Label Studio legacy API token (Account & Settings). Never logged."),
    "MODEL_DIR": ("./models", "Model store: versioned checkpoints per project, `current` pointers."),
    "REDIS_URL": ("", "If set, training runs go to an RQ queue on this Redis and `tessera worker` runs them."),
    "TESSERA_ALLOWED_HOSTS": ("", "Extra hosts media may be downloaded from, comma-separated "
                                  "(the Label Studio host is always allowed). `*` allows any host."),
    "TESSERA_MEDIA_ROOT": ("", "Local directory that task paths (and LS local-files URLs) may be read from."),
    "TESSERA_MAX_IMAGE_BYTES": ("52428800", "Largest image download accepted, in bytes (default 50 MB)."),
    "TESSERA_MAX_PIXELS": ("50000000", "Largest image accepted, in pixels (decompression-bomb guard)."),
    "TESSERA_MAX_SIDE": ("2048", "Images are decoded straight to at most this many pixels on their longer side "
                                 "for prediction (the model works at 128-256); regions come back at full size."),
    "TESSERA_MAX_REQUEST_BYTES": ("33554432", "Largest HTTP request body accepted (default 32 MB)."),
    "TESSERA_MAX_PREDICT_TASKS": ("1000", "Most tasks one /predict request may carry (413 above it: use "
                                          "`tessera predict --project N` for a whole project)."),
    "TESSERA_FETCH_TIMEOUT_S": ("30", "Deadline, in seconds, for downloading one image (connect + all reads)."),
    "TESSERA_MEDIA_CACHE_MB": ("1024", "Size cap of the training runs' image cache under MODEL_DIR/cache/media; "
                                       "least recently used images go first (0 = no cache)."),
    "TESSERA_BASIC_AUTH_USER": ("", "If set with TESSERA_BASIC_AUTH_PASS, every route but /health needs "
                                    "HTTP basic auth (set the same in LS: Model > Authentication). "
                                    "BASIC_AUTH_USER is read too. Setting only one of the two is an error."),
    "TESSERA_BASIC_AUTH_PASS": ("", "Password for basic auth (or BASIC_AUTH_PASS). Never logged."),
    "TESSERA_DEBOUNCE_S": ("10", "Seconds a burst of annotation events must settle before one training run."),
    "TESSERA_DEVICE": ("auto", "torch device for training and inference: auto, cpu, cuda or cuda:N."),
    "TESSERA_PREDICT_BATCH": ("16", "Images per forward pass in /predict."),
    "TESSERA_FETCH_THREADS": ("16", "Concurrent image downloads per /predict request."),
    "TESSERA_MIN_ANNOTATIONS": ("5", "Annotated tasks a project needs before a training run trains."),
    "TESSERA_GAN_MIN_ANNOTATIONS": ("20", "Annotated tasks a project needs before runs also train the GAN."),
    "TESSERA_TRAIN_ITERS": ("600", "Training iterations of a run started from Label Studio."),
    "TESSERA_TRAIN_BUDGET_S": ("90", "Wall-clock cap, in seconds, of the label-model training in a run started from "
                                     "Label Studio (runs warm-start, so training adds up over runs; 0 = no cap)."),
    "TESSERA_TRAIN_THREADS": ("0", "torch threads for training; 0 = half the CPU cores (the rest keep answering "
                                   "/predict)."),
    "TESSERA_EXCLUDE_SYNTHETIC": ("false", "Leave annotations of synthetic (generated) tasks out of training."),
    "TESSERA_SYNTH_MIN_IOU": ("0.5", "A generated image is kept only if the label model's prediction on it agrees "
                                     "with its layout at least this much (IoU)."),
    "TESSERA_PROMOTE_TOLERANCE": ("0.01", "A new version is served if, on the held-back tasks people made or changed, "
                                          "it scores at least the served version's score minus this (the score: box AP50 for box-only "
                                          "projects, (mask IoU + instance F1) / 2 otherwise)."),
    "TESSERA_MISLABELING_COLUMN": ("false", "Also write each annotated task's mislabeling score into task data as "
                                            "the column `tessera_mislabeling` (sortable in the Data Manager; it "
                                            "then appears in exports). Off: only `task.meta`."),
    "TESSERA_LOG_LEVEL": ("INFO", "Logging level (or LOG_LEVEL): DEBUG, INFO, WARNING, ERROR."),
    # regions kept and how long a first version trains (issue 15)
    "TESSERA_MIN_REGION_SCORE": ("", "Keep only predicted regions scoring at least this (0-1), instead of the "
                                     "threshold each version learns on its held-back tasks; empty = learned."),
    "TESSERA_PRECISION_TARGET": ("0", "> 0 (e.g. 0.9): the learned region cut keeps the most regions that still "
                                      "reach this precision on the held-back tasks; 0 = the cut with the best F1."),
    "TESSERA_FIRST_TRAIN_BUDGET_S": ("300", "Cap, in seconds, of a project's first version: it trains until its "
                                            "held-back score stops improving, at most this long (0 = it trains "
                                            "like any other run)."),
}


# the names upstream label-studio-ml backends read; the TESSERA_ spelling wins when both are set
ALIASES = {"TESSERA_BASIC_AUTH_USER": "BASIC_AUTH_USER", "TESSERA_BASIC_AUTH_PASS": "BASIC_AUTH_PASS",
           "TESSERA_LOG_LEVEL": "LOG_LEVEL"}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _env(name: str) -> str:
    return os.environ.get(name, ENV_VARS[name][0]).strip()


def _env_alias(name: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or os.environ.get(ALIASES[name], ENV_VARS[name][0]).strip()


def _bad(name: str, value: str, expected: str) -> ValueError:
    return ValueError(f"{name}={value[:60]!r} is not valid: expected {expected} (see the README's configuration table)")


def _int(name: str, minimum: int) -> int:
    value = _env(name)
    try:
        out = int(value)
    except ValueError:
        raise _bad(name, value, f"an integer >= {minimum}") from None
    if out < minimum:
        raise _bad(name, value, f"an integer >= {minimum}")
    return out


def _float(name: str, minimum: float) -> float:
    value = _env(name)
    try:
        out = float(value)
    except ValueError:
        raise _bad(name, value, f"a number >= {minimum}") from None
    if not math.isfinite(out) or out < minimum:
        raise _bad(name, value, f"a number >= {minimum}")
    return out


def _device(name: str) -> str:
    value = _env(name).lower()
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
        raise _bad(name, value, "auto, cpu, cuda or cuda:N")
    return value


def _log_level(name: str) -> str:
    value = _env_alias(name).upper()
    if value not in _LOG_LEVELS:
        raise _bad(name, value, ", ".join(_LOG_LEVELS))
    return value


def _url(name: str) -> str:
    value = _env(name).rstrip("/")
    if value:
        try:
            parse_http_url(value)
        except UnsafeURL as e:
            raise _bad(name, value, f"an http(s) URL such as http://label-studio:8080 ({e})") from None
    return value


def _hosts(name: str) -> tuple[str, ...]:
    out = []
    for entry in (h.strip().lower() for h in _env(name).split(",")):
        if not entry:
            continue
        if entry != "*":
            try:
                parse_host_entry(entry)
            except UnsafeURL as e:
                raise _bad(name, entry, f"comma-separated host, host:port or * ({e})") from None
        out.append(entry)
    return tuple(out)


def _fraction(name: str) -> float:
    value = _env(name)
    try:
        out = float(value)
    except ValueError:
        raise _bad(name, value, "a number between 0 and 1") from None
    if not 0.0 <= out <= 1.0:
        raise _bad(name, value, "a number between 0 and 1")
    return out


def _bool(value: str) -> bool:
    return value.lower() in ("1", "true", "yes", "on")


def host_of(url: str) -> str:
    """'http://Label-Studio:8080/x' -> 'label-studio:8080' (netloc, lower-case, no credentials); for display."""
    try:
        netloc = urlsplit(url).netloc.lower()
    except ValueError:
        return "?"
    return netloc.rsplit("@", 1)[-1]


@dataclass(frozen=True)
class Settings:
    """Everything configurable, read from the environment by `Settings.from_env()`."""
    label_studio_url: str = ""
    label_studio_api_key: str = field(default="", repr=False)
    model_dir: Path = Path("./models")
    redis_url: str = field(default="", repr=False)
    allowed_hosts: tuple[str, ...] = ()
    media_root: Path | None = None
    max_image_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_side: int = 2048
    max_request_bytes: int = 32 * 1024 * 1024
    max_predict_tasks: int = 1000
    fetch_timeout_s: float = 30.0
    media_cache_mb: int = 1024
    basic_auth_user: str = ""
    basic_auth_pass: str = field(default="", repr=False)
    debounce_s: float = 10.0
    device: str = "auto"
    predict_batch: int = 16
    fetch_threads: int = 16
    min_annotations: int = 5
    gan_min_annotations: int = 20
    train_iters: int = 600
    train_budget_s: float = 90.0
    train_threads: int = 0
    exclude_synthetic: bool = False
    promote_tolerance: float = 0.01
    mislabeling_column: bool = False
    synth_min_iou: float = 0.5
    log_level: str = "INFO"
    # regions kept and how long a first version trains (issue 15)
    min_region_score: float | None = None
    precision_target: float = 0.0
    first_train_budget_s: float = 300.0

    @classmethod
    def from_env(cls) -> "Settings":
        """Read the environment; raises ValueError naming the variable for any invalid value."""
        media_root = _env("TESSERA_MEDIA_ROOT")
        user, password = _env_alias("TESSERA_BASIC_AUTH_USER"), _env_alias("TESSERA_BASIC_AUTH_PASS")
        if bool(user) != bool(password):
            raise ValueError("basic auth needs both a user and a password: set TESSERA_BASIC_AUTH_USER and "
                             "TESSERA_BASIC_AUTH_PASS (or BASIC_AUTH_USER and BASIC_AUTH_PASS), or neither")
        return cls(
            label_studio_url=_url("LABEL_STUDIO_URL"),
            label_studio_api_key=_env("LABEL_STUDIO_API_KEY"),
            model_dir=Path(_env("MODEL_DIR")).expanduser(),
            redis_url=_env("REDIS_URL"),
            allowed_hosts=_hosts("TESSERA_ALLOWED_HOSTS"),
            media_root=Path(media_root).expanduser().resolve() if media_root else None,
            max_image_bytes=_int("TESSERA_MAX_IMAGE_BYTES", 1),
            max_pixels=_int("TESSERA_MAX_PIXELS", 1),
            max_side=_int("TESSERA_MAX_SIDE", 64),
            max_request_bytes=_int("TESSERA_MAX_REQUEST_BYTES", 1),
            max_predict_tasks=_int("TESSERA_MAX_PREDICT_TASKS", 1),
            fetch_timeout_s=_float("TESSERA_FETCH_TIMEOUT_S", 0.1),
            media_cache_mb=_int("TESSERA_MEDIA_CACHE_MB", 0),
            basic_auth_user=user,
            basic_auth_pass=password,
            debounce_s=_float("TESSERA_DEBOUNCE_S", 0.0),
            device=_device("TESSERA_DEVICE"),
            predict_batch=_int("TESSERA_PREDICT_BATCH", 1),
            fetch_threads=_int("TESSERA_FETCH_THREADS", 1),
            min_annotations=_int("TESSERA_MIN_ANNOTATIONS", 1),
            gan_min_annotations=_int("TESSERA_GAN_MIN_ANNOTATIONS", 1),
            train_iters=_int("TESSERA_TRAIN_ITERS", 1),
            train_budget_s=_float("TESSERA_TRAIN_BUDGET_S", 0.0),
            train_threads=_int("TESSERA_TRAIN_THREADS", 0),
            exclude_synthetic=_bool(_env("TESSERA_EXCLUDE_SYNTHETIC")),
            promote_tolerance=_float("TESSERA_PROMOTE_TOLERANCE", 0.0),
            mislabeling_column=_bool(_env("TESSERA_MISLABELING_COLUMN")),
            synth_min_iou=_float("TESSERA_SYNTH_MIN_IOU", 0.0),
            log_level=_log_level("TESSERA_LOG_LEVEL"),
            min_region_score=_fraction("TESSERA_MIN_REGION_SCORE") if _env("TESSERA_MIN_REGION_SCORE") else None,
            precision_target=_fraction("TESSERA_PRECISION_TARGET"),
            first_train_budget_s=_float("TESSERA_FIRST_TRAIN_BUDGET_S", 0.0),
        )

    @property
    def basic_auth(self) -> bool:
        return bool(self.basic_auth_user and self.basic_auth_pass)


QUIET_LOGGERS = ("httpx", "httpcore")      # one INFO line per HTTP request (label-studio-sdk's client)


def configure_logging(level: str) -> None:
    """Root logging for the CLI, the server and workers: one format, and no per-request INFO lines from
    HTTP client libraries."""
    import logging

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
