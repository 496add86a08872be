"""predict()'s network pass through TorchScript traces per input shape (model/traced.py): the same numbers as
eager, a trace only for a shape that recurs, one per shape, bounded, and one Python call per pass. (What the
trace is for, a pass that does not wait for the GIL per op, is measured in bench.speed --native --ls-tasks,
not timed here: bench/HISTORY.md, stop 20.)"""
import numpy as np
import torch

from tessera.model.data import make_nuclei
from tessera.model.inference import Predictor
from tessera.model.traced import TracedPasses
from tessera.model.vqvae import VQVAE, VQVAEConfig


def _model(seed=0, box_classes=0):
    torch.manual_seed(seed)
    return VQVAE(VQVAEConfig(resolution=64, n_labels=3, widths=(8, 16, 16, 16), codebook_size=16, embed_dim=8,
                             box_classes=box_classes))


def _same(a, b):
    assert np.array_equal(a.classes, b.classes) and np.array_equal(a.instances, b.instances)
    assert a.instance_label == b.instance_label and a.instance_score == b.instance_score
    assert a.score == b.score and a.boxes == b.boxes


def test_traced_predictions_equal_eager_ones_for_every_shape():
    """Three rounds over images of two sizes (one of them with odd model sizes, where the decoder's
    upsampling branch differs) and a tiled one: the second round on is traced, and equals eager bit for bit."""
    model = _model()
    eager = Predictor(model, ["nucleus"], device="cpu", scale=0.5, tile=64, overlap=16)
    traced = Predictor(model, ["nucleus"], device="cpu", scale=0.5, tile=64, overlap=16, trace=True)
    images = [s.image for s in make_nuclei(2, size=(96, 120), seed=1)]
    images += [make_nuclei(1, size=(70, 90), seed=2)[0].image, make_nuclei(1, size=(200, 260), seed=3)[0].image]
    want = eager.predict(images)
    for _ in range(3):
        for a, b in zip(want, traced.predict(images)):
            _same(a, b)
    assert len(traced._passes) >= 2                   # the recurring shapes run traced now


def test_box_head_outputs_are_traced_too():
    model = _model(box_classes=1)
    eager = Predictor(model, ["nucleus"], device="cpu", scale=1.0)
    traced = Predictor(model, ["nucleus"], device="cpu", scale=1.0, trace=True)
    images = [s.image for s in make_nuclei(2, size=(64, 64), seed=4)]
    want = eager.predict(images, cut=False)
    for _ in range(3):
        for a, b in zip(want, traced.predict(images, cut=False)):
            _same(a, b)
    assert len(traced._passes) == 1


class _Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1                               # runs in Python only when eager (or while tracing)
        return (self.conv(x),)


def test_a_shape_is_traced_when_it_recurs_and_traces_stay_bounded():
    m = _Counting()
    passes = TracedPasses(m, after=2, size=2)
    x = {s: torch.rand(1, 3, s, s) for s in (8, 16, 24)}
    with torch.no_grad():
        passes(x[8])
        assert len(passes) == 0 and m.calls == 1     # seen once: eager
        passes(x[8])                                  # second time: traced (one Python call while tracing)
        calls = m.calls
        for _ in range(3):
            out = passes(x[8])[0]
        assert m.calls == calls                       # traced: the module's Python no longer runs
        assert torch.equal(out, m.conv(x[8]))
        for s in (16, 24):
            passes(x[s]), passes(x[s])
        assert len(passes) == 2                       # the least recently used trace (8) was dropped ...
        calls = m.calls
        passes(x[8]), passes(x[8])
        assert m.calls == calls + 2 and len(passes) == 2   # ... and its shape stays eager: no retracing


def test_the_served_predictor_traces_and_others_do_not(tmp_path):
    """The server loads versions through predictions._load_predictor: traced passes there (the encoder thread
    runs beside them), eager ones for training's short-lived validation Predictors."""
    from tessera.backend.predictions import _load_predictor
    from tessera.model.checkpoint import save_checkpoint

    model = _model()
    path = tmp_path / "model.pt"
    save_checkpoint({"kind": "vqvae", "model": model.state_dict(), "model_config": vars(model.config),
                     "label_names": ["nucleus"], "scale": 1.0}, path)
    assert isinstance(_load_predictor(path, "cpu")._passes, TracedPasses)
    assert not isinstance(Predictor.from_checkpoint(path, device="cpu")._passes, TracedPasses)
