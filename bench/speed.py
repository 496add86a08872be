"""Speed of the label model on this CPU: predict latency in-process and over HTTP, batch throughput,
interactive refinement, one 1,000-task "Retrieve predictions" request, and achieved FLOP/s.

    .venv/bin/python -m bench.speed [--threads 2] [--quick]
    .venv/bin/python -m bench.speed --native [--quick]     (native sizes, before/after: bench/speed_native.py)

Writes bench/results/speed.json. The model is the default architecture trained for a few iterations on
procedural data: speed does not depend on what the weights learned.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from bench.common import write_result

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="Nucleus"/></BrushLabels>
<PolygonLabels name="poly" toName="image"><Label value="Nucleus"/></PolygonLabels>
<RectangleLabels name="bbox" toName="image"><Label value="Nucleus"/></RectangleLabels></View>"""


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000.0, q))


def timed(fn, n: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def matmul_flops(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def serve_dir(root: Path):
    """A real HTTP server for the images, standing in for Label Studio's /data/upload."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


def stages(pred, images: dict, reps: int) -> dict:
    """Median ms per stage (bench.speed_native.stage_times: decode, resize, forward, upsample, instance
    split, each region type, JSON) of each image, encoded as PNG."""
    import io

    from bench.speed_native import stage_times

    out = {}
    for name, img in images.items():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        runs = [stage_times(pred, buf.getvalue()) for _ in range(reps + 1)][1:]
        out[name] = {k: statistics.median(r[k] for r in runs) * (1 if k == "n_regions" else 1000) for k in runs[0]}
    return out


def bench_model(work: Path, overrides: dict | None = None, models: str = "models") -> Path:
    """A label model trained for a few iterations on procedural nuclei, registered under work/<models>: the
    checkpoint both speed modes time (speed does not depend on what the weights learned, only on the
    architecture and the object scale they were trained at). `overrides`: TrainConfig fields of the run
    (an architecture to time, e.g. {"stem_stride": 2, "widths": (32, 64, 96)}). Its masks follow the image's
    edges whatever the version chose on its 2 held-back images (train_vqvae.choose_follow_edges), and a head
    learned beside its masks draws the rectangles whatever those images said (train_vqvae.rectangles_from; 20
    iterations leave the masks' boxes ahead): the timing holds both costs, as a project whose version kept
    them pays."""
    import dataclasses
    from unittest import mock

    from tessera.backend import training
    from tessera.backend.store import DEFAULT_KEY
    from tessera.backend.settings import Settings
    from tessera.model.checkpoint import load_checkpoint, save_checkpoint
    from tessera.model.data import make_nuclei

    samples = make_nuclei(12, size=256, seed=3)
    plain = training.train_config
    with mock.patch.object(training, "train_config",
                           lambda *a, **k: dataclasses.replace(plain(*a, **k), **(overrides or {}))):
        training._train_and_register(Settings(model_dir=work / models), DEFAULT_KEY, samples[:10], samples[10:],
                                     ["Nucleus"], "speed bench", iters=20, progress=lambda i: None)
    path = next((work / models / "default" / "versions").glob("v*/model.pt"))
    ckpt = load_checkpoint(path, "vqvae")
    ckpt["follow_edges"] = None                 # as a checkpoint from before the choice: on
    if ckpt.get("box_cut"):     # a head beside the masks draws the rectangles, as where it ranked better (DSB)
        ckpt["box_cut"]["rectangles"] = "head"
    save_checkpoint(ckpt, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--native", action="store_true", help="native-size mode (bench/speed_native.py): "
                    "per-stage breakdown and HTTP latency at 256 px, 520x696 and 2048x2048, before and after")
    ap.add_argument("--before", default="main", help="--native: git revision timed as 'before' ('none': skip)")
    ap.add_argument("--reps", type=int, default=5, help="--native: repetitions per measurement")
    ap.add_argument("--big", type=int, default=1000, help="--native: tasks in the one-request measurement")
    ap.add_argument("--ls-tasks", type=int, default=0, help="--native: instead, one /predict of this many "
                    "520x696 tasks downloaded from a real Label Studio (bench/results/speed_native_ls.json)")
    ap.add_argument("--ls-rounds", type=int, default=1, help="--ls-tasks: requests per server (order swapped "
                    "every round)")
    ap.add_argument("--ls-env", action="append", default=[], metavar="KEY=VALUE",
                    help="--ls-tasks: extra environment of the 'after' server (e.g. TESSERA_PREDICT_BATCH=8)")
    ap.add_argument("--ls-name", default="speed_native_ls", help="--ls-tasks: result file name")
    ap.add_argument("--finish", action="store_true", help="--native: instead, the CPU of /predict's second "
                    "thread per 520x696 task (finishing, regions, JSON), --before vs the current code, 1 thread")
    ap.add_argument("--finish-name", default="speed_native_finish", help="--finish: result file name")
    ap.add_argument("--annotations", action="store_true", help="--native: instead, the CPU to read one annotated "
                    "task into label maps (each training run does it per task) at 520x696 and 2048x2048, --before "
                    "vs the current code, 1 thread")
    ap.add_argument("--annotations-name", default="speed_native_annotations", help="--annotations: result file name")
    ap.add_argument("--batches", action="store_true", help="--native: instead, the time to make one training batch "
                    "of 8 crops from 520x696, 1040x1388 and 2048x2048 images, --before vs the current code, 1 thread")
    ap.add_argument("--batches-name", default="speed_native_batches", help="--batches: result file name")
    ap.add_argument("--ls-arch", nargs="*", default=[], metavar="KEY=VALUE",
                    help="--ls-tasks: instead of two revisions, two architectures on the current code: 'before' "
                    "the default model, 'after' one trained with these TrainConfig fields (e.g. stem_stride=2 "
                    "widths=32,64,96)")
    args = ap.parse_args()
    if args.native:
        from bench import speed_native

        if args.quick:
            args.reps, args.big = 2, 64
        if args.ls_tasks:
            return speed_native.ls_big_request(args)
        if args.finish:
            return speed_native.finish_breakdown(args)
        if args.annotations:
            return speed_native.annotation_reading(args)
        if args.batches:
            return speed_native.training_batches(args)
        return speed_native.main(args)
    torch.set_num_threads(args.threads)
    from tessera.model.data import make_nuclei
    from tessera.model.inference import Predictor
    from tests.conftest import TesseraProcess

    n = 5 if args.quick else 30
    work = Path(tempfile.mkdtemp(prefix="tessera-speed-"))
    try:
        samples = make_nuclei(12, size=256, seed=3)
        pred = Predictor.from_checkpoint(bench_model(work), device="cpu")
        R = pred.model.config.resolution
        img256 = samples[0].image
        img1024 = np.array(Image.fromarray(img256).resize((1024, 1024)))
        res: dict = {"resolution": R, "threads": args.threads}

        for name, img in (("256", img256), ("1024", img1024)):
            t = timed(lambda: pred.predict([img]), n)
            res[f"inprocess_{name}_p50_ms"], res[f"inprocess_{name}_p95_ms"] = pct(t, 50), pct(t, 95)
        batch = [s.image for s in make_nuclei(64, size=256, seed=4)]
        t = timed(lambda: pred.predict(batch), 2 if args.quick else 3, warmup=1)
        res["inprocess_batch64_images_per_s"] = 64 / statistics.median(t)
        hint = samples[0].instances == samples[0].instances.max()
        t = timed(lambda: pred.refine(img256, hint, [], [], 1), n)
        res["refine_256_p50_ms"], res["refine_256_p95_ms"] = pct(t, 50), pct(t, 95)

        res["stages_ms"] = stages(pred, {"256": img256, "1024": img1024}, n)
        x = torch.zeros(1, 3, R, R)
        with FlopCounterMode(display=False) as fc:
            pred.predict([img256])
        flops = fc.get_total_flops()
        fwd = statistics.median(timed(lambda: pred.predict([img256]), n))
        res["forward_gflop"] = flops / 1e9
        res["achieved_gflops"] = flops / fwd / 1e9
        res["matmul_gflops"] = matmul_flops() / 1e9
        res["achieved_share_of_matmul"] = res["achieved_gflops"] / res["matmul_gflops"]
        del x

        media = work / "media"
        media.mkdir()
        Image.fromarray(img256).save(media / "256.png")
        Image.fromarray(img1024).save(media / "1024.png")
        for i, im in enumerate(batch):
            Image.fromarray(im).save(media / f"b{i}.png")
        srv, base = serve_dir(media)
        proc = TesseraProcess({"MODEL_DIR": str(work / "models"), "TESSERA_LOG_LEVEL": "WARNING",
                               "TESSERA_ALLOWED_HOSTS": "127.0.0.1", "OMP_NUM_THREADS": str(args.threads)},
                              work / "serve.log").wait_up()
        try:
            s = requests.Session()
            s.post(proc.url + "/setup", json={"project": "1.0", "schema": CONFIG}, timeout=10)
            for name in ("256", "1024"):
                body = {"project": "1.0", "label_config": CONFIG,
                        "tasks": [{"id": 1, "data": {"image": f"{base}/{name}.png"}}]}
                t = timed(lambda: s.post(proc.url + "/predict", json=body, timeout=100).raise_for_status(), n)
                res[f"http_{name}_p50_ms"], res[f"http_{name}_p95_ms"] = pct(t, 50), pct(t, 95)
            tasks = [{"id": i, "data": {"image": f"{base}/b{i}.png"}} for i in range(64)]
            body = {"project": "1.0", "label_config": CONFIG, "tasks": tasks}
            t = timed(lambda: s.post(proc.url + "/predict", json=body, timeout=100).raise_for_status(), 2, warmup=1)
            res["http_batch64_tasks_per_s"] = 64 / statistics.median(t)
            big = 200 if args.quick else 1000
            tasks = [{"id": i, "data": {"image": f"{base}/b{i % 64}.png?t={i}"}} for i in range(big)]
            body = {"project": "1.0", "label_config": CONFIG, "tasks": tasks}
            t0 = time.perf_counter()
            r = s.post(proc.url + "/predict", json=body, timeout=300)
            r.raise_for_status()
            res[f"http_{big}_tasks_one_request_s"] = time.perf_counter() - t0
            res[f"http_{big}_tasks_all_answered"] = len(r.json()["results"]) == big
        finally:
            proc.stop()
            srv.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for k, v in res.items():
        print(f"{k:40s} {v:.2f}" if isinstance(v, float) else f"{k:40s} {v}")
    write_result("speed", {"summary": res, "targets": {"inprocess_256_p50_ms": "<= 30 at R=128",
                                                       "http_1000_tasks_one_request_s": "well under 100"}})


if __name__ == "__main__":
    main()
