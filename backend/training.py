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
import hashlib
import json
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
from backend.regions import results_to_boxes, results_to_maps
from backend.service import ModelCache, label_mapping, latest_annotation, task_image
from backend.settings import Settings
from backend.store import DEFAULT_KEY, Store, is_label_version, version_string
from model.data import Sample, load_folder, split_ids
from model.postprocess import box_sample
from model.registry import Registry, VersionInfo

logger = logging.getLogger(__name__)

Progress = Callable[[dict], None]
VAL_FRACTION = 0.2
GAN_RETRAIN_GROWTH = 0.2     # the GAN retrains when a project's annotated images grew by this share
GAN_PROGRESS_EVERY = 20      # iterations between the GAN's progress steps (status + one log line each)
MIN_EVIDENCE = 3             # held-back tasks a person made or changed that a comparison with the served version needs
THIN_EVIDENCE_RATIO = 0.5    # with fewer: the candidate must keep this share of the served score on all held-back tasks
THIN_TOLERANCE = 0.05        # ... and on the one or two person-made ones be at most this much below the served one
ECHO_IOU = 0.98              # an annotation this close to a Tessera prediction on its task is that prediction accepted
BOX_SHRINK = 0.6             # box-only projects learn each box's centre region, this share of its size
CLASS_RECALL_FLOOR = 0.0     # a class whose held-back recall falls to this (from > 0) blocks promotion
FIRST_RUN_ITERS_FACTOR = 4   # a project's first version may train this many times TESSERA_TRAIN_ITERS ...
PLATEAU_EVALS = 2            # ... but stops when this many evaluations in a row did not improve it


def _noop(info: dict) -> None:
    pass


def _phase(progress: Progress, phase: str, done: int = 0, total: int = 0) -> None:
    progress({"phase": phase, "iter": done, "max_iters": total, "loss": None, "eta_s": None})


