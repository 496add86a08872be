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
import signal
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

from bench.common import write_result
from bench.speed import CONFIG, serve_dir

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_hwm_kb(pgid: int) -> int:
    """Largest peak RSS (VmHWM) of the processes in a process group, in kB."""
    best = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]))
        except (OSError, ProcessLookupError):
            continue
    return best


def big_png(path: Path, side: int = 7000, seed: int = 0) -> None:
    im = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(im)
    rng = np.random.default_rng(seed)
    for _ in range(25):
        x, y, r = rng.integers(300, side - 300), rng.integers(300, side - 300), rng.integers(60, 250)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(230, 230, 230))
    im.save(path, optimize=True)


class Server:
    """`python -m backend.cli serve` from `src`, in its own process group."""

    def __init__(self, src: Path, env: dict, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1",
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
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
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
    args = ap.parse_args()
    from backend.service import DEFAULT_KEY
    from backend.settings import Settings
    from backend.training import _train_and_register
    from model.data import make_nuclei

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
            def predict(tasks, timeout=600):
                t0 = time.perf_counter()
                r = http.post(srv.url + "/predict", json={"project": "1.0", "label_config": CONFIG, "tasks": tasks},
                              timeout=timeout)
                return r, time.perf_counter() - t0

            predict([{"id": 0, "data": {"image": f"{base}/b0.png"}}])            # loads the model
            before = group_hwm_kb(srv.proc.pid)
            r, took = predict([{"id": i, "data": {"image": f"{base}/big{i}.png"}} for i in range(3)])
            res["big3_status"], res["big3_s"] = r.status_code, round(took, 2)
            res["big3_regions"] = [len(x["result"]) for x in r.json().get("results", [])] if r.ok else None
            res["rss_mb_before_big3"] = round(before / 1024)
            res["peak_rss_growth_mb_big3"] = round((group_hwm_kb(srv.proc.pid) - before) / 1024)

            tiny = [{"id": i, "data": {"image": f"{base}/tiny.png?i={i}"}} for i in range(args.tasks)]
            r, took = predict(tiny)
            res[f"tasks{args.tasks}_status"], res[f"tasks{args.tasks}_s"] = r.status_code, round(took, 2)
            r, took = predict(tiny[:1000])
            res["tasks1000_status"], res["tasks1000_s"] = r.status_code, round(took, 2)

            batch = [{"id": i, "data": {"image": f"{base}/b{i}.png"}} for i in range(64)]
            times = [predict(batch)[1] for _ in range(3)]
            res["batch64_tasks_per_s"] = round(64 / float(np.median(times)), 2)
            singles = [[{"id": i, "data": {"image": f"{base}/b{i % 64}.png"}}] for i in range(64)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                codes = [r.status_code for r, _ in pool.map(predict, singles)]
            res["single_task_requests_8_clients_per_s"] = round(64 / (time.perf_counter() - t0), 2)
            res["single_task_requests_ok"] = codes.count(200)
            res.update(health_under_slow_clients(srv))
        finally:
            srv.stop()
            files.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["load_avg_1m"] = os.getloadavg()[0]
    for k, v in res.items():
        print(f"{k:40s} {v}")
    write_result(f"hostile-{args.label}", {"summary": res})


if __name__ == "__main__":
    main()
