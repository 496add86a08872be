"""tessera.backend.store: one layout of MODEL_DIR and one spelling of model versions, shared by serving and training."""
from types import SimpleNamespace

import pytest

from tessera.backend import predict_project, workdir
from tessera.backend.jobs import make_runner
from tessera.backend.predictions import ModelCache
from tessera.backend.store import (DEFAULT_KEY, BEFORE_PROJECT_KEY, UNTRAINED, ParsedVersion, Store, is_label_version, parse_version,
                           version_string)
from tests.conftest import register_stub


def test_serving_and_training_find_one_store_per_project(settings):
    store = Store(settings.model_dir)
    assert store.registry("3").root == settings.model_dir / "project-3"
    assert store.registry("3.1700000000").root == store.registry("0003").root       # LS uid, padded id: one store
    assert store.registry(DEFAULT_KEY).root == settings.model_dir / "default"
    assert store.registry(BEFORE_PROJECT_KEY).root == settings.model_dir / "project-0"
    cache = ModelCache(settings)
    for key in ("3", DEFAULT_KEY):
        assert cache.registry(key).root == store.registry(key).root
    # the training run's scratch sits beside the versions it is added to (a hard link, not a copy)
    assert workdir.work_dir(store.registry("3")).parent == store.work_dir("3")
    assert make_runner(SimpleNamespace(redis_url="", debounce_s=1.0, model_dir=settings.model_dir),
                       run_fn=lambda *a: {}).lock_dir == store.jobs_dir
    with pytest.raises(ValueError, match="ASCII digits"):
        store.registry("../etc")


def test_serving_names_the_version_training_registered(settings):
    """What /setup reports is the string training returns for the version it promoted, and the string
    training and `tessera predict --replace` recognise as a label model's."""
    assert ModelCache(settings).version("4") == UNTRAINED and not is_label_version(UNTRAINED)
    version = register_stub(settings, "4")
    served = ModelCache(settings).version("4.1700000000")
    assert served == version_string("4", version) == "tessera-p4-v0001"
    assert parse_version(served) == ParsedVersion("4", version, "label")
    assert is_label_version(served) and is_label_version(served, "4") and not is_label_version(served, "5")
    gan = version_string("4", "v0002", "gan")
    assert gan == "tessera-p4-gan-v0002" and not is_label_version(gan)
    task = {"predictions": [{"id": 1, "model_version": "tessera-p4-v0000"}, {"id": 2, "model_version": served},
                            {"id": 3, "model_version": gan}, {"id": 4, "model_version": "tessera-default-v0003"},
                            {"id": 5, "model_version": "tessera-p41-v0001"}, {"id": 6, "model_version": "yolo-v1"}]}
    assert predict_project.superseded(task, "4", served) == [1, 4]


@pytest.mark.parametrize("key, version, kind, text", [
    ("3", "v0002", "label", "tessera-p3-v0002"),
    ("3", "v0002", "gan", "tessera-p3-gan-v0002"),
    (DEFAULT_KEY, "v0001", "gan", "tessera-default-gan-v0001"),
    ("12", "v12345", "label", "tessera-p12-v12345"),
])
def test_version_strings_round_trip(key, version, kind, text):
    assert version_string(key, version, kind) == text
    assert parse_version(text) == ParsedVersion(key, version, kind)


@pytest.mark.parametrize("text", ["", "v0002", "tessera-untrained", "tessera-p3-v2", "tessera-px-v0002",
                                  "tessera-p3-v0002-x", None, 3])
def test_other_versions_do_not_parse(text):
    assert parse_version(text) is None

