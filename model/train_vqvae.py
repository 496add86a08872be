"""Train the label VQ-VAE and its code predictor: one entry point for the CLI, training jobs and benchmarks.

A flat loop in the style of nanoGPT's train.py (get_batch / estimate / get_lr / loop). Every batch is
split: some samples are decoded from the VQ codes of their true label map (the VQ-VAE reconstruction, with
the image dropped at random so layouts decode alone), the others from the codes the predictor reads off
the image (the inference path). One decoder pass trains both. Two phases in one run: until vq_phase the
codebook moves (EMA, dead-code restarts); then it and the label encoder freeze and the code predictor head
also learns cross-entropy against the (now fixed) true codes. Losses: class-weighted cross-entropy on
area-averaged (soft) label maps + foreground soft Dice + commitment.
Run: python -m tessera.model.train_vqvae --data=DIR --time_budget_s=60
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from . import acquisition, metrics
from .checkpoint import load_checkpoint, save_checkpoint
from .config import from_args
from .data import Sample
from .inference import (EDIT_THRESHOLDS, Predictor, bf16_supported, boxes_prediction, cut_regions, fit_size,
                        image_stats, letterbox_floor, normalize_image, pad_target, pad_to, resize, resolve_device,
                        scale_for_size, scaled_size, soft_target, typical_object_size, vqvae_from_checkpoint)
from .postprocess import (RegionCut, choose_cut, cut_grid, detection_metrics, fit_box_scale, fuse_boxes,
                          image_record, object_slices, scale_boxes, spread_subset, true_objects)
from .boxhead import box_losses, encode_boxes
from .vqvae import VQVAE, VQVAEConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    # optimisation
    lr: float = 3e-3                 # Pets heads, 2,400 iterations, seeds 0 / 1: AP50 0.863 / 0.829; 1.5e-3 0.823 /
                                     # 0.827; weight_decay 0.05 (of 1e-4) 0.835 / 0.774 (stop 49: not changed)
    min_lr: float = 1e-4
    # a run that starts from a trained model (a project's later versions: warm start) peaks here instead: a
    # fresh AdamW at 3e-3 undid much of what a short run started from. DSB 256 px, a version of 150 iterations
    # on 10 images, then 30 more on 30 images (seeds 0 / 1): score 0.683 / 0.673 -> 0.623 / 0.524 at 3e-3,
    # 0.671 / 0.622 at 1e-3; 120 more: 0.692 / 0.668 vs 0.684 / 0.672; 300 more: 0.703 / 0.696 vs 0.712 /
    # 0.707 (bench/warm_start.py). DSB native boxes, 600 more from a 2,400-iteration version: AP50 0.820 at
    # 3e-3, 0.824 at 1e-3 (stop 27).
    warm_lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 1.0           # clip gradients at this norm (0 = off)
    batch_size: int = 8
    max_iters: int = 400
    warmup_iters: int = 20
    eval_interval: int = 100
    log_interval: int = 20
    time_budget_s: float = 0.0       # > 0: stop after this many seconds (the lr schedule follows the clock)
    seed: int = 0
    device: str = "auto"
    threads: int = 0                 # torch CPU threads; 0 leaves torch's default
    bf16: bool = True                # bfloat16 autocast where the hardware has it (AMX / AVX512-BF16, CUDA)
    # data and augmentation
    resolution: int = 128
    crop: int = 96                   # training crops (crop x crop) of the scaled image; <= resolution. Tried
                                     # 128 on Pets heads (2,400 iterations, seeds 0 / 1, stop 48): AP50 0.863 /
                                     # 0.829 -> 0.724 / 0.732, at ~1.5x the time an iteration
    object_px: float = 6.5           # images are seen at the scale that makes the median object this many
                                     # model px across (sqrt of its area); 0 = letterbox whole images to R
    max_scale: float = 1.0           # never look closer than the image's own pixels
    flips: bool = True
    rot90: bool = True
    scale_min: float = 0.8           # random zoom around the letterbox scale
    scale_max: float = 1.25          # tried 0.5-2.0 for box models (DSB native, 600 iterations, 3 seeds):
                                     # AP50 0.624 +- 0.010 vs 0.644 +- 0.009, lower on every seed; scale_min
                                     # 0.6 on Pets heads (2,400 iterations, seeds 0 / 1, stop 48): 0.863 /
                                     # 0.829 -> 0.749 / 0.770
    jitter: float = 0.2              # brightness / contrast / gamma jitter strength (0 = off)
    class_balance: float = 1.0       # > 0: images of rarer classes are drawn more often (class_draw_weights):
                                     # a class in a share f_c of the images gets (f_max / f_c) ** this, at most
                                     # MAX_REPEAT; one class or equal shares draw as before. Pets heads (two
                                     # cat photos to a dog photo), 2,400 iterations, patience 4, seeds 0-4, 1 vs 0:
                                     # AP50 0.803 +- 0.033 vs 0.762 +- 0.036, higher on every seed (dog 0.70-0.80
                                     # vs 0.57-0.75; stop 37, bench/HISTORY.md)
    # model and losses
    widths: tuple = (16, 32, 64, 96) # tried (8, 32, 64, 96): the network pass 0.68x the CPU, DSB native fg IoU
                                     # 0.795 / 0.801 / 0.750 vs 0.799 / 0.806 / 0.793 (seeds 0-2): not kept
    stem_stride: int = 1             # 2: space-to-depth stem, the first level at R/2 (VQVAEConfig.stem_stride);
                                     # widths then name the levels R/2, R/4, R/8: give three, e.g. 32,64,96.
                                     # stem_stride=2 widths=32,64,96: the network pass 0.48x the CPU at 264x352
                                     # (DSB native's input, bench.micro --net); DSB native, 600 iterations,
                                     # seeds 0-2 against the default: fg IoU 0.794 +- 0.005 vs 0.799 +- 0.007
                                     # (lower on every seed, -0.003 to -0.007), box recall 0.651 vs 0.636 and
                                     # box AP50 0.567 vs 0.559 (higher on every seed). widths=48,64,96 (0.58x),
                                     # seed 0: fg IoU 0.792 (32: 0.792, default 0.799). DSB at 256 px, 32,64,96,
                                     # seeds 0-2: fg IoU 0.787 vs 0.796, box recall 0.584 vs 0.601, AP50 0.523
                                     # vs 0.536, lower on every seed: not the default (box heads and refinement
                                     # not measured)
    codebook_size: int = 512
    embed_dim: int = 64
    image_dropout: float = 0.3       # share of the reconstruction samples decoded without the image
    recon_fraction: float = 0.3      # share of each batch decoded from the true codes
    boundary_width: int = 1
    boundary_weight: float = 3.0     # cross-entropy weight of the boundary class (undone at inference)
    contact_weight: float = 2.0      # > 0: U-Net-style extra pixel-loss weight where two objects meet
                                     # (contact_weights: w0 exp(-r^2 / 2 sigma^2), r the least distance
                                     # in model px holding two objects), so that touching objects part; 0 = off
    contact_sigma: float = 1.0       # its fall-off, in model px. 600 iterations, w0 2 / 5 / 0: DSB native box
                                     # recall 0.653 +- 0.005 / 0.683 +- 0.011 / 0.636 +- 0.005, fg IoU 0.797 /
                                     # 0.797 / 0.799 (3 seeds); DSB clump clicks 0.607, 0.643 / 0.623, 0.626 /
                                     # 0.558, 0.588 (training seeds 0, 1), scribble 0.788, 0.794 / 0.775, 0.769
                                     # / 0.793, 0.791, click 0.750, 0.765 / 0.740, 0.698 / 0.773, 0.761; demo
                                     # clump 0.794 / 0.772 / 0.806, scribble 0.840 / 0.828 / 0.828, click 0.840
                                     # / 0.844 / 0.864. 5 costs scribbles and clicks, 2 keeps them within the
                                     # hint draws' spread (bench/HISTORY.md, stops 21-22). Box models (stop 23):
                                     # DSB native boxes AP50 0.657 vs 0.651 (noise); a no-op with one object an image (Pets heads)
    inner_edge_weight: float = 0.0   # > 0: extra pixel-loss weight x the network's own (detached) boundary
                                     # probability on pixels wholly inside an object (inner_edge_weights):
                                     # false cuts deep inside, not the outline's width, the gaps or the background.
                                     # With contact_weight 5, 600 iterations (stop 22, bench/HISTORY.md): clump clicks
                                     # DSB 0.647 / 0.652 (training seeds 0 / 1) vs 0.558 / 0.588 without either
                                     # and 0.623 / 0.626 with contact_weight alone, demo 0.831 vs 0.806; scribble
                                     # DSB 0.782 / 0.785 vs 0.793 / 0.791; but DSB native box recall 0.624 +-
                                     # 0.002 vs 0.636 +- 0.005 (0.683 with contact_weight alone), fg IoU 0.790
                                     # vs 0.799 (3 seeds): worse at native size, so off
    # Tried and not kept: a thicker boundary only where objects touch (the foreground within 2 model px of
    # a contact made boundary in the target, 1 px outline elsewhere): DSB clump clicks 0.648 +- 0.041 vs
    # 0.558 but still 40% below 0.5 (24 of 36 failures merged), scribble 0.781 vs 0.793, click 0.748 vs
    # 0.773 (600 iterations, seed 0, hint draws 0-2; bench/results/interactive_bound5_cband2_dsb.json);
    # removed to keep one option (not measured at native size). Stop 22: with contact_weight 5, the extra
    # weight w x (the network's background + boundary probability beyond the soft target's) on every pixel
    # (charging cuts into objects, but also a wider outline and background inside): DSB native fg IoU 0.780 /
    # 0.782, box recall 0.640 / 0.602 (seeds 0 / 1; vs 0.799 / 0.636 without either), DSB clump clicks 0.600
    # (29 of 35 failures merged), scribble 0.759 (seed 0); demo clump 0.825, scribble 0.840
    # (bench/results/*interior5*.json): worse on DSB, removed
    dice_weight: float = 0.5         # foreground soft-Dice loss weight
    code_weight: float = 0.5         # code cross-entropy weight, from the vq_phase on (codes move before)
    vq_phase: float = 0.5            # after this share of the run the codebook and label encoder freeze,
                                     # so the code predictor learns against fixed codes
    # regions kept (model/postprocess.py)
    box_shrink: float = 1.0          # < 1: samples are box-labelled, their label maps hold box centres this size
    point_side: float = 0.0          # > 0: a counting project's samples, each point a box of this side (image px,
                                     # postprocess.points_to_boxes); the model's boxes are judged and cut at it
    box_head: bool = True            # box-labelled (box_shrink < 1): also learn a detection head whose boxes
                                     # are the predictions (model/boxhead.py); False: centres grown into boxes
    mask_box_head: bool = True       # mask-labelled runs also learn the detection head, on boxes taken from the
                                     # instance maps; its boxes are what a RectangleLabels control gets (before:
                                     # the masks' bounding boxes). The model keeps the masks' scale, state
                                     # selection and region cut; the head gets its own cut (box_cut). Learning
                                     # where each object is and how large also parts the masks' touching objects
                                     # better: DSB native, 600 iterations, seeds 0-2 (stop 32, bench/HISTORY.md):
                                     # the masks' box AP50 0.587 / 0.546 / 0.539 -> 0.639 / 0.647 / 0.625, box
                                     # recall 0.677 / 0.634 / 0.649 -> 0.733 / 0.722 / 0.706, fg IoU 0.811 /
                                     # 0.810 / 0.812 -> 0.814 / 0.815 / 0.812; the head's own boxes AP50 0.746
                                     # / 0.742 / 0.731, recall 0.813 / 0.812 / 0.800
    mask_head_max_px: float = 32.0   # ... only where the median object is at most this many model px across at
                                     # the masks' scale (the head's cells see an object's middle; a box model's
                                     # object_px above 24 lost AP50, see box_object_px). Pets' whole animals
                                     # (~68 model px) got head AP50 0.39-0.46 against the masks' boxes' 0.77, and
                                     # learning it cost their masks (seed 1: instance recall 0.737 -> 0.667,
                                     # mIoU 0.245 -> 0.209); DSB's nuclei are ~7 (6.6 at 256 px, 7.6 native)
    box_weight: float = 1.0          # weight of the detection head's loss (tried 3 on Pets heads, 600 iterations,
                                     # seed 0: AP50 0.466 against 0.516, regions_pets_heads_600_bw3.json)
    mask_box_weight: float = 1.0     # ... and of a mask model's head (mask_box_head), in runs of at least
    mask_box_full_iters: int = 600   # this many iterations of the model's life (warm start's included); shorter
                                     # runs weigh it by the square of their share (mask_head_weight). At full
                                     # weight a short run's head took over the shared features: procedural
                                     # nuclei, the tests' small model, 300 iterations: the instance split found
                                     # no more objects than connected components at weight 1 or 0.5 (0.39 both),
                                     # 0.515 against 0.379 at 0.25; default widths, 150 iterations: recall 0.295
                                     # at 1, 0.369 at 0.25, 0.361 without a head. At 600 iterations weight 1 is
                                     # the better: those nuclei 0.552 against 0.488 without a head, DSB native
                                     # (bench.regions, seeds 0-2) masks' box AP50 0.653 against 0.606 at 0.25
                                     # and the head's 0.742 against 0.717 (stop 34, bench/HISTORY.md)
    box_level: int = 1               # the detection head's finest feature level: cells of 2 ** box_level model
                                     # px. Tried 2 (4 px cells) on Pets heads, 600 iterations, seed 0: AP50
                                     # 0.452 against 0.516 (regions_pets_heads_600_level2.json): not the default
    box_select: bool = True          # a box model keeps the state with the best held-back box AP50 (what its
                                     # project is judged by), not the best segmentation IoU of its centre map
    select_images: int = 48          # ... measured on at most this many held-back images (spread_subset, the same
                                     # ones every evaluation; 0 = all). Each evaluation predicts them at full
                                     # size: 95 DSB native images took ~7 s at 2 threads, so a project of
                                     # thousands of tasks would spend its run evaluating. The region cut, the
                                     # version's metrics and its promotion still use every held-back task
    box_object_px: float = 24.0      # object_px of a model with a box head: its cells are 2 px, so an object
                                     # spans ~12 of them (a whole Pets image at 6.5 px would be ~25 x 34 px).
                                     # Pets heads, 2,400 iterations, patience 4, seeds 0-4 (stop 29): 16 (scale
                                     # 0.33, a photo seen 63 x 84 px) AP50 0.764 +- 0.033; 24 (scale 0.49)
                                     # 0.786 +- 0.045, higher on 4 of 5 seeds (paired +0.022; seed 4 0.711 vs
                                     # 0.806); 32 (0.66, a photo larger than the 96 px training crop) 0.609 /
                                     # 0.734 (seeds 0 / 1). DSB's nuclei are seen at max_scale (1.0) either way
    box_max_scale: float = 1.0       # max_scale of a model with a box head (> 1: small objects seen closer
                                     # than the image's own pixels, at s^2 the forward cost). Tried 2.0 (the
                                     # median box at box_object_px) on DSB boxes, 600 iterations: 256 px scale
                                     # 1.79 AP50 0.505 +- 0.021 vs 0.522 +- 0.020 (3 seeds; boxes >= 24 px
                                     # 0.69 -> 0.48 recall), native scale 1.53 0.505 vs 0.633 (seed 0) at 2.3x
                                     # the forward time: not the default
    box_floor: float = 0.5           # a box model's least scale, as a share of the letterbox floor (the scale
                                     # that shows the median image R px long): large objects (a Pets head, a
                                     # third of the photo) are seen smaller, inside the encoder's ~75 px
                                     # receptive field. Pets heads, 600 iterations, seeds 0-2, 1.0 -> 0.5 (scale
                                     # 0.5 -> 0.33): AP50 0.159 +- 0.048 -> 0.210 +- 0.009 with quarter turns,
                                     # 0.443 +- 0.081 -> 0.462 +- 0.079 without (within the noise; precision
                                     # after the cut 0.45 -> 0.61). DSB's scale is set by its small nuclei:
                                     # the floor does not bind there
    precision_target: float = 0.0    # > 0: the learned region cut reaches this precision at the best recall,
                                     # else it maximises F1
    patience: int = 0                # > 0: stop after this many evaluations without a better validation
                                     # (from the vq_phase on); max_iters / time_budget_s stay the cap

    @classmethod
    def from_args(cls, argv: list[str]) -> "TrainConfig":
        """--key=value overrides of existing fields (model/config.py)."""
        return from_args(cls, argv)


# -----------------------------------------------------------------------------
# data


MAX_REPEAT = 4.0   # class_draw_weights: a class is drawn at most this many times as often as its share


def class_draw_weights(samples: list[Sample], power: float) -> np.ndarray | None:
    """Probabilities (N,) of drawing each sample so that rarer classes are seen more often, or None where every
    sample would get the same one (one class, equal shares, power 0), so that those runs draw as before.

    Repeat-factor sampling (Gupta et al., LVIS 2019, https://arxiv.org/abs/1908.03195) with the most frequent
    class as its threshold: a class present in a share f_c of the samples gets r_c = (f_max / f_c) ** power
    (capped at MAX_REPEAT), a sample the largest r_c of the classes it holds (1 for one holding none). A box
    project's classes are its boxes' (Pets heads: two cat photos to a dog photo, so a dog photo is drawn twice
    as often at power 1 and each class is seen in half the crops)."""
    if power <= 0 or len(samples) < 2:
        return None
    present = [np.unique(s.boxes[:, 4]).astype(int) if s.boxes is not None and len(s.boxes)   # bincount: one
               else np.flatnonzero(np.bincount(s.classes.ravel())[1:]) + 1 for s in samples]  # linear pass
    counts = Counter(c for cs in present for c in cs.tolist())
    if len(set(counts.values())) < 2:
        return None
    top = max(counts.values())
    repeat = {c: min(MAX_REPEAT, (top / n) ** power) for c, n in counts.items()}
    w = np.array([max((repeat[c] for c in cs.tolist()), default=1.0) for cs in present], np.float64)
    return w / w.sum()


class Batcher:
    """Random augmented crops of samples at the model's scale (or letterboxed to R when scale is None)
    -> (images (B, 3, S, S), targets (B, L, S, S))."""

    def __init__(self, samples: list[Sample], cfg: TrainConfig, n_classes: int, seed: int,
                 invert_bright: bool = True, scale: float | None = None, with_boxes: bool = False):
        if not samples:
            raise ValueError("training needs at least one labelled sample")
        self.samples, self.cfg, self.n_classes, self.scale = samples, cfg, n_classes, scale
        self.rng = np.random.default_rng(seed)
        self.stats = [image_stats(s.image, invert_bright) for s in samples]  # whole-image stretch per sample
        self.draw = class_draw_weights(samples, cfg.class_balance)   # None: uniform
        self.boxes = None       # with boxes: each sample's objects as boxes (N, 5), for a box head
        if with_boxes:
            self.boxes = [np.concatenate([b, c[:, None]], 1) for b, c in map(true_objects, samples)]

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.sample_boxes(i)[:2]

    def sample_boxes(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """One augmented crop: (image (S, S, 3), target (S, S, L), its objects' boxes (N, 5) in crop px
        (x0, y0, x1, y1, class), or None when the batcher keeps no boxes)."""
        return self.sample_weighted(i)[:3]

    def sample_weighted(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """sample_boxes + the crop's extra pixel-loss weight (S, S) float32 where objects meet (padding 0),
        or None when cfg.contact_weight is 0."""
        cfg, rng, R, S = self.cfg, self.rng, self.cfg.resolution, self.cfg.crop
        s = self.samples[i]
        img, cls, inst = s.image, s.classes, s.instances
        boxes = None if self.boxes is None else self.boxes[i]
        if cfg.rot90 and (k := int(rng.integers(4))):
            H, W = img.shape[:2]
            for _ in range(k if boxes is not None else 0):   # np.rot90 (counter-clockwise): (x, y) -> (y, W - x)
                boxes = np.stack([boxes[:, 1], W - boxes[:, 2], boxes[:, 3], W - boxes[:, 0], boxes[:, 4]], 1)
                H, W = W, H
            img, cls, inst = np.rot90(img, k), np.rot90(cls, k), np.rot90(inst, k)
        if cfg.flips and rng.random() < 0.5:
            if boxes is not None:
                W = img.shape[1]
                boxes = np.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3], boxes[:, 4]], 1)
            img, cls, inst = img[:, ::-1], cls[:, ::-1], inst[:, ::-1]
        H, W = img.shape[:2]        # img, cls, inst may be rotated / flipped views: only the crop is copied
        zoom = math.exp(rng.uniform(math.log(cfg.scale_min), math.log(cfg.scale_max)))
        base = fit_size(H, W, R) if self.scale is None else scaled_size(H, W, self.scale)
        nh, nw = (max(1, round(n * zoom)) for n in base)
        y0, x0 = int(rng.integers(0, max(nh - S, 0) + 1)), int(rng.integers(0, max(nw - S, 0) + 1))
        # crop in original pixels first so that resizing stays cheap for large zooms
        sy, sx = H / nh, W / nw
        oy0, oy1 = int(y0 * sy), min(H, math.ceil((y0 + S) * sy))
        ox0, ox1 = int(x0 * sx), min(W, math.ceil((x0 + S) * sx))
        ch, cw = min(S, round((oy1 - oy0) / sy)), min(S, round((ox1 - ox0) / sx))
        ch, cw = max(ch, 1), max(cw, 1)
        # the crop, not the whole image, made contiguous: a copy of a rotated 2048 x 2048 sample's three maps
        # took ~60 ms per crop, half of a training step on such images (stop 44)
        img, cls, inst = (np.ascontiguousarray(a[oy0:oy1, ox0:ox1]) for a in (img, cls, inst))
        x = normalize_image(resize(img, ch, cw), self.stats[i])
        if cfg.jitter > 0:
            j = cfg.jitter
            x = x ** math.exp(rng.uniform(-j, j)) * rng.uniform(1 - j, 1 + j) + rng.uniform(-j / 2, j / 2)
            x = x.clip(0, 1).astype(np.float32)
        target = soft_target(cls, inst, self.n_classes, ch, cw, cfg.boundary_width)
        if boxes is not None:
            boxes = crop_boxes(boxes, ox0, oy0, cw / (ox1 - ox0), ch / (oy1 - oy0), cw, ch)
        weight = None
        if cfg.contact_weight > 0:
            px = max(cls.shape[0] / ch, cls.shape[1] / cw)    # image px per model px
            weight = pad_to(resize(contact_weights(np.where(cls > 0, inst, 0), px, cfg.contact_weight,
                                                   cfg.contact_sigma), ch, cw), S)
        return pad_to(x, S), pad_target(target, S), boxes, weight

    def get_batch(self, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor, list | None, torch.Tensor | None]:
        """(images (B, 3, S, S), targets (B, L, S, S), per image boxes (N, 5) in crop px or None, extra
        pixel-loss weights (B, S, S) where objects meet or None)."""
        n = len(self.samples)
        idx = self.rng.integers(0, n, batch_size) if self.draw is None else self.rng.choice(n, batch_size, p=self.draw)
        xs, ts, bs, ws = zip(*(self.sample_weighted(int(i)) for i in idx))
        x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2)  # (B, S, S, 3) -> (B, 3, S, S)
        t = torch.from_numpy(np.stack(ts)).permute(0, 3, 1, 2)  # (B, S, S, L) -> (B, L, S, S)
        w = None if ws[0] is None else torch.from_numpy(np.stack(ws)).to(device)
        return x.to(device), t.to(device), None if self.boxes is None else list(bs), w


def contact_weights(instances: np.ndarray, px: float, w0: float, sigma: float = 1.0) -> np.ndarray:
    """Extra pixel-loss weight (H, W) float32 where two objects meet (Ronneberger et al.'s U-Net weight
    map w0 exp(-(d1 + d2)^2 / 2 sigma^2), adapted): r = the least chessboard radius, in model px (`px`
    image px each), whose window holds two different objects; weight w0 exp(-r^2 / 2 sigma^2), 0 where
    no radius up to 3 sigma does. Both sides of a contact and a narrow gap get it; background far from
    objects and lone objects get 0. Each radius is one max and one min filter of the ids (OpenCV), so
    the cost is a few filters per crop, not one distance transform per object."""
    inst = instances.astype(np.float32)                      # ids exact below 2**24
    ids = np.where(inst > 0, inst, np.float32(2 ** 24))
    out = np.zeros(inst.shape, np.float32)
    steps = max(1, math.ceil(3 * sigma * px))                # radii up to steps image px, at most 4 of them
    n = min(steps, 4)
    for r in sorted({1 + round((steps - 1) * j / max(n - 1, 1)) for j in range(n)}, reverse=True):
        out[_two_objects_within(inst, ids, r)] = w0 * math.exp(-(r / px) ** 2 / (2 * sigma ** 2))
    return out


def _two_objects_within(inst: np.ndarray, ids: np.ndarray, r: int) -> np.ndarray:
    """Pixels whose (2r + 1)^2 window holds two different object ids (inst: ids as float32, 0 background;
    ids: the same with background 2**24): the window's max and min id differ."""
    kernel = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
    lo, hi = cv2.erode(ids, kernel), cv2.dilate(inst, kernel)
    return (lo < 2 ** 24) & (hi != lo)


def crop_boxes(boxes: np.ndarray, x0: float, y0: float, sx: float, sy: float, width: int, height: int,
               min_visible: float = 0.25) -> np.ndarray:
    """Boxes (N, 5) in image px -> in a crop from (x0, y0) scaled by (sx, sy), clipped to it; boxes with
    less than min_visible of their area inside are dropped (a sliver says little about its object)."""
    b = (np.asarray(boxes, np.float64).reshape(-1, 5) - [x0, y0, x0, y0, 0]) * [sx, sy, sx, sy, 1]
    c = b.copy()
    c[:, [0, 2]] = c[:, [0, 2]].clip(0, width)
    c[:, [1, 3]] = c[:, [1, 3]].clip(0, height)
    area = lambda a: (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)  # noqa: E731
    return c[area(c) >= min_visible * np.maximum(area(b), 1e-9)]


UPRIGHT_SHIFT = 0.05   # objects' mean centre this far (share of the image) from the middle, ...
UPRIGHT_Z = 4.0        # ... and this many standard errors: the images have an up (and the model keeps it)


def upright(samples: list[Sample]) -> bool:
    """Whether the labelled objects sit off the image's middle along an axis (per image the mean centre of
    its objects, relative to the image; then over images): Pets heads sit at 0.37 of the height (20
    standard errors off), DSB nuclei at 0.51 / 0.50 (1.5). Quarter turns would then show the model
    heads sideways and upside down, which it never meets: Pets head boxes without them, 600 iterations,
    3 seeds, AP50 0.443 +- 0.081 against 0.159 +- 0.048 (box_floor 1.0), 0.462 +- 0.079 against 0.210 +-
    0.009 (box_floor 0.5; bench/results/regions_pets_heads_600_*.json). Mask models keep them (unmeasured)."""
    centres = []
    for s in samples:
        b, _ = true_objects(s)
        if len(b):
            H, W = s.image.shape[:2]
            centres.append((((b[:, 0] + b[:, 2]) / (2 * W)).mean(), ((b[:, 1] + b[:, 3]) / (2 * H)).mean()))
    if len(centres) < 3:
        return False
    c = np.array(centres)                                   # (images, 2): x, y
    shift = np.abs(c.mean(0) - 0.5)
    z = shift / (c.std(0) / math.sqrt(len(c)) + 1e-9)
    return bool(((shift >= UPRIGHT_SHIFT) & (z >= UPRIGHT_Z)).any())


def letterbox_set(samples: list[Sample], config: VQVAEConfig, n_classes: int, scale: float | None = None):
    """Validation inputs as the Predictor sees them: (images, targets) tensors of R x R, each sample
    letterboxed to R (scale None) or seen at `scale` and cut to its central R x R window (a cheap
    stand-in for the sliding window; the final evaluation runs the Predictor at native size)."""
    R, width = config.resolution, config.boundary_width
    xs, ts = [], []
    for s in samples:
        H, W = s.image.shape[:2]
        nh, nw = fit_size(H, W, R) if scale is None else scaled_size(H, W, scale)
        # the central window, in original pixels, that becomes at most R x R model pixels
        wh, ww = min(H, math.ceil(R / nh * H)), min(W, math.ceil(R / nw * W))
        y0, x0 = (H - wh) // 2, (W - ww) // 2
        ch, cw = min(R, nh), min(R, nw)
        sl = np.s_[y0:y0 + wh, x0:x0 + ww]
        small = resize(s.image, nh, nw)
        stats = image_stats(small, config.invert_bright)                 # whole-image stretch, as inference
        xs.append(pad_to(normalize_image(resize(s.image[sl], ch, cw), stats), R))
        ts.append(pad_target(soft_target(s.classes[sl], s.instances[sl], n_classes, ch, cw, width), R))
    # (N, R, R, C) -> (N, C, R, R)
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2), torch.from_numpy(np.stack(ts)).permute(0, 3, 1, 2)


