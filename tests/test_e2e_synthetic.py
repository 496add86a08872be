"""Synthetic tasks into a real Label Studio: rendered, uploaded, pre-annotated, marked, and loadable."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tessera.backend import lsclient
from tessera.backend.regions import instances_to_results, region_to_mask
from tessera.backend.label_config import Control
from tessera.backend.predictions import ModelCache
from tessera.backend.store import DEFAULT_KEY
from tessera.backend.settings import Settings
from tessera.model.data import make_nuclei
from tests.conftest import CONFIG_ALL, TesseraProcess
from tests.conftest_ls import predictions, upload_images, upload_samples

pytestmark = pytest.mark.e2e
# the tessera subprocess runs this checkout's code (and what PYTHONPATH puts before it, as the tests do)
REPO = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(Path(__file__).resolve().parents[1])]))


@pytest.fixture(scope="session")
def gan_model_dir(trained_model_dir, tmp_path_factory):
    """The trained label model plus a small GAN trained here, both in the default registry."""
    from tessera.model.train_maskgan import GANTrainConfig, train

    d = tmp_path_factory.mktemp("gan-models")
    shutil.copytree(trained_model_dir, d, dirs_exist_ok=True)
    ckpt = train(GANTrainConfig(max_iters=6, batch_size=2), make_nuclei(8, size=128, seed=21), ["Nucleus"],
                 d / "gan.pt")
    ModelCache(Settings(model_dir=d)).registry(DEFAULT_KEY).add(ckpt, {"label_names": ["Nucleus"]}, promote=True,
                                                                  kind="gan")
    return d


def annotate(ls_api, pid, tmp_path, n=2):
    """Upload procedural images and annotate them with their exact brush masks (layouts to sample from)."""
    samples = make_nuclei(n, size=128, seed=8)
    ids = upload_samples(ls_api, pid, [s.image for s in samples], "real")
    brush = Control("brushlabels", "mask", "image", ("Nucleus",))
    for tid, s in zip(ids, samples):
        k = [int(i) for i in np.unique(s.instances) if i]
        ls_api.annotations.create(tid, result=instances_to_results(s.instances, {i: "Nucleus" for i in k}, {}, brush))
    return ids


def test_generate_puts_predicted_synthetic_tasks_into_the_project(ls_server, ls_api, gan_model_dir, tmp_path):
    pid = ls_api.projects.create(title="tessera synthetic", label_config=CONFIG_ALL).id
    real_ids = annotate(ls_api, pid, tmp_path)
    env = {"MODEL_DIR": str(gan_model_dir), "LABEL_STUDIO_URL": ls_server.url,
           "LABEL_STUDIO_API_KEY": ls_server.token, "TESSERA_SYNTH_MIN_IOU": "0", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": REPO}
    exe = str(Path(sys.executable).with_name("tessera"))
    run = subprocess.run([exe, "generate", "--project", str(pid), "--count", "4", "--seed", "7",
                          "--kind", "generated"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert len(out["created"]) == 4 and not out["failed"], out
    tasks = {t["id"]: t for t in lsclient.tasks(ls_api, pid)}
    synthetic = [tasks[c["task"]] for c in out["created"]]
    for t in synthetic:
        assert t["meta"]["synthetic"] is True and t["meta"]["seed"] == 7
        assert t["meta"]["synthetic_kind"] == "generated"
        assert t["meta"]["generator_version"] == out["generator_version"]
        preds = predictions(ls_api, t["id"])
        assert len(preds) == 1 and preds[0]["model_version"] == out["generator_version"]
        types = {r["type"] for r in preds[0]["result"]}
        assert types == {"brushlabels", "polygonlabels", "rectanglelabels"}
        assert all(region_to_mask(r, 128, 128).any() for r in preds[0]["result"])
        png = lsclient.download(ls_api, t["data"]["image"])            # the image loads through LS
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any((tasks[i].get("meta") or {}).get("synthetic") for i in real_ids)

    # the same seed renders the same images
    again = subprocess.run([exe, "generate", "--project", str(pid), "--count", "4", "--seed", "7",
                          "--kind", "generated"], env=env,
                           capture_output=True, text=True, timeout=300)
    second = json.loads(again.stdout)["created"]
    tasks = {t["id"]: t for t in lsclient.tasks(ls_api, pid)}
    for a, b in zip(out["created"], second):
        assert lsclient.download(ls_api, tasks[a["task"]]["data"]["image"]) == lsclient.download(ls_api, tasks[b["task"]]["data"]["image"])

    # a filter nobody passes creates nothing and says why
    strict = subprocess.run([exe, "generate", "--project", str(pid), "--count", "2", "--kind",
                             "generated"],
                            env={**env, "TESSERA_SYNTH_MIN_IOU": "1.01"}, capture_output=True, text=True, timeout=300)
    result = json.loads(strict.stdout)
    assert strict.returncode == 1 and result["created"] == [] and "self-consistency" in result["failed"][0]["reason"]


def test_generate_route_validates_input(ls_server, gan_model_dir, tmp_path):
    proc = TesseraProcess({"MODEL_DIR": str(gan_model_dir), "LABEL_STUDIO_URL": ls_server.url,
                           "LABEL_STUDIO_API_KEY": ls_server.token}, tmp_path / "serve.log").wait_up()
    try:
        r = httpx.post(proc.url + "/generate", json={"project": 1, "count": 0}, timeout=10)
        assert r.status_code == 400 and "count" in r.json()["error"]
        r = httpx.post(proc.url + "/generate", json={"count": 2}, timeout=10)
        assert r.status_code == 400 and "project" in r.json()["error"]
        r = httpx.post(proc.url + "/generate", json={"project": 1, "count": 2, "kind": "painted"}, timeout=10)
        assert r.status_code == 400 and "kind" in r.json()["error"]
    finally:
        proc.stop()


CONFIG_RARE = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Nucleus"/><Label value="Mitotic"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Nucleus"/><Label value="Mitotic"/></PolygonLabels>
  <RectangleLabels name="bbox" toName="image"><Label value="Nucleus"/><Label value="Mitotic"/></RectangleLabels>
</View>"""


