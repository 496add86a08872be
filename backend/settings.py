"""Tessera settings: one typed object (pydantic-settings), every environment variable read here and only here.

`Settings.from_env()` reads the environment once; `Settings(**values)` takes exactly the values given (tests,
benchmarks) and never looks at the environment. A bad value raises ValueError naming the variable and what is
valid. Secrets are `SecretStr`: repr, logs and dumps show `**********`.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tessera.backend.urls import UnsafeURL, parse_host_entry, parse_http_url

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def env(name: str, default: Any, doc: str, *upstream: str, **constraints: Any) -> Any:
    """A field read from the variable `name` (the TESSERA_ spelling wins), then from the upstream names
    label-studio-ml backends read; `doc` is its line in the README's configuration table."""
    return Field(default, validation_alias=AliasChoices(name, *upstream), description=doc, **constraints)


class Settings(BaseSettings):
    """Everything configurable; `Settings.from_env()` in the server, the CLI and workers."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", populate_by_name=True, case_sensitive=True,
                                      env_ignore_empty=True, str_strip_whitespace=True, allow_inf_nan=False)

    # Label Studio and the model store
    label_studio_url: str = env("LABEL_STUDIO_URL", "", "Label Studio's URL as this backend reaches it (e.g. "
                                "http://label-studio:8080; with its path when it is served at one behind a proxy, "
                                "https://host/ls). Needed for training, `tessera predict/generate` and media "
                                "outside a request.")
    ls_api_key: SecretStr = env("LABEL_STUDIO_API_KEY", SecretStr(""), "Label Studio access token (Account & "
                                "Settings): a personal access token or a legacy token; upstream name "
                                "LABEL_STUDIO_ACCESS_TOKEN is read too. Never printed.", "LABEL_STUDIO_ACCESS_TOKEN")
    model_dir: Path = env("MODEL_DIR", Path("./models"), "Model store: versioned checkpoints per project, "
                          "`current` pointers.")
    redis_url: str = env("REDIS_URL", "", "If set, training runs go to an RQ queue on this Redis and `tessera "
                         "worker` runs them (its password, if any, is never printed).", repr=False, exclude=True)
    # media
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = env(
        "TESSERA_ALLOWED_HOSTS", (), "Extra hosts media may be downloaded from, comma-separated host or host:port "
        "(the Label Studio host is always allowed; the token is never sent to these). `*` allows any host.")
    media_root: Path | None = env("TESSERA_MEDIA_ROOT", None, "Local directory that task paths (and LS "
                                  "local-files URLs) may be read from. Unset: LS local-files URLs come from Label "
                                  "Studio (with LOCAL_FILES_SERVING_ENABLED there).")
    ca_bundle: Path | None = env("TESSERA_CA_BUNDLE", None, "CA certificates (a PEM file) trusted for HTTPS to "
                                 "Label Studio and media hosts, e.g. a Label Studio behind a company CA; also read "
                                 "from SSL_CERT_FILE or REQUESTS_CA_BUNDLE, so one file serves every client. Unset: "
                                 "the public CAs (certifi).", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
    max_image_bytes: int = env("TESSERA_MAX_IMAGE_BYTES", 50 * 1024 * 1024, "Largest image download accepted, "
                               "in bytes (50 MB).", ge=1)
    max_pixels: int = env("TESSERA_MAX_PIXELS", 50_000_000, "Largest image accepted, in pixels "
                          "(decompression-bomb guard).", ge=1)
    max_side: int = env("TESSERA_MAX_SIDE", 2048, "Images are decoded straight to at most this many pixels on "
                        "their longer side, for prediction, smart tools and training alike (a model learns its "
                        "scale on the images it predicts on); regions come back at the image's full size. Raise "
                        "it when objects in larger images are only a few pixels across.", ge=64)
    fetch_timeout_s: float = env("TESSERA_FETCH_TIMEOUT_S", 30.0, "Deadline, in seconds, for downloading one "
                                 "image (connect + all reads).", ge=0.1)
    fetch_threads: int = env("TESSERA_FETCH_THREADS", 16, "Concurrent image downloads per /predict request.", ge=1)
    media_cache_mb: int = env("TESSERA_MEDIA_CACHE_MB", 1024, "Size cap of the training runs' image cache under "
                              "MODEL_DIR/cache/media; least recently used images go first, never those the running "
                              "training run used (0 = no cache).", ge=0)
    train_memory_mb: int = env("TESSERA_TRAIN_MEMORY_MB", 4096, "Memory, in MB, a training run holds its samples "
                               "in (images and label maps: ~46 MB a 2048 px image); the rest are read from "
                               "memory-mapped scratch files under MODEL_DIR/cache/samples (disk space while a "
                               "run lasts, page cache the kernel can take back). 0 = all in memory.", ge=0)
    eval_megapixels: float = env("TESSERA_EVAL_MEGAPIXELS", 48.0, "Pixels, in millions, of the held-back images a "
                                 "training run evaluates at their own size (region cut, promotion): past it, the "
                                 "person-made ones first, then a stable choice by task; the others stay held back "
                                 "(~11 images of 2048 px, ~130 of 520x696; 0 = all).", ge=0.0)
    # the HTTP server
    port: int = env("PORT", 9090, "`tessera serve --port` default.", ge=1, le=65535)
    workers: int = env("WORKERS", 1, "`tessera serve --workers` default: processes, each with its own model "
                       "cache; with more than 1 set LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY (a /setup reaches one "
                       "process) and REDIS_URL (run status is per process otherwise).", ge=1)
    threads: int = env("THREADS", 8, "`tessera serve --threads` default: request threads per process.", ge=1)
    max_request_bytes: int = env("TESSERA_MAX_REQUEST_BYTES", 32 * 1024 * 1024, "Largest HTTP request body "
                                 "accepted (32 MB).", ge=1)
    max_predict_tasks: int = env("TESSERA_MAX_PREDICT_TASKS", 10000, "Most tasks one /predict request may carry "
                                 "(413 above it: use `tessera predict --project N` for a whole project).", ge=1)
    predict_deadline_s: float = env("TESSERA_PREDICT_DEADLINE_S", 60.0, "Seconds after which /predict answers "
                                    "with the tasks it has done, under Label Studio's ML_TIMEOUT_PREDICT (100 s), "
                                    "which drops a later reply whole; the rest are predicted after the reply and "
                                    "written through the API (with LABEL_STUDIO_URL and a key), else by the next "
                                    "\"Retrieve predictions\". 0 = no deadline.", ge=0.0)
    predict_reply_mb: float = env("TESSERA_PREDICT_REPLY_MB", 128.0, "Most megabytes of JSON one /predict reply "
                                  "holds; the tasks past it are left as past the deadline. Label Studio stores a "
                                  "reply's predictions within the same request (~25 s for 100 MB on 2 cores), and "
                                  "its Docker image ends a request after 120 s (uwsgi harakiri). 0 = no cap.",
                                  ge=0.0)
    channel_timeout_s: float = env("TESSERA_CHANNEL_TIMEOUT_S", 60.0, "Seconds a connection may send nothing at "
                                   "all before the server closes it.", ge=1.0)
    connection_limit: int = env("TESSERA_CONNECTION_LIMIT", 200, "Open connections (slow or not) per process "
                                "before new ones wait in the listen backlog.", ge=1)
    basic_auth_user: str = env("TESSERA_BASIC_AUTH_USER", "", "If set with TESSERA_BASIC_AUTH_PASS, every route "
                               "but /health needs HTTP basic auth (set the same in LS: Model > Authentication). "
                               "BASIC_AUTH_USER is read too. Setting only one of the two is an error.",
                               "BASIC_AUTH_USER")
    basic_auth_pass: SecretStr = env("TESSERA_BASIC_AUTH_PASS", SecretStr(""), "Password for basic auth (or "
                                     "BASIC_AUTH_PASS). Never printed.", "BASIC_AUTH_PASS")
    log_level: LogLevel = env("TESSERA_LOG_LEVEL", "INFO", "Logging level (or LOG_LEVEL): DEBUG, INFO, "
                              "WARNING, ERROR.", "LOG_LEVEL")
    # prediction and training
    device: str = env("TESSERA_DEVICE", "auto", "torch device for training and inference: auto, cpu, cuda or "
                      "cuda:N.")
    omp_wait_policy: Literal["PASSIVE", "ACTIVE"] = env(
        "OMP_WAIT_POLICY", "PASSIVE", "OpenMP threads that spin while waiting (ACTIVE) make torch ~10x slower when "
        "training and serving share a small CPU (measured on 2 cores); the CLI sets it before torch is imported.")
    malloc_keep_mb: int = env(
        "TESSERA_MALLOC_KEEP_MB", 256, "Freed memory, in MB, that each of glibc malloc's arenas keeps for reuse "
        "instead of handing it back to the OS (0 = glibc's defaults). Memory handed back costs a page fault per 4 KB "
        "when it is taken again: 4,000-30,000 faults per network pass at 520x696 otherwise.", ge=0)
    malloc_arenas: int = env(
        "TESSERA_MALLOC_ARENAS", 2, "glibc malloc arenas the process may use (0 = glibc's default, 8 per core). Each "
        "thread that allocates gets an arena of its own up to that number, and each keeps its freed memory "
        "(TESSERA_MALLOC_KEEP_MB): with glibc's default a server's resident memory grew to ~3 GB over 20 requests "
        "of 16 520x696 tasks on 2 cores, with 2 it held ~1.4 GB from the sixth request to the twelfth, as fast.", ge=0)
    predict_batch: int = env("TESSERA_PREDICT_BATCH", 16, "Tasks per chunk of /predict (images, where a "
                             "multi-image tag gives tasks pages): a chunk's images download while the one before is "
                             "inferred (a request of up to two chunks is cut in two); its network passes are "
                             "bounded in input pixels, whatever this is.", ge=1)
    debounce_s: float = env("TESSERA_DEBOUNCE_S", 10.0, "Seconds a burst of annotation events must settle before "
                            "one training run.", ge=0.0)
    min_annotations: int = env("TESSERA_MIN_ANNOTATIONS", 5, "Annotated tasks a project needs before a training "
                               "run trains.", ge=1)
    gan_min_annotations: int = env("TESSERA_GAN_MIN_ANNOTATIONS", 20, "Annotated tasks a project needs before "
                                   "runs also train the GAN.", ge=1)
    train_iters: int = env("TESSERA_TRAIN_ITERS", 600, "Training iterations of a run started from Label Studio.",
                           ge=1)
    train_budget_s: float = env("TESSERA_TRAIN_BUDGET_S", 90.0, "Wall-clock cap, in seconds, of the label-model "
                                "training in a run started from Label Studio (runs warm-start, so training adds "
                                "up over runs; 0 = no cap).", ge=0.0)
    first_train_budget_s: float = env("TESSERA_FIRST_TRAIN_BUDGET_S", 300.0, "Cap, in seconds, of a project's "
                                      "first version: it trains until its held-back score stops improving, at "
                                      "most this long (0 = it trains like any other run).", ge=0.0)
    gan_budget_s: float = env("TESSERA_GAN_BUDGET_S", 120.0, "Wall-clock cap, in seconds, of the GAN part of a "
                              "run (it warm-starts, so it keeps improving over runs).", ge=0.0)
    mislabeling_budget_s: float = env("TESSERA_MISLABELING_BUDGET_S", 20.0, "Seconds a run spends scoring "
                                      "annotations for mislabeling after a promotion.", ge=0.0)
    train_threads: int = env("TESSERA_TRAIN_THREADS", 0, "torch threads for training; 0 = half the CPU cores "
                             "(the rest keep answering /predict), and every core for a project's first version "
                             "while no model at all is served.", ge=0)
    exclude_synthetic: bool = env("TESSERA_EXCLUDE_SYNTHETIC", False, "Leave annotations of synthetic "
                                  "(generated) tasks out of training.")
    synth_min_iou: float = env("TESSERA_SYNTH_MIN_IOU", 0.5, "A generated image is kept only if the label model's "
                               "prediction on it agrees with its layout at least this much (IoU).", ge=0.0)
    promote_tolerance: float = env("TESSERA_PROMOTE_TOLERANCE", 0.01, "A new version is served if, on the "
                                   "held-back tasks people made or changed, it scores at least the served "
                                   "version's score minus this.", ge=0.0)
    mislabeling_column: bool = env("TESSERA_MISLABELING_COLUMN", False, "Also write each annotated task's "
                                   "mislabeling score into task data as the column `tessera_mislabeling`. Off: "
                                   "only `task.meta`.")
    min_region_score: float | None = env("TESSERA_MIN_REGION_SCORE", None, "Keep only predicted regions scoring "
                                         "at least this (0-1), instead of the threshold each version learns on its "
                                         "held-back tasks; empty = learned.", ge=0.0, le=1.0)
    precision_target: float = env("TESSERA_PRECISION_TARGET", 0.0, "> 0 (e.g. 0.9): the learned region cut keeps "
                                  "the most regions that still reach this precision on the held-back tasks; 0 = "
                                  "the cut with the best F1 (of the cuts within 0.01 of it, the one with precision "
                                  "and recall most alike).", ge=0.0, le=1.0)
    follow_edges: bool = env("TESSERA_FOLLOW_EDGES", True, "Fit predicted masks to the image's own edges where "
                             "the model saw it smaller than its pixels, when the served version chose to on its "
                             "held-back tasks (DSB 2018 native: +0.5 to +1.5 points of mask IoU, ~9% more CPU a "
                             "520x696 task); false: never, the masks of the network's grid, upsampled. Box-only "
                             "models never do.")
    sort: Literal["priority", "score"] = env(
        "TESSERA_SORT", "priority", "What a task's prediction score ranks by: `priority` (1 - uncertainty x "
        "how unlike the version's labelled images the task is: the lowest first are the tasks worth labelling "
        "next) or `score` (the model's confidence alone).")
    # the Label Studio that tests and `tessera demo` start, and the demo's size
    ls_venv: Path | None = env("TESSERA_LS_VENV", None, "Virtualenv with label-studio 1.23.2 that `tessera demo` "
                               "and the tests start (default .venv-ls in the repository).")
    ls_template: Path | None = env("TESSERA_LS_TEMPLATE", None, "Initialised Label Studio data dir copied for "
                                   "each start (default .cache/ls-template in the repository).")
    demo_iters: int | None = env("TESSERA_DEMO_ITERS", None, "`tessera demo`: training iterations of the first "
                                 "model (default by --quick).", ge=1)
    demo_gan_s: float | None = env("TESSERA_DEMO_GAN_S", None, "`tessera demo`: seconds the GAN trains (default "
                                   "by --quick).", ge=0.0)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # Settings(...) holds what the caller gives: a test never picks up the shell's environment
        return (init_settings,)

    @classmethod
    def from_env(cls) -> "Settings":
        """Read the environment; raises ValueError naming the variable for any invalid value."""
        try:
            return cls(**dict(_Environment()))
        except ValidationError as e:
            raise ValueError(_explain(e)) from None

    def replace(self, **changes: Any) -> "Settings":
        """A copy with `changes`, validated like the original (what dataclasses.replace did)."""
        return Settings(**{**dict(self), **changes})

    @property
    def label_studio_api_key(self) -> str:
        """The key in clear, for the one place it goes: the Authorization header of requests to Label Studio."""
        return self.ls_api_key.get_secret_value()

    @property
    def basic_auth(self) -> bool:
        return bool(self.basic_auth_user and self.basic_auth_pass.get_secret_value())

    @model_validator(mode="before")
    @classmethod
    def _api_key_by_its_public_name(cls, data: Any) -> Any:
        # `Settings(label_studio_api_key=...)`, the name every caller knows, fills the SecretStr field
        if isinstance(data, dict) and "label_studio_api_key" in data:
            data = {**data, "ls_api_key": data["label_studio_api_key"]}
            del data["label_studio_api_key"]
        return data

    @field_validator("label_studio_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.rstrip("/")
        if value:
            try:
                parse_http_url(value)
            except UnsafeURL as e:
                raise ValueError(f"expected an http(s) URL such as http://label-studio:8080 ({e})") from None
        return value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _host_list(cls, value: Any) -> tuple[str, ...]:
        entries = value.split(",") if isinstance(value, str) else value
        out = []
        for entry in (str(h).strip().lower() for h in entries):
            if entry and entry != "*":
                try:
                    parse_host_entry(entry)
                except UnsafeURL as e:
                    raise ValueError(f"expected comma-separated host, host:port or * ({entry[:60]!r}: {e})") from None
            if entry:
                out.append(entry)
        return tuple(out)

    @field_validator("model_dir", "media_root", "ls_venv", "ls_template", "ca_bundle")
    @classmethod
    def _user_path(cls, value: Path | None, info) -> Path | None:
        if value is None:
            return None
        value = value.expanduser()
        if info.field_name == "ca_bundle" and not value.is_file():
            raise ValueError(f"no file at {value}: give a PEM file of CA certificates")
        return value.resolve() if info.field_name == "media_root" else value

    @field_validator("device", mode="before")
    @classmethod
    def _torch_device(cls, value: Any) -> str:
        value = str(value).strip().lower()
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        return value

    @field_validator("log_level", "omp_wait_policy", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _auth_pair(self) -> "Settings":
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass.get_secret_value()):
            raise ValueError("basic auth needs both a user and a password: set TESSERA_BASIC_AUTH_USER and "
                             "TESSERA_BASIC_AUTH_PASS (or BASIC_AUTH_USER and BASIC_AUTH_PASS), or neither")
        return self


class _Environment(Settings):
    """The environment as a source: only `Settings.from_env()` uses it."""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (env_settings,)


def env_names(field: str) -> tuple[str, ...]:
    """The variables a field is read from, the TESSERA_ spelling first."""
    return tuple(Settings.model_fields[field].validation_alias.choices)


def _explain(error: ValidationError) -> str:
    """'TESSERA_PREDICT_BATCH='sixteen' is not valid: ...': the first problem, by the variable's name."""
    by_name = {name: field for field in Settings.model_fields for name in env_names(field)}
    lines = []
    for e in error.errors():
        loc = str(e["loc"][0]) if e["loc"] else ""
        field = by_name.get(loc, loc)
        reason = e["msg"].removeprefix("Value error, ")
        if field in Settings.model_fields:
            names = env_names(field)
            shown = names[0] + (f" (or {', '.join(names[1:])})" if len(names) > 1 else "")
            lines.append(f"{shown}={str(e.get('input', ''))[:60]!r} is not valid: {reason} "
                         "(see the README's configuration table)")
        else:
            lines.append(reason)
    return "; ".join(lines)


