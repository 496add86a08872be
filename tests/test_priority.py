"""Task scores that rank by what labelling a task adds (issue 11 §5): 1 - (1 - confidence) x novelty, where
novelty is an image's distance to the images the served version learned from (model/acquisition.py). A
task like a labelled one sorts last, one unlike anything labelled and uncertain first; TESSERA_SORT=score
keeps the plain confidence."""
import cv2
import numpy as np
import pytest
import torch

from tessera.backend import predictions
from tessera.backend.label_config import parse_label_config
from tessera.backend.predictions import Served, predict_tasks, ranked_score
from tessera.backend.settings import Settings
from tessera.model.data import make_nuclei
from tessera.model.train_vqvae import TrainConfig, train
from tests.conftest import CONFIG_ALL


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    """A small label model trained on 8 procedural nuclei images (4 held back), and those images."""
    torch.set_num_threads(1)
    data = make_nuclei(12, size=96, seed=3)
    cfg = TrainConfig(max_iters=60, eval_interval=30, device="cpu", resolution=64, crop=64, widths=(8, 16, 16, 32),
                      codebook_size=32, embed_dim=8, batch_size=4)
    return train(cfg, data[:8], data[8:], ["Nucleus"], tmp_path_factory.mktemp("prio") / "m.pt"), data


def _images(data):
    seen = [s.image for s in data[:3]]                                     # learned from
    new = [s.image for s in make_nuclei(3, size=96, seed=99)]              # the same kind, other images
    # another kind of image: smooth colour photos, no nuclei
    rng = np.random.default_rng(0)
    odd = [cv2.resize(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), (96, 96), interpolation=cv2.INTER_CUBIC)
           for _ in range(2)]
    return {f"seen{i}": im for i, im in enumerate(seen)} | {f"new{i}": im for i, im in enumerate(new)} | \
        {f"odd{i}": im for i, im in enumerate(odd)}


class Media:
    def __init__(self, images):
        self.images = images

    def load_working(self, ref, task_id=None):
        im = self.images[ref]
        return im, im.shape[:2]


def _scores(path, images, sort):
    settings = Settings(sort=sort, predict_batch=4)
    predictor = predictions._load_predictor(path, "cpu", settings)
    tasks = [{"id": i, "data": {"image": k}} for i, k in enumerate(images)]
    out = predict_tasks(tasks, parse_label_config(CONFIG_ALL), Served("v1", predictor), Media(images), settings)
    return {k: o["score"] for k, o in zip(images, out)}, out


def test_labelled_images_sort_last_and_another_modality_first(version):
    path, data = version
    images = _images(data)
    plain, plain_items = _scores(path, images, "score")
    ranked, ranked_items = _scores(path, images, "priority")
    # the regions are the same: only the score ranks differently
    assert [o["result"] for o in plain_items] == [o["result"] for o in ranked_items]
    assert all(ranked[k] >= plain[k] - 1e-4 for k in images), (plain, ranked)        # never below the confidence
    assert max(plain.values()) < 0.9, plain            # this short-trained model is unsure of everything ...
    assert all(ranked[k] > 0.99 for k in images if k.startswith("seen")), ranked   # ... but these it learned from
    # by confidence alone the photos come last (the model is sure they hold no nucleus); ranked, first
    assert set(sorted(images, key=plain.get)[-2:]) == {"odd0", "odd1"}, plain
    order = sorted(images, key=ranked.get)                                             # "Sort by Prediction score"
    assert set(order[:2]) == {"odd0", "odd1"}, sorted(ranked.items(), key=lambda kv: kv[1])
    assert set(order[-3:]) == {"seen0", "seen1", "seen2"}, ranked


def test_sort_score_or_a_version_without_embeddings_gives_the_plain_confidence(version, tmp_path):
    path, data = version
    images = _images(data)
    plain, _ = _scores(path, images, "score")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["labelled_embeddings"]                    # a version trained before stop 25
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    assert _scores(old, images, "priority")[0] == plain


def test_ranked_score():
    assert ranked_score(0.7, None) == 0.7
    assert ranked_score(0.7, 0.0) == 1.0 and ranked_score(0.7, 1.0) == pytest.approx(0.7)
    assert ranked_score(0.2, 0.5) == pytest.approx(0.6)


def test_a_failing_embedding_leaves_the_plain_scores(version, monkeypatch):
    path, data = version
    images = _images(data)
    plain, _ = _scores(path, images, "score")

    def broken(*a, **kw):
        raise RuntimeError("embedding bug")

    from tessera.model import acquisition
    monkeypatch.setattr(acquisition, "embed", broken)
    assert _scores(path, images, "priority")[0] == plain
