"""Self-training: the label model's confident predictions on unlabelled images as pseudo-labels.

Pseudo-labelling in the manner of Lee 2013 / Noisy Student (Xie et al. 2020, https://arxiv.org/abs/1911.04252):
a teacher trained on the labelled images predicts the unlabelled pool; the images it is most confident on
(its own task score, the expected foreground IoU under its probabilities) become training samples whose label
maps are its predictions after the learned region cut (low-score regions dropped). A student is then trained
on labelled + pseudo-labelled samples, with the labelled ones repeated so they keep about half of each batch.
"""

import logging

import numpy as np

from .data import Sample

logger = logging.getLogger(__name__)


def pseudo_label(predictor, images: list[np.ndarray], ids: list[str], keep_share: float = 0.5,
                 min_score: float = 0.0, batch_size: int = 8) -> list[Sample]:
    """Samples for the `keep_share` of `images` the predictor is most confident on (task score, and at
    least `min_score`), labelled with its predictions; marked synthetic, ids prefixed "pseudo:"."""
    if len(images) != len(ids):
        raise ValueError(f"{len(images)} images but {len(ids)} ids")
    if not 0.0 < keep_share <= 1.0:
        raise ValueError(f"keep_share must be in (0, 1], got {keep_share}")
    preds = []
    for i in range(0, len(images), batch_size):
        preds += predictor.predict(images[i:i + batch_size])
    order = sorted(range(len(images)), key=lambda i: -preds[i].score)
    n_keep = int(round(keep_share * len(images)))
    keep = [i for i in order[:n_keep] if preds[i].score >= min_score]
    logger.info("self-training: %d of %d unlabelled images kept as pseudo-labels (task score >= %.3f)",
                len(keep), len(images), preds[keep[-1]].score if keep else float("nan"))
    return [Sample(images[i], preds[i].classes.astype(np.int32), preds[i].instances.astype(np.int32),
                   id=f"pseudo:{ids[i]}", synthetic=True) for i in keep]


def mix(labelled: list[Sample], extra: list[Sample]) -> list[Sample]:
    """labelled repeated so that it is about half of the returned list (at least once), then extra."""
    if not extra:
        return list(labelled)
    reps = max(1, round(len(extra) / max(len(labelled), 1)))
    return list(labelled) * reps + list(extra)
