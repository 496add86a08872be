"""Acquisition (model/acquisition.py): diverse picks, the per-task priority, image embeddings of a
trained label model."""

import numpy as np
import torch

from tessera.model import acquisition
from tessera.model.data import make_nuclei
from tessera.model.inference import Predictor
from tessera.model.train_vqvae import TrainConfig, train


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_select_covers_clusters_before_repeating():
    rng = np.random.default_rng(0)
    common = _unit(np.array([1.0, 0, 0]) + 0.05 * rng.standard_normal((40, 3)))
    rare = _unit(np.array([0, 1.0, 0]) + 0.05 * rng.standard_normal((4, 3)))
    pool = np.concatenate([common, rare])
    picks = acquisition.select(pool, common[:3], 2)
    assert any(p >= 40 for p in picks[:1]), picks           # the uncovered (rare) cluster comes first
    assert len(set(acquisition.select(pool, np.zeros((0, 3), np.float32), 10))) == 10


def test_priority_needs_uncertainty_and_novelty():
    labelled = _unit([[1.0, 0, 0]])
    emb = _unit([[1.0, 0.01, 0], [0, 1.0, 0], [0, 1.0, 0.01]])
    prio = acquisition.priority(emb, labelled, [0.2, 0.2, 0.99])
    assert prio[1] > prio[0] and prio[1] > prio[2] and np.all((0 <= prio) & (prio <= 1))


def _tiny(train_set, val, path):
    """A 2-iteration label model (its features are what the tests compare, not its quality)."""
    torch.set_num_threads(1)
    cfg = TrainConfig(max_iters=2, eval_interval=2, device="cpu", resolution=32, crop=32, widths=(8, 8, 16, 16),
                      codebook_size=16, embed_dim=8, batch_size=2)
    return train(cfg, train_set, val, ["nucleus"], path)


def test_embeddings_of_a_trained_model(tmp_path):
    data = make_nuclei(3, size=64, seed=0)
    predictor = Predictor.from_checkpoint(_tiny(data, [], tmp_path / "m.pt"), device="cpu")
    ref = acquisition.embed(predictor, [s.image for s in data])
    emb = acquisition.embed(predictor, [s.image for s in data] + [np.zeros((64, 64, 3), np.uint8)])
    assert emb.shape == (4, ref.shape[1]) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-3)
    d = acquisition.distance_to_set(emb, ref)
    assert d[:3].max() < 0.01 < d[3]                          # a training image is covered, a blank one is not
    ref = acquisition.code_histogram(predictor, [s.image for s in data])
    hist = acquisition.code_histogram(predictor, [s.image for s in data] + [np.zeros((64, 64, 3), np.uint8)])
    assert hist.shape == (4, 16)                              # one row per image, one column per code
    assert np.allclose((hist ** 2).sum(1), 1, atol=1e-4)      # square roots of histograms: unit rows
    assert acquisition.distance_to_set(hist[:3], ref).max() < 1e-3   # the same images: covered
    # (a 2-iteration model gives a blank image the nuclei's codes, so "a blank one is far" is not asserted)


def test_a_checkpoint_carries_the_embeddings_of_the_images_people_labelled(tmp_path):
    data = make_nuclei(4, size=64, seed=0)
    fake = make_nuclei(1, size=64, seed=9)[0]
    fake.synthetic = True
    path = _tiny(data[:3] + [fake], data[3:], tmp_path / "m.pt")
    ref = torch.load(path, weights_only=True)["labelled_embeddings"]
    assert ref.dtype == torch.float16 and ref.shape[0] == 4      # 3 trained on + 1 held back; not the synthetic one
    predictor = Predictor.from_checkpoint(path, device="cpu")
    emb = acquisition.embed(predictor, [s.image for s in data + [fake]])
    assert np.allclose(predictor.reference, emb[:4], atol=2e-3)
    assert acquisition.novelty(emb[:4], predictor.reference).max() < 2e-3


def test_the_reference_keeps_the_farthest_first_picks_above_its_cap(tmp_path):
    data = make_nuclei(3, size=64, seed=0)
    predictor = Predictor.from_checkpoint(_tiny(data, [], tmp_path / "m.pt"), device="cpu")
    images = [data[0].image, data[0].image, data[0].image, np.zeros((64, 64, 3), np.uint8)]
    ref = acquisition.reference(predictor, images, cap=2)
    assert ref.shape[0] == 2                                  # the duplicates are one pick, the blank image the other
    assert acquisition.novelty(acquisition.embed(predictor, images), ref.astype(np.float32)).max() < 2e-3