def _shown(default: Any) -> str:
    """A default as the README and docker-compose write it: '90' not '90.0', './models', 'false', ''."""
    if default is None or default == ():
        return ""
    if isinstance(default, SecretStr):
        return default.get_secret_value()
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    if isinstance(default, Path) and not default.is_absolute():
        return f"./{default}"
    return str(default)


# variable -> (default, help): what the README's configuration table and docker-compose's defaults are
# checked against (tests/test_docker.py)
ENV_VARS: dict[str, tuple[str, str]] = {env_names(name)[0]: (_shown(f.default), f.description or "")
                                        for name, f in Settings.model_fields.items()}


def host_of(url: str) -> str:
    """'http://Label-Studio:8080/x' -> 'label-studio:8080' (netloc, lower-case, no credentials); for display."""
    try:
        netloc = urlsplit(url).netloc.lower()
    except ValueError:
        return "?"
    return netloc.rsplit("@", 1)[-1]


def apply_thread_policy(settings: Settings) -> None:
    """OMP_WAIT_POLICY into this process's environment, where OpenMP reads it when torch loads: call before
    torch is imported (the CLI and backend/wsgi.py do; the Docker image runs the CLI)."""
    os.environ["OMP_WAIT_POLICY"] = settings.omp_wait_policy


# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8


