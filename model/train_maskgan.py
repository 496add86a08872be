"""Train the mask-conditional GAN on labelled samples (or procedural demo nuclei).

Flat loop in the manner of nanoGPT's train.py with pytorch/examples dcgan's order (D step on fake.detach(),
then the G step) and SPADE's loss dicts. Run: python -m tessera.model.train_maskgan --data=DIR --max_iters=2
"""

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint, save_checkpoint
from .config import from_args
from .inference import resolve_device
from .edit import is_grey
from .layouts import crop_box, ensure_instances, fit_short_side
from .maskgan import (Discriminator, Generator, MaskGANConfig, d_hinge_loss, diff_augment,
                      feature_matching_loss, g_hinge_loss, label_maps_to_mask)
from .sensor import fit_grain

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GANTrainConfig:
    # data
    data: str = ""                 # folder dataset for main(); "" = procedural demo nuclei
    n_demo: int = 64               # demo images when data == ""
    out_dir: str = "runs/maskgan"
    # model (the rest of MaskGANConfig keeps its defaults; n_labels comes from label_names)
    resolution: int = 128
    z_dim: int = 64
    g_channels: int = 8
    g_hidden: int = 16
    d_channels: int = 32
    d_layers: int = 3
    boundary: bool = True
    upsample: str = "bilinear"     # "nearest" made 8 x 8 blocks visible in short CPU runs
    grey_flag: bool = True         # grey training images make exactly grey fakes (no green/magenta fringes)
    grain: bool = True             # fit the imaging grain (sensor noise, fine texture) that the generator's images
                                   # lack on the training images and store it with the generator (model/sensor.py)
    # optimisation: TTUR (D learns faster) with Adam betas (0, 0.9) as in SPADE, but with larger steps
    # than SPADE's 1e-4 / 4e-4: CPU runs are a few hundred iterations long
    batch_size: int = 4
    max_iters: int = 200
    time_budget_s: float = 0.0     # > 0: also stop after this many seconds (the demo's knob)
    lr_g: float = 5e-4
    lr_d: float = 1e-3
    beta1: float = 0.0
    beta2: float = 0.9
    lambda_fm: float = 10.0        # feature matching (pix2pixHD / SPADE)
    lambda_l1: float = 10.0        # L1 to the real image after l1_pool x l1_pool average pooling: the
    l1_pool: int = 4               # layout and brightness come fast, the fine texture is left to the adversary
    diffaug: str = "color,translation,cutout"
    ema_decay: float = 0.999       # generator weights average used for generation
    # bookkeeping
    eval_interval: int = 0         # save a checkpoint every eval_interval iters; 0 = only at the end
    log_interval: int = 20
    seed: int = 1337
    device: str = "auto"
    threads: int = 0               # torch CPU threads; 0 leaves torch's default

    @classmethod
    def from_args(cls, argv: list[str]) -> "GANTrainConfig":
        """--key=value overrides of existing fields (model/config.py)."""
        return from_args(cls, argv)


def _prepare(samples, resolution: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]]:
    """Images and label maps with the short side at R (the crop to R x R happens per batch), grey flag."""
    out = []
    for s in samples:
        if s.image.shape[:2] != s.classes.shape or s.classes.shape != s.instances.shape:
            raise ValueError(f"sample {s.id!r}: image {s.image.shape[:2]} and label maps "
                             f"{s.classes.shape}/{s.instances.shape} differ in size")
        out.append((fit_short_side(s.image, resolution, nearest=False),
                    fit_short_side(s.classes.astype(np.int32), resolution, nearest=True),
                    fit_short_side(ensure_instances(s.classes, s.instances), resolution, nearest=True),
                    is_grey(s.image)))
    return out


