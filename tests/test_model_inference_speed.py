"""The Predictor's predict path at native size: bounded forward batches give the masks of one big batch."""
import numpy as np
import torch
import torch.nn.functional as F

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
    net = pred._net

    def counted(x):
        shapes.append(x.shape[0])
        return net(x)

    monkeypatch.setattr(pred, "_net", counted)
    monkeypatch.setattr(inference, "BATCH_PX", 48 * 64 * 3)                # three images per pass
    parts = pred.predict(images)
    assert shapes == [3, 3, 1]
    for a, b in zip(whole, parts):
        assert np.array_equal(a.instances, b.instances) and np.array_equal(a.classes, b.classes)
        # scores within float noise: oneDNN's bf16 kernels may sum in another order at another batch size
        assert a.instance_score.keys() == b.instance_score.keys()
        assert all(abs(a.instance_score[k] - b.instance_score[k]) < 1e-4 for k in a.instance_score)
        assert abs(a.score - b.score) < 1e-4


def test_upsampled_probabilities_match_torch_bilinear():
    """_unletterbox's OpenCV resize gives torch's bilinear (align_corners=False) probabilities: odd sizes,
    up and down, the boundary class's weight undone."""
    import math

    pred = _tiny_predictor()
    pred.edge_weight = 3.0
    torch.manual_seed(1)
    logits = torch.randn(3, 40, 56) * 4
    for size, shape in (((37, 53), (97, 131)), ((40, 56), (40, 56)), ((33, 50), (20, 31)), ((1, 9), (3, 30))):
        got = pred._unletterbox(logits, size, shape)
        crop = logits[None, :, :size[0], :size[1]].clone()
        crop[:, -1] -= math.log(3.0)
        ref = F.softmax(F.interpolate(crop, size=shape, mode="bilinear", align_corners=False)[0], dim=0).numpy()
        assert got.shape == (3, *shape)
        assert np.abs(got - ref).max() < 1e-4, (size, shape)


def _decode_upsampling_first(decoder, z, feats):
    """The Decoder in its textbook order: the path upsampled to each skip's size, then the step (whose
    1x1 projection then runs on 4x the pixels)."""
    h = F.silu(decoder.inp(z))
    for step, f in zip(decoder.steps, reversed(feats)):
        if h.shape[-2:] != f.shape[-2:]:
            h = F.interpolate(h, size=f.shape[-2:], mode="nearest")
        h = step(h, f)
    return decoder.out(h)


def test_decoder_projecting_before_upsampling_gives_the_same_logits():
    """model/vqvae.py's fine decoder steps project (1x1) before the nearest 2x upsampling: the same logits
    as upsampling first, under bf16 autocast and in float32, on an odd-sized batch."""
    pred = _tiny_predictor()
    torch.manual_seed(2)
    for p in pred.model.decoder.parameters():           # an untrained GroupNorm is the identity: stir it
        p.data += 0.1 * torch.randn_like(p)
    x = torch.rand(2, 3, 56, 72)
    for bf16 in (False, True):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            feats = pred.model.features(x)
            z = torch.randn(2, 8, 7, 9).to(feats[-1].dtype)
            got = pred.model.decoder(z, feats)
            ref = _decode_upsampling_first(pred.model.decoder, z, feats)
        assert got.dtype == ref.dtype and got.shape == ref.shape == (2, 3, 56, 72)
        assert torch.equal(got, ref), (bf16, (got.float() - ref.float()).abs().max())


def test_sliding_window_gives_the_same_logits_one_tile_per_pass_or_four():
    pred = _tiny_predictor()
    pred.tile, pred.overlap = 64, 8
    torch.manual_seed(3)
    x = torch.rand(1, 3, 136, 200)                      # 3 x 4 tiles of unequal overlap
    with torch.inference_mode():
        one, four = pred._tiled_logits(x), pred._tiled_logits(x, batch=4)
    assert one.shape == (1, 3, 136, 200)
    # bf16 kernels may sum in another order per batch size: within their rounding, and the same labels
    assert (one - four).abs().max() < 2e-2 * four.abs().max()
    assert (one.argmax(1) == four.argmax(1)).float().mean() > 0.999


def test_predict_parts_finished_later_give_predicts_masks():
    pred = _tiny_predictor()
    pred.tile = 64                                      # the 150x200 image goes through the sliding window
    images = [s.image for s in make_nuclei(2, size=(90, 130), seed=6)] + [make_nuclei(1, size=(150, 200))[0].image]
    whole = pred.predict(images)
    finishers = pred.predict_parts(images)
    parts = [f() for f in reversed(finishers)][::-1]    # in any order, after all the passes
    for a, b in zip(whole, parts):
        assert np.array_equal(a.instances, b.instances) and np.array_equal(a.classes, b.classes)
        assert a.instance_label == b.instance_label


def test_bf16_autocast_only_where_the_cpu_has_bf16_instructions():
    """oneDNN runs bf16 on any AVX-512 CPU, converting where the CPU has no bf16 instructions, and there it is
    2.4-3.1x slower than float32: the predictor and training use bf16 only with AVX512-BF16 or AMX."""
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert flags, "no CPU flags in /proc/cpuinfo"
    onednn = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    native = bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
    assert inference.bf16_supported(torch.device("cpu")) == (onednn and native)
    assert _tiny_predictor().bf16 == (onednn and native)
