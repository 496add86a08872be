"""`make docker-e2e`: the compose stack (docker/docker-compose.yml) end to end, on this machine's loopback.

Label Studio, Tessera, Redis and the worker come up from the compose file (images: `make docker-image` and
docker/e2e/stand-ins.sh); then, through Label Studio's REST API as a user would click it: a project with
uploaded images, the model connected at http://tessera:9090, "Retrieve predictions" storing regions (from a
default model trained first with `tessera train --data` in the tessera container), annotations, and "Start
training" reaching the RQ worker, which trains the project's first version from Label Studio's annotations.
Last, `down` + `up` keep the models and Label Studio's data; `down -v` removes everything.

Compose v2 (`docker compose`) runs the file as it is; where only Debian's docker-compose 1.29 exists, the
file runs without its top-level `name:` (which 1.x rejects) under `-p`. Exit 0 when every check holds.
"""
from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tessera.backend import lsclient  # noqa: E402
from tessera.backend.lsclient import LabelStudioUnavailable  # noqa: E402
from tessera.backend.lsserver import free_port  # noqa: E402

PROJECT = "tessera-e2e"
COMPOSE_FILE = REPO / "docker" / "docker-compose.yml"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Nucleus"/></BrushLabels>
</View>"""
MAKE_DATA = """
import sys
from pathlib import Path
from PIL import Image
from tessera.model.data import make_nuclei
root = Path(sys.argv[1]); n = int(sys.argv[2]); seed = int(sys.argv[3])
for sub in ("images", "labels"):
    (root / sub).mkdir(parents=True, exist_ok=True)
for i, s in enumerate(make_nuclei(n, size=128, seed=seed)):
    Image.fromarray(s.image).save(root / "images" / f"n{i:02d}.png")
    Image.fromarray(s.instances.astype("uint16")).save(root / "labels" / f"n{i:02d}.png")
"""
T0 = time.time()


def say(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f} s] {msg}", flush=True)


def sh(*args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise SystemExit(f"FAILED: {' '.join(args)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def compose_command(docker: str, workdir: Path) -> list[str]:
    if sh(docker, "compose", "version", check=False).returncode == 0:
        return [docker, "compose", "-f", str(COMPOSE_FILE), "-p", PROJECT]
    if not shutil.which("docker-compose"):
        sh("apt-get", "install", "-y", "-qq", "docker-compose")
    say("compose v2 not installed: Debian's docker-compose 1.x runs the file without its top-level `name:`")
    v1_file = workdir / "docker-compose.yml"
    v1_file.write_text("".join(line for line in COMPOSE_FILE.read_text().splitlines(keepends=True)
                               if not line.startswith("name:")))
    return ["docker-compose", "-f", str(v1_file), "--project-directory", str(COMPOSE_FILE.parent), "-p", PROJECT]


def wait_for(what: str, fn, timeout: float, every: float = 2.0):
    deadline = time.time() + timeout
    while True:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:  # not up yet: retried until the deadline
            last = e
        else:
            last = None
        if time.time() > deadline:
            raise SystemExit(f"FAILED: {what} after {timeout:.0f} s ({last!r})")
        time.sleep(every)


class Stack:
    def __init__(self, docker: str, workdir: Path):
        self.docker = docker
        self.ls_port, self.tessera_port = free_port(), free_port()
        self.token = secrets.token_hex(20)
        self.env_file = workdir / "e2e.env"
        self.env_file.write_text("\n".join([
            f"LABEL_STUDIO_PORT={self.ls_port}", f"TESSERA_PORT={self.tessera_port}",
            "LABEL_STUDIO_BIND=127.0.0.1", "TESSERA_BIND=127.0.0.1",
            "LABEL_STUDIO_USERNAME=e2e@example.com", f"LABEL_STUDIO_PASSWORD={secrets.token_hex(12)}",
            f"LABEL_STUDIO_USER_TOKEN={self.token}", "TESSERA_MIN_ANNOTATIONS=3", "TESSERA_TRAIN_ITERS=40",
            "TESSERA_DEBOUNCE_S=1", ""]))
        self.base = compose_command(docker, workdir) + ["--env-file", str(self.env_file)]

    def __call__(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return sh(*self.base, *args, **kw)

    def exec(self, service: str, *args: str, **kw) -> subprocess.CompletedProcess:
        return self("exec", "-T", service, *args, **kw)

    def up(self):
        """The stack started; returns label-studio-sdk's client for its Label Studio."""
        t = time.time()
        self("up", "-d", timeout=900)
        api = lsclient.connect(f"http://127.0.0.1:{self.ls_port}", self.token)
        wait_for("Label Studio answering with the token", api.users.whoami, 900)  # first start: migrations
        wait_for("tessera healthy", lambda: self.health("tessera") == "healthy", 180)
        wait_for("worker healthy", lambda: self.health("worker") == "healthy", 180)
        say(f"stack up and healthy in {time.time() - t:.0f} s")
        return api

    def health(self, service: str) -> str:
        cid = self("ps", "-q", service).stdout.strip()
        return sh(self.docker, "inspect", "-f", "{{.State.Health.Status}}", cid).stdout.strip()

    def logs(self, service: str) -> str:
        return self("logs", "--no-color", "--tail", "60", service, check=False).stdout


