"""Native-size inference: the object scale learned in training, the sliding window, scaled training crops."""
import numpy as np
import pytest
import torch

from tessera.model.checkpoint import load_checkpoint
from tessera.model.data import make_nuclei
from tessera.model.inference import Predictor, letterbox_floor, object_scale, scaled_size
from tessera.model.train_vqvae import Batcher, TrainConfig, letterbox_set, train
from tessera.model.vqvae import VQVAE, VQVAEConfig


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return VQVAE(VQVAEConfig(resolution=64, n_labels=3, widths=(8, 16, 16, 16), codebook_size=16, embed_dim=8))


def test_object_scale_follows_the_objects():
    inst = np.zeros((100, 100), np.int32)
    inst[0:20, 0:20], inst[50:70, 50:70] = 1, 2                       # sqrt(area) = 20 px
    assert object_scale([inst], object_px=5.0) == pytest.approx(0.25)
    assert object_scale([inst], object_px=40.0) == 1.0                # never closer than native pixels
    assert object_scale([inst], object_px=40.0, max_scale=4.0) == pytest.approx(2.0)
    assert object_scale([np.zeros((8, 8), np.int32)], object_px=5.0) == 1.0   # no objects: native


def test_sliding_window_matches_one_pass():
    """A fully convolutional net over tiles blended in their overlaps gives (nearly) the one-pass logits."""
    model = _tiny_model()
    one = Predictor(model, ["nucleus"], device="cpu", scale=1.0, tile=1024)
    tiled = Predictor(model, ["nucleus"], device="cpu", scale=1.0, tile=64, overlap=24)
    image = make_nuclei(1, size=(150, 170), seed=5)[0].image
    a, b = one._probabilities([image])[0], tiled._probabilities([image])[0]
    assert a.shape == b.shape == (3, 150, 170)
    assert np.abs(a - b).mean() < 0.02


def test_predict_mixed_sizes_keeps_order_and_sizes():
    pred = Predictor(_tiny_model(), ["nucleus"], device="cpu", scale=0.5, tile=64, overlap=16)
    sizes = [(40, 60), (300, 200), (40, 60), (17, 9), (256, 256)]
    images = [np.full((h, w, 3), 40 * i, np.uint8) for i, (h, w) in enumerate(sizes)]
    preds = pred.predict(images)
    assert [p.instances.shape for p in preds] == sizes
    single = pred.predict([images[2]])[0]
    assert np.array_equal(single.classes, preds[2].classes)            # batching does not change a result


def test_training_stores_the_scale_and_the_predictor_uses_it(tmp_path):
    samples = make_nuclei(6, size=(96, 128), seed=2)
    cfg = TrainConfig(max_iters=2, batch_size=2, device="cpu", eval_interval=1, resolution=64, crop=32,
                      widths=(8, 16, 16, 16), codebook_size=16, embed_dim=8, object_px=3.0)
    ckpt = train(cfg, samples[:4], samples[4:], ["nucleus"], tmp_path / "m.pt")
    payload = load_checkpoint(ckpt, "vqvae")
    expected = object_scale([s.instances for s in samples[:4]], 3.0)
    assert payload["scale"] == pytest.approx(expected) and 0 < expected < 1
    pred = Predictor.from_checkpoint(ckpt, device="cpu")
    assert pred.scale == pytest.approx(expected)
    x, sizes = pred._prepare([samples[0].image])
    assert sizes == [scaled_size(96, 128, expected)] and x.shape[-1] % 8 == 0 and x.shape[-2] % 8 == 0
    assert pred.predict([samples[5].image])[0].instances.shape == (96, 128)


def test_old_checkpoints_still_letterbox(tmp_path):
    pred = Predictor(_tiny_model(), ["nucleus"], device="cpu")      # scale None: as before scales were learned
    x, sizes = pred._prepare([np.zeros((300, 150, 3), np.uint8)])
    assert x.shape == (1, 3, 64, 64) and sizes == [(64, 32)]


