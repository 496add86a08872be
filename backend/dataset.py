"""A Label Studio project as a training set: annotated tasks -> Samples, and which of them are held back.

Reads the project's latest non-cancelled annotations through the LS API, loads their images through
MediaResolver (with a disk cache), builds label maps from brush / polygon / rectangle results (boxes as boxes
for a box-only project) and holds back tasks by a stable hash of the task id; tells a person's annotation from
a Tessera prediction accepted as it was.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from label_studio_sdk.client import LabelStudio

from tessera.backend import lsclient
from tessera.backend.label_config import Control, ImageObject, LabelConfig, parse_label_config, task_images
from tessera.backend.media import MediaError, MediaResolver
from tessera.backend.progress import Progress, noop, phase
from tessera.backend.regions import results_to_boxes, results_to_maps_at, results_to_points
from tessera.backend.predictions import PackedResult, training_annotation, result_of, task_image, wants_boxes
from tessera.backend.settings import Settings
from tessera.backend.store import Store, is_label_version
from tessera.model.data import Sample, split_ids
from tessera.model.metrics import box_iou
from tessera.model.postprocess import box_sample, point_box_size, points_to_boxes
from tessera.model.sample_store import SampleStore
from tessera.model.registry import Registry, VersionInfo

logger = logging.getLogger(__name__)

VAL_FRACTION = 0.2
ECHO_IOU = 0.98              # an annotation this close to a Tessera prediction on its task is that prediction accepted
BOX_SHRINK = 0.6             # box-only projects learn each box's centre region, this share of its size


def is_box_only(config: LabelConfig) -> bool:
    """A project whose only spatial control is RectangleLabels: it learns boxes as boxes. A counting project
    (KeyPointLabels alone) is one too: its points are learned as boxes around them (is_point_only)."""
    types = {c.type for c in config.controls}
    return types == {"rectanglelabels"} or is_point_only(config)


def is_point_only(config: LabelConfig) -> bool:
    """A counting project: KeyPointLabels its only control (label_config: beside other controls keypoints are
    hints). Its points are learned as boxes of one size (postprocess.point_box_size) and predicted as the boxes'
    centres."""
    return {c.type for c in config.controls} == {"keypointlabels"}


def has_rectangles(config: LabelConfig) -> bool:
    """A project with a RectangleLabels control beside brush or polygon controls: its rectangles are the
    boxes of the label model's detection head (TrainConfig.mask_box_head), and its versions are judged on
    them too (training.val_score)."""
    return wants_boxes(config) and not is_box_only(config)


def folder_config(label_names: list[str]) -> LabelConfig:
    """The label config a folder dataset stands for: one control with its class names (which model serves
    it, and how that model's classes map onto them, is then decided as for a Label Studio project)."""
    return LabelConfig(images=(), controls=(Control("brushlabels", "", "", tuple(label_names)),))


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
    judged = {s.id for s in val if person_made(by_id[task_of[s.id]], s, sample_image(s.id, config), index)}
    return train, val, judged


def sample_id(task: dict, img: ImageObject) -> str:
    """`<task id>:<image tag>`, and `@<page>` for a page of a multi-image tag (sample_image reads it back)."""
    return f"{task['id']}:{img.view_id}"


def sample_image(sid: str, config: LabelConfig) -> ImageObject:
    """The image (tag, and page) a sample id names."""
    name, _, page = sid.split(":", 1)[1].partition("@")
    img = next((i for i in config.images if i.name == name), None) or ImageObject(name, name)
    return dataclasses.replace(img, page=int(page)) if page else img


def evaluated_held_back(val: list[Sample], judged: set[str] | None, megapixels: float) -> list[Sample]:
    """The held-back samples a run evaluates at their own size (each version's region cut, its figures and
    the comparison with the served one: a few network passes per image, ~9 s a 2048 px image on 2 cores):
    all of them up to `megapixels` million pixels (0: no cap), past it the ones a person made or changed
    first (what promotion rests on), each group in a stable hash order of the sample id, so the runs of a
    growing project compare on much the same images. The rest stay held back, only not evaluated."""
    if megapixels <= 0 or sum(s.image.shape[0] * s.image.shape[1] for s in val) <= megapixels * 1e6:
        return val
    order = sorted(val, key=lambda s: (judged is not None and s.id not in judged,
                                       hashlib.sha1(s.id.encode()).hexdigest()))
    out, px = [], 0
    for s in order:
        n = s.image.shape[0] * s.image.shape[1]
        if not out or px + n <= megapixels * 1e6:
            out.append(s)
            px += n
    kept = {id(s) for s in out}
    return [s for s in val if id(s) in kept]


def data_fingerprint(tasks: list[dict]) -> str:
    """What a run would train on: each task's training annotation (id and result). Equal fingerprints =
    nothing new to learn from."""
    rows = []
    for task in {str(t["id"]): t for t in tasks}.values():
        ann = training_annotation(task)
        if ann is None:
            continue
        result = ann.get("result")
        digest = result.sha1 if isinstance(result, PackedResult) and result.sha1 else hashlib.sha1(
            json.dumps(result_of(ann), sort_keys=True, default=str).encode()).hexdigest()
        rows.append(f"{task['id']}:{ann.get('id')}:{digest}")
    return hashlib.sha1("\n".join(sorted(rows)).encode()).hexdigest()


def nothing_new(registry: Registry, fingerprint: str) -> VersionInfo | None:
    """The project's newest label version when it was trained on exactly this data (whatever became of
    it: served, kept or rejected), else None."""
    latest = next(iter(registry.versions("label")), None)
    return latest if latest is not None and latest.metrics.get("data_fingerprint") == fingerprint else None


def person_made(task: dict, sample: Sample, img: ImageObject | str, label_index: dict[str, int]) -> bool:
    """Whether a task's training annotation on one image is a person's judgement rather than a Tessera
    label-model prediction accepted as it was. An accepted prediction's label map IS the served model's
    output, so a held-back set of them scores the served model ~1.0 and no candidate could ever win.
    Compared as label maps (boxes, polygons and masks of one object count once), so re-encoded RLE or regions
    re-saved by the editor still match; a box or counting project's sample as its boxes (its label map holds the
    boxes' centres, which a prediction's whole rectangles never equal: an accepted box prediction counted as a
    person's before). Only predictions made before the annotation count (LS's ISO timestamps compare as
    strings)."""
    img = ImageObject(img, img) if isinstance(img, str) else img      # an image tag's name: a one-image tag
    h, w = sample.classes.shape
    size = sample.size or (h, w)            # the original's: predictions' brush RLE counts its pixels
    started = str((training_annotation(task) or {}).get("created_at") or "")
    for pred in task.get("predictions") or []:
        if not is_label_version((pred or {}).get("model_version")):
            continue        # not a label model's output (a GAN layout, an edited image's masks, someone else's)
        if started and str(pred.get("created_at") or "") > started:
            continue        # predicted after the annotation existed (Tessera refines annotations): not its start
        try:
            result = img.regions(result_of(pred) or [])
            if sample.boxes is not None:        # a box or counting project's sample: its boxes, as they were made
                if _same_boxes(sample.boxes, _boxes_like(sample.boxes, result, img.name, h, w, label_index)):
                    return False
                continue
            classes, instances = results_to_maps_at(result, img.name, size, (h, w), label_index)
        except (ValueError, KeyError, TypeError):
            continue
        same = (classes == sample.classes) & (sample.classes > 0)
        either = (classes > 0) | (sample.classes > 0)
        agreement = float(same.sum()) / max(int(either.sum()), 1) if either.any() else 1.0
        if agreement >= ECHO_IOU and len(np.unique(instances)) == len(np.unique(sample.instances)):
            return False
    return True


def _boxes_like(boxes: np.ndarray, result: list, name: str, h: int, w: int, index: dict[str, int]) -> np.ndarray:
    """A prediction's boxes made as a box sample's `boxes` were (load_samples): its rectangles, or its points as
    boxes of the sample's one side where the sample's boxes all have it (a counting project)."""
    points = results_to_points(result, name, h, w, index)
    if not len(points):
        return results_to_boxes(result, name, h, w, index)
    # a sample without a point (someone removed every predicted one) has no side: any side, the counts differ
    return points_to_boxes(points, _point_side_of(boxes) or 1.0)


def _point_side_of(boxes: np.ndarray | None) -> float:
    """The one side of a counting sample's boxes (points_to_boxes), 0 where they have none or several sizes."""
    if boxes is None or not len(boxes):
        return 0.0
    sides = np.concatenate([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
    return float(sides[0]) if np.ptp(sides) < 1e-6 else 0.0


def _same_boxes(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two sets of (x0, y0, x1, y1, class) boxes are the same boxes (each of `a` has one of `b` of its
    class at IoU >= ECHO_IOU, as many of each)."""
    if len(a) != len(b):
        return False
    if not len(a):
        return True
    iou = box_iou(a[:, :4], b[:, :4]) * (a[:, None, 4] == b[None, :, 4])
    return bool((iou.max(1) >= ECHO_IOU).all() and (iou.max(0) >= ECHO_IOU).all())


def working_size(sample: Sample, max_side: int) -> Sample:
    """A sample whose longer side is over `max_side` px, at the size /predict decodes such an image to
    (media.decode_image: TESSERA_MAX_SIDE), maps resampled nearest; others as they are. A model learns its
    scale (model px per image px) from its samples, so samples and the images it predicts on must agree."""
    h, w = sample.image.shape[:2]
    if max(h, w) <= max_side:
        return sample
    import cv2

    f = max_side / max(h, w)
    wh = (max(1, min(max_side, round(w * f))), max(1, min(max_side, round(h * f))))
    boxes = None if sample.boxes is None else sample.boxes * np.array([wh[0] / w, wh[1] / h] * 2 + [1])
    return dataclasses.replace(
        sample, image=cv2.resize(sample.image, wh, interpolation=cv2.INTER_AREA),
        classes=cv2.resize(sample.classes, wh, interpolation=cv2.INTER_NEAREST),
        instances=cv2.resize(sample.instances, wh, interpolation=cv2.INTER_NEAREST), boxes=boxes,
        size=sample.size or (h, w))


def annotated_tasks(settings: Settings, client: LabelStudio, key: str) -> tuple[LabelConfig, list[dict]]:
    """The project's config and its tasks that have a training annotation (synthetic ones left out with
    TESSERA_EXCLUDE_SYNTHETIC)."""
    config = parse_label_config(lsclient.project(client, key).label_config or "")
    tasks = []
    # a page is parsed whole before its tasks are packed (training_view): pages are sized by their bytes
    for task in lsclient.tasks(client, key, only_annotated=True):
        ann = training_annotation(task)
        if ann is None or settings.exclude_synthetic and (task.get("meta") or {}).get("synthetic"):
            continue
        tasks.append(training_view(task, ann))
    return config, tasks


HEAVY_FIELDS = ("annotations", "predictions", "drafts", "annotations_results", "predictions_results")


def light_task(task: dict, annotations: list, predictions: list) -> dict:
    """The task without the annotations, predictions and drafts Label Studio lists with it (HEAVY_FIELDS),
    holding `annotations` and `predictions` instead: what a training run (training_view) or `tessera predict
    --project` (predict_project.predict_view) keeps of a listed task."""
    return {**{k: v for k, v in task.items() if k not in HEAVY_FIELDS},
            "annotations": annotations, "predictions": predictions}


def training_view(task: dict, ann: dict | None = None) -> dict:
    """The task as a training run reads it: its training annotation (training_annotation) and the label-model
    predictions made before it, which it may have started from (person_made; only the one it names as its
    parent_prediction where it names one), without every other annotation, prediction and draft Label
    Studio sends. Each is as large as its regions, and a run holds its tasks from the listing to its end:
    a 2048 px task's brush masks are ~5 MB as Python objects, and a task Tessera predicted on after each of
    five versions holds five sets of brush, polygon and box regions. The results it keeps are packed
    (predictions.PackedResult: ~30x smaller than parsed), unpacked where read (predictions.result_of)."""
    ann = training_annotation(task) if ann is None else ann       # the caller's, where it has it already
    started = str(ann.get("created_at") or "")
    preds = [p for p in task.get("predictions") or []
             if isinstance(p, dict) and is_label_version(p.get("model_version"))
             and not (started and str(p.get("created_at") or "") > started)]
    parent = ann.get("parent_prediction")
    if parent is not None and any(p.get("id") == parent for p in preds):
        preds = [p for p in preds if p.get("id") == parent]
    return light_task(task, [{**ann, "result": PackedResult(ann["result"])}],
                      [{**p, "result": PackedResult(p.get("result") or [], digest=False)} for p in preds])


def project_samples(settings: Settings, client: LabelStudio, key: str, progress: Progress = noop
                    ) -> tuple[list[Sample], list[str], LabelConfig, list[dict]]:
    """The project's annotated tasks -> Samples (one per task and image tag), its label names, its config
    and the tasks used. Raises LabelStudioUnavailable when LS can't be read, and RuntimeError when not one
    image of the annotated tasks could be loaded (a broken media setup must not look like "no data")."""
    config, tasks = annotated_tasks(settings, client, key)
    samples, used = load_samples(settings, config, tasks, progress)
    return samples, config.label_names, config, used


def load_samples(settings: Settings, config: LabelConfig, tasks: list[dict], progress: Progress = noop
                 ) -> tuple[list[Sample], list[dict]]:
    """Annotated tasks -> (Samples, the task of each sample): images fetched concurrently (disk cache), each
    made into its sample as it arrives, at most a few fetches ahead (decoded images do not pile up), and past
    TESSERA_TRAIN_MEMORY_MB kept in memory-mapped scratch files (model.sample_store)."""
    index = {n: i + 1 for i, n in enumerate(config.label_names)}
    store = Store(settings.model_dir)
    media = MediaResolver(settings, cache_dir=store.media_cache_dir)
    kept = SampleStore(store.samples_dir, settings.train_memory_mb * 2**20 or None)
    jobs = [(task, img) for task in tasks for img in task_images(task, config)]
    box_only = is_box_only(config)
    side = point_side(tasks, config, settings.max_side) if is_point_only(config) else 0.0

    def load(job: tuple[dict, ImageObject]) -> tuple[np.ndarray, tuple[int, int]] | MediaError:
        return task_image(*job, media, working=True)    # as /predict sees it: at most TESSERA_MAX_SIDE px

    def sample(task: dict, img: ImageObject, image: np.ndarray, size: tuple[int, int]) -> Sample:
        h, w = image.shape[:2]
        sid, synthetic = sample_id(task, img), bool((task.get("meta") or {}).get("synthetic"))
        size = None if tuple(size) == (h, w) else tuple(size)
        result = img.regions(result_of(training_annotation(task)))        # a multi-image tag: this page's
        if side:        # a counting project: each point as a box of one size
            boxes = points_to_boxes(results_to_points(result, img.name, h, w, index), side)
            return dataclasses.replace(box_sample(image, boxes, BOX_SHRINK, sid, synthetic), size=size)
        if box_only:    # boxes as boxes: overlapping boxes all kept (not the label-map de-duplication)
            boxes = results_to_boxes(result, img.name, h, w, index)   # percentages
            return dataclasses.replace(box_sample(image, boxes, BOX_SHRINK, sid, synthetic), size=size)
        classes, instances = results_to_maps_at(result, img.name, size or (h, w), (h, w), index)
        return Sample(image=image, classes=classes, instances=instances, id=sid, synthetic=synthetic, size=size)

    samples, used, failed = [], [], []
    step = max(1, len(jobs) // 10)
    threads = max(1, min(settings.fetch_threads, len(jobs) or 1))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for n, ((task, img), loaded) in enumerate(zip(jobs, bounded_map(pool, load, jobs, 2 * threads)), 1):
            if n % step == 0 or n == len(jobs):
                phase(progress, "fetch", n, len(jobs))
            if isinstance(loaded, MediaError):
                failed.append((task, loaded))
                continue
            try:
                samples.append(kept.keep(sample(task, img, *loaded)))
            except (ValueError, KeyError, TypeError) as e:
                logger.warning("task %s: annotation not usable: %s", task.get("id"), e)
                continue
            used.append(task)
    for task, e in failed[:5]:
        logger.warning("task %s: skipped for training: %s", task.get("id"), e)
    if jobs and len(failed) == len(jobs):
        raise RuntimeError(f"none of the {len(jobs)} images of {len(tasks)} annotated tasks could be loaded; "
                           f"first error: {failed[0][1]}")
    if kept.n_mapped:
        logger.info("training samples: %s (TESSERA_TRAIN_MEMORY_MB %d)", kept.summary(), settings.train_memory_mb)
    return samples, used


def point_side(tasks: list[dict], config: LabelConfig, max_side: int) -> float:
    """The box side (px of the working images, at most `max_side` px a side) a counting project's points are
    learned as: postprocess.point_box_size over its annotations' points, placed by the image size Label Studio
    writes in each region (original_width / original_height), before any image is fetched."""
    index = {n: i + 1 for i, n in enumerate(config.label_names)}
    found = []
    for task in tasks:
        for img in task_images(task, config):
            result = img.regions(result_of(training_annotation(task) or {}) or [])
            sized = next((r for r in result if isinstance(r, dict) and r.get("original_width")), None)
            try:
                w, h = int(sized["original_width"]), int(sized["original_height"])
                f = min(1.0, max_side / max(w, h, 1))
                found.append(results_to_points(result, img.name, h * f, w * f, index))
            except (TypeError, KeyError, ValueError):
                continue        # no size written, or a malformed region: read (or refused) with its image
    return point_box_size(found)


def samples_point_side(samples: list[Sample]) -> float:
    """The side a counting project's samples' points were learned as (point_side): their boxes' (0: none)."""
    return next((side for s in samples if (side := _point_side_of(s.boxes))), 0.0)


def bounded_map(pool: ThreadPoolExecutor, fn, items: list, ahead: int):
    """pool.map(fn, items) that runs at most `ahead` calls ahead of the consumer (Executor.map submits them
    all at once, so its results pile up in memory when the consumer is the slower side)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
