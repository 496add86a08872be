"""End to end: Label Studio served at a path behind a reverse proxy (LABEL_STUDIO_HOST=https://host/ls, the way
its docs put it behind nginx). Label Studio then names its uploads /ls/data/upload/..., and Tessera must fetch
them from Label Studio (through the proxy, with the key) rather than take them for local paths."""

from urllib.parse import urlsplit

import httpx
import pytest

from tessera.backend import lsclient
from tessera.model.data import make_nuclei_mosaic
from tests.conftest import CONFIG_ALL
from tests.conftest_ls import (another_label_studio, assert_masks_on_objects, retrieve_predictions, tessera_for,
                               upload_samples)
from tests.standin import start_prefix_proxy

pytestmark = pytest.mark.e2e


@pytest.fixture
def ls_at_a_path(ls_server, tmp_path):
    """A second real Label Studio whose public address is http://127.0.0.1:<proxy>/ls; yields (server, public
    URL)."""
    proxy = start_prefix_proxy("/ls")
    public = f"{proxy.url}/ls"
    try:
        with another_label_studio(tmp_path / "ls-data", LABEL_STUDIO_HOST=public) as server:
            proxy.answer = ("/ls", server.url)
            yield server, public
    finally:
        proxy.shutdown()


def test_predictions_for_label_studio_served_at_a_path(ls_at_a_path, trained_model_dir, tmp_path):
    server, public = ls_at_a_path
    api = lsclient.connect(public, server.token)     # all through the proxy, as a browser goes
    samples = [make_nuclei_mosaic(256, 320, tile=128, seed=60 + i) for i in range(2)]
    pid = api.projects.create(title="tessera at /ls", label_config=CONFIG_ALL).id
    task_ids = upload_samples(api, pid, [s.image for s in samples])
    refs = [api.tasks.get(t).data["image"] for t in task_ids]
    assert all(r.startswith("/ls/data/upload/") for r in refs), refs       # Label Studio's own naming
    with tessera_for(server, trained_model_dir, tmp_path, LABEL_STUDIO_URL=public) as tessera:
        assert api.ml.create(project=pid, url=tessera.url, title="Tessera").state == "CO"
        retrieve_predictions(api, pid)
        log = tessera.log_text()
    assert_masks_on_objects(api, task_ids, samples, log)

    # images Tessera uploads (synthetic tasks) are named as Label Studio names its own: a browser loads them
    (url,) = lsclient.upload_files(api, pid, [("synthetic.png", b"\x89PNG not checked")])
    assert url.startswith("/ls/data/upload/")
    assert httpx.get(urlsplit(public)._replace(path=url).geturl(),
                     headers={"Authorization": f"Token {server.token}"}).content == b"\x89PNG not checked"

    # a personal access token through the proxy: label-studio-sdk 2.1.2 exchanges it at the host's root
    # (urljoin drops the path), which the proxy does not serve; lsclient sends that exchange under the path
    pat = httpx.post(f"{server.url}/api/token/", headers={"Authorization": f"Token {server.token}"}).json()["token"]
    assert lsclient.project(lsclient.connect(public, pat), pid).title == "tessera at /ls"

    # Tessera given Label Studio's address without the path: a clear error naming the setting, not a local path
    with tessera_for(server, trained_model_dir, tmp_path / "direct", LABEL_STUDIO_URL=server.url) as tessera:
        pid2 = api.projects.create(title="tessera direct", label_config=CONFIG_ALL).id
        (tid,) = upload_samples(api, pid2, [samples[0].image])
        assert api.ml.create(project=pid2, url=tessera.url, title="Tessera").state == "CO"
        retrieve_predictions(api, pid2)
        assert "set LABEL_STUDIO_URL to its address with that path (https://<host>/ls)" in tessera.log_text()
