"""Learning inside Label Studio, end to end: a real Label Studio 1.23.2, `tessera serve` (waitress) and
`tessera worker` as separate processes, a real redis-server for the RQ path.

One project is annotated from procedural ground truth and walks through the loop in order (the tests of
a section share it): annotations -> webhook -> run -> promoted version served and predicted; Start
training; a burst of annotations -> one run (+ the GAN); a run on corrupted annotations is rejected; LS
unreachable -> a failed run; a failing save -> the old version intact. A second project goes through RQ:
a worker trains, the HTTP process serves; the worker is killed with -9 mid-training and the next event
retries. Runs are tiny (TRAIN_ITERS 24, 96x128 images, one torch thread).
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tessera.backend import lsclient
from tessera.backend.label_config import parse_label_config
from tessera.backend.regions import instances_to_results, mask_to_rle
from tessera.backend.dataset import previous_held_back, split_tasks
from tests.test_e2e_ls import dm_sorted_by_score
from tessera.model.data import make_nuclei
from tests.conftest import CONFIG_ALL, TesseraProcess, free_port
from tests.conftest_ls import (connected_project, predictions, retrieve_predictions, set_train_on_annotation,
                               upload_samples, wait_for)

pytestmark = pytest.mark.e2e

ITERS = 24
SIZE = (96, 128)
N_TASKS = 14
GAN_MIN = 11            # the burst test brings the project to 11 annotated tasks: the GAN joins there
CONTROLS = {c.type: c for c in parse_label_config(CONFIG_ALL).controls}


def _env(ls_server, model_dir: Path, **extra: str) -> dict:
    return {"MODEL_DIR": str(model_dir), "LABEL_STUDIO_URL": ls_server.url, "LABEL_STUDIO_API_KEY": ls_server.token,
            "TESSERA_DEBOUNCE_S": "2", "TESSERA_MIN_ANNOTATIONS": "4", "TESSERA_TRAIN_ITERS": str(ITERS),
            "TESSERA_GAN_MIN_ANNOTATIONS": str(GAN_MIN), "TESSERA_DEVICE": "cpu", "TESSERA_LOG_LEVEL": "INFO",
            "TESSERA_FIRST_TRAIN_BUDGET_S": "0",       # the first version trains ITERS too, not until a plateau
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TESSERA_FETCH_THREADS": "4", **extra}


def gt_results(sample, kinds: tuple[str, ...] = ("brushlabels",)) -> list[dict]:
    """Ground truth of a procedural sample as LS annotation results (one region per nucleus and kind)."""
    ids = [int(i) for i in np.unique(sample.instances) if i]
    out = []
    for kind in kinds:
        out += instances_to_results(sample.instances, {k: "Nucleus" for k in ids}, {}, CONTROLS[kind])
    for r in out:
        r.pop("score", None)
    return out


def inverted_results(sample) -> list[dict]:
    """A deliberately wrong annotation: one brush region over everything that is NOT a nucleus."""
    h, w = sample.instances.shape
    c = CONTROLS["brushlabels"]
    return [{"id": "bad", "from_name": c.from_name, "to_name": c.to_name, "type": "brushlabels",
             "original_width": w, "original_height": h, "image_rotation": 0,
             "value": {"format": "rle", "rle": mask_to_rle(sample.instances == 0), "brushlabels": ["Nucleus"]}}]


def job(url: str, pid: int) -> dict:
    return httpx.get(f"{url}/status", params={"project": pid}, timeout=10).json()["job"]


def setup_version(url: str, pid: int) -> str:
    return httpx.post(f"{url}/setup", json={"project": f"{pid}.0", "schema": CONFIG_ALL},
                      timeout=10).json()["model_version"]



def wait_result(url: str, pid: int, statuses: tuple[str, ...], timeout: float = 240.0) -> dict:
    """Wait until the project's last finished run ended with one of `statuses` (a failed run fails)."""
    def ready():
        st = job(url, pid)
        assert st["state"] != "failed", st
        done = st["state"] == "done" and not st["pending"] and st["last_result"]
        return st if done and st["last_result"].get("status") in statuses else None
    return wait_for(ready, timeout, f"a run of project {pid} ending {statuses}")


