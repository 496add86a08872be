"""End to end: a Label Studio 1.23.2 as it comes, legacy tokens off for the organization (its default), and
Tessera given a personal access token. Label Studio refuses the token itself on /data/upload, and the legacy
key it hands over in /setup is refused too; the images must still come through (an access token as Bearer)."""

import httpx
import pytest

from tessera.backend import lsclient
from tessera.model.data import make_nuclei_mosaic
from tests.conftest import CONFIG_ALL
from tests.conftest_ls import (another_label_studio, assert_masks_on_objects, predictions, retrieve_predictions,
                               tessera_for, upload_samples)

pytestmark = pytest.mark.e2e


@pytest.fixture
def ls_without_legacy_tokens(ls_server, tmp_path):
    """(server, personal access token): a second real Label Studio whose organization allows personal access
    tokens only."""
    with another_label_studio(tmp_path / "ls-data") as server:
        legacy = {"Authorization": f"Token {server.token}"}
        pat = httpx.post(f"{server.url}/api/token/", headers=legacy).raise_for_status().json()["token"]
        r = httpx.post(f"{server.url}/api/jwt/settings", headers=legacy, json={
            "api_tokens_enabled": True, "legacy_api_tokens_enabled": False, "api_token_ttl_days": 365})
        assert r.status_code == 200 and r.json()["legacy_api_tokens_enabled"] is False, r.text
        assert httpx.get(f"{server.url}/api/projects", headers=legacy).status_code == 401
        yield server, pat


def test_predictions_with_a_personal_access_token(ls_without_legacy_tokens, trained_model_dir, tmp_path):
    server, pat = ls_without_legacy_tokens
    api = lsclient.connect(server.url, pat)
    samples = [make_nuclei_mosaic(256, 320, tile=128, seed=70 + i) for i in range(2)]
    pid = api.projects.create(title="tessera tokens", label_config=CONFIG_ALL).id
    task_ids = upload_samples(api, pid, [s.image for s in samples])
    # first with the legacy key (Label Studio refuses it now): every image a 401. No prediction may be stored, or
    # it would stand for the served version and the retrieve below, once the key is right, would skip the task
    with tessera_for(server, trained_model_dir, tmp_path / "legacy") as tessera:
        ml = api.ml.create(project=pid, url=tessera.url, title="Tessera")
        retrieve_predictions(api, pid)
        refused = tessera.log_text()
    assert all(predictions(api, t) == [] for t in task_ids)
    assert "HTTP 401" in refused and "no prediction this time" in refused
    api.ml.delete(ml.id)
    with tessera_for(server, trained_model_dir, tmp_path, LABEL_STUDIO_API_KEY=pat) as tessera:
        assert api.ml.create(project=pid, url=tessera.url, title="Tessera").state == "CO"
        retrieve_predictions(api, pid)
        log = tessera.log_text()
    assert pat not in log
    assert_masks_on_objects(api, task_ids, samples, log)
