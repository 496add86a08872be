"""Speed of the small hot paths whose limits used to be timed asserts in the tests: procedural data,
instance matching, and job submission (in-process; over Redis when redis-server is on PATH).

    .venv/bin/python -m bench.micro [--quick]
    .venv/bin/python -m bench.micro --net [--net-scale 0.5 1.0] [--variant NAME:KEY=VALUE,...] [--name NAME]

Writes bench/results/micro.json with p50/p95 per path and whether each meets its target. `--net` instead
times the label model's network pass (Predictor's traced and frozen predict pass, bf16 autocast,
channels-last) per 520x696 image for architecture variants (VQVAEConfig fields, untrained weights: speed does
not depend on them) side by side: process CPU time per pass at 1 thread, variants interleaved pass by pass,
median and ratio to the first variant (bench/results/micro_net.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time

import numpy as np

from bench.common import write_result
from bench.speed import pct, timed

# the limits the tests used to assert, per call
TARGETS_MS = {"make_nuclei_256_per_image": 100.0, "instance_match_400_objects": 500.0,
              "thread_submit": 20.0, "rq_submit": 100.0}


def _rq_submit_times(n: int) -> list[float] | None:
    """RQJobRunner.submit against a throw-away redis-server (no worker: the job just queues)."""
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    from tessera.backend.jobs import RQJobRunner
    from tests.conftest import free_port

    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        runner = RQJobRunner(f"redis://127.0.0.1:{port}/0", run_fn="json:dumps", debounce_s=60)
        end = time.monotonic() + 15
        while True:
            try:
                runner.conn.ping()
                break
            except Exception:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        return timed(lambda: runner.submit("p", "ANNOTATION_CREATED"), n)
    finally:
        proc.terminate()
        proc.wait(10)


NET_VARIANTS = ["base:", "w8:widths=8/32/64/96", "s2d:stem_stride=2,widths=16/64/96",
                "s2d32:stem_stride=2,widths=32/64/96",
                "s2d48:stem_stride=2,widths=48/64/96"]


def _variant(spec: str) -> tuple[str, dict]:
    """'NAME:KEY=VALUE,...' -> (NAME, VQVAEConfig overrides); a tuple value is written a/b/c (the pairs
    are comma-separated), each value parsed by the config's own parser (model.config._parse)."""
    from tessera.model.config import _parse
    from tessera.model.vqvae import VQVAEConfig

    name, _, rest = spec.partition(":")
    defaults = VQVAEConfig()
    over = {}
    for pair in filter(None, rest.split(",")):
        key, _, value = pair.partition("=")
        over[key] = _parse(value.replace("/", ","), getattr(defaults, key), key)
    return name, over


def net_passes(specs: list[str], scales: list[float], reps: int) -> dict:
    """Process CPU ms per network pass of one 520x696 image, per variant and scale (see the docstring)."""
    import statistics

    import torch

    from tessera.model.inference import Predictor
    from tessera.model.vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    image = np.random.default_rng(0).integers(0, 255, (520, 696, 3), dtype=np.uint8)
    out: dict = {}
    for scale in scales:
        preds = {}
        for spec in specs:
            name, over = _variant(spec)
            preds[name] = Predictor(VQVAE(VQVAEConfig(**over)), ["Nucleus"], device="cpu", scale=scale, trace=True)
        with torch.inference_mode():
            x = next(iter(preds.values()))._prepare([image])[0]
            for p in preds.values():                   # the third call runs the trace
                for _ in range(4):
                    p._net(x)
            cpu: dict = {n: [] for n in preds}
            for _ in range(reps):
                for n, p in preds.items():
                    t0 = time.process_time()
                    p._net(x)
                    cpu[n].append(time.process_time() - t0)
        first = statistics.median(next(iter(cpu.values())))
        key = f"scale_{scale:g}_input_{x.shape[-2]}x{x.shape[-1]}"
        out[key] = {n: {"cpu_ms_median": statistics.median(ts) * 1000, "cpu_ms_min": min(ts) * 1000,
                        "ratio_to_first": statistics.median(ts) / first,
                        "config": _variant(spec)[1]} for (n, ts), spec in zip(cpu.items(), specs)}
        for n, r in out[key].items():
            print(f"{key} {n:10s} {r['cpu_ms_median']:7.2f} ms (min {r['cpu_ms_min']:.2f}) x{r['ratio_to_first']:.3f}")
    return out