def wait_runs(url: str, pid: int, runs: int, timeout: float = 150.0) -> dict:
    """Wait until the project has finished `runs` runs and nothing is scheduled or running."""
    def ready():
        st = job(url, pid)
        return st if st["runs"] >= runs and st["state"] in ("done", "failed", "idle") and not st["pending"] else None
    return wait_for(ready, timeout, f"project {pid} to finish run {runs}")


# ---------------------------------------------------------------------------------- in-process runner

@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("learning-models")


@pytest.fixture(scope="module")
def tessera(ls_server, models, tmp_path_factory):
    """`tessera serve` with the in-process job runner, an empty model store, tiny runs."""
    proc = TesseraProcess(_env(ls_server, models), tmp_path_factory.mktemp("serve") / "tessera.log")
    try:
        yield proc.wait_up()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def project(ls_server, tessera):
    """A project connected to `tessera`, with procedural images uploaded (none annotated yet)."""
    return connected_project(ls_server.client(), "tessera learning", CONFIG_ALL, tessera.url,
                             make_nuclei(N_TASKS, size=SIZE, seed=21))


def test_annotations_train_a_version_that_ls_predicts_with(project, tessera):
    api, pid, tasks, samples = project["api"], project["id"], project["tasks"], project["samples"]
    assert setup_version(tessera.url, pid) == "tessera-untrained"
    t0 = time.time()
    for i in range(6):        # two of them with the same nuclei also as polygons and boxes (an accepted prediction)
        types = ("brushlabels", "polygonlabels", "rectanglelabels") if i < 2 else ("brushlabels",)
        api.annotations.create(tasks[i], result=gt_results(samples[i], types))
    api.annotations.create(tasks[6], result=gt_results(samples[6]), was_cancelled=True)     # skipped by training
    st = wait_result(tessera.url, pid, ("promoted",))
    print(f"6 annotations -> promoted version in {time.time() - t0:.1f} s: {st['last_result']['metrics']}")
    result = st["last_result"]
    assert result["version"] == f"tessera-p{pid}-v0001" and result["reason"] == "first version"
    assert result["n_annotated_tasks"] == 6 and result["mislabeling_written"] == 6, result
    assert "ANNOTATION_CREATED" in st["reason"]
    assert setup_version(tessera.url, pid) == result["version"]

    # Retrieve predictions: every task gets exactly one prediction, of the new version; again: no duplicates
    retrieve_predictions(api, pid)
    for tid in tasks:
        preds = predictions(api, tid)
        assert [p["model_version"] for p in preds] == [result["version"]], (tid, preds)
    retrieve_predictions(api, pid)
    assert all(len(predictions(api, tid)) == 1 for tid in tasks)

    # the run named the LS connection after the version, so "Prediction score" sorts by its predictions
    assert api.projects.get(pid).model_version == result["version"]
    scores = {tid: predictions(api, tid)[0]["score"] for tid in tasks}
    listed = dm_sorted_by_score(api, pid)
    assert all(t["predictions_score"] is not None for t in listed), listed
    assert scores[listed[0]["id"]] == min(scores.values()), (listed[:3], scores)       # ties allowed
    # the score ranks by what a label adds (TESSERA_SORT=priority): the tasks people labelled, whose images
    # the version learned from, sort after every task still to label (the cancelled one included)
    labelled = set(tasks[:6])
    assert min(scores[t] for t in labelled) > max(scores[t] for t in tasks if t not in labelled), scores
    assert {t["id"] for t in listed[-6:]} == labelled, listed

    # progress reached the status route and the log: one line per progress step
    steps = [ln.split(f"project {pid}: ", 1)[1] for ln in tessera.log_text().splitlines() if f"project {pid}: " in ln]
    phases = {step.split()[0] for step in steps}
    assert {"fetch", "train", "eval", "register", "done"} <= phases, phases
    assert any(step.startswith(f"train 1/{ITERS} loss") for step in steps), steps[:12]
    assert not any(" loss 0.0000" in step for step in steps), steps       # no fake "loss 0" at the end
    assert "(code " in " ".join(steps)                 # the code loss is shown apart from the pixel loss


