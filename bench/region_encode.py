"""What writing and reading a task's regions costs, per region type, at native sizes: brush RLE, bitmask PNG
data URL (Label Studio 1.23's BitmaskLabels), polygons, ellipses, boxes. The bitmask arm is also run with Pillow's PNG
encoder on the whole mask (what backend/bitmask.py's hand-made stream replaces), and its reading with Pillow's
decoder (what bitmask._own_crop replaces).

    .venv/bin/python -m bench.region_encode [--rounds 5]

Procedural instance maps: 520x696 with ~110 objects and 2048x2048 with ~500, objects of 6-14 px radius. One
thread, the arms interleaved round by round; ms per task, median over rounds. Writes
bench/results/region_encode.json.
"""
from __future__ import annotations

import argparse
import base64
import io
import time

import cv2
import numpy as np
from PIL import Image

from bench.common import write_result


def instances(h: int, w: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    inst = np.zeros((h, w), np.int32)
    for k in range(1, n + 1):
        r = int(rng.integers(6, 15))
        cv2.ellipse(inst, (int(rng.integers(0, w)), int(rng.integers(0, h))), (r, int(r * rng.uniform(0.6, 1))),
                    float(rng.integers(0, 180)), 0, 360, k, -1)
    return inst


def pillow_data_url(mask: np.ndarray) -> str:
    """The library way: the whole mask as a 1-bit palette PNG by Pillow."""
    im = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.astype(np.uint8).tobytes())
    im.putpalette([0, 0, 0, 0, 0, 0])
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=0, bits=1, compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def pillow_read(url: str, h: int, w: int) -> np.ndarray:
    im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    return np.asarray(im.convert("RGBA"))[..., 3] > 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    from tessera.backend.label_config import Control
    from tessera.backend.regions import instances_to_results, region_to_mask
    from tessera.model.postprocess import object_slices

    controls = {t: Control(t, t, "image", ("A",)) for t in
                ("brushlabels", "bitmasklabels", "polygonlabels", "ellipselabels", "rectanglelabels")}
    out = {}
    for (h, w, n) in ((520, 696, 110), (2048, 2048, 500)):
        inst = instances(h, w, n, seed=h)
        ids = sorted(int(i) for i in np.unique(inst) if i)
        labels, scores = {k: "A" for k in ids}, {k: 0.9 for k in ids}
        written = {t: instances_to_results(inst, labels, scores, c) for t, c in controls.items()}

        def bitmask_pillow():
            for k, sl in object_slices(inst, ids).items():
                pillow_data_url(inst == k)

        arms = {f"write_{t.replace('labels', '')}": (lambda c=c: instances_to_results(inst, labels, scores, c))
                for t, c in controls.items()}
        arms["write_bitmask_pillow"] = bitmask_pillow
        for t, results in written.items():
            arms[f"read_{t.replace('labels', '')}"] = lambda rs=results: [region_to_mask(r, h, w) for r in rs]
        arms["read_bitmask_pillow"] = lambda rs=written["bitmasklabels"]: [
            pillow_read(r["value"]["imageDataURL"], h, w) for r in rs]
        times = {a: [] for a in arms}
        for _ in range(args.rounds):
            for a, fn in arms.items():
                t0 = time.process_time()
                fn()
                times[a].append((time.process_time() - t0) * 1e3)
        key = f"{w}x{h}"
        out[key] = {"objects": len(ids),
                    "json_kb": {t.replace("labels", ""): round(len(str(r)) / 1024, 1) for t, r in written.items()},
                    "ms_per_task": {a: round(float(np.median(v)), 2) for a, v in times.items()}}
        print(key, out[key])
    write_result("region_encode", {"rounds": args.rounds, "threads": 1, "sizes": out})


if __name__ == "__main__":
    main()
