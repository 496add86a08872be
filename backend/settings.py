"""Tessera settings: every environment variable is read once, here, into a frozen dataclass."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

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
    "TESSERA_MAX_REQUEST_BYTES": ("33554432", "Largest HTTP request body accepted (default 32 MB)."),
    "TESSERA_BASIC_AUTH_USER": ("", "If set with TESSERA_BASIC_AUTH_PASS, every route but /health needs "
                                    "HTTP basic auth (set the same in LS: Model > Authentication)."),
    "TESSERA_BASIC_AUTH_PASS": ("", "Password for basic auth. Never logged."),
    "TESSERA_DEBOUNCE_S": ("10", "Seconds a burst of annotation events must settle before one training run."),
    "TESSERA_DEVICE": ("auto", "torch device for training and inference: auto, cpu or cuda."),
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
                                          "it scores at least the served version's score minus this."),
    "TESSERA_MISLABELING_COLUMN": ("false", "Also write each annotated task's mislabeling score into task data as "
                                            "the column `tessera_mislabeling` (sortable in the Data Manager; it "
                                            "then appears in exports). Off: only `task.meta`."),
    "TESSERA_LOG_LEVEL": ("INFO", "Logging level."),
}


def _env(name: str) -> str:
    return os.environ.get(name, ENV_VARS[name][0]).strip()


def _bool(value: str) -> bool:
    return value.lower() in ("1", "true", "yes", "on")


def host_of(url: str) -> str:
    """'http://Label-Studio:8080/x' -> 'label-studio:8080' (netloc, lower-case, no credentials)."""
    netloc = urlparse(url).netloc.lower()
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
    max_request_bytes: int = 32 * 1024 * 1024
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

    @classmethod
    def from_env(cls) -> "Settings":
        try:
            media_root = _env("TESSERA_MEDIA_ROOT")
            return cls(
                label_studio_url=_env("LABEL_STUDIO_URL").rstrip("/"),
                label_studio_api_key=_env("LABEL_STUDIO_API_KEY"),
                model_dir=Path(_env("MODEL_DIR")).expanduser(),
                redis_url=_env("REDIS_URL"),
                allowed_hosts=tuple(h.strip().lower() for h in _env("TESSERA_ALLOWED_HOSTS").split(",") if h.strip()),
                media_root=Path(media_root).expanduser().resolve() if media_root else None,
                max_image_bytes=int(_env("TESSERA_MAX_IMAGE_BYTES")),
                max_pixels=int(_env("TESSERA_MAX_PIXELS")),
                max_request_bytes=int(_env("TESSERA_MAX_REQUEST_BYTES")),
                basic_auth_user=_env("TESSERA_BASIC_AUTH_USER"),
                basic_auth_pass=_env("TESSERA_BASIC_AUTH_PASS"),
                debounce_s=float(_env("TESSERA_DEBOUNCE_S")),
                device=_env("TESSERA_DEVICE"),
                predict_batch=int(_env("TESSERA_PREDICT_BATCH")),
                fetch_threads=int(_env("TESSERA_FETCH_THREADS")),
                min_annotations=int(_env("TESSERA_MIN_ANNOTATIONS")),
                gan_min_annotations=int(_env("TESSERA_GAN_MIN_ANNOTATIONS")),
                train_iters=int(_env("TESSERA_TRAIN_ITERS")),
                train_budget_s=float(_env("TESSERA_TRAIN_BUDGET_S")),
                train_threads=int(_env("TESSERA_TRAIN_THREADS")),
                exclude_synthetic=_bool(_env("TESSERA_EXCLUDE_SYNTHETIC")),
                promote_tolerance=float(_env("TESSERA_PROMOTE_TOLERANCE")),
                mislabeling_column=_bool(_env("TESSERA_MISLABELING_COLUMN")),
                synth_min_iou=float(_env("TESSERA_SYNTH_MIN_IOU")),
                log_level=_env("TESSERA_LOG_LEVEL").upper(),
            )
        except ValueError as e:
            raise ValueError(f"bad Tessera setting in the environment: {e} (see the README's configuration table)") from e

    @property
    def basic_auth(self) -> bool:
        return bool(self.basic_auth_user and self.basic_auth_pass)


QUIET_LOGGERS = ("httpx", "httpcore")      # one INFO line per HTTP request (label-studio-sdk's client)


def configure_logging(level: str) -> None:
    """Root logging for the CLI, gunicorn and workers: one format, and no per-request INFO lines from
    HTTP client libraries."""
    import logging

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