# -----------------------------------------------------------------------------
# losses, evaluation, schedule


def compute_losses(model: VQVAE, x, target, cfg: TrainConfig, class_weight, code_weight: float,
                   boxes: list | None = None, pixel_weight: torch.Tensor | None = None) -> dict:
    """One decoder pass over a batch split into reconstruction and prediction samples (+ the box head's
    losses on the same image features when the model has one and the batch has boxes)."""
    B = x.shape[0]
    feats = model.features(x)
    z_q, commit_loss, indices = model.encode(target)
    code_logits = model.predict_codes(feats=feats)
    z_pred = model.embed_codes(code_logits)
    # the code cross-entropy trains the predictor head only: its early, large values must not disturb
    # the image features that pixel accuracy rests on
    ce_logits = model.predict_codes(feats=[f.detach() for f in feats]) if code_weight > 0 else code_logits.detach()
    recon = (torch.arange(B, device=x.device) < round(B * cfg.recon_fraction))[:, None, None, None]
    z = torch.where(recon, z_q, z_pred)
    drop = recon & (torch.rand(B, 1, 1, 1, device=x.device) < cfg.image_dropout)
    logits = model.decoder(z, [f * (~drop).to(f.dtype) for f in feats])
    probs = logits.softmax(1)
    pix = F.cross_entropy(logits, target, weight=class_weight, reduction="none")  # (B, S, S)
    if cfg.inner_edge_weight > 0:                       # extra weight on boundary drawn deep inside an object
        inner = inner_edge_weights(probs.detach(), target, cfg.inner_edge_weight)
        pixel_weight = inner if pixel_weight is None else pixel_weight + inner
    if pixel_weight is not None:                        # contact_weights (where objects meet) + inner_edge_weights
        pix = pix * (1 + pixel_weight)
    pix = pix.mean((1, 2))  # (B,)
    # soft Dice on the foreground: IoU-like, so images with a few small objects count as much as crowded ones
    p_fg, t_fg = 1 - probs[:, 0], 1 - target[:, 0]
    dice = 1 - (2 * (p_fg * t_fg).sum((1, 2)) + 1) / (p_fg.sum((1, 2)) + t_fg.sum((1, 2)) + 1)  # (B,)
    pix = pix + cfg.dice_weight * dice
    r = recon.view(B)
    out = {"pix": pix.mean(), "code": F.cross_entropy(ce_logits, indices), "commit": commit_loss}
    out["loss"] = out["pix"] + code_weight * out["code"] + out["commit"]
    if model.box_head is not None and boxes is not None:
        heads = model.detect(feats)
        targets = encode_boxes(boxes, model.config.box_classes, heads[0].shape[-2:], model.box_head.stride)
        out["box"] = box_losses(heads, {k: v.to(x.device) for k, v in targets.items()})["box"]
        weight = cfg.box_weight if cfg.box_shrink < 1.0 else cfg.mask_box_weight    # box model / mask model
        out["loss"] = out["loss"] + weight * out["box"]
    out["rec"] = pix[r].mean() if r.any() else pix.new_zeros(())
    out["seg"] = pix[~r].mean() if (~r).any() else pix.new_zeros(())
    return out