def test_training_crops_are_at_the_object_scale():
    """Crops show objects at object_px model pixels whatever the image size (zoom augmentation aside)."""
    big = make_nuclei(1, size=(400, 400), seed=1)[0]
    cfg = TrainConfig(resolution=64, crop=32, scale_min=1.0, scale_max=1.0, rot90=False, flips=False, jitter=0)
    scale = 0.25
    batcher = Batcher([big], cfg, 1, seed=0, scale=scale)
    _, target = batcher.sample(0)
    fg_model = (1 - target[:, :, 0]).sum()
    # a 32 x 32 crop of the 100 x 100 scaled image: ~ 1/10 of the scaled foreground on average
    fg_scaled = (big.classes > 0).sum() * scale ** 2
    assert target.shape[:2] == (32, 32) and fg_model <= fg_scaled + 1
    val_x, val_t = letterbox_set([big], VQVAEConfig(resolution=64, n_labels=3), 1, scale)
    assert val_x.shape == (1, 3, 64, 64) and val_t.shape == (1, 3, 64, 64)


def test_equal_tiles_cover_the_image_with_the_overlap():
    from tessera.model.inference import _starts

    assert _starts(300, 512, 32) == (300, [0])
    for n, tile, overlap in [(1232, 512, 32), (520, 512, 32), (2048, 512, 32), (150, 64, 24), (1000, 96, 8)]:
        side, starts = _starts(n, tile, overlap)
        assert side <= tile and side % 8 == 0 and starts[0] == 0 and starts[-1] + side == n
        assert all(b - a <= side - overlap for a, b in zip(starts, starts[1:]))     # every seam overlaps
        k = -(-(n - overlap) // (tile - overlap))
        assert len(starts) == k                                                    # the fewest tiles
    assert _starts(1232, 512, 32)[0] == 432                                        # not 3 x 512


def test_each_tile_answers_for_the_boxes_centred_in_its_part_of_the_image():
    """The sliding window's box head: a tile keeps only the boxes whose centre lies in its core (the image cut
    at the middle of every overlap), so an object across a tile's edge is not boxed again from its cut part
    there; the cores cover the image once."""
    from tessera.model.inference import _cores, _starts

    for n, tile, overlap in [(1232, 512, 32), (520, 512, 32), (150, 64, 24), (300, 512, 32)]:
        side, starts = _starts(n, tile, overlap)
        cores = _cores(n, side, starts)
        assert cores[0][0] == 0 and cores[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(cores, cores[1:]))                # no gap, no overlap
        for (lo, hi), s in zip(cores, starts):                                     # half an overlap from
            assert lo == 0 or lo - s >= overlap / 2                                # the tile's inner edges
            assert hi == n or s + side - hi >= overlap / 2
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(resolution=64, n_labels=3, widths=(8, 16, 16, 16), codebook_size=16, embed_dim=8,
                              box_classes=1))
    with torch.no_grad():
        model.box_head.heat.bias.fill_(3.0)         # an untrained head that fires everywhere, peaks at random
    pred = Predictor(model, ["nucleus"], device="cpu", scale=1.0, tile=64, overlap=24, bf16=False)
    x = torch.rand(1, 3, 150, 150)
    dets = []
    pred._tiled_logits(x, dets=dets)
    side, starts = _starts(150, 64, 24)
    cores = _cores(150, side, starts)
    spans = [(cy, cx) for cy in cores for cx in cores]
    assert len(dets) == len(spans) and sum(map(len, dets)) > 50
    for d, ((y0, y1), (x0, x1)) in zip(dets, spans):
        cy, cx = (d[:, 1] + d[:, 3]) / 2, (d[:, 0] + d[:, 2]) / 2
        assert ((cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)).all()


def test_inference_copy_computes_what_the_trained_model_does():
    """BatchNorm folded into the convolutions and the expected code embedding as matrix products give
    the trained model's own segment() logits (float32), and leave the caller's model untouched."""
    model = _tiny_model(3)
    with torch.no_grad():                                              # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    pred = Predictor(model, ["nucleus"], device="cpu", scale=1.0, bf16=False)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in pred.model.modules())
    x = torch.rand(2, 3, 48, 64)
    want, want_codes = model.segment(x)
    _, query, got = pred._forward(x)
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.allclose(pred._code_logits(query), want_codes, atol=1e-3)


