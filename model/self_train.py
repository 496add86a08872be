"""Self-training: the label model's confident predictions on unlabelled images as pseudo-labels.

Pseudo-labelling in the manner of Lee 2013 / Noisy Student (Xie et al. 2020, https://arxiv.org/abs/1911.04252):
a teacher trained on the labelled images predicts the unlabelled pool; the images it is most confident on
(its own task score, the expected foreground IoU under its probabilities) become training samples whose label
maps are its predictions after the learned region cut (low-score regions dropped). A student is then trained
on labelled + pseudo-labelled samples, with the labelled ones repeated so they keep about half of each batch
(`labelled_share`). Optionally only confident regions are kept (`min_region_score`); the pixels of a dropped
region can be inpainted from their surroundings (`inpaint_dropped`), so that the background label the student
sees there is true of the image it sees, rather than teaching it to miss an object.
"""

import logging

import cv2
import numpy as np

from .data import Sample

logger = logging.getLogger(__name__)


def predict_pool(predictor, images: list[np.ndarray], batch_size: int = 8) -> list:
    """The predictor's Predictions of `images`, in batches."""
    preds = []
    for i in range(0, len(images), batch_size):
        preds += predictor.predict(images[i:i + batch_size])
    return preds


def pseudo_label(predictor, images: list[np.ndarray], ids: list[str], keep_share: float = 0.5,
                 min_score: float = 0.0, batch_size: int = 8, min_region_score: float = 0.0,
                 inpaint_dropped: bool = False, preds: list | None = None) -> list[Sample]:
    """Samples for the `keep_share` of `images` the predictor is most confident on (task score, and at
    least `min_score`), labelled with its predictions (regions scoring under `min_region_score` dropped);
    marked synthetic, ids prefixed "pseudo:". `preds`: the predictor's predictions of `images`, when known."""
    if len(images) != len(ids):
        raise ValueError(f"{len(images)} images but {len(ids)} ids")
    if not 0.0 < keep_share <= 1.0:
        raise ValueError(f"keep_share must be in (0, 1], got {keep_share}")
    preds = predict_pool(predictor, images, batch_size) if preds is None else preds
    order = sorted(range(len(images)), key=lambda i: -preds[i].score)
    n_keep = int(round(keep_share * len(images)))
    keep = [i for i in order[:n_keep] if preds[i].score >= min_score]
    logger.info("self-training: %d of %d unlabelled images kept as pseudo-labels (task score >= %.3f)",
                len(keep), len(images), preds[keep[-1]].score if keep else float("nan"))
    return [confident_sample(images[i], preds[i], f"pseudo:{ids[i]}", min_region_score, inpaint_dropped)
            for i in keep]


def confident_sample(image: np.ndarray, pred, id: str, min_region_score: float = 0.0,
                     inpaint: bool = False) -> Sample:
    """A Prediction as a synthetic Sample, without its regions scoring under `min_region_score` (their
    pixels inpainted in a copy of the image when `inpaint`)."""
    classes, inst = pred.classes.astype(np.int32), pred.instances.astype(np.int32)
    drop = [k for k, v in pred.instance_score.items() if v < min_region_score]
    if drop:
        gone = np.isin(inst, drop)
        classes, inst = np.where(gone, 0, classes), np.where(gone, 0, inst)
        if inpaint:  # OpenCV's Telea inpainting over the dropped regions grown by 2 px (their rims too), but
            # never over a kept object's pixels: a kept region within 2 px of a dropped one keeps its image
            mask = cv2.dilate(gone.astype(np.uint8), np.ones((5, 5), np.uint8))
            mask[inst > 0] = 0
            image = cv2.inpaint(np.ascontiguousarray(image), mask, 3, cv2.INPAINT_TELEA)
    return Sample(image, classes, inst, id=id, synthetic=True)


def mix(labelled: list[Sample], extra: list[Sample], labelled_share: float = 0.5) -> list[Sample]:
    """labelled repeated so that it is about `labelled_share` of the returned list (at least once), then
    extra: training draws samples uniformly, so this is the labelled images' share of each batch."""
    if not extra:
        return list(labelled)
    if not 0.0 < labelled_share < 1.0:
        raise ValueError(f"labelled_share must be in (0, 1), got {labelled_share}")
    want = len(extra) * labelled_share / (1.0 - labelled_share)
    reps = max(1, round(want / max(len(labelled), 1)))
    return list(labelled) * reps + list(extra)
