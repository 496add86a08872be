"""Predictions for Label Studio tasks: model cache per process, concurrent media, batched inference.

LS JSON goes in, LS JSON comes out; `model/` sees only numpy images and returns `Prediction`s.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

import ujson

from tessera.backend.label_config import (BOX_CONTROLS, PIXEL_CONTROLS, POINT_CONTROLS, Control, ImageObject,
                                          LabelConfig, task_images)
from tessera.backend.media import MediaError, MediaResolver
from tessera.backend.regions import (PRECISION, boxes_to_results, instances_to_results, labelled, region_to_mask,
                                     region_value, result_label, results_to_boxes, results_to_maps_at)
from tessera.backend.settings import Settings
from tessera.backend.store import DEFAULT_KEY, UNTRAINED, Store, store_key, version_string
from tessera.model.postprocess import box_sample, object_slices
from tessera.model.registry import Registry, VersionInfo

logger = logging.getLogger(__name__)


class PredictorLike(Protocol):
    """What the backend needs of model.inference.Predictor (tests use a small stand-in)."""
    label_names: list[str]

    def predict(self, images: list[np.ndarray]) -> list[Any]: ...
    def refine(self, image: np.ndarray, hint: np.ndarray | None, positive: list, negative: list,
               label: int) -> tuple[np.ndarray, float]: ...
    def review(self, image: np.ndarray, classes: np.ndarray, instances: np.ndarray, boxes: np.ndarray | None = None
               ) -> tuple[Any, float]: ...


@dataclass
class Served:
    """The model that serves a project right now."""
    version: str                       # model_version string predictions carry
    predictor: PredictorLike | None


class ModelCache:
    """Per-process cache of loaded predictors, keyed by registry and version; reloads on promotion."""

    def __init__(self, settings: Settings, loader=None):
        self.settings = settings
        self._loader = loader or (lambda path, device: _load_predictor(path, device, settings))
        self._lock = threading.Lock()
        self._loaded: dict[str, tuple[str, PredictorLike]] = {}    # registry key -> (version, predictor)
        self.store = Store(settings.model_dir)

    def registry(self, key: str) -> Registry:
        """self.store.registry(key), for callers that hold a cache."""
        return self.store.registry(key)

    def source(self, key: str, config: LabelConfig | None, kind: str = "label"
               ) -> tuple[str, Registry, VersionInfo] | None:
        """(registry key, registry, version) of the model of `kind` that serves project `key`: its own
        current version, else the default model's when its label names fit the project's config (None:
        any). Serving, training (the version a new one must beat) and synthetic tasks all ask this."""
        key = store_key(key)
        own = self.store.registry(key)
        cur = own.current(kind)
        if cur is not None:
            return key, own, cur
        default = self.store.registry(DEFAULT_KEY)
        cur = default.current(kind)
        if cur is not None and (config is None or _labels_fit(cur.metrics.get("label_names"), config)):
            return DEFAULT_KEY, default, cur
        return None

    def version(self, key: str, config: LabelConfig | None = None) -> str:
        """The model_version string for /setup: cheap (reads one small JSON file)."""
        src = self.source(key, config)
        return UNTRAINED if src is None else version_string(src[0], src[2].version)

    def served(self, key: str, config: LabelConfig | None = None) -> Served:
        src = self.source(key, config)
        if src is None:
            return Served(UNTRAINED, None)
        reg_key, reg, info = src
        version = version_string(reg_key, info.version)
        with self._lock:
            hit = self._loaded.get(reg_key)
            if hit is None or hit[0] != version:
                logger.info("loading %s from %s", version, reg.path(info.version))
                predictor = self._loader(reg.path(info.version), self.settings.device)
                self._loaded[reg_key] = (version, predictor)
                hit = self._loaded[reg_key]
        return Served(version, hit[1])


def _labels_fit(model_labels: list[str] | None, config: LabelConfig) -> bool:
    if not model_labels:
        return False
    return any(label_mapping(c, model_labels) for c in config.controls)


def _load_predictor(path: Path, device: str, settings: Settings | None = None) -> PredictorLike:
    """The version's predictor with its learned region cut, re-chosen for TESSERA_PRECISION_TARGET and
    with TESSERA_MIN_REGION_SCORE replacing its score threshold when those are set; TESSERA_SORT=score
    drops the labelled images' embeddings, so that task scores are the plain confidence;
    TESSERA_FOLLOW_EDGES=false leaves masks as the network's grid has them."""
    from tessera.model.inference import Predictor     # imported late: torch start-up stays off the /health path

    if settings is None:
        return Predictor.from_checkpoint(path, device=device, trace=True)
    predictor = Predictor.from_checkpoint(path, device=device, precision_target=settings.precision_target,
                                          min_score=settings.min_region_score, trace=True)
    if settings.sort == "score":
        predictor.reference = None
    predictor.follow_edges = predictor.follow_edges and settings.follow_edges
    return predictor