def inner_edge_weights(probs: torch.Tensor, target: torch.Tensor, w: float) -> torch.Tensor:
    """Extra pixel-loss weight (B, S, S): w x the boundary probability (B, L, S, S) the network gives pixels
    wholly inside an object (soft target: no background and no boundary share, so >= ~1 model px from any
    outline, contacts included), 0 elsewhere. It leaves the background / object decision and the outline's
    width alone: only cuts through an object's inside are charged."""
    inner = (target[:, 0] == 0) & (target[:, -1] == 0)
    return w * inner * probs[:, -1].float()


@torch.no_grad()
def estimate(model: VQVAE, val, batch_size: int, device, edge_weight: float = 1.0) -> dict:
    """Validation at R on the inference path: cross-entropy, foreground IoU and code accuracy."""
    model.eval()
    x_all, t_all = val
    inter = union = 0
    ce, acc, n = 0.0, 0.0, 0
    for i in range(0, len(x_all), batch_size):
        x, t = x_all[i:i + batch_size].to(device), t_all[i:i + batch_size].to(device)
        logits, code_logits = model.segment(x)
        ce += F.cross_entropy(logits, t, reduction="sum").item() / t[0, 0].numel()
        _, _, indices = model.encode(t)
        acc += (code_logits.argmax(1) == indices).float().mean((1, 2)).sum().item()
        logits[:, -1] -= math.log(edge_weight)  # undo the boundary class weight, as the Predictor does
        pred_fg, true_fg = logits.softmax(1)[:, 0] < 0.5, t[:, 0] < 0.5
        inter += (pred_fg & true_fg).sum().item()
        union += (pred_fg | true_fg).sum().item()
        n += len(x)
    model.train()
    return {"val_loss": ce / n, "val_iou_r": inter / max(union, 1), "val_code_acc": acc / n}


