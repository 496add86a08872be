"""The Predictor's predict path at native size: bounded forward batches give the masks of one big batch."""
import numpy as np
import torch

from tessera.model import inference
from tessera.model.data import make_nuclei
from tessera.model.inference import Predictor
from tessera.model.vqvae import VQVAE, VQVAEConfig


def _tiny_predictor(scale=0.5):
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(resolution=64, n_labels=3, widths=(8, 16, 16, 16), codebook_size=16, embed_dim=8))
    return Predictor(model, ["nucleus"], device="cpu", scale=scale, tile=256, overlap=16)


def test_forward_batches_stay_under_the_pixel_budget_and_change_no_mask(monkeypatch):
    pred = _tiny_predictor()
    images = [s.image for s in make_nuclei(7, size=(96, 128), seed=4)]     # each 48x64 at the model's input
    whole = pred.predict(images)
    shapes = []
    run = pred._run

    def counted(batch):
        shapes.append(len(batch))
        return run(batch)

    monkeypatch.setattr(pred, "_run", counted)
    monkeypatch.setattr(inference, "BATCH_PX", 48 * 64 * 3)                # three images per pass
    parts = pred.predict(images)
    assert shapes == [3, 3, 1]
    for a, b in zip(whole, parts):
        assert np.array_equal(a.instances, b.instances) and np.array_equal(a.classes, b.classes)
        # scores within float noise: oneDNN's bf16 kernels may sum in another order at another batch size
        assert a.instance_score.keys() == b.instance_score.keys()
        assert all(abs(a.instance_score[k] - b.instance_score[k]) < 1e-4 for k in a.instance_score)
        assert abs(a.score - b.score) < 1e-4
