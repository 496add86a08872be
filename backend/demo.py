"""`tessera demo` (what `make demo` runs): a real Label Studio and `tessera serve` on localhost with a
demo project whose first model version is trained here, on procedural nuclei (model.data.make_nuclei).

Steps: Label Studio starts from the cached data-dir template in a background thread (the template build,
~30-70 s on a fresh machine, overlaps with training); demo images are written and the label model is
trained on their exact labels (into a staging store, moved into the project's store once Label Studio has
given the project an id); the project "Tessera demo: nuclei" gets the images as tasks and a few tasks
get ground-truth annotations (one with half its nuclei left out on purpose, for "find suspect labels");
`tessera serve` starts and is connected as the project's interactive ML backend; a few synthetic tasks
are generated when backend.synthetic_tasks is there; predictions are retrieved for every task.

Everything lives under --data-dir (default .demo): ls/ (Label Studio's data), models/ (MODEL_DIR),
images/, tessera.log and demo.json (URLs, login, token, project id; what this run did). A second run
reuses all of it: the project is found by title, training is skipped when the project's store has a
current version, nothing is uploaded twice. Ctrl-C (or SIGTERM) stops both servers' process groups and
keeps the data. Nothing here needs the network.

Environment overrides: TESSERA_DEMO_ITERS (label-model iterations), TESSERA_DEMO_GAN_S (GAN training
seconds; 0 = no GAN), TESSERA_LS_VENV, TESSERA_LS_TEMPLATE (see backend/lsserver.py).
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from label_studio_sdk.client import LabelStudio

from tessera.backend import lsclient
from tessera.backend.progress import TqdmProgress
from tessera.backend.settings import Settings
from tessera.model.lockfile import file_lock

TITLE = "Tessera demo: nuclei"
LABEL = "Nucleus"
# smart tools: with Auto-Annotation on, a brush stroke, a box or a click (the keypoint tool) is sent to
# Tessera as a hint and comes back as a clean region (the keypoint tool exists only for that)
LABEL_CONFIG = f"""<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="mask" toName="image" smart="true"><Label value="{LABEL}" background="#e8453c"/></BrushLabels>
  <PolygonLabels name="poly" toName="image" strokeWidth="2"><Label value="{LABEL}" background="#2f7de1"/></PolygonLabels>
  <RectangleLabels name="bbox" toName="image" smart="true"><Label value="{LABEL}" background="#f5a623"/></RectangleLabels>
  <KeyPointLabels name="hint" toName="image" smart="true" smartOnly="true"><Label value="{LABEL}" background="#22aa55"/></KeyPointLabels>
</View>"""
DESCRIPTION = ("Procedural fluorescence-like nuclei made by Tessera's demo. Predictions come from the "
               "Tessera ML backend (Settings > Model).")
DATA_SEED = 2024
LS_PORT, TESSERA_PORT = 8080, 9090


@dataclass(frozen=True)
class Plan:
    """How big the demo is."""
    n_images: int
    size: int
    iters: int            # label-model iterations of the first version
    gan_seconds: float    # GAN training budget (0: no GAN, no synthetic tasks)
    n_synthetic: int
    n_annotated: int      # tasks that get ground-truth annotations (the first of them with nuclei left out)
    retrain_iters: int    # TESSERA_TRAIN_ITERS of `tessera serve` (runs started from Label Studio)
    synth_min_iou: float | None = None   # self-consistency filter; None = TESSERA_SYNTH_MIN_IOU


FULL = Plan(n_images=40, size=256, iters=300, gan_seconds=60, n_synthetic=6, n_annotated=6, retrain_iters=200)
# a 15 s GAN cannot fool the label model yet: the quick (CI) demo shows the upload path with the filter off
QUICK = Plan(n_images=12, size=128, iters=60, gan_seconds=15, n_synthetic=3, n_annotated=3, retrain_iters=60,
             synth_min_iou=0.0)


def plan_for(quick: bool) -> Plan:
    plan = QUICK if quick else FULL
    env = Settings.from_env()
    if env.demo_iters:
        plan = dataclasses.replace(plan, iters=env.demo_iters)
    if env.demo_gan_s is not None:
        plan = dataclasses.replace(plan, gan_seconds=env.demo_gan_s)
    return plan


# ---------------------------------------------------------------------------------------------- output

class Console:
    """Step lines with the time since start; a progress line that redraws on a terminal."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.tty = sys.stdout.isatty()
        self._last_print = 0.0
        self._lock = threading.Lock()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def step(self, msg: str) -> None:
        with self._lock:
            print(f"[{self.elapsed():5.0f}s] {msg}", flush=True)

    def progress(self, what: str) -> TqdmProgress:
        """A tqdm bar per phase for a progress-dict callback ({"phase", "iter", "max_iters", "loss", "eta_s"});
        off a terminal it redraws every 15 s at most."""
        return TqdmProgress(f"[{self.elapsed():5.0f}s]   {what}:", mininterval=0.2 if self.tty else 15.0,
                            file=sys.stdout, leave=True, ncols=100)