def test_one_big_object_per_image_is_not_shrunk_below_the_letterbox(tmp_path):
    """A photo of one animal (object ~ the image) at object_px would be a few px across and its class never
    predicted (bench.rare_label: Bengal 0.0 IoU): the learned scale stops at the letterbox's scale of a typical
    training image."""
    samples = make_nuclei(4, size=(96, 128), seed=3)
    for s in samples:                                       # one object filling most of the image
        s.classes[:] = 0
        s.instances[:] = 0
        s.classes[8:88, 8:120], s.instances[8:88, 8:120] = 1, 1
    assert object_scale([s.instances for s in samples], 3.0) < 0.05       # what the objects alone would give
    assert letterbox_floor([s.image.shape[:2] for s in samples], 64) == pytest.approx(0.5)
    cfg = TrainConfig(max_iters=1, batch_size=2, device="cpu", eval_interval=10, resolution=64, crop=32,
                      widths=(8, 16, 16, 16), codebook_size=16, embed_dim=8, object_px=3.0)
    payload = load_checkpoint(train(cfg, samples, [], ["animal"], tmp_path / "m.pt"), "vqvae")
    assert payload["scale"] == pytest.approx(0.5)           # 128 px -> 64 = R, as letterboxing showed it
    assert letterbox_floor([(300, 200), (100, 400), (256, 256)], 120) == pytest.approx(0.4)   # median long side


def test_small_objects_keep_their_learned_scale():
    """Where the objects are small the floor does not bind (dsb2018: 0.49 learned, floor 0.5 ... at 256 px
    it would; here 20 px objects in 400 px images)."""
    inst = np.zeros((400, 400), np.int32)
    inst[0:20, 0:20], inst[50:70, 50:70] = 1, 2
    floor = letterbox_floor([(400, 400)], 64)                                  # 0.16
    assert object_scale([inst], object_px=10.0, min_scale=floor) == pytest.approx(0.5)
    assert object_scale([inst], object_px=1.0, min_scale=floor) == pytest.approx(0.16)


