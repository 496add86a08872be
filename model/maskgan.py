"""Mask-conditional GAN: a lean SPADE-style generator (label map + noise -> image) and a PatchGAN
discriminator conditioned on the label map, with hinge loss, feature matching and DiffAugment.
References: SPADE (Park et al. 2019, https://github.com/NVlabs/SPADE), pix2pixHD instance edge maps
(https://github.com/NVIDIA/pix2pixHD), DiffAugment (Zhao et al. 2020,
https://github.com/mit-han-lab/data-efficient-gans).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import spectral_norm


def label_maps_to_mask(classes: torch.Tensor, instances: torch.Tensor, n_labels: int,
                       boundary: bool = True) -> torch.Tensor:
    """(B, H, W) class and instance maps -> (B, n_labels [+1], H, W) float one-hot [+ instance edges]."""
    assert classes.shape == instances.shape and classes.dim() == 3, f"bad shapes {classes.shape} {instances.shape}"
    if int(classes.max()) >= n_labels or int(classes.min()) < 0:
        raise ValueError(f"class index out of range 0..{n_labels - 1}: check n_labels against label_names")
    mask = F.one_hot(classes.long(), n_labels).permute(0, 3, 1, 2).float()  # (B, H, W, C) -> (B, C, H, W)
    if not boundary:
        return mask
    # pix2pixHD edge map: a foreground pixel whose 4-neighbour belongs to another instance (or background),
    # so that touching objects of one class stay separate objects in the generated image
    ins = instances.long()
    edge = torch.zeros_like(ins, dtype=torch.bool)
    edge[:, :, 1:] |= ins[:, :, 1:] != ins[:, :, :-1]
    edge[:, :, :-1] |= ins[:, :, 1:] != ins[:, :, :-1]
    edge[:, 1:, :] |= ins[:, 1:, :] != ins[:, :-1, :]
    edge[:, :-1, :] |= ins[:, 1:, :] != ins[:, :-1, :]
    edge &= ins > 0
    return torch.cat([mask, edge[:, None].float()], dim=1)


# -----------------------------------------------------------------------------
# DiffAugment: the same differentiable augmentation on real and fake batches; translation and cutout move
# the label map with the image so that the conditional discriminator still sees aligned pairs.

def _rand_color(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    B = x.size(0)
    x = x + (torch.rand(B, 1, 1, 1, generator=g, device=x.device) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (torch.rand(B, 1, 1, 1, generator=g, device=x.device) * 2) + mean  # saturation
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (torch.rand(B, 1, 1, 1, generator=g, device=x.device) + 0.5) + mean  # contrast


def _rand_translation(x: torch.Tensor, g: torch.Generator | None, ratio: float = 0.125) -> torch.Tensor:
    B, _, H, W = x.shape
    sh, sw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    ty = torch.randint(-sh, sh + 1, size=[B, 1, 1], generator=g, device=x.device)
    tx = torch.randint(-sw, sw + 1, size=[B, 1, 1], generator=g, device=x.device)
    gb, gy, gx = torch.meshgrid(torch.arange(B, device=x.device), torch.arange(H, device=x.device),
                                torch.arange(W, device=x.device), indexing="ij")
    gy = torch.clamp(gy + ty + 1, 0, H + 1)
    gx = torch.clamp(gx + tx + 1, 0, W + 1)
    x_pad = F.pad(x, [1, 1, 1, 1])  # zeros enter at the borders
    return x_pad.permute(0, 2, 3, 1)[gb, gy, gx].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def _rand_cutout(x: torch.Tensor, g: torch.Generator | None, ratio: float = 0.5) -> torch.Tensor:
    B, _, H, W = x.shape
    ch, cw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    oy = torch.randint(0, H + (1 - ch % 2), size=[B, 1, 1], generator=g, device=x.device)
    ox = torch.randint(0, W + (1 - cw % 2), size=[B, 1, 1], generator=g, device=x.device)
    gb, gy, gx = torch.meshgrid(torch.arange(B, device=x.device), torch.arange(ch, device=x.device),
                                torch.arange(cw, device=x.device), indexing="ij")
    gy = torch.clamp(gy + oy - ch // 2, min=0, max=H - 1)
    gx = torch.clamp(gx + ox - cw // 2, min=0, max=W - 1)
    keep = torch.ones(B, H, W, dtype=x.dtype, device=x.device)
    keep[gb, gy, gx] = 0
    return x * keep[:, None]


def diff_augment(x: torch.Tensor, mask: torch.Tensor, policy: str = "color,translation,cutout",
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment images (B, 3, H, W) and their label maps (B, C, H, W) consistently; differentiable in x.
    Two calls with generators in the same state draw the same augmentation (used for real and fake)."""
    ops = [p for p in policy.split(",") if p]
    unknown = set(ops) - {"color", "translation", "cutout"}
    if unknown:
        raise ValueError(f"unknown DiffAugment ops {sorted(unknown)}: use color, translation, cutout")
    if "color" in ops:
        x = _rand_color(x, generator)
    xm = torch.cat([x, mask], dim=1)  # one gather moves image and label map together
    if "translation" in ops:
        xm = _rand_translation(xm, generator)
    if "cutout" in ops:
        xm = _rand_cutout(xm, generator)
    return xm[:, :x.size(1)], xm[:, x.size(1):]


