"""`tessera demo --quick --no-wait` end to end, twice on one data dir, then checked through a Label Studio
started again on the data it left: one project with tasks, predictions of the trained version (no
duplicates after the second run), synthetic tasks when backend.synthetic_tasks exists, no retraining."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tessera.backend import lsclient
from tessera.backend.demo import QUICK, TITLE, find_project, plan_for
from tessera.backend.lsserver import LabelStudioServer, default_ls_venv, default_template_dir
from tessera.model.registry import Registry

pytestmark = pytest.mark.e2e


def run_demo(data_dir: Path, timeout: float = 900) -> tuple[dict, str, float]:
    # timeout bounds a hang, it is not a speed target: the demo alone may wait 300 s for Label Studio to
    # start (backend/demo.py), and a loaded 2-core box took over 300 s for the whole quick demo
    env = {**os.environ, "TESSERA_LS_TEMPLATE": str(default_template_dir()),
           "TESSERA_LS_VENV": str(default_ls_venv())}
    exe = Path(sys.executable).with_name("tessera")
    t0 = time.monotonic()
    proc = subprocess.run([str(exe), "demo", "--quick", "--no-wait", "--data-dir", str(data_dir)], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, f"demo exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads((data_dir / "demo.json").read_text()), proc.stdout, seconds


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The quick demo run twice into one data dir: (data dir, first summary, second summary, outputs)."""
    if os.environ.get("TESSERA_SKIP_LS") == "1":
        pytest.skip("TESSERA_SKIP_LS=1: the demo needs a real Label Studio")
    if not (default_ls_venv() / "bin" / "label-studio").exists():
        pytest.fail(f"Label Studio venv not found at {default_ls_venv()} (make venv-ls)", pytrace=False)
    data_dir = tmp_path_factory.mktemp("demo")
    first, out1, s1 = run_demo(data_dir)
    second, out2, s2 = run_demo(data_dir)
    print(f"demo --quick: first run {s1:.0f} s, second run {s2:.0f} s")
    return data_dir, first, second, out1, out2


def test_demo_ready_and_stopped(demo_runs):
    data_dir, first, second, out1, _ = demo_runs
    for summary in (first, second):
        assert summary["ready"] and not summary["running"], summary
        # --no-wait stops both servers
        assert not listening(summary["label_studio"]["port"]) and not listening(summary["tessera"]["port"])
    assert "Tessera demo is ready" in out1 and first["label_studio"]["token"] in out1
    assert first["label_studio"]["password"] in out1 and "tessera_mislabeling" in out1
    assert oct((data_dir / "demo.json").stat().st_mode & 0o777) == "0o600"   # it holds the token


def test_second_run_reuses_everything(demo_runs):
    data_dir, first, second, _, out2 = demo_runs
    assert first["project"]["created"] and first["model"]["trained"]
    assert not second["project"]["created"] and not second["model"]["trained"], second
    assert second["project"]["id"] == first["project"]["id"]
    assert second["model"]["version"] == first["model"]["version"]
    assert "training skipped" in out2 and "nothing uploaded" in out2
    registry = Registry(data_dir / "models" / f"project-{first['project']['id']}")
    assert [v.version for v in registry.versions("label")] == ["v0001"]
    assert not (data_dir / "models-staging").exists()


def test_project_has_tasks_and_predictions(demo_runs):
    data_dir, first, second, _, _ = demo_runs
    pid, version = first["project"]["id"], first["model"]["version"]
    assert version == f"tessera-p{pid}-v0001"
    with LabelStudioServer(default_ls_venv(), data_dir / "ls") as ls:
        api = ls.client()
        rows = api.projects.list(page_size=1000).items
        assert [p.id for p in rows if p.title == TITLE] == [pid]
        assert find_project(api, TITLE).id == pid
        assert api.ml.list(project=pid)[0].is_interactive
        # "Prediction score" sorts by the served version's predictions; annotations train (Settings > Model)
        assert api.projects.get(pid).model_version == version
        assert api.projects.get(pid).start_training_on_annotation_update is True
        tasks = list(lsclient.tasks(api, pid))
        real = [t for t in tasks if not (t.get("meta") or {}).get("synthetic")]
        synthetic = [t for t in tasks if (t.get("meta") or {}).get("synthetic")]
        assert len(real) == QUICK.n_images
        assert sum(1 for t in real if t.get("annotations")) == QUICK.n_annotated
        with_regions = 0
        for t in real:
            ours = [p for p in t["predictions"] if p["model_version"] == version]
            assert len(ours) == 1, (t["id"], [p["model_version"] for p in t["predictions"]])  # no duplicates
            assert 0 <= ours[0]["score"] <= 1
            types = {r["type"] for r in ours[0]["result"]}
            assert types <= {"brushlabels", "polygonlabels", "rectanglelabels"}
            with_regions += bool(types)
        assert with_regions >= len(real) // 2, "a trained model finds nuclei in most demo images"

        if plan_for(True).gan_seconds > 0:             # TESSERA_DEMO_GAN_S=0 skips the GAN
            assert first["synthetic"]["status"] == "created", first["synthetic"]
            assert sorted(first["synthetic"]["task_ids"]) == sorted(t["id"] for t in synthetic)
            assert second["synthetic"]["status"] == "kept"
            for t in synthetic:
                assert t["predictions"], t["id"]
                assert any(p["result"] for p in t["predictions"]), t["id"]
        else:
            assert first["synthetic"]["status"] == "skipped" and not synthetic
            assert "tessera.backend.synthetic_tasks" in first["synthetic"]["reason"]
