"""Inference with the label VQ-VAE: predict label maps, refine a rough hint, review an annotation.

Images are seen at one scale learned in training from the objects' sizes (`scale`, model pixels per image
pixel, stored in the checkpoint), so detail follows the objects and not the image size: an input up to
tile x tile pixels goes through the network in one pass (padded to a multiple of 8), a larger one through
a sliding window of overlapping tiles. Checkpoints without a scale letterbox every image into R x R (aspect
kept, zero padding at the bottom / right). The logits are cropped and upsampled to each image's own size
before any threshold. Touching objects come apart through the boundary class
(the last label channel, the inner outline of every object): instances are connected components of the
object cores, grown back over the boundary pixels to the nearest core (the mask + contour recipe of
DSB 2018 entries; U-Net's separation borders, https://arxiv.org/abs/1505.04597).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .boxhead import decode_boxes, flip_average
from .checkpoint import load_checkpoint
from .data import percentiles, relabel, semantic_instances
from .postprocess import RegionCut, fuse_boxes, grow_boxes, instance_boxes, kept_regions, object_slices, resolve_cut
from .traced import TracedPasses
from .vqvae import VQVAE, VQVAEConfig

logger = logging.getLogger(__name__)

CONFIDENT = 0.9  # pixel probability above which review()'s mislabeling score trusts the model over the annotation
# review()'s refined annotation changes a pixel where the mean of two readings is this sure: the model's own
# (predict()'s) and the model's read through the annotation's codes (_combined). The images the latter alone
# made worse (at 0.9) were mostly right outlines moved by a pixel or two; the former alone moved more of them.
# bench.label_model's edits (127 DSB validation images, six corruption kinds, stop 53): the combined reading at
# 0.9 +15.2 IoU points, 4.7% of images made worse (100 s model), +16.7 / 5.6% (2,400 iterations); the model's
# own at 0.9 +20.2 / 7.3% (100 s); the mean at 0.9 +16.9 / 4.7%, +18.4 / 5.2%; the mean at 0.95 +13.1 / 3.5%,
# +15.3 / 4.9% (the target: +8, < 5% worse). A stray blob is still mostly kept (its codes say "object").
EDIT_CONFIDENT = 0.95
# ... or more: a version takes the lowest of these that its held-back pixels bear out, or makes no edit at all
# (train_vqvae.choose_edit_confident). A model sure of pixels it gets wrong (Pets at 100 s: 6-9% of the pixels it is
# 0.95 sure of) moved right outlines: 23.5% of its images made worse for +0.1 points.
EDIT_THRESHOLDS = (EDIT_CONFIDENT, 0.97, 0.98, 0.99, 0.995)
REFINE_ZOOM = 1.0  # refine()'s view of the image, this much closer than the whole: 1 = the scale the model
                   # was trained at (2x tried: clump clicks fell from 0.65 to 0.48 IoU, bench/interactive.py)
# A crop around the hint instead of the whole view was tried (64 / 96 / 128 model px of context at the learned
# scale): 3.5x faster, but clicks fell from 0.59 to 0.38 / 0.46 / 0.56 median IoU on a 520x696 demo image
# (bench/interactive.py's hints): the decoder's GroupNorm statistics are the whole view's, so a crop
# changes what the network says about the object itself, not only at the crop's edges.
# _cut_necks: a concavity counts from max(depth_abs px, depth_rel x sqrt(area)) deep; a cut is at most
# len_ratio x the smaller part's equivalent diameter long and leaves it >= min_share of the region
# (chosen on fresh procedural images, bench/interactive.py: clump clicks 0.64 -> 0.69, scribbles 0.77 -> 0.83)
NECK = {"depth_abs": 1.0, "depth_rel": 0.05, "len_ratio": 1.3, "min_share": 0.08}
# Tried on 600-iteration models (bench/interactive.py's hints, 3 seeds x 30, paired) and not kept: where clump
# clicks fail, the clicked small nucleus is mostly outline (p_edge ~0.9 at the click) and its outline joins the
# neighbour's core. The click as a core of its own: clicks 0.86 -> 0.26 (demo; it splits every object's
# outline ring off); only when > 2.5 model px from its instance's core: clump 0.51 -> 0.52 DSB, 0.81 -> 0.81 demo
# (within the spread); neck cuts confirmed by the network's not-interior probability along the cut (>= 0.2-0.5):
# flat or worse; stricter cores (p < 0.1-0.5) grown back by watershed: flat; a distance-transform watershed
# with the click as a marker: 0.51 -> 0.50; the network at 1.5x / 2x the learned scale: clump 0.81 -> 0.71 /
# 0.41 (demo); a stricter object threshold (p_bg < 0.2-0.4): scribbles 0.78 -> 0.74-0.59 (DSB).
# Stop 19, DSB 600-iteration model, clump clicks 3 x 30 (base 0.625 median, 38% below 0.5; clicks 0.772, 12%):
# the picked region cut by k-means over its pixels into round(area / the image's median object area) parts
# when over 1.6 / 2.0 x that area: clump 0.636 / 0.637 (33% / 37%) but clicks 0.709 / 0.768 (21% / 16%);
# with the 30th percentile area: clump 0.593 / 0.625; a watershed from the h-maxima of the smoothed
# (object-bright) image, h = 0.15 / 0.3 of the region's range: 0.618 / 0.625 (no split at 0.3); from the
# h-maxima of the region's distance transform (h 0.2 / 0.4): 0.611, scribbles 0.807 -> 0.773; a closer
# look (REFINE_OBJECT_PX 8 / 10 / 13 / 16, REFINE_MAX_ZOOM 2-6): 0.629 / 0.631 (0.674 at 10 px, 3x) / 0.629 / 0.586.
# Stop 20, the same 600-iteration models, clump clicks 3 x 30 (base: DSB 0.666 median, 31% below 0.5; demo
# 0.806, 23%), refine's post-processing replayed on the same passes. Why clicks fail (bench.interactive's
# causes): DSB 21 of 28 failures hold the object and one neighbour (objects ~50 px at 256 px), demo 9 of 21
# (plus 6 fragments, 6 other objects). Before _separate 51 of 90 DSB regions were merged; it fixes 30. The
# network's boundary map has no separation inside the rest: the best core of stricter core thresholds (edge
# share 0.3-0.02, grown back), chosen knowing the truth, gives DSB 0.67 (27%); the best of the region's 2-4-means
# parts, chosen knowing the truth, 0.72 (4%), demo 0.84 (12%): the 0.85 median is out of reach of any choice
# among these parts (a click on any DSB object: 0.78). Not kept: 4 flips of the view pass, logits averaged:
# demo 0.826 (13%; draws 3-5 0.786 -> 0.829, 28% -> 23%) but DSB 0.614 (36%: zoomed views 0.669 -> 0.583, clicks
# at 1x 0.788 -> 0.762), 4x the first hint's pass; the boundary logit the max over flips: demo 0.786, DSB
# 0.641; the 1x pass blended in (0.5): DSB 0.580; the boundary probability x0.7 / 1.5 / 2 / 3 / 5: DSB 0.612 /
# 0.640 / 0.621 / 0.646 / 0.569; NECK len_ratio 1.1-1.8, min_share 0.15 / 0.25, depth_rel 0.03-0.12, 5 cuts,
# tiny parts absorbed: within +-0.02; a 2-means split gated by area (>= 1.0-1.4x the image's median object)
# and solidity (<= 0.90-0.94): DSB 0.654-0.674, demo 0.68-0.77; the same gated by the click's offset from the
# region's centre (>= 0.9 radii, area >= 1.2x): DSB 0.670 (28%), draws 3-5 0.669 -> 0.690 (37% -> 33%), demo
# flat, within the spread (and it would halve a large object clicked off-centre); choosing split or not by the
# code predictor's likelihood of each label map (_combined): no correlation with the gain (r 0.08 / -0.18);
# the region re-decoded with a disk of the median object's size at the click steering the codes (trust 1 /
# 5): DSB 0.666 / 0.668.
# refine()'s network passes kept per Predictor: Label Studio sends every click / stroke of a labeller on a
# task as a new request with the same image, so the second and later hints reuse the pass (keyed by the
# view's content, the normalisation and the model's geometry) and cost only the window's post-processing.
# A 520x696 view's pass (features, code queries, logits) is ~10 MB.
REFINE_CACHE = 8
# refine() sees an image whose objects the network finds smaller than REFINE_SMALL_PX model px (median
# equivalent diameter) so much closer that they are REFINE_OBJECT_PX, at most REFINE_MAX_ZOOM x and
# REFINE_MAX_PX model px; a second network pass on the first hint. bench/interactive.py, 600-iteration models,
# 3 x 30 hints, paired:
# DSB clump clicks 0.51 -> 0.61, scribbles 0.78 -> 0.81, clicks 0.74 -> 0.78; demo unchanged
# (0.81 -> 0.83, 0.84 -> 0.84, 0.86 -> 0.87). Stop 19, the same models, 30 hints per draw, paired: 10 px and
# at most 3x against 6.5 px and 2x, DSB (draws 0-2 / 3-5): clump clicks 0.625 -> 0.674 / 0.577 -> 0.667,
# scribbles 0.807 -> 0.816 / 0.787 -> 0.809, clicks 0.772 -> 0.772 / 0.792 -> 0.820; demo: clump 0.825 -> 0.828 /
# 0.784 -> 0.790, scribbles 0.839 -> 0.816 / 0.862 -> 0.864, clicks 0.868 -> 0.866 / 0.866 -> 0.843 (within
# the spread). 8 px at 3x: DSB clump 0.629; 13 px at 4x: 0.629; 16 px at 6x: 0.586. The price: an image of
# small objects costs up to 9x the pixels in its first hint's pass (warm() pays it when a task is opened).
REFINE_OBJECT_PX = 10.0
REFINE_MAX_ZOOM = 3.0
REFINE_MAX_PX = 1024 * 1024
# ... and only when they are under REFINE_SMALL_PX: 10 px for every image took the demo's 520x696 image 1.4x
# closer (its first hint 138 -> 414 ms) for no gain on the demo; from 5.5 px only, DSB (the same draws):
# clump 0.666 / 0.669, scribbles 0.808 / 0.803, clicks 0.782 / 0.800, and the demo's images (6-10 px) stay at 1x.
REFINE_SMALL_PX = 5.5
# predict(): where the model saw an image smaller than its pixels, the background probability (upsampled from
# the model's grid) is made to follow the image's own edges: a fast guided filter (He & Sun 2015,
# https://arxiv.org/abs/1505.00996) whose linear coefficients are fitted on the model's grid in windows of
# EDGE_GUIDE_PX model px around each pixel, with the grey image as the guide and EDGE_GUIDE_EPS x the image's
# variance as the regulariser, then applied at the image's size. The other labels keep their shares of the
# foreground, so the boundary class still parts touching objects. Radius 2 chosen on 62 DSB native training
# images (1-3 model px, 600 iterations). eps 0.1 then (of 0.03-1); stop 31 tried 0.003-0.3 with radii 1-4 on
# every checkpoint below: 0.03 scored at least 0.1's fg IoU, box AP50 and box recall on each (+0.000 to
# +0.002 fg IoU, +0.001 to +0.009 AP50), also on 62 training images of the 2,400-iteration model (0.8195 vs
# 0.8172, AP50 0.704 vs 0.691), and it costs a perfect prediction less (DSB native's true masks at scale 0.5:
# 0.980 -> 0.924, 0.917 at 0.1): the fit bends the probabilities less toward the window's mean. The same
# checkpoints with and without (bench.label_model --reuse NAME --edges-off-too, 600 iterations, eps 0.1):
# DSB native (scale 0.5), seeds 0-2, foreground IoU 0.795 +- 0.002 -> 0.810 +- 0.002, box recall 0.652 ->
# 0.650 and box AP50 0.560 -> 0.555; 2,400 iterations, seeds 0 / 1: 0.810 / 0.808 -> 0.815 / 0.813 (box AP50
# -0.001 / -0.016); DSB at 256 px 0.796 -> 0.807; Pets (3 breeds) foreground level, mIoU 0.164 -> 0.186
# (eps 0.03: bench/HISTORY.md, stop 31). Each version decides on its held-back tasks whether its masks
# follow the edges at all (train_vqvae.choose_follow_edges). refine() does not: on its windows (stop 31,
# bench.interactive, 3 hint draws) DSB 256 px at 600 iterations lost 0.02 on box and clump-click hints (box
# 0.837 vs 0.859, clump 0.629 vs 0.651, scribble +0.007), DSB native at 2,400 was level (scribble +0.013, disk
# -0.009), the demo's images unchanged. The price (one thread): 5-8 ms of CPU a 520x696
# image, 75-95 ms at 2048 x 2048, where the logits' upsample is 3 / 40; over HTTP (bench.speed --native) 76
# -> 83 ms a 520x696 task, 0.93 -> 1.06 s at 2048 (this AMD host).
EDGE_GUIDE_PX = 2
EDGE_GUIDE_EPS = 0.03
BATCH_PX = 2 ** 19  # predict(): input pixels per forward pass (3 images of 312x424, 20 of 160x160)
# a mask model's head (TrainConfig.mask_box_head) reads the image once: the mirror pass (boxhead.flip_average)
# would double the encoder's share of every task, for RectangleLabels alone (measured: bench/HISTORY.md stop 32)
HEAD_FLIP_BESIDE_MASKS = False
# a mask model's head also parts the masks: an object that holds two or more of the head's objects scoring at least
# this is split among them (split_instances, _split_at_centres), in predict() and refine(). Fixed, not the head's
# learned box cut (0.35-0.4 on every version measured): the masks' own cut is learned on parted masks, and a
# precision target that moves the rectangles' cut must not move the masks. 0.3 and 0.45 parted refine()'s
# clicks alike (bench/HISTORY.md, stop 35).
HEAD_SPLIT_MIN_SCORE = 0.4
TRACE_SHAPES = 8    # predict(): traced network passes kept per Predictor, one per input shape (model/traced.py)
# Speed alone does not justify compiling the forward pass (issue 10, 312x424, 1 thread of this 2-core VM):
# torch.jit.trace + freeze under bf16 autocast was no faster (207 vs 186 ms best of 6; stop 20, 3 images per
# pass: 1.11x / 0.92x / 1.14x eager's CPU in three rounds, one image: 0.75-0.85x), the oneDNN graph fuser
# failed to run the traced model ("could not set attribute to the op"), and torch.compile took 202 s to
# compile one shape for no gain (169 vs 208 ms best, equal medians). The server's Predictor traces anyway,
# for the GIL (model/traced.py).

# -----------------------------------------------------------------------------
# pre- and post-processing shared with training


def vqvae_from_checkpoint(ckpt: dict) -> VQVAE:
    """The VQ-VAE a loaded "vqvae" checkpoint describes, with its weights (for serving and warm starts)."""
    cfg = dict(ckpt["model_config"])
    cfg["widths"] = tuple(cfg["widths"])       # a list once it went through JSON
    model = VQVAE(VQVAEConfig(**cfg))
    model.load_state_dict(ckpt["model"], strict=True)
    return model


def _fold_batchnorm(model: VQVAE) -> VQVAE:
    """An inference copy of the model with every BatchNorm folded into the convolution before it (the
    ConvBlocks of the image encoder and the code predictor): the same function in eval mode, one pass over
    the activations fewer per norm. torch's fuse_conv_bn_eval does the arithmetic; the caller's model is
    left as it was."""
    from .vqvae import ConvBlock

    model = copy.deepcopy(model).eval()
    for block in model.modules():
        if isinstance(block, ConvBlock):
            for conv, norm in (("conv1", "norm1"), ("conv2", "norm2")):
                if isinstance(getattr(block, norm), torch.nn.BatchNorm2d):
                    setattr(block, conv, fuse_conv_bn_eval(getattr(block, conv), getattr(block, norm)))
                    setattr(block, norm, torch.nn.Identity())
    return model


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device='auto' or 'cpu'")
    return torch.device(device)


def bf16_supported(device: torch.device) -> bool:
    """bfloat16 autocast pays off: CUDA with bf16, or a CPU with bf16 instructions (AVX512-BF16 or AMX).
    oneDNN also runs bf16 on AVX-512 CPUs without them (Skylake-X, Cascade Lake, Ice Lake: what
    `_is_mkldnn_bf16_supported` says yes to) by converting, and there it is slower than float32: on a 2-core
    Xeon with AVX-512 but no AVX512-BF16, one thread, a trained checkpoint, predict() took 2.5x (4 photos of
    192x256) and 3.1x (two 520x696 images) the float32 time and a training step 2.4x (stop 39)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not torch.backends.mkldnn.is_available() \
            or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    # torch.cpu's instruction checks (private, present since torch 2.3; torch is pinned): bf16 in hardware
    native = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in native)