# -----------------------------------------------------------------------------
# losses (pure functions on discriminator logits / features)

def d_hinge_loss(real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hinge loss for D: (loss on real logits, loss on fake logits)."""
    return F.relu(1.0 - real).mean(), F.relu(1.0 + fake).mean()


def g_hinge_loss(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


def feature_matching_loss(real_feats: list[torch.Tensor], fake_feats: list[torch.Tensor]) -> torch.Tensor:
    """pix2pixHD feature matching: mean L1 between D features of real and fake, real side held fixed."""
    assert len(real_feats) == len(fake_feats), f"{len(real_feats)} != {len(fake_feats)} feature maps"
    return sum(F.l1_loss(f, r.detach()) for r, f in zip(real_feats, fake_feats)) / len(real_feats)


# -----------------------------------------------------------------------------
# blocks

class MaskNorm(nn.Module):
    """SPADE: parameter-free normalization, then scale and bias predicted per pixel from the label map
    (plus, here, a per-channel scale and bias from the latent z so that z can set the global style)."""

    def __init__(self, norm_nc, label_nc, n_hidden, z_dim=0):
        super().__init__()
        self.param_free_norm = nn.InstanceNorm2d(norm_nc, affine=False)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, n_hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma_beta = nn.Conv2d(n_hidden, 2 * norm_nc, 3, padding=1)  # gamma and beta in one conv
        self.z_gamma_beta = nn.Linear(z_dim, 2 * norm_nc) if z_dim else None
        if self.z_gamma_beta is not None:  # start as plain SPADE; z's global style is learned from there
            nn.init.zeros_(self.z_gamma_beta.weight)
            nn.init.zeros_(self.z_gamma_beta.bias)

    def forward(self, x, mask, z=None):
        # Part 1. generate parameter-free normalized activations
        normalized = self.param_free_norm(x)
        # Part 2. produce scaling and bias conditioned on the label map
        if mask.shape[-2:] != x.shape[-2:]:
            mask = F.interpolate(mask, size=x.shape[-2:], mode="nearest")
        gamma_beta = self.mlp_gamma_beta(self.mlp_shared(mask))  # (B, 2C, H, W)
        # the 1 of (1 + gamma) and z's per-channel scale and bias are folded into one (B, 2C, 1, 1) offset:
        # one pass over the full-size maps instead of three (gamma + z_gamma, beta + z_beta, 1 + gamma)
        C = x.size(1)
        offset = torch.cat([torch.ones(C, device=x.device), torch.zeros(C, device=x.device)])[None]
        if self.z_gamma_beta is not None and z is not None:
            offset = offset + self.z_gamma_beta(z)  # (B, 2C)
        gamma, beta = (gamma_beta + offset[:, :, None, None].to(gamma_beta.dtype)).chunk(2, dim=1)
        # apply scale and bias
        return torch.addcmul(beta, normalized, gamma)


class MaskResBlock(nn.Module):
    """SPADE residual block with a learned shortcut, plus StyleGAN-like per-pixel noise injection."""

    def __init__(self, in_channels, out_channels, label_nc, n_hidden, z_dim):
        super().__init__()
        mid = min(in_channels, out_channels)
        self.norm_0 = MaskNorm(in_channels, label_nc, n_hidden, z_dim)
        self.conv_0 = nn.Conv2d(in_channels, mid, 3, padding=1, padding_mode="reflect")
        self.norm_1 = MaskNorm(mid, label_nc, n_hidden, z_dim)
        self.conv_1 = nn.Conv2d(mid, out_channels, 3, padding=1, padding_mode="reflect")
        self.learned_shortcut = in_channels != out_channels
        if self.learned_shortcut:
            self.conv_s = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.noise_scale = nn.Parameter(torch.zeros(1, mid, 1, 1))

    def forward(self, x, mask, z, noise):
        x_s = self.conv_s(x) if self.learned_shortcut else x
        inplace = not torch.is_grad_enabled()  # inference: the norms' outputs are not kept, so overwrite them
        h = self.conv_0(F.leaky_relu(self.norm_0(x, mask, z), 0.2, inplace=inplace))
        h = torch.addcmul(h, self.noise_scale, noise)  # h + noise_scale * noise in one pass
        h = self.conv_1(F.leaky_relu(self.norm_1(h, mask, z), 0.2, inplace=inplace))
        return x_s + h


# -----------------------------------------------------------------------------

@dataclass(frozen=True)
class MaskGANConfig:
    resolution: int = 128       # R: generated images are (R, R)
    n_labels: int = 2           # one-hot class channels, background included (C labels + 1)
    boundary: bool = True       # one extra instance-edge channel (touching objects stay separate)
    z_dim: int = 64
    init_res: int = 8           # the generator starts from a (init_res, init_res) map
    g_channels: int = 8         # generator width at full resolution; doubles per halving, up to g_max
    g_max_channels: int = 128
    g_hidden: int = 16          # MaskNorm hidden width (SPADE: 128), capped at the block width: lean at high res
    d_channels: int = 32
    d_max_channels: int = 128
    d_layers: int = 3           # stride-2 layers: receptive field ~ 70 px at 3
    upsample: str = "nearest"   # generator upsampling between blocks: "nearest" (blocky) or "bilinear"
    grey_flag: bool = False     # a per-image grey flag conditions G (appended to z) and makes its image exactly
                                # grey (R = G = B): no colour fringes on fluorescence, colour kept for stains

    def __post_init__(self):
        if self.n_labels < 2:
            raise ValueError(f"n_labels must be >= 2 (background + at least one class), got {self.n_labels}")
        if self.upsample not in ("nearest", "bilinear"):
            raise ValueError(f"upsample must be 'nearest' or 'bilinear', got {self.upsample!r}")
        n_up = math.log2(self.resolution / self.init_res)
        if n_up < 0 or n_up != int(n_up):
            raise ValueError(f"resolution {self.resolution} must be init_res {self.init_res} times a power of 2")

    @property
    def label_nc(self) -> int:
        return self.n_labels + int(self.boundary)


class Generator(nn.Module):
    """Label map (B, label_nc, R, R) + z (B, z_dim) + noise (B, 1, R, R) [+ grey flags (B,)] -> image
    (B, 3, R, R) in [-1, 1]."""

    def __init__(self, config: MaskGANConfig):
        super().__init__()
        self.config = config
        n_up = int(math.log2(config.resolution // config.init_res))
        chans = [min(config.g_channels * 2 ** (n_up - i), config.g_max_channels) for i in range(n_up + 1)]
        z_in = config.z_dim + int(config.grey_flag)
        self.fc = nn.Linear(z_in, chans[0] * config.init_res ** 2)
        self.blocks = nn.ModuleList(
            MaskResBlock(chans[i], chans[i + 1] if i < n_up else chans[i], config.label_nc,
                         min(config.g_hidden, chans[i]), z_in) for i in range(n_up + 1))
        self.conv_img = nn.Conv2d(chans[-1], 3, 3, padding=1, padding_mode="reflect")
        self.chans = chans

    def forward(self, mask, z, noise=None, grey=None):
        B, R = mask.size(0), self.config.resolution
        assert mask.shape[1:] == (self.config.label_nc, R, R), f"mask {tuple(mask.shape)} vs config {self.config}"
        if noise is None:
            noise = torch.randn(B, 1, R, R, device=mask.device)
        if self.config.grey_flag:
            grey = torch.zeros(B, dtype=torch.bool, device=mask.device) if grey is None else grey.bool()
            z = torch.cat([z, grey.to(z.dtype)[:, None] * 2 - 1], dim=1)  # (B, z_dim) -> (B, z_dim + 1)
        x = self.fc(z).view(B, self.chans[0], self.config.init_res, self.config.init_res)  # (B, z) -> (B, C, h, w)
        up = {"mode": "bilinear", "align_corners": False} if self.config.upsample == "bilinear" else {"mode": "nearest"}
        for i, block in enumerate(self.blocks):
            stride = R // x.size(-1)
            x = block(x, mask, z, noise[:, :, ::stride, ::stride])  # subsampled noise keeps unit variance
            if i < len(self.blocks) - 1:
                x = F.interpolate(x, scale_factor=2, **up)
        x = torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))
        if self.config.grey_flag:  # grey images: the channel mean in every channel (exactly R = G = B)
            x = torch.where(grey[:, None, None, None], x.mean(dim=1, keepdim=True).expand_as(x), x)
        return x

    def generate(self, masks: torch.Tensor, seed: int | list[int] = 0, grey: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """Images (float32) for label maps (B, label_nc, R, R) [and grey flags (B,)]. Image i draws its z and
        noise from its own seed (`seed[i]`, or stream i of an int seed), so it does not depend on the rest of
        the batch. Runs in the parameters' dtype: a bfloat16 copy (Synthesizer, where the CPU has bf16
        kernels) is ~1.3x faster than float32 on a 2-core Sapphire Rapids, its uint8 images a fraction of a
        level off on average (tests/test_model_maskgan.py). bf16 autocast over the float32 weights was tried
        and is no faster here: the casts around the float32 instance norms eat the faster convolutions."""
        B, R = masks.size(0), self.config.resolution
        seeds = [seed * 1_000_003 + i for i in range(B)] if isinstance(seed, int) else list(seed)
        assert len(seeds) == B, f"{len(seeds)} seeds for {B} masks"
        z = torch.empty(B, self.config.z_dim)
        noise = torch.empty(B, 1, R, R)
        for i, s in enumerate(seeds):
            g = torch.Generator().manual_seed(s)
            z[i] = torch.randn(self.config.z_dim, generator=g)
            noise[i] = torch.randn(1, R, R, generator=g)
        p = next(self.parameters())
        # channels_last: ~1.3x faster inference with oneDNN on CPU (measured; no gain for training)
        fmt = torch.channels_last
        with torch.inference_mode():
            out = self(masks.to(p.device, p.dtype, memory_format=fmt), z.to(p.device, p.dtype),
                       noise.to(p.device, p.dtype, memory_format=fmt), None if grey is None else grey.to(p.device))
        return out.float()


class Discriminator(nn.Module):
    """PatchGAN on concat(image, label map) with spectral norm (+ instance norm after the first layer, as
    SPADE's NLayerDiscriminator, so the signal does not fade through the Lipschitz-bounded layers);
    returns patch logits and the features for feature matching."""

    def __init__(self, config: MaskGANConfig):
        super().__init__()
        self.config = config
        in_ch = 3 + config.label_nc
        layers = []
        for i in range(config.d_layers + 1):  # d_layers stride-2 convs, then one stride-1 conv
            out_ch = min(config.d_channels * 2 ** i, config.d_max_channels)
            stride = 2 if i < config.d_layers else 1
            norm = nn.InstanceNorm2d(out_ch) if i > 0 else nn.Identity()
            layers.append(nn.Sequential(spectral_norm(nn.Conv2d(in_ch, out_ch, 4, stride, padding=1)), norm,
                                        nn.LeakyReLU(0.2)))
            in_ch = out_ch
        self.layers = nn.ModuleList(layers)
        self.conv_out = spectral_norm(nn.Conv2d(in_ch, 1, 4, 1, padding=1))

    def forward(self, x, mask):
        h = torch.cat([x, mask], dim=1)
        feats = []
        for layer in self.layers:
            h = layer(h)
            feats.append(h)
        return self.conv_out(h), feats