def test_start_training_with_nothing_new_says_so(project, tessera):
    pid = project["id"]
    before = job(tessera.url, pid)
    project["api"].ml.train(project["ml"])            # LS -> START_TRAINING webhook; no annotation changed
    st = wait_runs(tessera.url, pid, before["runs"] + 1)
    assert st["state"] == "done" and st["last_result"]["status"] == "skipped", st
    assert st["last_result"]["reason"].startswith(f"nothing new since tessera-p{pid}-v0001"), st["last_result"]


def test_annotations_do_not_train_when_the_ls_toggle_is_off(project, tessera):
    api, pid = project["api"], project["id"]
    set_train_on_annotation(api, pid, False)
    assert api.projects.get(pid).start_training_on_annotation_update is False
    before = job(tessera.url, pid)
    ann = next(a for a in api.annotations.list(project["tasks"][0]) if not a.was_cancelled)
    api.annotations.update(ann.id, result=gt_results(project["samples"][0]))   # brush only now
    time.sleep(4)                                      # twice the debounce
    after = job(tessera.url, pid)
    assert (after["events"], after["runs"], after["state"]) == (before["events"], before["runs"], before["state"])
    assert "webhook ANNOTATION_UPDATED" not in tessera.log_text()


def test_start_training_in_ls_runs(project, tessera):
    pid = project["id"]
    before = job(tessera.url, pid)
    project["api"].ml.train(project["ml"])            # LS -> START_TRAINING webhook (trains with the toggle off)
    seen = []                                          # what /status showed while the run ran

    def finished():
        st = job(tessera.url, pid)
        seen.append(st)
        return st if st["runs"] > before["runs"] and st["state"] in ("done", "failed") else None
    st = wait_for(finished, 150, "the START_TRAINING run")
    assert st["state"] == "done" and "START_TRAINING" in st["reason"], st
    training = [s for s in seen if s["state"] == "running" and s["phase"] in ("train", "eval")]
    assert any(0 < s["fraction"] <= 1 and s["loss"] is not None and s["eta_s"] is not None for s in training), \
        [(s["state"], s["phase"], s["fraction"]) for s in seen]
    assert st["last_result"]["status"] in ("promoted", "rejected"), st
    assert "vs served" in st["last_result"]["reason"]       # compared with the version it warm-started from
    metrics = st["last_result"]["metrics"]
    assert metrics["n_val_tasks"] >= 1 and 0 <= metrics["n_val_judged"] <= metrics["n_val_tasks"], metrics
    assert st["last_result"]["decision"] in ("compared", "thin evidence"), st["last_result"]
    # the annotation changed above (toggle off) is in this run's data: a second Start training has nothing new
    served = setup_version(tessera.url, pid)
    assert project["api"].projects.get(pid).model_version == served      # promoted or not, LS follows the served one
    set_train_on_annotation(project["api"], pid, True)


def test_burst_of_annotations_is_one_run_and_the_gan_joins(project, tessera, models):
    api, pid, tasks, samples = project["api"], project["id"], project["tasks"], project["samples"]
    before = job(tessera.url, pid)
    assert before["state"] == "done" and not before["pending"], before
    for i in range(7, 12):
        api.annotations.create(tasks[i], result=gt_results(samples[i]))
    st = wait_runs(tessera.url, pid, before["runs"] + 1, timeout=240)
    # with the toggle on, LS sends START_TRAINING for each annotation besides ANNOTATION_CREATED: one run
    assert st["runs"] == before["runs"] + 1 and st["events"] == before["events"] + 10, st
    assert sorted(st["reason"].split(", ")) == ["ANNOTATION_CREATED (5)", "START_TRAINING (5)"], st
    result = st["last_result"]
    assert result["n_annotated_tasks"] == 11, result
    gan = result["gan"]
    assert gan["status"] == "promoted", gan
    from tessera.model.registry import Registry
    assert Registry(models / f"project-{pid}").current("gan") is not None


