"""`tessera check --project N` against a real Label Studio 1.23.2: each step says ok or what to fix."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.backend import lsclient
from tessera.backend.check import check_project
from tessera.backend.settings import Settings
from tessera.model.data import make_nuclei_mosaic
from tests.conftest import CONFIG_ALL
from tests.conftest_ls import tessera_for, upload_samples

pytestmark = pytest.mark.e2e


def _steps(settings: Settings, project: int) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in check_project(settings, project):
        out.setdefault(s.name, []).append((s.ok, s.detail))
    return out


def test_check_names_each_step_and_what_to_fix(ls_server, ls_api, trained_model_dir, tmp_path):
    pid = ls_api.projects.create(title="tessera check", label_config=CONFIG_ALL).id
    upload_samples(ls_api, pid, [make_nuclei_mosaic(96, 128, tile=96, seed=i).image for i in range(2)])
    lsclient.import_tasks(ls_api, pid, [{"data": {"image": f"/data/upload/{pid}/gone.png"}}])
    settings = Settings(model_dir=trained_model_dir, label_studio_url=ls_server.url,
                        label_studio_api_key=ls_server.token)

    steps = _steps(settings, pid)
    for name in ("Label Studio URL", "key", "Label Studio answers", "key accepted", "project", "label config",
                 "model"):
        assert [ok for ok, _ in steps[name]] == [True], (name, steps[name])
    assert "3 tasks" in steps["project"][0][1] and "brushlabels 'mask'" in steps["label config"][0][1]
    images = steps["images"]
    assert [ok for ok, _ in images] == [True, True, False] and "128x96" in images[0][1]
    assert "gone.png answered HTTP 500" in images[2][1]     # LS 1.23.2's upload view on a file it has no record of
    assert "tessera-default-v0001 serves it" in steps["model"][0][1]
    assert steps["connected"] == [(False, "no model is connected: project > Settings > Model > Connect model, "
                                          "URL http://<tessera host>:9090")]

    # a key Label Studio refuses: the step says which kinds of key work, and nothing after it is tried
    steps = _steps(settings.replace(label_studio_api_key="0" * 40), pid)
    assert steps["key accepted"][0][0] is False and "use a personal access token" in steps["key accepted"][0][1]
    assert "project" not in steps

    # the command: connected now, one task's image gone, so it exits 1 with that line
    with tessera_for(ls_server, trained_model_dir, tmp_path) as tessera:
        assert ls_api.ml.create(project=pid, url=tessera.url, title="Tessera").state == "CO"
        env = {**os.environ, "LABEL_STUDIO_URL": ls_server.url, "LABEL_STUDIO_API_KEY": ls_server.token,
               "MODEL_DIR": str(trained_model_dir)}
        run = subprocess.run([str(Path(sys.executable).with_name("tessera")), "check", "--project", str(pid)],
                             env=env, capture_output=True, text=True, timeout=120)
    print(run.stdout)
    lines = run.stdout.splitlines()
    assert run.returncode == 1, run.stdout + run.stderr
    assert any(line.startswith("ok    connected") and tessera.url in line for line in lines), lines
    assert any(line.startswith("FAIL  images") and "gone.png" in line for line in lines), lines
