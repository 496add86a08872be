"""End to end with a real Label Studio 1.23.2 and `tessera serve` (gunicorn) as separate processes:
connect, retrieve predictions (no duplicates), annotate -> webhook -> runner, Start training, versions."""
import os

import httpx
import pytest

from tessera.backend import lsclient
from tessera.backend.regions import region_to_mask
from tessera.model.data import make_nuclei
from tests.conftest import CONFIG_ALL
from tests.conftest_ls import (create_project, predictions, retrieve_predictions, tessera_for, upload_samples,
                               wait_for)

pytestmark = pytest.mark.e2e


@pytest.fixture
def tessera(ls_server, trained_model_dir, tmp_path):
    """`tessera serve` with a copy of the trained model store, pointed at the real LS."""
    with tessera_for(ls_server, trained_model_dir, tmp_path, TESSERA_DEBOUNCE_S="1") as proc:
        yield proc


def upload_nuclei(ls_api, project_id, tmp_path, n=3, size=(96, 128)):
    return upload_samples(ls_api, project_id, [s.image for s in make_nuclei(n, size=size, seed=5)], "nuclei")


def test_connect_predict_annotate_train_versions(ls_server, ls_api, tessera, tmp_path):
    # "Start model training on annotation submission" on: annotations reach the runner (off: only Start training)
    project = create_project(ls_api, "tessera e2e", CONFIG_ALL, start_training_on_annotation_update=True)
    pid = project.id
    task_ids = upload_nuclei(ls_api, pid, tmp_path)

    ml = ls_api.ml.create(project=pid, url=tessera.url, title="Tessera", is_interactive=True)
    assert ml.state == "CO", ml
    hooks = ls_api.webhooks.list(project=str(pid))
    assert any(h.url.rstrip("/") == tessera.url + "/webhook" for h in hooks), hooks
    version = httpx.post(tessera.url + "/setup", json={"project": f"{pid}.0", "schema": CONFIG_ALL},
                            timeout=5).json()["model_version"]
    assert version.startswith("tessera-default-v")

    # LS named project.model_version after the connection's title ("Tessera"); Tessera renames the
    # connection after the served version (from /setup, in the background), and LS moves it along
    wait_for(lambda: ls_api.projects.get(pid).model_version == version, what="project.model_version to follow")
    assert ls_api.ml.get(ml.id).title == version

    # Retrieve predictions: one batched /predict; every task gets exactly one prediction of that version
    retrieve_predictions(ls_api, pid)
    for tid in task_ids:
        preds = predictions(ls_api, tid)
        assert len(preds) == 1, preds
        assert preds[0]["model_version"] == version
        types = {r["type"] for r in preds[0]["result"]}
        assert types == {"brushlabels", "polygonlabels", "rectanglelabels"}, types
        for r in preds[0]["result"]:
            assert r["original_width"] == 128 and r["original_height"] == 96
            assert region_to_mask(r, 96, 128).any()
        assert 0 < preds[0]["score"] <= 1
    # a second retrieve adds nothing: the version from /setup equals what predictions carry
    retrieve_predictions(ls_api, pid)
    assert all(len(predictions(ls_api, tid)) == 1 for tid in task_ids)

    # "Sort by Prediction score": the Data Manager's predictions_score is filled, lowest first
    scores = {tid: predictions(ls_api, tid)[0]["score"] for tid in task_ids}
    listed = dm_sorted_by_score(ls_api, pid)
    assert all(t["predictions_score"] is not None for t in listed), listed
    assert scores[listed[0]["id"]] == min(scores.values()), (listed, scores)
    assert [round(t["predictions_score"], 4) for t in listed] == sorted(round(v, 4) for v in scores.values())

    # an annotation reaches the backend as ANNOTATION_CREATED and is handed to the runner
    brush = next(r for r in predictions(ls_api, task_ids[0])[0]["result"] if r["type"] == "brushlabels")
    result = [{k: brush[k] for k in ("from_name", "to_name", "type", "value", "original_width",
                                     "original_height")}]
    ls_api.annotations.create(task_ids[0], result=result)
    status = wait_for(lambda: _job(tessera, pid).get("events", 0) >= 1 and _job(tessera, pid),
                      what="the webhook to schedule a run")
    assert status["state"] in ("scheduled", "running", "done"), status
    # the run itself sees 1 annotated task, below TESSERA_MIN_ANNOTATIONS: it finishes as skipped
    done = wait_for(lambda: _job(tessera, pid).get("last_result") and _job(tessera, pid), timeout=60,
                    what="the run to finish")
    assert done["last_result"]["status"] == "skipped", done
    assert "ANNOTATION_CREATED" in done["reason"], done
    assert "webhook ANNOTATION_CREATED" in tessera.log_text()

    # Start training in LS -> START_TRAINING webhook -> runner
    ls_api.ml.train(ml.id)
    wait_for(lambda: "START_TRAINING" in str(_job(tessera, pid)), what="START_TRAINING to reach the runner")

    # LS asks the backend for versions with GET
    versions = ls_api.ml.list_model_versions(ml.id)
    assert version in versions.versions, versions

    # interactive pre-annotation: a positive keypoint on an object -> one clean region, nothing stored
    pred = predictions(ls_api, task_ids[1])[0]
    box = next(r for r in pred["result"] if r["type"] == "rectanglelabels")["value"]
    point = {"x": box["x"] + box["width"] / 2, "y": box["y"] + box["height"] / 2, "width": 0.5,
             "keypointlabels": ["Nucleus"]}
    context = {"result": [{"type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": True,
                           "original_width": 128, "original_height": 96, "value": point}]}
    reply = lsclient.interactive(ls_api, ml.id, task_ids[1], context)
    regions = reply["data"]["result"]
    assert [r["type"] for r in regions] == ["brushlabels"], reply      # ONE region: LS's smart tools place one
    assert len(predictions(ls_api, task_ids[1])) == 1
    # a smart box from the RectangleLabels control comes back as one box of that control
    context = {"result": [{"type": "rectanglelabels", "from_name": "bbox", "to_name": "image",
                           "original_width": 128, "original_height": 96,
                           "value": {**{k: box[k] for k in ("x", "y", "width", "height")}, "rotation": 0,
                                     "rectanglelabels": ["Nucleus"]}}]}
    regions = lsclient.interactive(ls_api, ml.id, task_ids[1], context)["data"]["result"]
    assert [(r["type"], r["from_name"]) for r in regions] == [("rectanglelabels", "bbox")], regions


