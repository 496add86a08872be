"""The Docker image, built and run (tests/test_docker.py reads the files; this runs them).

`docker/engine.sh start` makes sure a Docker engine answers (on a fresh machine: Debian's docker.io, dockerd
started here); `docker/build.sh` builds the image as `make docker-image` does (the FROM image pulled or, where
no registry answers, a local Debian stand-in). Then the image itself is run: /health, the health check turning
healthy, a short `tessera train --data` inside the container on generated data and a /predict that returns its
regions, the non-root user, the model volume surviving `docker restart`, and the worker role: failing clearly
without REDIS_URL, healthy (without serving HTTP) with one. Ports are published on 127.0.0.1 only.

Skipped, with the reason, only where no Docker engine can run (not root and none running, dockerd fails).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import CONFIG_ALL

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("TESSERA_DOCKER_IMAGE", "tessera:local")
TRAIN_ITERS = os.environ.get("TESSERA_DOCKER_TRAIN_ITERS", "60")
# procedural nuclei (model.data.make_nuclei) written as a folder dataset: images/<id>.png + labels/<id>.png
MAKE_DATA = """
import sys
from pathlib import Path
from PIL import Image
from tessera.model.data import make_nuclei
root = Path(sys.argv[1])
for sub in ("images", "labels"):
    (root / sub).mkdir(parents=True, exist_ok=True)
for i, s in enumerate(make_nuclei(16, size=128, seed=5)):
    Image.fromarray(s.image).save(root / "images" / f"n{i:02d}.png")
    Image.fromarray(s.instances.astype("uint16")).save(root / "labels" / f"n{i:02d}.png")
