"""Training runs: Label Studio annotations (or a folder dataset) -> a new registered model version.

`train_project` is the job runner's run function: it reads the project's latest non-cancelled annotations
through the LS API, loads their images through MediaResolver (with a disk cache), builds label maps from
brush / polygon / rectangle results, holds back tasks by a stable hash of the task id, warm-starts from the
served version, trains with model.train_vqvae, evaluates the new AND the served version on the same
held-back tasks, and promotes only if new >= served - TESSERA_PROMOTE_TOLERANCE (else the version is kept
as "rejected" with the reason). Once a project has TESSERA_GAN_MIN_ANNOTATIONS annotated tasks the mask GAN
is trained in the same run and registered as kind "gan". Nothing is promoted when anything fails on the way.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from backend.jobs import pid_alive
from backend.label_config import Control, ImageObject, LabelConfig, parse_label_config
from backend.lsclient import LabelStudioUnavailable, LSClient
from backend.media import MediaError, MediaResolver
from backend.regions import results_to_maps
from backend.service import DEFAULT_KEY, ModelCache, label_mapping, latest_annotation, task_image, version_string
from backend.settings import Settings
from model.data import Sample, load_folder, split_ids
from model.registry import Registry

logger = logging.getLogger(__name__)

Progress = Callable[[dict], None]
VAL_FRACTION = 0.2
TRAIN_BUDGET_S = 90.0        # wall-clock cap of a run's label training (LS runs); see train_config
GAN_TIME_BUDGET_S = 120.0    # the GAN part of one run; it warm-starts, so it keeps improving over runs
MISLABELING_BUDGET_S = 20.0  # seconds a run spends scoring annotations for mislabeling after a promotion
GAN_RETRAIN_GROWTH = 0.2     # the GAN retrains when a project's annotated images grew by this share
GAN_PROGRESS_EVERY = 20      # iterations between the GAN's progress steps (status + one log line each)


def _noop(info: dict) -> None:
    pass


def _phase(progress: Progress, phase: str, done: int = 0, total: int = 0) -> None:
    progress({"phase": phase, "iter": done, "max_iters": total, "loss": None, "eta_s": None})


def train_config(settings: Settings, iters: int | None = None, budget_s: float = 0.0):
    """The TrainConfig of a run: TESSERA_TRAIN_ITERS (or `iters`) iterations, stopped after `budget_s`
    seconds when > 0 (the lr schedule then follows the clock), on half the CPU cores: the other half
    keeps answering /predict, and two torch threads fighting for two busy cores ran ~7x slower than one
    here (bench/learning_latency.py)."""
    from model.train_vqvae import TrainConfig

    n = iters or settings.train_iters
    threads = int(getattr(settings, "train_threads", 0) or 0) or max(1, (os.cpu_count() or 2) // 2)
    return TrainConfig(max_iters=n, device=settings.device, eval_interval=max(50, n // 4),
                       time_budget_s=budget_s, threads=threads)


def run_budget_s(settings: Settings) -> float:
    """Wall-clock cap of one LS-started run's training: a new annotation is served within ~2 minutes on
    2 cores, and as runs warm-start from the served version, training adds up over runs."""
    return float(getattr(settings, "train_budget_s", TRAIN_BUDGET_S))


def gan_config(settings: Settings, iters: int | None = None):
    """The GANTrainConfig of a run's GAN part: as many iterations as the label model gets, at most
    GAN_TIME_BUDGET_S seconds (on 2 CPU cores a GAN iteration costs several label-model iterations)."""
    from model.train_maskgan import GANTrainConfig

    return GANTrainConfig(max_iters=iters or settings.train_iters, time_budget_s=GAN_TIME_BUDGET_S,
                          device=settings.device)


def val_score(metrics: dict, n_labels: int) -> float:
    """The number promotion compares: foreground IoU for one label, mean IoU for several."""
    return float(metrics["miou"] if n_labels > 1 else metrics["fg_iou"])


def split_tasks(task_ids: list[str]) -> tuple[list[str], list[str]]:
    """(train, held-back) task ids: a task always lands on the same side, so the held-back set of a
    growing project only grows and a version is never compared on tasks it was trained on."""
    return split_ids([str(t) for t in task_ids], VAL_FRACTION)


# ------------------------------------------------------------------------------------------- registry

def _work_dir(registry: Registry) -> Path:
    """A fresh scratch dir under <registry>/.work, after removing those of dead runs of this host
    (a run killed with -9 leaves its half-written checkpoint behind)."""
    work = registry.root / ".work"
    work.mkdir(parents=True, exist_ok=True)
    me = _process_space()
    for d in work.iterdir():
        owner, _, rest = d.name.rpartition("-pid")
        pid = rest.split("-", 1)[0]
        if owner == me and pid.isdigit() and not pid_alive(int(pid)):
            logger.info("removing %s left by an interrupted run", d)
            shutil.rmtree(d, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=work, prefix=f"{me}-pid{os.getpid()}-"))


def _process_space() -> str:
    """Where a pid means something, as a file-name part: host name + pid namespace (containers sharing a
    host name and MODEL_DIR must not judge each other's pids)."""
    try:
        ns = "".join(ch for ch in os.readlink("/proc/self/ns/pid") if ch.isdigit())
    except OSError:
        ns = "0"
    return f"{socket.gethostname()}.{ns}"


def folder_config(label_names: list[str]) -> LabelConfig:
    """The label config a folder dataset stands for: one control with its class names (which model serves
    it, and how that model's classes map onto them, is then decided as for a Label Studio project)."""
    return LabelConfig(images=(), controls=(Control("brushlabels", "", "", tuple(label_names)),))


class _AsServed:
    """A served predictor whose classes are renumbered into a project's labels the way Label Studio
    shows its predictions (service.label_mapping): the default model may know fewer or other names."""

    def __init__(self, predictor, config: LabelConfig, label_names: list[str]):
        self.predictor, self.n_classes = predictor, len(label_names)
        index = {n: i + 1 for i, n in enumerate(label_names)}
        self.lut = np.zeros(len(predictor.label_names) + 1, np.int32)     # model class -> project class
        for control in reversed(config.controls):                          # the first control decides
            for c, label in label_mapping(control, predictor.label_names).items():
                self.lut[c] = index.get(label, 0)

    def predict(self, images: list[np.ndarray]) -> list:
        out = []
        for p in self.predictor.predict(images):
            classes = self.lut[p.classes]
            out.append(dataclasses.replace(p, classes=classes, instances=np.where(classes > 0, p.instances, 0)))
        return out


def _served_score(path: Path, val: list[Sample], config: LabelConfig, label_names: list[str],
                  device: str) -> float:
    """The served version's val score on the held-back tasks, counting what Label Studio shows of it."""
    from model.inference import Predictor
    from model.train_vqvae import evaluate

    served = _AsServed(Predictor.from_checkpoint(path, device=device), config, label_names)
    return val_score(evaluate(served, val), len(label_names))


def _metrics_of(ckpt: Path, val: list[Sample]) -> dict:
    """The new checkpoint's held-back metrics (computed by train(); evaluated here if it did not)."""
    from model.checkpoint import load_checkpoint
    from model.train_vqvae import evaluate

    metrics = dict(load_checkpoint(ckpt, kind="vqvae").get("metrics") or {})
    if val and not {"fg_iou", "miou"} <= metrics.keys():
        metrics.update(evaluate(ckpt, val))
    # NaN (e.g. a rank correlation over one image) is not JSON: the status route and Redis carry these
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


def _train_and_register(settings: Settings, key: str, train: list[Sample], val: list[Sample],
                        label_names: list[str], reason: str, iters: int | None, progress: Progress,
                        budget_s: float = 0.0, config: LabelConfig | None = None) -> dict:
    """Train a label version on `train`, compare it with the served one on `val`, register it.
    `config` is the project's label config (None: a folder dataset labelled `label_names`)."""
    from model.train_vqvae import train as train_vqvae

    cache = ModelCache(settings)
    registry = cache.registry(key)
    config = config or folder_config(label_names)
    base = cache.source(key, config)         # what serves `key` now: the version a new one must beat
    base_name = version_string(base[0], base[2].version) if base else None
    init_from = base[1].path(base[2].version) if base else None
    tmp = _work_dir(registry)
    timings: dict[str, float] = {}
    try:
        t0 = time.time()
        cfg = train_config(settings, iters, budget_s)
        ckpt = train_vqvae(cfg, train, val, label_names, tmp / "model.pt", init_from=init_from, progress=progress)
        timings["train_s"] = time.time() - t0
        t0 = time.time()
        metrics = _metrics_of(ckpt, val)
        metrics.update({"label_names": label_names, "n_train": len(train), "n_val": len(val),
                        "warm_start": base_name, "val_task_ids": sorted({s.id.split(":", 1)[0] for s in val})})
        promote, why = True, "first version"
        if val:
            new = val_score(metrics, len(label_names))
            metrics["val_iou"] = new
            if base is not None:
                _phase(progress, "compare")
                try:
                    old = _served_score(init_from, val, config, label_names, settings.device)
                except Exception as e:   # an unreadable served version can't be served either: replace it
                    logger.exception("project %s: could not evaluate the served %s", key, base_name)
                    why = f"served {base_name} could not be evaluated ({type(e).__name__}: {e})"[:300]
                else:
                    metrics["current_val_iou"] = old
                    promote = new >= old - settings.promote_tolerance
                    why = (f"val IoU {new:.4f} vs served {base_name} {old:.4f} on the same {len(val)} held-back "
                           f"tasks (tolerance {settings.promote_tolerance})")
        elif base is not None:
            promote, why = False, "no held-back tasks to compare against the served version"
        timings["compare_s"] = time.time() - t0
        _phase(progress, "register")
        metrics.update({k: round(v, 2) for k, v in timings.items()})
        info = registry.add(ckpt, metrics, promote=promote, reason=f"{reason}: {why}", kind="label")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    status = "promoted" if promote else "rejected"
    logger.info("project %s: %s %s (%s)", key, status, info.version, why)
    return {"status": status, "version": version_string(key, info.version), "reason": why,
            "promoted_at": time.time() if promote else None,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}


def train_gan(settings: Settings, key: str, samples: list[Sample], label_names: list[str], reason: str,
              iters: int | None, progress: Progress) -> dict:
    """Train the mask GAN on the project's real samples and register it as kind "gan" (promoted when the
    run ends with finite losses: there is no held-back score for a generator yet). Warm-starts from the
    current GAN when its config still fits."""
    from model import train_maskgan

    real = [s for s in samples if not s.synthetic]       # a GAN must not learn from its own output
    if not real:
        return {"status": "skipped", "reason": "no annotated real (non-synthetic) images"}
    registry = ModelCache(settings).registry(key)
    cur = registry.current("gan")
    init_from = registry.path(cur.version) if cur is not None else None
    tmp = _work_dir(registry)

    def gan_progress(info: dict) -> None:
        if info.get("phase") == "train":           # train_maskgan reports every iteration: pass on every 20th
            if info.get("iter", 0) % GAN_PROGRESS_EVERY and info.get("iter") != 1:
                return
            progress({**info, "phase": "gan"})
        else:
            progress({**info, "phase": f"gan-{info.get('phase')}"})

    try:
        t0 = time.time()
        cfg = gan_config(settings, iters)
        try:
            ckpt = train_maskgan.train(cfg, real, label_names, tmp / "gan.pt", init_from=init_from,
                                       progress=gan_progress)
        except ValueError as e:
            if init_from is None:
                raise
            logger.warning("project %s: GAN warm start from %s impossible (%s); training from scratch",
                           key, cur.version, e)
            ckpt = train_maskgan.train(cfg, real, label_names, tmp / "gan.pt", progress=gan_progress)
        metrics = {"label_names": label_names, "n_train": len(real), "train_s": round(time.time() - t0, 2),
                   "max_iters": cfg.max_iters}
        info = registry.add(ckpt, metrics, promote=True, reason=f"{reason}: GAN on {len(real)} images", kind="gan")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"status": "promoted", "version": version_string(key, info.version), "metrics": metrics}


