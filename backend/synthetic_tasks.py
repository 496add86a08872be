"""Synthetic, pre-annotated tasks in a project: edited real images (the default) or GAN-generated ones.

- "edited": a real annotated image of the project with real annotated objects pasted in (model/edit.py),
  rare labels first (or only `label`); the masks are exact by construction. `meta.source_task` names the
  task the background comes from, `meta.object_tasks` those the objects come from.
- "generated": layouts -> mask GAN images -> self-consistency filter (the label model must agree).
Each task carries its label map as a prediction for every control of the image and `meta.synthetic = true`,
`meta.synthetic_kind`. Images are uploaded without creating tasks (100 a request), then all tasks are created
with their predictions and meta in one JSON import (one transaction: no task is left without its prediction).
"""
from __future__ import annotations

import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from tessera.backend.label_config import LabelConfig
from label_studio_sdk.client import LabelStudio

from tessera.backend import lsclient
from tessera.backend.regions import instances_to_results
from tessera.backend.predictions import ModelCache, label_mapping
from tessera.backend.settings import Settings
from tessera.backend.store import version_string

logger = logging.getLogger(__name__)

KINDS = ("edited", "generated")
OVERSAMPLE = 3          # layouts rendered per requested generated task, so the filter can drop unconvincing ones
EDIT_VERSION = "tessera-edit-1"  # model_version of the predictions of edited tasks (the editor has no weights)
UPLOAD_FILES = 100       # files per upload request: Label Studio answers 500 to more (its
                         # DATA_UPLOAD_MAX_NUMBER_FILES, default 100)


@dataclass
class Item:
    """One synthetic image with its exact label maps, its score and its task meta."""
    image: np.ndarray
    classes: np.ndarray
    instances: np.ndarray
    score: float
    meta: dict = field(default_factory=dict)


def _gan_source(cache: ModelCache, key: str, config: LabelConfig):
    src = cache.source(key, config, kind="gan")
    if src is not None:
        return src
    raise ValueError(f"no generator is trained for project {key} yet (nor a default one for its labels): a training "
                     "run trains it once the project has TESSERA_GAN_MIN_ANNOTATIONS annotated tasks; "
                     "or use kind 'edited', which needs none")


def _task_of(sample_id: str) -> int | str:
    """Sample ids of project tasks are "<task id>:<image tag>" (backend.dataset.project_samples)."""
    head = str(sample_id).split(":", 1)[0]
    return int(head) if head.isdigit() else head


def _label_index(label: str | None, names: list[str], what: str) -> int | None:
    if label is None:
        return None
    by_name = {n.lower(): i + 1 for i, n in enumerate(names)}
    if label.lower() not in by_name:
        raise ValueError(f"label {label!r} is not one the {what} knows: {names}")
    return by_name[label.lower()]


def _edited(samples, names: list[str], count: int, label: str | None, seed: int, predictor) -> list[Item]:
    from tessera.model.edit import Editor

    editor = Editor(samples, len(names))
    label_idx = _label_index(label, names, "project's label config")
    if label_idx is not None and label_idx not in editor.labels():
        raise ValueError(f"no annotated object of label {label!r} to paste yet: annotate at least one")
    edits = editor.edit(count, label=label_idx, seed=seed)
    scores = [1.0] * len(edits)
    if predictor is not None:  # the label model's agreement: low = a task the model has most to learn from
        from tessera.model.metrics import mean_iou
        preds = predictor.predict([e.sample.image for e in edits])
        scores = [mean_iou(np.asarray(p.classes, np.int32), e.sample.classes, len(names)) for p, e in zip(preds, edits)]
    return [Item(e.sample.image, e.sample.classes, e.sample.instances, float(s),
                 {"synthetic_kind": "edited", "source_task": _task_of(e.background),
                  "object_tasks": [_task_of(o) for o in e.objects],
                  "pasted_labels": [names[c - 1] for c in e.labels]})
            for e, s in zip(edits, scores)]


def _generated(settings: Settings, cache: ModelCache, key: str, config: LabelConfig, samples, count: int,
               label: str | None, share: float, seed: int, predictor) -> tuple[list[Item], str, list[dict], list[str]]:
    """-> (items, generator version, failures, the generator's label names: the layouts' class order)."""
    from tessera.model.layouts import LayoutSampler
    from tessera.model.synthesizer import Synthesizer

    reg_key, reg, gan_info = _gan_source(cache, key, config)
    synth = Synthesizer.from_checkpoint(reg.path(gan_info.version), device=settings.device)
    version = version_string(reg_key, gan_info.version, "gan")
    if predictor is None:
        raise ValueError(f"project {key} has no label model yet: it is needed to check generated images")
    label_idx = _label_index(label, synth.label_names, "generator")
    sampler = LayoutSampler(samples, resolution=synth.config.resolution)
    layouts = sampler.sample(count * OVERSAMPLE, label=label_idx, share=share if label_idx else None, seed=seed)
    images = synth.render(layouts, seed=seed)
    checks = synth.self_consistency(images, layouts, predictor, threshold=settings.synth_min_iou)
    order = sorted(range(len(layouts)), key=lambda i: -checks[i][1])
    keep = [i for i in order if checks[i][0]][:count]
    failed = []
    if len(keep) < count:
        failed.append({"reason": f"only {len(keep)} of {len(layouts)} generated images passed the self-consistency "
                                 f"filter (IoU >= {settings.synth_min_iou})", "count": count - len(keep)})
    items = [Item(images[i], layouts[i].classes, layouts[i].instances, checks[i][1],
                  {"synthetic_kind": "generated", "generator_version": version, "layout_source": layouts[i].source,
                   "self_consistency_iou": round(checks[i][1], 4)}) for i in keep]
    return items, version, failed, list(synth.label_names)