def label_mapping(control: Control, model_labels: list[str]) -> dict[int, str]:
    """Model class index (1..C) -> the control's label value, matched by name (case-insensitive);
    a one-class model and a one-label control are matched whatever their names."""
    by_name = {label.lower(): label for label in control.labels}
    out = {c + 1: by_name[n.lower()] for c, n in enumerate(model_labels) if n.lower() in by_name}
    if not out and len(model_labels) == 1 and len(control.labels) == 1:
        out = {1: control.labels[0]}
    return out


# -------------------------------------------------------------------------------------------- predict

def _empty(version: str, reason: str = "") -> dict:
    item = {"result": [], "score": 0.0, "model_version": version}
    if reason:
        logger.info("empty prediction: %s", reason)
    return item


def prediction_to_results(pred: Any, config: LabelConfig, image_name: str, model_labels: list[str],
                          id_prefix: str = "") -> list[dict]:
    """A model Prediction for one image -> LS results for every control on that image."""
    out, slices = [], None
    for control in config.controls:
        if control.to_name != image_name:
            continue
        start = id_prefix + config.id_prefix(control)       # what its regions' ids start with
        mapping = label_mapping(control, model_labels)
        labels = {k: mapping[c] for k, c in pred.instance_label.items() if c in mapping}
        boxes, head = getattr(pred, "boxes", None), getattr(pred, "head", None)
        if head is not None and control.type in BOX_CONTROLS:           # a mask model's detection head
            head_labels = {k: mapping[c] for k, c in head.instance_label.items() if c in mapping}
            out += boxes_to_results(head.boxes, head_labels, head.instance_score, control, *pred.instances.shape,
                                    f"{start}head-")
            continue
        if boxes is not None and control.type in BOX_CONTROLS:          # a box model: boxes may overlap
            out += boxes_to_results(boxes, labels, pred.instance_score, control, *pred.instances.shape, start)
            continue
        if slices is None and control.type != "brushlabels" and pred.instance_label:
            # one pass over the map for every control's bounding boxes (polygons and rectangles both need them),
            # none when the region cut already found them
            slices = getattr(pred, "slices", None) or object_slices(pred.instances, sorted(pred.instance_label))
        out += instances_to_results(pred.instances, labels, pred.instance_score, control, start, slices=slices)
    return out


class PackedResult:
    """An annotation's or prediction's `result` (its regions) as zlib-compressed canonical JSON, and that JSON's
    SHA-1 (dataset.data_fingerprint's). A training run holds its listed tasks to its end; as parsed JSON a 2048
    px task's brush, polygon and box regions of 392 objects are ~5 MB, packed 0.17 MB (2.2 MB of JSON)."""
    __slots__ = ("blob", "sha1")

    def __init__(self, result: list, digest: bool = True):
        """`digest` False: no SHA-1 (sha1 None), and the JSON written by ujson, ~5x faster than the canonical one."""
        if digest:
            text = json.dumps(result, sort_keys=True, default=str).encode()
            self.sha1 = hashlib.sha1(text).hexdigest()
        else:
            text, self.sha1 = ujson.dumps(result, ensure_ascii=False, default=str).encode(), None
        self.blob = zlib.compress(text, 1)

    def unpack(self) -> list:
        return ujson.loads(zlib.decompress(self.blob))


def result_of(item: dict) -> Any:
    """An annotation's or prediction's result, unpacked where it was packed (PackedResult)."""
    result = item.get("result")
    return result.unpack() if isinstance(result, PackedResult) else result


def training_annotation(task: dict) -> dict | None:
    """The annotation that counts for a task, in training and in /predict's mislabeling score: the one a reviewer
    starred as ground truth (Label Studio's star on an annotation, at most one a task), else its latest submitted
    one; cancelled ones (skips) never. A task labelled by several people (overlap) trains on the answer the
    reviewer chose, not on whoever saved last. An empty result counts: someone looked and found no object, which
    is an all-background sample to train on and an answer a confident model can disagree with."""
    anns = task.get("annotations")
    anns = [a for a in anns if isinstance(a, dict) and not a.get("was_cancelled")
            and isinstance(a.get("result"), (list, PackedResult))] if isinstance(anns, list) else []
    anns = [a for a in anns if a.get("ground_truth") is True] or anns
    return max(anns, key=lambda a: (str(a.get("updated_at") or ""),
                                    a["id"] if isinstance(a.get("id"), int) else 0)) if anns else None


