"""Which unlabelled images to label next: the model's uncertainty plus diversity over image embeddings.

Uncertainty alone (lowest task score first) keeps picking look-alikes of the same hard images; a
diversity term spreads the picks over what the labelled set does not cover yet. Embeddings are the
label model's own image features, pooled (mean and spread per channel of every encoder level). Picks
are greedy farthest-first (k-center core-set, Sener & Savarese 2018, https://arxiv.org/abs/1708.00489),
optionally weighted by uncertainty (as in weighted k-center / BADGE-style mixes,
https://arxiv.org/abs/1906.03671). `priority` is the per-task form (uncertainty x distance to the
labelled set): it needs no pass over the whole pool, so predictions could carry it. Measured against
the task score alone and random in bench/active_learning.py: at DSB's natural mix of modalities (10 seeds,
stop 20) none saves labels reliably; with one modality rare (bright-field at 5% of the pool, 4 seeds, stop
24) priority needs 44 +- 12% fewer labels than random, diversity and code histograms 39%; in a mixed
DSB + Pets project every ordering did worse than random (2 seeds), the score alone as well. Priority ranks
at least as well as the score alone in every setting measured, so the product ranks by it: each version
stores the embeddings of the images it learned from (`reference`), and /predict writes a task's score as
1 - priority (backend/predictions.py; TESSERA_SORT=score keeps the plain confidence).
"""
from __future__ import annotations

import numpy as np
import torch


@torch.inference_mode()
def embed(predictor, images: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
    """(N, D) L2-normalised image embeddings from the predictor's image encoder, each image letterboxed
    into R x R whatever the model's scale: what the image looks like as a whole, at a cost that does not
    grow with its size (one R x R encoder pass), and the same view for an image whichever batch it is in.

    Mean and standard deviation per channel of every encoder level, each level normalised on its own
    so that no level dominates; padding is part of the view at every level, as in training."""
    out = []
    for i in range(0, len(images), batch_size):
        x, _ = predictor._prepare(images[i:i + batch_size], letterbox=True)
        parts = []
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=predictor.bf16):   # as its passes run
            feats = predictor.model.features(predictor.layout(x))
        for f in feats:                                             # (B, C, h, w) per level
            # mean and (unbiased) std per channel from the first two moments: torch.std_mean over the
            # spatial dims of a channels-last map took 5x as long (1.6 vs 0.3 ms a 16 x 128 x 128 level)
            y = f.float().permute(0, 2, 3, 1).reshape(f.shape[0], -1, f.shape[1])   # (B, h*w, C)
            mean, n = y.mean(1), y.shape[1]
            var = ((y * y).mean(1) - mean * mean).clamp_min(0) * (n / max(n - 1, 1))
            v = torch.cat([mean, var.sqrt()], 1)                    # (B, 2C)
            parts.append(v / (v.norm(dim=1, keepdim=True) + 1e-8))
        e = torch.cat(parts, 1)
        out.append((e / (e.norm(dim=1, keepdim=True) + 1e-8)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@torch.inference_mode()
def code_histogram(predictor, images: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
    """(N, K) square roots of each image's VQ code histogram: the code predictor's softmax over the K label
    codes, averaged over the latent cells the image covers (not the letterbox padding). What kinds of
    label-map patches the model expects in an image, rather than what the image looks like; square roots
    make Euclidean distances Hellinger ones (at most sqrt 2 apart)."""
    out = []
    for i in range(0, len(images), batch_size):
        x, sizes = predictor._prepare(images[i:i + batch_size])
        _, query, _ = predictor._forward(x)
        probs = torch.softmax(predictor._code_logits(query), dim=1)           # (B, K, h, w)
        f = x.shape[-1] // probs.shape[-1]                                     # input px per latent cell
        for b, (h, w) in enumerate(sizes):
            cells = probs[b, :, :max(1, -(-h // f)), :max(1, -(-w // f))].flatten(1)   # (K, cells)
            out.append(cells.mean(1).sqrt().cpu().numpy())
    return np.stack(out) if out else np.zeros((0, 0), np.float32)


def distance_to_set(emb: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Euclidean distance of every row of emb (N, D) to its nearest row of ref (M, D); 2 (the largest
    distance between unit vectors) when ref is empty."""
    if len(ref) == 0:
        return np.full(len(emb), 2.0, np.float32)
    d2 = (emb ** 2).sum(1)[:, None] + (ref ** 2).sum(1)[None] - 2 * emb @ ref.T  # (N, M)
    return np.sqrt(np.maximum(d2.min(1), 0.0)).astype(np.float32)


def select(emb: np.ndarray, labelled: np.ndarray, k: int, uncertainty: np.ndarray | None = None,
           power: float = 1.0) -> list[int]:
    """Greedy farthest-first picks of k rows of emb (the pool) given the labelled embeddings.

    Each step takes the pool row with the largest distance to (labelled + picked so far), times
    uncertainty ** power when given (uncertainty in [0, 1], e.g. 1 - task score)."""
    assert emb.ndim == 2 and (len(labelled) == 0 or labelled.shape[1] == emb.shape[1]), \
        f"embeddings {emb.shape} and labelled {labelled.shape} must share the last dimension"
    k = min(k, len(emb))
    dist = distance_to_set(emb, labelled).astype(np.float64)
    weight = np.ones(len(emb)) if uncertainty is None else np.clip(uncertainty, 1e-3, 1.0) ** power
    picks: list[int] = []
    for _ in range(k):
        gain = dist * weight
        gain[picks] = -1.0
        j = int(np.argmax(gain))
        picks.append(j)
        dist = np.minimum(dist, np.sqrt(np.maximum(((emb - emb[j]) ** 2).sum(1), 0.0)))
    return picks


def priority(emb: np.ndarray, labelled: np.ndarray, scores, power: float = 1.0) -> np.ndarray:
    """Per-task priority in [0, 1] (1 = label first): uncertainty (1 - task score) ** power times the
    distance to the nearest labelled image (halved: unit embeddings are at most 2 apart). Each task's
    value needs only its own embedding and the labelled set's, so it is computed task by task, where
    predictions are made, and sorts a project of any size."""
    u = np.clip(1.0 - np.asarray(scores, np.float64), 0.0, 1.0) ** power
    return (u * novelty(emb, labelled)).astype(np.float32)


def novelty(emb: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Distance of each embedding to the nearest reference one, halved into [0, 1] (unit vectors are at
    most 2 apart): 0 for an image like one already learned from, 1 when the reference is empty."""
    return np.clip(distance_to_set(emb, ref) / 2.0, 0.0, 1.0)


def reference(predictor, images: list[np.ndarray], cap: int = 2048) -> np.ndarray:
    """(M, D) float16 embeddings of the images a version learned from, M <= cap: above `cap` images, the
    cap farthest-first picks among them (k-center: every image left out is near a kept one, so the
    distance to the kept set overstates the distance to the whole set by at most that radius)."""
    emb = embed(predictor, images)
    if len(emb) > cap:
        emb = emb[select(emb, emb[:0], cap)]
    return emb.astype(np.float16)
