"""Label VQ-VAE with an image-conditioned decoder, and the code predictor that drives it from the image.

A one-hot label map is encoded (x8 down) and quantized with an EMA codebook (VQ-VAE, van den Oord et al.
2017, https://arxiv.org/abs/1711.00937; EMA updates as in rosinality/vq-vae-2-pytorch; dead-code restart as
in lucidrains/vector-quantize-pytorch). The decoder also sees U-Net skip features of the image (dropped at
random in training so it can decode a layout alone). The code predictor is a small CNN head over the same
image features that predicts, per latent cell, a distribution over the codebook; the decoder then turns
the predicted codes plus the image features into label logits at the working resolution R. Box-only
projects add a detection head on the same features (model/boxhead.py), so boxes are learned as boxes.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .boxhead import BoxHead

# -----------------------------------------------------------------------------


def _norm(channels: int, kind: str) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(min(8, channels // 4), channels)


class ConvBlock(nn.Module):
    """Two 3x3 conv + norm + SiLU with a residual connection."""

    def __init__(self, in_channels, out_channels, norm="batch"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = _norm(out_channels, norm)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels, norm)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = F.silu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.silu(h + self.skip(x))


class Down(nn.Module):
    """Stride-2 conv then a ConvBlock: halves the resolution."""

    def __init__(self, in_channels, out_channels, norm="batch"):
        super().__init__()
        self.down = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.block = ConvBlock(out_channels, out_channels, norm)

    def forward(self, x):
        return self.block(self.down(x))


class ImageEncoder(nn.Module):
    """U-Net style encoder: returns features at R/s, R/2s, R/4s, ... (the skips the decoder sees), s the stem
    stride. s = 2 is a space-to-depth stem: each 2x2 pixel block becomes 12 channels (pixel unshuffle) and the
    first level works at R/2, so no layer runs at the full resolution."""

    def __init__(self, widths, stem_stride: int = 1):
        super().__init__()
        self.stem_stride = stem_stride
        self.stem = ConvBlock(3 * stem_stride ** 2, widths[0])
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(len(widths) - 1))

    def forward(self, image):
        if self.stem_stride > 1:
            image = F.pixel_unshuffle(image, self.stem_stride)  # (B, 3, H, W) -> (B, 3 s^2, H/s, W/s)
        feats = [self.stem(image)]
        for down in self.downs:
            feats.append(down(feats[-1]))
        return feats


class LabelEncoder(nn.Module):
    """One-hot label map (B, n_labels, R, R) -> continuous latents (B, embed_dim, R/f, R/f).

    Each f x f patch is flattened (pixel unshuffle) and mapped by a per-patch MLP (1x1 convs, no norm),
    so a code depends on its patch alone: an all-background patch always gets the same code."""

    def __init__(self, n_labels, widths, embed_dim, factor):
        super().__init__()
        self.factor = factor
        self.mlp = nn.Sequential(nn.Conv2d(n_labels * factor * factor, widths[-1], 1), nn.SiLU(),
                                 nn.Conv2d(widths[-1], widths[-1], 1), nn.SiLU(),
                                 nn.Conv2d(widths[-1], embed_dim, 1))

    def forward(self, x):
        return self.mlp(F.pixel_unshuffle(x, self.factor))  # (B, L, R, R) -> (B, L*f*f, R/f, R/f) -> ...


def _upsample_to(h, f):
    """h at f's spatial size (nearest; the decoder's steps are 2x apart)."""
    return h if h.shape[-2:] == f.shape[-2:] else F.interpolate(h, size=f.shape[-2:], mode="nearest")


class SkipAdd(nn.Module):
    """Cheap fine-level decoder step: project the upsampled path, add the image skip, one 3x3 conv."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 1)
        self.conv = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        # Tried: BatchNorm here, folded into the conv at inference: the network pass 0.99x the CPU at 264x352,
        # 0.95x at 520x696 (bench/results/micro_net_try.json): GroupNorm is not what the fine level costs; not kept
        self.norm = _norm(out_channels, "group")

    def forward(self, h, f):
        # project before the 2x nearest upsampling: a 1x1 conv commutes with copying pixels, so the result is
        # the same for a quarter of the projection's pixels and half the upsampled channels (bench/speed.py)
        h = _upsample_to(self.proj(h), f)
        return F.silu(self.norm(self.conv(F.silu(h + f))))