_DECODE = """
import json, sys, time
import cv2, numpy as np
cv2.setNumThreads(1)
from tessera.backend.media import decode_image
datas = [open(f, "rb").read() for f in sys.argv[2:]]
for d in datas:
    decode_image(d, 10 ** 9)
ts = []
for _ in range(int(sys.argv[1])):
    t = time.process_time()
    for d in datas:
        decode_image(d, 10 ** 9)
    ts.append((time.process_time() - t) / len(datas) * 1000)
digest = __import__("hashlib").sha256(b"".join(decode_image(d, 10 ** 9)[0].tobytes() for d in datas)).hexdigest()
print(json.dumps([float(np.median(ts)), digest]))
"""


def decode_grey(before: str, rounds: int) -> dict:
    """CPU ms of backend.media.decode_image per 520x696 8-bit grey DSB 2018 frame (../shared/data), REV's code
    and this tree's in separate processes, alternating (order swapped every round); the decoded bytes'
    digest shows both give the same pixels."""
    import sys
    import tempfile
    from pathlib import Path

    from PIL import Image

    from bench.common import dataset
    from bench.speed_native import REPO, before_tree, package_root

    files = [str(f) for f in sorted((dataset("dsb2018_native") / "images").glob("*.png"))
             if Image.open(f).size == (696, 520) and Image.open(f).mode == "L"][:8]
    work = Path(tempfile.mkdtemp(prefix="tessera-decode-"))
    trees = {"before": package_root(before_tree(before, work / "before"), work / "pp-before"),
             "after": package_root(REPO, work / "pp-after")}
    runs: dict = {v: [] for v in trees}
    try:
        for r in range(rounds):
            for v in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                out = subprocess.run([sys.executable, "-c", _DECODE, "3", *files], capture_output=True, text=True,
                                     env={"PYTHONPATH": str(trees[v]), "OMP_NUM_THREADS": "1"}, check=True)
                runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {v: {"cpu_ms_median": float(np.median([x[0] for x in rs])), "cpu_ms_all": [x[0] for x in rs],
               "digests": sorted({x[1] for x in rs})} for v, rs in runs.items()}
    res["ratio_after_to_before"] = res["after"]["cpu_ms_median"] / res["before"]["cpu_ms_median"]
    res["same_pixels"] = res["after"]["digests"] == res["before"]["digests"]
    res["frames"] = len(files)
    return res