def _gan_up_to_date(settings: Settings, key: str, samples: list[Sample]) -> str:
    """'' if the GAN should train in this run, else why not: it retrains once the real annotated images
    grew by GAN_RETRAIN_GROWTH (at least 5) since its current version, so that a run for a new annotation
    is not held up by the GAN every time."""
    cur = ModelCache(settings).registry(key).current("gan")
    n_real = sum(not s.synthetic for s in samples)
    n_prev = int((cur.metrics if cur else {}).get("n_train") or 0)
    if cur is None or n_real >= n_prev + max(5, round(n_prev * GAN_RETRAIN_GROWTH)):
        return ""
    return f"the current GAN {cur.version} was trained on {n_prev} images, now {n_real}: it retrains at " \
           f"{n_prev + max(5, round(n_prev * GAN_RETRAIN_GROWTH))}"


# ----------------------------------------------------------------------------------- folder datasets

def train_from_folder(settings: Settings, data: Path, project: str | None = None, iters: int | None = None,
                      labels: list[str] | None = None, progress: Progress = _noop) -> dict:
    """`tessera train --data DIR`: register into the default model (or project `project`)."""
    samples, names = load_folder(data)
    if labels:
        if len(labels) != len(names):
            raise ValueError(f"--labels gives {len(labels)} names, the data set has {len(names)} classes ({names})")
        names = list(labels)
    train_ids, val_ids = split_ids([s.id for s in samples], VAL_FRACTION)
    by_id = {s.id: s for s in samples}
    return _train_and_register(settings, project or DEFAULT_KEY, [by_id[i] for i in train_ids],
                               [by_id[i] for i in val_ids], names, f"folder {Path(data).name}", iters, progress)