def test_generate_edited_tasks_for_a_rare_label(ls_server, ls_api, tmp_path):
    """Edited tasks need no trained model: real backgrounds of the project with its real "Mitotic" objects
    pasted in; labels exact (pixels outside the predicted regions are the source task's), source task in meta."""
    from PIL import Image

    pid = ls_api.projects.create(title="tessera edited", label_config=CONFIG_RARE).id
    samples = make_nuclei(3, size=128, seed=8)
    paths = []
    for i, s in enumerate(samples):
        paths.append(tmp_path / f"real{i}.png")
        Image.fromarray(s.image).save(paths[-1])
    ids = upload_images(ls_api, pid, paths)
    brush = Control("brushlabels", "mask", "image", ("Nucleus", "Mitotic"))
    for n, (tid, s) in enumerate(zip(ids, samples)):
        k = [int(i) for i in np.unique(s.instances) if i]
        rare = {k[0]} if n == 0 else set()  # one rare object in the whole project
        ls_api.annotations.create(tid, result=instances_to_results(
            s.instances, {i: "Mitotic" if i in rare else "Nucleus" for i in k}, {}, brush))
    env = {"MODEL_DIR": str(tmp_path / "models"), "LABEL_STUDIO_URL": ls_server.url,
           "LABEL_STUDIO_API_KEY": ls_server.token, "PATH": "/usr/bin:/bin", "PYTHONPATH": REPO}
    exe = str(Path(sys.executable).with_name("tessera"))
    run = subprocess.run([exe, "generate", "--project", str(pid), "--count", "5", "--label", "mitotic", "--seed", "3"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert out["kind"] == "edited" and len(out["created"]) == 5 and not out["failed"], out
    tasks = {t["id"]: t for t in lsclient.tasks(ls_api, pid)}
    images = {tid: np.asarray(Image.open(p).convert("RGB")) for tid, p in zip(ids, paths)}
    for c in out["created"]:
        t = tasks[c["task"]]
        meta = t["meta"]
        assert meta["synthetic"] is True and meta["synthetic_kind"] == "edited" and meta["seed"] == 3
        assert meta["source_task"] in ids and meta["object_tasks"] == [ids[0]] * len(meta["object_tasks"])
        assert meta["pasted_labels"] and set(meta["pasted_labels"]) == {"Mitotic"}
        preds = t["predictions"]
        assert len(preds) == 1 and preds[0]["model_version"] == out["model_version"]
        assert {r["type"] for r in preds[0]["result"]} == {"brushlabels", "polygonlabels", "rectanglelabels"}
        brushes = [r for r in preds[0]["result"] if r["type"] == "brushlabels"]
        assert any(r["value"]["brushlabels"] == ["Mitotic"] for r in brushes)
        labelled = np.zeros((128, 128), bool)
        for r in brushes:
            labelled |= region_to_mask(r, 128, 128)
        png = np.asarray(Image.open(__import__("io").BytesIO(lsclient.download(ls_api, t["data"]["image"]))).convert("RGB"))
        source = images[meta["source_task"]]
        assert (png != source).any(-1).any()                            # something was pasted
        assert not ((png != source).any(-1) & ~labelled).any()          # only where the labels say so
    assert not any((tasks[i].get("meta") or {}).get("synthetic") for i in ids)

    # more images than Label Studio takes in one upload request (100): all of them become predicted tasks
    many = subprocess.run([exe, "generate", "--project", str(pid), "--count", "101", "--seed", "4"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert many.returncode == 0, many.stderr[-3000:]
    created = json.loads(many.stdout)["created"]
    tasks = {t["id"]: t for t in lsclient.tasks(ls_api, pid)}
    assert len(created) == 101 and len({c["task"] for c in created}) == 101
    assert all(tasks[c["task"]]["meta"]["synthetic"] and len(tasks[c["task"]]["predictions"]) == 1 for c in created)
    assert len({tasks[c["task"]]["data"]["image"] for c in created}) == 101  # each task its own image
