"""Training runs: Label Studio annotations (or a folder dataset) -> a new registered model version.

One entry point per source, both ending in `_train_and_register`, which trains with model.train_vqvae,
evaluates the new and the served version on the same held-back tasks and promotes only if the new one
is at least as good (minus a tolerance). Nothing is promoted when anything fails on the way.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from backend.label_config import LabelConfig, parse_label_config
from backend.lsclient import LSClient
from backend.media import MediaError, MediaResolver
from backend.regions import results_to_maps
from backend.service import DEFAULT_KEY, ModelCache, latest_annotation, version_string
from backend.settings import Settings
from model.data import Sample, load_folder, split_ids

logger = logging.getLogger(__name__)

Progress = Callable[[dict], None]


def _noop(info: dict) -> None:
    pass


def train_config(settings: Settings, iters: int | None = None):
    from model.train_vqvae import TrainConfig

    return TrainConfig(max_iters=iters or settings.train_iters, device=settings.device,
                       eval_interval=max(50, (iters or settings.train_iters) // 4))


def val_score(metrics: dict, n_labels: int) -> float:
    """The number promotion compares: foreground IoU for one label, mean IoU for several."""
    return float(metrics["miou"] if n_labels > 1 else metrics["fg_iou"])


def _train_and_register(settings: Settings, key: str, train: list[Sample], val: list[Sample],
                        label_names: list[str], reason: str, iters: int | None, progress: Progress) -> dict:
    from model.checkpoint import load_checkpoint
    from model.train_vqvae import evaluate, train as train_vqvae

    cache = ModelCache(settings)
    registry = cache.registry(key)
    current = registry.current("label")
    init_from = registry.path(current.version) if current is not None else None
    work = registry.root / ".work"
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=work))
    try:
        progress({"phase": "train", "iter": 0, "max_iters": iters or settings.train_iters, "loss": 0.0,
                  "eta_s": 0.0})
        t0 = time.time()
        ckpt = train_vqvae(train_config(settings, iters), train, val, label_names, tmp / "model.pt",
                           init_from=init_from, progress=progress)
        metrics = dict(load_checkpoint(ckpt, kind="vqvae").get("metrics") or {})
        metrics.update({"label_names": label_names, "n_train": len(train), "n_val": len(val),
                        "train_wall_s": round(time.time() - t0, 1)})
        promote, why = True, "first version"
        if val:
            new = val_score(metrics, len(label_names))
            metrics["val_iou"] = new
            if current is not None:
                progress({"phase": "compare", "iter": 0, "max_iters": 0, "loss": 0.0, "eta_s": 0.0})
                old_metrics = evaluate(registry.path(current.version), val)
                old = val_score(old_metrics, len(label_names))
                metrics["current_val_iou"] = old
                promote = new >= old - settings.promote_tolerance
                why = (f"val IoU {new:.4f} vs current {current.version} {old:.4f} on the same {len(val)} "
                       f"held-back tasks (tolerance {settings.promote_tolerance})")
        elif current is not None:
            promote, why = False, "no held-back tasks to compare against the current version"
        info = registry.add(ckpt, metrics, promote=promote, reason=f"{reason}: {why}", kind="label")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    status = "promoted" if promote else "rejected"
    logger.info("project %s: %s %s (%s)", key, status, info.version, why)
    return {"status": status, "version": version_string(key, info.version), "reason": why,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


# ----------------------------------------------------------------------------------- folder datasets

def train_from_folder(settings: Settings, data: Path, project: str | None = None, iters: int | None = None,
                      labels: list[str] | None = None, progress: Progress = _noop) -> dict:
    """`tessera train --data DIR`: register into the default model (or project `project`)."""
    samples, names = load_folder(data)
    if labels:
        if len(labels) != len(names):
            raise ValueError(f"--labels gives {len(labels)} names, the data set has {len(names)} classes ({names})")
        names = list(labels)
    train_ids, val_ids = split_ids([s.id for s in samples], 0.2)
    by_id = {s.id: s for s in samples}
    return _train_and_register(settings, project or DEFAULT_KEY, [by_id[i] for i in train_ids],
                               [by_id[i] for i in val_ids], names, f"folder {Path(data).name}", iters, progress)


# ----------------------------------------------------------------------------- Label Studio projects

def project_samples(settings: Settings, client: LSClient, key: str, progress: Progress = _noop
                    ) -> tuple[list[Sample], list[str], LabelConfig, list[dict]]:
    """The project's annotated tasks -> Samples (one per task and image tag; latest non-cancelled
    annotation), its label names, its config and the tasks used."""
    project = client.project(key)
    config = parse_label_config(project.get("label_config") or "")
    names = config.label_names
    index = {n: i + 1 for i, n in enumerate(names)}
    media = MediaResolver(settings, cache_dir=settings.model_dir / "cache" / "media")
    samples, used = [], []
    tasks = [t for t in client.tasks(key, only_annotated=True) if latest_annotation(t)]
    for n, task in enumerate(tasks):
        if settings.exclude_synthetic and (task.get("meta") or {}).get("synthetic"):
            continue
        ann = latest_annotation(task)
        for img in config.images:
            try:
                image = media.load_image((task.get("data") or {}).get(img.data_key, ""))
            except MediaError as e:
                logger.warning("task %s: skipped for training: %s", task.get("id"), e)
                continue
            h, w = image.shape[:2]
            try:
                classes, instances = results_to_maps(ann["result"], img.name, h, w, index)
            except (ValueError, KeyError, TypeError) as e:
                logger.warning("task %s: annotation not usable: %s", task.get("id"), e)
                continue
            samples.append(Sample(image=image, classes=classes, instances=instances,
                                  id=f"{task['id']}:{img.name}",
                                  synthetic=bool((task.get("meta") or {}).get("synthetic"))))
            used.append(task)
        progress({"phase": "fetch", "iter": n + 1, "max_iters": len(tasks), "loss": 0.0, "eta_s": 0.0})
    return samples, names, config, used


def train_project(project_key: str, reason: str, progress: Progress = _noop, settings: Settings | None = None,
                  iters: int | None = None) -> dict:
    """The job runner's run function: train project `project_key` from its LS annotations."""
    settings = settings or Settings.from_env()
    client = LSClient(settings)
    samples, names, config, tasks = project_samples(settings, client, project_key, progress)
    n_tasks = len({t["id"] for t in tasks})
    if n_tasks < settings.min_annotations:
        return {"status": "skipped", "reason": f"{n_tasks} annotated tasks; training starts at "
                                                f"{settings.min_annotations} (TESSERA_MIN_ANNOTATIONS)"}
    # split by task id so all images of a task land on the same side
    task_ids = sorted({s.id.split(":", 1)[0] for s in samples}, key=int)
    _, val_ids = split_ids(task_ids, 0.2)
    val_set = set(val_ids)
    train = [s for s in samples if s.id.split(":", 1)[0] not in val_set]
    val = [s for s in samples if s.id.split(":", 1)[0] in val_set]
    result = _train_and_register(settings, project_key, train, val, names, reason, iters, progress)
    result["n_annotated_tasks"] = n_tasks
    if result["status"] == "promoted":
        try:
            result["mislabeling_written"] = write_mislabeling(settings, client, project_key, config, tasks, samples)
        except Exception as e:        # the new version is served either way; report, don't fail the run
            logger.warning("project %s: could not write mislabeling scores: %s", project_key, e)
    return result


def write_mislabeling(settings: Settings, client: LSClient, key: str, config: LabelConfig, tasks: list[dict],
                      samples: list[Sample]) -> int:
    """Score every annotated task's latest annotation under the new model and store it on the task as
    `meta.tessera_mislabeling` and as the data column `tessera_mislabeling` (sortable and filterable in
    the Data Manager of LS Community); returns how many tasks were written."""
    served = ModelCache(settings).served(key, config)
    if served.predictor is None:
        return 0
    by_task: dict[str, float] = {}
    for s in samples:
        _, m = served.predictor.check(s.image, s.classes, s.instances)
        tid = s.id.split(":", 1)[0]
        by_task[tid] = max(by_task.get(tid, 0.0), float(m))
    written = 0
    for task in {str(t["id"]): t for t in tasks}.values():
        tid = str(task["id"])
        if tid not in by_task:
            continue
        value = round(by_task[tid], 4)
        data = dict(task.get("data") or {})
        data["tessera_mislabeling"] = value
        meta = dict(task.get("meta") or {})
        meta.update({"tessera_mislabeling": value, "tessera_model_version": served.version})
        client.request("PATCH", f"/api/tasks/{int(tid)}/", json={"data": data, "meta": meta})
        written += 1
    return written