def novelty_cost(reps: int) -> dict:
    """CPU ms per 520x696 8-bit grey DSB 2018 frame (../shared/data) of /predict's task-ranking work (the
    image's embedding, model.acquisition.embed, and its distance to a 2,048-row reference) beside the
    prediction itself (Predictor.predict: network pass, upsampling, instance split), in chunks of 8 as
    /predict runs them, on one thread, alternating; default model config at scale 0.5 (DSB native's), traced."""
    import torch
    from PIL import Image

    from bench.common import dataset
    from tessera.model import acquisition
    from tessera.model.inference import Predictor
    from tessera.model.vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    files = [f for f in sorted((dataset("dsb2018_native") / "images").glob("*.png"))
             if Image.open(f).size == (696, 520) and Image.open(f).mode == "L"][:8]
    images = [np.repeat(np.asarray(Image.open(f))[..., None], 3, axis=2) for f in files]
    p = Predictor(VQVAE(VQVAEConfig()), ["Nucleus"], device="cpu", scale=0.5, trace=True)
    dim = acquisition.embed(p, images[:1]).shape[1]
    ref = np.random.default_rng(0).standard_normal((2048, dim)).astype(np.float32)      # a full reference
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    steps = {"predict": lambda: p.predict(images),
             "novelty": lambda: acquisition.novelty(acquisition.embed(p, images), ref)}
    for f in steps.values():                         # traces and warms
        for _ in range(3):
            f()
    cpu: dict = {k: [] for k in steps}
    for _ in range(reps):
        for k, f in steps.items():
            t0 = time.process_time()
            f()
            cpu[k].append((time.process_time() - t0) / len(images) * 1000)
    res = {k: {"cpu_ms_median": float(np.median(v)), "cpu_ms_min": float(min(v))} for k, v in cpu.items()}
    res["ratio_novelty_to_predict"] = res["novelty"]["cpu_ms_median"] / res["predict"]["cpu_ms_median"]
    res["frames"], res["reference_rows"] = len(images), len(ref)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--net", action="store_true", help="network pass CPU per 520x696 image, per variant")
    ap.add_argument("--variant", action="append", default=None, help="--net: NAME:KEY=VALUE,... (VQVAEConfig "
                    "fields; tuples as a/b/c); the first is the reference")
    ap.add_argument("--net-scale", type=float, nargs="+", default=[0.5, 1.0], help="--net: model px per image px")
    ap.add_argument("--reps", type=int, default=30, help="--net: passes per variant")
    ap.add_argument("--name", default="micro_net", help="--net: result file name")
    ap.add_argument("--decode-before", default="", metavar="REV", help="instead: decode_image CPU of 8-bit grey "
                    "520x696 DSB frames, REV's code vs this tree's")
    ap.add_argument("--novelty", action="store_true", help="instead: CPU of /predict's task ranking (embedding + "
                    "distance to the labelled images) beside the prediction, per 520x696 grey DSB frame")
    ap.add_argument("--rounds", type=int, default=6, help="--decode-before: rounds of both revisions")
    args = ap.parse_args()
    if args.decode_before:
        res = decode_grey(args.decode_before, args.rounds)
        print(json.dumps(res, indent=1))
        write_result(args.name if args.name != "micro_net" else "micro_decode_grey",
                     {"summary": res, "before_rev": args.decode_before, "load_average_1m": os.getloadavg()[0]})
        return
    if args.novelty:
        import torch

        torch.set_num_threads(1)
        res = novelty_cost(args.reps)
        print(json.dumps(res, indent=1))
        write_result("micro_novelty", {"summary": res, "threads": 1, "reps": args.reps,
                                       "load_average_1m": os.getloadavg()[0]})
        return
    if args.net:
        import torch

        torch.set_num_threads(1)
        res = net_passes(args.variant or NET_VARIANTS, args.net_scale, args.reps)
        write_result(args.name, {"net_pass_cpu_ms": res, "threads": 1, "reps": args.reps,
                                 "load_average_1m": os.getloadavg()[0]})
        return
    from tessera.backend.jobs import ThreadJobRunner
    from tessera.model.data import make_nuclei
    from tessera.model.metrics import instance_match

    n = 5 if args.quick else 30
    times: dict[str, list[float]] = {}
    times["make_nuclei_256_per_image"] = [t / 10 for t in timed(lambda: make_nuclei(10, 256, seed=2), n)]
    rng = np.random.default_rng(0)
    true = np.kron(np.arange(1, 401).reshape(20, 20), np.ones((12, 12), np.int32)).astype(np.int32)
    pred = np.roll(true, 2, axis=1) * (rng.random(true.shape) > 0.01)
    times["instance_match_400_objects"] = timed(lambda: instance_match(pred, true), n)
    runner = ThreadJobRunner(lambda *a: {}, debounce_s=3600)
    times["thread_submit"] = timed(lambda: runner.submit("p", "ANNOTATION_CREATED"), 20 * n)
    runner.close()
    rq = _rq_submit_times(20 * n)
    if rq is not None:
        times["rq_submit"] = rq
    res: dict = {}
    for name, ts in times.items():
        res[f"{name}_p50_ms"], res[f"{name}_p95_ms"] = pct(ts, 50), pct(ts, 95)
        res[f"{name}_meets_target"] = res[f"{name}_p50_ms"] <= TARGETS_MS[name]
    for k, v in res.items():
        print(f"{k:40s} {v:.3f}" if isinstance(v, float) else f"{k:40s} {v}")
    write_result("micro", {"summary": res, "targets": {f"{k}_p50_ms": f"<= {v:g}" for k, v in TARGETS_MS.items()},
                           "rq_submit_measured": rq is not None, "load_average_1m": os.getloadavg()[0]})


if __name__ == "__main__":
    main()