def test_a_worse_run_is_rejected(project, tessera, models):
    from tessera.model.registry import Registry

    api, pid, samples = project["api"], project["id"], project["samples"]
    served = setup_version(tessera.url, pid)
    before = job(tessera.url, pid)
    annotated = {t["id"]: t for t in lsclient.tasks(api, pid) if any(not a["was_cancelled"] for a in t["annotations"])}
    # the held-back set the run will use: by hash of the task id, plus every task held back before
    train_ids, val_ids = split_tasks(sorted(str(t) for t in annotated),
                                     previous_held_back(Registry(models / f"project-{pid}")))
    assert val_ids and train_ids
    for tid in train_ids:                 # corrupt what the next run trains on; the held-back tasks stay true
        ann = next(a for a in annotated[int(tid)]["annotations"] if not a["was_cancelled"])
        bad = inverted_results(samples[project["tasks"].index(int(tid))])
        api.annotations.update(ann["id"], result=bad)
    st = wait_runs(tessera.url, pid, before["runs"] + 1, timeout=240)
    result = st["last_result"]
    print(f"corrupted run: val IoU {result['metrics'].get('val_iou')} vs served "
          f"{result['metrics'].get('current_val_iou')} -> {result['status']}")
    assert st["state"] == "done" and result["status"] == "rejected", st
    assert result["metrics"]["val_iou"] < result["metrics"]["current_val_iou"] - 0.01, result
    assert setup_version(tessera.url, pid) == served
    versions = httpx.get(f"{tessera.url}/versions", params={"project": pid}, timeout=10).json()
    listed = {v["version"]: v for v in versions["projects"][str(pid)]}
    assert listed[result["version"]]["status"] == "rejected" and "vs served" in listed[result["version"]]["reason"]
    assert listed[served]["status"] == "current"


def test_ls_unreachable_fails_clearly(ls_server, project, tessera, models, tmp_path):
    pid = project["id"]
    served = setup_version(tessera.url, pid)
    dead = f"http://127.0.0.1:{free_port()}"
    proc = TesseraProcess(_env(ls_server, models, LABEL_STUDIO_URL=dead, TESSERA_DEBOUNCE_S="0.2"),
                          tmp_path / "tessera-dead-ls.log").wait_up()
    try:
        r = httpx.post(f"{proc.url}/webhook", json={"action": "START_TRAINING", "project": {"id": pid}}, timeout=10)
        assert r.status_code == 201, r.text
        st = wait_runs(proc.url, pid, 1, timeout=60)
        assert st["state"] == "failed", st
        assert "LabelStudioUnavailable" in st["last_error"] and dead in st["last_error"], st["last_error"]
        assert "LABEL_STUDIO_URL" in st["last_error"], st["last_error"]
        assert setup_version(proc.url, pid) == served == setup_version(tessera.url, pid)
    finally:
        proc.stop()


def test_a_failing_save_keeps_the_served_version(ls_server, project, tessera, models, tmp_path, monkeypatch):
    """Through a whole run (in this process): the disk fills up while the new version is switched in."""
    import torch

    from tessera.backend import training
    from tessera.backend.settings import Settings
    from tessera.model import registry as registry_mod
    from tessera.model.inference import Predictor

    pid = project["id"]
    store = tmp_path / "models"
    shutil.copytree(models / f"project-{pid}", store / f"project-{pid}", ignore=shutil.ignore_patterns(".work"))
    reg = registry_mod.Registry(store / f"project-{pid}")
    current, versions = reg.current(), [v.version for v in reg.versions()]
    real_write = registry_mod._write_json

    def disk_full(path, data):
        if Path(path).name == "current.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(registry_mod, "_write_json", disk_full)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    settings = Settings(label_studio_url=ls_server.url, label_studio_api_key=ls_server.token, model_dir=store,
                        device="cpu", min_annotations=4, train_iters=ITERS, gan_min_annotations=10_000,
                        promote_tolerance=1.0)           # the new version would be promoted ...
    try:
        with pytest.raises(OSError, match="No space left"):
            training.train_project(str(pid), "test", settings=settings, force=True)   # its data: the rejected run's
    finally:
        torch.set_num_threads(threads)
    assert reg.current().version == current.version      # ... but the switch failed: nothing changed
    assert [v.version for v in reg.versions()] == versions
    assert Predictor.from_checkpoint(reg.path(current.version), device="cpu").label_names == ["Nucleus"]


