"""Synthetic, pre-annotated tasks: layouts -> GAN images -> self-consistency filter -> Label Studio.

Each kept image is uploaded as a task, gets its layout as a prediction for every control of the
project's config (score = the label model's agreement with the layout) and `meta.synthetic = true`.
A task whose prediction cannot be written is deleted again, so no synthetic task is left unlabelled.
"""
from __future__ import annotations

import io
import logging
import time

import numpy as np
from PIL import Image

from backend.label_config import LabelConfig, parse_label_config
from backend.lsclient import LSClient
from backend.regions import instances_to_results
from backend.service import ModelCache, label_mapping, version_string
from backend.settings import Settings

logger = logging.getLogger(__name__)

OVERSAMPLE = 3          # layouts rendered per requested task, so the filter can drop the unconvincing ones


def _gan_source(cache: ModelCache, key: str, config: LabelConfig):
    src = cache.source(key, config, kind="gan")
    if src is not None:
        return src
    raise ValueError(f"no generator is trained for project {key} yet (nor a default one for its labels): a training "
                     "run trains it once the project has TESSERA_GAN_MIN_ANNOTATIONS annotated tasks")


def generate_into_project(settings: Settings, key: str, count: int = 8, label: str | None = None,
                          share: float = 0.3, seed: int = 0, client: LSClient | None = None) -> dict:
    """Render `count` synthetic tasks into project `key`; returns what was created and what failed."""
    from backend.training import project_samples
    from model.layouts import LayoutSampler
    from model.synth import Synthesizer

    t0 = time.time()
    client = client or LSClient(settings)
    config = parse_label_config(client.project(key).get("label_config") or "")
    cache = ModelCache(settings)
    reg_key, reg, gan_info = _gan_source(cache, key, config)
    synth = Synthesizer.from_checkpoint(reg.path(gan_info.version), device=settings.device)
    gan_version = version_string(reg_key, gan_info.version)
    served = cache.served(key, config)
    if served.predictor is None:
        raise ValueError(f"project {key} has no label model yet: it is needed to check generated images")
    label_idx = None
    if label is not None:
        by_name = {n.lower(): i + 1 for i, n in enumerate(synth.label_names)}
        if label.lower() not in by_name:
            raise ValueError(f"label {label!r} is not one the generator knows: {synth.label_names}")
        label_idx = by_name[label.lower()]

    samples, _, _, _ = project_samples(settings, client, key)
    samples = [s for s in samples if not s.synthetic] or samples
    if not samples:
        raise ValueError(f"project {key} has no annotated tasks to take layouts from")
    sampler = LayoutSampler(samples, resolution=synth.config.resolution)
    layouts = sampler.sample(count * OVERSAMPLE, label=label_idx, share=share if label_idx else None, seed=seed)
    images = synth.render(layouts, seed=seed)
    checks = synth.self_consistency(images, layouts, served.predictor, threshold=settings.synth_min_iou)
    order = sorted(range(len(layouts)), key=lambda i: -checks[i][1])
    keep = [i for i in order if checks[i][0]][:count]
    failed: list[dict] = []
    if len(keep) < count:
        failed.append({"reason": f"only {len(keep)} of {len(layouts)} generated images passed the self-consistency "
                                 f"filter (IoU >= {settings.synth_min_iou})", "count": count - len(keep)})
    if not keep:
        return {"created": [], "failed": failed, "generator_version": gan_version, "seconds": time.time() - t0}

    pngs = []
    for n, i in enumerate(keep):
        buf = io.BytesIO()
        Image.fromarray(images[i]).save(buf, "PNG")
        pngs.append((f"synthetic_s{seed}_{n:03d}.png", buf.getvalue()))
    task_ids = client.upload_images(key, pngs)

    created = []
    for task_id, i in zip(task_ids, keep):
        lay, iou = layouts[i], checks[i][1]
        try:
            result = []
            for control in config.controls:
                mapping = label_mapping(control, synth.label_names)
                ids = [int(k) for k in np.unique(lay.instances) if k]
                cls = {k: int(np.bincount(lay.classes[lay.instances == k]).argmax()) for k in ids}
                labels = {k: mapping[c] for k, c in cls.items() if c in mapping}
                result += instances_to_results(lay.instances, labels, {k: iou for k in ids}, control)
            client.create_prediction(task_id, result, round(iou, 4), gan_version)
            client.update_task_meta(task_id, {"synthetic": True, "generator_version": gan_version, "seed": seed,
                                              "layout_source": lay.source, "self_consistency_iou": round(iou, 4)})
            created.append({"task": task_id, "score": round(iou, 4), "layout_source": lay.source,
                            "regions": len(result)})
        except Exception as e:               # one task failing must not leave it unlabelled, nor stop the rest
            logger.warning("synthetic task %s: %s; deleting it", task_id, e)
            failed.append({"task": task_id, "reason": f"{type(e).__name__}: {str(e)[:200]}"})
            try:
                client.request("DELETE", f"/api/tasks/{task_id}/")
            except Exception as e2:
                logger.error("synthetic task %s could not be deleted either: %s", task_id, e2)
    logger.info("project %s: %d synthetic tasks from %s in %.1fs", key, len(created), gan_version, time.time() - t0)
    return {"created": created, "failed": failed, "generator_version": gan_version,
            "seconds": round(time.time() - t0, 2)}