def test_bulk_predict_writes_through_the_api_and_skips_done_tasks(ls_server, ls_api, tessera, trained_model_dir,
                                                                 tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    project = ls_api.projects.create(title="tessera bulk", label_config=CONFIG_ALL)
    task_ids = upload_nuclei(ls_api, project.id, tmp_path, n=4)
    env = {"MODEL_DIR": str(trained_model_dir), "LABEL_STUDIO_URL": ls_server.url,
           "LABEL_STUDIO_API_KEY": ls_server.token, "PATH": "/usr/bin:/bin",
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}        # the code under test, as the fixture runs it
    exe = str(Path(sys.executable).with_name("tessera"))
    run = subprocess.run([exe, "predict", "--project", str(project.id)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    first = json.loads(run.stdout)
    assert first["written"] == 4 and first["failed"] == 0, first
    assert "4/4 tasks" in run.stderr               # progress is shown
    for tid in task_ids:
        preds = predictions(ls_api, tid)
        assert len(preds) == 1 and preds[0]["model_version"] == first["model_version"] and preds[0]["result"]
    again = json.loads(subprocess.run([exe, "predict", "--project", str(project.id)], env=env,
                                      capture_output=True, text=True, timeout=300).stdout)
    assert again["written"] == 0 and again["skipped_existing"] == 4, again

    # --replace deletes Tessera's superseded label-model predictions, keeps anyone else's and GAN layouts
    old, gan, theirs = (ls_api.predictions.create(task=task_ids[0], result=[], score=0.5, model_version=v).model_dump()
                        for v in ("tessera-default-v0000", "tessera-default-gan-v0000", "someone-else-1"))
    replaced = json.loads(subprocess.run([exe, "predict", "--project", str(project.id), "--replace"], env=env,
                                         capture_output=True, text=True, timeout=300).stdout)
    assert replaced["superseded_deleted"] == 1 and replaced["written"] == 0, replaced
    left = {p["id"] for p in predictions(ls_api, task_ids[0])}
    assert old["id"] not in left and {gan["id"], theirs["id"]} <= left, left

    # a project that does not exist: one clear line, no traceback
    missing = subprocess.run([exe, "predict", "--project", "9999"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "project 9999 not found" in missing.stderr, missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1, missing.stderr


def test_bulk_predict_holds_a_page_of_the_project_not_all_of_it(ls_server, ls_api, trained_model_dir, tmp_path,
                                                                 monkeypatch):
    """`tessera predict --project` on a project whose tasks carry large old predictions (every version's brush
    regions): the listing streams in pages sized by their bytes and each task is cut down as it comes, so the
    run's peak memory is a page and a chunk, not the whole project parsed (it was: `list(lsclient.tasks(...))`)."""
    import io
    import json
    import tracemalloc

    from tessera.backend.predict_project import predict_project
    from tessera.backend.settings import Settings

    pid = ls_api.projects.create(title="tessera bulk, heavy tasks", label_config=CONFIG_ALL).id
    first = upload_nuclei(ls_api, pid, tmp_path, n=2)
    urls = {t["id"]: t["data"]["image"] for t in lsclient.tasks(ls_api, pid)}
    rle = list(range(256)) * 600                    # ~0.55 MB of JSON: a few hundred objects' brush regions
    old = [{"model_version": f"tessera-{pid}-v000{v}", "score": 0.5, "result": [
        {"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": 128, "original_height": 96,
         "value": {"format": "rle", "rle": rle, "brushlabels": ["Nucleus"]}}]} for v in (1, 2)]
    for start in range(0, 24, 6):
        ls_api.projects.import_tasks(pid, request=[{"data": {"image": urls[first[i % 2]]}, "predictions": old}
                                                   for i in range(start, start + 6)])
    listed_json = sum(len(json.dumps(t)) for t in lsclient.tasks(ls_api, pid))
    assert listed_json > 25e6, listed_json                   # 26 tasks, 24 of them with ~1.1 MB of predictions

    monkeypatch.setattr(lsclient, "PAGE_BYTES", 2 * 2**20)
    settings = Settings(model_dir=trained_model_dir, label_studio_url=ls_server.url,
                        label_studio_api_key=ls_server.token)
    tracemalloc.start()
    try:
        result = predict_project(settings, str(pid), batch=8, out=io.StringIO())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result["written"] == 26 and result["failed"] == 0 and result["tasks"] == 26, result
    # the whole listing held at once: 3.4x its JSON (115 MB traced), at 2 MB pages and 8-task chunks 0.36x
    print(f"peak {peak / 1e6:.1f} MB traced, the listing {listed_json / 1e6:.1f} MB of JSON")
    assert peak < listed_json, (peak, listed_json)
    for tid in first:
        assert [p["model_version"] for p in predictions(ls_api, tid)] == [result["model_version"]]


def test_a_retrieve_past_the_deadline_is_answered_in_time_and_the_rest_written_through_the_api(
        ls_server, ls_api, trained_model_dir, tmp_path):
    """Label Studio drops a /predict reply that comes after ML_TIMEOUT_PREDICT (100 s) whole: on a slow CPU a
    "Retrieve predictions" of 1,000 native-size tasks stored nothing. Past TESSERA_PREDICT_DEADLINE_S (here
    after the first chunk) the reply holds the tasks done; Tessera predicts the rest after it and writes them
    through the API. A second retrieve meanwhile adds no duplicate; every task ends with one prediction."""
    import time

    with tessera_for(ls_server, trained_model_dir, tmp_path, TESSERA_PREDICT_DEADLINE_S="0.000001",
                     TESSERA_PREDICT_BATCH="4") as proc:
        pid = create_project(ls_api, "tessera deadline", CONFIG_ALL).id
        task_ids = upload_nuclei(ls_api, pid, tmp_path, n=12)
        ml = ls_api.ml.create(project=pid, url=proc.url, title="Tessera", is_interactive=False)
        assert ml.state == "CO", ml
        version = httpx.get(f"{proc.url}/status", params={"project": pid}, timeout=10).json()["model_version"]
        t0 = time.monotonic()
        retrieve_predictions(ls_api, pid)
        took = time.monotonic() - t0
        assert "4 of 12 tasks answered before the deadline" in proc.log_text(), proc.log_text()[-3000:]
        retrieve_predictions(ls_api, pid)               # again, while the rest are being written

        def finished():
            st = httpx.get(f"{proc.url}/status", params={"project": pid}, timeout=10).json()["predicting"]
            return st if st and not st["queued"] and not st["writing"] else None
        st = wait_for(finished, 120, "the tasks past the deadline written")
        assert st["version"] == version and st["written"] == 8 and st["failed"] == st["dropped"] == 0, st
        for tid in task_ids:
            preds = predictions(ls_api, tid)
            assert [p["model_version"] for p in preds] == [version] and preds[0]["result"], (tid, preds)
        retrieve_predictions(ls_api, pid)               # every task has one: Label Studio sends none
        assert all(len(predictions(ls_api, tid)) == 1 for tid in task_ids)
        print(f"first retrieve answered in {took:.1f}s")


def test_bulk_predict_leaves_the_tasks_a_server_is_writing_to_it(ls_server, ls_api, trained_model_dir, tmp_path):
    """`tessera predict --project N` while a server of the same MODEL_DIR writes the tasks a retrieve's deadline
    left (MODEL_DIR/.overflow): it skips them, so no task gets two predictions of the served version."""
    import io
    import shutil
    import threading

    from tessera.backend.label_config import parse_label_config
    from tessera.backend.media import MediaResolver
    from tessera.backend.overflow import Overflow
    from tessera.backend.predict_project import predict_project
    from tessera.backend.predictions import ModelCache
    from tessera.backend.settings import Settings
    from tests.conftest import ThresholdPredictor

    pid = create_project(ls_api, "tessera bulk beside a server", CONFIG_ALL).id
    task_ids = upload_nuclei(ls_api, pid, tmp_path, n=6)
    models = tmp_path / "models"                 # this test's MODEL_DIR: its .overflow stays here
    shutil.copytree(trained_model_dir, models)
    settings = Settings(model_dir=models, label_studio_url=ls_server.url, label_studio_api_key=ls_server.token)
    config = parse_label_config(CONFIG_ALL)
    # "the server": its queue of the first 4 tasks, held until the end of the test by a pass that waits; its
    # writes refused (a wrong key)
    release = threading.Event()

    class HeldPredictor(ThresholdPredictor):
        def predict(self, images):
            release.wait(120)
            return super().predict(images)

    slow = ModelCache(settings, loader=lambda path, device: HeldPredictor())
    server = Overflow(settings, slow)
    server.ident = "a-server-process"
    tasks = [t for t in lsclient.tasks(ls_api, pid) if t["id"] in task_ids[:4]]
    assert server.submit(str(pid), tasks, config, slow.version(str(pid), config), MediaResolver(settings),
                         (ls_server.url, "not-the-key")) == 4
    try:
        result = predict_project(settings, str(pid), batch=8, out=io.StringIO())
    finally:
        release.set()
    assert result["held_by_server"] == 4 and result["written"] == 2 and result["failed"] == 0, result
    assert [len(predictions(ls_api, t)) for t in task_ids] == [0, 0, 0, 0, 1, 1]


def dm_sorted_by_score(ls_api, pid: int) -> list[dict]:
    """The Data Manager's task list sorted by "Prediction score", ascending (what the column header does)."""
    import json

    return list(lsclient.tasks(ls_api, pid, query=json.dumps({"ordering": ["tasks:predictions_score"]})))


def _job(tessera, pid):
    return httpx.get(f"{tessera.url}/status", params={"project": pid}, timeout=5).json()["job"]