def test_rollback_is_followed_in_ls_and_adds_no_duplicate_predictions(ls_server, project, tessera, models):
    from tessera.model.registry import Registry

    api, pid, tasks = project["api"], project["id"], project["tasks"]
    served = setup_version(tessera.url, pid)
    other = next(v.version for v in Registry(models / f"project-{pid}").versions("label")
                 if f"tessera-p{pid}-{v.version}" != served)
    env = {**os.environ, **_env(ls_server, models)}
    exe = str(Path(sys.executable).with_name("tessera"))
    for target in (other, served, other, served):      # away, back, and again: each version predicted once
        run = subprocess.run([exe, "rollback", target, "--project", str(pid)], env=env, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        version = setup_version(tessera.url, pid)
        assert version == f"tessera-p{pid}-{target.rsplit('-', 1)[-1]}"
        assert api.projects.get(pid).model_version == version          # "Prediction score" follows the rollback
        retrieve_predictions(api, pid)
        for tid in tasks:
            versions = [p["model_version"] for p in predictions(api, tid)]
            assert version in versions and len(versions) == len(set(versions)), (tid, versions)
        listed = dm_sorted_by_score(api, pid)
        assert all(t["predictions_score"] is not None for t in listed)


def test_accepting_predictions_as_they_are_still_gives_new_versions(ls_server, tessera):
    """A labeller who mostly accepts predictions (the annotation is the served model's output, started from
    its prediction) still gets a new version: the held-back tasks that are accepted predictions are not
    a person's judgement, so the decision does not rest on the served model scoring 1.0 on its own output."""
    p = connected_project(ls_server.client(), "tessera accepting", CONFIG_ALL, tessera.url,
                          make_nuclei(20, size=SIZE, seed=44))
    api, pid, tasks, samples = p["api"], p["id"], p["tasks"], p["samples"]
    for seed in range(45, 50):       # task ids depend on what the LS holds already: make sure two are held back
        if sum(split_tasks([str(t)])[1] != [] for t in tasks) >= 2:
            break
        more = make_nuclei(10, size=SIZE, seed=seed)
        tasks, samples = tasks + upload_samples(api, pid, [s.image for s in more], f"more{seed}"), samples + more
    _, val = split_tasks([str(t) for t in tasks])          # held back by a hash of the task id, from the start
    held = [i for i, t in enumerate(tasks) if str(t) in val]
    kept = [i for i, t in enumerate(tasks) if str(t) not in val]
    assert len(held) >= 2 and len(kept) >= 8, (held, kept)
    drawn, accepted = kept[:4] + held[:1], kept[4:8] + held[1:]   # a person drew 5; 5+ are accepted predictions
    for i in drawn:
        api.annotations.create(tasks[i], result=gt_results(samples[i]))
    first = wait_result(tessera.url, pid, ("promoted",))["last_result"]
    assert setup_version(tessera.url, pid) == first["version"]

    retrieve_predictions(api, pid)
    for i in accepted:                                     # "accept" in the editor: the prediction, unchanged
        pred = predictions(api, tasks[i])[0]
        assert pred["model_version"] == first["version"]
        api.annotations.create(tasks[i], result=pred["result"], parent_prediction=pred["id"])
    n = len(drawn) + len(accepted)

    def trained_on_all():
        st = job(tessera.url, pid)
        last = st["last_result"] or {}
        done = st["state"] in ("done", "failed") and not st["pending"]
        return st if done and last.get("n_annotated_tasks") == n else None
    st = wait_for(trained_on_all, 240, f"a run of project {pid} on all {n} annotated tasks")
    result, metrics = st["last_result"], st["last_result"]["metrics"]
    print(f"accepted predictions: {result['status']} ({result['decision']}): {result['reason']}")
    assert metrics["n_val_tasks"] == len(held[:1]) + len(held[1:]), metrics
    assert metrics["n_val_judged"] == 1, metrics           # only the drawn held-back task is a person's
    assert result["decision"] == "thin evidence" and result["status"] == "promoted", result
    assert setup_version(tessera.url, pid) == result["version"] != first["version"]
    versions = httpx.get(f"{tessera.url}/versions", params={"project": pid}, timeout=10).json()
    listed = {v["version"]: v for v in versions["projects"][str(pid)]}
    assert "1 of" in listed[result["version"]]["reason"], listed[result["version"]]  # what the decision rests on


# ------------------------------------------------------------------------------------------ RQ / Redis

def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:                 # field 4 of /proc/<pid>/stat: the parent pid
            out.append(int(stat.parent.name))
    return out


class WorkerProcess:
    """`tessera worker` in its own process group (so that kill -9 takes its work horse too)."""

    def __init__(self, env: dict, log_path: Path):
        self.log_path = log_path
        self.log = open(log_path, "a")
        self.proc = subprocess.Popen([str(Path(sys.executable).with_name("tessera")), "worker"],
                                     env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def kill9(self) -> None:
        """SIGKILL the worker and its work horses (rq puts each horse in a process group of its own)."""
        horses = _children(self.proc.pid)
        os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in horses:
            os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="module")
def rq_stack(ls_server, redis_url, tmp_path_factory):
    """`tessera serve` and one `tessera worker` on the same Redis and model store."""
    d = tmp_path_factory.mktemp("rq")
    env = _env(ls_server, d / "models", REDIS_URL=redis_url)
    serve = TesseraProcess(env, d / "tessera.log")
    workers = [WorkerProcess(env, d / "worker.log")]
    try:
        serve.wait_up()
        yield {"serve": serve, "workers": workers, "env": env, "dir": d, "models": d / "models"}
    finally:
        for w in workers:
            w.stop()
        serve.stop()


@pytest.fixture(scope="module")
def rq_project(ls_server, rq_stack):
    return connected_project(ls_server.client(), "tessera learning rq", CONFIG_ALL, rq_stack["serve"].url,
                             make_nuclei(6, size=SIZE, seed=33), interactive=False)


def test_rq_worker_trains_and_the_http_process_serves(rq_stack, rq_project):
    api, pid, tasks, samples = rq_project["api"], rq_project["id"], rq_project["tasks"], rq_project["samples"]
    url = rq_stack["serve"].url
    assert httpx.get(f"{url}/health", timeout=5).json()["training"] == "redis"
    t0 = time.time()
    for i in range(5):
        api.annotations.create(tasks[i], result=gt_results(samples[i]))
    st = wait_result(url, pid, ("promoted",))
    print(f"RQ: 5 annotations -> {st['last_result'].get('status')} in {time.time() - t0:.1f} s")
    assert st["backend"] == "rq" and st["last_result"]["status"] == "promoted", st
    assert setup_version(url, pid) == st["last_result"]["version"] == f"tessera-p{pid}-v0001"
    assert "training run for project" in (rq_stack["dir"] / "worker.log").read_text()


def test_rq_worker_killed_mid_training_then_the_next_event_retries(rq_stack, rq_project):
    from tessera.model.inference import Predictor
    from tessera.model.registry import Registry

    api, pid = rq_project["api"], rq_project["id"]
    url, d = rq_stack["serve"].url, rq_stack["dir"]
    served = setup_version(url, pid)
    assert served.endswith("-v0001"), served
    before = job(url, pid)
    api.annotations.create(rq_project["tasks"][5], result=gt_results(rq_project["samples"][5]))    # something new
    wait_for(lambda: (s := job(url, pid))["state"] == "running" and s["phase"] == "train", 120, "training to start")
    rq_stack["workers"][0].kill9()
    st = wait_for(lambda: (s := job(url, pid))["state"] != "running" and s, 10, "the status to notice")
    assert st["state"] == "failed" and "died" in st["last_error"], st      # this host sees the pid is gone
    assert setup_version(url, pid) == served
    reg = Registry(rq_stack["models"] / f"project-{pid}")
    assert reg.current().version == "v0001" and len(reg.versions()) == 1
    assert Predictor.from_checkpoint(reg.path("v0001"), device="cpu").label_names == ["Nucleus"]
    assert any((reg.root / ".work").iterdir()), "the killed run should have left its scratch dir"

    rq_stack["workers"].append(WorkerProcess(rq_stack["env"], d / "worker2.log"))
    api.ml.train(rq_project["ml"])                     # the next event
    st = wait_runs(url, pid, before["runs"] + 1, timeout=240)     # the killed run never finished
    assert st["state"] == "done" and st["last_error"] is None, st
    assert st["last_result"]["status"] in ("promoted", "rejected"), st
    assert not any((reg.root / ".work").iterdir()), "the dead run's scratch dir was not cleaned"
    assert setup_version(url, pid) == (st["last_result"]["version"] if st["last_result"]["status"] == "promoted"
                                       else served)