def _results(item: Item, config: LabelConfig, names: list[str]) -> list[dict]:
    """The item's label map as regions of every control of the first image tag."""
    image = config.images[0]
    ids = [int(k) for k in np.unique(item.instances) if k]
    cls = {k: int(np.bincount(item.classes[item.instances == k]).argmax()) for k in ids}
    result = []
    for control in config.controls:
        if control.to_name != image.name:
            continue
        mapping = label_mapping(control, names)
        labels = {k: mapping[c] for k, c in cls.items() if c in mapping}
        result += instances_to_results(item.instances, labels, {k: item.score for k in ids}, control,
                                       config.id_prefix(control))
    return image.mark(result)                   # a multi-image tag: its one page


def _upload(client: LabelStudio, key: str, items: list[Item], prefix: str) -> list[str]:
    """The items' images as PNG files in the project, without tasks -> their URLs, in order."""
    urls = []
    for i in range(0, len(items), UPLOAD_FILES):
        pngs = []
        for n, item in enumerate(items[i:i + UPLOAD_FILES], i):
            buf = io.BytesIO()
            Image.fromarray(item.image).save(buf, "PNG", compress_level=1)
            pngs.append((f"{prefix}_{n:03d}.png", buf.getvalue()))
        urls += lsclient.upload_files(client, key, pngs)
    return urls


def generate_into_project(settings: Settings, key: str, count: int = 8, label: str | None = None,
                          share: float = 0.3, seed: int = 0, client: LabelStudio | None = None,
                          kind: str = "edited", progress=None) -> dict:
    """Make `count` synthetic tasks of `kind` in project `key`; returns what was created and what failed."""
    from tessera.backend.dataset import annotated_tasks, is_box_only, load_samples

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    t0 = time.time()
    client = client or lsclient.from_settings(settings)
    config, tasks = annotated_tasks(settings, client, key)  # the project read once: its config and annotated tasks
    if is_box_only(config):         # its samples' label maps hold the boxes' centre squares (box_sample)
        raise ValueError(f"project {key} labels boxes or points only: synthetic tasks are made from the masks of "
                         "brush, bitmask, polygon or ellipse regions (pasted objects, generated layouts)")
    names = config.label_names
    cache = ModelCache(settings)
    with ThreadPoolExecutor(max_workers=1) as pool:     # the label model loads while the images are fetched
        served = pool.submit(cache.served, key, config)
        samples, _ = load_samples(settings, config, tasks, progress or (lambda info: None))
        predictor = served.result().predictor
    samples = [s for s in samples if not s.synthetic] or samples
    if not samples:
        raise ValueError(f"project {key} has no annotated tasks to take layouts or objects from")
    failed: list[dict] = []
    if kind == "edited":
        items, version = _edited(samples, names, count, label, seed, predictor), EDIT_VERSION
    else:
        items, version, failed, names = _generated(settings, cache, key, config, samples, count, label, share,
                                                   seed, predictor)
    t_make = time.time() - t0
    if not items:
        return {"kind": kind, "created": [], "failed": failed, "model_version": version,
                "generator_version": version, "seconds": round(time.time() - t0, 2)}
    # the images are encoded and uploaded in a thread while this one turns the label maps into regions (both
    # ~5-15 % of the time for 200 tasks, py-spy; the upload mostly waits for Label Studio)
    with ThreadPoolExecutor(max_workers=1) as pool:
        uploaded = pool.submit(_upload, client, key, items, f"{kind}_s{seed}")
        results = [_results(item, config, names) for item in items]
        urls = uploaded.result()
    data_key, many = config.images[0].data_key, config.images[0].many
    tasks = [{"data": {data_key: [url] if many else url},
              "meta": {"synthetic": True, "seed": seed, **item.meta},
              "predictions": [{"result": result, "score": round(item.score, 4), "model_version": version}]}
             for url, item, result in zip(urls, items, results)]
    ids = lsclient.import_tasks(client, key, tasks)
    created = [{"task": tid, "score": round(item.score, 4),
                "regions": len({r["id"] for r in task["predictions"][0]["result"]}),     # a region's results share it
                **{k: v for k, v in item.meta.items() if k in ("source_task", "layout_source")}}
               for tid, item, task in zip(ids, items, tasks)]
    dt = time.time() - t0
    logger.info("project %s: %d %s tasks in %.1fs (%.1fs to make them)", key, len(created), kind, dt, t_make)
    return {"kind": kind, "created": created, "failed": failed, "model_version": version,
            "generator_version": version, "seconds": round(dt, 2), "make_seconds": round(t_make, 2)}