print(i + 1)
"""


def run(*args: str, check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(args[:4])} ... exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def docker() -> str:
    """The docker client to use, once an engine answers (started here if needed)."""
    r = run(str(REPO / "docker/engine.sh"), "start", check=False, timeout=600)
    if r.returncode == 3:
        pytest.skip(f"no Docker engine can run here: {r.stderr.strip()}")
    assert r.returncode == 0, f"docker/engine.sh start failed:\n{r.stdout}\n{r.stderr}"
    return run(str(REPO / "docker/engine.sh"), "client").stdout.strip()


@pytest.fixture(scope="module")
def image(docker) -> str:
    r = run(str(REPO / "docker/build.sh"), IMAGE, timeout=1800)
    print(r.stdout)
    return IMAGE


class Container:
    """One `docker run -d` of the image, removed (with its anonymous volumes) at the end."""

    def __init__(self, docker: str, image: str, *args: str, run_args: tuple[str, ...] = ()):
        self.docker, self.name = docker, f"tessera-test-{uuid.uuid4().hex[:8]}"
        run(docker, "run", "-d", "--name", self.name, "--health-interval", "2s", "--health-timeout", "5s",
            "--health-start-period", "120s", "--health-retries", "3", *run_args, image, *args)

    def exec(self, *args: str, check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        return run(self.docker, "exec", *kw.pop("exec_args", ()), self.name, *args, check=check,
                   timeout=timeout, **kw)

    def inspect(self, fmt: str) -> str:
        return run(self.docker, "inspect", "-f", fmt, self.name).stdout.strip()

    def logs(self) -> str:
        r = run(self.docker, "logs", "--tail", "40", self.name, check=False)
        return r.stdout + r.stderr

    def url(self, path: str) -> str:
        host_port = run(self.docker, "port", self.name, "9090/tcp").stdout.split()[0]
        return f"http://{host_port}{path}"

    def wait_health(self, want: str = "healthy", timeout: float = 150) -> str:
        deadline, status = time.time() + timeout, ""
        while time.time() < deadline:
            status = self.inspect("{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}")
            if status.endswith(want) or status.startswith("exited"):
                break
            time.sleep(1)
        return status

    def remove(self) -> None:
        run(self.docker, "rm", "-f", "-v", self.name, check=False)


def http_json(url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


@pytest.fixture(scope="module")
def server(docker, image):
    """`serve` (the image's default command), its models in a named volume, published on 127.0.0.1 only."""
    volume = f"tessera-test-models-{uuid.uuid4().hex[:8]}"
    c = Container(docker, image, run_args=("-p", "127.0.0.1::9090", "-v", f"{volume}:/data/models"))
    try:
        status = c.wait_health()
        assert status == "running healthy", f"status {status!r}; logs:\n{c.logs()}"
        yield c
    finally:
        c.remove()
        run(docker, "volume", "rm", "-f", volume, check=False)


def predict_regions(c: Container) -> list[dict]:
    """/predict on the first generated image (read from the container, where it was made)."""
    data = c.exec("base64", "-w0", "/tmp/data/images/n00.png").stdout
    body = {"tasks": [{"id": 1, "data": {"image": "data:image/png;base64," + data}}], "project": "7.1700000000",
            "label_config": CONFIG_ALL, "params": {"login": None, "password": None, "context": None}}
    status, out = http_json(c.url("/predict"), body)
    assert status == 200, out
    (item,) = out["results"]
    return item["result"]


def served_version(c: Container) -> str:
    status, out = http_json(c.url("/setup"), {"project": "7.1700000000", "schema": CONFIG_ALL})
    assert status == 200, out
    return out["model_version"]


def test_runs_as_uid_10001(docker, image):
    assert run(docker, "image", "inspect", "-f", "{{.Config.User}}", image).stdout.strip() == "10001:10001"
    r = run(docker, "run", "--rm", "--entrypoint", "id", image)
    assert r.stdout.startswith("uid=10001(tessera) gid=10001(tessera)"), r.stdout


def test_health_and_health_check(server):
    status, body = http_json(server.url("/health"))
    assert status == 200 and body["status"] == "UP", body
    log = json.loads(server.inspect("{{json .State.Health.Log}}"))
    assert log and log[-1]["ExitCode"] == 0 and "healthy (serve, GET /health 200)" in log[-1]["Output"], log


def test_train_in_the_container_then_predict_regions(server):
    assert server.exec("python", "-", "/tmp/data", input=MAKE_DATA, exec_args=("-i",)).stdout.strip() == "16"
    # no model yet: a valid answer with no regions
    assert predict_regions(server) == []
    r = server.exec("tessera", "train", "--data", "/tmp/data", "--labels", "Nucleus", "--iters", TRAIN_ITERS,
                    timeout=600)
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["status"] == "promoted", result
    assert "v0001" in server.exec("tessera", "versions").stdout
    regions = predict_regions(server)
    assert regions and {reg["type"] for reg in regions} >= {"brushlabels"}, regions[:2]
    assert all(reg["value"][reg["type"]] == ["Nucleus"] for reg in regions)


def test_models_survive_a_restart(docker, server):
    version = served_version(server)
    assert version.endswith("-v0001"), version
    run(docker, "restart", server.name)
    status = server.wait_health()
    assert status == "running healthy", f"{status!r} after restart; logs:\n{server.logs()}"
    assert served_version(server) == version
    assert predict_regions(server), "the trained model is not served after the restart"
    assert server.exec("stat", "-c", "%u", "/data/models").stdout.strip() == "10001"


def test_worker_without_redis_url_fails_clearly(docker, image):
    r = run(docker, "run", "--rm", image, "worker", check=False, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "tessera worker needs REDIS_URL" in r.stderr


def test_worker_is_healthy_without_serving_http(docker, image, redis_url):
    """The health check follows the role: a worker serves no :9090 yet is healthy while its Redis answers.
    Host networking lets the container reach the test's redis-server on the host's loopback (the check
    reports which role it checked: on the host's network another :9090 could answer)."""
    c = Container(docker, image, "worker", run_args=("--network", "host", "-e", f"REDIS_URL={redis_url}"))
    try:
        status = c.wait_health()
        assert status == "running healthy", f"{status!r}; logs:\n{c.logs()}"
        deadline = time.time() + 120
        while "tessera worker on queue" not in c.logs() and time.time() < deadline:
            time.sleep(1)
        assert "tessera worker on queue" in c.logs(), c.logs()
        log = json.loads(c.inspect("{{json .State.Health.Log}}"))
        assert "healthy (worker, Redis answers)" in log[-1]["Output"], log
    finally:
        c.remove()
