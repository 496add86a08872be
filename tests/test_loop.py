"""The loop as a labeller lives it, at the HTTP level: one region per smart-tool hint, LS's "train on
annotation submission" toggle, version names, the connection following the served version, CLI checks."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.backend.lsclient import VersionFollower
from tessera.backend.regions import region_to_mask
from tessera.backend.store import version_string
from tessera.backend.settings import Settings
from tests.test_app import blobs_png, data_uri, predict_body

HINTS = {   # one rough hint per control of CONFIG_ALL, on the first blob (rows 5-15, columns 5-20 of 48x64)
    "mask": {"type": "brushlabels", "from_name": "mask", "to_name": "image", "original_width": 64,
             "original_height": 48, "value": {"format": "rle", "rle": None, "brushlabels": ["Nucleus"]}},
    "poly": {"type": "polygonlabels", "from_name": "poly", "to_name": "image", "original_width": 64,
             "original_height": 48, "value": {"points": [[10, 15], [25, 15], [25, 25], [10, 25]],
                                              "polygonlabels": ["Nucleus"]}},
    "bbox": {"type": "rectanglelabels", "from_name": "bbox", "to_name": "image", "original_width": 64,
             "original_height": 48, "value": {"x": 10, "y": 15, "width": 15, "height": 10, "rotation": 0,
                                              "rectanglelabels": ["Nucleus"]}},
}


@pytest.mark.parametrize("from_name, kind", [("poly", "polygonlabels"), ("bbox", "rectanglelabels")])
def test_a_smart_tool_hint_gets_one_region_of_its_own_control(client, from_name, kind):
    task = {"id": 1, "data": {"image": data_uri(blobs_png())}}
    res = client.post("/predict", json=predict_body([task], context={"result": [HINTS[from_name]]})).json
    regions = res["results"][0]["result"]
    assert [(r["type"], r["from_name"]) for r in regions] == [(kind, from_name)], regions
    assert region_to_mask(regions[0], 48, 64)[10, 10]          # the hinted blob, snapped


def test_a_brush_hint_gets_one_brush_region(client):
    import numpy as np

    from tessera.backend.regions import mask_to_rle

    stroke = np.zeros((48, 64), bool)
    stroke[9:11, 8:14] = True
    hint = {**HINTS["mask"], "value": {"format": "rle", "rle": mask_to_rle(stroke), "brushlabels": ["Nucleus"]}}
    task = {"id": 1, "data": {"image": data_uri(blobs_png())}}
    regions = client.post("/predict", json=predict_body([task], context={"result": [hint]})).json["results"][0]["result"]
    assert [r["type"] for r in regions] == ["brushlabels"]
    assert region_to_mask(regions[0], 48, 64).sum() == 150     # the whole blob, not the stroke


def test_a_bitmask_hint_gets_one_bitmask_region(client):
    """BitmaskLabels' smart tool: the stroke comes as a PNG data URL (RGBA, as the editor saves it), the reply is
    one bitmask region of the whole object, a PNG of the image's size."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[9:11, 8:14, 3] = 255
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    hint = {"type": "bitmasklabels", "from_name": "mask", "to_name": "image", "original_width": 64,
            "original_height": 48, "value": {"imageDataURL": "data:image/png;base64,"
                                             + base64.b64encode(buf.getvalue()).decode(), "bitmasklabels": ["Nucleus"]}}
    config = ('<View><Image name="image" value="$image"/><BitmaskLabels name="mask" toName="image">'
              '<Label value="Nucleus"/></BitmaskLabels><PolygonLabels name="poly" toName="image">'
              '<Label value="Nucleus"/></PolygonLabels></View>')
    task = {"id": 1, "data": {"image": data_uri(blobs_png())}}
    body = {**predict_body([task], context={"result": [hint]}), "label_config": config}
    regions = client.post("/predict", json=body).json["results"][0]["result"]
    assert [(r["type"], r["from_name"]) for r in regions] == [("bitmasklabels", "mask")], regions
    assert region_to_mask(regions[0], 48, 64).sum() == 150     # the whole blob, not the stroke


@pytest.mark.parametrize("toggle, action, scheduled", [
    ({"min_annotations_to_start_training": 0}, "ANNOTATION_CREATED", False),    # what LS 1.23's webhook sends
    ({"min_annotations_to_start_training": 0}, "ANNOTATION_UPDATED", False),
    ({"min_annotations_to_start_training": 0}, "START_TRAINING", True),         # "Start training" always trains
    ({"min_annotations_to_start_training": 1}, "ANNOTATION_CREATED", True),
    ({"start_training_on_annotation_update": False}, "ANNOTATION_DELETED", False),   # the API's name for it
    ({}, "ANNOTATION_DELETED", True),                                            # neither: as before
])
def test_annotations_train_only_with_the_ls_toggle_on(client, toggle, action, scheduled):
    project = {"id": 7, **toggle}
    r = client.post("/webhook", json={"action": action, "annotation": {"id": 1, "task": 2, "result": []},
                                      "project": project})
    assert (r.json["status"] == "scheduled") is scheduled, r.json
    assert client.runner.submitted == ([("7", action)] if scheduled else [])
    if scheduled:           # LS 1.23 stores "job" in a 128-character column
        assert r.status_code == 201 and isinstance(r.json["job"], str) and len(r.json["job"]) < 128
    else:
        assert r.status_code == 200 and "Start model training on annotation submission" in r.json["message"]


def test_gan_versions_are_named_apart_from_label_versions():
    assert version_string("3", "v0002") == "tessera-p3-v0002"
    assert version_string("3", "v0002", "gan") == "tessera-p3-gan-v0002"
    assert version_string("default", "v0001", "gan") == "tessera-default-gan-v0001"


