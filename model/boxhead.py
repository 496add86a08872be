"""A detection head on the label model's image features: boxes learned as boxes.

CenterNet ("Objects as Points", Zhou et al. 2019, https://arxiv.org/abs/1904.07850): per class a heatmap
with a Gaussian at every box centre, trained with the penalty-reduced focal loss of CornerNet
(https://arxiv.org/abs/1808.01244), plus the box size and the centre's sub-cell offset regressed at the
centre cell. Boxes come back as the heatmap's local maxima (3x3 max-pool), so two boxes that overlap keep
their two peaks as long as their centres are a cell apart. The Gaussians are elliptical, sigma = alpha x
the box's side / 6 (TTFNet, https://arxiv.org/abs/1909.00700), and sizes are regressed as logs, so objects of
very different sizes weigh alike. The head reads the encoder's features from R/2 down (the finest level
plus the coarser ones upsampled and added, a small FPN), so objects a few model pixels wide get cells.

Boxes are (x0, y0, x1, y1) in pixel edges of the head's input; a head cell covers `stride` pixels.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

GAUSS_ALPHA = 0.54     # TTFNet's Gaussian size relative to the box
MIN_SIGMA = 0.4        # cells: a box a cell or two wide still gets a peak its neighbours see
PRIOR = 0.01           # initial heatmap probability (RetinaNet's prior): the focal loss starts small
REG_REGION = 0.3       # sizes and offsets are regressed where an object's Gaussian is at least this
# decode_boxes keeps at most one box per BOX_CAP_CELLS head cells, never fewer than MIN_BOX_CAP. A fixed 300
# per pass silently dropped the objects of a dense image beyond it (DSB 2018 has a 520x696 frame of 369 nuclei,
# one pass for a box model at a scale under 0.85); a cap still bounds what an untrained head's noise costs
BOX_CAP_CELLS = 16
MIN_BOX_CAP = 300


class BoxHead(nn.Module):
    """Encoder features at R, R/2, ... -> (heat logits (B, C, h, w), log size (B, 2, h, w), offset (B, 2, h, w))
    at h = H / stride, stride = 2 ** level."""

    def __init__(self, widths, n_classes: int, level: int = 1, channels: int = 32, stem_stride: int = 1):
        super().__init__()
        self.level = level
        # the features list starts at R / stem_stride: cells of 2 ** level px are its entry `first`
        self.first = level - (stem_stride.bit_length() - 1)
        self.lateral = nn.ModuleList(nn.Conv2d(w, channels, 1) for w in widths[self.first:])
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU())
        self.heat = nn.Conv2d(channels, n_classes, 1)
        self.size = nn.Conv2d(channels, 2, 1)
        self.offset = nn.Conv2d(channels, 2, 1)
        nn.init.constant_(self.heat.bias, -math.log((1 - PRIOR) / PRIOR))

    @property
    def stride(self) -> int:
        return 2 ** self.level

    def forward(self, feats):
        fs = feats[self.first:]
        h = self.lateral[0](fs[0])
        for lat, f in zip(self.lateral[1:], fs[1:]):
            h = h + F.interpolate(lat(f), size=h.shape[-2:], mode="nearest")
        # Tried: the coarsest features' mean over the image added at every cell (what the image holds, cat or
        # dog, is one answer per image): Pets heads, 600 iterations, seeds 0-2, without quarter turns, AP50
        # 0.450 +- 0.106 against 0.462 +- 0.079 (0.571 / 0.313 / 0.466 vs 0.516 / 0.350 / 0.520; with quarter
        # turns, seed 0, 0.140 vs 0.200): not kept
        # Tried (stop 29): one objectness map shared by the classes times a class softmax (FCOS / YOLO's split
        # of where from what), as per-class logits: Pets heads, 2,400 iterations, seeds 0 / 1, AP50 0.775 /
        # 0.715 against 0.763 / 0.785 (regions_pets_heads_2400p4_cls_s*.json): not kept
        # Tried (stop 42): three residual 3x3 convolutions dilated 2 / 4 / 8 after the body (each cell sees ~30
        # cells around it, a Pets head's whole animal): Pets heads, 2,400 iterations, a bf16 host, seeds 0 / 1,
        # AP50 0.791 / 0.748 (the version declined the extra scales) against the same code without them 0.757 /
        # 0.785 one pass, 0.832 / 0.757 with its chosen scales (regions_pets_heads_2400p4_cb1_ctx3_bf16_s*.json):
        # not kept
        h = self.body(h)
        return self.heat(h), self.size(h), self.offset(h)


# -----------------------------------------------------------------------------
# targets


def encode_boxes(boxes: list[np.ndarray], n_classes: int, shape: tuple[int, int], stride: int) -> dict:
    """Per image boxes (N, 5) rows (x0, y0, x1, y1, class 1..C) in input px -> training targets at the
    head's cells (h, w) = shape: {"heat" (B, C, h, w) in [0, 1], "size" (B, 2, h, w) log(w, h / stride),
    "offset" (B, 2, h, w) the centre from the cell's corner, "mask" (B, 1, h, w) regression weights}.

    Sizes and offsets are regressed at every cell near a centre (where its Gaussian >= REG_REGION),
    weighted by the Gaussian and summing to 1 per object (TTFNet): a large object, one per image, gives
    dozens of regression samples instead of one. A cell near two centres goes to the one whose Gaussian
    is higher there (the smaller box on ties: larger boxes are written first)."""
    h, w = shape
    heat = np.zeros((len(boxes), n_classes, h, w), np.float32)
    size = np.zeros((len(boxes), 2, h, w), np.float32)
    offset = np.zeros((len(boxes), 2, h, w), np.float32)
    mask = np.zeros((len(boxes), 1, h, w), np.float32)
    ys, xs = np.arange(h, dtype=np.float32)[:, None] + 0.5, np.arange(w, dtype=np.float32)[None, :] + 0.5
    for i, b in enumerate(boxes):
        b = np.asarray(b, np.float64).reshape(-1, 5) / [stride, stride, stride, stride, 1]
        order = np.argsort(-(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), kind="stable")
        owner = np.zeros((h, w), np.float32)       # the Gaussian of the object a cell regresses
        for x0, y0, x1, y1, c in b[order]:
            bw, bh = x1 - x0, y1 - y0
            if bw <= 0 or bh <= 0:
                continue
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            j, k = min(int(cx), w - 1), min(int(cy), h - 1)
            sx, sy = max(GAUSS_ALPHA * bw / 6, MIN_SIGMA), max(GAUSS_ALPHA * bh / 6, MIN_SIGMA)
            # the peak sits on the centre cell's middle, so the cell the decoder reads gets exactly 1
            g = np.exp(-((xs - j - 0.5) ** 2) / (2 * sx ** 2) - ((ys - k - 0.5) ** 2) / (2 * sy ** 2))
            np.maximum(heat[i, int(c) - 1], g, out=heat[i, int(c) - 1])
            region = (g >= min(REG_REGION, 1.0)) & (g >= owner)
            region[k, j] = True
            wgt = np.where(region, g, 0.0)
            size[i, 0][region], size[i, 1][region] = np.log(bw), np.log(bh)
            offset[i, 0][region] = np.broadcast_to(cx - (xs - 0.5), (h, w))[region]   # centre - cell corner
            offset[i, 1][region] = np.broadcast_to(cy - (ys - 0.5), (h, w))[region]
            mask[i, 0][region] = wgt[region] / wgt.sum()
            owner[region] = g[region]
    return {key: torch.from_numpy(v) for key, v in
            (("heat", heat), ("size", size), ("offset", offset), ("mask", mask))}


def box_losses(outputs, targets: dict) -> dict:
    """Focal loss on the heatmap + L1 on log size and offset near the centres, each per object."""
    heat_logits, size, offset = (o.float() for o in outputs)
    t, m = targets["heat"], targets["mask"]
    n = t.eq(1).sum().float().clamp(min=1.0)      # objects: one peak each
    p = heat_logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    # Tried: GFL's quality focal loss (every Gaussian cell a soft target) for Pets' one large head per
    # image: AP50 0.032 -> 0.043 at 150 iterations, one seed, with recall after the cut 0.02: not kept
    pos = t.eq(1).float()
    focal = -(pos * (1 - p) ** 2 * torch.log(p)
              + (1 - pos) * (1 - t) ** 4 * p ** 2 * torch.log(1 - p)).sum() / n
    l_size = (F.l1_loss(size, targets["size"], reduction="none") * m).sum() / n
    l_off = (F.l1_loss(offset, targets["offset"], reduction="none") * m).sum() / n
    # Tried twice: TTFNet's GIoU loss on the box each regression cell stands for, weight 2, beside the L1. DSB
    # native boxes (stop 26), seeds 0 / 1: AP50 0.748 -> 0.730, 0.733 -> 0.744; Pets heads (stop 38), 2,400
    # iterations, seeds 0-3: 0.813 / 0.800 / 0.774 / 0.853 -> 0.622 / 0.805 / 0.694 / 0.821
    # (regions_pets_heads_2400p4_giou2_s*.json): not kept
    return {"heat": focal, "size": l_size, "offset": l_off, "box": focal + l_size + l_off}


# -----------------------------------------------------------------------------
# decoding


def flip_average(heads, mirrored) -> tuple:
    """The head's outputs on an image and on its mirror image (left-right), the latter flipped back, averaged
    (test-time flip: the head was trained on mirrored images too). Heat logits and log sizes average as they
    are; a mirrored cell's x offset o (centre - cell corner, in cells) is 1 - o at the unmirrored cell.
    Pets heads, 600 iterations, seeds 0-2 (the same checkpoints with and without): AP50 0.516 / 0.350 / 0.520
    -> 0.588 / 0.494 / 0.563. Averaging probabilities instead of logits: 0.565 / 0.496 / 0.551.
    Tried, not kept (stop 48): for a head trained with quarter turns, the upside-down and half-turned images'
    outputs averaged in too (four passes, y offsets as 1 - o). DSB native boxes, the same checkpoints, the cut
    and extra scales chosen again: 2,400 iterations seeds 2 / 3 AP50 0.819 / 0.807 -> 0.816 / 0.809, 600
    iterations seeds 0 / 1 0.741 / 0.740 -> 0.742 / 0.729, at 1.2-1.6x the prediction time."""
    heat, size, offset = (t.float() for t in heads)
    m_heat, m_size, m_offset = (t.float().flip(-1) for t in mirrored)
    m_offset = torch.cat([1 - m_offset[:, :1], m_offset[:, 1:]], 1)
    return (heat + m_heat) / 2, (size + m_size) / 2, (offset + m_offset) / 2


@torch.no_grad()
def decode_boxes(heat: torch.Tensor, size: torch.Tensor, offset: torch.Tensor, stride: int,
                 max_boxes: int | None = None, min_score: float = 0.05) -> list[np.ndarray]:
    """Heat probabilities (B, C, h, w) (sigmoid of the logits), log size and offset -> per image an array
    (N, 6) rows (x0, y0, x1, y1, score, class 1..C) in input px, highest score first: the heatmap's 3x3
    local maxima scoring >= min_score, at most max_boxes (default: one per BOX_CAP_CELLS cells, at least
    MIN_BOX_CAP). Each box is the one its peak cell regresses. Tried, not kept (stop 39): each peak's box as
    the heat-weighted mean of the boxes its neighbours within 1-2 cells regress (those with IoU >= 0.5-0.7
    with the peak's own), Pets heads seeds 0 / 1, the same checkpoints: AP50 0.822 / 0.713 -> 0.816-0.825 /
    0.702-0.703 (`regions_pets_heads_vote.json`)."""
    heat, size, offset = heat.float(), size.float(), offset.float()
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    B, C, h, w = heat.shape
    cap = max_boxes if max_boxes is not None else max(MIN_BOX_CAP, h * w // BOX_CAP_CELLS)
    scores, idx = peaks.reshape(B, -1).topk(min(cap, C * h * w))
    out = []
    for b in range(B):
        keep = scores[b] >= min_score
        s, i = scores[b][keep], idx[b][keep]
        c, cell = i // (h * w), i % (h * w)
        k, j = cell // w, cell % w
        cx = (j.float() + offset[b, 0, k, j]) * stride
        cy = (k.float() + offset[b, 1, k, j]) * stride
        bw, bh = size[b, 0, k, j].exp() * stride, size[b, 1, k, j].exp() * stride
        rows = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2, s, (c + 1).float()], 1)
        out.append(rows.cpu().numpy().astype(np.float64))
    return out