def get_batch(data, batch_size: int, resolution: int, rng: np.random.Generator, n_labels: int,
              boundary: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random crops with flips and rot90 -> (real (B, 3, R, R) in [-1, 1], mask (B, label_nc, R, R),
    grey flags (B,))."""
    images, classes, instances, grey = [], [], [], []
    for i in rng.integers(0, len(data), batch_size):
        image, cl, ins, g = data[i]
        grey.append(g)
        y, x = crop_box(cl.shape, resolution, rng)
        k, flip = int(rng.integers(4)), rng.random() < 0.5
        for a, dst in ((image, images), (cl, classes), (ins, instances)):
            a = np.rot90(a[y:y + resolution, x:x + resolution], k)
            dst.append(a[:, ::-1] if flip else a)
    real = torch.from_numpy(np.stack(images).astype(np.float32)) / 127.5 - 1
    real = real.permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
    mask = label_maps_to_mask(torch.from_numpy(np.stack(classes)), torch.from_numpy(np.stack(instances)),
                              n_labels, boundary)
    return real.to(device), mask.to(device), torch.tensor(grey, device=device)


@dataclass
class _Models:
    """What a GAN run trains and saves."""
    config: MaskGANConfig
    generator: Generator
    discriminator: Discriminator
    generator_ema: Generator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    iter0: int = 0  # iterations done before this run (resumed from init_from)


def _check_inputs(samples, label_names: list[str]) -> None:
    if not samples:
        raise ValueError("train_maskgan needs at least one labelled sample")
    if not label_names:
        raise ValueError("label_names is empty: pass the project's label names (class c = label_names[c - 1])")
    n_max = max(int(s.classes.max()) for s in samples)
    if n_max > len(label_names):
        raise ValueError(f"samples use class index {n_max} but only {len(label_names)} label names are given")


def _build(cfg: GANTrainConfig, label_names: list[str], device: torch.device, init_from: Path | None) -> _Models:
    """G, D, the weight average and their optimisers, fresh or resumed from a "gan" checkpoint."""
    config = MaskGANConfig(resolution=cfg.resolution, n_labels=len(label_names) + 1, boundary=cfg.boundary,
                           z_dim=cfg.z_dim, g_channels=cfg.g_channels, g_hidden=cfg.g_hidden,
                           d_channels=cfg.d_channels, d_layers=cfg.d_layers, upsample=cfg.upsample,
                           grey_flag=cfg.grey_flag)
    generator, discriminator = Generator(config).to(device), Discriminator(config).to(device)
    m = _Models(config, generator, discriminator, Generator(config).to(device).eval().requires_grad_(False),
                torch.optim.Adam(generator.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2)),
                torch.optim.Adam(discriminator.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2)))
    if init_from is None:
        m.generator_ema.load_state_dict(generator.state_dict())
        return m
    ckpt = load_checkpoint(Path(init_from), "gan")
    if ckpt["model_config"] != asdict(config):
        raise ValueError(f"{init_from}: its model config {ckpt['model_config']} differs from this run's "
                         f"{asdict(config)} (labels or sizes changed); train from scratch instead")
    generator.load_state_dict(ckpt["generator"])
    discriminator.load_state_dict(ckpt["discriminator"])
    m.opt_g.load_state_dict(ckpt["opt_g"])
    m.opt_d.load_state_dict(ckpt["opt_d"])
    m.generator_ema.load_state_dict(ckpt.get("generator_ema", ckpt["generator"]))
    m.iter0 = int(ckpt["iter_num"])
    return m


def _step(cfg: GANTrainConfig, m: _Models, real, mask, grey, it: int) -> dict[str, float]:
    """One D step on fake.detach(), one G step, the EMA update; -> the losses."""
    fake = m.generator(mask, torch.randn(real.size(0), cfg.z_dim, device=real.device), grey=grey)
    # one augmentation draw per iteration, shared by real and fake, so D features stay comparable
    aug_seed = int(torch.randint(2 ** 31, ()))

    def augment(x):
        if not cfg.diffaug:
            return x, mask
        return diff_augment(x, mask, cfg.diffaug, torch.Generator(real.device).manual_seed(aug_seed))

    logits_real, feats_real = m.discriminator(*augment(real))
    logits_fake, _ = m.discriminator(*augment(fake.detach()))
    d_real, d_fake = d_hinge_loss(logits_real, logits_fake)
    losses_d = {"d_real": d_real, "d_fake": d_fake}
    m.opt_d.zero_grad(set_to_none=True)
    sum(losses_d.values()).backward()
    m.opt_d.step()
    # G step (feature matching against the real features of the D step, held fixed)
    logits_fake, feats_fake = m.discriminator(*augment(fake))
    losses_g = {"g_adv": g_hinge_loss(logits_fake),
                "g_fm": cfg.lambda_fm * feature_matching_loss(feats_real, feats_fake)}
    if cfg.lambda_l1 > 0:
        low_fake, low_real = F.avg_pool2d(fake, cfg.l1_pool), F.avg_pool2d(real, cfg.l1_pool)
        losses_g["g_l1"] = cfg.lambda_l1 * F.l1_loss(low_fake, low_real)
    m.opt_g.zero_grad(set_to_none=True)
    sum(losses_g.values()).backward()
    m.opt_g.step()
    with torch.no_grad():  # warm-up ramp so short runs are not dominated by the random init
        decay = min(cfg.ema_decay, (1 + m.iter0 + it) / (10 + m.iter0 + it))
        for p_ema, p in zip(m.generator_ema.parameters(), m.generator.parameters()):
            p_ema.lerp_(p, 1 - decay)
    return {k: v.item() for k, v in {**losses_d, **losses_g}.items()}


def _fit_grain(m: _Models, data, resolution: int, seed: int) -> dict:
    """model/sensor.fit_grain on pairs (training image's centre R x R crop, the weight average's image of its
    layout, grey as the real one)."""
    real, classes, instances, grey = [], [], [], []
    for image, cl, ins, g in data:
        y, x = (cl.shape[0] - resolution) // 2, (cl.shape[1] - resolution) // 2
        real.append(np.ascontiguousarray(image[y:y + resolution, x:x + resolution]))
        classes.append(cl[y:y + resolution, x:x + resolution])
        instances.append(ins[y:y + resolution, x:x + resolution])
        grey.append(g)
    fake = []
    for i in range(0, len(real), 16):
        mask = label_maps_to_mask(torch.from_numpy(np.stack(classes[i:i + 16])),
                                  torch.from_numpy(np.stack(instances[i:i + 16])), m.config.n_labels,
                                  m.config.boundary)
        out = m.generator_ema.generate(mask.to(next(m.generator_ema.parameters()).device),
                                       [seed * 7919 + j for j in range(i, i + mask.size(0))],
                                       torch.tensor(grey[i:i + 16]) if m.config.grey_flag else None)
        out = ((out.cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        fake.extend(np.ascontiguousarray(out.permute(0, 2, 3, 1).numpy()))  # (B, 3, R, R) -> (B, R, R, 3)
    return fit_grain(real, fake, seed=seed)


def _save(cfg: GANTrainConfig, m: _Models, label_names: list[str], grey_share: float, out: Path, i: int,
          grain: dict | None = None) -> Path:
    return save_checkpoint({
        "kind": "gan", "generator": m.generator.state_dict(), "generator_ema": m.generator_ema.state_dict(),
        "discriminator": m.discriminator.state_dict(), "opt_g": m.opt_g.state_dict(), "opt_d": m.opt_d.state_dict(),
        "model_config": asdict(m.config), "train_config": asdict(cfg), "label_names": list(label_names),
        "iter_num": m.iter0 + i, "grey_share": grey_share, "grain": grain},
        out if out.suffix == ".pt" else out / f"ckpt_{m.iter0 + i:07d}.pt")


def train(cfg: GANTrainConfig, samples, label_names: list[str], out: Path, init_from: Path | None = None,
          progress: Callable[[dict], None] | None = None) -> Path:
    """Train G and D; write a "gan" checkpoint (to `out` if it ends in .pt, else into the directory `out`
    as ckpt_<iter>.pt) and return its path. Stops at max_iters or after time_budget_s seconds."""
    _check_inputs(samples, label_names)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device, out = resolve_device(cfg.device), Path(out)
    m = _build(cfg, label_names, device, init_from)
    data = _prepare(samples, cfg.resolution)
    grey_share = float(np.mean([d[3] for d in data]))  # generation draws grey images at this rate
    t0 = t_last = time.time()
    iter_num = 0
    while iter_num < cfg.max_iters and not (cfg.time_budget_s > 0 and time.time() - t0 >= cfg.time_budget_s):
        batch = get_batch(data, cfg.batch_size, cfg.resolution, rng, m.config.n_labels, cfg.boundary, device)
        losses = _step(cfg, m, *batch, iter_num)
        iter_num += 1
        if cfg.eval_interval and iter_num % cfg.eval_interval == 0 and iter_num < cfg.max_iters:
            _save(cfg, m, label_names, grey_share, out, iter_num)
        elapsed = time.time() - t0
        frac = max(iter_num / cfg.max_iters, elapsed / cfg.time_budget_s if cfg.time_budget_s > 0 else 0.0)
        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            dt = (time.time() - t_last) * 1000 / cfg.log_interval
            t_last = time.time()
            logger.info("iter %d: %s time %.0fms", iter_num, " ".join(f"{k} {v:.3f}" for k, v in losses.items()), dt)
        if progress is not None:
            progress({"phase": "train", "iter": iter_num, "max_iters": cfg.max_iters,
                      "loss": sum(losses.values()), "eta_s": elapsed * (1 - frac) / frac})
        if not all(math.isfinite(v) for v in losses.values()):
            raise RuntimeError(f"GAN training diverged at iter {iter_num}: {losses}; lower lr_g / lr_d")
    logger.info("trained the mask GAN %d iters in %.0fs", iter_num, time.time() - t0)
    grain = _fit_grain(m, data, cfg.resolution, cfg.seed) if cfg.grain else None
    path = _save(cfg, m, label_names, grey_share, out, iter_num, grain)
    if progress is not None:
        progress({"phase": "done", "iter": iter_num, "max_iters": cfg.max_iters, "loss": 0.0, "eta_s": 0.0})
    return path


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = GANTrainConfig.from_args(sys.argv[1:] if argv is None else argv)
    from .data import load_folder, make_nuclei
    if cfg.data:
        samples, label_names = load_folder(cfg.data)
    else:
        samples, label_names = make_nuclei(cfg.n_demo, 256, seed=cfg.seed), ["nucleus"]
    print(f"training the mask GAN on {len(samples)} samples, labels {label_names}")
    path = train(cfg, samples, label_names, Path(cfg.out_dir))
    print(f"saved {path}")
    return path


if __name__ == "__main__":
    main()
