"""Writing a training run's results back to Label Studio: the connection's name and mislabeling scores."""
from __future__ import annotations

import logging
import time

from label_studio_sdk.client import LabelStudio

from tessera.backend import lsclient
from tessera.backend.label_config import LabelConfig
from tessera.backend.progress import Progress, phase
from tessera.backend.predictions import ModelCache, checks_annotations
from tessera.backend.settings import Settings
from tessera.model.data import Sample

logger = logging.getLogger(__name__)



def after_promotion(settings: Settings, client: LabelStudio, key: str, config: LabelConfig, tasks: list[dict],
                     samples: list[Sample], result: dict, progress: Progress) -> None:
    """Name the LS connection after the new version (so "Prediction score" sorts by its predictions) and
    score the annotations for mislabeling; the new version is served either way."""
    try:
        lsclient.follow_version(client, key, result["version"])
    except Exception as e:
        logger.warning("project %s: could not rename the Label Studio connection to %s: %s", key,
                       result["version"], e)
    phase(progress, "mislabeling")
    try:
        result["mislabeling_written"] = write_mislabeling(settings, client, key, config, tasks, samples)
    except Exception as e:
        logger.warning("project %s: could not write mislabeling scores: %s", key, e)


def write_mislabeling(settings: Settings, client: LabelStudio, key: str, config: LabelConfig, tasks: list[dict],
                      samples: list[Sample], budget_s: float | None = None) -> int:
    """Score annotated tasks' training annotations (ground truth, else latest) under the served model and store
    the score on the task as `meta.tessera_mislabeling` (with TESSERA_MISLABELING_COLUMN also as the data column
    `tessera_mislabeling`, sortable and filterable in the Data Manager of LS Community, but then part of
    the user's data and exports); returns how many tasks were written.

    Tasks with no score yet go first, then those scored by the oldest version; work stops after
    `budget_s` seconds (100 tasks took ~90 s on 2 busy cores, holding up the next run), so later runs
    finish the rest."""
    if not checks_annotations(config):
        return 0
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
    end = time.monotonic() + (settings.mislabeling_budget_s if budget_s is None else budget_s)
    written = 0
    for task in todo:
        if time.monotonic() > end:
            logger.info("project %s: mislabeling scores written for %d tasks; %d left for later runs",
                        key, written, len(todo) - written)
            break
        tid = str(task["id"])
        value = round(max(float(served.predictor.review(s.image, s.classes, s.instances, s.boxes)[1])
                          for s in by_task[tid]), 4)
        meta = dict(task.get("meta") or {})
        meta.update({"tessera_mislabeling": value, "tessera_model_version": served.version})
        body: dict = {"meta": meta}
        if settings.mislabeling_column:          # opt-in: a sortable Data Manager column, part of the user's data
            body["data"] = {**(task.get("data") or {}), "tessera_mislabeling": value}
        client.tasks.update(tid, **body)
        written += 1
    return written
