"""Pytest fixtures for a REAL Label Studio server (see backend/lsserver.py).

Load from tests/conftest.py with ``pytest_plugins = ["tests.conftest_ls"]``.

- ``ls_server`` (session): one Label Studio for the whole run, started from a copy of the cached data-dir
  template (built once, ~30-70 s; each start ~7-10 s) in a temporary data dir; stopped at the end.
- ``ls_api`` (function): an :class:`backend.lsserver.LSApi` for it (legacy token auth).

Environment: ``TESSERA_LS_VENV`` (default ``<repo>/.venv-ls``), ``TESSERA_LS_TEMPLATE`` (template cache,
default ``<repo>/.cache/ls-template``), ``TESSERA_SKIP_LS=1`` skips every test that needs the server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

from backend.lsserver import (
    LabelStudioError,
    LabelStudioServer,
    LSApi,
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
        server = LabelStudioServer(venv, tmp_path_factory.mktemp("ls-data"), template=template)
        server.start(timeout=float(os.environ.get("TESSERA_LS_START_TIMEOUT", "180")))
    except LabelStudioError as e:
        pytest.fail(f"could not start Label Studio: {e}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ls_api(ls_server: LabelStudioServer) -> Iterator[LSApi]:
    api = ls_server.client()
    try:
        yield api
    finally:
        api.close()


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