def fit_size(h: int, w: int, resolution: int) -> tuple[int, int]:
    """Size (h', w') of an (h, w) image letterboxed into (R, R): longest side R, aspect kept."""
    s = resolution / max(h, w)
    return max(1, min(resolution, round(h * s))), max(1, min(resolution, round(w * s)))


def image_stats(image: np.ndarray, invert_bright: bool = True) -> tuple[float, float, bool]:
    """(lo, hi, invert) of an image's percentile stretch; invert when its median is bright."""
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    lo, med, hi = percentiles(image[::2, ::2, :3], (0.5, 50, 99.8))
    hi = max(hi, lo + 1.0)
    return float(lo), float(hi), bool(invert_bright and med - lo > 0.5 * (hi - lo))


def normalize_image(image: np.ndarray, stats: tuple[float, float, bool] | None = None) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 in [0, 1] with a per-image percentile stretch (dark fluorescence too).

    An image whose median is bright (brightfield, H&E: dark objects on a light background) is inverted,
    so every modality shows objects bright on dark (a common DSB 2018 step). `stats` from image_stats on
    the whole image keeps crops consistent with it."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    lo, hi, invert = image_stats(image) if stats is None else stats
    x = ((image[..., :3].astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)).clip(0, 1)
    return 1 - x if invert else x


def resize(arr: np.ndarray, h: int, w: int, nearest: bool = False) -> np.ndarray:
    if arr.shape[:2] == (h, w):
        return arr
    if nearest:
        return cv2.resize(arr, (w, h), interpolation=cv2.INTER_NEAREST)
    interp = cv2.INTER_AREA if h < arr.shape[0] else cv2.INTER_LINEAR
    if arr.ndim == 3 and arr.shape[2] > 4:
        # OpenCV's area resize takes at most 4 channels: label maps with 3+ classes go 4 at a time
        return np.concatenate([resize(arr[:, :, i:i + 4], h, w).reshape(h, w, -1)
                               for i in range(0, arr.shape[2], 4)], axis=2)
    return cv2.resize(arr, (w, h), interpolation=interp)


