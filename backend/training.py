"""Training runs: a Label Studio project (or a folder dataset) -> a new registered label-model version.

`train_project` is the job runner's run function: the project's annotated tasks become Samples and a
held-back split (backend/dataset.py); the new version warm-starts from the served one, trains with
model.train_vqvae, and is evaluated with the served version on the same held-back tasks; it is promoted only
if new >= served - TESSERA_PROMOTE_TOLERANCE (else it is kept as "rejected" with the reason). After a
promotion the results go back to Label Studio (backend/writeback.py); once a project has
TESSERA_GAN_MIN_ANNOTATIONS annotated tasks the mask GAN trains in the same run (backend/gan_runs.py).
Nothing is promoted when anything fails on the way.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from tessera.backend.dataset import (BOX_SHRINK, VAL_FRACTION, annotated_tasks, data_fingerprint, evaluated_held_back,
                                     folder_config, has_rectangles, held_back_samples, is_box_only, is_point_only,
                                     load_samples, nothing_new, samples_point_side, working_size)
from tessera.backend.gan_runs import gan_part
from tessera.backend.label_config import LabelConfig
from tessera.backend.lsclient import LabelStudioUnavailable, from_settings
from tessera.backend.progress import Progress, noop, phase
from tessera.backend.predictions import ModelCache, label_mapping
from tessera.backend.settings import Settings
from tessera.backend.store import DEFAULT_KEY, Store, version_string
from tessera.backend.workdir import work_dir
from tessera.backend.writeback import after_promotion
from tessera.model.data import Sample, load_folder, split_ids
from tessera.model.sample_store import SampleStore

logger = logging.getLogger(__name__)

MIN_EVIDENCE = 3             # held-back tasks a person made or changed that a comparison with the served version needs
THIN_EVIDENCE_RATIO = 0.5    # with fewer: the candidate must keep this share of the served score on all held-back tasks
THIN_TOLERANCE = 0.05        # ... and on the one or two person-made ones be at most this much below the served one
CLASS_RECALL_FLOOR = 0.0     # a class whose held-back recall falls to this (from > 0) blocks promotion
FIRST_RUN_ITERS_FACTOR = 4   # a project's first version may train this many times TESSERA_TRAIN_ITERS ...
PLATEAU_EVALS = 4            # ... but stops when this many evaluations in a row did not improve it. Held-back
                             # box AP50 moves +-0.02 between evaluations: DSB native boxes, 2,400 iterations,
                             # seeds 0-3, patience 2 / 3 / 4 kept states scoring 0.716 / 0.738 / 0.742 AP50 on
                             # validation (4: no early stop in any seed; bench.patience, patience_*.json).
                             # A cap of 6x (3,600) did not pay on Pets heads (held-back score still rising at
                             # 2,400 on 3 of 5 seeds): seeds 0 / 1 AP50 0.854 / 0.820 against 0.863 / 0.829
                             # (stopped at 3,150 / 3,600; bench/HISTORY.md stop 49)


def train_config(settings: Settings, iters: int | None = None, budget_s: float = 0.0, box_only: bool = False,
                 until_plateau: bool = False, all_cores: bool = False, point_side: float = 0.0):
    """The TrainConfig of a run: TESSERA_TRAIN_ITERS (or `iters`) iterations, stopped after `budget_s`
    seconds when > 0 (the lr schedule then follows the clock), on half the CPU cores: the other half
    keeps answering /predict, and two torch threads fighting for two busy cores ran ~7x slower than one
    here (bench/learning_latency.py). `all_cores`: on every core (nothing is served, so /predict has no
    network pass to run). TESSERA_TRAIN_THREADS overrides both. A box-only project learns box centres
    (BOX_SHRINK), a counting project its points as boxes of `point_side` px; the region cut aims at
    TESSERA_PRECISION_TARGET. `until_plateau` (a project's first version): up to FIRST_RUN_ITERS_FACTOR x the
    iterations, stopping PLATEAU_EVALS evaluations after the held-back score last improved."""
    from tessera.model.train_vqvae import TrainConfig

    n = iters or settings.train_iters
    if until_plateau:
        n *= FIRST_RUN_ITERS_FACTOR
    cores = os.cpu_count() or 2
    threads = int(getattr(settings, "train_threads", 0) or 0) or (cores if all_cores else max(1, cores // 2))
    return TrainConfig(max_iters=n, device=settings.device,
                       eval_interval=max(50, (n // FIRST_RUN_ITERS_FACTOR if until_plateau else n) // 4),
                       time_budget_s=budget_s, threads=threads, box_shrink=BOX_SHRINK if box_only else 1.0,
                       precision_target=float(getattr(settings, "precision_target", 0.0) or 0.0),
                       patience=PLATEAU_EVALS if until_plateau else 0, point_side=point_side)


def run_budget_s(settings: Settings) -> float:
    """Wall-clock cap of one LS-started run's training: a new annotation is served within ~2 minutes on
    2 cores, and as runs warm-start from the served version, training adds up over runs."""
    return settings.train_budget_s


def val_score(metrics: dict, n_labels: int, box_only: bool = False, rectangles: bool = False) -> float:
    """The number promotion compares, the project's own measure: box AP50 (mean over classes) for a
    box-only project; for masks the mean of mask IoU (foreground IoU for one label, mean IoU for several)
    and instance F1 after the region cut, and with RectangleLabels beside them (`rectangles`) the mean of
    that and the box AP50 of what the rectangles get (the head's boxes, else the masks' bounding boxes:
    model/train_vqvae.rectangles_from).
    Metrics of versions made before these existed fall back to IoU."""
    iou = val_iou(metrics, n_labels)
    if box_only:
        return float(metrics.get("box_ap50", iou))
    f1 = metrics.get("instance_f1")
    score = iou if f1 is None else 0.5 * (iou + float(f1))
    head = metrics.get("rectangles", "head") == "head" and "head_box_ap50" in metrics
    ap = metrics["head_box_ap50"] if head else metrics.get("box_ap50")
    return 0.5 * (score + float(ap)) if rectangles and ap is not None else score


def metric_name(box_only: bool, rectangles: bool, points: bool = False) -> str:
    """What val_score measures, in words (a version's "metric")."""
    if points:
        return "box AP50 of the points' boxes (each point a box of one size: a point within about a third of it)"
    if box_only:
        return "box AP50"
    return "((mask IoU + instance F1) / 2 + box AP50) / 2" if rectangles else "(mask IoU + instance F1) / 2"


def val_iou(metrics: dict, n_labels: int) -> float:
    """Mask IoU on the held-back tasks: foreground IoU for one label, mean IoU for several."""
    return float(metrics["miou"] if n_labels > 1 else metrics["fg_iou"])


def lost_classes(new: dict, old: dict) -> list[str]:
    """Classes the served version finds on the held-back tasks (recall > 0) and the new one does not at
    all: such a version is not promoted, whatever its mean."""
    old_r, new_r = old.get("class_recall") or {}, new.get("class_recall") or {}
    return [c for c, r in old_r.items() if r and r > 0 and float(new_r.get(c, 0.0) or 0.0) <= CLASS_RECALL_FLOOR]


class _AsServed:
    """A served predictor whose classes are renumbered into a project's labels the way Label Studio
    shows its predictions (predictions.label_mapping): the default model may know fewer or other names."""

    def __init__(self, predictor, config: LabelConfig, label_names: list[str]):
        self.predictor, self.n_classes, self.label_names = predictor, len(label_names), list(label_names)
        index = {n: i + 1 for i, n in enumerate(label_names)}
        self.lut = np.zeros(len(predictor.label_names) + 1, np.int32)     # model class -> project class
        for control in reversed(config.controls):                          # the first control decides
            for c, label in label_mapping(control, predictor.label_names).items():
                self.lut[c] = index.get(label, 0)

    def predict(self, images: list[np.ndarray]) -> list:
        return [self._relabel(p) for p in self.predictor.predict(images)]   # with the served version's own cuts

    def _relabel(self, p):
        classes = self.lut[p.classes]
        label = {k: int(self.lut[c]) for k, c in p.instance_label.items() if self.lut[c] > 0}
        boxes, head = getattr(p, "boxes", None), getattr(p, "head", None)
        return dataclasses.replace(
            p, classes=classes, instances=np.where(classes > 0, p.instances, 0), instance_label=label,
            instance_score={k: v for k, v in p.instance_score.items() if k in label},
            **({} if boxes is None else {"boxes": {k: v for k, v in boxes.items() if k in label}}),
            **({} if head is None else {"head": self._relabel(head)}))


def _served_metrics_fn(path: Path, config: LabelConfig, label_names: list[str], device: str
                       ) -> Callable[[list[Sample]], dict]:
    """samples -> the served version's held-back metrics on them, counting what Label Studio shows of it.
    Each image is predicted once, whichever sets it is in (the person-made held-back images are judged alone
    and again among all of them: a second network pass each), and each sample set evaluated once."""
    from tessera.model.inference import Predictor
    from tessera.model.train_vqvae import evaluate, raw_predictions

    served, done = _AsServed(Predictor.from_checkpoint(path, device=device), config, label_names), {}
    predicted: dict[str, object] = {}

    def metrics_on(samples: list[Sample]) -> dict:
        key = tuple(s.id for s in samples)
        if key not in done:
            todo = [s for s in samples if s.id not in predicted]
            predicted.update(zip((s.id for s in todo), raw_predictions(served, todo)))
            done[key] = evaluate(served, samples, raws=[predicted[s.id] for s in samples])
        return done[key]
    return metrics_on


def _metrics_of(ckpt: Path, val: list[Sample]) -> dict:
    """The new checkpoint's held-back metrics (computed by train(); evaluated here if it did not)."""
    from tessera.model.checkpoint import load_checkpoint
    from tessera.model.train_vqvae import evaluate

    metrics = dict(load_checkpoint(ckpt, kind="vqvae").get("metrics") or {})
    if val and not {"fg_iou", "miou"} <= metrics.keys():
        metrics.update(evaluate(ckpt, val))
    # NaN (e.g. a rank correlation over one image) is not JSON: the status route and Redis carry these
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


def _train_and_register(settings: Settings, key: str, train: list[Sample], val: list[Sample],
                        label_names: list[str], reason: str, iters: int | None, progress: Progress,
                        budget_s: float = 0.0, config: LabelConfig | None = None, judged: set[str] | None = None,
                        record: dict | None = None) -> dict:
    """Train a label version on `train`, compare it with the served one on `val`, register it.
    `config` is the project's label config (None: a folder dataset labelled `label_names`); `judged`:
    ids of the held-back samples whose labels a person made or changed (None: all of them); `record`:
    extra values stored in the version's metrics. A box-only
    config is judged by box AP50. A project's first version (nothing served to warm-start from) trains
    until its held-back score stops improving, within TESSERA_FIRST_TRAIN_BUDGET_S when the run has a
    budget (0: like any run)."""
    from tessera.model.train_vqvae import train as train_vqvae

    cache = ModelCache(settings)
    registry = cache.registry(key)
    config = config or folder_config(label_names)
    box_only, rectangles = is_box_only(config), has_rectangles(config)
    base = cache.source(key, config)         # what serves `key` now: the version a new one must beat
    base_name = version_string(base[0], base[2].version) if base else None
    init_from = base[1].path(base[2].version) if base else None
    first_cap = float(getattr(settings, "first_train_budget_s", 0.0) or 0.0)
    first = base is None and bool(val) and iters is None and first_cap > 0
    if first and budget_s > 0:
        budget_s = max(budget_s, first_cap)
    tmp = work_dir(registry)
    timings: dict[str, float] = {}
    try:
        t0 = time.time()
        # a first version while nothing at all is served takes every core: no /predict has a network pass to
        # run. On 2 cores, in the 300 s first run, 2 threads reached 2,358 DSB native box iterations against
        # 1,525 (AP50 0.748 vs 0.722), Pets heads 2,400 in 272 s against 1,683 (0.738 vs 0.700)
        # (bench.regions --budget 300, regions_*_first300_t*.json)
        cfg = train_config(settings, iters, budget_s, box_only=box_only, until_plateau=first,
                           all_cores=first and not cache.store.serves_any(),
                           point_side=samples_point_side(train) if is_point_only(config) else 0.0)
        ckpt = train_vqvae(cfg, train, val, label_names, tmp / "model.pt", init_from=init_from,
                           progress=_model_progress(progress), judged=judged)
        timings["train_s"] = time.time() - t0
        t0 = time.time()
        metrics = _metrics_of(ckpt, val)
        judged_figures = metrics.pop("judged", None)    # the person-made ones' own figures, for judge() alone
        metrics.update({"label_names": label_names, "n_train": len(train), "n_val": len(val),
                        "warm_start": base_name, "val_task_ids": sorted({s.id.split(":", 1)[0] for s in val}),
                        "metric": metric_name(box_only, rectangles, is_point_only(config)),
                        "train_budget_s": budget_s, "train_max_iters": cfg.max_iters, "train_threads": cfg.threads,
                        **(record or {})})
        served = None if base is None else (init_from, base_name)
        promote, why = _decide(settings, key, ckpt, served, val, judged, config, label_names, metrics, progress,
                               judged_figures)
        timings["compare_s"] = time.time() - t0
        phase(progress, "register")
        metrics.update({k: round(v, 2) for k, v in timings.items()})
        info = registry.add(ckpt, metrics, promote=promote, reason=f"{reason}: {why}", kind="label")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    status = "promoted" if promote else "rejected"
    logger.info("project %s: %s %s (%s)", key, status, info.version, why)
    return {"status": status, "version": version_string(key, info.version), "reason": why,
            "decision": metrics.get("decision"), "promoted_at": time.time() if promote else None,
            "missed_classes": metrics.get("missed_classes") or [],
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}


def _decide(settings: Settings, key: str, ckpt: Path, served: tuple[Path, str] | None, val: list[Sample],
            judged: set[str] | None, config: LabelConfig, label_names: list[str], metrics: dict,
            progress: Progress, judged_figures: dict | None = None) -> tuple[bool, str]:
    """Promote the new checkpoint or not, and why. `served`: (path, version name) of what serves the
    project now, None when nothing does; writes the held-back scores into `metrics`."""
    box_only, rectangles = is_box_only(config), has_rectangles(config)
    promote, why = True, "first version"
    if val:
        metrics["mask_iou"] = val_iou(metrics, len(label_names))
        metrics["val_iou"] = metrics["val_score"] = val_score(metrics, len(label_names), box_only, rectangles)
        if served is not None:
            phase(progress, "compare")
            path, name = served
            try:
                served_metrics = _served_metrics_fn(path, config, label_names, settings.device)
                score = lambda samples: val_score(served_metrics(samples), len(label_names),  # noqa: E731
                                                  box_only, rectangles)
                promote, why = judge(ckpt, score, name, val, judged, label_names, settings, metrics, box_only,
                                     rectangles, judged_figures)
                # a lost class blocks promotion, unless the tolerance says "serve any new version" (>= 1)
                lost = lost_classes(metrics, served_metrics(val)) if settings.promote_tolerance < 1 else []
                if lost:
                    promote, why = False, (f"{why}; loses class {', '.join(lost)} (the served version finds "
                                           f"it, this one finds none)")
            except Exception as e:   # an unreadable served version can't be served either: replace it
                logger.exception("project %s: could not evaluate the served %s", key, name)
                promote, why = True, f"served {name} could not be evaluated ({type(e).__name__}: {e})"[:300]
    elif served is not None:
        promote, why = False, "no held-back tasks to compare against the served version"
    if metrics.get("missed_classes"):
        why += f"; finds no object of class {', '.join(metrics['missed_classes'])} on the held-back tasks"
    return promote, why


def judge(ckpt: Path, served: Callable[[list[Sample]], float], served_name: str, val: list[Sample],
          judged: set[str] | None, label_names: list[str], settings: Settings, metrics: dict,
          box_only: bool = False, rectangles: bool = False, judged_figures: dict | None = None) -> tuple[bool, str]:
    """Promote or not, and why; writes what the decision rests on into `metrics`. `served(samples)` is the
    served version's score on samples (as Label Studio shows its predictions: _served_metrics_fn); scores
    are the project's own (val_score: box AP50 for box-only projects).

    The decision rests on the held-back tasks whose annotation a person made or changed: with at least
    MIN_EVIDENCE of them the candidate is served if its score there >= the served version's score -
    TESSERA_PROMOTE_TOLERANCE. With fewer (people accepted most predictions as they were) a comparison
    proves little, and accepted predictions favour the served version by construction; the candidate,
    which learned from annotations the served version has not seen, is then served unless it looks
    broken: it must keep THIN_EVIDENCE_RATIO of the served version's score on all held-back tasks, and
    on the one or two person-made ones (if any) be no more than THIN_TOLERANCE below it."""
    from tessera.model.train_vqvae import evaluate

    n_labels = len(label_names)
    name = "box AP50" if box_only else "val score"
    mine = [s for s in val if judged is None or s.id in judged]
    n_tasks = len({s.id.split(":", 1)[0] for s in val})
    n_judged = len({s.id.split(":", 1)[0] for s in mine})
    metrics.update({"n_val_tasks": n_tasks, "n_val_judged": n_judged})
    if mine:
        if len(mine) == len(val):
            new_j = metrics["val_iou"]
        else:       # train() scored them from its own predictions (judged_figures), else predict them again
            same = judged_figures is not None and judged_figures.get("ids") == sorted(s.id for s in mine)
            new_j = val_score(judged_figures if same else evaluate(ckpt, mine), n_labels, box_only, rectangles)
        old_j = served(mine)
    if n_judged >= MIN_EVIDENCE:
        metrics.update({"val_iou": new_j, "current_val_iou": old_j, "decision": "compared"})
        ok = new_j >= old_j - settings.promote_tolerance
        return ok, (f"{name} {new_j:.4f} vs served {served_name} {old_j:.4f} on the same {n_judged} held-back "
                    f"tasks people made or changed (served if >= served - {settings.promote_tolerance})")
    new, old = metrics["val_iou"], served(val)
    metrics.update({"current_val_iou": old, "decision": "thin evidence"})
    tol = settings.promote_tolerance        # loosens every comparison; >= 1 serves any new version
    ok = new >= THIN_EVIDENCE_RATIO * old - tol
    why = (f"only {n_judged} of {n_tasks} held-back tasks were made or changed by a person ({MIN_EVIDENCE} "
           f"needed to compare): {name} {new:.4f} vs served {served_name} {old:.4f} on all of them (served if "
           f">= {THIN_EVIDENCE_RATIO} x served - {tol}")
    if mine:
        metrics.update({"person_made_val_iou": new_j, "current_person_made_val_iou": old_j})
        ok = ok and new_j >= old_j - max(THIN_TOLERANCE, tol)
        why += (f", and {new_j:.4f} vs {old_j:.4f} on the person-made ones, served if >= served - "
                f"{max(THIN_TOLERANCE, tol)}")
    return ok, why + ")"


def _model_progress(progress: Progress) -> Progress:
    """tessera.model.train_vqvae's progress as a run reports it: "loss" is the pixel loss, the one that is
    comparable over the whole run (the code loss joins later and would make the total jump ~10x; it is
    reported apart as "loss_code"), and the training's own "done" (loss 0.0) is not the run's."""
    def report(info: dict) -> None:
        info = dict(info)
        if info.get("phase") == "done":
            info.update(phase="trained", loss=None)
        if info.get("loss_pix") is not None:
            info["loss"] = info.pop("loss_pix")
        progress(info)
    return report


# ----------------------------------------------------------------------------------- folder datasets

def train_from_folder(settings: Settings, data: Path, project: str | None = None, iters: int | None = None,
                      labels: list[str] | None = None, progress: Progress = noop) -> dict:
    """`tessera train --data DIR`: register into the default model (or project `project`)."""
    kept = SampleStore(Store(settings.model_dir).samples_dir, settings.train_memory_mb * 2**20 or None)
    samples, names = load_folder(data, keep=lambda sample: kept.keep(working_size(sample, settings.max_side)))
    if labels:
        if len(labels) != len(names):
            raise ValueError(f"--labels gives {len(labels)} names, the data set has {len(names)} classes ({names})")
        names = list(labels)
    train_ids, val_ids = split_ids([s.id for s in samples], VAL_FRACTION)
    by_id = {s.id: s for s in samples}
    held = [by_id[i] for i in val_ids]
    return _train_and_register(settings, project or DEFAULT_KEY, [by_id[i] for i in train_ids],
                               evaluated(settings, held, None), names, f"folder {Path(data).name}", iters, progress,
                               record=held_back_record(held))


def evaluated(settings: Settings, held: list[Sample], judged: set[str] | None) -> list[Sample]:
    """The held-back samples this run evaluates (dataset.evaluated_held_back, TESSERA_EVAL_MEGAPIXELS)."""
    val = evaluated_held_back(held, judged, settings.eval_megapixels)
    if len(val) < len(held):
        logger.info("evaluating %d of the %d held-back images (%.0f of %.0f megapixels, TESSERA_EVAL_MEGAPIXELS)",
                    len(val), len(held), sum(s.image.shape[0] * s.image.shape[1] for s in val) / 1e6,
                    sum(s.image.shape[0] * s.image.shape[1] for s in held) / 1e6)
    return val


def held_back_record(held: list[Sample]) -> dict:
    """What a version records of every held-back task, evaluated or not: so that the next runs hold them back
    too (dataset.previous_held_back), and `tessera versions` says how many the figures were taken on."""
    tasks = sorted({s.id.split(":", 1)[0] for s in held})
    return {"val_task_ids": tasks, "n_held_back_tasks": len(tasks)}


# ----------------------------------------------------------------------------- Label Studio projects


def train_project(project_key: str, reason: str, progress: Progress = noop, settings: Settings | None = None,
                  iters: int | None = None, force: bool = False, budget_s: float | None = None) -> dict:
    """The job runner's run function: train project `project_key` from its LS annotations. Without
    `force`, a project whose annotations are those its newest version was trained on is not trained
    again ("nothing new since vN"). A run started from Label Studio is capped at
    TESSERA_TRAIN_BUDGET_S; one given `iters` (the CLI's --iters) trains them all unless `budget_s` is
    given too."""
    settings = settings or Settings.from_env()
    t_start = time.time()
    phase(progress, "fetch")
    registry = Store(settings.model_dir).registry(project_key)
    try:
        client = from_settings(settings)
        config, listed = annotated_tasks(settings, client, project_key)
        fingerprint = data_fingerprint(listed)
        same = None if force else nothing_new(registry, fingerprint)
        if same is not None:
            phase(progress, "done", 1, 1)
            return {"status": "skipped", "n_annotated_tasks": len(listed),
                    "reason": f"nothing new since {version_string(project_key, same.version)} ({same.status}): "
                              f"the same {len(listed)} annotated tasks; annotate or change a task to train again"}
        samples, tasks = load_samples(settings, config, listed, progress)
    except LabelStudioUnavailable as e:
        raise LabelStudioUnavailable(f"{e} (no training for project {project_key}; check LABEL_STUDIO_URL, "
                                     "LABEL_STUDIO_API_KEY and that Label Studio is up)") from e
    names = config.label_names
    n_tasks = len({t["id"] for t in tasks})
    if n_tasks < settings.min_annotations:
        return {"status": "skipped", "reason": f"{n_tasks} annotated tasks; training starts at "
                                                f"{settings.min_annotations} (TESSERA_MIN_ANNOTATIONS)"}
    fetch_s = time.time() - t_start
    train, held, judged = held_back_samples(samples, tasks, config, registry)
    val = evaluated(settings, held, judged)
    if budget_s is None:
        budget_s = run_budget_s(settings) if iters is None else 0.0
    result = _train_and_register(settings, project_key, train, val, names, reason, iters, progress,
                                 budget_s=budget_s, config=config, judged=judged,
                                 record={"data_fingerprint": fingerprint, **held_back_record(held)})
    result["n_annotated_tasks"] = n_tasks
    result["metrics"]["fetch_s"] = round(fetch_s, 2)
    if result["status"] == "promoted":
        after_promotion(settings, client, project_key, config, tasks, samples, result, progress)
    if n_tasks >= settings.gan_min_annotations:
        result["gan"] = gan_part(settings, project_key, samples, names, reason, iters, progress)
    result["run_s"] = round(time.time() - t_start, 2)
    phase(progress, "done", 1, 1)
    return result


