"""What bounds mask quality at native size: the scale the model sees an image at, or the model? (issue 10)

    .venv/bin/python -m bench.scale_probe [--data dsb2018_native] [--scale 0.5] [--reuse NAME --seed S]

1. Ceiling: the validation split's TRUE masks seen at `--scale` (area-averaged onto the model's grid),
   upsampled as predict() upsamples and thresholded at 0.5: the foreground IoU a perfect network reaches
   at that scale; plain, and made to follow the image's edges (follow_edges at a few eps: what the filter
   costs a prediction that is already right).
2. With --reuse NAME (the checkpoint `bench.label_model --name NAME --seed S` left): the model at its one
   learned scale for every image, against a scale per image that shows that image's objects at the
   training's object_px: from the truth (an oracle of the object size), from the model's own first pass,
   and from the first pass only where it differs from the learned scale by more than 1.3x.
Writes bench/results/scale_probe[_NAME].json.
"""
from __future__ import annotations

import argparse

import cv2
import numpy as np
import torch

from bench.common import dataset, write_result
from bench.label_model import WORK_ROOT, score_all
from tessera.model import inference, metrics
from tessera.model.checkpoint import load_checkpoint
from tessera.model.data import load_folder, split_ids

EPS = (0.01, 0.03, 0.1)


def ceiling(val, scale: float) -> dict:
    plain, edges = [], {e: [] for e in EPS}
    for s in val:
        H, W = s.classes.shape
        h, w = inference.scaled_size(H, W, scale)
        fg = (s.classes > 0).astype(np.float32)
        up = cv2.resize(cv2.resize(fg, (w, h), interpolation=cv2.INTER_AREA), (W, H), interpolation=cv2.INTER_LINEAR)
        plain.append(metrics.iou(up > 0.5, fg > 0))
        for e in EPS:
            q = inference.follow_edges(np.stack([1 - up, up]).astype(np.float32), s.image, (h, w), eps=e)
            edges[e].append(metrics.iou(q[1] > 0.5, fg > 0))
    return {"scale": scale, "fg_iou_plain": float(np.mean(plain)),
            **{f"fg_iou_follow_edges_eps{e:g}": float(np.mean(v)) for e, v in edges.items()}}


def per_image_scale(val, names, ckpt) -> dict:
    pred = inference.Predictor.from_checkpoint(ckpt, device="cpu")
    learned, object_px = pred.scale, float(load_checkpoint(ckpt, "vqvae")["train_config"]["object_px"])
    clip = lambda m: learned if m is None else min(1.0, max(0.2, object_px / m))  # noqa: E731

    def run(scales):
        out = []
        for s, sc in zip(val, scales):
            pred.scale = sc
            out.append(pred.predict([s.image])[0])
        pred.scale = learned
        return out

    first = run([learned] * len(val))
    own = [clip(inference.median_object_size(p.instances)) for p in first]
    arms = {"learned": first, "truth_size": run([clip(inference.median_object_size(s.instances)) for s in val]),
            "first_pass_size": run(own),
            "first_pass_size_if_1.3x": run([q if abs(np.log(q / learned)) > np.log(1.3) else learned for q in own])}
    return {"learned_scale": learned, "object_px": object_px,
            **{k: score_all([(p.classes, p.instances, p.instance_score) for p in v], val, len(names))
               for k, v in arms.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="dsb2018_native")
    ap.add_argument("--scale", type=float, default=0.5, help="the scale of the ceiling (DSB native's learned 0.5)")
    ap.add_argument("--reuse", default="", metavar="NAME", help="also compare per-image scales on this run's model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    samples, names = load_folder(dataset(args.data))
    _, val_ids = split_ids([s.id for s in samples], 0.2)
    by_id = {s.id: s for s in samples}
    val = [by_id[i] for i in val_ids]
    out = {"data": args.data, "n_val": len(val), "ceiling": ceiling(val, args.scale)}
    print(out, flush=True)
    if args.reuse:
        out["per_image_scale"] = per_image_scale(val, names, WORK_ROOT / f"{args.reuse}_s{args.seed}" /
                                                 f"tessera_{len(samples) - len(val)}.pt")
        print(out["per_image_scale"], flush=True)
    write_result("scale_probe" + (f"_{args.reuse}" if args.reuse else ""), out)


if __name__ == "__main__":
    main()