class SkipCat(nn.Module):
    """Coarse-level decoder step: concatenate the image skip, then a ConvBlock."""

    def __init__(self, in_channels, skip_channels, out_channels):
        super().__init__()
        self.block = ConvBlock(in_channels + skip_channels, out_channels, "group")

    def forward(self, h, f):
        return self.block(torch.cat([_upsample_to(h, f), f], dim=1))


class Decoder(nn.Module):
    """Latents (+ image skip features, or zeros when absent) -> label logits at R.

    The two coarsest levels concatenate the skips (capacity is cheap there); the fine levels add them. With a
    stem stride s > 1 the finest level is at R/s and its 1x1 output conv gives every pixel of an s x s block
    its own logits (pixel shuffle)."""

    def __init__(self, n_labels, widths, embed_dim, stem_stride: int = 1):
        super().__init__()
        n = len(widths)
        self.stem_stride = stem_stride
        self.inp = nn.Conv2d(embed_dim, widths[-1], 3, padding=1)
        self.steps = nn.ModuleList()
        for i in reversed(range(n)):  # coarse to fine
            in_ch = widths[min(i + 1, n - 1)]
            self.steps.append(SkipCat(in_ch, widths[i], widths[i]) if i >= n - 2 else SkipAdd(in_ch, widths[i]))
        self.out = nn.Conv2d(widths[0], n_labels * stem_stride ** 2, 1)

    def forward(self, z, feats):
        h = F.silu(self.inp(z))
        for step, f in zip(self.steps, reversed(feats)):
            h = step(h, f)      # each step brings the path up to its skip's size
        h = self.out(h)
        return F.pixel_shuffle(h, self.stem_stride) if self.stem_stride > 1 else h