# ----------------------------------------------------------------------------- Label Studio projects

def project_samples(settings: Settings, client: LSClient, key: str, progress: Progress = _noop
                    ) -> tuple[list[Sample], list[str], LabelConfig, list[dict]]:
    """The project's annotated tasks -> Samples (one per task and image tag), its label names, its config
    and the tasks used. Raises LabelStudioUnavailable when LS can't be read, and RuntimeError when not one
    image of the annotated tasks could be loaded (a broken media setup must not look like "no data")."""
    project = client.project(key)
    config = parse_label_config(project.get("label_config") or "")
    names = config.label_names
    index = {n: i + 1 for i, n in enumerate(names)}
    tasks = []
    for task in client.tasks(key, only_annotated=True):
        if latest_annotation(task) is None:
            continue
        if settings.exclude_synthetic and (task.get("meta") or {}).get("synthetic"):
            continue
        tasks.append(task)
    media = MediaResolver(settings, cache_dir=settings.model_dir / "cache" / "media")
    jobs = [(task, img) for task in tasks for img in config.images]

    def load(job: tuple[dict, ImageObject]) -> np.ndarray | MediaError:
        return task_image(*job, media)

    images: list[np.ndarray | MediaError] = []
    step = max(1, len(jobs) // 10)
    with ThreadPoolExecutor(max_workers=max(1, min(settings.fetch_threads, len(jobs) or 1))) as pool:
        for n, image in enumerate(pool.map(load, jobs), 1):          # in order, as they arrive
            images.append(image)
            if n % step == 0 or n == len(jobs):
                _phase(progress, "fetch", n, len(jobs))
    failed = [(task, im) for (task, _), im in zip(jobs, images) if isinstance(im, MediaError)]
    for task, e in failed[:5]:
        logger.warning("task %s: skipped for training: %s", task.get("id"), e)
    if jobs and len(failed) == len(jobs):
        raise RuntimeError(f"none of the {len(jobs)} images of {len(tasks)} annotated tasks could be loaded; "
                           f"first error: {failed[0][1]}")
    samples, used = [], []
    for (task, img), image in zip(jobs, images):
        if isinstance(image, MediaError):
            continue
        h, w = image.shape[:2]
        try:
            classes, instances = results_to_maps(latest_annotation(task)["result"], img.name, h, w, index)
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("task %s: annotation not usable: %s", task.get("id"), e)
            continue
        meta = task.get("meta") or {}
        samples.append(Sample(image=image, classes=classes, instances=instances, id=f"{task['id']}:{img.name}",
                              synthetic=bool(meta.get("synthetic"))))
        used.append(task)
    return samples, names, config, used


def train_project(project_key: str, reason: str, progress: Progress = _noop, settings: Settings | None = None,
                  iters: int | None = None) -> dict:
    """The job runner's run function: train project `project_key` from its LS annotations."""
    settings = settings or Settings.from_env()
    t_start = time.time()
    _phase(progress, "fetch")
    try:
        client = LSClient(settings)
        samples, names, config, tasks = project_samples(settings, client, project_key, progress)
    except LabelStudioUnavailable as e:
        raise LabelStudioUnavailable(f"{e} (no training for project {project_key}; check LABEL_STUDIO_URL, "
                                     "LABEL_STUDIO_API_KEY and that Label Studio is up)") from e
    n_tasks = len({t["id"] for t in tasks})
    if n_tasks < settings.min_annotations:
        return {"status": "skipped", "reason": f"{n_tasks} annotated tasks; training starts at "
                                                f"{settings.min_annotations} (TESSERA_MIN_ANNOTATIONS)"}
    fetch_s = time.time() - t_start
    # split by task id so all images of a task land on the same side
    task_of = {s.id: s.id.split(":", 1)[0] for s in samples}
    _, val_ids = split_tasks(sorted(set(task_of.values()), key=int))
    held = set(val_ids)
    train = [s for s in samples if task_of[s.id] not in held]
    val = [s for s in samples if task_of[s.id] in held]
    result = _train_and_register(settings, project_key, train, val, names, reason, iters, progress,
                                 budget_s=run_budget_s(settings), config=config)
    result["n_annotated_tasks"] = n_tasks
    result["metrics"]["fetch_s"] = round(fetch_s, 2)
    if result["status"] == "promoted":
        _phase(progress, "mislabeling")
        try:
            result["mislabeling_written"] = write_mislabeling(settings, client, project_key, config, tasks, samples)
        except Exception as e:        # the new version is served either way; report, don't fail the run
            logger.warning("project %s: could not write mislabeling scores: %s", project_key, e)
    if n_tasks >= settings.gan_min_annotations:
        why_not = _gan_up_to_date(settings, project_key, samples)
        if why_not:
            result["gan"] = {"status": "skipped", "reason": why_not}
        else:
            try:
                result["gan"] = train_gan(settings, project_key, samples, names, reason, iters, progress)
            except Exception as e:    # the label model is registered either way; the GAN is optional
                logger.exception("project %s: GAN training failed", project_key)
                result["gan"] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:300]}
    result["run_s"] = round(time.time() - t_start, 2)
    _phase(progress, "done", 1, 1)
    return result