# --------------------------------------------------------------------------------------------- helpers

def _pick_port(preferred: int) -> int:
    from tessera.backend.lsserver import free_port, port_in_use

    # LS moves to port+1 when its port is busy, so the next one must be free too
    return preferred if not (port_in_use(preferred) or port_in_use(preferred + 1)) else free_port()


class Background:
    """Run fn() in a daemon thread; result() re-raises its exception in the caller."""

    def __init__(self, fn: Callable[[], Any]):
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self._error = e

    def result(self) -> Any:
        while self._thread.is_alive():
            self._thread.join(0.2)       # short joins keep Ctrl-C working
        if self._error is not None:
            raise self._error
        return self._result


class TesseraServer:
    """`tessera serve` as a subprocess in its own process group, log kept in the data dir."""

    def __init__(self, port: int, env: dict[str, str], log_path: Path):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        exe = Path(sys.executable).with_name("tessera")
        cmd = [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)] if exe.exists() else \
              [sys.executable, "-m", "tessera.backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        with open(log_path, "ab") as log:
            log.write(f"\n==== tessera demo: {' '.join(cmd)} ====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_up(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tessera serve exited with code {self.proc.returncode}; log {self.log_path}:\n"
                                   f"{_tail(self.log_path)}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"tessera serve did not answer on {self.url} in {timeout:.0f} s; log {self.log_path}")

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"<no log: {e}>"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.chmod(tmp, 0o600)            # holds the demo's password and token
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- data + model

def write_images(images_dir: Path, plan: Plan) -> list:
    """The demo's samples (seeded, so every run makes the same ones); PNGs written where missing."""
    from PIL import Image

    from tessera.model.data import make_nuclei

    samples = make_nuclei(plan.n_images, size=plan.size, seed=DATA_SEED)
    images_dir.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(samples):
        path = images_dir / f"nuclei_{i:03d}.png"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            Image.fromarray(s.image).save(tmp, format="PNG")
            os.replace(tmp, path)
    return samples


def image_paths(images_dir: Path, plan: Plan) -> list[Path]:
    return [images_dir / f"nuclei_{i:03d}.png" for i in range(plan.n_images)]


def train_label_model(settings: Settings, key: str, samples: list, plan: Plan, console: Console) -> dict:
    """The first version, trained on the demo images' exact labels (20% held back for validation)."""
    from tessera.backend.training import _train_and_register
    from tessera.model.data import split_ids

    train_ids, val_ids = split_ids([s.id for s in samples], 0.2)
    by_id = {s.id: s for s in samples}
    return _train_and_register(settings, key, [by_id[i] for i in train_ids], [by_id[i] for i in val_ids],
                               [LABEL], "demo: procedural nuclei", plan.iters, console.progress("label model"))


def train_gan(settings: Settings, key: str, samples: list, plan: Plan, console: Console) -> str:
    """The mask GAN for synthetic tasks, trained for plan.gan_seconds and registered as the current "gan"."""
    from tessera.backend.store import Store
    from tessera.model.train_maskgan import GANTrainConfig, train

    store = Store(settings.model_dir)
    registry, work = store.registry(key), store.work_dir(key)
    work.mkdir(parents=True, exist_ok=True)
    cfg = GANTrainConfig(max_iters=100_000, time_budget_s=plan.gan_seconds, device=settings.device,
                         log_interval=50)
    t0 = time.monotonic()
    ckpt = train(cfg, samples, [LABEL], work / "gan.pt", progress=_gan_progress(console, plan.gan_seconds, t0))
    info = registry.add(ckpt, {"label_names": [LABEL], "n_train": len(samples),
                               "train_wall_s": round(time.monotonic() - t0, 1)},
                        promote=True, reason=f"demo: procedural nuclei, {plan.gan_seconds:.0f} s budget", kind="gan")
    shutil.rmtree(work, ignore_errors=True)
    return info.version


def _gan_progress(console: Console, budget: float, t0: float) -> Callable[[dict], None]:
    show = console.progress("mask GAN")

    def progress(info: dict) -> None:  # the GAN stops on time: show seconds, not iterations
        spent = time.monotonic() - t0
        show({**info, "iter": int(min(spent, budget)), "max_iters": int(budget),
              "eta_s": max(budget - spent, 0.0), "phase": info.get("phase", "") + (" (s)" if info.get("phase")
                                                                                   != "done" else "")})
    return progress


def move_store(settings: Settings, src_model_dir: Path, dst_key: str) -> None:
    """Move the staging store (trained before the project existed) to the project's store."""
    from tessera.backend.store import BEFORE_PROJECT_KEY, Store

    src = Store(src_model_dir).registry(BEFORE_PROJECT_KEY).root
    dst = Store(settings.model_dir).registry(dst_key).root
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(src / ".work", ignore_errors=True)
    os.replace(src, dst)


def ground_truth_annotation(sample, drop_half: bool) -> list[dict]:
    """A brush annotation of every nucleus (or of every other one, to be found as a suspect label)."""
    from tessera.backend.label_config import parse_label_config
    from tessera.backend.regions import instances_to_results

    control = next(c for c in parse_label_config(LABEL_CONFIG).controls if c.type == "brushlabels")
    ids = [int(k) for k in np.unique(sample.instances) if k != 0]
    if drop_half:
        ids = ids[::2]
    results = instances_to_results(sample.instances, {k: LABEL for k in ids}, {}, control, id_prefix="gt-")
    for r in results:
        r.pop("score", None)
    return results


# -------------------------------------------------------------------------------------- Label Studio side

def find_project(ls: LabelStudio, title: str):
    """The oldest project titled `title` (the SDK's model), or None."""
    rows = [p for p in ls.projects.list(title=title, page_size=1000).items if p.title == title]   # one page
    return min(rows, key=lambda p: p.id) if rows else None


def task_stats(ls: LabelStudio, project: int) -> dict:
    """Counts over the project's tasks (all fields)."""
    tasks = list(lsclient.tasks(ls, project))
    preds = [t for t in tasks if t.get("predictions")]
    return {"tasks": len(tasks), "annotated": sum(1 for t in tasks if t.get("annotations")),
            "synthetic": [t["id"] for t in tasks if (t.get("meta") or {}).get("synthetic")],
            "with_prediction": len(preds),
            "model_versions": sorted({p.get("model_version") or "" for t in tasks for p in t.get("predictions") or []}),
            "ids": [t["id"] for t in tasks]}


def connect_backend(ls: LabelStudio, project: int, url: str):
    """The project's ML backend at `url` (interactive); a stale one (other port) is replaced."""
    for ml in ls.ml.list(project=project):
        if (ml.url or "").rstrip("/") == url:
            return ml
        ls.ml.delete(ml.id)
        for hook in ls.webhooks.list(project=str(project)):
            if (hook.url or "").startswith((ml.url or "").rstrip("/") + "/"):
                ls.webhooks.delete(hook.id)
    return ls.ml.create(project=project, url=url, title="Tessera", is_interactive=True)


def _follow_served_version(settings: Settings, pid: int) -> None:
    """Name the connection after the served version now (tessera serve also does it on /setup), so that
    "Prediction score" sorts by the predictions retrieved next."""
    from tessera.backend.predictions import ModelCache

    version = ModelCache(settings).version(str(pid))
    try:
        lsclient.follow_version(lsclient.from_settings(settings), pid, version)
    except Exception as e:  # the demo goes on; /setup retries
        logging.getLogger(__name__).warning("could not name the connection %s: %s", version, e)


RESTARTS = 3                # tessera serve restarts within RESTART_WINDOW_S before the demo gives up on it
RESTART_WINDOW_S = 120.0


def _keep_serving(ls_server, backends: list["TesseraServer"], env: dict[str, str], log_path: Path) -> None:
    """Wait while Label Studio runs; restart `tessera serve` (backends[-1]) in place (same port, same model
    store) when it dies, appending the new one to `backends`. After RESTARTS deaths in RESTART_WINDOW_S,
    print the one command that starts it and keep Label Studio up. Returns when Label Studio stops."""
    tessera: TesseraServer | None = backends[-1]
    deaths: list[float] = []
    while ls_server.running:
        time.sleep(1)
        if tessera is None or tessera.running:
            continue
        now = time.monotonic()
        deaths = [t for t in deaths if now - t < RESTART_WINDOW_S] + [now]
        print(f"\ntessera serve stopped (exit code {tessera.proc.returncode}); last lines of {log_path}:\n"
              f"{_tail(log_path, 10)}", file=sys.stderr, flush=True)
        if len(deaths) > RESTARTS:
            keys = ("MODEL_DIR", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "TESSERA_MISLABELING_COLUMN")
            exe = Path(sys.executable).with_name("tessera")
            print(f"it stopped {len(deaths)} times in {RESTART_WINDOW_S:.0f} s: not restarting. Label Studio stays "
                  "up; start the backend yourself with\n  " + " ".join(f"{k}={env[k]}" for k in keys if env.get(k))
                  + f" {exe} serve --host 127.0.0.1 --port {tessera.port}", file=sys.stderr, flush=True)
            tessera = None
            continue
        try:
            tessera = TesseraServer(tessera.port, env, log_path)
            backends.append(tessera)
            tessera.wait_up()
            print(f"tessera serve restarted at {tessera.url} (Label Studio kept running)", flush=True)
        except RuntimeError as e:
            print(f"tessera serve did not come back: {e}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- main

@dataclass
class DemoRun:
    """What the demo's steps share: where things live, what the last run left, what this run did."""
    plan: Plan
    console: Console
    settings: Settings
    data_dir: Path
    previous: dict
    summary: dict
    threads: int
    backends: list = dataclasses.field(default_factory=list)    # tessera serve and any restart of it
    starting: list = dataclasses.field(default_factory=list)    # Label Studio servers being started
    ls_server: Any = None

    @property
    def timings(self) -> dict:
        return self.summary["timings"]

    def path(self, name: str) -> Path:
        return self.data_dir / {"ls": "ls", "models": "models", "images": "images", "staging": "models-staging",
                                "state": "demo.json", "log": "tessera.log"}[name]

    def save(self) -> None:
        _write_json(self.path("state"), self.summary)


def start_label_studio(run: DemoRun) -> Background:
    """Label Studio in the background (template build ~30-70 s once, then ~10 s from a copy)."""
    from tessera.backend.lsserver import LabelStudioServer, build_template, default_ls_venv

    ls_dir, ls_port = run.path("ls"), _pick_port(LS_PORT)
    fresh = not (ls_dir / "label_studio.sqlite3").exists()
    run.console.step(f"starting Label Studio on port {ls_port} ({'new data dir ' if fresh else 'reusing '}{ls_dir})")

    def start() -> LabelStudioServer:
        t0 = time.monotonic()
        template = build_template(default_ls_venv())
        run.timings["ls_template_s"] = round(time.monotonic() - t0, 1)
        server = LabelStudioServer(default_ls_venv(), ls_dir, port=ls_port, template=template)
        run.starting.append(server)      # so that Ctrl-C during training still stops it
        server.start(timeout=300)
        run.timings["ls_ready_s"] = round(run.console.elapsed(), 1)
        run.console.step(f"Label Studio is up at {server.url} (template ready in {run.timings['ls_template_s']} s, "
                         f"started in {server.start_seconds:.0f} s)")
        return server
    return Background(start)


def stage_first_model(run: DemoRun, samples: list) -> dict:
    """Unless the last run's project already has a model, train the first version into a staging store
    while Label Studio starts (the project id is not known yet)."""
    from tessera.backend.store import BEFORE_PROJECT_KEY, Store

    prev_pid = str((run.previous.get("project") or {}).get("id") or "")
    if prev_pid and Store(run.settings.model_dir).registry(prev_pid).current("label") is not None:
        run.console.step(f"project {prev_pid} of the last run has a model: no training while Label Studio starts")
        return {}
    shutil.rmtree(run.path("staging"), ignore_errors=True)
    staging = run.settings.replace(model_dir=run.path("staging"))
    return _train_models(staging, BEFORE_PROJECT_KEY, samples, run.plan, run.plan.gan_seconds > 0, run.console, run.timings)


def open_project(run: DemoRun, ls: LabelStudio) -> tuple[int, bool]:
    """The demo project, found by title or created -> (id, created); remembered in demo.json at once."""
    project = find_project(ls, TITLE)
    created = project is None
    if created:
        project = ls.projects.create(title=TITLE, label_config=LABEL_CONFIG, description=DESCRIPTION,
                                     show_collab_predictions=True, request_options={"additional_body_parameters": {
                                         "start_training_on_annotation_update": True}})  # Settings > Model toggle
    pid = int(project.id)
    run.console.step(f"project {pid} {TITLE!r} {'created' if created else 'found (reused)'}")
    # a run interrupted from here on is resumed without training again
    run.summary.update({"project": {"id": pid, "title": TITLE, "created": created},
                        "suspect_task": run.previous.get("suspect_task")})
    run.save()
    return pid, created


def place_models(run: DemoRun, pid: int, samples: list, staged: dict) -> bool:
    """The project's store gets the staged first version (or trains one now); returns whether it trained."""
    from tessera.backend.store import Store

    registry = Store(run.settings.model_dir).registry(str(pid))
    trained = False
    if registry.current("label") is None:
        if staged:
            move_store(run.settings, run.path("staging"), str(pid))
        else:  # e.g. the project was deleted or demo.json lost: train now
            _train_models(run.settings, str(pid), samples, run.plan, run.plan.gan_seconds > 0, run.console,
                          run.timings)
        trained = True
    else:
        run.console.step(f"model: project {pid} already serves {registry.current('label').version} (training "
                         "skipped)")
    shutil.rmtree(run.path("staging"), ignore_errors=True)
    if run.plan.gan_seconds > 0 and registry.current("gan") is None:
        _train_models(run.settings, str(pid), samples, run.plan, True, run.console, run.timings, label=False)
    return trained


def fill_project(run: DemoRun, ls: LabelStudio, pid: int, samples: list) -> dict:
    """Upload the images as tasks and annotate a few, unless the project has tasks; returns task_stats."""
    stats = task_stats(ls, pid)
    if stats["tasks"]:
        run.console.step(f"project has {stats['tasks']} tasks ({stats['annotated']} annotated): nothing uploaded")
        return stats
    t0 = time.monotonic()
    paths = image_paths(run.path("images"), run.plan)
    task_ids = lsclient.upload_images(ls, pid, [(p.name, p.read_bytes()) for p in paths])
    run.timings["upload_s"] = round(time.monotonic() - t0, 1)
    run.console.step(f"uploaded {len(task_ids)} images as tasks")
    if run.plan.n_annotated and task_ids:
        # the LAST tasks get ground truth (the first task stays unannotated: it shows predictions)
        chosen = list(range(len(task_ids)))[-run.plan.n_annotated:]
        for n, i in enumerate(chosen):
            ls.annotations.create(task_ids[i], result=ground_truth_annotation(samples[i], drop_half=(n == 0)))
        run.summary["suspect_task"] = task_ids[chosen[0]]
        run.save()
        run.console.step(f"{len(chosen)} tasks annotated with their exact labels; task {task_ids[chosen[0]]} "
                         "has half its nuclei left out on purpose (a suspect label to find)")
    return stats


def start_tessera(run: DemoRun, ls: LabelStudio, pid: int) -> tuple[TesseraServer, Any, dict]:
    """`tessera serve`, connected as the project's interactive ML backend -> (server, ML backend, its env)."""
    server = run.ls_server
    env = {**os.environ, "MODEL_DIR": str(run.path("models")), "LABEL_STUDIO_URL": server.url,
           "LABEL_STUDIO_API_KEY": server.token, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TESSERA_TRAIN_ITERS", str(run.plan.retrain_iters))
    env.setdefault("TESSERA_MISLABELING_COLUMN", "true")    # the demo's step 6 sorts by that column
    env.setdefault("OMP_NUM_THREADS", str(run.threads))
    t0 = time.monotonic()
    tessera = TesseraServer(_pick_port(TESSERA_PORT), env, run.path("log"))
    run.backends.append(tessera)
    atexit.register(tessera.stop)
    tessera.wait_up()
    ml = connect_backend(ls, pid, tessera.url)
    run.timings["tessera_up_s"] = round(time.monotonic() - t0, 1)
    run.console.step(f"tessera serve is up at {tessera.url} and connected (ML backend {ml.id}, "
                     f"state {ml.state}); log {run.path('log')}")
    _follow_served_version(run.settings, pid)
    return tessera, ml, env


def retrieve_predictions(run: DemoRun, ls: LabelStudio, pid: int) -> tuple[dict, str]:
    """Predictions for every task (one batched /predict, as the Data Manager action does) -> (task_stats,
    the served version)."""
    from tessera.backend.store import Store, version_string

    t0 = time.monotonic()
    run.console.step("retrieving predictions for all tasks (Data Manager > Retrieve predictions)...")
    ls.actions.create(id="retrieve_tasks_predictions", project=pid, selected_items={"all": True, "excluded": []},
                      request_options={"timeout_in_seconds": 300})
    run.timings["predict_s"] = round(time.monotonic() - t0, 1)
    stats = task_stats(ls, pid)
    current = Store(run.settings.model_dir).registry(str(pid)).current("label")
    version = version_string(str(pid), current.version) if current else ""
    run.console.step(f"{stats['with_prediction']}/{stats['tasks']} tasks have predictions "
                     f"(model version {version}) in {run.timings['predict_s']} s")
    return stats, version


def ready_summary(run: DemoRun, pid: int, created: bool, trained: bool, ml: Any, stats: dict, version: str) -> None:
    """What the run made, in demo.json (written by the caller) and on screen."""
    from tessera.backend.store import Store

    ls_server, tessera = run.ls_server, run.backends[-1]
    registry = Store(run.settings.model_dir).registry(str(pid))
    current = registry.current("label")
    run.timings["total_s"] = round(run.console.elapsed(), 1)
    ls_url = f"http://localhost:{ls_server.port}"
    run.summary.update({
        "ready": True,
        "label_studio": {"url": ls_url, "api_url": ls_server.url, "port": ls_server.port,
                         "username": ls_server.username, "password": ls_server.password,
                         "token": ls_server.token, "data_dir": str(run.path("ls")), "log": str(ls_server.log_path)},
        "tessera": {"url": tessera.url, "port": tessera.port, "model_dir": str(run.path("models")),
                    "log": str(run.path("log"))},
        "project": {"id": pid, "title": TITLE, "created": created, "ml_backend": ml.id,
                    "url": f"{ls_url}/projects/{pid}/data", "tasks": stats["tasks"],
                    "annotated": stats["annotated"], "synthetic": len(stats["synthetic"]),
                    "with_prediction": stats["with_prediction"], "model_versions": stats["model_versions"],
                    "first_task": min(stats["ids"]) if stats["ids"] else None},
        "model": {"version": version, "trained": trained, "versions": len(registry.versions("label")),
                  "val_iou": (current.metrics.get("val_iou") if current else None),
                  "gan": (registry.current("gan").version if registry.current("gan") else None)},
    })
    run.save()
    _print_ready(run.summary, run.settings)


def run_steps(run: DemoRun) -> int:
    """The demo's steps in order; returns the exit code (waits while Label Studio runs unless --no-wait)."""
    ls_job = start_label_studio(run)
    samples = write_images(run.path("images"), run.plan)
    run.console.step(f"{len(samples)} demo images ({run.plan.size}x{run.plan.size}, procedural nuclei) in "
                     f"{run.path('images')}")
    staged = stage_first_model(run, samples)
    run.ls_server = ls_job.result()
    ls = lsclient.connect(run.ls_server.url, run.ls_server.token, timeout=120)
    run.settings = run.settings.replace(label_studio_url=run.ls_server.url, label_studio_api_key=run.ls_server.token)
    pid, created = open_project(run, ls)
    trained = place_models(run, pid, samples, staged)
    stats = fill_project(run, ls, pid, samples)
    _, ml, env = start_tessera(run, ls, pid)
    run.summary["synthetic"] = _synthetic(run.settings, pid, run.plan, stats, run.console, run.timings)
    stats, version = retrieve_predictions(run, ls, pid)
    ready_summary(run, pid, created, trained, ml, stats, version)
    if run.summary["no_wait"]:
        return 0
    _keep_serving(run.ls_server, run.backends, env, run.path("log"))
    print(f"\nLabel Studio stopped unexpectedly; see {run.ls_server.log_path}:\n{_tail(Path(run.ls_server.log_path))}",
          file=sys.stderr)
    return 1


def _new_run(args) -> DemoRun:
    plan = plan_for(bool(getattr(args, "quick", False)))
    data_dir = Path(getattr(args, "data_dir", None) or ".demo").expanduser().absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    state_file = data_dir / "demo.json"
    try:
        previous = json.loads(state_file.read_text()) if state_file.exists() else {}
    except ValueError:
        previous = {}
    summary: dict[str, Any] = {"ready": False, "running": True, "pid": os.getpid(), "quick": bool(args.quick),
                               "no_wait": bool(getattr(args, "no_wait", False)),
                               "data_dir": str(data_dir), "plan": dataclasses.asdict(plan), "timings": {}}
    # one torch thread per process: Label Studio, its init and the browser share the cores
    # (two torch threads on a busy 2-core machine run ~5x slower than one)
    threads = 1 if (os.cpu_count() or 1) <= 2 else min(4, (os.cpu_count() or 2) // 2)
    settings = Settings.from_env().replace(model_dir=data_dir / "models")
    return DemoRun(plan, Console(), settings, data_dir, previous, summary, threads)


def run_demo(args) -> int:
    """`tessera demo`: see the module docstring. Returns the process exit code."""
    from tessera.backend.lsserver import LabelStudioError

    if logging.getLogger().level >= logging.INFO:   # the demo shows its own progress lines
        for name in ("tessera.model", "tessera.backend.training"):
            logging.getLogger(name).setLevel(logging.WARNING)
    run = _new_run(args)
    lock = contextlib.ExitStack()               # held until this function returns
    try:
        lock.enter_context(file_lock(run.data_dir / ".demo.lock", blocking=False))
    except OSError:
        print(f"tessera demo: another demo is running on {run.data_dir}; stop it first (Ctrl-C in its terminal)",
              file=sys.stderr)
        return 1

    def on_term(signum, frame):  # SIGTERM ends the demo like Ctrl-C
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    import torch

    torch.set_num_threads(run.threads)
    try:
        return run_steps(run)
    except KeyboardInterrupt:
        print(f"\nstopping Label Studio and Tessera (data kept in {run.data_dir})...", flush=True)
        return 130
    except LabelStudioError as e:
        print(f"tessera demo: Label Studio failed: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:             # tessera serve did not start, an LS API call failed, ...
        print(f"tessera demo: {e}", file=sys.stderr)
        return 1
    finally:
        _shut_down(run, old_term)
        lock.close()


def _shut_down(run: DemoRun, old_term) -> None:
    if threading.current_thread() is threading.main_thread():   # a second Ctrl-C must not cut this short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for server in (*run.backends, run.ls_server, *run.starting):
        if server is not None:
            server.stop()
    if run.summary.get("project"):          # demo.json was written by this run: it is over now
        run.summary["running"] = False
        run.save()
    if old_term is not None:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _train_models(settings: Settings, key: str, samples: list, plan: Plan, gan: bool, console: Console,
                  timings: dict, label: bool = True) -> dict:
    out: dict[str, Any] = {}
    if label:
        console.step(f"training the label model: {plan.iters} iterations on {len(samples)} images "
                     f"(dominates the demo's start; TESSERA_DEMO_ITERS changes it)")
        t0 = time.monotonic()
        result = train_label_model(settings, key, samples, plan, console)
        timings["train_s"] = round(time.monotonic() - t0, 1)
        iou = (result.get("metrics") or {}).get("val_iou")
        console.step(f"label model {result['status']} in {timings['train_s']} s"
                     + (f" (held-back IoU {iou:.3f})" if iou is not None else ""))
        if result["status"] != "promoted":
            raise RuntimeError(f"the demo's first model version was not promoted: {result}")
        out["label"] = result
    if gan:
        console.step(f"training the mask GAN for {plan.gan_seconds:.0f} s (for synthetic tasks; "
                     "TESSERA_DEMO_GAN_S changes it, 0 skips)")
        t0 = time.monotonic()
        out["gan"] = train_gan(settings, key, samples, plan, console)
        timings["gan_s"] = round(time.monotonic() - t0, 1)
    return out


def _synthetic(settings: Settings, pid: int, plan: Plan, stats: dict, console: Console, timings: dict) -> dict:
    if stats["synthetic"]:
        console.step(f"synthetic tasks: {len(stats['synthetic'])} already in the project (none added)")
        return {"status": "kept", "task_ids": stats["synthetic"]}
    if plan.gan_seconds <= 0:
        msg = "skipped: TESSERA_DEMO_GAN_S=0 (no GAN trained)"
        console.step(f"synthetic tasks: {msg}")
        return {"status": "skipped", "reason": msg}
    from tessera.backend.synthetic_tasks import generate_into_project

    if plan.synth_min_iou is not None:
        settings = settings.replace(synth_min_iou=plan.synth_min_iou)
        console.step(f"synthetic tasks: quick mode keeps images the label model agrees with at IoU >= "
                     f"{plan.synth_min_iou} (TESSERA_SYNTH_MIN_IOU is {Settings.from_env().synth_min_iou})")
    t0 = time.monotonic()
    try:
        result = generate_into_project(settings, str(pid), count=plan.n_synthetic, seed=DATA_SEED)
    except Exception as e:  # noqa: BLE001 - the demo goes on without synthetic tasks, and says why
        msg = f"skipped: generating failed: {type(e).__name__}: {e}"
        console.step(f"synthetic tasks: {msg}")
        return {"status": "skipped", "reason": msg}
    timings["synthetic_s"] = round(time.monotonic() - t0, 1)
    ids = [c["task"] for c in result.get("created") or []]
    if not ids:
        msg = f"skipped: the generator made no task the label model agrees with ({json.dumps(result)[:300]})"
        console.step(f"synthetic tasks: {msg}")
        return {"status": "skipped", "reason": msg, "result": result}
    console.step(f"synthetic tasks: {len(ids)} {result.get('kind', 'generated')} images uploaded with their labels "
                 f"as prediction (meta.synthetic = true) in {timings['synthetic_s']} s")
    return {"status": "created", "task_ids": ids, "result": result}


def _print_ready(summary: dict, settings: Settings) -> None:
    ls, tess, project = summary["label_studio"], summary["tessera"], summary["project"]
    pid, first = project["id"], project.get("first_task")
    synth = summary.get("synthetic") or {}
    suspect = summary.get("suspect_task")
    lines = [
        "",
        f"Tessera demo is ready ({summary['timings']['total_s']:.0f} s).",
        "",
        f"  Label Studio   {project['url']}",
        f"  login          {ls['username']}  /  {ls['password']}",
        f"  legacy token   {ls['token']}",
        f"  Tessera        {tess['url']}   (training status: {tess['url']}/status?project={pid})",
        f"  data           {summary['data_dir']}  (kept when you stop; the next run reuses it)",
        "",
        "Try:",
        f"  1. Open a task (e.g. {ls['url']}/projects/{pid}/data?task={first}): Tessera's predictions are",
        "     shown, one brush mask, polygon and box per nucleus, each with a score.",
        "  2. Fix a prediction or draw your own regions and press Submit. With 'Start model training on",
        "     annotation submission' on (Settings > Model; the demo turns it on) every annotation schedules a",
        "     (debounced) training run.",
        f"  3. Settings > Model > Start training, then watch  curl '{tess['url']}/status?project={pid}'",
        "     (phase, progress, ETA). A new version is served unless it scores worse than the current one by",
        "     more than 0.01 on the held-back tasks people made or changed; `tessera versions --project N`",
        "     lists them and what each decision rests on (with MODEL_DIR set to the data dir's models/).",
        "  4. Data Manager: sort by 'Prediction score' ascending: the most uncertain tasks come first.",
        "  5. Interactive refinement: in the labelling view turn on 'Auto-Annotation', pick the smart brush",
        "     and draw a rough stroke over one nucleus (or drag a smart box, or click one with the keypoint",
        "     tool): it comes back as a clean region.",
        "  6. Suspect labels: after a training run, add the 'tessera_mislabeling' column in the Data Manager",
        "     and sort descending" + (f"; task {suspect} (half its nuclei left unlabelled on purpose)"
                                      " should come first." if suspect else "."),
    ]
    if synth.get("status") in ("created", "kept"):
        lines.append(f"  7. Synthetic tasks {synth.get('task_ids')}: generated images with their layout as "
                     "prediction (task meta.synthetic = true); accept or fix them like any task.")
    else:
        lines.append(f"  (synthetic tasks {synth.get('reason', 'skipped')})")
    lines += ["", "--no-wait: stopping both servers now (data kept)." if summary.get("no_wait") else
              "Ctrl-C stops both servers (data kept). If tessera serve stops, the demo restarts it in place."]
    print("\n".join(lines), flush=True)