def raw_predictions(predictor, samples: list[Sample], batch_size: int = 8) -> list:
    """Every region the predictor finds on the samples, before any region cut (a stand-in without a
    region cut: what its predict() returns)."""
    out = []
    for i in range(0, len(samples), batch_size):
        images = [s.image for s in samples[i:i + batch_size]]
        out += predictor.predict(images, cut=False) if hasattr(predictor, "cut") else predictor.predict(images)
    return out


# a box model's extra test-time passes (Predictor.box_scales: the image also seen at these multiples of the
# model's scale, the passes' boxes fused), in order of cost; a version keeps the costlier where it raises its
# held-back box AP50 by at least BOX_SCALES_GAIN over the cheaper (choose_box_scales). The same checkpoints,
# before -> (0.7,) / (0.7, 1.4) (stop 41, bench/HISTORY.md): Pets heads, 2,400 iterations, seeds 0-2, AP50
# 0.786 -> 0.828 / 0.850 (a whole photo seen smaller puts a pet's head inside the encoder's receptive field;
# (0.8, 1.25) 0.794, (0.6, 1.6) 0.847); DSB at 256 px, 600 iterations, 0.672 -> 0.676 / 0.710 (its small
# nuclei seen larger); DSB native 0.728 -> 0.744 / 0.740, the second at 4x the prediction time
BOX_SCALE_CANDIDATES = ((0.7,), (0.7, 1.4))
BOX_SCALES_GAIN = 0.01