def pad_to(arr: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Zero-pad the bottom / right of an (h, w, ...) array to (size, size, ...) or (size_h, size_w, ...)."""
    sh, sw = (size, size) if isinstance(size, int) else size
    h, w = arr.shape[:2]
    assert h <= sh and w <= sw, f"array {arr.shape} larger than {(sh, sw)}"
    out = np.zeros((sh, sw) + arr.shape[2:], arr.dtype)
    out[:h, :w] = arr
    return out


def object_scale(samples_instances, object_px: float, max_scale: float = 1.0, min_scale: float = 1 / 32) -> float:
    """Model pixels per image pixel that show the typical object `object_px` model pixels across.

    Object size = sqrt(area) of each instance; the median per image, then over images (so a few crowded
    images do not decide it). Training crops and inference both work at this one scale, so detail follows
    the objects rather than the image size."""
    return scale_for_size(typical_object_size(samples_instances), object_px, max_scale, min_scale)


def typical_object_size(samples_instances) -> float | None:
    """The median over instance maps of each one's median object size (None: no object in any)."""
    sizes = [m for m in map(median_object_size, samples_instances) if m is not None]
    return float(np.median(sizes)) if sizes else None


def scale_for_size(size: float | None, object_px: float, max_scale: float = 1.0, min_scale: float = 1 / 32) -> float:
    """object_scale from a typical_object_size the caller already has (each map is read once per run)."""
    return max_scale if size is None else float(np.clip(object_px / size, min_scale, max_scale))


def median_object_size(instances) -> float | None:
    """Median object size (sqrt of its pixel count) of one instance map; None when it holds no object."""
    counts = np.bincount(np.asarray(instances).ravel().astype(np.intp))[1:]
    counts = counts[counts > 0]
    return float(np.median(np.sqrt(counts))) if counts.size else None


def letterbox_floor(shapes, resolution: int) -> float:
    """The scale at which the median training image's longest side is `resolution` (what letterboxing into
    R x R showed it): the least scale training learns. An image of one big object (a Pets photo: median
    object ~150 px of 256) at `object_px` ~6.5 would be ~14 px across, under two code cells, and a rare
    class never got predicted again (bench.rare_label: Bengal 0.086 IoU letterboxed -> 0.0 at scale 0.056)."""
    longs = [max(int(h), int(w)) for h, w in shapes]
    return resolution / float(np.median(longs)) if longs else 0.0


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """Size (h', w') of an (h, w) image seen at `scale` model pixels per image pixel."""
    return max(1, round(h * scale)), max(1, round(w * scale))


def ceil8(n: int) -> int:
    """Padded side: the model downsamples x8."""
    return max(8, -(-n // 8) * 8)


def boundary_map(instances: np.ndarray, width: int = 1) -> np.ndarray:
    """Inner outline of every object, `width` px wide: where two objects touch, the two outlines meet.

    Outlines of all objects (not only contacts) are a local edge pattern a small net learns fast, and
    cores (object minus outline) of touching objects come out as separate components."""
    inst = instances.astype(np.float32)  # exact for ids < 2**24
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    return (inst > 0) & ((cv2.dilate(inst, kernel) != inst) | (cv2.erode(inst, kernel) != inst))


def label_map(classes: np.ndarray, instances: np.ndarray, n_classes: int, width: int = 1) -> np.ndarray:
    """Classes + instances -> hard label map (H, W) int64: 0 bg, 1..C classes, C + 1 boundary."""
    if classes.size and classes.max() > n_classes:
        raise ValueError(f"class map uses index {classes.max()} but the model has {n_classes} labels")
    if instances.max() == 0 and classes.any():  # semantic-only labels: objects = connected components
        instances = semantic_instances(classes)
    target = classes.astype(np.int64)
    target[boundary_map(np.where(classes > 0, instances, 0), width)] = n_classes + 1
    return target


def soft_target(classes: np.ndarray, instances: np.ndarray, n_classes: int, h: int, w: int,
                width: int = 1) -> np.ndarray:
    """Label map at the original size -> per-label area fractions (h, w, L) float32 at the model's size.

    Area-averaging the one-hot map keeps sub-pixel boundaries (nearest-neighbour label maps cap the IoU
    of upsampled predictions near 0.87 on DSB 2018, area fractions near 0.98). The outlines are drawn
    at the original size, `width` model pixels wide.
    """
    H, W = classes.shape
    width_px = max(1, round(width * max(H / h, W / w)))
    target = label_map(classes, instances, n_classes, width_px)
    onehot = np.eye(n_classes + 2, dtype=np.float32)[target]  # (H, W) -> (H, W, L)
    out = resize(onehot, h, w)
    return out.reshape(h, w, n_classes + 2)


def pad_target(target: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Pad a (h, w, L) soft target to (size, size, L) or (size_h, size_w, L) with background."""
    out = pad_to(target, size)
    out[target.shape[0]:, :, 0] = 1.0
    out[:, target.shape[1]:, 0] = 1.0
    return out


def split_instances(probs: np.ndarray, n_classes: int, min_area: int = 4, edge_weight: float = 1.0,
                    edge_share: float = 0.5, grow_steps: int = 8, with_areas: bool = False,
                    centres: np.ndarray | None = None):
    """Label probabilities (L, H, W) -> (classes, instances, instance_label, instance_score), and with
    `with_areas` the objects' pixel counts {id: area} after them.

    fg = p(bg) < 0.5; cores = fg pixels where the boundary class holds less than `edge_share` of the
    object mass, measured with the boundary odds of training (x edge_weight, the class weight the
    probabilities were corrected for), so thin outlines still cut; each 4-connected core is an object;
    boundary pixels join the adjacent core (grown up to `grow_steps` px), or form an object of their own
    when no core reaches them (tiny objects can be all outline). With `centres` (a mask model's head: (N, 5)
    rows of head_centres in the map's px), an object that holds two or more of them is split among them.
    """
    p_bg, p_cls, p_edge = probs[0], probs[1:n_classes + 1], probs[n_classes + 1]
    H, W = p_bg.shape
    # the per-pixel tests below run on the foreground pixels only (flat indices): objects cover a
    # fraction of the image, and these were full-image passes (stop 21, 520x696: 18 -> 8 ms at 4% foreground,
    # 19 -> 14 ms at 26%, equal at 70-96%, 32 -> 39 ms with every pixel foreground)
    fg_at = np.flatnonzero(p_bg < 0.5)
    cls_mass = p_cls.reshape(n_classes, -1)[:, fg_at].sum(0)
    is_core = p_edge.reshape(-1)[fg_at] * edge_weight * (1 - edge_share) < edge_share * cls_mass
    if is_core.any():
        core = np.zeros(H * W, np.uint8)
        core[fg_at[is_core]] = 1
        n_core, inst = cv2.connectedComponents(core.reshape(H, W), connectivity=4)
    else:                                                   # no core: what connectedComponents gives, for free
        n_core, inst = 1, np.zeros((H, W), np.int32)
    rest_at = fg_at[~is_core]
    if rest_at.size:
        if n_core > 1:                                      # (no core to grow: no float32 round trip of the map)
            inst = _grow_cores(inst, rest_at, grow_steps)
        left = rest_at[inst.reshape(-1)[rest_at] == 0]      # boundary pixels no core reached
        if left.size:
            alone = np.zeros(H * W, np.uint8)
            alone[left] = 1
            _, extra = cv2.connectedComponents(alone.reshape(H, W), connectivity=8)
            inst.reshape(-1)[left] = extra.reshape(-1)[left] + n_core - 1
    if centres is not None and len(centres) > 1:
        inst = _split_at_centres(inst, centres)
    # per-object sums over the object pixels only
    where = fg_at[inst.reshape(-1)[fg_at] > 0]              # object pixels are foreground pixels
    ids = inst.reshape(-1)[where]
    n = int(ids.max()) + 1 if ids.size else 1
    counts = np.bincount(ids, minlength=n)
    mass = np.stack([np.bincount(ids, p.ravel()[where], minlength=n) for p in p_cls])  # (C, n)
    fg_mass = np.bincount(ids, 1 - p_bg.ravel()[where], minlength=n)
    # drop specks, renumber 1..K
    keep = counts >= min_area
    keep[0] = False
    k = int(keep.sum())
    remap = np.zeros(n, np.int32)
    remap[keep] = np.arange(1, k + 1, dtype=np.int32)
    label_of = np.where(keep, mass.argmax(0) + 1, 0).astype(np.int32)
    score_of = (fg_mass / np.maximum(counts, 1))[keep]
    labels = label_of[keep]
    instances, classes = np.zeros(H * W, np.int32), np.zeros(H * W, np.int32)
    instances[where], classes[where] = remap[ids], label_of[ids]
    instances, classes = instances.reshape(H, W), classes.reshape(H, W)
    out = (classes, instances, {i + 1: int(c) for i, c in enumerate(labels)},
           {i + 1: float(v) for i, v in enumerate(score_of)})
    return (*out, {i + 1: int(v) for i, v in enumerate(counts[keep])}) if with_areas else out


def _grow_cores(inst: np.ndarray, todo: np.ndarray, steps: int) -> np.ndarray:
    """Cores (H, W) int32 grown over the pixels `todo` (flat indices), one 8-neighbour step at a time: a pixel
    takes the largest label among its neighbours once one has a label (a 3x3 dilation restricted to `todo`).
    Each step dilates the whole map (OpenCV, fast) but reads and writes only the pixels still unclaimed."""
    grow = inst.astype(np.float32)                          # OpenCV dilates float32, not int32 (ids < 2**24)
    flat, kernel = grow.reshape(-1), np.ones((3, 3), np.uint8)
    for _ in range(steps):
        near = cv2.dilate(grow, kernel).reshape(-1)[todo]
        take = near > 0
        if not take.any():
            break
        flat[todo[take]] = near[take]
        todo = todo[~take]
    return grow.astype(np.int32)


def task_score(p_fg: np.ndarray, pred_fg: np.ndarray, eps: float = 0.05) -> float:
    """Expected foreground IoU under the model's own probabilities (negligible doubts clipped away).

    E[intersection] / E[union] with p < eps -> 0 and p > 1 - eps -> 1, plus one pixel of smoothing, so
    an image the model confidently calls empty scores 1 and blurry or patchy predictions score low.
    """
    q = np.where(p_fg < eps, np.float32(0), p_fg).astype(np.float32, copy=False).reshape(-1)
    q[q > 1 - eps] = 1
    # the sum over the predicted pixels as one float32 dot product with the mask: 2.3x faster than two
    # boolean gathers at 520x696 (7 -> 3 ms per image), the same score to ~1e-7
    inter = float(np.dot(q, pred_fg.reshape(-1).view(np.uint8).astype(np.float32)))
    union = float(np.count_nonzero(pred_fg)) + float(q.sum(dtype=np.float64)) - inter
    return (inter + 1.0) / (union + 1.0)


def _task_score_of(p_bg: np.ndarray, instances: np.ndarray, n_object_px: int, eps: float = 0.05) -> float:
    """task_score(1 - p_bg, instances > 0), the same float, given the object pixels' count: the clipping in
    place (no np.where copy) and no count of the mask, 0.97 -> 0.62 ms of CPU at 520x696 (stop 23)."""
    q = np.subtract(1, p_bg).reshape(-1)                     # 1 - p_bg, as the caller of task_score computed it
    q[q < eps] = 0
    q[q > 1 - eps] = 1
    inter = float(np.dot(q, (instances > 0).reshape(-1).view(np.uint8).astype(np.float32)))
    union = float(n_object_px) + float(q.sum(dtype=np.float64)) - inter
    return (inter + 1.0) / (union + 1.0)


# -----------------------------------------------------------------------------


@dataclass
class Prediction:
    """Label map, instances and confidences for one image, at the image's own size."""
    classes: np.ndarray               # (H, W) int32
    instances: np.ndarray             # (H, W) int32, each object its own id (touching objects separated)
    instance_label: dict[int, int]    # instance id -> class index 1..C
    instance_score: dict[int, float]  # instance id -> confidence in [0, 1]
    score: float                      # task confidence in [0, 1]; low = uncertain
    boxes: dict[int, tuple[float, float, float, float]] | None = None  # id -> (x0, y0, x1, y1) px, box models
    # id -> tight bounding box (row slice, column slice) of its mask, when already found (cut_regions finds them
    # and the region encoder reuses them: one pass over the map per image)
    slices: dict[int, tuple[slice, slice]] | None = field(default=None, repr=False, compare=False)
    # id -> pixel count of its mask, when already counted (split_instances counts them; the region cut uses them)
    areas: dict[int, int] | None = field(default=None, repr=False, compare=False)
    # a mask model that also learned the detection head (TrainConfig.mask_box_head): the head's boxes as a box
    # model's Prediction of the same image, after their own cut (Predictor.box_cut): what a RectangleLabels
    # control gets (backend/predictions.prediction_to_results)
    head: "Prediction | None" = field(default=None, repr=False, compare=False)


def _at_side(dets: np.ndarray, side: float) -> np.ndarray:
    """Detections (N, 6+: x0, y0, x1, y1, score, class) as boxes of one side about their centres."""
    d = np.array(dets, np.float64, copy=True)
    cx, cy = (d[:, 0] + d[:, 2]) / 2, (d[:, 1] + d[:, 3]) / 2
    d[:, 0], d[:, 1], d[:, 2], d[:, 3] = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
    return d


def cut_regions(pred: Prediction, cut: RegionCut, copy: bool = True) -> Prediction:
    """The prediction without the regions a cut drops (low score, too small, NMS duplicates of a box).

    A box model's sizes are its boxes' areas (what its held-back truth is measured in); a mask model's
    are the masks' pixel counts. `copy=False`: the dropped objects are erased from pred's own maps (a caller
    that discards `pred`, as predict_parts does), instead of from copies of them."""
    ids = sorted(pred.instance_label)
    if not ids:
        return pred
    slices = pred.slices
    if pred.boxes is not None:
        boxes = np.array([pred.boxes[k] for k in ids], np.float64).reshape(-1, 4)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    else:
        slices = object_slices(pred.instances, ids) if slices is None else slices
        boxes = instance_boxes(pred.instances, ids, slices)
        if pred.areas is not None:
            areas = np.array([pred.areas.get(k, 0) for k in ids])
        else:   # pixel counts within each object's bounding box: ~4 us an object, not a bincount over the map
            areas = np.array([np.count_nonzero(pred.instances[slices[k]] == k) if k in slices else 0 for k in ids])
    scores = np.array([pred.instance_score.get(k, 0.0) for k in ids])
    classes = np.array([pred.instance_label[k] for k in ids])
    keep = {ids[i] for i in kept_regions(scores, areas, boxes, cut, classes)}
    if len(keep) == len(ids):
        return Prediction(pred.classes, pred.instances, pred.instance_label, pred.instance_score, pred.score,
                          pred.boxes, slices, pred.areas, pred.head)
    # the dropped objects erased within their bounding boxes (a box model's painted boxes: where each is the
    # top one), not the maps remapped whole: two full-map lookups cost 1.5-2 ms at 520x696 (stop 23)
    dropped = [k for k in ids if k not in keep]
    instances, classes = (pred.instances.copy(), pred.classes.copy()) if copy else (pred.instances, pred.classes)
    where = slices if slices is not None else object_slices(instances, dropped)
    for k in dropped:
        sl = where.get(k)
        if sl is not None:
            gone = instances[sl] == k
            instances[sl][gone] = 0
            classes[sl][gone] = 0
    return Prediction(classes, instances,
                      {k: v for k, v in pred.instance_label.items() if k in keep},
                      {k: v for k, v in pred.instance_score.items() if k in keep}, pred.score,
                      None if pred.boxes is None else {k: v for k, v in pred.boxes.items() if k in keep},
                      None if slices is None else {k: v for k, v in slices.items() if k in keep},
                      None if pred.areas is None else {k: v for k, v in pred.areas.items() if k in keep}, pred.head)


class Predictor:
    """Loaded label VQ-VAE + code predictor; every call reuses the same weights."""

    def __init__(self, model: VQVAE, label_names: list[str], version: str = "", device: str = "auto",
                 min_area: int = 4, edge_weight: float = 1.0, scale: float | None = None, tile: int = 512,
                 overlap: int = 32, bf16: bool = True, cut: RegionCut | None = None, box_shrink: float = 1.0,
                 box_grow: float | None = None, trace: bool = False, box_flip: bool = True,
                 point_side: float = 0.0):
        self.device = resolve_device(device)
        # channels-last + bfloat16 autocast (as in training): ~2.5x faster convolutions on CPUs with bf16
        # kernels, measured at 312x424 on this project's 2-core VM
        self.bf16 = bf16 and bf16_supported(self.device)
        # channels-last with bf16 only. Tried in float32 (stop 43, a 2-core AMD EPYC with AVX2 alone): an untrained
        # default model's 312x424 pass took 0.82-0.89x the time, but bench.speed --native's trained model gave the
        # same per-task times over HTTP (520x696 157 vs 153 ms, 2048 3.12 vs 3.26 s, forward stage 106 vs 106
        # ms); stop 39's Xeon (AVX-512, no bf16) found no difference either
        self.channels_last = self.bf16
        self.model = _fold_batchnorm(model).to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.config: VQVAEConfig = model.config
        self.label_names = list(label_names)
        self.n_classes = len(self.label_names)
        assert self.config.n_labels == self.n_classes + 2, \
            f"model has {self.config.n_labels} labels, expected {self.n_classes} classes + bg + boundary"
        assert tile % 8 == 0 and 0 <= overlap < tile, f"tile {tile} must be a multiple of 8 above overlap {overlap}"
        self.version = version
        self.min_area = min_area
        self.edge_weight = edge_weight  # training weight of the boundary class, undone on the probabilities
        # model pixels per image pixel, learned from the training objects' sizes; None (checkpoints from
        # before it was learned) letterboxes every image into R x R
        self.scale = scale
        self.tile, self.overlap = tile, overlap  # inputs larger than tile x tile go through a sliding window
        self.cut = cut or RegionCut()   # regions predict() keeps (learned per version, see model/postprocess.py)
        self.box_shrink = box_shrink    # < 1: a box model, its objects are box centres ...
        self.box_grow = box_grow or 1.0 / box_shrink   # ... grown back by this (learned, else 1 / shrink)
        self.has_box_head = model.box_head is not None  # boxes from the detection head (model/boxhead.py)
        # > 0: a counting project's model (TrainConfig.point_side): its boxes are where its points are, each made
        # the side its points were learned at. A point has no size: the size the head regresses is noise, which
        # an area floor and the IoU with the held-back points' boxes would judge (DSB native as points, the same
        # checkpoints: F1 of points on nuclei 0.821 / 0.801 -> 0.841 / 0.815, counts 0.88 / 0.90 -> 1.00 / 0.96)
        self.point_side = point_side
        # a mask model with a head (TrainConfig.mask_box_head): masks as any mask model's, and the head's boxes
        # beside them in Prediction.head, kept by their own cut
        self.head_beside_masks = self.has_box_head and box_shrink >= 1.0
        self.box_cut = RegionCut()
        # a box head's outputs averaged with the mirror image's (boxhead.flip_average); off for a head never
        # shown mirror images in training
        self.box_flip = self.has_box_head and box_flip
        # a box model's extra passes, at these multiples of its scale, their boxes fused with its own
        # (fuse_boxes); chosen per version on its held-back tasks (train_vqvae.choose_box_scales)
        self.box_scales: tuple[float, ...] = ()
        # predict()'s masks follow the image's edges where it was seen smaller (follow_edges), unless the
        # version learned on its held-back tasks that its own outlines are better (from_checkpoint); box
        # models' regions are their boxes, so they skip it
        self.follow_edges = box_shrink >= 1.0
        # review()'s edits change a pixel where the model is this sure (EDIT_THRESHOLDS); None: no edit, the
        # annotation comes back as it is (with its mislabeling score). Learned per version (from_checkpoint).
        self.edit_confident: float | None = EDIT_CONFIDENT
        # (M, D) image embeddings of the images this version learned from (model/acquisition.py), which
        # rank tasks by what labelling them would add; None: the plain confidence ranks them
        self.reference: np.ndarray | None = None
        if self.device.type == "cpu" and torch.get_num_threads() > (os.cpu_count() or 1):
            torch.set_num_threads(os.cpu_count() or 1)  # containers often report more threads than cores
        # predict()'s passes, traced per input shape once it recurs (model/traced.py: one GIL take per pass);
        # off by default: a trace costs ~1 s per shape, which a short-lived Predictor (training's validation,
        # benchmarks) never earns back; the server's turns it on
        self._passes = TracedPasses(_PredictPass(self), size=TRACE_SHAPES) if trace else _PredictPass(self)
        # the box head's outputs alone (a box model's extra scales: their label logits would go unused)
        self._head_passes = (TracedPasses(_HeadPass(self), size=TRACE_SHAPES) if trace else _HeadPass(self)
                             ) if self.has_box_head else None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", precision_target: float = 0.0,
                        min_score: float | None = None, trace: bool = False) -> "Predictor":
        """Rebuild from a checkpoint alone. The region cut is the one learned with the version, re-chosen
        for `precision_target` when > 0; `min_score` >= 0 replaces its score threshold. `trace`: predict()'s
        passes traced per recurring shape (the server's Predictor; see model/traced.py)."""
        ckpt = load_checkpoint(Path(path), kind="vqvae")
        model = vqvae_from_checkpoint(ckpt)
        version = ckpt.get("version") or f"vqvae-{ckpt.get('iter_num', 0)}"
        tc = ckpt.get("train_config") or {}
        scale = ckpt.get("scale")
        cut = resolve_cut(ckpt.get("region_cut"), precision_target, min_score)
        box_shrink = float(tc.get("box_shrink", 1.0))
        predictor = cls(model, ckpt["label_names"], version, device, edge_weight=float(tc.get("boundary_weight", 1.0)),
                        scale=float(scale) if scale else None, cut=cut, box_shrink=box_shrink,
                        box_grow=(ckpt.get("region_cut") or {}).get("box_grow"), trace=trace,
                        box_flip=bool(tc.get("flips", True)) and (box_shrink < 1.0 or HEAD_FLIP_BESIDE_MASKS),
                        point_side=float(tc.get("point_side", 0.0) or 0.0))
        if predictor.head_beside_masks:                  # the head's boxes have a cut of their own ...
            predictor.box_cut = resolve_cut(ckpt.get("box_cut"), precision_target, min_score)
            if (ckpt.get("box_cut") or {}).get("rectangles") == "masks":   # ... unless the masks' boxes won
                predictor.has_box_head = predictor.head_beside_masks = False       # (train_vqvae.rectangles_from)
        scales = ckpt.get("box_scales")                  # learned per version (train_vqvae.choose_box_scales)
        if scales is not None and scales.get("on") and predictor.has_box_head and not predictor.head_beside_masks:
            predictor.box_scales = tuple(float(f) for f in scales["factors"])
        edges = ckpt.get("follow_edges")                 # learned per version (train_vqvae.choose_follow_edges);
        if edges is not None:                            # absent before stop 31 and without held-back tasks: on
            predictor.follow_edges = predictor.follow_edges and bool(edges.get("on", True))
        edits = ckpt.get("edit_check")                   # learned per version (train_vqvae.choose_edit_confident);
        if edits is not None:                            # absent before stop 54 and without held-back tasks
            predictor.edit_confident = edits.get("confident")
        ref = ckpt.get("labelled_embeddings")            # absent in checkpoints from before stop 25
        if isinstance(ref, torch.Tensor) and ref.ndim == 2 and len(ref):
            predictor.reference = ref.float().numpy()
        return predictor

    # --- batched network pass --------------------------------------------------------------------

    def _geometry(self, h: int, w: int, letterbox: bool = False, scale: float | None = None) -> tuple[int, int]:
        """The size an (h, w) image has at the model's input (before padding); `scale` in place of the
        model's own (a box model's extra passes, box_scales)."""
        if self.scale is None or letterbox:
            return fit_size(h, w, self.config.resolution)
        return scaled_size(h, w, scale or self.scale)

    def _pad_shape(self, sizes: list[tuple[int, int]], letterbox: bool = False) -> tuple[int, int]:
        """Input shape for a batch of scaled sizes: R x R when letterboxing, else the largest padded to x8."""
        if self.scale is None or letterbox:
            return self.config.resolution, self.config.resolution
        return ceil8(max(h for h, _ in sizes)), ceil8(max(w for _, w in sizes))

    def _prepare(self, images: list[np.ndarray], letterbox: bool = False, scale: float | None = None
                 ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """A batch at the model's input: each image at the model's scale, or fitted into R x R (`letterbox`,
        or a model without a scale), normalised and padded to one shape; and each image's size in it."""
        smalls, sizes = [], []
        for image in images:
            if image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=2)
            nh, nw = self._geometry(*image.shape[:2], letterbox=letterbox, scale=scale)
            small = resize(image, nh, nw)
            smalls.append(normalize_image(small, image_stats(small, self.config.invert_bright)))
            sizes.append((nh, nw))
        shape = self._pad_shape(sizes, letterbox=letterbox)
        x = torch.from_numpy(np.stack([pad_to(a, shape) for a in smalls]))
        x = x.permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
        return x.to(self.device), sizes

    def _unletterbox(self, logits: torch.Tensor, size: tuple[int, int], shape: tuple[int, int],
                     image: np.ndarray | None = None) -> np.ndarray:
        """Logits (L, h', w') -> probabilities (L, H, W) at the original image size.

        Logits are upsampled before the softmax and thresholds, so boundaries fall between model pixels.
        The boundary class was trained with weight w, which multiplies its odds by w; dividing them
        back (logit - log w) keeps masks from growing by the outline's width. With the `image` (H, W[, 3])
        the background follows its edges where it was seen smaller (follow_edges)."""
        nh, nw = size
        if logits.device.type == "cpu":
            probs = _probs_cpu(logits[:, :nh, :nw].float().numpy(), tuple(shape), math.log(self.edge_weight))
        else:
            crop = logits[None, :, :nh, :nw].float().clone()
            crop[:, -1] -= math.log(self.edge_weight)
            if (nh, nw) != tuple(shape):
                crop = F.interpolate(crop, size=tuple(shape), mode="bilinear", align_corners=False)
            probs = F.softmax(crop[0], dim=0).cpu().numpy()
        if image is not None and self.follow_edges:
            follow_edges(probs, image, size)
        return probs

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """x in the memory format the network's weights are in (channels-last or as it is)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _forward(self, x: torch.Tensor):
        """(B, 3, H, W) -> image features (as computed: bfloat16 under autocast), code queries, label logits
        (float32); the code logits, when needed, are _code_logits(queries). The decoder's input, the expected
        code embedding, is computed as two plain matrix products over the cells (_expected_codes), not
        through the (B, K, h, w) code logits."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            feats = self.model.features(self.layout(x))
            query = self._query(feats)
            logits = self.model.decoder(self._expected_codes(query).to(feats[-1].dtype), feats)
        return feats, query, logits.float()

    def _query(self, feats) -> torch.Tensor:
        """The code predictor's query vector per latent cell (B, D, h, w), float32."""
        cp = self.model.code_predictor
        x = torch.cat([feats[-1], F.avg_pool2d(feats[-2], 2)], dim=1)
        return cp.out(cp.blocks(cp.inp(x))).float()

    def _code_logits(self, query: torch.Tensor) -> torch.Tensor:
        """Code logits (B, K, h, w) exactly as CodePredictor.forward computes them from its query."""
        with torch.autocast(query.device.type, enabled=False):
            book = self.model.quantizer.embed
            dist = (query.pow(2).sum(1, keepdim=True) - 2 * torch.einsum("bdhw,kd->bkhw", query, book)
                    + book.pow(2).sum(1)[None, :, None, None])
            return -dist * self.model.code_predictor.log_scale.exp()

    def _expected_codes(self, query: torch.Tensor) -> torch.Tensor:
        """VQVAE.embed_codes(code_logits) from the query: softmax over codes of s (2 q.c - |c|^2) (the |q|^2
        term of the distance is the same for every code, so it drops out of the softmax), times the
        codebook; (cells, D) @ (D, K) and (cells, K) @ (K, D) instead of einsums over (B, K, h, w)."""
        with torch.autocast(query.device.type, enabled=False):
            B, D, h, w = query.shape
            book = self.model.quantizer.embed
            s = float(self.model.code_predictor.log_scale.detach().exp())
            flat = query.permute(0, 2, 3, 1).reshape(-1, D)                 # (B, D, h, w) -> (B*h*w, D)
            probs = torch.softmax(torch.addmm(-s * book.pow(2).sum(1), flat, book.t(), alpha=2 * s), dim=1)
            return (probs @ book).view(B, h, w, D).permute(0, 3, 1, 2)     # -> (B, D, h, w)

    @torch.inference_mode()
    def _run(self, images: list[np.ndarray]):
        x, sizes = self._prepare(images)
        feats, query, logits = self._forward(x)
        return x, feats, query, logits, sizes

    def _boxes(self, heads) -> list[np.ndarray]:
        """The box head's outputs (heat logits, log size, offset) -> per image boxes (N, 6) in input px."""
        heat, size, offset = heads
        return decode_boxes(heat.float().sigmoid(), size, offset, self.model.box_head.stride)

    @torch.inference_mode()
    def _net(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """predict()'s network pass: (B, 3, H, W) -> label logits (B, L, H, W) float32 and the box head's
        outputs (None without one), through the trace for x's shape when there is one. A mask model's head
        runs whatever the config: its objects part the masks (split_instances), a fifth of a 520x696 image's
        pass (stop 32)."""
        out = self._passes(x)
        return out[0], (tuple(out[1:]) if self.has_box_head else None)

    @torch.inference_mode()
    def _pass(self, x: torch.Tensor, heads_only: bool) -> tuple[torch.Tensor | None, tuple | None]:
        """_net, or with `heads_only` the encoder and the box head alone: (None, the head's outputs)."""
        return (None, tuple(self._head_passes(x))) if heads_only else self._net(x)

    @torch.inference_mode()
    def _tiled_logits(self, x: torch.Tensor, batch: int = 1, dets: list | None = None,
                      heads_only: bool = False) -> torch.Tensor | None:
        """Sliding window over one large input (1, 3, H, W) -> logits (1, L, H, W): tiles of `tile` px
        overlapping by `overlap`, blended with weights that fall off linearly towards tile edges (a tile's
        border pixels see zero padding the whole image does not have). Memory stays bounded by the tile.
        With `dets` (a list), the box head's boxes are appended to it in the input's px, each from the tile
        that answers for its centre (`_cores`): an object across a tile's edge is seen whole by the tile
        beside it, and its cut part at the edge is not a second box. `heads_only`: only `dets` (returns None)."""
        # one tile per pass: 2048x2048 (9 tiles of 432 px at the bench model's scale) took 0.87x the time of 4
        # tiles per pass (median of 14, interleaved, 1 thread, load 8.5); same logits
        _, _, H, W = x.shape
        (th, ys), (tw, xs) = _starts(H, self.tile, self.overlap), _starts(W, self.tile, self.overlap)
        if not heads_only:                          # the blended logits and their weights (boxes need neither)
            weight = _ramp(th, self.overlap, x.device)[:, None] * _ramp(tw, self.overlap, x.device)[None, :]
            out = torch.zeros(1, self.config.n_labels, H, W, device=x.device)
            total = torch.zeros(1, 1, H, W, device=x.device)
        spots = [(y, x0) for y in ys for x0 in xs]
        core_y, core_x = dict(zip(ys, _cores(H, th, ys))), dict(zip(xs, _cores(W, tw, xs)))
        for i in range(0, len(spots), batch):
            group = spots[i:i + batch]
            tiles = torch.cat([x[:, :, y:y + th, x0:x0 + tw] for y, x0 in group])  # (b, 3, th, tw)
            logits, heads = self._pass(tiles, heads_only)
            if dets is not None:
                for (y, x0), d in zip(group, self._boxes(heads)):
                    d = d + [x0, y, x0, y, 0, 0]
                    cy, cx = (d[:, 1] + d[:, 3]) / 2, (d[:, 0] + d[:, 2]) / 2
                    (y_lo, y_hi), (x_lo, x_hi) = core_y[y], core_x[x0]
                    dets.append(d[(cy >= y_lo) & (cy < y_hi) & (cx >= x_lo) & (cx < x_hi)])
            if heads_only:
                continue
            for (y, x0), lg in zip(group, logits):
                out[0, :, y:y + th, x0:x0 + tw] += lg * weight
                total[0, 0, y:y + th, x0:x0 + tw] += weight
        return None if heads_only else out / total

    def _prediction(self, probs: np.ndarray, dets: np.ndarray | None = None, with_head: bool = True) -> Prediction:
        """A Prediction from the probabilities at the image's size and the head's boxes (dets, image px): a box
        model's boxes, or a mask model's instances parted at its head's objects, and those boxes as
        Prediction.head when `with_head` (a RectangleLabels control wants them)."""
        if dets is not None and not self.head_beside_masks:
            return _box_prediction(_at_side(dets, self.point_side) if self.point_side > 0 else dets, probs)
        centres = None if dets is None else head_centres(dets, HEAD_SPLIT_MIN_SCORE)
        classes, inst, labels, scores, areas = split_instances(probs, self.n_classes, self.min_area, self.edge_weight,
                                                               with_areas=True, centres=centres)
        score = _task_score_of(probs[0], inst, sum(areas.values()))     # task_score(1 - probs[0], inst > 0)
        boxes = None
        if self.box_shrink < 1.0:
            ids = sorted(labels)
            grown = grow_boxes(instance_boxes(inst, ids), 1.0 / self.box_grow, *inst.shape)
            boxes = {k: tuple(float(v) for v in b) for k, b in zip(ids, grown)}
        head = boxes_prediction(dets, score) if dets is not None and with_head else None   # cut by box_cut
        return Prediction(classes, inst, labels, scores, score, boxes, areas=areas, head=head)

    def _logits(self, images: list[np.ndarray], dets: list | None = None, scale: float | None = None
                ) -> list[tuple]:
        """The network's part of _probabilities: per image (logits (L, h', w'), size at the model (h', w'))
        still to be unletterboxed. Images of one input shape share a batch; inputs larger than a tile go
        through the sliding window one by one. With `dets` (a list of len(images)), a box head model also
        fills in each image's boxes (N, 6) in image px: a box model with box_scales fuses them with its
        passes at those scales (fuse_boxes). `scale`: the passes at this scale, not the model's."""
        out = self._logits_at(images, dets, scale)
        if dets is None or scale is not None or not self.box_scales or self.head_beside_masks or self.scale is None:
            return out
        extra = [self.boxes_at(images, self.scale * f) for f in self.box_scales]
        for i in range(len(images)):
            dets[i] = fuse_boxes([dets[i], *(e[i] for e in extra)])
        return out

    def boxes_at(self, images: list[np.ndarray], scale: float | None = None) -> list[np.ndarray]:
        """A box head model's boxes (N, 6) in image px per image, from a pass of the encoder and the head alone
        (no code predictor, no decoder) at `scale` (None: the model's), unfused: a box model's extra scales,
        and choose_box_scales' candidates. Pets heads (stop 42, the same checkpoint, 1 thread): predict() with
        0.7x and 1.4x took 0.66x the time it took with full passes at those scales, choose_box_scales 0.58x."""
        dets: list = [None] * len(images)
        self._logits_at(images, dets, scale, heads_only=True)
        return dets

    def _logits_at(self, images: list[np.ndarray], dets: list | None, scale: float | None,
                   heads_only: bool = False) -> list[tuple]:
        """_logits at one scale (None: the model's). `heads_only`: only `dets` is filled (entries of the
        returned list are None)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(self._pad_shape([self._geometry(*im.shape[:2], scale=scale)]), []).append(i)
        out: list[tuple | None] = [None] * len(images)
        for (ph, pw), idx in groups.items():
            if self.scale is not None and ph * pw > self.tile ** 2:
                for i in idx:
                    tiles = [] if dets is not None else None
                    with torch.inference_mode():
                        x, sizes = self._prepare([images[i]], scale=scale)
                        lg = self._tiled_logits(x, dets=tiles, heads_only=heads_only)
                        out[i] = None if heads_only else (lg[0], sizes[0])
                    if dets is not None:
                        dets[i] = _to_image_px(np.concatenate(tiles), sizes[0], images[i].shape[:2])
                continue
            # at most BATCH_PX input pixels per pass: a batch of 16 native-size images (2.1 M px) ran at about
            # half the per-image speed of 1-4 (activations fall out of the caches; measured at 312x424, 1 thread);
            # 160k px (1 image of 312x424 per pass) was 0.85-0.91x in process (8-14 interleaved reps, load 9) but
            # not kept: in the server, with download threads holding the GIL, 1,000 LS tasks took 168 s vs main's
            # 111 s at +13% CPU (each pass re-takes the GIL once per op; fewer, larger passes wait less)
            step = max(1, BATCH_PX // (ph * pw))
            for s in range(0, len(idx), step):
                part = idx[s:s + step]
                with torch.inference_mode():
                    x, sizes = self._prepare([images[i] for i in part], scale=scale)
                    logits, heads = self._pass(x, heads_only)
                found = self._boxes(heads) if dets is not None else [None] * len(part)
                for n, (i, size, d) in enumerate(zip(part, sizes, found)):
                    out[i] = None if heads_only else (logits[n], size)
                    if dets is not None:
                        dets[i] = _to_image_px(d, size, images[i].shape[:2])
        return out

    def _probabilities(self, images: list[np.ndarray], dets: list | None = None) -> list[np.ndarray]:
        """Label probabilities (L, H, W) per image (see _logits)."""
        return [self._unletterbox(lg, size, im.shape[:2], im)
                for (lg, size), im in zip(self._logits(images, dets), images)]

    def predict(self, images: list[np.ndarray], cut: bool = True, boxes: bool = True) -> list[Prediction]:
        """Label maps for a batch of (H, W, 3) uint8 images of any sizes; with `cut` only the regions
        the version's region cut keeps. `boxes` False: a mask model's head boxes are not wanted (no
        RectangleLabels control): Prediction.head is None (the head still parts the masks)."""
        return [finish() for finish in self.predict_parts(images, cut, boxes)]

    def predict_parts(self, images: list[np.ndarray], cut: bool = True, boxes: bool = True) -> list:
        """predict() in two parts: the network passes of every image now, and per image a function that
        finishes its Prediction (upsampling, instance split, region cut) when called, from any thread
        (/predict: a failure there empties only that image's task); predict(images) == [f() for f in
        predict_parts(images)]. A function may be called again (it reads the passes, never changes them),
        e.g. after follow_edges was switched."""
        if not images:
            return []
        dets = [None] * len(images) if self.has_box_head else None
        logits = self._logits(images, dets)

        def finisher(i: int):
            def finish() -> Prediction:
                lg, size = logits[i]
                p = self._prediction(self._unletterbox(lg, size, images[i].shape[:2], images[i]),
                                     dets[i] if dets else None, with_head=boxes)
                if not cut:
                    return p
                if p.head is not None:
                    p.head = cut_regions(p.head, self.box_cut, copy=False)
                return cut_regions(p, self.cut, copy=False)                 # p is this function's own
            return finish

        return [finisher(i) for i in range(len(images))]

    # --- codes of a label map and the prior-weighted decode ---------------------------------------

    def _onehot(self, classes: np.ndarray, instances: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        """An annotation at the image's size -> soft label map (1, L, R, R) as the label encoder saw in training."""
        t = soft_target(classes.astype(np.int32), instances.astype(np.int32), self.n_classes, *size,
                        self.config.boundary_width)
        t = torch.from_numpy(pad_target(t, self._pad_shape([size]))).to(self.device)
        return t.permute(2, 0, 1)[None]  # (H, W, L) -> (1, L, H, W)

    @torch.inference_mode()
    def _combined(self, onehot, feats, code_logits, trust: float = 1.0):
        """Decode with codes drawn from (predictor's code distribution) x (closeness to the label map's codes).

        Returns (logits (1, L, R, R), log p_pred of the label map's codes (1, h, w)).
        """
        q = self.model.quantizer
        feats = [f.float() for f in feats]
        z = self.model.label_encoder(onehot)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (1, D, h, w) -> (h*w, D)
        dist = torch.cdist(flat, q.embed).pow(2)  # (h*w, K)
        scale = dist.min(1, keepdim=True).values.mean() + 1e-3
        hint_logits = (-dist / scale).t().reshape(1, -1, *z.shape[-2:])  # (K, h*w) -> (1, K, h, w)
        log_pred = F.log_softmax(code_logits, dim=1)
        own = dist.argmin(1).view(1, *z.shape[-2:])
        log_p_own = log_pred.gather(1, own[:, None])[:, 0]
        post = log_pred + trust * F.log_softmax(hint_logits, dim=1)
        return self.model.decoder(self.model.embed_codes(post), feats), log_p_own

    # --- label-edit suggestions ------------------------------------------------------------------

    def refine(self, image: np.ndarray, hint: np.ndarray | None, positive: list[tuple[float, float]],
               negative: list[tuple[float, float]], label: int) -> tuple[np.ndarray, float]:
        """A clean (H, W) bool mask of the one object a rough hint (stroke / box / points) points at.

        The model looks at a view around the hint, REFINE_ZOOM x closer than the whole image (1: the
        whole image, the scale it was trained at), widened while the object is cut by it, and makes its
        instances in a window around the hint only (latency follows the object, not the image). The instance the hint
        points at is taken whole; one the model merged with a neighbour is cut at the necks of its
        outline (`_separate`), keeping the part(s) the hint is on. Where the model sees nothing at the
        hint, the hint steers the codes instead."""
        H, W = image.shape[:2]
        if hint is not None and hint.shape != (H, W):
            raise ValueError(f"hint has shape {hint.shape}, the image is {(H, W)}; pass a mask of the image's size")
        if not 1 <= label <= self.n_classes:
            raise ValueError(f"label {label} out of range 1..{self.n_classes} ({self.label_names})")
        hint = np.zeros((H, W), bool) if hint is None else hint.astype(bool)
        pos = [(min(max(int(y), 0), H - 1), min(max(int(x), 0), W - 1)) for x, y in positive]
        neg = [(min(max(int(y), 0), H - 1), min(max(int(x), 0), W - 1)) for x, y in negative]
        if not hint.any() and not pos:
            return np.zeros((H, W), bool), 0.0
        image_key, stats, zoom = self._refine_setup(image)
        side = max(H, W) / REFINE_ZOOM
        for _ in range(3):                                    # widen the view while the object is cut by it
            view = _view(hint, pos, H, W, side)
            mask, conf = self._refine_view(image, stats, view, hint, pos, neg, label, (image_key, view), zoom)
            y0, y1, x0, x1 = view
            m = mask[y0:y1, x0:x1]
            if not m.any() or not ((y0 > 0 and m[0].any()) or (y1 < H and m[-1].any()) or
                                   (x0 > 0 and m[:, 0].any()) or (x1 < W and m[:, -1].any())):
                break
            side *= 2
        if not mask.any():  # last resort: the hint itself, cleaned
            mask, conf = _clean(hint), 0.0
        if self.box_shrink < 1.0 and mask.any():   # a box model's object is its centre: grow it into the box
            x0, y0, x1, y1 = grow_boxes(instance_boxes(mask.astype(np.int32), [1]), 1.0 / self.box_grow, H, W)[0]
            mask = np.zeros((H, W), bool)
            mask[int(y0):math.ceil(y1), int(x0):math.ceil(x1)] = True
        return mask, conf

    def warm(self, image: np.ndarray) -> None:
        """Compute what a first hint on `image` needs before it comes: the normalisation, the object zoom
        (the whole-image pass) and refine()'s first view at that zoom, into the pass cache (keyed by the
        image's content). The backend calls it in the background when Label Studio asks /predict for one
        task, which it does when a labeller opens a task without a prediction."""
        H, W = image.shape[:2]
        image_key, stats, zoom = self._refine_setup(image)
        view = _view(np.zeros((H, W), bool), [(H // 2, W // 2)], H, W, max(H, W) / REFINE_ZOOM)
        self._run_view(image[view[0]:view[1], view[2]:view[3]], stats, (image_key, view), zoom)

    def _refine_setup(self, image: np.ndarray) -> tuple[str, tuple, float]:
        """(content key, normalisation stats, object zoom) of an image, from the pass cache when a hint on
        the same pixels (or warm()) computed them."""
        H, W = image.shape[:2]
        image_key = _content_hash(image)                      # the labeller's later hints on this image hit the cache
        stats = self._views.get(("stats", image_key, self.config.invert_bright))
        if stats is None:
            stats = image_stats(resize(image if image.ndim == 3 else np.repeat(image[..., None], 3, 2),
                                       *self._geometry(H, W)), self.config.invert_bright)
            self._views.put(("stats", image_key, self.config.invert_bright), stats)
        zoom = self._views.get(("zoom", image_key, self.version))
        if zoom is None:
            zoom = self._object_zoom(image, stats, image_key)
            self._views.put(("zoom", image_key, self.version), zoom)
        return image_key, stats, zoom

    def _refine_view(self, image, stats, view, hint, pos, neg, label, view_key=None,
                     zoom: float = 1.0) -> tuple[np.ndarray, float]:
        """refine() on the image's view (y0, y1, x0, x1), seen `zoom` x closer than the model's scale:
        full-size mask and confidence. `view_key` names the view's pixels for the pass cache (else they
        are hashed)."""
        vy0, vy1, vx0, vx1 = view
        crop = image[vy0:vy1, vx0:vx1]
        H, W = crop.shape[:2]
        h_v = hint[vy0:vy1, vx0:vx1]
        p_v = [(y - vy0, x - vx0) for y, x in pos if vy0 <= y < vy1 and vx0 <= x < vx1]
        n_v = [(y - vy0, x - vx0) for y, x in neg if vy0 <= y < vy1 and vx0 <= x < vx1]
        feats, query, logits, size, centres = self._run_view(crop, stats, view_key, zoom)
        scale = max(H / size[0], W / size[1])                # view pixels per model pixel
        margin = max(16, round(12 * scale))
        win = _window(h_v, p_v, H, W, margin)
        for i in range(4):                                    # grow the window while the object touches its edge
            probs = self._window_probs(logits[0], size, (H, W), win)
            mask = self._hinted(probs, win, h_v, p_v, n_v, centres)
            grown = _grow_window(win, mask, H, W)
            if grown == win or i == 3:                        # win stays the window probs were made for
                break
            win = grown
        if not mask.any():  # the model saw nothing there: let the hint steer the codes, then decode
            seed = h_v.copy()
            for y, x in p_v:
                cv2.circle(seed.view(np.uint8), (x, y), max(3, round(2 * scale)), 1, -1)
            classes = np.where(seed, label, 0).astype(np.int32)
            lg, _ = self._combined(self._onehot(classes, seed.astype(np.int32), size), feats,
                                   self._code_logits(query))
            win = _window(seed, [], H, W, margin)
            probs = self._window_probs(lg[0], size, (H, W), win)
            mask = self._hinted(probs, win, h_v, p_v, n_v)
        y0, y1, x0, x1 = win
        conf = float((1 - probs[0])[mask[y0:y1, x0:x1]].mean()) if mask.any() else 0.0
        out = np.zeros(hint.shape, bool)
        out[vy0:vy1, vx0:vx1] = mask
        return out, conf

    @functools.cached_property
    def _views(self) -> "PassCache":
        return PassCache(REFINE_CACHE)

    @torch.inference_mode()
    def _run_view(self, view: np.ndarray, stats, view_key=None, zoom: float = 1.0):
        """Network pass over one view at the model's geometry (its learned scale x zoom, or letterboxed
        into R), normalised with the whole image's stats: (feats, code queries, logits, size, centres), the
        last the head's objects in view px when the version serves its boxes (_head_centres), else None. A
        view seen before (same pixels: `view_key`, else their hash; same stats, model version and geometry)
        is answered from the Predictor's pass cache."""
        if view.ndim == 2:
            view = np.repeat(view[..., None], 3, axis=2)
        nh, nw = self._geometry(*view.shape[:2]) if zoom == 1.0 or self.scale is None else \
            scaled_size(*view.shape[:2], self.scale * zoom)
        pad = self._pad_shape([(nh, nw)])
        key = (view_key or _content_hash(view), tuple(float(v) for v in stats), self.version, (nh, nw), pad,
               self.bf16)

        def run():
            x = pad_to(normalize_image(resize(view, nh, nw), stats), pad)
            x = torch.from_numpy(x).permute(2, 0, 1)[None].to(self.device)  # (H, W, 3) -> (1, 3, H, W)
            feats, query, logits = self._forward(x)
            centres = self._head_centres(feats, (nh, nw), view.shape[:2]) if self.head_beside_masks else None
            return tuple(feats), query, logits, (nh, nw), centres

        return self._views.compute(key, run)

    def _head_centres(self, feats, size: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
        """head_centres of a view's pass (a mask model that serves its head's boxes), in the view's px."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            d = self._boxes(self.model.detect(feats))[0]
        d[:, [0, 2]] *= shape[1] / size[1]
        d[:, [1, 3]] *= shape[0] / size[0]
        return head_centres(d, HEAD_SPLIT_MIN_SCORE)

    def _object_zoom(self, image: np.ndarray, stats, image_key: str) -> float:
        """How much closer than the model's scale refine looks at this image: when the median diameter (model
        px) of the objects the network sees in it is under REFINE_SMALL_PX, REFINE_OBJECT_PX over it, in
        [1, REFINE_MAX_ZOOM], within REFINE_MAX_PX; else 1. One learned scale serves a whole data set; on DSB
        2018 (fluorescence images of small nuclei beside histology of large ones) the small nuclei are a few
        model px across and merge."""
        if self.scale is None or REFINE_MAX_ZOOM <= 1.0:
            return 1.0
        H, W = image.shape[:2]
        _, _, logits, (nh, nw), _ = self._run_view(image, stats, (image_key, (0, H, 0, W)))
        probs = self._unletterbox(logits[0], (nh, nw), (nh, nw))    # at the model's size: no resize
        _, inst, _, _ = split_instances(probs, self.n_classes, 2, self.edge_weight)
        areas = np.bincount(inst.ravel())[1:]
        areas = areas[areas > 0]
        if not len(areas):
            return 1.0
        diameter = 2 * math.sqrt(float(np.median(areas)) / math.pi)
        if diameter >= REFINE_SMALL_PX:
            return 1.0
        cap = math.sqrt(REFINE_MAX_PX / (nh * nw))
        return float(np.clip(REFINE_OBJECT_PX / diameter, 1.0, max(1.0, min(REFINE_MAX_ZOOM, cap))))

    def _window_probs(self, logits: torch.Tensor, size: tuple[int, int], shape: tuple[int, int],
                      win: tuple[int, int, int, int]) -> np.ndarray:
        """Probabilities (L, h, w) of the image window win = (y0, y1, x0, x1): the same bilinear resize as
        _unletterbox (align_corners=False), sampled at the window's pixels only."""
        nh, nw = size
        H, W = shape
        y0, y1, x0, x1 = win
        crop = logits[None, :, :nh, :nw].float().clone()
        crop[:, -1] -= math.log(self.edge_weight)
        gy = (torch.arange(y0, y1, dtype=torch.float32, device=crop.device) + 0.5) * (2.0 / H) - 1
        gx = (torch.arange(x0, x1, dtype=torch.float32, device=crop.device) + 0.5) * (2.0 / W) - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None]  # (1, h, w, 2) as (x, y)
        out = F.grid_sample(crop, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return F.softmax(out[0], dim=0).cpu().numpy()

    def _hinted(self, probs: np.ndarray, win, hint: np.ndarray, pos, neg, centres: np.ndarray | None = None
                ) -> np.ndarray:
        """Full-size mask of the object(s) the hint points at, from the window's probabilities; `centres`: the
        head's objects in the view (its px), which part touching objects as in predict()."""
        y0, y1, x0, x1 = win
        if centres is not None:
            centres = centres - np.array([y0, x0, 0, 0, 0])
        _, inst, _, _ = split_instances(probs, self.n_classes, self.min_area, self.edge_weight, centres=centres)
        h = hint[y0:y1, x0:x1]
        p = [(y - y0, x - x0) for y, x in pos if y0 <= y < y1 and x0 <= x < x1]
        n = [(y - y0, x - x0) for y, x in neg if y0 <= y < y1 and x0 <= x < x1]
        p = [_snap(inst, y, x) for y, x in p]
        mask = _separate(self._pick(inst, h, p, n), h, p, n)
        if h.any() and mask.any() and _is_box(h):
            mask &= h                                         # a box bounds its object exactly
        out = np.zeros(hint.shape, bool)
        out[y0:y1, x0:x1] = mask
        return out

    @staticmethod
    def _pick(inst: np.ndarray, hint: np.ndarray, pos, neg) -> np.ndarray:
        """Instances at positive points or mostly covered by the hint (plus the best-covered), minus negatives."""
        chosen = {int(inst[y, x]) for y, x in pos} - {0}
        if hint.any():
            ids, overlap = np.unique(inst[hint], return_counts=True)
            overlap, ids = overlap[ids > 0], ids[ids > 0]
            if len(ids):
                area = np.bincount(inst.ravel())[ids]
                cover = overlap / area
                chosen |= {int(i) for i in ids[cover >= 0.5]}
                best = int(np.argmax(overlap))
                if cover[best] >= 0.1 or overlap[best] >= 0.1 * hint.sum():
                    chosen.add(int(ids[best]))
        chosen -= {int(inst[y, x]) for y, x in neg}
        return np.isin(inst, list(chosen)) if chosen else np.zeros(inst.shape, bool)

    def review(self, image: np.ndarray, classes: np.ndarray, instances: np.ndarray, boxes: np.ndarray | None = None
               ) -> tuple[Prediction, float]:
        """Refined annotation (the model wins where it is sure: edit_confident, none where that is None) +
        mislabeling in [0, 1] (1 = very unlikely).

        A box model (box_shrink < 1) learned boxes as their centre regions, so it checks an annotation painted the
        same way (postprocess.box_sample at its box_shrink; a full box's rim is background to it). `boxes`: that
        annotation's (N, 4+) px boxes, instance i + 1 the region of boxes[i]; an object the refined annotation
        keeps keeps its box, and one the model adds gets its centre grown back, as in predict()."""
        H, W = image.shape[:2]
        if classes.shape != (H, W) or instances.shape != (H, W):
            raise ValueError(f"classes {classes.shape} / instances {instances.shape} must match the image {(H, W)}")
        classes = classes.astype(np.int32)
        instances = np.where(classes > 0, instances, 0).astype(np.int32)
        x, feats, query, logits, sizes = self._run([image])
        code_logits = self._code_logits(query)
        probs = self._unletterbox(logits[0], sizes[0], (H, W))
        # mislabeling: disagreement with the annotation where the model is confident
        model_cls = np.where(probs[0] >= 0.5, 0, probs[1:self.n_classes + 1].argmax(0) + 1)
        sure = np.maximum(probs[0], 1 - probs[0]) >= CONFIDENT
        union = sure & ((model_cls > 0) | (classes > 0))
        agree = union & (model_cls == classes)
        mislabeling = 0.0 if not union.any() else 1.0 - agree.sum() / union.sum()
        # refined map: the model's own reading and its reading through the annotation's codes (the annotation's
        # codes weighted by the predictor's, decoded with the image), averaged (EDIT_CONFIDENT)
        lg, _ = self._combined(self._onehot(classes, instances, sizes[0]), feats, code_logits)
        post = (self._unletterbox(lg[0], sizes[0], (H, W)) + probs) / 2
        sure_post = (np.maximum(post[0], 1 - post[0]) >= self.edit_confident if self.edit_confident is not None
                     else np.zeros((H, W), bool))
        post_cls = np.where(post[0] >= 0.5, 0, post[1:self.n_classes + 1].argmax(0) + 1)
        refined = np.where(sure_post, post_cls, classes).astype(np.int32)
        # keep the annotation's objects; pixels the model adds get the model's own instances
        _, model_inst, model_label, _ = split_instances(post, self.n_classes, self.min_area, self.edge_weight)
        inst = np.where(refined > 0, instances, 0)
        new = (refined > 0) & (inst == 0)
        offset = int(instances.max())
        inst[new] = np.where(model_inst[new] > 0, model_inst[new] + offset, 0)
        refined[(refined > 0) & (inst == 0)] = 0
        origin, inst = inst.ravel(), relabel(inst)
        ids, first = np.unique(inst.ravel(), return_index=True)
        flat_cls, p_fg = refined.ravel(), (1 - post[0]).ravel()
        area = np.bincount(inst.ravel(), minlength=ids.max() + 1)
        fg_mass = np.bincount(inst.ravel(), p_fg, minlength=ids.max() + 1)
        labels = {int(i): int(flat_cls[f]) for i, f in zip(ids, first) if i > 0}
        scores = {int(i): float(fg_mass[i] / area[i]) for i in ids if i > 0}
        kept = None
        if self.box_shrink < 1.0:
            kept = self._kept_boxes(inst, {int(i): int(origin[f]) for i, f in zip(ids, first) if i > 0}, boxes)
        pred = Prediction(refined, inst, labels, scores, task_score(1 - post[0], inst > 0), kept)
        return pred, float(np.clip(mislabeling, 0.0, 1.0))

    @torch.inference_mode()
    def own_probabilities(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """The model's own label probabilities (L, H, W) per image as review() reads them: at the image's size,
        not made to follow its edges."""
        _, _, _, logits, sizes = self._run(images)
        return [self._unletterbox(lg, size, im.shape[:2]) for lg, size, im in zip(logits, sizes, images)]

    def _kept_boxes(self, inst: np.ndarray, origin: dict[int, int], boxes: np.ndarray | None) -> dict:
        """A box model's refined boxes ({id: (x0, y0, x1, y1)}): an object of the annotation (`origin`: id -> its
        id in the annotation, whose objects 1..N are `boxes`' rows) keeps its own box; an object the model added
        (or any, without `boxes`) gets its centre region's box grown back."""
        ids = sorted(origin)
        grown = grow_boxes(instance_boxes(inst, ids), 1.0 / self.box_grow, *inst.shape)
        n = 0 if boxes is None else len(boxes)
        return {k: tuple(float(v) for v in (boxes[origin[k] - 1, :4] if 1 <= origin[k] <= n else g))
                for k, g in zip(ids, grown)}

    # --- layout codes (for model/layouts.py's VQ recombination) ----------------------------------

    @torch.inference_mode()
    def encode(self, classes: torch.Tensor, instances: torch.Tensor) -> torch.Tensor:
        """(B, R, R) class + instance maps at R -> code maps (B, R/8, R/8)."""
        targets = [label_map(c.cpu().numpy(), i.cpu().numpy(), self.n_classes, self.config.boundary_width)
                   for c, i in zip(classes, instances)]
        t = torch.from_numpy(np.stack(targets)).to(self.device)
        onehot = F.one_hot(t, self.config.n_labels).permute(0, 3, 1, 2).float()  # (B, R, R, L) -> (B, L, R, R)
        return self.model.encode(onehot)[2]

    @torch.inference_mode()
    def decode_codes(self, code_map: torch.Tensor) -> torch.Tensor:
        """Code maps (B, h, w) -> label logits (B, L, R, R) without an image; the last channel is the boundary class."""
        return self.model.decode_code(code_map.to(self.device))


class _PredictPass(torch.nn.Module):
    """Predictor._forward's label logits, and the box head's outputs when there is one, as one module
    (what TracedPasses traces): x -> (logits,) or (logits, heat logits, log size, offset)."""

    def __init__(self, predictor: "Predictor"):
        super().__init__()
        self.model = predictor.model            # a submodule: its weights are the trace's parameters
        self.predictor = predictor

    def forward(self, x: torch.Tensor):
        p = self.predictor
        feats, _, logits = p._forward(x)
        if not p.has_box_head:
            return (logits,)
        with torch.autocast(p.device.type, dtype=torch.bfloat16, enabled=p.bf16):
            return (logits, *_head_outputs(p, x, feats))


class _HeadPass(torch.nn.Module):
    """_PredictPass's box head outputs alone: x -> (heat logits, log size, offset), the encoder and the head
    (mirrored too where the predictor averages the mirror image's), neither code predictor nor decoder."""

    def __init__(self, predictor: "Predictor"):
        super().__init__()
        self.model = predictor.model
        self.predictor = predictor

    def forward(self, x: torch.Tensor):
        p = self.predictor
        with torch.autocast(p.device.type, dtype=torch.bfloat16, enabled=p.bf16):
            feats = p.model.features(p.layout(x))
            return tuple(_head_outputs(p, x, feats))


def _head_outputs(p: "Predictor", x: torch.Tensor, feats) -> tuple:
    """The box head's outputs on x's features, averaged with the mirror image's where the predictor flips
    (boxhead.flip_average); called under the predictor's autocast."""
    heads = p.model.detect(feats)
    if p.box_flip:
        heads = flip_average(heads, p.model.detect(p.model.features(p.layout(x.flip(-1)))))
    return heads


def _probs_cpu(logits: np.ndarray, shape: tuple[int, int], log_edge_weight: float) -> np.ndarray:
    """Logits (L, h, w) -> probabilities (L, H, W) float32 at `shape`, boundary logit less log_edge_weight.

    OpenCV's bilinear resize per label (the same half-pixel convention as align_corners=False; 1 ms against
    torch's 17-22 ms at 520x696 on one thread; probabilities within 2e-5), into one preallocated array, then
    a softmax over the labels in place with numpy: torch's softmax over the first dimension of (L, H, W) cost
    8-10 ms of CPU a 520x696 image (with its second OpenMP thread), this 3-4 ms (stop 21); the probabilities
    differ from torch's by float rounding (< 1e-6)."""
    src = np.ascontiguousarray(logits)
    if src.shape[1:] == shape:
        out = src.copy()
    else:
        out = np.empty((src.shape[0], *shape), np.float32)
        for c in range(src.shape[0]):
            cv2.resize(src[c], (shape[1], shape[0]), dst=out[c], interpolation=cv2.INTER_LINEAR)
    out[-1] -= log_edge_weight
    out -= np.maximum.reduce(out)
    np.exp(out, out=out)
    out /= out.sum(0)
    return out


def follow_edges(probs: np.ndarray, image: np.ndarray, size: tuple[int, int], radius: int = EDGE_GUIDE_PX,
                 eps: float = EDGE_GUIDE_EPS) -> np.ndarray:
    """In place: the background probability probs[0] (L, H, W) of an image (H, W[, 3]) seen at `size` (h', w')
    made to follow the image's edges, the other labels rescaled to keep their shares of the foreground; a
    no-op where the image was not seen smaller. A fast guided filter: q = A I + B, with A and B the window
    means of the least-squares fit p ~ a I + b in each (2 radius + 1)^2 window of the model's grid, upsampled.
    Written here with OpenCV's box filters: OpenCV's own guided filter (ximgproc, in the contrib build only)
    fits at the image's size, ~1 / scale^2 the work, and numpy has none. At the image's size it makes two
    float planes and works in them in place."""
    H, W = probs.shape[1:]
    h, w = size
    if h >= H and w >= W:
        return probs
    # (the fit does not care about the grey's units: eps is relative to its variance)
    grey = image if image.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    Il = cv2.resize(grey, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    # the fit on grey less its mean: E[I^2] - E[I]^2 of raw grey levels (~1e4) loses the window variance to
    # float32 rounding (~1e-3), which over a flat image's zero variance made `a` noise times 1e12 (a test
    # saw one flat image's mask change with the batch it came in: stop 40)
    centre = float(Il.mean())
    Il -= centre
    pl = cv2.resize(probs[0], (w, h), interpolation=cv2.INTER_LINEAR)   # back on the grid it came from
    k = (2 * radius + 1, 2 * radius + 1)
    mean = functools.partial(cv2.boxFilter, ddepth=-1, ksize=k, borderType=cv2.BORDER_REFLECT)
    mI, mp = mean(Il), mean(pl)
    a = (mean(Il * pl) - mI * mp) / (mean(Il * Il) - mI * mI + eps * float(Il.var()) + 1e-12)
    b = mp - a * mI
    a = mean(a)
    bg = cv2.resize(a, (W, H), interpolation=cv2.INTER_LINEAR)
    tmp = cv2.resize(mean(b) - centre * a, (W, H), interpolation=cv2.INTER_LINEAR)   # q = A (I - c) + B
    np.multiply(bg, grey, out=bg)             # (OpenCV's multiply of float by uint8 took 20x as long)
    np.add(bg, tmp, out=bg)
    np.clip(bg, 0.0, 1.0, out=bg)
    fg = np.sum(probs[1:], axis=0, out=tmp)   # not 1 - bg: float32 loses a small foreground's digits there
    some = fg > 1e-6                          # where the network gave the labels no share, there is none to move
    np.copyto(probs[0], bg, where=some)
    np.subtract(1.0, probs[0], out=bg)
    np.maximum(fg, 1e-30, out=fg)
    np.divide(bg, fg, out=bg)                 # new foreground over old (1 where unchanged)
    probs[1:] *= bg
    return probs


def _to_image_px(dets: np.ndarray, size: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Boxes (N, 6) in model input px of an image seen at `size` (h', w') -> px of the image (H, W),
    clipped to it; boxes left empty are dropped."""
    (nh, nw), (H, W) = size, shape
    d = np.asarray(dets, np.float64).reshape(-1, 6).copy()
    d[:, [0, 2]] = (d[:, [0, 2]] * W / nw).clip(0, W)
    d[:, [1, 3]] = (d[:, [1, 3]] * H / nh).clip(0, H)
    return d[(d[:, 2] > d[:, 0]) & (d[:, 3] > d[:, 1])]


def _box_prediction(dets: np.ndarray, probs: np.ndarray) -> Prediction:
    """A box head's boxes (N, 6) in image px -> a Prediction: the boxes, their scores and classes, and a
    label map with the boxes painted (larger first, so a smaller box over a larger one stays visible).
    The task score is the segmentation's, as for every model."""
    H, W = probs.shape[1:]
    classes, instances = np.zeros((H, W), np.int32), np.zeros((H, W), np.int32)
    d = dets[np.argsort(-dets[:, 4], kind="stable")]             # ids 1..N by descending score
    for k in np.argsort(-(d[:, 2] - d[:, 0]) * (d[:, 3] - d[:, 1]), kind="stable"):
        x0, y0, x1, y1 = (int(round(v)) for v in d[k, :4])
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
        classes[y0:y1, x0:x1], instances[y0:y1, x0:x1] = int(d[k, 5]), k + 1
    ids = range(1, len(d) + 1)
    return Prediction(classes, instances, {k: int(d[k - 1, 5]) for k in ids}, {k: float(d[k - 1, 4]) for k in ids},
                      task_score(1 - probs[0], probs[0] < 0.5), {k: tuple(float(v) for v in d[k - 1, :4]) for k in ids})


def boxes_prediction(dets: np.ndarray, score: float = 0.0) -> Prediction:
    """Boxes (N, 6) in image px (a mask model's head's; a box model's where only they are judged) -> a
    Prediction of boxes alone: ids 1..N by descending score, and empty maps (nothing reads them: its boxes are
    its regions, and painting them at the image's size cost ~3 ms a 520x696 image)."""
    d = dets[np.argsort(-dets[:, 4], kind="stable")]
    ids = range(1, len(d) + 1)
    empty = np.zeros((0, 0), np.int32)
    return Prediction(empty, empty.copy(), {k: int(d[k - 1, 5]) for k in ids}, {k: float(d[k - 1, 4]) for k in ids},
                      score, {k: tuple(float(v) for v in d[k - 1, :4]) for k in ids})


def _starts(n: int, tile: int, overlap: int) -> tuple[int, list[int]]:
    """(side, offsets) of the fewest tiles of at most `tile` px that cover [0, n) overlapping by at least
    `overlap`, made equal (a multiple of 8) rather than full tiles plus a last one that mostly re-covers
    its neighbour: 1229 px at tile 512 is 3 x 432 px, not 3 x 512 px."""
    if n <= tile:
        return n, [0]
    k = -(-(n - overlap) // (tile - overlap))
    side = min(n, ceil8(-(-(n + (k - 1) * overlap) // k)))
    return side, [(i * (n - side)) // (k - 1) for i in range(k)]


def _cores(n: int, side: int, starts: list[int]) -> list[tuple[float, float]]:
    """Per tile of `_starts` along one axis, the span [lo, hi) of [0, n) it answers for: cut at the middle of
    each overlap, so the spans cover [0, n) once and each keeps half an overlap away from its tile's edges."""
    mids = [(b + a + side) / 2 for a, b in zip(starts, starts[1:])]
    return list(zip([0.0] + mids, mids + [float(n)]))


def _ramp(n: int, overlap: int, device) -> torch.Tensor:
    """Blending weights along one tile side: 1 inside, falling linearly over `overlap` px to each edge."""
    i = torch.arange(n, device=device, dtype=torch.float32)
    return (torch.minimum(i + 1, n - i) / (overlap + 1)).clamp(max=1.0)


def _window(mask: np.ndarray, points, H: int, W: int, margin: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the bounding box of a mask and (y, x) points, `margin` px around, in the image."""
    ys, xs = np.nonzero(mask) if mask.any() else (np.zeros(0, int), np.zeros(0, int))  # a click: no full scan
    ys = np.concatenate([ys, [y for y, _ in points]]).astype(int)
    xs = np.concatenate([xs, [x for _, x in points]]).astype(int)
    return (max(0, ys.min() - margin), min(H, ys.max() + margin + 1),
            max(0, xs.min() - margin), min(W, xs.max() + margin + 1))


def _view(hint: np.ndarray, pos, H: int, W: int, side: float) -> tuple[int, int, int, int]:
    """A view of about side x side px centred on the hint (and points), at least 1.5x the hint's extent."""
    y0, y1, x0, x1 = _window(hint, pos, H, W, 0)
    side = max(side, 1.5 * max(y1 - y0, x1 - x0) + 32)
    cy, cx, half = (y0 + y1) / 2, (x0 + x1) / 2, side / 2
    vy0 = int(np.clip(round(cy - half), 0, max(0, H - side)))
    vx0 = int(np.clip(round(cx - half), 0, max(0, W - side)))
    return vy0, min(H, vy0 + int(round(side))), vx0, min(W, vx0 + int(round(side)))


def _grow_window(win, mask: np.ndarray, H: int, W: int) -> tuple[int, int, int, int]:
    """A window twice as large (within the image) when the mask touches an inner edge of win, else win."""
    y0, y1, x0, x1 = win
    m = mask[y0:y1, x0:x1]
    if not m.any():
        return win
    cut = (y0 > 0 and m[0].any()) or (y1 < H and m[-1].any()) or (x0 > 0 and m[:, 0].any()) or \
        (x1 < W and m[:, -1].any())
    if not cut:
        return win
    dy, dx = (y1 - y0) // 2, (x1 - x0) // 2
    return max(0, y0 - dy), min(H, y1 + dy), max(0, x0 - dx), min(W, x1 + dx)


def _snap(inst: np.ndarray, y: int, x: int, radius: int = 3) -> tuple[int, int]:
    """A click that missed the model's objects by a few pixels moves to the nearest object pixel."""
    if inst[y, x] > 0:
        return y, x
    y0, x0 = max(0, y - radius), max(0, x - radius)
    ys, xs = np.nonzero(inst[y0:y + radius + 1, x0:x + radius + 1])
    if not len(ys):
        return y, x
    j = int(np.argmin((ys + y0 - y) ** 2 + (xs + x0 - x) ** 2))
    return int(ys[j] + y0), int(xs[j] + x0)


def _is_box(hint: np.ndarray) -> bool:
    ys, xs = np.nonzero(hint)
    return len(ys) > 0 and len(ys) == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)


def _cut_necks(region: np.ndarray, max_cuts: int = 3) -> np.ndarray:
    """Label map (1..K) of a region cut along the necks between touching convex objects.

    A neck is a pair of deep concavities of the outline (OpenCV convexity defects, at least NECK's depth)
    joined by a segment that stays inside the region and is short against the smaller part it makes
    (NECK's len_ratio x its equivalent diameter); the best pair (deepest per unit of cut length) is cut
    first, up to max_cuts times. Touching nuclei merged into one blob meet at such a neck; a single
    irregular object has no deep concavity pair with a short cut (classic concavity-based splitting of
    clustered nuclei, e.g. Kumar et al. 2006)."""
    m = region.astype(np.uint8)
    for _ in range(max_cuts):
        cut = _best_neck(m)
        if cut is None:
            break
        cv2.line(m, cut[0], cut[1], 0, 2)
    n, lab = cv2.connectedComponents(m, connectivity=4)
    rest = region & (lab == 0)
    for _ in range(3):                                    # cut-line pixels rejoin an adjacent part
        if not rest.any():
            break
        near = cv2.dilate(lab.astype(np.float32), np.ones((3, 3), np.uint8)).astype(np.int32)
        take = rest & (near > 0)
        lab[take] = near[take]
        rest &= ~take
    return lab


def _best_neck(m: np.ndarray, max_defects: int = 8):
    """((x0, y0), (x1, y1)) of the best neck cut of a uint8 mask, or None.

    Pairs of the `max_defects` deepest concavities per outline are tried best first (deepest per unit
    of cut length); the first that passes _neck_ok wins, so a ragged outline costs a few checks."""
    pairs = []
    for c in cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[0]:
        if len(c) < 12:
            continue
        hull = cv2.convexHull(c, returnPoints=False)
        try:
            defects = cv2.convexityDefects(c, hull)
        except cv2.error:                                 # self-intersecting outlines: leave them whole
            continue
        if defects is None:
            continue
        thr = max(NECK["depth_abs"], NECK["depth_rel"] * np.sqrt(cv2.contourArea(c)))
        deep = sorted(((d / 256.0, tuple(int(v) for v in c[f][0])) for _, _, f, d in defects[:, 0]
                       if d / 256.0 >= thr), reverse=True)[:max_defects]
        for i in range(len(deep)):
            for j in range(i + 1, len(deep)):
                (d0, p0), (d1, p1) = deep[i], deep[j]
                length = float(np.hypot(p0[0] - p1[0], p0[1] - p1[1]))
                pairs.append(((d0 + d1) / (length + 1.0), p0, p1, length))
    for _, p0, p1, length in sorted(pairs, key=lambda t: -t[0]):
        if _neck_ok(m, p0, p1, length):
            return p0, p1
    return None


def _neck_ok(m: np.ndarray, p0, p1, length: float) -> bool:
    """The segment stays inside the mask and is short against both parts it cuts off."""
    t = np.linspace(0, 1, max(2, int(length) + 1))
    xs = np.round(p0[0] + t * (p1[0] - p0[0])).astype(int)
    ys = np.round(p0[1] + t * (p1[1] - p0[1])).astype(int)
    if m[ys, xs].mean() < 0.8:
        return False
    cut = m.copy()
    cv2.line(cut, p0, p1, 0, 2)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(cut, connectivity=4)
    if n < 3:
        return False
    areas = np.sort(stats[1:, cv2.CC_STAT_AREA])[::-1][:2]
    return bool(areas[1] >= NECK["min_share"] * m.sum() and length <= NECK["len_ratio"] * 2 * np.sqrt(areas[1] / np.pi))


def _separate(mask: np.ndarray, hint: np.ndarray, pos, neg) -> np.ndarray:
    """The part of a picked region the hint is on, when the model merged touching objects into it:
    the region is cut at its necks (_cut_necks); the parts under a positive click or holding a fair
    share of the hint stay, parts under a negative click go."""
    if not mask.any():
        return mask
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    m = np.pad(mask[y0:y1, x0:x1], 2)
    parts = _cut_necks(m)
    if parts.max() <= 1:
        return mask
    inner = (lambda pts: [(y - y0 + 2, x - x0 + 2) for y, x in pts
                          if 0 <= y - y0 + 2 < m.shape[0] and 0 <= x - x0 + 2 < m.shape[1]])
    keep = {int(parts[y, x]) for y, x in inner(pos)} - {0}
    hh = np.pad(hint[y0:y1, x0:x1], 2) & m
    if hh.any():
        ids, overlap = np.unique(parts[hh], return_counts=True)
        area = np.bincount(parts.ravel())[ids]
        keep |= {int(i) for i, o, a in zip(ids, overlap, area) if i > 0 and (o >= 0.25 * overlap.max() or o >= 0.5 * a)}
    keep -= {int(parts[y, x]) for y, x in inner(neg)}
    if not keep:
        return mask
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = np.isin(parts, list(keep))[2:-2, 2:-2]
    return out


def head_centres(dets: np.ndarray, min_score: float) -> np.ndarray:
    """A head's boxes (N, 6: x0, y0, x1, y1, score, class) -> the objects scoring >= min_score as (M, 5) rows
    (cy, cx, h, w, score), best first: where split_instances parts what the masks merged."""
    d = dets[dets[:, 4] >= min_score]
    d = d[np.argsort(-d[:, 4], kind="stable")]
    return np.stack([(d[:, 1] + d[:, 3]) / 2, (d[:, 0] + d[:, 2]) / 2, d[:, 3] - d[:, 1], d[:, 2] - d[:, 0],
                     d[:, 4]], 1).reshape(-1, 5)


def _split_at_centres(inst: np.ndarray, centres: np.ndarray, duplicate: float = 0.35) -> np.ndarray:
    """An instance map with each object that holds two or more of a detection head's centres split among them
    (new ids after the largest); `centres` (N, 5) rows (cy, cx, h, w, score), best first, in the map's px. A
    centre within `duplicate` x the smaller side of a better one's box in the same object is that object
    again. Each pixel goes to the centre nearest in units of its object's box ((dy / h)^2 + (dx / w)^2).
    The head finds touching nuclei as separate peaks where the masks' boundary map merged them; a watershed
    on the boundary probabilities between the centres, or on the mask's distance transform, parted them
    worse (bench/HISTORY.md, stop 35)."""
    H, W = inst.shape
    iy, ix = centres[:, 0].astype(int), centres[:, 1].astype(int)
    inside = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    owners: dict[int, list[np.ndarray]] = {}
    for c, k in zip(centres[inside], inst[iy[inside], ix[inside]]):
        kept = owners.setdefault(int(k), [])
        if k > 0 and all(math.hypot(c[0] - o[0], c[1] - o[1]) > duplicate * min(o[2], o[3]) for o in kept):
            kept.append(c)
    split = {k: np.array(v) for k, v in owners.items() if k > 0 and len(v) > 1}
    if not split:
        return inst
    boxes = ndimage.find_objects(inst, max_label=max(split))
    nxt = int(inst.max()) + 1
    for k, c in split.items():
        sl = boxes[k - 1]
        view = inst[sl]
        ys, xs = np.nonzero(view == k)
        ys_, xs_ = ys + sl[0].start, xs + sl[1].start
        near = (((ys_[:, None] - c[:, 0]) / np.maximum(c[:, 2], 1)) ** 2 +
                ((xs_[:, None] - c[:, 1]) / np.maximum(c[:, 3], 1)) ** 2).argmin(1)
        view[ys, xs] = np.where(near == 0, k, nxt + near - 1)
        nxt += len(c) - 1
    return inst


def _content_hash(arr: np.ndarray) -> str:
    """A digest of an array's pixels, shape and dtype (SHA-256: ~2 ms for a 520x696 RGB image with the CPU's
    SHA extensions, 2x faster than BLAKE2b here; a collision would answer with another image's objects)."""
    h = hashlib.sha256(np.ascontiguousarray(arr).data)
    h.update(repr((arr.shape, arr.dtype.str)).encode())
    return h.hexdigest()


class PassCache:
    """A bounded, thread-safe LRU map (the server answers requests on several threads). Hand-written:
    functools.lru_cache cannot key on an image, and cachetools is not a dependency for a dozen lines."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._busy: dict = {}                             # key -> Event set when its computation ends
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def compute(self, key, fn):
        """The value at key, else fn()'s, stored. A caller that asks for a key another thread is computing
        waits for that value rather than computing it again (a hint that arrives while warm() runs)."""
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]
                busy = self._busy.get(key)
                if busy is None:
                    busy = self._busy[key] = threading.Event()
                    break
            busy.wait()                                   # then look again: it is cached, or it failed
        try:
            value = fn()
            self.put(key, value)
            return value
        finally:
            with self._lock:
                del self._busy[key]
            busy.set()

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def _clean(mask: np.ndarray) -> np.ndarray:
    """Close small gaps, fill holes and keep the largest component of a rough mask."""
    if not mask.any():
        return mask
    m = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    m = ndimage.binary_fill_holes(m)
    n, comp, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
    if n <= 1:
        return m.astype(bool)
    return comp == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