def test_the_follower_needs_label_studio_and_a_trained_version(tmp_path):
    assert not VersionFollower(Settings(model_dir=tmp_path)).notice("3", "tessera-p3-v0001", "t" * 40)  # no URL
    follower = VersionFollower(Settings(model_dir=tmp_path, label_studio_url="http://127.0.0.1:9"))
    assert not follower.notice("3", "tessera-p3-v0001")                         # no token known
    assert not follower.notice("3", "tessera-untrained", "t" * 40)
    follower.DELAY_S = 0.0
    assert follower.notice("3", "tessera-p3-v0001", "t" * 40)                  # refused port: logs a warning
    assert not follower.notice("3", "tessera-p3-v0001", "t" * 40)              # once per RETRY_S


def test_generate_refuses_a_count_of_zero(tmp_path):
    exe = str(Path(sys.executable).with_name("tessera"))
    run = subprocess.run([exe, "generate", "--project", "1", "--count", "0"], capture_output=True, text=True,
                         env={"MODEL_DIR": str(tmp_path), "PATH": "/usr/bin:/bin",
                              "PYTHONPATH": os.environ.get("PYTHONPATH", "")}, timeout=60)
    assert run.returncode == 2 and "--count must be between 1" in run.stderr, run.stderr


def test_help_names_the_environment_each_command_needs():
    exe = str(Path(sys.executable).with_name("tessera"))
    for cmd in ("predict", "generate"):
        out = subprocess.run([exe, cmd, "--help"], capture_output=True, text=True, timeout=60).stdout
        assert "LABEL_STUDIO_URL" in out and "LABEL_STUDIO_API_KEY" in out, out
    out = subprocess.run([exe, "train", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "LABEL_STUDIO_URL" in out and "--force" in out


def test_versions_say_what_a_decision_rests_on(tmp_path):
    from tessera.backend.predictions import ModelCache

    reg = ModelCache(Settings(model_dir=tmp_path)).registry("4")
    f = tmp_path / "stub.pt"
    for metrics, promote in (({"val_iou": 0.8123, "n_val_tasks": 4, "n_val_judged": 3}, True),
                             ({"val_iou": 0.7, "n_val_tasks": 2, "n_val_judged": 1}, False),
                             ({"val_iou": 0.75, "n_val_tasks": 11, "n_val_judged": 5, "n_held_back_tasks": 200},
                              False)):
        f.write_bytes(b"stub")
        reg.add(f, metrics, promote=promote, reason="test: why", kind="label")
    exe = str(Path(sys.executable).with_name("tessera"))
    out = subprocess.run([exe, "versions", "--project", "4"], capture_output=True, text=True, timeout=60,
                         env={"MODEL_DIR": str(tmp_path), "PATH": "/usr/bin:/bin",
                              "PYTHONPATH": os.environ.get("PYTHONPATH", "")}).stdout
    lines = out.splitlines()
    assert lines[0].startswith("tessera-p4-v0003") and "val_iou=0.7500 on 11 held-back (5 person-made) of 200 " \
        "(TESSERA_EVAL_MEGAPIXELS)" in lines[0], out
    assert lines[1].startswith("tessera-p4-v0002") and "val_iou=0.7000 on 2 held-back (1 person-made)" in lines[1]
    assert "rejected" in lines[1] and "val_iou=0.8123 on 4 held-back (3 person-made)" in lines[2], out
    assert "TESSERA_EVAL_MEGAPIXELS" not in lines[1] + lines[2]


def test_the_demo_restarts_a_dead_backend_in_place(monkeypatch, tmp_path, capsys):
    from types import SimpleNamespace

    from tessera.backend import demo

    class Proc:
        def __init__(self, alive):
            self.alive, self.returncode = alive, None if alive else -9

    class FakeServer:
        started: list = []

        def __init__(self, port, env, log_path):
            self.port, self.url = port, f"http://127.0.0.1:{port}"
            self.proc = Proc(alive=len(FakeServer.started) < 1)     # the first restart lives, later ones die
            FakeServer.started.append(self)

        @property
        def running(self):
            return self.proc.alive

        def wait_up(self):
            pass

    ticks = iter(range(12))
    ls = SimpleNamespace(running=True)

    def sleep(_):
        if next(ticks, None) is None:
            ls.running = False

    monkeypatch.setattr(demo, "TesseraServer", FakeServer)
    monkeypatch.setattr(demo, "time", SimpleNamespace(sleep=sleep, monotonic=lambda: 0.0))
    dead = SimpleNamespace(port=9191, proc=Proc(alive=False), running=False)
    backends = [dead]
    log = tmp_path / "tessera.log"
    log.write_text("boom\n")
    env = {"MODEL_DIR": "/m", "LABEL_STUDIO_URL": "http://127.0.0.1:8080", "LABEL_STUDIO_API_KEY": "k"}
    demo._keep_serving(ls, backends, env, log)
    out = capsys.readouterr()
    assert backends[1] is FakeServer.started[0] and backends[1].port == 9191        # restarted in place
    assert "tessera serve restarted at http://127.0.0.1:9191" in out.out
    FakeServer.started[0].proc.alive = False                 # now it keeps dying: after 3, the command
    ls.running, ticks = True, iter(range(12))
    demo._keep_serving(ls, backends, env, log)
    err = capsys.readouterr().err
    assert "not restarting" in err and "serve --host 127.0.0.1 --port 9191" in err and "MODEL_DIR=/m" in err