def versions(stack: Stack, project: str | None = None) -> str:
    args = ["tessera", "versions"] + (["--project", project] if project else [])
    return stack.exec("worker", *args, check=False).stdout


def run(stack: Stack, workdir: Path) -> None:
    api = stack.up()
    # a default model to predict with: `tessera train --data` inside the tessera container
    stack.exec("tessera", "python", "-", "/tmp/train", "16", "5", input=MAKE_DATA)
    t = time.time()
    stack.exec("tessera", "tessera", "train", "--data", "/tmp/train", "--labels", "Nucleus", "--iters", "60")
    say(f"default model trained in the tessera container in {time.time() - t:.0f} s")

    images = workdir / "upload"
    sh(sys.executable, "-", str(images), "4", "9", input=MAKE_DATA, cwd=REPO)
    project = api.projects.create(title="Tessera compose e2e", label_config=CONFIG).id
    tasks = lsclient.upload_images(api, project, [(p.name, p.read_bytes())
                                                  for p in sorted((images / "images").glob("*.png"))])
    ml = api.ml.create(project=project, url="http://tessera:9090", title="Tessera")
    say(f"project {project}: {len(tasks)} uploaded tasks, model connected at http://tessera:9090 (ml {ml.id})")

    t = time.time()
    api.actions.create(id="retrieve_tasks_predictions", project=project, selected_items={"all": True, "excluded": []},
                       request_options={"timeout_in_seconds": 150})
    stored = {task: [p for p in api.predictions.list(task=task) if p.result] for task in tasks}
    n_regions = sum(len(p[0].result) for p in stored.values() if p)
    assert all(stored.values()), f"tasks without stored regions: {[k for k, v in stored.items() if not v]}"
    say(f"Retrieve predictions: {n_regions} regions stored on {len(tasks)} tasks in {time.time() - t:.0f} s")

    for task in tasks[:3]:  # accept the predictions as annotations
        api.annotations.create(task, result=stored[task][0].result)
    t = time.time()
    api.ml.train(ml.id)
    key = str(project)
    wait_for("the worker training the project from Start training",
             lambda: "v0001" in versions(stack, key), 600, every=5)
    worker_log = stack.logs("worker")
    assert "tessera" in worker_log and ("Job OK" in worker_log or "Successfully completed" in worker_log), \
        worker_log
    say(f"Start training -> RQ worker -> project {project} v0001 in {time.time() - t:.0f} s")

    before = versions(stack), versions(stack, key)
    t = time.time()
    stack("down", timeout=300)
    api = stack.up()
    assert (versions(stack), versions(stack, key)) == before, "models changed across down/up"
    assert api.projects.get(project).title == "Tessera compose e2e", "Label Studio's data lost across down/up"
    assert len(list(lsclient.tasks(api, project))) == len(tasks)
    say(f"down + up: models and Label Studio data kept ({time.time() - t:.0f} s)")


def main() -> int:
    docker = sh(str(REPO / "docker/engine.sh"), "client").stdout.strip()
    workdir = Path(tempfile.mkdtemp(prefix="tessera-e2e-"))
    stack = Stack(docker, workdir)
    try:
        run(stack, workdir)
    except (SystemExit, AssertionError, LabelStudioUnavailable) as e:
        for service in ("label-studio", "tessera", "worker"):
            print(f"---- {service} log\n{stack.logs(service)}")
        print(f"docker-e2e FAILED: {e}")
        return 1
    finally:
        stack("down", "-v", check=False, timeout=300)
        shutil.rmtree(workdir, ignore_errors=True)
    say("docker-e2e: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