def choose_box_scales(predictor: Predictor, samples: list[Sample], batch_size: int = 8) -> dict | None:
    """Which extra passes this box model makes (Predictor.box_scales: none or one of BOX_SCALE_CANDIDATES),
    decided on held-back samples by box AP50 before any cut: a costlier choice must beat the cheaper one kept
    so far by BOX_SCALES_GAIN. Sets predictor.box_scales; returns what the checkpoint keeps, or None when the
    predictor has no choice to make (a mask model, a head beside masks, a model without a scale, no samples)."""
    if not predictor.has_box_head or predictor.head_beside_masks or predictor.scale is None or not samples:
        return None
    # one pass of the encoder and the head per image and scale, each candidate's boxes fused from them (as
    # Predictor._logits fuses them): predict() per candidate made 6 full passes per image for 3 scales
    factors = sorted({1.0, *(f for c in BOX_SCALE_CANDIDATES for f in c)})
    found = {f: [] for f in factors}
    for i in range(0, len(samples), batch_size):
        images = [s.image for s in samples[i:i + batch_size]]
        for f in factors:
            found[f] += predictor.boxes_at(images, None if f == 1.0 else predictor.scale * f)
    ap = {}
    for cand in ((), *BOX_SCALE_CANDIDATES):
        raws = [boxes_prediction(fuse_boxes([d, *(found[f][n] for f in cand)]) if cand else d)
                for n, d in enumerate(found[1.0])]
        ap[cand] = detection_metrics(raws, predictor.cut, samples, predictor.n_classes)["box_ap50"]
    best = ()
    for factors in BOX_SCALE_CANDIDATES:
        if ap[factors] >= ap[best] + BOX_SCALES_GAIN:
            best = factors
    predictor.box_scales = best
    return {"on": bool(best), "factors": list(best), "n_images": len(samples),
            "ap50": {",".join(map(str, f)) or "none": v for f, v in ap.items()}}


# pixels, in millions, of the held-back images a version checks its label-edit suggestions' confidence on
# (choose_edit_confident): the first images up to it, at least one (a 2048 px image is 4.2)
EDIT_CHECK_MEGAPIXELS = 8.0


def drawn_rectangles(instances: np.ndarray, min_area: int = 16) -> np.ndarray:
    """Pixels of the objects whose mask is exactly their bounding rectangle: in a project with masks and
    RectangleLabels both, a rectangle a person drew (painted whole into the label map, as training reads it),
    which says where an object is, not its outline; a brush or polygon outline is almost never one. (H, W) bool."""
    ids = [int(k) for k in np.unique(instances) if k]
    out = np.zeros(instances.shape, bool)
    for k, (ys, xs) in object_slices(instances, ids).items():
        whole = instances[ys, xs] == k
        if whole.size >= min_area and whole.all():
            out[ys, xs] = True
    return out


def choose_edit_confident(predictor: Predictor, samples: list[Sample],
                          megapixels: float = EDIT_CHECK_MEGAPIXELS) -> dict | None:
    """How sure this version must be to change a pixel of a person's annotation (Predictor.review's edits),
    decided on held-back samples: the lowest of EDIT_THRESHOLDS t at which the pixels its own reading is that
    sure of are wrong (fg vs bg against the held-back labels) at most a quarter as often as its confidence
    allows, (1 - t) / 4; None, no edits, where none is. The quarter was chosen on bench.label_model's two
    datasets (two folds of their validation images, stop 54, bench/HISTORY.md): DSB's nuclei are wrong on
    0.25-0.6% of the pixels they are 0.95 sure of (edits at 0.95: +13 to +15 IoU points, < 5% of images made
    worse); Pets' animals on 3-9% at 0.95 and 0.2-13% at 0.995 (edits at 0.95 made 22-24% of the images worse
    for +0.1 points): none, or 0.99 on one fold. Review's edits also need its reading through the annotation
    to agree (the two are averaged). Drawn rectangles' pixels are not counted (drawn_rectangles: their
    corners are not the object's). One pass per image: 8 megapixels cost ~0.6 s on 2 cores. Sets
    predictor.edit_confident and returns what the checkpoint keeps; None (the default stays) for a box model,
    whose annotations are checked as their boxes' centres, or without samples."""
    if predictor.box_shrink < 1.0 or not samples:
        return None
    pixels = np.cumsum([s.image.shape[0] * s.image.shape[1] for s in samples])       # the first images, >= 1
    taken = samples[:max(1, int(np.searchsorted(pixels, megapixels * 1e6, side="right")))]
    sure = np.zeros(len(EDIT_THRESHOLDS))
    wrong = np.zeros(len(EDIT_THRESHOLDS))
    for s in taken:             # one image a pass, as review() sees it (a batch pads its images to one shape)
        bg = predictor.own_probabilities([s.image])[0][0]
        conf, miss = np.maximum(bg, 1 - bg), (bg < 0.5) != (s.classes > 0)
        counted = ~drawn_rectangles(s.instances)
        for j, t in enumerate(EDIT_THRESHOLDS):
            at = (conf >= t) & counted
            sure[j] += at.sum()
            wrong[j] += (at & miss).sum()
    rates = wrong / np.maximum(sure, 1)
    chosen = next((t for j, t in enumerate(EDIT_THRESHOLDS)          # no pixel that sure: no evidence
                   if sure[j] > 0 and rates[j] <= (1 - t) / 4), None)
    predictor.edit_confident = chosen
    return {"confident": chosen, "n_images": len(taken),
            "wrong": {str(t): float(r) for t, r in zip(EDIT_THRESHOLDS, rates)},
            "sure": {str(t): float(n / pixels[len(taken) - 1]) for t, n in zip(EDIT_THRESHOLDS, sure)}}