def write_mislabeling(settings: Settings, client: LSClient, key: str, config: LabelConfig, tasks: list[dict],
                      samples: list[Sample], budget_s: float = MISLABELING_BUDGET_S) -> int:
    """Score annotated tasks' latest annotations under the served model and store the score on the task as
    `meta.tessera_mislabeling` and as the data column `tessera_mislabeling` (sortable and filterable in
    the Data Manager of LS Community); returns how many tasks were written.

    Tasks with no score yet go first, then those scored by the oldest version; work stops after
    `budget_s` seconds (100 tasks took ~90 s on 2 busy cores, holding up the next run), so later runs
    finish the rest."""
    served = ModelCache(settings).served(key, config)
    if served.predictor is None:
        return 0
    by_task: dict[str, list[Sample]] = {}
    for s in samples:
        by_task.setdefault(s.id.split(":", 1)[0], []).append(s)
    todo = [t for t in {str(t["id"]): t for t in tasks}.values() if str(t["id"]) in by_task and
            (t.get("meta") or {}).get("tessera_model_version") != served.version]
    todo.sort(key=lambda t: ("tessera_mislabeling" in (t.get("meta") or {}),
                             str((t.get("meta") or {}).get("tessera_model_version") or "")))
    end = time.monotonic() + budget_s
    written = 0
    for task in todo:
        if time.monotonic() > end:
            logger.info("project %s: mislabeling scores written for %d tasks; %d left for later runs",
                        key, written, len(todo) - written)
            break
        tid = str(task["id"])
        value = round(max(float(served.predictor.check(s.image, s.classes, s.instances)[1])
                          for s in by_task[tid]), 4)
        data = dict(task.get("data") or {})
        meta = dict(task.get("meta") or {})
        data["tessera_mislabeling"] = value
        meta.update({"tessera_mislabeling": value, "tessera_model_version": served.version})
        client.request("PATCH", f"/api/tasks/{int(tid)}/", json={"data": data, "meta": meta})
        written += 1
    return written
