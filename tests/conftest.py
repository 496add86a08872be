"""Shared fixtures: settings in a temp model dir, a stand-in predictor, the Flask test client."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from tessera.backend.app import create_app
from tessera.backend.predictions import ModelCache
from tessera.backend.settings import Settings

pytest_plugins = ["tests.conftest_ls"]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

CONFIG_ALL = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Nucleus"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Nucleus"/></PolygonLabels>
  <RectangleLabels name="bbox" toName="image"><Label value="Nucleus"/></RectangleLabels>
</View>"""


@dataclass
class StubPrediction:
    classes: np.ndarray
    instances: np.ndarray
    instance_label: dict = field(default_factory=dict)
    instance_score: dict = field(default_factory=dict)
    score: float = 0.0


class ThresholdPredictor:
    """Stand-in for model.inference.Predictor: bright pixels are objects, connected components instances."""
    label_names = ["Nucleus"]

    def __init__(self):
        self.calls: list[int] = []            # batch sizes seen by predict()
        self.lock = threading.Lock()

    def predict(self, images):
        with self.lock:
            self.calls.append(len(images))
        out = []
        for im in images:
            fg = im.mean(axis=2) > 128
            inst, n = ndimage.label(fg)
            out.append(StubPrediction(fg.astype(np.int32), inst.astype(np.int32), {k: 1 for k in range(1, n + 1)},
                                      {k: 0.9 for k in range(1, n + 1)}, 0.9 if n else 0.5))
        return out

    def refine(self, image, hint, positive, negative, label):
        fg = image.mean(axis=2) > 128
        inst, _ = ndimage.label(fg)
        keep = set(np.unique(inst[hint])) if hint is not None else set()
        keep |= {int(inst[int(y), int(x)]) for x, y in positive}
        keep -= {int(inst[int(y), int(x)]) for x, y in negative} | {0}
        return np.isin(inst, list(keep)), 0.8

    def review(self, image, classes, instances, boxes=None):
        pred = self.predict([image])[0]
        agree = ((pred.classes > 0) == (classes > 0)).mean()
        return pred, float(1.0 - agree)


class RecordingRunner:
    """A job runner that records what it was asked to do (the real runners are tested in test_jobs.py)."""

    def __init__(self):
        self.submitted: list[tuple[str, str]] = []

    def submit(self, project_key, reason):
        self.submitted.append((project_key, reason))
        return {"state": "scheduled", "submitted": time.time()}

    def status(self, project_key):
        return {"state": "idle"}


@pytest.fixture
def tmp_model_dir(tmp_path):
    """A fresh MODEL_DIR."""
    d = tmp_path / "models"
    d.mkdir()
    return d


@pytest.fixture
def settings(tmp_model_dir, tmp_path):
    """Settings with a temp model dir and a media root."""
    media = tmp_path / "media"
    media.mkdir()
    return Settings(model_dir=tmp_model_dir, media_root=media.resolve(), debounce_s=0.2)


@pytest.fixture
def stub_predictor():
    """The threshold stand-in predictor."""
    return ThresholdPredictor()


def register_stub(settings: Settings, key: str = "default", labels=("Nucleus",)) -> str:
    """Put a promoted stand-in version into a registry; returns its version."""
    cache = ModelCache(settings)
    f = settings.model_dir / "stub.pt"
    f.write_bytes(b"stub")
    return cache.registry(key).add(f, {"label_names": list(labels), "val_iou": 0.5}, promote=True,
                                   kind="label").version


@pytest.fixture
def client(settings, stub_predictor):
    """Flask test client of an app whose default model is the stand-in predictor."""
    register_stub(settings)
    cache = ModelCache(settings, loader=lambda path, device: stub_predictor)
    runner = RecordingRunner()
    app = create_app(settings, runner=runner, cache=cache)
    app.testing = True
    c = app.test_client()
    c.runner = runner
    return c


# ------------------------------------------------------------------------------ real servers (e2e)

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TesseraProcess:
    """`tessera serve` (waitress, the production entry point) in a subprocess, with its log kept."""

    def __init__(self, env: dict, log_path: Path):
        import os
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        exe = Path(sys.executable).with_name("tessera")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                                     env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_up(self, timeout: float = 60.0) -> "TesseraProcess":
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tessera serve exited {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"tessera serve did not answer in {timeout}s:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        import os
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except Exception:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory):
    """A MODEL_DIR whose default model is a small label model trained here on procedural nuclei."""
    from tessera.backend.store import DEFAULT_KEY
    from tessera.backend.training import _train_and_register
    from tessera.model.data import make_nuclei

    d = tmp_path_factory.mktemp("trained-models")
    samples = make_nuclei(24, size=128, seed=11)
    s = Settings(model_dir=d)
    result = _train_and_register(s, DEFAULT_KEY, samples[:20], samples[20:], ["Nucleus"], "test fixture",
                                 iters=int(__import__("os").environ.get("TESSERA_TEST_TRAIN_ITERS", "150")),
                                 progress=lambda info: None)
    assert result["status"] == "promoted", result
    return d


@pytest.fixture(scope="module")
def redis_url():
    """A throw-away redis-server on a free port, one per test module; fails clearly if not installed."""
    import os
    import shutil
    import socket
    import subprocess

    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("TESSERA_SKIP_REDIS") == "1":
            pytest.skip("redis-server not installed and TESSERA_SKIP_REDIS=1")
        pytest.fail("redis-server is not on PATH: install it (apt-get install -y redis-server) "
                    "or set TESSERA_SKIP_REDIS=1 to skip the RQ tests", pytrace=False)
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    try:
        deadline = time.time() + 15
        while not up():
            assert proc.poll() is None and time.time() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