def choose_follow_edges(predictor: Predictor, samples: list[Sample], batch_size: int = 8,
                        keep: list | None = None) -> dict | None:
    """Whether this version's masks follow the image's edges (Predictor.follow_edges), decided on held-back
    samples: on only where it raises their mean per-image mIoU. The filter helps a model that saw the image
    smaller than its pixels and was unsure at the outlines (DSB native, 600 iterations: fg IoU +0.015), less
    as the model gets better (2,400 iterations: +0.005), and it costs a perfect prediction (DSB native's true
    masks at scale 0.5: 0.980 -> 0.924): a version that already draws the project's outlines keeps its own.
    Sets predictor.follow_edges; returns what the checkpoint keeps, or None when the predictor has no choice
    to make (a box model, or no samples). `keep`: a list that gets each sample's finishing function
    (Predictor.predict_parts, uncut): raw_predictions without a second network pass."""
    if not predictor.follow_edges or not samples:
        return None
    C = predictor.n_classes
    ious = {False: [], True: []}
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        for finish, s in zip(predictor.predict_parts([s.image for s in batch], cut=False), batch):
            for on in (False, True):                          # one network pass, finished both ways
                predictor.follow_edges = on
                ious[on].append(metrics.mean_iou(finish().classes, s.classes, C))
            if keep is not None:
                keep.append(finish)
    scores = {on: float(np.mean(v)) for on, v in ious.items()}
    predictor.follow_edges = scores[True] > scores[False]    # a tie (no image seen smaller): skip its cost
    return {"on": predictor.follow_edges, "miou_on": scores[True], "miou_off": scores[False],
            "n_images": len(samples)}


def learn_cut(predictor: Predictor, samples: list[Sample], raws: list | None = None,
              precision_target: float = 0.0) -> dict:
    """Learn the predictor's region cut on held-back samples (sets predictor.cut, and for a box model
    predictor.box_grow; `raws` are rescaled to it) and return what the checkpoint keeps:
    {"chosen", "grid", "nms_iou", "match", "box_grow"}."""
    raws = raw_predictions(predictor, samples) if raws is None else raws
    box_grow = None
    if predictor.box_shrink < 1.0 and not predictor.has_box_head:   # centres: calibrate how far they grow back
        f = fit_box_scale(raws, samples)
        box_grow = predictor.box_grow * f
        predictor.box_grow = box_grow
        for p in raws:
            p.boxes = scale_boxes(p.boxes, f, *p.instances.shape)
    predictor.cut, stored = _learned_cut(raws, samples, predictor.cut.nms_iou, precision_target)
    return {**stored, "match": "box" if any(s.boxes is not None for s in samples) else "mask", "box_grow": box_grow}


def learn_box_cut(predictor: Predictor, samples: list[Sample], raws: list, precision_target: float = 0.0) -> dict:
    """The cut of a mask model's head boxes (Prediction.head of `raws`), learned on held-back samples against
    the boxes of their objects as a box model's is; sets predictor.box_cut and returns what the checkpoint keeps."""
    predictor.box_cut, stored = _learned_cut([p.head for p in raws], samples, predictor.box_cut.nms_iou,
                                             precision_target)
    return {**stored, "match": "box", "box_grow": None}


def rectangles_from(metrics: dict) -> str:
    """Where a mask model with a head draws its rectangles from, decided on its held-back figures: "head", or
    "masks" (their bounding boxes) where those have the higher box AP50. The head's cells see an object's
    middle: on DSB's nuclei it ranks boxes far better (600 iterations, AP50 0.73-0.75 against the masks'
    0.63-0.65), on Pets' whole animals, each much larger than its receptive field, far worse (0.39 against
    0.77; stop 32, bench/HISTORY.md)."""
    return "head" if metrics.get("head_box_ap50", -1.0) >= metrics.get("box_ap50", 0.0) else "masks"


def _learned_cut(raws: list, samples: list[Sample], nms_iou: float, precision_target: float) -> tuple:
    grid = cut_grid([image_record(p, s) for p, s in zip(raws, samples)], nms_iou)
    cut = choose_cut(grid, precision_target, nms_iou)
    return cut, {"chosen": cut.to_dict(), "grid": grid, "nms_iou": nms_iou}


def evaluate(predictor_or_ckpt, samples: list[Sample], batch_size: int = 8, raws: list | None = None) -> dict:
    """Metrics at each image's own size, after the predictor's region cut: fg IoU (mean per image and
    pooled), mIoU, instance recall / precision / F1 at IoU 0.5, DSB-style instance AP, box AP50 (per
    class and mean), regions per image, classes missed, and how the task score tracks the real IoU."""
    predictor = Predictor.from_checkpoint(predictor_or_ckpt) if isinstance(predictor_or_ckpt, (str, Path)) \
        else predictor_or_ckpt            # a Predictor, or anything with its n_classes and predict()
    C = predictor.n_classes
    cut = getattr(predictor, "cut", None) or RegionCut()     # a stand-in's predict() made its own choice
    raws = raw_predictions(predictor, samples, batch_size) if raws is None else raws
    ious, mious, aps, scores = [], [], [], []
    inter = union = matched = n_true = n_pred = 0
    for s, raw in zip(samples, raws):
        p = cut_regions(raw, cut)
        pf, tf = p.classes > 0, s.classes > 0
        ious.append(metrics.iou(pf, tf))
        inter += int((pf & tf).sum())
        union += int((pf | tf).sum())
        mious.append(metrics.mean_iou(p.classes, s.classes, C))
        m = metrics.instance_match(p.instances, s.instances)
        matched, n_true, n_pred = matched + m["matched"], n_true + m["n_true"], n_pred + m["n_pred"]
        aps.append(metrics.instance_ap(p.instances, s.instances))
        scores.append(p.score)
    if not ious:
        raise ValueError("evaluate needs at least one sample")
    recall, precision = matched / max(n_true, 1), matched / max(n_pred, 1)
    out = {"fg_iou": float(np.mean(ious)), "fg_iou_pooled": inter / max(union, 1),
           "miou": float(np.mean(mious)), "instance_recall": recall, "instance_precision": precision,
           "instance_f1": 2 * recall * precision / max(recall + precision, 1e-9),
           "instance_ap": float(np.mean(aps)), "score_iou_spearman": metrics.spearman(scores, ious),
           "mean_score": float(np.mean(scores)), "n_images": len(ious)}
    out.update(detection_metrics(raws, cut, samples, C, getattr(predictor, "label_names", None)))
    out["region_cut"] = cut.to_dict()
    if raws and getattr(raws[0], "head", None) is not None:     # a mask model's head: what rectangles get
        box_cut = getattr(predictor, "box_cut", None) or RegionCut()
        head = detection_metrics([r.head for r in raws], box_cut, samples, C, getattr(predictor, "label_names", None))
        out.update({f"head_{k}": v for k, v in head.items()})
        out["head_region_cut"] = box_cut.to_dict()
    return out


def get_lr(it: int, frac: float, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr over the run's fraction done (iterations or clock)."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


# -----------------------------------------------------------------------------


def freeze_codes(model: VQVAE, frozen: bool) -> None:
    """Phase 2: stop EMA updates / restarts and label-encoder gradients (call after every model.train())."""
    model.label_encoder.requires_grad_(not frozen)
    if frozen:
        model.quantizer.eval()
        model.label_encoder.eval()


def build_model(cfg: TrainConfig, label_names: list[str], init_from: Path | None) -> tuple[VQVAE, int]:
    """A fresh model from cfg, or the init_from checkpoint's when its label names match (warm start).
    Box-labelled runs (box_shrink < 1 with box_head) get a detection head, added to a warm start without; so
    do mask-labelled runs with mask_box_head."""
    box_classes = len(label_names) if cfg.box_head and (cfg.box_shrink < 1.0 or cfg.mask_box_head) else 0
    if init_from is not None:
        ckpt = load_checkpoint(Path(init_from), kind="vqvae")
        if list(ckpt["label_names"]) == list(label_names):
            model = vqvae_from_checkpoint(ckpt)
            logger.info("warm start from %s (iter %s)", init_from, ckpt.get("iter_num"))
            if model.config.box_classes != box_classes:      # the head comes or goes; the rest is kept
                warm = VQVAE(dataclasses.replace(model.config, box_classes=box_classes))
                warm.load_state_dict({k: v for k, v in model.state_dict().items()
                                      if not k.startswith("box_head.")}, strict=False)
                model = warm
            return model, int(ckpt.get("iter_num", 0))
        logger.warning("init_from %s has labels %s, not %s: training from scratch",
                       init_from, ckpt["label_names"], label_names)
    config = VQVAEConfig(resolution=cfg.resolution, n_labels=len(label_names) + 2, widths=tuple(cfg.widths),
                         codebook_size=cfg.codebook_size, embed_dim=cfg.embed_dim,
                         image_dropout=cfg.image_dropout, boundary_width=cfg.boundary_width,
                         box_classes=box_classes, box_level=cfg.box_level, stem_stride=cfg.stem_stride)
    return VQVAE(config), 0


def train(cfg: TrainConfig, train: list[Sample], val: list[Sample], label_names: list[str], out: Path,
          init_from: Path | None = None, progress: Callable[[dict], None] | None = None,
          judged: set[str] | None = None) -> Path:
    """Train on `train`, pick the best state on `val`, write a checkpoint to `out` (a .pt file or a
    directory, which gets ckpt_<iter>.pt) and return its path. `judged`: ids of the held-back samples a
    person made or changed; where they are some of `val`, the checkpoint's metrics also hold their own
    figures under "judged" (with their "ids"), from the same predictions (backend.training.judge)."""
    if not label_names:
        raise ValueError("label_names is empty: pass the class names for indices 1..C")
    if cfg.crop > cfg.resolution or cfg.crop % 8:
        raise ValueError(f"crop={cfg.crop} must be a multiple of 8 and <= resolution={cfg.resolution}")
    n_classes = len(label_names)
    for s in train + val:
        if s.classes.max() > n_classes:
            raise ValueError(f"sample {s.id!r} uses class {s.classes.max()} but only {n_classes} labels given")
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, train, val, label_names, Path(out), init_from, progress, judged)
    finally:
        torch.set_num_threads(threads)


