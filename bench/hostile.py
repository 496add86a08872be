"""Hostile-input costs of `tessera serve`, before/after: peak RSS of one request with three 7000x7000 PNGs,
a 5,000-task request, /health while 16 clients trickle request bodies, and predict throughput.

    .venv/bin/python -m bench.hostile [--src DIR] [--label NAME] [--tasks 5000]

`--src` is the source tree the server runs from (default: this checkout; e.g. an export of an older commit,
to compare side by side). Everything runs on 127.0.0.1 with servers this script starts. Writes
bench/results/hostile-<label>.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image, ImageDraw

from bench.common import group_peak_rss_kb, stop_group, write_result
from bench.speed import CONFIG, serve_dir

REPO = Path(__file__).resolve().parents[1]
NO_BRUSH = "\n".join(line for line in CONFIG.splitlines() if "Brush" not in line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def big_png(path: Path, side: int = 7000, seed: int = 0) -> None:
    im = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(im)
    rng = np.random.default_rng(seed)
    for _ in range(25):
        x, y, r = rng.integers(300, side - 300), rng.integers(300, side - 300), rng.integers(60, 250)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(230, 230, 230))
    im.save(path, optimize=True)


class Server:
    """`python -m tessera.backend.cli serve` from `src`, in its own process group."""

    def __init__(self, src: Path, env: dict, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "tessera.backend.cli", "serve", "--host", "127.0.0.1",
                                      "--port", str(self.port)], cwd=src, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(src), **env}, start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.3)
        raise RuntimeError(f"server from {src} did not start; see {log}")

    def stop(self) -> None:
        stop_group(self.proc)
        self.log.close()


def _slow(port: int, stop: threading.Event) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n")
            for _ in range(40):
                if stop.wait(1.0):
                    return
                s.sendall(b" ")
    except OSError:
        return


def health_under_slow_clients(srv: Server, n_clients: int = 16) -> dict:
    stop = threading.Event()
    threads = [threading.Thread(target=_slow, args=(srv.port, stop), daemon=True) for _ in range(n_clients)]
    for t in threads:
        t.start()
    time.sleep(3.0)
    latencies = []
    for _ in range(3):
        t0 = time.perf_counter()
        try:
            ok = requests.get(srv.url + "/health", timeout=15).status_code == 200
        except requests.RequestException:
            ok = False
        latencies.append(round(time.perf_counter() - t0, 3) if ok else None)
    stop.set()
    for t in threads:
        t.join(10)
    return {"health_s_under_16_slow_clients": latencies}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=str(REPO))
    ap.add_argument("--label", default="after")
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--no-brush", action="store_true",
                    help="big-image request with polygons and boxes only: a 7000x7000 brush RLE costs ~1 GB and "
                         "minutes per object in label-studio-sdk's encoder, whatever the decoding does")
    args = ap.parse_args()
    from tessera.backend.store import DEFAULT_KEY
    from tessera.backend.settings import Settings
    from tessera.backend.training import _train_and_register
    from tessera.model.data import make_nuclei

    work = Path(tempfile.mkdtemp(prefix="tessera-hostile-"))
    res: dict = {"src": "this checkout" if Path(args.src).resolve() == REPO else "other tree", "label": args.label}
    try:
        samples = make_nuclei(12, size=256, seed=3)
        _train_and_register(Settings(model_dir=work / "models"), DEFAULT_KEY, samples[:10], samples[10:],
                            ["Nucleus"], "hostile bench", iters=20, progress=lambda i: None)
        media = work / "media"
        media.mkdir()
        for i in range(3):
            big_png(media / f"big{i}.png", seed=i)
        res["big_png_bytes"] = [(media / f"big{i}.png").stat().st_size for i in range(3)]
        Image.fromarray(samples[0].image[:32, :32]).save(media / "tiny.png")
        for i, s in enumerate(make_nuclei(64, size=256, seed=4)):
            Image.fromarray(s.image).save(media / f"b{i}.png")
        files, base = serve_dir(media)
        srv = Server(Path(args.src), {"MODEL_DIR": str(work / "models"), "TESSERA_ALLOWED_HOSTS": "127.0.0.1",
                                      "TESSERA_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "2"}, work / "serve.log")
        http = requests.Session()
        try:
            def predict(tasks, timeout=args.request_timeout):
                t0 = time.perf_counter()
                try:
                    r = http.post(srv.url + "/predict", json={"project": "1.0", "label_config": config,
                                                              "tasks": tasks}, timeout=timeout)
                except requests.Timeout:
                    r = None
                return r, time.perf_counter() - t0

            config = CONFIG

            def note(key, value):
                res[key] = value
                print(f"{key:40s} {value}", flush=True)

            predict([{"id": 0, "data": {"image": f"{base}/b0.png"}}])            # loads the model
            before = group_peak_rss_kb(srv.proc.pid)
            config = NO_BRUSH if args.no_brush else CONFIG
            note("big3_config", "polygons+boxes" if args.no_brush else "brush+polygons+boxes")
            r, took = predict([{"id": i, "data": {"image": f"{base}/big{i}.png"}} for i in range(3)])
            note("big3_status", r.status_code if r is not None else "timeout")
            note("big3_s", round(took, 2))
            note("big3_regions", [len(x["result"]) for x in r.json()["results"]] if r is not None and r.ok else None)
            note("rss_mb_before_big3", round(before / 1024))
            note("peak_rss_growth_mb_big3", round((group_peak_rss_kb(srv.proc.pid) - before) / 1024))
            config = CONFIG

            batch = [{"id": i, "data": {"image": f"{base}/b{i}.png"}} for i in range(64)]
            times = [predict(batch)[1] for _ in range(3)]
            note("batch64_tasks_per_s", round(64 / float(np.median(times)), 2))
            singles = [[{"id": i, "data": {"image": f"{base}/b{i % 64}.png"}}] for i in range(64)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                codes = [r.status_code if r is not None else None for r, _ in pool.map(predict, singles)]
            note("single_task_requests_8_clients_per_s", round(64 / (time.perf_counter() - t0), 2))
            note("single_task_requests_ok", codes.count(200))
            for k, v in health_under_slow_clients(srv).items():
                note(k, v)

            # last: an old server keeps working on a request its client gave up on
            tiny = [{"id": i, "data": {"image": f"{base}/tiny.png?i={i}"}} for i in range(args.tasks)]
            for n in (1000, args.tasks):
                r, took = predict(tiny[:n])
                note(f"tasks{n}_status", r.status_code if r is not None else f"no answer in {args.request_timeout} s")
                note(f"tasks{n}_s", round(took, 2))
        finally:
            srv.stop()
            files.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["load_avg_1m"] = os.getloadavg()[0]
    write_result(f"hostile-{args.label}", {"summary": res})


if __name__ == "__main__":
    main()
