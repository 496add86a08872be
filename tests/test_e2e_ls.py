"""End to end with a real Label Studio 1.23.2 and `tessera serve` (gunicorn) as separate processes:
connect, retrieve predictions (no duplicates), annotate -> webhook -> runner, Start training, versions."""
import io
import shutil
import time

import numpy as np
import pytest
import requests
from PIL import Image

from backend.regions import region_to_mask
from model.data import make_nuclei
from tests.conftest import CONFIG_ALL, TesseraProcess

pytestmark = pytest.mark.e2e


@pytest.fixture
def tessera(ls_server, trained_model_dir, tmp_path):
    """`tessera serve` with a copy of the trained model store, pointed at the real LS."""
    models = tmp_path / "models"
    shutil.copytree(trained_model_dir, models)
    proc = TesseraProcess({"MODEL_DIR": str(models), "LABEL_STUDIO_URL": ls_server.url,
                           "LABEL_STUDIO_API_KEY": ls_server.token, "TESSERA_DEBOUNCE_S": "1",
                           "TESSERA_MIN_ANNOTATIONS": "1000", "TESSERA_LOG_LEVEL": "INFO"},
                          tmp_path / "tessera.log")
    try:
        yield proc.wait_up()
    finally:
        proc.stop()


def upload_nuclei(ls_api, project_id, tmp_path, n=3, size=(96, 128)):
    paths = []
    for i, s in enumerate(make_nuclei(n, size=size, seed=5)):
        p = tmp_path / f"nuclei_{i}.png"
        Image.fromarray(s.image).save(p)
        paths.append(p)
    return ls_api.upload_images(project_id, paths)["task_ids"]


def wait_for(fn, timeout=30.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_connect_predict_annotate_train_versions(ls_server, ls_api, tessera, tmp_path):
    project = ls_api.create_project("tessera e2e", CONFIG_ALL)
    pid = project["id"]
    task_ids = upload_nuclei(ls_api, pid, tmp_path)

    ml = ls_api.connect_ml(pid, tessera.url, "Tessera", is_interactive=True)
    assert ml["state"] == "CO", ml
    hooks = ls_api.webhooks(pid)
    assert any(h["url"].rstrip("/") == tessera.url + "/webhook" for h in hooks), hooks
    version = requests.post(tessera.url + "/setup", json={"project": f"{pid}.0", "schema": CONFIG_ALL},
                            timeout=5).json()["model_version"]
    assert version.startswith("tessera-default-v")

    # Retrieve predictions: one batched /predict; every task gets exactly one prediction of that version
    ls_api.retrieve_predictions(pid)
    for tid in task_ids:
        preds = ls_api.predictions(tid)
        assert len(preds) == 1, preds
        assert preds[0]["model_version"] == version
        types = {r["type"] for r in preds[0]["result"]}
        assert types == {"brushlabels", "polygonlabels", "rectanglelabels"}, types
        for r in preds[0]["result"]:
            assert r["original_width"] == 128 and r["original_height"] == 96
            assert region_to_mask(r, 96, 128).any()
        assert 0 < preds[0]["score"] <= 1
    # a second retrieve adds nothing: the version from /setup equals what predictions carry
    ls_api.retrieve_predictions(pid)
    assert all(len(ls_api.predictions(tid)) == 1 for tid in task_ids)

    # an annotation reaches the backend as ANNOTATION_CREATED and is handed to the runner
    brush = next(r for r in ls_api.predictions(task_ids[0])[0]["result"] if r["type"] == "brushlabels")
    result = [{k: brush[k] for k in ("from_name", "to_name", "type", "value", "original_width",
                                     "original_height")}]
    ls_api.create_annotation(task_ids[0], result)
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
    ls_api.ml_train(ml["id"])
    wait_for(lambda: "START_TRAINING" in str(_job(tessera, pid)), what="START_TRAINING to reach the runner")

    # LS asks the backend for versions with GET
    versions = ls_api.ml_versions(ml["id"])
    assert version in versions["versions"], versions

    # interactive pre-annotation: a positive keypoint on an object -> one clean region, nothing stored
    pred = ls_api.predictions(task_ids[1])[0]
    box = next(r for r in pred["result"] if r["type"] == "rectanglelabels")["value"]
    point = {"x": box["x"] + box["width"] / 2, "y": box["y"] + box["height"] / 2, "width": 0.5,
             "keypointlabels": ["Nucleus"]}
    context = {"result": [{"type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": True,
                           "original_width": 128, "original_height": 96, "value": point}]}
    reply = ls_api.interactive(ml["id"], task_ids[1], context)
    regions = reply["data"]["result"]
    assert {r["type"] for r in regions} == {"brushlabels", "polygonlabels", "rectanglelabels"}, reply
    assert sum(r["type"] == "brushlabels" for r in regions) == 1
    assert len(ls_api.predictions(task_ids[1])) == 1


def test_bulk_predict_writes_through_the_api_and_skips_done_tasks(ls_server, ls_api, tessera, trained_model_dir,
                                                                 tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    project = ls_api.create_project("tessera bulk", CONFIG_ALL)
    task_ids = upload_nuclei(ls_api, project["id"], tmp_path, n=4)
    env = {"MODEL_DIR": str(trained_model_dir), "LABEL_STUDIO_URL": ls_server.url,
           "LABEL_STUDIO_API_KEY": ls_server.token, "PATH": "/usr/bin:/bin"}
    exe = str(Path(sys.executable).with_name("tessera"))
    run = subprocess.run([exe, "predict", "--project", str(project["id"])], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    first = json.loads(run.stdout)
    assert first["written"] == 4 and first["failed"] == 0, first
    assert "4/4 tasks" in run.stderr               # progress is shown
    for tid in task_ids:
        preds = ls_api.predictions(tid)
        assert len(preds) == 1 and preds[0]["model_version"] == first["model_version"] and preds[0]["result"]
    again = json.loads(subprocess.run([exe, "predict", "--project", str(project["id"])], env=env,
                                      capture_output=True, text=True, timeout=300).stdout)
    assert again["written"] == 0 and again["skipped_existing"] == 4, again


def _job(tessera, pid):
    return requests.get(f"{tessera.url}/status", params={"project": pid}, timeout=5).json()["job"]