@dataclass
class Run:
    """What one training run carries from step to step."""
    cfg: TrainConfig
    model: VQVAE
    iter0: int
    device: torch.device
    scale: float | None
    batcher: Batcher
    val_set: tuple | None
    select_samples: list             # the held-back samples a box model's in-training AP50 is measured on
    label_names: list
    class_weight: torch.Tensor
    amp: bool
    opt: torch.optim.Optimizer
    progress: Callable[[dict], None] | None
    best: float = -1.0
    best_key: str = "val_iou_r"      # what `best` measures: val_box_ap50 for a box model (cfg.box_select)
    best_state: dict | None = None
    history: list = dataclasses.field(default_factory=list)
    stale: int = 0
    it: int = 0
    t_start: float = dataclasses.field(default_factory=time.time)


def _setup(cfg, train, val, label_names, init_from, progress) -> Run:
    """The model (fresh or warm), its scale, the batcher, the validation set and the optimiser."""
    n_classes = len(label_names)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    size = typical_object_size([s.instances for s in train])    # one pass over the maps: the gate and the scale
    if cfg.mask_box_head and cfg.box_shrink >= 1.0:
        px = mask_object_px(cfg, train, size)
        if px is not None and px > cfg.mask_head_max_px:
            logger.info("objects ~%.0f model px across: no detection head beside the masks (mask_head_max_px %g);"
                        " rectangles are the masks' bounding boxes", px, cfg.mask_head_max_px)
            cfg = dataclasses.replace(cfg, mask_box_head=False)
    model, iter0 = build_model(cfg, label_names, init_from)
    if iter0 > 0 and cfg.warm_lr > 0:
        cfg = dataclasses.replace(cfg, lr=cfg.warm_lr, min_lr=min(cfg.min_lr, cfg.warm_lr))
    model.to(device).train()
    mc = model.config
    box_model = model.box_head is not None and cfg.box_shrink < 1.0     # boxes are what it predicts (not masks)
    weight = mask_head_weight(cfg, iter0)
    if model.box_head is not None and not box_model and weight < cfg.mask_box_weight:
        logger.info("a short run: the head's loss weighs %.3f (mask_box_full_iters %d)", weight,
                    cfg.mask_box_full_iters)
        cfg = dataclasses.replace(cfg, mask_box_weight=weight)
    scale = train_scale(cfg, train, mc.resolution, box_model, size)
    logger.info("object scale: %s model px per image px", "letterbox to R" if scale is None else f"{scale:.3f}")
    if box_model and cfg.rot90 and upright(train):
        logger.info("the boxes sit off the images' middle: the images have an up, no quarter turns in training")
        cfg = dataclasses.replace(cfg, rot90=False)
    batcher = Batcher(train, dataclasses.replace(cfg, resolution=mc.resolution, boundary_width=mc.boundary_width),
                      n_classes, cfg.seed, mc.invert_bright, scale, with_boxes=model.box_head is not None)
    val_set = letterbox_set(val, mc, n_classes, scale) if val else None
    class_weight = torch.ones(mc.n_labels, device=device)
    class_weight[-1] = cfg.boundary_weight
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    select = spread_subset(list(val or []), cfg.select_images)
    return Run(cfg, model, iter0, device, scale, batcher, val_set, select, list(label_names), class_weight,
               cfg.bf16 and _bf16_ok(device), opt, progress)


def train_scale(cfg: TrainConfig, train: list[Sample], resolution: int, box_model: bool,
                size: float | None = None) -> float | None:
    """Model px per image px that training and inference see (None: letterbox whole images to R): the median
    object at object_px (box_object_px for a box model), never below the letterbox's scale of a typical image
    (box_floor of it for a box model), never above max_scale. `size`: the training objects'
    typical_object_size, when the caller has it."""
    object_px = cfg.box_object_px if box_model and cfg.box_object_px > 0 else cfg.object_px
    max_scale = cfg.box_max_scale if box_model and cfg.box_max_scale > 0 else cfg.max_scale
    if object_px <= 0:
        return None
    floor = min(letterbox_floor([s.image.shape[:2] for s in train], resolution), max_scale)
    if box_model:
        floor *= cfg.box_floor
    if size is None:
        size = typical_object_size([s.instances for s in train])
    return scale_for_size(size, object_px, max_scale, min_scale=max(floor, 1 / 32))


def mask_head_weight(cfg: TrainConfig, iter0: int = 0) -> float:
    """The weight of a mask model's head loss in a run that starts at iteration iter0: mask_box_weight once
    the model's training reaches mask_box_full_iters, by the square of its share of them before."""
    return cfg.mask_box_weight * min(1.0, (iter0 + cfg.max_iters) / max(cfg.mask_box_full_iters, 1)) ** 2


def mask_object_px(cfg: TrainConfig, train: list[Sample], size: float | None = None) -> float | None:
    """How many model px across a mask model sees the median training object (None: no object). `size`: the
    training objects' typical_object_size, when the caller has it."""
    if size is None:
        size = typical_object_size([s.instances for s in train])
    if size is None:
        return None
    scale = train_scale(cfg, train, cfg.resolution, box_model=False, size=size)
    if scale is None:   # letterboxed: the median image's longest side at R
        scale = letterbox_floor([s.image.shape[:2] for s in train], cfg.resolution)
    return size * scale


def _validate(run: Run, frac: float, last: bool) -> None:
    """Estimate on the validation set; keep the best state once the code predictor trains."""
    cfg, it = run.cfg, run.it
    est = estimate(run.model, run.val_set, cfg.batch_size, run.device, cfg.boundary_weight)
    key = "val_iou_r"
    if cfg.box_select and run.model.box_head is not None and cfg.box_shrink < 1.0 and (frac >= cfg.vq_phase or last):
        est["val_box_ap50"], key = _box_ap50(run), "val_box_ap50"
    run.history.append({"iter": it, **est})
    logger.info("iter %d: val loss %.4f val iou@R %.4f code acc %.3f%s", it, est["val_loss"], est["val_iou_r"],
                est["val_code_acc"], f" box AP50 {est['val_box_ap50']:.4f}" if "val_box_ap50" in est else "")
    if (frac >= cfg.vq_phase or last) and est[key] >= run.best:  # only states with a trained predictor
        run.best, run.best_key, run.stale = est[key], key, 0
        run.best_state = copy.deepcopy(run.model.state_dict())
    elif frac >= cfg.vq_phase:
        run.stale += 1
    if run.progress:
        run.progress({"phase": "eval", "iter": it, "max_iters": cfg.max_iters, "loss": est["val_loss"],
                      "eta_s": 0.0 if last else _eta(time.time() - run.t_start, frac)})


def _box_ap50(run: Run) -> float:
    """Box AP50 of the model as it is now on the held-back samples, through the inference path (a
    BatchNorm-folded copy, so the training model is untouched); AP ranks every region, so no cut is needed."""
    predictor = Predictor(run.model, run.label_names, device=str(run.device), edge_weight=run.cfg.boundary_weight,
                          scale=run.scale, box_shrink=run.cfg.box_shrink, point_side=run.cfg.point_side)
    raws = raw_predictions(predictor, run.select_samples, run.cfg.batch_size)
    run.model.train()
    return float(detection_metrics(raws, RegionCut(), run.select_samples, len(run.label_names))["box_ap50"])


