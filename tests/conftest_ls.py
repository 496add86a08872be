"""Pytest fixtures for a REAL Label Studio server (see backend/lsserver.py).

Load from tests/conftest.py with ``pytest_plugins = ["tests.conftest_ls"]``.

- ``ls_server`` (session): one Label Studio for the whole run, started from a copy of the cached data-dir
  template (built once, ~30-70 s; each start ~7-10 s) in a temporary data dir; stopped at the end.
- ``ls_api`` (function): label-studio-sdk's client for it (``backend.lsclient.connect``, legacy token).

Helpers the e2e tests share: ``create_project``, ``predictions``, ``wait_for``, ``tessera_for``.

Environment: ``TESSERA_LS_VENV`` (default ``<repo>/.venv-ls``), ``TESSERA_LS_TEMPLATE`` (template cache,
default ``<repo>/.cache/ls-template``), ``TESSERA_SKIP_LS=1`` skips every test that needs the server.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

from label_studio_sdk.client import LabelStudio

from tessera.backend import lsclient
from tessera.backend.lsserver import (
    LabelStudioError,
    LabelStudioServer,
    build_template,
    default_ls_venv,
    default_template_dir,
)


@pytest.fixture(scope="session")
def ls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    if os.environ.get("TESSERA_SKIP_LS") == "1":
        pytest.skip("TESSERA_SKIP_LS=1: tests against a real Label Studio are skipped")
    venv = default_ls_venv()
    if not (venv / "bin" / "label-studio").exists():
        pytest.fail(
            f"Label Studio venv not found at {venv} (needed by tests against a real Label Studio).\n"
            f"Create it with:\n    python3.11 -m venv {venv} && {venv}/bin/pip install label-studio==1.23.2\n"
            "or set TESSERA_LS_VENV to an existing one, or set TESSERA_SKIP_LS=1 to skip these tests.",
            pytrace=False,
        )
    try:
        template = build_template(venv, default_template_dir())
        # local-files storages (tests/test_e2e_storage.py): Label Studio serves files under this root to the key
        files = tmp_path_factory.mktemp("ls-local-files")
        server = LabelStudioServer(venv, tmp_path_factory.mktemp("ls-data"), template=template, env_extra={
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files)})
        server.start(timeout=float(os.environ.get("TESSERA_LS_START_TIMEOUT", "180")))
    except LabelStudioError as e:
        pytest.fail(f"could not start Label Studio: {e}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ls_api(ls_server: LabelStudioServer) -> LabelStudio:
    return ls_server.client()


def create_project(ls: LabelStudio, title: str, label_config: str, **fields):
    """A project (the SDK's model); `fields` may name project settings the SDK's `create` does not know
    (e.g. start_training_on_annotation_update)."""
    return ls.projects.create(title=title, label_config=label_config,
                              request_options={"additional_body_parameters": fields})


def predictions(ls: LabelStudio, task: int) -> list[dict]:
    """The task's predictions as Label Studio sends them (dicts)."""
    return [p.model_dump(mode="json") for p in ls.predictions.list(task=task)]


def retrieve_predictions(ls: LabelStudio, project: int) -> None:
    """Data Manager > "Retrieve predictions" on all tasks: ONE batched /predict to the backend."""
    ls.actions.create(id="retrieve_tasks_predictions", project=project, selected_items={"all": True, "excluded": []},
                      request_options={"timeout_in_seconds": 150})


def upload_images(ls: LabelStudio, project: int, paths) -> list[int]:
    """Image files -> one task each; their ids in order."""
    return lsclient.upload_images(ls, project, [(Path(p).name, Path(p).read_bytes()) for p in paths])


def brush_instances(regions: list[dict], h: int, w: int):
    """A prediction's brush regions decoded at the image's size (h, w) into one instance map (int32, 0 =
    background; where regions overlap the first keeps the pixel)."""
    import numpy as np

    from tessera.backend.regions import region_to_mask

    out = np.zeros((h, w), np.int32)
    for k, r in enumerate(regions, 1):
        out[region_to_mask(r, h, w) & (out == 0)] = k
    return out


@contextlib.contextmanager
def another_label_studio(data_dir: Path, **env: str) -> Iterator[LabelStudioServer]:
    """A second real Label Studio, with `env` (LABEL_STUDIO_HOST, ...), started from the data-dir template the
    session's `ls_server` built (ask for that fixture first); stopped on leaving."""
    server = LabelStudioServer(default_ls_venv(), data_dir, env_extra=env,
                               template=build_template(default_ls_venv(), default_template_dir()))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def assert_masks_on_objects(ls: LabelStudio, task_ids: list[int], samples, log: str = "", min_iou: float = 0.6):
    """Each task holds one prediction whose brush masks cover its sample's objects (foreground IoU)."""
    from tessera.model import metrics

    for tid, sample in zip(task_ids, samples):
        preds = predictions(ls, tid)
        assert len(preds) == 1, (preds, log[-2000:])
        h, w = sample.instances.shape
        brushes = [r for r in preds[0]["result"] if r["type"] == "brushlabels"]
        fg_iou = metrics.iou(brush_instances(brushes, h, w) > 0, sample.instances > 0)
        assert fg_iou >= min_iou, f"task {tid}: fg IoU {fg_iou:.3f}; log: {log[-1500:]}"


def wait_for(fn, timeout: float = 30.0, what: str = "condition", every: float = 0.3):
    """Poll fn() until it returns something truthy (returned); AssertionError after `timeout` seconds."""
    deadline, value = time.time() + timeout, None
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {value!r}")


@contextlib.contextmanager
def tessera_for(ls_server: LabelStudioServer, model_store: Path, tmp_path: Path, **env: str):
    """`tessera serve` with a copy of `model_store`, pointed at the real LS (no training from annotations
    unless `env` says otherwise); yields the started TesseraProcess."""
    from tests.conftest import TesseraProcess

    models = tmp_path / "models"
    shutil.copytree(model_store, models)
    proc = TesseraProcess({"MODEL_DIR": str(models), "LABEL_STUDIO_URL": ls_server.url,
                           "LABEL_STUDIO_API_KEY": ls_server.token, "TESSERA_MIN_ANNOTATIONS": "1000",
                           "TESSERA_LOG_LEVEL": "INFO", **env}, tmp_path / "tessera.log")
    try:
        yield proc.wait_up()
    finally:
        proc.stop()


def retrieve_with_tessera(ls_server: LabelStudioServer, ls: LabelStudio, model_store: Path, tmp_path: Path,
                          project: int) -> str:
    """`tessera serve` with a copy of `model_store` connected to `project`, then "Retrieve predictions" on all
    its tasks; Tessera's log."""
    with tessera_for(ls_server, model_store, tmp_path) as tessera:
        assert ls.ml.create(project=project, url=tessera.url, title="Tessera").state == "CO"
        retrieve_predictions(ls, project)
        return tessera.log_text()


def predicted_mosaic(ls_server: LabelStudioServer, ls: LabelStudio, model_store: Path, tmp_path: Path, title: str,
                     label_config: str, seed: int):
    """A project of `label_config` with one task, a 348x260 nuclei mosaic (model.data), predicted by "Retrieve
    predictions" with `tessera serve` of `model_store`: (the mosaic's Sample, task id, its one prediction, Tessera's
    log)."""
    from PIL import Image

    from tessera.model.data import make_nuclei_mosaic

    sample = make_nuclei_mosaic(260, 348, tile=128, seed=seed)
    path = tmp_path / "cells.png"
    Image.fromarray(sample.image).save(path)
    pid = ls.projects.create(title=title, label_config=label_config).id
    (tid,) = upload_images(ls, pid, [path])
    log = retrieve_with_tessera(ls_server, ls, model_store, tmp_path, pid)
    found = predictions(ls, tid)
    assert len(found) == 1, log
    return sample, tid, found[0], log


def upload_samples(ls: LabelStudio, project: int, images, prefix: str = "img") -> list[int]:
    """Images (arrays, e.g. model.data samples' .image) uploaded as PNG tasks; their task ids in order."""
    from PIL import Image

    files = []
    for i, image in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        files.append((f"{prefix}_{i}.png", buf.getvalue()))
    return lsclient.upload_images(ls, project, files)


def connected_project(ls: LabelStudio, title: str, label_config: str, backend_url: str, samples,
                      interactive: bool = True) -> dict:
    """A project with "Start model training on annotation submission" on (Settings > Model), the samples'
    images as tasks (none annotated) and the backend at `backend_url` connected:
    {"id", "tasks", "samples", "ml", "api"}."""
    pid = create_project(ls, title, label_config, start_training_on_annotation_update=True).id
    tasks = upload_samples(ls, pid, [s.image for s in samples], prefix=f"p{pid}")
    ml = ls.ml.create(project=pid, url=backend_url, title=title, is_interactive=interactive)
    assert ml.state == "CO", ml
    return {"id": pid, "tasks": tasks, "samples": samples, "ml": ml.id, "api": ls}


def set_train_on_annotation(ls: LabelStudio, project: int, on: bool) -> None:
    """Settings > Model > "Start model training on annotation submission" (a field the SDK's update lacks)."""
    ls.projects.update(project, request_options={"additional_body_parameters": {
        "start_training_on_annotation_update": on}})