def _sloppy_disk(H=160, scale=0.5, grow=1):
    """A bright disk on a dark image, and probabilities (bg, object, boundary) as a model seeing it at `scale`
    might give them: the disk `grow` model px too wide and blurred on the model's grid, upsampled."""
    import cv2

    yy, xx = np.mgrid[:H, :H]
    disk = (yy - 80) ** 2 + (xx - 76) ** 2 < 30 ** 2
    image = np.where(disk, 200, 30).astype(np.uint8)
    h = int(H * scale)
    small = cv2.resize(disk.astype(np.uint8), (h, h), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(cv2.dilate(small, np.ones((2 * grow + 1,) * 2, np.uint8)).astype(np.float32), (0, 0), 1.5)
    fg = cv2.resize(small, (H, H), interpolation=cv2.INTER_LINEAR).clip(0, 1)
    return image, disk, np.stack([1 - fg, 0.8 * fg, 0.2 * fg]).astype(np.float32), (h, h)


def test_masks_follow_the_image_edges_where_the_model_saw_it_smaller():
    from tessera.model.inference import follow_edges

    image, disk, probs, size = _sloppy_disk()
    iou = lambda p: ((p[0] < 0.5) & disk).sum() / ((p[0] < 0.5) | disk).sum()
    before = iou(probs)
    ratio = probs[2] / np.maximum(probs[1], 1e-9)
    out = follow_edges(probs.copy(), image, size)
    assert before < 0.85 and iou(out) > 0.95, (before, iou(out))
    assert np.allclose(out.sum(0), 1, atol=1e-5) and out.min() >= 0 and out.max() <= 1
    fg = out[1] > 1e-3                     # the boundary keeps its share of the foreground: objects still part
    assert np.allclose(out[2][fg] / out[1][fg], ratio[fg], rtol=1e-3)
    rgb = follow_edges(probs.copy(), np.repeat(image[..., None], 3, 2), size)   # a colour image: its grey
    assert np.allclose(rgb, out, atol=1e-5)
    same = probs.copy()                    # seen at its own size or closer: untouched
    assert np.array_equal(follow_edges(same, image, (160, 160)), probs)


def test_edge_following_is_a_smoothing_on_a_flat_image():
    """A flat image (a blank frame, a saturated scan) has no edges to follow: the background is the network's,
    smoothed, not float32 rounding of bright grey levels divided by a zero variance."""
    from tessera.model.inference import follow_edges

    _, _, probs, size = _sloppy_disk()
    for level in (0, 80, 255):
        flat = np.full(probs.shape[1:], level, np.uint8)
        out = follow_edges(probs.copy(), flat, size)
        assert np.isfinite(out).all() and np.allclose(out.sum(0), 1, atol=1e-5)
        assert np.abs(out[0] - probs[0]).mean() < 0.05, level


def test_the_served_predictor_follows_its_versions_choice_unless_turned_off(tmp_path):
    """A mask model decides on its held-back tasks whether its masks follow the image's edges, keeps the choice
    (and what it rests on) in the checkpoint, and the served predictor applies it; TESSERA_FOLLOW_EDGES=false
    turns it off; checkpoints from before the choice follow the edges; box models never do."""
    from tessera.backend.predictions import _load_predictor
    from tessera.backend.settings import Settings
    from tessera.model.checkpoint import save_checkpoint

    samples = make_nuclei(6, size=(96, 128), seed=2)
    cfg = TrainConfig(max_iters=2, batch_size=2, device="cpu", eval_interval=1, resolution=64, crop=32,
                      widths=(8, 16, 16, 16), codebook_size=16, embed_dim=8, object_px=3.0)
    ckpt = train(cfg, samples[:4], samples[4:], ["nucleus"], tmp_path / "m.pt")
    c = load_checkpoint(ckpt, "vqvae")
    edges = c["follow_edges"]
    assert edges["n_images"] == 2 and edges["on"] == (edges["miou_on"] > edges["miou_off"])
    assert c["metrics"]["follow_edges"] == edges["on"] and c["metrics"]["follow_edges_images"] == 2
    assert _load_predictor(ckpt, "cpu", Settings()).follow_edges == edges["on"]
    served = {}
    for on in (True, False, None):                  # None: a checkpoint from before the choice
        c["follow_edges"] = None if on is None else {**edges, "on": on}
        save_checkpoint(c, tmp_path / f"{on}.pt")
        served[on] = _load_predictor(tmp_path / f"{on}.pt", "cpu", Settings())
        assert served[on].follow_edges == (on is not False)
        assert not _load_predictor(tmp_path / f"{on}.pt", "cpu", Settings(follow_edges=False)).follow_edges
    assert served[True].scale < 1
    image = samples[5].image
    assert not np.allclose(served[True]._probabilities([image])[0], served[False]._probabilities([image])[0],
                           atol=1e-4)
    assert not Predictor(_tiny_model(), ["nucleus"], device="cpu", scale=0.5, box_shrink=0.6).follow_edges


def test_a_version_keeps_the_outlines_its_held_back_tasks_agree_with(trained_model_dir):
    """The choice follows the held-back labels: where they are the masks the network draws itself (a project
    whose people accepted its outlines), following the image's edges only moves them away, so it stays off;
    where they are the edge-following masks, it is on. A box model has no choice to make."""
    from tessera.model.data import Sample
    from tessera.model.train_vqvae import choose_follow_edges, raw_predictions

    ckpt = next(p for p in sorted(trained_model_dir.rglob("model.pt")))
    pred = Predictor.from_checkpoint(ckpt, device="cpu")
    pred.scale = 0.5                                # the images seen at half their pixels, where the filter acts
    images = [s.image for s in make_nuclei(4, size=192, seed=5)]
    for truth_on in (False, True):
        pred.follow_edges = truth_on
        held = [Sample(im, p.classes, p.instances, id=str(i))
                for i, (im, p) in enumerate(zip(images, pred.predict(images, cut=False)))]
        assert sum(int(p.classes.any()) for p in held) >= 3
        pred.follow_edges = True
        passes = []
        edges = choose_follow_edges(pred, held, batch_size=3, keep=passes)
        assert edges["on"] is truth_on and pred.follow_edges is truth_on and edges["n_images"] == 4
        # its passes, finished as chosen, are the held-back raw predictions a version's cut is learned on
        raws, again = [f() for f in passes], raw_predictions(pred, held, batch_size=3)
        assert len(raws) == 4 and all(np.array_equal(a.classes, b.classes) and np.array_equal(a.instances, b.instances)
                                      for a, b in zip(raws, again))
        own, other = (edges["miou_on"], edges["miou_off"]) if truth_on else (edges["miou_off"], edges["miou_on"])
        assert own == 1.0 and other < 1.0, edges
    box = Predictor(_tiny_model(), ["nucleus"], device="cpu", scale=0.5, box_shrink=0.6)
    assert choose_follow_edges(box, held) is None and not box.follow_edges
