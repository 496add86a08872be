"""Synthetic labelled images: render layouts with the trained mask GAN, and keep only the images on which
the label model agrees with the layout (self-consistency, as in data-synthesis work that filters
generated pairs by a segmenter's agreement).
"""

import copy
import logging
from pathlib import Path

import cv2
import numpy as np
import torch

from .checkpoint import load_checkpoint
from .inference import bf16_supported, resolve_device
from .maskgan import Generator, MaskGANConfig, label_maps_to_mask
from .metrics import mean_iou
from .sensor import add_grain_batch

logger = logging.getLogger(__name__)


class Synthesizer:
    """Turns layouts (anything with .classes and .instances, e.g. Layout or Sample) into RGB images."""

    def __init__(self, generator: Generator, label_names: list[str], version: str = "maskgan-0",
                 grey_share: float = 0.0, bf16: bool | None = None, grain: dict | None = None):
        self.generator = generator.eval().to(memory_format=torch.channels_last)  # see Generator.generate
        device = next(generator.parameters()).device
        # bf16: render with a bfloat16 copy (None: where the hardware has bf16 instructions; bf16_supported)
        self.bf16 = bf16_supported(device) if bf16 is None else bf16
        self._render = copy.deepcopy(self.generator).to(torch.bfloat16) if self.bf16 else self.generator
        self.config: MaskGANConfig = generator.config
        self.label_names = list(label_names)
        self.version = version
        self.grey_share = grey_share  # share of grey images among the training images (grey_flag generators)
        # the imaging grain fitted when the GAN trained (model/sensor.py); None (older checkpoints): none added
        self.grain = grain

    @classmethod
    def from_checkpoint(cls, gan_ckpt: str | Path, device: str = "auto") -> "Synthesizer":
        ckpt = load_checkpoint(Path(gan_ckpt), "gan")
        generator = Generator(MaskGANConfig(**ckpt["model_config"]))
        # the weight average makes cleaner images than the last step's weights
        generator.load_state_dict(ckpt.get("generator_ema", ckpt["generator"]))
        return cls(generator.to(resolve_device(device)), ckpt["label_names"], f"maskgan-{ckpt['iter_num']}",
                   float(ckpt.get("grey_share", 0.0)), grain=ckpt.get("grain"))

    def masks(self, layouts) -> torch.Tensor:
        """Layouts -> (B, label_nc, R, R) generator input; other sizes are resized (nearest) to R x R."""
        R = self.config.resolution
        classes, instances = [], []
        for lay in layouts:
            cl, ins = np.asarray(lay.classes, np.int32), np.asarray(lay.instances, np.int32)
            if cl.shape != ins.shape:
                raise ValueError(f"layout classes {cl.shape} and instances {ins.shape} differ in size")
            if cl.shape != (R, R):
                cl = cv2.resize(cl, (R, R), interpolation=cv2.INTER_NEAREST)
                ins = cv2.resize(ins, (R, R), interpolation=cv2.INTER_NEAREST)
            if cl.max() > len(self.label_names):
                raise ValueError(f"layout uses class {cl.max()} but the GAN knows {len(self.label_names)} "
                                 f"labels {self.label_names}")
            classes.append(cl)
            instances.append(ins)
        return label_maps_to_mask(torch.from_numpy(np.stack(classes)), torch.from_numpy(np.stack(instances)),
                                  self.config.n_labels, self.config.boundary)

    def render(self, layouts, seed: int = 0, batch_size: int = 32) -> list[np.ndarray]:
        """(R, R, 3) uint8 images, one per layout; the same seed gives the same images."""
        if not layouts:
            return []
        seeds = [seed * 1_000_003 + i for i in range(len(layouts))]
        # grey or colour per image, drawn from its own seed at the training images' rate
        grey = torch.tensor([np.random.default_rng(s).random() < self.grey_share for s in seeds])
        images = []
        for i in range(0, len(layouts), batch_size):
            fake = self._render.generate(self.masks(layouts[i:i + batch_size]), seeds[i:i + batch_size],
                                           grey[i:i + batch_size] if self.config.grey_flag else None)
            fake = ((fake.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            batch = list(np.ascontiguousarray(fake.permute(0, 2, 3, 1).numpy()))  # (B, 3, R, R) -> (B, R, R, 3)
            images.extend(self.add_grain(batch, seeds[i:i + batch_size]) if self.grain else batch)
        return images

    def add_grain(self, images: list[np.ndarray], seeds: list[int]) -> list[np.ndarray]:
        """The grain of each image from its own stream of the image's seed: the same seed, the same grain."""
        return add_grain_batch(images, self.grain, [s + 0x5EED for s in seeds])

    def self_consistency(self, images: list[np.ndarray], layouts, predictor,
                         threshold: float = 0.5) -> list[tuple[bool, float]]:
        """(keep, IoU) per image: mean IoU over the foreground classes of the layout vs. the label model's
        prediction on the generated image (foreground IoU when there is one class)."""
        if len(images) != len(layouts):
            raise ValueError(f"{len(images)} images but {len(layouts)} layouts")
        if not images:
            return []
        n_classes = len(self.label_names)
        out = []
        for pred, lay in zip(predictor.predict(list(images)), layouts):
            true = np.asarray(lay.classes, np.int32)
            if true.shape != pred.classes.shape:
                true = cv2.resize(true, pred.classes.shape[::-1], interpolation=cv2.INTER_NEAREST)
            score = mean_iou(np.asarray(pred.classes, np.int32), true, n_classes)
            out.append((score >= threshold, float(score)))
        return out