def _step(run: Run, frac: float) -> dict:
    """One optimisation step at the schedule's point `frac`; returns the batch's losses."""
    cfg, model = run.cfg, run.model
    frozen = frac >= cfg.vq_phase
    freeze_codes(model, frozen)
    lr = get_lr(run.it, frac, cfg)
    for group in run.opt.param_groups:
        group["lr"] = lr
    x, t, boxes, w = run.batcher.get_batch(cfg.batch_size, run.device)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.amp):
        losses = compute_losses(model, x, t, cfg, run.class_weight, cfg.code_weight if frozen else 0.0, boxes, w)
    run.opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    run.opt.step()
    run.it += 1
    losses["lr"] = lr
    return losses


def _log_step(run: Run, losses: dict, frac: float, dt: float) -> None:
    cfg, it = run.cfg, run.it
    eta = _eta(time.time() - run.t_start, max(it / cfg.max_iters, frac))
    box = f" box {losses['box'].item():.3f}" if "box" in losses else ""
    logger.info("iter %d: loss %.4f (seg %.4f rec %.4f code %.3f%s) lr %.2e time %.0fms eta %.0fs", it,
                losses["loss"].item(), losses["seg"].item(), losses["rec"].item(), losses["code"].item(), box,
                losses["lr"], dt * 1000, eta)
    if run.progress:
        run.progress({"phase": "train", "iter": it, "max_iters": cfg.max_iters,
                      "loss": losses["loss"].item(), "loss_pix": losses["pix"].item(),
                      "loss_code": losses["code"].item(), "eta_s": eta})


def _loop(run: Run) -> None:
    """Train to max_iters (or the time budget, or patience), validating every eval_interval."""
    cfg = run.cfg
    t0 = run.t_start
    while True:
        elapsed = time.time() - run.t_start
        frac = run.it / cfg.max_iters
        if cfg.time_budget_s > 0:
            frac = max(frac, elapsed / cfg.time_budget_s)
        last = run.it >= cfg.max_iters or frac >= 1.0
        if run.val_set is not None and (run.it % cfg.eval_interval == 0 and run.it > 0 or last):
            _validate(run, frac, last)
        if last:
            break
        if cfg.patience and run.stale >= cfg.patience:
            logger.info("iter %d: no better validation in %d evaluations: stopping", run.it, run.stale)
            break
        losses = _step(run, frac)
        if run.it % cfg.log_interval == 0 or run.it == 1:
            t1 = time.time()
            _log_step(run, losses, frac, (t1 - t0) / (cfg.log_interval if run.it > 1 else 1))
            t0 = t1


def _finish(run: Run, train, val, label_names, out: Path, judged: set[str] | None = None) -> Path:
    """Best state, the region cut learned on `val`, metrics, the embeddings of the images it learned
    from, and the checkpoint."""
    cfg, model, it = run.cfg, run.model, run.it
    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    model.eval()
    train_s = time.time() - run.t_start
    result = {"iter_num": run.iter0 + it, "train_s": train_s, "label_names": list(label_names), "scale": run.scale}
    region_cut = box_cut = scales = edit_check = None
    predictor = Predictor(model, label_names, device=str(run.device), edge_weight=cfg.boundary_weight,
                          scale=run.scale, box_shrink=cfg.box_shrink, point_side=cfg.point_side)
    # what the served version ranks tasks against (model/acquisition.py): the people-labelled images
    labelled = acquisition.reference(predictor, [s.image for s in train + val if not s.synthetic])
    edges = None
    if val:
        # masks that follow the image's edges or not, chosen on the spread subset of the held-back images a
        # box model's state is chosen on (at most select_images), before the cut is learned on them all
        chosen_on = run.select_samples or val
        passes = [] if len(chosen_on) == len(val) and all(a is b for a, b in zip(chosen_on, val)) else None
        edges = choose_follow_edges(predictor, chosen_on, cfg.batch_size, keep=passes)
        scales = choose_box_scales(predictor, chosen_on, cfg.batch_size)
        edit_check = choose_edit_confident(predictor, chosen_on)
        # the choice's passes finished as chosen: every held-back image went through the network once, not twice
        # (~4 s a 2048 px image on 2 cores); a choice of extra box scales changes the passes
        raws = ([f() for f in passes] if passes and scales is None and len(passes) == len(val)
                else raw_predictions(predictor, val, cfg.batch_size))
        passes = None
        region_cut = learn_cut(predictor, val, raws, cfg.precision_target)
        if predictor.head_beside_masks:
            box_cut = learn_box_cut(predictor, val, raws, cfg.precision_target)
        result.update(evaluate(predictor, val, raws=raws))
        mine = [i for i, s in enumerate(val) if judged is not None and s.id in judged]
        if 0 < len(mine) < len(val):    # what promotion rests on, without predicting those images again
            result["judged"] = {"ids": sorted(val[i].id for i in mine),
                                **evaluate(predictor, [val[i] for i in mine], raws=[raws[i] for i in mine])}
        if box_cut is not None:     # rectangles from the head, or from the masks where their boxes rank better
            box_cut["rectangles"] = result["rectangles"] = rectangles_from(result)
        result.update({f"best_{run.best_key}": run.best})
        if run.best_key == "val_box_ap50":      # the kept state was chosen on this many of the held-back images
            result["box_select_images"] = len(run.select_samples)
        if edges is not None:
            result.update({"follow_edges": edges["on"], "follow_edges_images": edges["n_images"]})
        if scales is not None:
            result.update({"box_scales": scales["factors"], "box_scales_images": scales["n_images"]})
        if edit_check is not None:
            result.update({"edit_confident": edit_check["confident"], "edit_check_images": edit_check["n_images"]})
    logger.info("trained %d iters in %.0fs; %s", it, train_s,
                {k: round(v, 4) for k, v in result.items() if isinstance(v, float)})
    path = out if out.suffix == ".pt" else out / f"ckpt_{run.iter0 + it:07d}.pt"
    payload = {"kind": "vqvae", "model": {k: v.cpu() for k, v in model.state_dict().items()},
               "model_config": asdict(model.config), "train_config": asdict(cfg), "iter_num": run.iter0 + it,
               "best_val_loss": min((h["val_loss"] for h in run.history), default=None),
               "label_names": list(label_names), "metrics": result, "scale": run.scale,
               "history": run.history, "region_cut": region_cut, "box_cut": box_cut, "follow_edges": edges,
               "box_scales": scales, "edit_check": edit_check,
               "labelled_embeddings": torch.from_numpy(labelled)}
    save_checkpoint(payload, path)
    if run.progress:
        run.progress({"phase": "done", "iter": it, "max_iters": cfg.max_iters, "loss": 0.0, "eta_s": 0.0})
    return path


def _train(cfg, train, val, label_names, out, init_from, progress, judged=None) -> Path:
    run = _setup(cfg, train, val, label_names, init_from, progress)
    _loop(run)
    return _finish(run, train, val, label_names, Path(out), judged)


def _bf16_ok(device: torch.device) -> bool:
    return bf16_supported(device)


def _eta(elapsed: float, frac: float) -> float:
    return elapsed * (1 - frac) / frac if frac > 0 else 0.0


def main(argv: list[str] | None = None) -> Path:
    """python -m tessera.model.train_vqvae --data=DIR [--out=DIR] [--n_train=N] [--val_fraction=0.2] [--init_from=CKPT]
    [--<TrainConfig field>=value ...]; without --data it trains on procedural nuclei."""
    from .data import load_folder, make_nuclei, split_ids

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    own = {"data": "", "out": "out/vqvae", "n_train": "0", "val_fraction": "0.2", "init_from": ""}
    rest = []
    for arg in argv:
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if key in own and "=" in arg:
            own[key] = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    cfg = TrainConfig.from_args(rest)
    if own["data"]:
        samples, label_names = load_folder(own["data"])
        train_ids, val_ids = split_ids([s.id for s in samples], float(own["val_fraction"]))
        by_id = {s.id: s for s in samples}
        train_set, val_set = [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]
    else:
        train_set, val_set, label_names = make_nuclei(30, seed=0), make_nuclei(8, seed=1), ["nucleus"]
    if int(own["n_train"]) > 0:
        train_set = train_set[:int(own["n_train"])]
    print(f"training on {len(train_set)} images, validating on {len(val_set)}; labels {label_names}")
    path = train(cfg, train_set, val_set, label_names, Path(own["out"]),
                 init_from=Path(own["init_from"]) if own["init_from"] else None)
    metrics_ = load_checkpoint(path, "vqvae")["metrics"]
    print(json.dumps({k: v for k, v in metrics_.items() if k != "label_names"}, indent=1))
    print(f"checkpoint: {path}")
    return path


if __name__ == "__main__":
    main()