class Quantizer(nn.Module):
    """EMA vector quantizer with dead-code restart; all running state lives in buffers."""

    def __init__(self, codebook_size, embed_dim, decay=0.99, eps=1e-5, dead_threshold=0.1):
        super().__init__()
        self.codebook_size, self.embed_dim = codebook_size, embed_dim
        self.decay, self.eps, self.dead_threshold = decay, eps, dead_threshold
        embed = torch.randn(codebook_size, embed_dim) * 0.1
        self.register_buffer("embed", embed)                        # (K, D)
        self.register_buffer("embed_avg", embed.clone())            # (K, D)
        self.register_buffer("cluster_size", torch.zeros(codebook_size))  # (K,)
        self.register_buffer("initted", torch.tensor(False))

    def forward(self, z):
        with torch.autocast(z.device.type, enabled=False):  # code assignment needs full precision
            return self._quantize(z.float())

    def _quantize(self, z):
        B, D, h, w = z.shape
        assert D == self.embed_dim, f"latent has {D} channels, codebook has {self.embed_dim}"
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (B, D, h, w) -> (B*h*w, D)
        if self.training and not bool(self.initted):  # data-dependent init: codes start on encoder outputs
            self.embed.copy_(self._sample(flat.detach(), self.codebook_size))
            self.embed_avg.copy_(self.embed * self.dead_threshold)
            self.cluster_size.fill_(self.dead_threshold)
            self.initted.fill_(True)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t() + self.embed.pow(2).sum(1)[None]
        indices = dist.argmin(dim=1)  # (B*h*w,)
        if self.training:
            self._update(flat.detach(), indices)
        z_q = self.lookup(indices.view(B, h, w))
        commit_loss = F.mse_loss(z, z_q.detach())
        z_q = z + (z_q - z).detach()  # straight-through estimator
        return z_q, commit_loss, indices.view(B, h, w)

    def lookup(self, indices):
        """Codes (B, h, w) -> embeddings (B, D, h, w)."""
        return F.embedding(indices, self.embed).permute(0, 3, 1, 2)  # (B, h, w, D) -> (B, D, h, w)

    @torch.no_grad()
    def _update(self, flat, indices):
        onehot = F.one_hot(indices, self.codebook_size).type(flat.dtype)  # (N, K)
        counts = onehot.sum(0)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(onehot.t() @ flat, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n  # Laplace
        self.embed.copy_(self.embed_avg / smoothed[:, None])
        self.restart_dead(flat, used=counts > 0)

    @torch.no_grad()
    def restart_dead(self, flat, used=None):
        """Move codes whose EMA usage fell below dead_threshold onto current encoder outputs, picked with
        probability ~ their distance to the codebook (k-means++ style), so restarts go where codes are missing."""
        dead = self.cluster_size < self.dead_threshold
        if used is not None:
            dead &= ~used  # codes picked in this batch keep their place
        n_dead = int(dead.sum())
        if n_dead:
            err = torch.cdist(flat, self.embed[~dead]).min(dim=1).values if bool((~dead).any()) else None
            self.embed[dead] = self._sample(flat, n_dead, err)
            self.embed_avg[dead] = self.embed[dead] * self.dead_threshold
            self.cluster_size[dead] = self.dead_threshold
        return n_dead

    @staticmethod
    def _sample(flat, n, weight=None):
        if weight is None or float(weight.sum()) <= 0:
            idx = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        else:
            idx = torch.multinomial(weight.pow(2), n, replacement=True)
        return flat[idx] + 1e-3 * torch.randn(n, flat.shape[1], device=flat.device)


class CodePredictor(nn.Module):
    """Image features at R/8 (with R/4 pooled in) -> logits over the codebook per latent cell.

    The head predicts a query vector per cell and scores every code by its (scaled) negative squared
    distance, so the distribution follows codes as the EMA codebook moves or restarts them."""

    def __init__(self, widths, embed_dim, n_layers=2):
        super().__init__()
        ch = widths[-1]
        self.inp = nn.Conv2d(widths[-1] + widths[-2], ch, 1)
        self.blocks = nn.Sequential(*[ConvBlock(ch, ch) for _ in range(n_layers)])
        self.out = nn.Conv2d(ch, embed_dim, 1)
        self.log_scale = nn.Parameter(torch.tensor(0.0))

    def forward(self, feats, codebook):
        x = torch.cat([feats[-1], F.avg_pool2d(feats[-2], 2)], dim=1)
        query = self.out(self.blocks(self.inp(x)))  # (B, D, h, w)
        with torch.autocast(query.device.type, enabled=False):  # distances need full precision
            query = query.float()
            dist = (query.pow(2).sum(1, keepdim=True) - 2 * torch.einsum("bdhw,kd->bkhw", query, codebook)
                    + codebook.pow(2).sum(1)[None, :, None, None])  # (B, K, h, w)
            return -dist * self.log_scale.exp()


@dataclass(frozen=True)
class VQVAEConfig:
    resolution: int = 128                   # working resolution R (square, letterboxed)
    n_labels: int = 3                       # background + C classes + 1 boundary (object outline) class
    codebook_size: int = 512
    embed_dim: int = 64
    widths: tuple = (16, 32, 64, 96)        # per level R, R/2, R/4, R/8: x8 downsampling
    commitment: float = 0.25
    ema_decay: float = 0.95                 # fast enough to track the encoder in short CPU runs
    dead_threshold: float = 0.1             # EMA usage below which a code is restarted
    image_dropout: float = 0.3              # share of training samples decoded without the image
    n_predictor_layers: int = 1
    invert_bright: bool = True              # invert images with a bright median (objects bright on dark)
    boundary_width: int = 1                 # object outline width in pixels at R
    box_classes: int = 0                    # > 0: a box detection head for this many classes (model/boxhead.py)
    box_level: int = 1                      # the head's finest feature level: cells of 2 ** box_level px
    stem_stride: int = 1                    # 2: space-to-depth stem, the first level at R/2 (widths then name
                                            # the levels R/2, R/4, R/8); 1: the first level at R (old models)

    def __post_init__(self):
        if self.resolution % self.downsample:
            raise ValueError(f"resolution {self.resolution} must be a multiple of {self.downsample}")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {self.stem_stride}")
        if self.stem_stride > 1 and self.downsample > 8:     # inputs are padded to a multiple of 8 (inference)
            raise ValueError(f"stem_stride {self.stem_stride} with {len(self.widths)} widths downsamples x"
                             f"{self.downsample}; give at most 3 widths (levels R/2, R/4, R/8), e.g. (32, 64, 96)")
        if self.box_classes and self.box_level < self.stem_stride.bit_length() - 1:
            raise ValueError(f"box_level {self.box_level} is finer than the first level "
                             f"(stem_stride {self.stem_stride})")
        if self.n_labels < 2:
            raise ValueError(f"n_labels must be >= 2 (background + at least one class), got {self.n_labels}")

    @property
    def downsample(self) -> int:
        return self.stem_stride * 2 ** (len(self.widths) - 1)


class VQVAE(nn.Module):
    """Label VQ-VAE whose decoder also sees the image, plus the image -> code predictor."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        w = tuple(config.widths)
        self.image_encoder = ImageEncoder(w, config.stem_stride)
        self.label_encoder = LabelEncoder(config.n_labels, w, config.embed_dim, config.downsample)
        self.quantizer = Quantizer(config.codebook_size, config.embed_dim, config.ema_decay,
                                   dead_threshold=config.dead_threshold)
        self.decoder = Decoder(config.n_labels, w, config.embed_dim, config.stem_stride)
        self.code_predictor = CodePredictor(w, config.embed_dim, config.n_predictor_layers)
        self.box_head = (BoxHead(w, config.box_classes, config.box_level, stem_stride=config.stem_stride)
                         if config.box_classes else None)

    def features(self, image):
        """Image (B, 3, R, R) in [0, 1] -> skip features at R, R/2, R/4, R/8 (R/2, R/4, R/8 with stem_stride 2)."""
        return self.image_encoder(image * 2 - 1)

    def _zero_features(self, z):
        B, _, h, w = z.shape
        return [z.new_zeros(B, c, h * 2 ** i, w * 2 ** i) for i, c in enumerate(reversed(self.config.widths))][::-1]

    def encode(self, x):
        """One-hot (B, n_labels, R, R) -> (z_q (B, D, R/8, R/8), commit_loss, indices (B, R/8, R/8))."""
        z = self.label_encoder(x)
        z_q, commit_loss, indices = self.quantizer(z)
        return z_q, self.config.commitment * commit_loss, indices

    def decode(self, z_q, image=None, feats=None):
        """Latents (+ image or its precomputed features) -> label logits (B, n_labels, R, R)."""
        if feats is None:
            feats = self.features(image) if image is not None else self._zero_features(z_q)
        return self.decoder(z_q, feats)

    def decode_code(self, indices, image=None, feats=None):
        return self.decode(self.quantizer.lookup(indices), image, feats)

    def predict_codes(self, image=None, feats=None):
        """Code logits (B, K, R/8, R/8) from the image alone."""
        feats = self.features(image) if feats is None else feats
        return self.code_predictor(feats, self.quantizer.embed)

    def embed_codes(self, code_logits, temperature=1.0):
        """Expected code embedding under softmax(code_logits / T): (B, K, h, w) -> (B, D, h, w)."""
        probs = F.softmax(code_logits / temperature, dim=1)
        return torch.einsum("bkhw,kd->bdhw", probs, self.quantizer.embed)

    def drop_features(self, feats, p):
        """Zero the image features of a random share p of the samples (training only)."""
        keep = (torch.rand(feats[0].shape[0], 1, 1, 1, device=feats[0].device) >= p).to(feats[0].dtype)
        return [f * keep for f in feats]

    def forward(self, x, image=None):
        """Reconstruct a one-hot label map, optionally with its image: -> (logits, commit_loss, indices)."""
        z_q, commit_loss, indices = self.encode(x)
        feats = self.features(image) if image is not None else self._zero_features(z_q)
        if self.training and image is not None and self.config.image_dropout > 0:
            feats = self.drop_features(feats, self.config.image_dropout)
        return self.decode(z_q, feats=feats), commit_loss, indices

    def detect(self, feats):
        """Box head outputs (heat logits (B, C, h, w), log size, offset) from the image features."""
        assert self.box_head is not None, "this model has no box head (box_classes=0)"
        return self.box_head(feats)

    @torch.no_grad()
    def segment(self, image, temperature=1.0):
        """Inference path: image -> predicted codes -> decoder with image features -> (logits, code_logits)."""
        feats = self.features(image)
        code_logits = self.predict_codes(feats=feats)
        return self.decoder(self.embed_codes(code_logits, temperature), feats), code_logits