# a task a deadline left unanswered: no prediction. Label Studio reads a task's reply item as a list of
# predictions (label_studio/ml/models.py, 1.23.2) and stores none for an empty one, where an item
# {"result": []} would be stored as a prediction of the served version, and the task never predicted again
LATER: list = []


def predict_tasks(tasks: list[dict], config: LabelConfig, served: Served, media: MediaResolver,
                  settings: Settings, context: dict | None = None, as_json: bool = False,
                  deadline: float | None = None, max_bytes: int | None = None, answered: dict | None = None) -> list:
    """One LS prediction item per task, in order. A bad task gets an empty item; it never fails the batch.
    `as_json`: each item as its JSON text (compact), made beside the network passes: /predict's reply.

    Streams in chunks of `predict_batch` tasks: while one chunk is inferred and encoded, the images of
    the next ones download and decode, so memory holds a few chunks of images whatever the task count
    and the first inference does not wait for the last download.

    `deadline` (time.monotonic()): no chunk starts that would end past it at the pace of the chunks before
    (the first always runs); with `max_bytes` (as_json) none that would take the items' JSON past it at the
    size of the chunks before. The tasks left get LATER items. `answered`, a dict, gets "n": the tasks answered,
    always the first n."""
    if served.predictor is None:
        return _as_json([_empty(served.version) for _ in tasks], as_json)
    if context and context.get("result"):
        try:
            item = interactive(tasks[0], config, served, media, context)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:
            logger.info("interactive request on task %s ignored, it is malformed: %s", _task_id(tasks[0]), e)
            item = _empty(served.version)
        return _as_json([item] + [_empty(served.version) for _ in tasks[1:]], as_json)
    # a chunk holds about TESSERA_PREDICT_BATCH images: fewer tasks where a multi-image tag gives them pages
    images = max((len(task_images(t, config)) for t in tasks), default=1)      # the most images a task has
    pages = max(1, images // max(1, len(config.images)))                        # 1 without a multi-image tag
    bs = max(1, chunk_size(len(tasks), settings.predict_batch) // pages)
    starts = list(range(0, len(tasks), bs))
    ahead = 2                                      # chunks being fetched beyond the one being inferred
    results: list[dict] = []
    clock = StageClock()
    workers = max(1, min(settings.fetch_threads, len(tasks) * images))
    t0, stopped = time.monotonic(), None
    n_bytes, n_done = 0, 0                         # JSON bytes of the chunks in `results`, and those chunks
    # Two stages: chunk k's predictions are finished (Predictor.predict_parts: upsampling, instance split) and
    # its regions encoded on a second thread while chunk k+1 runs its network passes here; at most one chunk
    # waits to be encoded. This needs passes that take the GIL once, not once per torch op: with eager passes
    # (stop 19) this thread waited for the encoder's GIL between ops, 1,000 Label Studio tasks took 241 s
    # against 121 s on one thread. The Predictor traces its passes per shape (model/traced.py).
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with ThreadPoolExecutor(max_workers=1) as encoder:
            pending = [_fetch_chunk(pool, tasks[s:s + bs], config, media, clock) for s in starts[:ahead + 1]]
            encoding = None
            for n, start in enumerate(starts):
                now = time.monotonic()
                late = deadline is not None and n and now + (now - t0) / n > deadline
                # the chunks inferred but not yet in `results`, and this one, at the mean size so far
                big = max_bytes is not None and n_done and n_bytes + (n - n_done + 1) * n_bytes / n_done > max_bytes
                if late or big:
                    stopped = start
                    break
                jobs, futures = pending.pop(0)
                if n + ahead + 1 < len(starts):
                    nxt = starts[n + ahead + 1]
                    pending.append(_fetch_chunk(pool, tasks[nxt:nxt + bs], config, media, clock))
                with clock("wait_images"):
                    images = [f.result() for f in futures]
                with clock("inference"):
                    later = {j for j, (i, _) in enumerate(jobs) if isinstance(tasks[start + i], dict)
                             and training_annotation(tasks[start + i]) is not None}
                    preds = _infer_chunk(images, served, wants_boxes(config), later)
                with clock("novelty"):
                    novelty = _novelty(images, preds, served)
                if encoding is not None:
                    with clock("wait_regions"):
                        done = encoding.result()
                    results += done
                    n_bytes, n_done = n_bytes + (sum(map(len, done)) if as_json else 0), n_done + 1
                encoding = encoder.submit(_timed_encode, clock, as_json, tasks[start:start + bs], jobs, images,
                                          preds, novelty, config, served)
            if encoding is not None:
                with clock("wait_regions"):
                    results += encoding.result()
    finally:     # past the deadline the chunks being fetched are dropped, not waited for (a download may
        # take TESSERA_FETCH_TIMEOUT_S): their threads finish on their own
        pool.shutdown(wait=stopped is None, cancel_futures=stopped is not None)
    if len(tasks) == 1:             # LS asks this when a labeller opens a task: ready its smart tools' passes
        warm_refine(tasks[0], config, served, media)
    if answered is not None:
        answered["n"] = len(results)
    if stopped is not None:
        logger.info("predict: %d of %d tasks answered before the %s", stopped, len(tasks),
                    "deadline" if late else f"reply's cap of {max_bytes / 2**20:.0f} MB")
        results += _as_json([list(LATER) for _ in tasks[stopped:]], as_json)
    logger.info("predict: %d tasks in %d chunks of %d: %s", len(tasks), len(starts), bs, clock.summary())
    return results


MIN_CHUNK = 4       # tasks: a chunk's passes still fill BATCH_PX (one pass of 520x696 images holds three)


def chunk_size(n_tasks: int, most: int) -> int:
    """Tasks per chunk of a /predict of `n_tasks`: `most` (TESSERA_PREDICT_BATCH), but a request of one or two
    such chunks is cut in two (the first part of MIN_CHUNK tasks at least), so that the second part's downloads
    and passes overlap the first's region encoding: all in one chunk, nothing overlaps. A batch of 16 520x696 tasks,
    chunks of 16 / 8 / 4, alternating servers, 8 requests each (stop 36, 2 cores): 78 / 71 / 69 ms a task; 16
    256 px tasks 20.6 / 19.7 / 23.0 ms (a pass of 4 small images is less full); 64 520x696 tasks 61 / 63 / 64."""
    return max(1, min(most, max(MIN_CHUNK, -(-n_tasks // 2))))


class StageClock:
    """Wall and CPU seconds per stage of one /predict, each summed over the threads that ran it (thread-safe).
    A stage's wall time above its CPU time is time its thread waited: for a core, the GIL or another stage."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.seconds: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, stage: str):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0, time.thread_time() - c0)

    def add(self, stage: str, wall: float, cpu: float) -> None:
        with self._lock:
            acc = self.seconds.setdefault(stage, [0.0, 0.0])
            acc[0] += wall
            acc[1] += cpu

    def summary(self) -> str:
        parts = [f"{k} {w:.2f}s (cpu {c:.2f}s)" for k, (w, c) in self.seconds.items()]
        return ", ".join(parts + [f"wall {time.perf_counter() - self.t0:.2f}s"])


def _timed_encode(clock: StageClock, as_json: bool, *args) -> list:
    with clock("split_and_regions"):
        items = _encode_chunk(*args)
    if not as_json:
        return items
    with clock("json"):              # off the passes' thread: json.dumps took ~4 ms a task of 43 objects x 3 controls
        return _as_json(items, True)


def _as_json(items: list[dict], as_json: bool) -> list:
    return [_dumps(x) for x in items] if as_json else items


def _dumps(item: dict) -> str:
    """json.dumps(item, separators=(",", ":"), default=_plain), the same text (tests/test_encode_identical.py),
    with ujson (a dependency, label-studio-sdk's too): 1.7 -> 0.5 ms of CPU a 520x696 task of 55
    objects x 3 controls (stop 23). The two differ only in floats below 1e-4 (ujson writes 5e-5, json 5e-05),
    which an item never holds: every float in it is rounded to 4 decimals."""
    return ujson.dumps(item, ensure_ascii=True, escape_forward_slashes=False, default=_plain)


def _plain(value: Any):
    """numpy scalars and arrays in an item, as JSON can hold them (what Flask's encoder did for the reply)."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _fetch_chunk(pool: ThreadPoolExecutor, tasks: list[dict], config: LabelConfig, media: MediaResolver,
                 clock: StageClock):
    """Start fetching + decoding every (task, image) of a chunk: (jobs, futures of arrays or MediaErrors)."""
    jobs = [(i, img) for i, task in enumerate(tasks) for img in task_images(task, config)]

    def load(job):
        i, img = job
        with clock("fetch_decode"):
            return task_image(tasks[i], img, media, working=True)     # a MediaError is logged once, below

    return jobs, [pool.submit(load, job) for job in jobs]


def _pixels(loaded: list) -> list:
    """The arrays (or MediaErrors) of a chunk's loaded images, without their original sizes."""
    return [x[0] if isinstance(x, tuple) else x for x in loaded]


def checks_annotations(config: LabelConfig) -> bool:
    """Whether a config's annotations get a mislabeling score (in /predict and the training run's write-back):
    not a counting project's, whose points have no area to compare."""
    return any(c.type not in POINT_CONTROLS for c in config.controls)


def wants_boxes(config: LabelConfig) -> bool:
    """Whether a config's predictions need a mask model's head boxes: it has a RectangleLabels control (or a
    counting project's KeyPointLabels, whose points are the boxes' centres)."""
    return any(c.type in BOX_CONTROLS for c in config.controls)


def _infer_chunk(loaded: list, served: Served, boxes: bool = True, later: set[int] = frozenset()
                 ) -> dict[int, Any]:
    """Predictions of a chunk's loaded images ({index in the chunk: Prediction, or with a Predictor's
    predict_parts the function that finishes it, so that a failure there fails its task alone}); a model
    failure on one chunk leaves it empty and fails no other chunk. `boxes` False: no head boxes wanted.
    Images in `later` (an annotated task's: its label check, Predictor.review, makes its regions) get a
    function that predicts them when called, and no pass now: the pass is needed only where the check fails."""
    images = _pixels(loaded)
    ok = [j for j, im in enumerate(images) if isinstance(im, np.ndarray) and j not in later]
    preds: dict[int, Any] = {j: _Deferred(served.predictor, images[j], boxes) for j in later
                             if isinstance(images[j], np.ndarray)}
    parts = getattr(served.predictor, "predict_parts", None)   # the network now, the rest in _encode_chunk
    try:
        batch = [images[j] for j in ok]
        for j, p in zip(ok, (parts(batch, boxes=boxes) if parts else served.predictor.predict(batch)) if ok else []):
            preds[j] = p
    except Exception:                   # a model failure on one chunk must not fail the whole batch
        logger.exception("inference failed for %d images", len(ok))
    return preds


class _Deferred:
    """An annotated task image's prediction, made only if its label check does not make its regions."""

    def __init__(self, predictor: Any, image: np.ndarray, boxes: bool):
        self.predictor, self.image, self.boxes = predictor, image, boxes

    def __call__(self):
        parts = getattr(self.predictor, "predict_parts", None)
        return parts([self.image], boxes=self.boxes)[0]() if parts else self.predictor.predict([self.image])[0]


def _novelty(loaded: list, preds: dict[int, Any], served: Served) -> dict[int, float]:
    """{index in the chunk: novelty in [0, 1]} of each predicted image, how unlike the images the served
    version learned from it is (model/acquisition.py), when the version carries their embeddings (and
    TESSERA_SORT is not `score`): one R x R encoder pass per image, ~5 ms of a 520x696 task's ~70
    (bench.micro --novelty). A failure here leaves the plain scores; it never fails a task."""
    ref = getattr(served.predictor, "reference", None)
    if ref is None or not preds:
        return {}
    from tessera.model import acquisition

    idx = sorted(preds)
    try:
        images = _pixels(loaded)
        emb = acquisition.embed(served.predictor, [images[j] for j in idx])
        return dict(zip(idx, map(float, acquisition.novelty(emb, ref))))
    except Exception:
        logger.exception("novelty of %d images failed: their tasks get the plain confidence", len(idx))
        return {}


def ranked_score(confidence: float, novelty: float | None) -> float:
    """A task image's prediction score: 1 - priority, priority = (1 - confidence) x novelty
    (model/acquisition.py `priority`), so that the lowest scores are the tasks worth labelling next:
    uncertain AND unlike what the version learned from. Never below the confidence; the confidence
    itself when the version has no embeddings or TESSERA_SORT=score."""
    if novelty is None:
        return confidence
    return 1.0 - (1.0 - confidence) * novelty


def _encode_chunk(tasks: list[dict], jobs: list, loaded: list, preds: dict[int, Any], novelty: dict[int, float],
                  config: LabelConfig, served: Served) -> list[dict]:
    """The LS items of a chunk's tasks from its images' predictions and novelties (a bad task gets an
    empty item)."""
    images = _pixels(loaded)
    sizes = [x[1] if isinstance(x, tuple) else None for x in loaded]      # original (H, W)
    labels = served.predictor.label_names
    for j, p in list(preds.items()):
        if callable(p) and not isinstance(p, _Deferred):    # deferred: made by _task_item if it needs it
            try:
                preds[j] = p()
            except Exception:           # a failure on one image fails its task alone
                logger.exception("finishing the prediction of image %d of a chunk failed", j)
                del preds[j]
    results = []
    for i, task in enumerate(tasks):
        idx = [j for j, (ti, _) in enumerate(jobs) if ti == i]
        missing = [j for j in idx if j not in preds]
        if missing:
            errors = [images[j] for j in missing if isinstance(images[j], MediaError)]
            reason = "; ".join(f"{jobs[j][1].view_id}: {_failure(images[j])}" for j in missing[:3])
            if any(e.retry for e in errors):    # the connection or a setting: ask again, store nothing (a prediction
                # of its other images would be this version's, and the task never asked again)
                logger.warning("task %s: no prediction this time (asked again at the next retrieve): %s",
                               _task_id(task), reason)
                results.append(list(LATER))
                continue
            if len(missing) == len(idx):
                logger.warning("task %s: empty prediction: %s", _task_id(task), reason)
                results.append(_empty(served.version))
                continue
            # a page that can never load (gone, not an image) costs its own regions, not the task's other pages
            logger.warning("task %s: predicted without %d of its %d images: %s", _task_id(task), len(missing),
                           len(idx), reason)
        try:
            results.append(_task_item(task, [(jobs[j][1], images[j], sizes[j], preds[j], novelty.get(j))
                                             for j in idx if j in preds], config, served, labels))
        except Exception:               # a malformed task or annotation never fails the batch
            logger.exception("task %s: building its prediction failed", _task_id(task))
            results.append(_empty(served.version))
    return results


def _failure(loaded: Any) -> str:
    return str(loaded) if isinstance(loaded, MediaError) else "inference failed"


def task_image(task: Any, img: ImageObject, media: MediaResolver, working: bool = False
               ) -> np.ndarray | tuple[np.ndarray, tuple[int, int]] | MediaError:
    """The pixels of a task's image tag `img`, or the MediaError that says why not (returned, not raised:
    a bad task must not fail a batch of predictions, nor a training run). `working=True`: (image decoded
    at most TESSERA_MAX_SIDE px, original (H, W)), as /predict uses it."""
    data = task.get("data") if isinstance(task, dict) else None
    attr = "valueList" if img.many else "value"
    if not isinstance(data, dict) or img.data_key not in data:
        return MediaError(f"task data has no {img.data_key!r} field (the <Image {attr}=\"${img.data_key}\">)")
    try:
        ref = data[img.data_key]
        if img.many:                    # <Image valueList>: the page's URL in the field's list
            page = img.page or 0
            if not isinstance(ref, list) or not 0 <= page < len(ref):
                return MediaError(f"task data {img.data_key!r} holds no image {page} (the <Image valueList="
                                  f"\"${img.data_key}\"> wants a list of image URLs)")
            ref = ref[page]
        tid = task.get("id")
        return media.load_working(ref, tid) if working else media.load_image(ref, tid)
    except MediaError as e:
        return e
    except Exception as e:          # a bug on odd input must not fail the batch either; the traceback is logged
        logger.exception("task %s: image failed to load", _task_id(task))
        return MediaError(f"image failed to load ({type(e).__name__})")


def _task_item(task: Any, per_image: list, config: LabelConfig, served: Served, labels: list[str]) -> dict:
    """One task's prediction item from its images' (image tag, working image, original size, Prediction,
    novelty or None). Its score is the lowest of its images' (ranked_score)."""
    regions, scores, mislabel = [], [], []
    ann = training_annotation(task) if isinstance(task, dict) else None
    checked = checks_annotations(config)
    for img, image, size, pred, novelty in per_image:
        if ann is not None and checked:
            try:
                pred, m = _review(served.predictor, image, ann, config, img, size)
                mislabel.append(m)
            except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:
                logger.info("task %s: annotation not checked, it is malformed: %s", _task_id(task), e)
        if isinstance(pred, _Deferred):
            pred = pred()
        regions += img.mark(_regions_at_size(pred, config, img.name, labels, size))
        scores.append(ranked_score(float(pred.score), novelty))
    item = {"result": regions, "score": round(min(scores), 4) if scores else 0.0, "model_version": served.version}
    if mislabel:
        item["mislabeling"] = round(max(mislabel), 4)
    return item


def _regions_at_size(pred: Any, config: LabelConfig, image_name: str, labels: list[str],
                     size: tuple[int, int] | None) -> list[dict]:
    """Regions of a prediction made on a reduced image, at the image's original (H, W). Polygons and boxes
    are percentages: made at the working size, labelled with the original size. A brush RLE and a bitmask PNG
    are per pixel: those controls get the instances scaled up to the original size (one image at a time)."""
    if size is None or tuple(pred.instances.shape) == tuple(size):
        return prediction_to_results(pred, config, image_name, labels)
    h, w = size
    full = None
    out: list[dict] = []
    for control in config.controls:
        if control.to_name != image_name:
            continue
        one, start = dataclasses.replace(config, controls=(control,)), config.id_prefix(control)
        if control.type in PIXEL_CONTROLS:
            if full is None:
                import cv2

                big = cv2.resize(pred.instances.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST)
                # its object boxes are found again at this size where a bitmask needs them (the cut's are at the
                # working size); brush regions never use them
                full = dataclasses.replace(pred, instances=big, **({"slices": None} if hasattr(pred, "slices") else {}))
            out += prediction_to_results(full, one, image_name, labels, start)
            continue
        for item in prediction_to_results(pred, one, image_name, labels, start):
            item["original_width"], item["original_height"] = int(w), int(h)
            out.append(item)
    return out


def _task_id(task: Any) -> Any:
    return task.get("id") if isinstance(task, dict) else None


def _review(predictor: PredictorLike, image: np.ndarray, ann: dict, config: LabelConfig, img: ImageObject,
           size: tuple[int, int] | None = None):
    h, w = size or image.shape[:2]          # annotations (brush RLE) are at the original size
    index = {n: c + 1 for c, n in enumerate(predictor.label_names)}
    for control in config.controls:      # labels of this config that the model knows under another name
        for c, label in label_mapping(control, predictor.label_names).items():
            index.setdefault(label, c)
    result = result_of(ann)                 # packed where tessera predict --project listed it (predict_view)
    if not isinstance(result, list):
        raise ValueError("annotation result is not a list")
    if getattr(predictor, "box_shrink", 1.0) < 1.0:        # a box model: the annotation as it learns boxes
        s = box_sample(image, results_to_boxes(img.regions(result), img.name, *image.shape[:2], index),
                       predictor.box_shrink)
        return predictor.review(image, s.classes, s.instances, s.boxes)
    classes, instances = results_to_maps_at(img.regions(result), img.name, (h, w), image.shape[:2], index)
    return predictor.review(image, classes, instances)


class _Warmer:
    """One background thread that runs the latest warm-up asked for: a labeller who opens tasks faster
    than they warm skips the ones left behind, and nothing queues up."""

    def __init__(self):
        self._lock = threading.Lock()
        self._next = None
        self._thread: threading.Thread | None = None

    def submit(self, fn) -> threading.Thread:
        with self._lock:
            self._next = fn
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="tessera-refine-warm", daemon=True)
                self._thread.start()
            return self._thread

    def wait(self, timeout: float) -> bool:
        """Wait until no warm-up runs or waits (tests, benchmarks); False on timeout."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self._thread is None

    def _loop(self) -> None:
        while True:
            with self._lock:
                fn, self._next = self._next, None
                if fn is None:
                    self._thread = None
                    return
            try:
                fn()
            except Exception:               # a warm-up is a guess: it never fails a request
                logger.exception("warming the smart tools' passes failed")


_WARMER = _Warmer()


def warm_refine(task: dict, config: LabelConfig, served: Served, media: MediaResolver
                ) -> threading.Thread | None:
    """In the background: the first smart-tool hint on `task` finds its network passes computed. The
    image is loaded as interactive() loads it (full size), so the pass cache's content key matches.
    Returns the worker thread (tests join it), None when there is nothing to warm."""
    warm = getattr(served.predictor, "warm", None)
    data = task.get("data") if isinstance(task, dict) else None
    if warm is None or not isinstance(data, dict):
        return None
    views = [v for v in task_images(task, config) if v.data_key in data][:2]     # a multi-image tag's first pages

    def run():
        for img in views:
            loaded = task_image(task, img, media, working=True)        # the pixels interactive() refines on
            if isinstance(loaded, MediaError):
                continue
            image = loaded[0]
            t0 = time.perf_counter()
            warm(image)
            logger.info("task %s: smart tools ready (%dx%d image, %.0f ms)", _task_id(task), image.shape[1],
                        image.shape[0], 1000 * (time.perf_counter() - t0))
    try:
        return _WARMER.submit(run) if views else None
    except RuntimeError:                # no thread to be had: /predict has answered, the hint will be cold
        logger.exception("could not start warming the smart tools' passes")
        return None


def interactive(task: dict, config: LabelConfig, served: Served, media: MediaResolver, context: dict) -> dict:
    """Interactive refinement: a rough stroke, box or keypoints in `context.result` -> ONE clean region of
    the hinted object, of the control the hint came from (its from_name), with the hint's label. A hint
    from a control Tessera does not write (a KeyPointLabels smart tool) gets a region of the finest control
    on that image: brush, else polygon, else box. LS's smart tools put the one region they get back on
    the canvas; one region per control would stack a mask, a polygon and a box on the object."""
    hints = [r for r in context.get("result") or [] if isinstance(r, dict)]
    to_name = next((r.get("to_name") for r in hints if r.get("to_name")), config.images[0].name)
    img = next((i for i in config.images if i.name == to_name), None)
    if img is None:
        return _empty(served.version, f"interactive hint points at unknown image {to_name!r}")
    controls = [c for c in config.controls if c.to_name == img.name]
    if not controls:
        return _empty(served.version, "no control for the hinted image")
    if img.many:                        # the page the hint was drawn on (Label Studio's item_index)
        page = next((r.get("item_index") for r in hints if "item_index" in r), 0)
        img = dataclasses.replace(img, page=page if isinstance(page, int) and not isinstance(page, bool) else 0)
        hints = img.regions(hints)
    # as /predict and training see it: at most TESSERA_MAX_SIDE px, the scale the model learned at
    loaded = task_image(task, img, media, working=True)
    if isinstance(loaded, MediaError):
        return _empty(served.version, f"task {_task_id(task)}: {loaded}")
    image, size = loaded
    hint, positive, negative, label = _hint_maps(hints, size, image.shape[:2])
    control = _hinted_control(hints, controls, label)
    label = label if label in control.labels else control.labels[0]
    cls = next((c for c, name in label_mapping(control, served.predictor.label_names).items() if name == label), 1)
    mask, score = served.predictor.refine(image, hint if hint.any() else None, positive, negative, cls)
    if not mask.any():
        return _empty(served.version, "refinement found no object at the hint")
    (H, W), reduced = size, tuple(size) != tuple(image.shape[:2])
    if reduced and control.type in PIXEL_CONTROLS:      # per pixel of the original (_regions_at_size)
        import cv2

        mask = cv2.resize(mask.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST) > 0
    written = instances_to_results(mask.astype(np.int32), {1: label}, {1: score}, control)
    # one region: its results (a tool with a separate <Labels> stores two of one id, regions.as_stored)
    results = img.mark([r for r in written if r["id"] == written[0]["id"]] if written else [])
    for item in results if reduced and control.type not in PIXEL_CONTROLS else []:   # percentages: only the size
        item["original_width"], item["original_height"] = int(W), int(H)
    if not results:
        return _empty(served.version, f"the refined object can't be written as {control.type}")
    return {"result": results, "score": round(float(score), 4), "model_version": served.version}


def _hint_maps(hints: list[dict], size: tuple[int, int], shape: tuple[int, int]
               ) -> tuple[np.ndarray, list, list, str | None]:
    """Interactive hint regions -> (rough mask (H', W') bool, positive points, negative points, first label)
    on an image decoded at `shape` (H', W') from an original of `size` (H, W): regions are drawn at the
    original size (a brush hint's RLE counts its pixels) and resampled; points are percentages."""
    (H, W), (h, w) = size, shape
    hint = np.zeros((H, W), dtype=bool)
    positive, negative = [], []
    label = None
    for r in labelled(hints):            # a tool's shape and its <Labels> result: one hint
        label = label or result_label(r)
        if r.get("type") in ("keypointlabels", "keypoint"):
            _, value = region_value(r)                    # finite, within 0-100
            pt = (value["x"] * w / 100.0, value["y"] * h / 100.0)
            (positive if r.get("is_positive", True) else negative).append(pt)
            continue
        try:
            hint |= region_to_mask(r, H, W)
        except (ValueError, KeyError, TypeError) as e:
            logger.info("interactive: skipping a hint region: %s", e)
    if (H, W) != (h, w) and hint.any():
        import cv2

        hint = cv2.resize(hint.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    elif (H, W) != (h, w):
        hint = np.zeros((h, w), dtype=bool)
    return hint, positive, negative, label


def _hinted_control(hints: list[dict], controls: list[Control], label: str | None) -> Control:
    """The control an interactive reply is written for: the hint's own (from_name), else the finest one
    that has the hint's label, else the finest one."""
    names = {r.get("from_name") for r in hints}
    own = [c for c in controls if c.from_name in names]
    if own:             # a tool beside several <Labels> is a control per <Labels>: the one with the hint's label
        return next((c for c in own if label in c.labels), own[0])
    finest = sorted(controls, key=lambda c: PRECISION[c.type])
    return next((c for c in finest if label in c.labels), finest[0])
