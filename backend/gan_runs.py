"""The mask GAN's part of a training run: when it retrains, how long, and registering it as kind "gan"."""
from __future__ import annotations

import logging
import shutil
import time

from tessera.backend.progress import Progress
from tessera.backend.settings import Settings
from tessera.backend.store import Store, version_string
from tessera.backend.workdir import work_dir
from tessera.model.data import Sample

logger = logging.getLogger(__name__)

GAN_RETRAIN_GROWTH = 0.2     # the GAN retrains when a project's annotated images grew by this share
GAN_PROGRESS_EVERY = 20      # iterations between the GAN's progress steps (status + one log line each)


def gan_config(settings: Settings, iters: int | None = None):
    """The GANTrainConfig of a run's GAN part: as many iterations as the label model gets, at most
    TESSERA_GAN_BUDGET_S seconds (on 2 CPU cores a GAN iteration costs several label-model iterations)."""
    from tessera.model.train_maskgan import GANTrainConfig

    return GANTrainConfig(max_iters=iters or settings.train_iters, time_budget_s=settings.gan_budget_s,
                          device=settings.device)


def train_gan(settings: Settings, key: str, samples: list[Sample], label_names: list[str], reason: str,
              iters: int | None, progress: Progress) -> dict:
    """Train the mask GAN on the project's real samples and register it as kind "gan" (promoted when the
    run ends with finite losses: there is no held-back score for a generator yet). Warm-starts from the
    current GAN when its config still fits."""
    from tessera.model import train_maskgan

    real = [s for s in samples if not s.synthetic]       # a GAN must not learn from its own output
    if not real:
        return {"status": "skipped", "reason": "no annotated real (non-synthetic) images"}
    if all(s.boxes is not None for s in real):
        # a box or counting project's label maps hold the boxes' centre squares (box_sample): a GAN would paint
        # objects of any extent around them, and its tasks' rectangles would be the squares'
        return {"status": "skipped", "reason": "the project's labels are boxes or points: the GAN makes images "
                                               "from masks (brush, bitmask, polygon or ellipse regions)"}
    registry = Store(settings.model_dir).registry(key)
    cur = registry.current("gan")
    init_from = registry.path(cur.version) if cur is not None else None
    tmp = work_dir(registry)

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


def gan_up_to_date(settings: Settings, key: str, samples: list[Sample]) -> str:
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


def gan_part(settings: Settings, key: str, samples: list[Sample], label_names: list[str], reason: str,
             iters: int | None, progress: Progress) -> dict:
    """A training run's GAN part: trains the GAN unless it is up to date (gan_up_to_date); a failure is
    reported, not raised (the label model is registered either way; the GAN is optional)."""
    why_not = gan_up_to_date(settings, key, samples)
    if why_not:
        return {"status": "skipped", "reason": why_not}
    try:
        return train_gan(settings, key, samples, label_names, reason, iters, progress)
    except Exception as e:
        logger.exception("project %s: GAN training failed", key)
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"[:300]}