def apply_memory_policy(settings: Settings) -> bool:
    """Make glibc's malloc keep freed memory for reuse (up to settings.malloc_keep_mb per arena) in at most
    settings.malloc_arenas arenas; True if what the settings ask for was set (False where they ask for
    glibc's defaults, or malloc is not glibc's). Called at start, before the server's threads exist.

    A network pass allocates and frees tensors of 5-50 MB. By default glibc serves those from fresh mmap()s,
    or hands a thread's freed heap back to the OS, so the next pass takes every page again as a page fault
    that the kernel zeroes: 4,000-30,000 minor faults and 10-80 ms of system time per pass of three 520x696
    images on the request thread (stop 21, 2 cores). With allocations below the threshold served from the
    arena, the heap's top kept (trim threshold) and heaps kept whole (top pad, without which a thread arena's
    emptied 64 MB heap is unmapped), the faults fall to ~0. Peak memory is unchanged: what is kept is what
    the previous pass used.

    Kept memory is per arena, and glibc gives each thread that allocates its own arena (up to 8 per core):
    the request thread, the finishing thread, the download threads. A server answering 520x696 tasks in
    requests of 16 (2 cores, stop 43) held 1.0 GB after the first request and 3.0 GB after the twentieth
    (4,000-5,000 page faults a task) with glibc's arenas; with 2 arenas 0.9 and 1.4 GB (300-800 faults a task),
    at the same speed (125-145 vs 120-165 ms a task)."""
    keep, arenas = settings.malloc_keep_mb << 20, settings.malloc_arenas
    params = [(M_ARENA_MAX, arenas)] if arenas > 0 else []
    if keep > 0:
        params += [(M_MMAP_THRESHOLD, keep), (M_TRIM_THRESHOLD, keep), (M_TOP_PAD, min(keep, 64 << 20))]
    if not params:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in params)


QUIET_LOGGERS = ("httpx", "httpcore")      # one INFO line per HTTP request (label-studio-sdk's client)


def configure_logging(level: str) -> None:
    """Root logging for the CLI, the server and workers: one format, and no per-request INFO lines from
    HTTP client libraries."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