def train_config(settings: Settings, iters: int | None = None, budget_s: float = 0.0, box_only: bool = False,
                 until_plateau: bool = False):
    """The TrainConfig of a run: TESSERA_TRAIN_ITERS (or `iters`) iterations, stopped after `budget_s`
    seconds when > 0 (the lr schedule then follows the clock), on half the CPU cores: the other half
    keeps answering /predict, and two torch threads fighting for two busy cores ran ~7x slower than one
    here (bench/learning_latency.py). A box-only project learns box centres (BOX_SHRINK); the region cut
    aims at TESSERA_PRECISION_TARGET. `until_plateau` (a project's first version): up to
    FIRST_RUN_ITERS_FACTOR x the iterations, stopping PLATEAU_EVALS evaluations after the held-back
    score last improved."""
    from model.train_vqvae import TrainConfig

    n = iters or settings.train_iters
    if until_plateau:
        n *= FIRST_RUN_ITERS_FACTOR
    threads = int(getattr(settings, "train_threads", 0) or 0) or max(1, (os.cpu_count() or 2) // 2)
    return TrainConfig(max_iters=n, device=settings.device,
                       eval_interval=max(50, (n // FIRST_RUN_ITERS_FACTOR if until_plateau else n) // 4),
                       time_budget_s=budget_s, threads=threads, box_shrink=BOX_SHRINK if box_only else 1.0,
                       precision_target=float(getattr(settings, "precision_target", 0.0) or 0.0),
                       patience=PLATEAU_EVALS if until_plateau else 0)


def run_budget_s(settings: Settings) -> float:
    """Wall-clock cap of one LS-started run's training: a new annotation is served within ~2 minutes on
    2 cores, and as runs warm-start from the served version, training adds up over runs."""
    return settings.train_budget_s


def gan_config(settings: Settings, iters: int | None = None):
    """The GANTrainConfig of a run's GAN part: as many iterations as the label model gets, at most
    TESSERA_GAN_BUDGET_S seconds (on 2 CPU cores a GAN iteration costs several label-model iterations)."""
    from model.train_maskgan import GANTrainConfig

    return GANTrainConfig(max_iters=iters or settings.train_iters, time_budget_s=settings.gan_budget_s,
                          device=settings.device)


def val_score(metrics: dict, n_labels: int, box_only: bool = False) -> float:
    """The number promotion compares, the project's own measure: box AP50 (mean over classes) for a
    box-only project; for masks the mean of mask IoU (foreground IoU for one label, mean IoU for several)
    and instance F1 after the region cut. Metrics of versions made before these existed fall back to IoU."""
    iou = val_iou(metrics, n_labels)
    if box_only:
        return float(metrics.get("box_ap50", iou))
    f1 = metrics.get("instance_f1")
    return iou if f1 is None else 0.5 * (iou + float(f1))


def val_iou(metrics: dict, n_labels: int) -> float:
    """Mask IoU on the held-back tasks: foreground IoU for one label, mean IoU for several."""
    return float(metrics["miou"] if n_labels > 1 else metrics["fg_iou"])


def lost_classes(new: dict, old: dict) -> list[str]:
    """Classes the served version finds on the held-back tasks (recall > 0) and the new one does not at
    all: such a version is not promoted, whatever its mean."""
    old_r, new_r = old.get("class_recall") or {}, new.get("class_recall") or {}
    return [c for c, r in old_r.items() if r and r > 0 and float(new_r.get(c, 0.0) or 0.0) <= CLASS_RECALL_FLOOR]


def is_box_only(config: LabelConfig) -> bool:
    """A project whose only spatial control is RectangleLabels: it learns boxes as boxes."""
    types = {c.type for c in config.controls}
    return types == {"rectanglelabels"}


def split_tasks(task_ids: list[str], previous: set[str] | frozenset[str] = frozenset()) -> tuple[list[str], list[str]]:
    """(train, held-back) task ids. A task is held back when a stable hash of its id says so
    (model.data.split_ids) or when an earlier version of the project held it back (`previous`): once
    held back, always held back, so a growing project never trains on a task it validated on before.
    (split_ids alone is not enough: with no id under the hash threshold it holds back the smallest-hash
    id, which leaves the held-back set as soon as the project grows one that is.)"""
    ids = [str(t) for t in task_ids]
    held = {t for t in ids if split_ids([t], VAL_FRACTION)[1]} | (set(previous) & set(ids))   # one id: hash only
    if not held:                           # the smallest hash; recorded in the version, so kept from then on
        held = set(split_ids(ids, VAL_FRACTION)[1])
    return [t for t in ids if t not in held], [t for t in ids if t in held]


def previous_held_back(registry: Registry) -> set[str]:
    """Task ids any stored label version of the project held back (each records its `val_task_ids`)."""
    out: set[str] = set()
    for v in registry.versions("label"):
        out.update(str(t) for t in v.metrics.get("val_task_ids") or [])
    return out


def data_fingerprint(tasks: list[dict]) -> str:
    """What a run would train on: each task's training annotation (id and result). Equal fingerprints =
    nothing new to learn from."""
    rows = []
    for task in {str(t["id"]): t for t in tasks}.values():
        ann = latest_annotation(task)
        if ann is None:
            continue
        body = json.dumps(ann.get("result"), sort_keys=True, default=str).encode()
        rows.append(f"{task['id']}:{ann.get('id')}:{hashlib.sha1(body).hexdigest()}")
    return hashlib.sha1("\n".join(sorted(rows)).encode()).hexdigest()


def nothing_new(registry: Registry, fingerprint: str) -> VersionInfo | None:
    """The project's newest label version when it was trained on exactly this data (whatever became of
    it: served, kept or rejected), else None."""
    latest = next(iter(registry.versions("label")), None)
    return latest if latest is not None and latest.metrics.get("data_fingerprint") == fingerprint else None


def person_made(task: dict, sample: Sample, image_name: str, label_index: dict[str, int]) -> bool:
    """Whether a task's training annotation on one image is a person's judgement rather than a Tessera
    label-model prediction accepted as it was. An accepted prediction's label map IS the served model's
    output, so a held-back set of them scores the served model ~1.0 and no candidate could ever win.
    Compared as label maps (boxes, polygons and masks of one object count once), so re-encoded RLE or
    regions re-saved by the editor still match; only predictions made before the annotation count (LS's
    ISO timestamps compare as strings)."""
    h, w = sample.classes.shape
    started = str((latest_annotation(task) or {}).get("created_at") or "")
    for pred in task.get("predictions") or []:
        if not is_label_version((pred or {}).get("model_version")):
            continue        # not a label model's output (a GAN layout, an edited image's masks, someone else's)
        if started and str(pred.get("created_at") or "") > started:
            continue        # predicted after the annotation existed (Tessera refines annotations): not its start
        try:
            classes, instances = results_to_maps(pred.get("result") or [], image_name, h, w, label_index)
        except (ValueError, KeyError, TypeError):
            continue
        same = (classes == sample.classes) & (sample.classes > 0)
        either = (classes > 0) | (sample.classes > 0)
        agreement = float(same.sum()) / max(int(either.sum()), 1) if either.any() else 1.0
        if agreement >= ECHO_IOU and len(np.unique(instances)) == len(np.unique(sample.instances)):
            return False
    return True


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
        self.predictor, self.n_classes, self.label_names = predictor, len(label_names), list(label_names)
        index = {n: i + 1 for i, n in enumerate(label_names)}
        self.lut = np.zeros(len(predictor.label_names) + 1, np.int32)     # model class -> project class
        for control in reversed(config.controls):                          # the first control decides
            for c, label in label_mapping(control, predictor.label_names).items():
                self.lut[c] = index.get(label, 0)

    def predict(self, images: list[np.ndarray]) -> list:
        out = []
        for p in self.predictor.predict(images):       # with the served version's own region cut
            classes = self.lut[p.classes]
            label = {k: int(self.lut[c]) for k, c in p.instance_label.items() if self.lut[c] > 0}
            boxes = getattr(p, "boxes", None)
            out.append(dataclasses.replace(
                p, classes=classes, instances=np.where(classes > 0, p.instances, 0), instance_label=label,
                instance_score={k: v for k, v in p.instance_score.items() if k in label},
                **({} if boxes is None else {"boxes": {k: v for k, v in boxes.items() if k in label}})))
        return out


def _served_metrics_fn(path: Path, config: LabelConfig, label_names: list[str], device: str
                       ) -> Callable[[list[Sample]], dict]:
    """samples -> the served version's held-back metrics on them, counting what Label Studio shows of it
    (each sample set evaluated once)."""
    from model.inference import Predictor
    from model.train_vqvae import evaluate

    served, done = _AsServed(Predictor.from_checkpoint(path, device=device), config, label_names), {}

    def metrics_on(samples: list[Sample]) -> dict:
        key = tuple(s.id for s in samples)
        if key not in done:
            done[key] = evaluate(served, samples)
        return done[key]
    return metrics_on


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
                        budget_s: float = 0.0, config: LabelConfig | None = None, judged: set[str] | None = None,
                        record: dict | None = None) -> dict:
    """Train a label version on `train`, compare it with the served one on `val`, register it.
    `config` is the project's label config (None: a folder dataset labelled `label_names`); `judged`:
    ids of the held-back samples whose labels a person made or changed (None: all of them); `record`:
    extra values stored in the version's metrics. A box-only
    config is judged by box AP50. A project's first version (nothing served to warm-start from) trains
    until its held-back score stops improving, within TESSERA_FIRST_TRAIN_BUDGET_S when the run has a
    budget (0: like any run)."""
    from model.train_vqvae import train as train_vqvae

    cache = ModelCache(settings)
    registry = cache.registry(key)
    config = config or folder_config(label_names)
    box_only = is_box_only(config)
    base = cache.source(key, config)         # what serves `key` now: the version a new one must beat
    base_name = version_string(base[0], base[2].version) if base else None
    init_from = base[1].path(base[2].version) if base else None
    first_cap = float(getattr(settings, "first_train_budget_s", 0.0) or 0.0)
    first = base is None and bool(val) and iters is None and first_cap > 0
    if first and budget_s > 0:
        budget_s = max(budget_s, first_cap)
    tmp = _work_dir(registry)
    timings: dict[str, float] = {}
    try:
        t0 = time.time()
        cfg = train_config(settings, iters, budget_s, box_only=box_only, until_plateau=first)
        ckpt = train_vqvae(cfg, train, val, label_names, tmp / "model.pt", init_from=init_from,
                           progress=_model_progress(progress))
        timings["train_s"] = time.time() - t0
        t0 = time.time()
        metrics = _metrics_of(ckpt, val)
        metrics.update({"label_names": label_names, "n_train": len(train), "n_val": len(val),
                        "warm_start": base_name, "val_task_ids": sorted({s.id.split(":", 1)[0] for s in val}),
                        "metric": "box AP50" if box_only else "(mask IoU + instance F1) / 2",
                        "train_budget_s": budget_s, "train_max_iters": cfg.max_iters, **(record or {})})
        promote, why = True, "first version"
        if val:
            metrics["mask_iou"] = val_iou(metrics, len(label_names))
            metrics["val_iou"] = metrics["val_score"] = val_score(metrics, len(label_names), box_only)
            if base is not None:
                _phase(progress, "compare")
                try:
                    served_metrics = _served_metrics_fn(init_from, config, label_names, settings.device)
                    served = lambda samples: val_score(served_metrics(samples), len(label_names),  # noqa: E731
                                                       box_only)
                    promote, why = judge(ckpt, served, base_name, val, judged, label_names, settings, metrics,
                                         box_only)
                    # a lost class blocks promotion, unless the tolerance says "serve any new version" (>= 1)
                    lost = lost_classes(metrics, served_metrics(val)) if settings.promote_tolerance < 1 else []
                    if lost:
                        promote, why = False, (f"{why}; loses class {', '.join(lost)} (the served version finds "
                                               f"it, this one finds none)")
                except Exception as e:   # an unreadable served version can't be served either: replace it
                    logger.exception("project %s: could not evaluate the served %s", key, base_name)
                    promote, why = True, f"served {base_name} could not be evaluated ({type(e).__name__}: {e})"[:300]
        elif base is not None:
            promote, why = False, "no held-back tasks to compare against the served version"
        if metrics.get("missed_classes"):
            why += f"; finds no object of class {', '.join(metrics['missed_classes'])} on the held-back tasks"
        timings["compare_s"] = time.time() - t0
        _phase(progress, "register")
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


def judge(ckpt: Path, served: Callable[[list[Sample]], float], served_name: str, val: list[Sample],
          judged: set[str] | None, label_names: list[str], settings: Settings, metrics: dict,
          box_only: bool = False) -> tuple[bool, str]:
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
    from model.train_vqvae import evaluate

    n_labels = len(label_names)
    name = "box AP50" if box_only else "val score"
    mine = [s for s in val if judged is None or s.id in judged]
    n_tasks = len({s.id.split(":", 1)[0] for s in val})
    n_judged = len({s.id.split(":", 1)[0] for s in mine})
    metrics.update({"n_val_tasks": n_tasks, "n_val_judged": n_judged})
    if mine:
        new_j = metrics["val_iou"] if len(mine) == len(val) else val_score(evaluate(ckpt, mine), n_labels, box_only)
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
    """model.train_vqvae's progress as a run reports it: "loss" is the pixel loss, the one that is
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


def train_gan(settings: Settings, key: str, samples: list[Sample], label_names: list[str], reason: str,
              iters: int | None, progress: Progress) -> dict:
    """Train the mask GAN on the project's real samples and register it as kind "gan" (promoted when the
    run ends with finite losses: there is no held-back score for a generator yet). Warm-starts from the
    current GAN when its config still fits."""
    from model import train_maskgan

    real = [s for s in samples if not s.synthetic]       # a GAN must not learn from its own output
    if not real:
        return {"status": "skipped", "reason": "no annotated real (non-synthetic) images"}
    registry = Store(settings.model_dir).registry(key)
    cur = registry.current("gan")
    init_from = registry.path(cur.version) if cur is not None else None
    tmp = _work_dir(registry)

    def gan_progress(info: dict) -> None:
        if info.get("phase") == "train":           # train_maskgan reports every iteration: pass on every 20th
            if info.get("iter", 0) % GAN_PROGRESS_EVERY and info.get("iter") != 1:
                return
            progress({**info, "phase": "gan"})
        else:                                        # e.g. "done" with loss 0.0: not a loss
            progress({**info, "phase": f"gan-{info.get('phase')}", "loss": None})

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
    return {"status": "promoted", "version": version_string(key, info.version, "gan"), "metrics": metrics}


def _gan_up_to_date(settings: Settings, key: str, samples: list[Sample]) -> str:
    """'' if the GAN should train in this run, else why not: it retrains once the real annotated images
    grew by GAN_RETRAIN_GROWTH (at least 5) since its current version, so that a run for a new annotation
    is not held up by the GAN every time."""
    cur = Store(settings.model_dir).registry(key).current("gan")
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

def annotated_tasks(settings: Settings, client: LSClient, key: str) -> tuple[LabelConfig, list[dict]]:
    """The project's config and its tasks that have a training annotation (synthetic ones left out with
    TESSERA_EXCLUDE_SYNTHETIC)."""
    project = client.project(key)
    config = parse_label_config(project.get("label_config") or "")
    tasks = []
    for task in client.tasks(key, only_annotated=True):
        if latest_annotation(task) is None:
            continue
        if settings.exclude_synthetic and (task.get("meta") or {}).get("synthetic"):
            continue
        tasks.append(task)
    return config, tasks


def project_samples(settings: Settings, client: LSClient, key: str, progress: Progress = _noop
                    ) -> tuple[list[Sample], list[str], LabelConfig, list[dict]]:
    """The project's annotated tasks -> Samples (one per task and image tag), its label names, its config
    and the tasks used. Raises LabelStudioUnavailable when LS can't be read, and RuntimeError when not one
    image of the annotated tasks could be loaded (a broken media setup must not look like "no data")."""
    config, tasks = annotated_tasks(settings, client, key)
    samples, used = load_samples(settings, config, tasks, progress)
    return samples, config.label_names, config, used


def load_samples(settings: Settings, config: LabelConfig, tasks: list[dict], progress: Progress = _noop
                 ) -> tuple[list[Sample], list[dict]]:
    """Annotated tasks -> (Samples, the task of each sample): images fetched concurrently (disk cache)."""
    index = {n: i + 1 for i, n in enumerate(config.label_names)}
    media = MediaResolver(settings, cache_dir=Store(settings.model_dir).media_cache_dir)
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
    box_only = is_box_only(config)
    for (task, img), image in zip(jobs, images):
        if isinstance(image, MediaError):
            continue
        h, w = image.shape[:2]
        meta = task.get("meta") or {}
        sid, synthetic = f"{task['id']}:{img.name}", bool(meta.get("synthetic"))
        try:
            if box_only:    # boxes as boxes: overlapping boxes all kept (not the label-map de-duplication)
                boxes = results_to_boxes(latest_annotation(task)["result"], img.name, h, w, index)
                samples.append(box_sample(image, boxes, BOX_SHRINK, sid, synthetic))
            else:
                classes, instances = results_to_maps(latest_annotation(task)["result"], img.name, h, w, index)
                samples.append(Sample(image=image, classes=classes, instances=instances, id=sid, synthetic=synthetic))
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("task %s: annotation not usable: %s", task.get("id"), e)
            continue
        used.append(task)
    return samples, used


def train_project(project_key: str, reason: str, progress: Progress = _noop, settings: Settings | None = None,
                  iters: int | None = None, force: bool = False, budget_s: float | None = None) -> dict:
    """The job runner's run function: train project `project_key` from its LS annotations. Without
    `force`, a project whose annotations are those its newest version was trained on is not trained
    again ("nothing new since vN"). A run started from Label Studio is capped at
    TESSERA_TRAIN_BUDGET_S; one given `iters` (the CLI's --iters) trains them all unless `budget_s` is
    given too."""
    settings = settings or Settings.from_env()
    t_start = time.time()
    _phase(progress, "fetch")
    registry = Store(settings.model_dir).registry(project_key)
    try:
        client = LSClient(settings)
        config, listed = annotated_tasks(settings, client, project_key)
        fingerprint = data_fingerprint(listed)
        same = None if force else nothing_new(registry, fingerprint)
        if same is not None:
            _phase(progress, "done", 1, 1)
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
    train, val, judged = held_back_samples(samples, tasks, config, registry)
    if budget_s is None:
        budget_s = run_budget_s(settings) if iters is None else 0.0
    result = _train_and_register(settings, project_key, train, val, names, reason, iters, progress,
                                 budget_s=budget_s, config=config, judged=judged,
                                 record={"data_fingerprint": fingerprint})
    result["n_annotated_tasks"] = n_tasks
    result["metrics"]["fetch_s"] = round(fetch_s, 2)
    if result["status"] == "promoted":
        _after_promotion(settings, client, project_key, config, tasks, samples, result, progress)
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


def held_back_samples(samples: list[Sample], tasks: list[dict], config: LabelConfig, registry: Registry
                      ) -> tuple[list[Sample], list[Sample], set[str]]:
    """(train, held-back, ids of the held-back samples a person made or changed). Split by task id, so
    all images of a task land on the same side, and stable as the project grows (split_tasks)."""
    task_of = {s.id: s.id.split(":", 1)[0] for s in samples}
    _, val_ids = split_tasks(sorted(set(task_of.values()), key=int), previous_held_back(registry))
    held = set(val_ids)
    train = [s for s in samples if task_of[s.id] not in held]
    val = [s for s in samples if task_of[s.id] in held]
    by_id = {str(t["id"]): t for t in tasks}
    index = {n: i + 1 for i, n in enumerate(config.label_names)}
    judged = {s.id for s in val if person_made(by_id[task_of[s.id]], s, s.id.split(":", 1)[1], index)}
    return train, val, judged


def _after_promotion(settings: Settings, client: LSClient, key: str, config: LabelConfig, tasks: list[dict],
                     samples: list[Sample], result: dict, progress: Progress) -> None:
    """Name the LS connection after the new version (so "Prediction score" sorts by its predictions) and
    score the annotations for mislabeling; the new version is served either way."""
    try:
        client.follow_version(key, result["version"])
    except Exception as e:
        logger.warning("project %s: could not rename the Label Studio connection to %s: %s", key,
                       result["version"], e)
    _phase(progress, "mislabeling")
    try:
        result["mislabeling_written"] = write_mislabeling(settings, client, key, config, tasks, samples)
    except Exception as e:
        logger.warning("project %s: could not write mislabeling scores: %s", key, e)


def write_mislabeling(settings: Settings, client: LSClient, key: str, config: LabelConfig, tasks: list[dict],
                      samples: list[Sample], budget_s: float | None = None) -> int:
    """Score annotated tasks' latest annotations under the served model and store the score on the task as
    `meta.tessera_mislabeling` (with TESSERA_MISLABELING_COLUMN also as the data column
    `tessera_mislabeling`, sortable and filterable in the Data Manager of LS Community, but then part of
    the user's data and exports); returns how many tasks were written.

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
    end = time.monotonic() + (settings.mislabeling_budget_s if budget_s is None else budget_s)
    written = 0
    for task in todo:
        if time.monotonic() > end:
            logger.info("project %s: mislabeling scores written for %d tasks; %d left for later runs",
                        key, written, len(todo) - written)
            break
        tid = str(task["id"])
        value = round(max(float(served.predictor.check(s.image, s.classes, s.instances)[1])
                          for s in by_task[tid]), 4)
        meta = dict(task.get("meta") or {})
        meta.update({"tessera_mislabeling": value, "tessera_model_version": served.version})
        body: dict = {"meta": meta}
        if settings.mislabeling_column:          # opt-in: a sortable Data Manager column, part of the user's data
            body["data"] = {**(task.get("data") or {}), "tessera_mislabeling": value}
        client.request("PATCH", f"/api/tasks/{int(tid)}/", json=body)
        written += 1
    return written
