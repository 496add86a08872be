"""Training and inference tests: a tiny CPU run on procedural nuclei reaches a useful IoU, its checkpoint
rebuilds the same predictor, touching nuclei come apart, hints get cleaner, annotations get checked."""

import dataclasses
import time

import cv2
import numpy as np
import pytest
import torch

from tessera.model import metrics
from tessera.model.data import make_nuclei
from tessera.model.inference import Prediction, Predictor, soft_target, split_instances
from tessera.model.data import Sample
from tessera.model.train_vqvae import (MAX_REPEAT, Batcher, TrainConfig, class_draw_weights, compute_losses,
                                       contact_weights, evaluate, inner_edge_weights, train)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_train_config():
    """A small, fast TrainConfig for CPU tests."""
    return TrainConfig(max_iters=300, eval_interval=100, log_interval=50, batch_size=8, lr=5e-3, device="cpu",
                       threads=1, resolution=128, crop=64, widths=(8, 16, 32, 32), codebook_size=64, embed_dim=16,
                       bf16=False)  # no time budget, fp32: the same model on every machine


@pytest.fixture(scope="module")
def data():
    """Procedural nuclei at 128 px (train, val)."""
    return make_nuclei(24, size=128, seed=0), make_nuclei(6, size=128, seed=1)


@pytest.fixture(scope="module")
def trained(tiny_train_config, data, tmp_path_factory):
    """Checkpoint path, predictor and progress events of one tiny training run."""
    events = []
    t0 = time.time()
    path = train(tiny_train_config, data[0], data[1], ["nucleus"], tmp_path_factory.mktemp("ckpt"),
                 progress=events.append)
    print(f"tiny training took {time.time() - t0:.1f}s")
    return path, Predictor.from_checkpoint(path, device="cpu"), events


def test_from_args():
    cfg = TrainConfig.from_args(["--max_iters=7", "--lr=0.01", "--widths=8,16,32,32", "--flips=false"])
    assert (cfg.max_iters, cfg.lr, cfg.widths, cfg.flips) == (7, 0.01, (8, 16, 32, 32), False)
    with pytest.raises(ValueError):
        TrainConfig.from_args(["--no_such_field=1"])
    with pytest.raises(ValueError):
        TrainConfig.from_args(["--max_iters=many"])


@pytest.mark.parametrize("word, value", [("true", True), ("1", True), ("Yes", True), ("FALSE", False), ("0", False),
                                         ("no", False)])
def test_both_training_scripts_read_the_same_boolean_words(word, value):
    from tessera.model.train_maskgan import GANTrainConfig

    assert TrainConfig.from_args([f"--flips={word}"]).flips is value
    assert GANTrainConfig.from_args([f"--boundary={word}"]).boundary is value
    for cls, field in ((TrainConfig, "flips"), (GANTrainConfig, "boundary")):
        with pytest.raises(ValueError, match="true/false"):
            cls.from_args([f"--{field}=maybe"])


def test_both_training_loops_resolve_the_device_the_same_way(monkeypatch, data):
    """device='cuda' without CUDA is a clear ValueError in both loops (the GAN's used to fail inside torch)."""
    from tessera.model import train_maskgan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        train(TrainConfig(max_iters=1, device="cuda"), data[0][:2], [], ["nucleus"], "unused.pt")
    with pytest.raises(ValueError, match="CUDA is not available"):
        train_maskgan.train(train_maskgan.GANTrainConfig(max_iters=1, device="cuda"), data[0][:2], ["nucleus"],
                            "unused.pt")


def test_train_smoke(data, tmp_path):
    cfg = TrainConfig(max_iters=2, eval_interval=1, device="cpu", resolution=32, crop=32, widths=(8, 8, 16, 16),
                      codebook_size=16, embed_dim=8, batch_size=2)
    path = train(cfg, data[0][:2], data[1][:1], ["nucleus"], tmp_path / "model.pt")
    assert path == tmp_path / "model.pt" and path.is_file()


def test_contact_weights_are_high_where_objects_meet_and_zero_far_from_them():
    """Two touching squares and a lone one: the extra weight peaks on the contact (both sides), falls off
    with the distance from it, and is 0 on the lone object and on background far from objects."""
    inst = np.zeros((40, 60), np.int32)
    inst[10:20, 10:20], inst[10:20, 20:30], inst[28:38, 44:54] = 1, 2, 3
    w = contact_weights(inst, px=2.0, w0=5.0, sigma=1.0)
    assert w.shape == inst.shape and w.dtype == np.float32
    assert w[15, 19] == w[15, 20] == w.max() and 4.0 < w.max() <= 5.0       # w0 exp(-(0.5)^2 / 2)
    assert w[15, 19] > w[15, 17] > w[15, 14] > w[15, 12] == 0                # falls off into the objects
    assert w[:, 40:].max() == 0 and w[0, 0] == 0 and w[38:, :].max() == 0     # lone object, far background
    gap = np.zeros((20, 30), np.int32)
    gap[5:15, 2:12], gap[5:15, 14:24] = 1, 2                                 # a 2 px gap: its pixels weigh too
    assert contact_weights(gap, 1.0, 5.0)[10, 12] > 0.5                      # r = 2 px: 5 exp(-2)
    assert contact_weights(np.zeros((8, 8), np.int32), 1.0, 5.0).max() == 0


def test_contact_weights_stay_cheap():
    """A few OpenCV filters per crop, whatever the object count: a 192 px crop of 400 ids in a few ms."""
    inst = np.kron(np.arange(400, dtype=np.int32).reshape(20, 20), np.ones((10, 10), np.int32))[:192, :192]
    contact_weights(inst, 2.0, 5.0)
    t0 = time.perf_counter()
    for _ in range(10):
        contact_weights(inst, 2.0, 5.0)
    assert (time.perf_counter() - t0) / 10 < 0.05


def test_contact_weight_reaches_the_pixel_loss(data):
    """contact_weight > 0 (the default): batches carry the weights (B, S, S) and the weighted pixel loss is
    larger on a batch of touching objects; 0: no weights and the loss as before."""
    cfg = TrainConfig(resolution=32, crop=32, widths=(8, 8, 16, 16), codebook_size=16, embed_dim=8, jitter=0,
                      contact_weight=5.0)
    x, t, _, w = Batcher(data[0][:4], cfg, 1, seed=0).get_batch(4, "cpu")
    assert w.shape == (4, 32, 32) and w.dtype == torch.float32 and w.max() > 1 and w.min() == 0
    assert Batcher(data[0][:4], TrainConfig(resolution=32, crop=32), 1, seed=0).get_batch(4, "cpu")[3] is not None
    assert Batcher(data[0][:4], TrainConfig(resolution=32, crop=32, contact_weight=0.0), 1,
                   seed=0).get_batch(4, "cpu")[3] is None
    pix = _tiny_pixel_loss(x, t)
    plain, weighted, zero = pix(cfg), pix(cfg, pixel_weight=w), pix(cfg, pixel_weight=torch.zeros_like(w))
    assert weighted > plain and torch.allclose(zero, plain)


def _tiny_pixel_loss(x, t):
    """cfg, **kw -> the pixel loss of one fixed untrained tiny network on (x, t), the same random draws each call."""
    from tessera.model.vqvae import VQVAE, VQVAEConfig
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(resolution=32, n_labels=3, widths=(8, 8, 16, 16), codebook_size=16, embed_dim=8))
    cw = torch.tensor([1.0, 1.0, 3.0])

    def pix(cfg, **kw):
        torch.manual_seed(1)
        return compute_losses(model, x, t, cfg, cw, 0.0, **kw)["pix"]
    return pix


def test_inner_edge_weights_charge_boundary_deep_inside_an_object_only():
    """A disk's target: boundary predicted inside the disk (>= 1 px from its outline) gets w x its probability;
    background predicted there, and anything on the outline, its soft neighbours or the background, gets 0."""
    yy, xx = np.mgrid[:32, :32]
    inst = ((yy - 16) ** 2 + (xx - 16) ** 2 <= 10 ** 2).astype(np.int32)
    t = torch.from_numpy(soft_target(inst, inst, 1, 32, 32)).permute(2, 0, 1)[None]   # (1, 3, 32, 32)
    inner = (t[0, 0] == 0) & (t[0, 2] == 0)
    assert inner.sum() > 100 and not inner[16, 6] and not inner[16, 7] and not inner[0, 0]
    probs = torch.zeros(1, 3, 32, 32)
    probs[:, 2] = 0.6                                                     # boundary everywhere ...
    probs[0, :, 16, 12:20] = torch.tensor([1.0, 0.0, 0.0])[:, None]      # ... but background on a line
    w = inner_edge_weights(probs, t, 5.0)[0]
    assert torch.allclose(w[inner & (torch.arange(32)[:, None] != 16)], torch.tensor(3.0))   # 5 x 0.6
    assert w[16, 12:20].abs().max() == 0 and w[~inner].abs().max() == 0


def test_inner_edge_weight_reaches_the_pixel_loss(data):
    """inner_edge_weight > 0 adds to the pixel loss of an untrained network (boundary everywhere); 0 leaves it."""
    cfg = TrainConfig(resolution=128, crop=32, widths=(8, 8, 16, 16), codebook_size=16, embed_dim=8, jitter=0)
    x, t, _, _ = Batcher(data[0][:4], cfg, 1, seed=0).get_batch(4, "cpu")
    assert ((t[:, 0] + t[:, 2]) == 0).float().mean() > 0.03               # crops with object interiors
    pix = _tiny_pixel_loss(x, t)
    assert pix(TrainConfig(**{**cfg.__dict__, "inner_edge_weight": 5.0})) > pix(cfg) * 1.01


def test_checkpoints_with_the_old_labels_key_still_load(trained, tmp_path):
    """Checkpoints no longer duplicate label_names as "labels"; those written before still serve."""
    from tessera.model.checkpoint import load_checkpoint, save_checkpoint

    payload = load_checkpoint(trained[0], "vqvae")
    assert "labels" not in payload
    old = save_checkpoint({**payload, "labels": payload["label_names"]}, tmp_path / "old.pt")
    assert Predictor.from_checkpoint(old, device="cpu").label_names == ["nucleus"]


def test_warm_start_only_when_labels_match(trained, data, tmp_path):
    path, _, _ = trained
    old = torch.load(path, map_location="cpu", weights_only=True)
    cfg = TrainConfig(max_iters=2, eval_interval=2, device="cpu", resolution=32, crop=32, widths=(8, 8, 16, 16),
                      codebook_size=16, embed_dim=8, batch_size=2)
    warm = torch.load(train(cfg, data[0][:2], data[1][:1], ["nucleus"], tmp_path / "warm.pt", init_from=path),
                      map_location="cpu", weights_only=True)
    assert warm["model_config"] == old["model_config"] and warm["iter_num"] == old["iter_num"] + 2
    assert warm["train_config"]["lr"] == cfg.warm_lr < cfg.lr      # a warm start peaks lower: it fine-tunes
    cold = torch.load(train(cfg, data[0][:2], data[1][:1], ["cell"], tmp_path / "cold.pt", init_from=path),
                      map_location="cpu", weights_only=True)
    assert cold["model_config"]["resolution"] == 32 and cold["iter_num"] == 2
    assert cold["train_config"]["lr"] == cfg.lr


def test_tiny_training_reaches_iou(trained, data):
    path, predictor, events = trained
    m = evaluate(predictor, data[1])
    assert m["fg_iou"] >= 0.6, m
    phases = {e["phase"] for e in events}
    assert {"train", "eval", "done"} <= phases
    assert all({"phase", "iter", "max_iters", "loss", "eta_s"} <= set(e) for e in events)


def test_checkpoint_round_trip(trained, data):
    path, predictor, _ = trained
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["kind"] == "vqvae" and ckpt["label_names"] == ["nucleus"] and ckpt["iter_num"] > 0
    assert "fg_iou" in ckpt["metrics"] and ckpt["train_config"]["resolution"] == 128
    # metrics written by the in-memory model at the end of training are reproduced by the reloaded one
    m = evaluate(Predictor.from_checkpoint(path, device="cpu"), data[1])
    assert m["fg_iou"] == pytest.approx(ckpt["metrics"]["fg_iou"], abs=1e-9)
    a = predictor.predict([s.image for s in data[1][:2]])
    b = Predictor.from_checkpoint(path, device="cpu").predict([s.image for s in data[1][:2]])
    for p, q in zip(a, b):
        assert isinstance(p, Prediction)
        assert np.array_equal(p.instances, q.instances) and p.score == q.score


def test_predict_any_size_and_batch(trained):
    _, predictor, _ = trained
    images = [np.zeros((50, 90, 3), np.uint8), np.full((130, 61, 3), 200, np.uint8), make_nuclei(1, 77)[0].image]
    preds = predictor.predict(images)
    for im, p in zip(images, preds):
        assert p.classes.shape == im.shape[:2] and p.instances.shape == im.shape[:2]
        assert set(p.instance_label) == set(np.unique(p.instances)) - {0}
        assert all(0.0 <= v <= 1.0 for v in p.instance_score.values()) and 0.0 <= p.score <= 1.0
    # a batch gives the same answer as one image at a time
    one = predictor.predict(images[2:])[0]
    assert np.array_equal(one.instances, preds[2].instances)
    assert predictor.predict([]) == []


def test_split_instances_separates_touching_disks():
    """Two touching disks with a predicted contact band: two instances, where components give one."""
    yy, xx = np.mgrid[:40, :60]
    inst = np.zeros((40, 60), np.int32)
    inst[(yy - 20) ** 2 + (xx - 20) ** 2 < 12 ** 2] = 1
    inst[((yy - 20) ** 2 + (xx - 42) ** 2 < 12 ** 2) & (inst == 0)] = 2
    probs = soft_target((inst > 0).astype(np.int32), inst, 1, 40, 60, width=1).transpose(2, 0, 1)
    classes, instances, labels, scores = split_instances(probs, n_classes=1)
    assert cv2.connectedComponents((classes > 0).astype(np.uint8))[0] - 1 == 1
    assert len(labels) == 2 and metrics.instance_match(instances, inst)["recall"] == 1.0
    assert all(s > 0.9 for s in scores.values())


def test_touching_nuclei_separated_better_than_components(trained, data):
    _, predictor, _ = trained
    ours = cc = 0.0
    for s, p in zip(data[1], predictor.predict([s.image for s in data[1]])):
        ours += metrics.instance_match(p.instances, s.instances)["recall"]
        comps = cv2.connectedComponents((p.classes > 0).astype(np.uint8), connectivity=8)[1]
        cc += metrics.instance_match(comps, s.instances)["recall"]
    assert ours > cc, f"instance recall {ours / len(data[1]):.3f} vs connected components {cc / len(data[1]):.3f}"


def _isolated_nuclei(sample, min_area=60):
    """Ids of nuclei that touch no other nucleus and the border, large enough to hint at."""
    out = []
    for k in np.unique(sample.instances)[1:]:
        m = sample.instances == k
        ring = cv2.dilate(m.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool) & ~m
        ys, xs = np.nonzero(m)
        if m.sum() >= min_area and not (sample.instances[ring] > 0).any() and ys.min() > 3 and xs.min() > 3 \
                and ys.max() < m.shape[0] - 4 and xs.max() < m.shape[1] - 4:
            out.append(int(k))
    return out


def test_refine_improves_rough_hints(trained, data):
    _, predictor, _ = trained
    gains = []
    for s in data[1]:
        for k in _isolated_nuclei(s)[:3]:
            truth = s.instances == k
            for op in (cv2.dilate, cv2.erode):
                hint = op(truth.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
                if not hint.any():
                    continue
                mask, conf = predictor.refine(s.image, hint, [], [], label=1)
                assert mask.shape == truth.shape and mask.dtype == bool and 0.0 <= conf <= 1.0
                gains.append(metrics.iou(mask, truth) - metrics.iou(hint, truth))
    assert len(gains) >= 4, "test data has too few isolated nuclei"
    assert np.mean(gains) > 0.05 and np.mean(np.array(gains) > 0) >= 0.6, gains


def test_refine_points_and_fallback(trained, data):
    _, predictor, _ = trained
    s = data[1][0]
    k = _isolated_nuclei(s)[0]
    ys, xs = np.nonzero(s.instances == k)
    point = (float(xs.mean()), float(ys.mean()))
    mask, conf = predictor.refine(s.image, None, [point], [], label=1)
    assert mask[int(point[1]), int(point[0])] and metrics.iou(mask, s.instances == k) > 0.5
    mask, _ = predictor.refine(s.image, None, [point], [point], label=1)  # a negative click vetoes
    assert not mask[int(point[1]), int(point[0])]
    empty, conf = predictor.refine(s.image, None, [], [], label=1)
    assert not empty.any() and conf == 0.0
    # where the model sees nothing, a box hint on plain background still gives a mask
    box = np.zeros(s.image.shape[:2], bool)
    box[2:10, 2:10] = True
    mask, _ = predictor.refine(np.zeros_like(s.image), box, [], [], label=1)
    assert mask.any()
    with pytest.raises(ValueError):
        predictor.refine(s.image, box[:5], [], [], label=1)
    with pytest.raises(ValueError):
        predictor.refine(s.image, box, [], [], label=2)


def test_check_flags_bad_annotations(trained, data):
    _, predictor, _ = trained
    s = data[1][1]
    good_pred, good = predictor.review(s.image, s.classes, s.instances)
    _, empty = predictor.review(s.image, np.zeros_like(s.classes), np.zeros_like(s.instances))
    shifted = np.roll(s.instances, (15, 15), axis=(0, 1))
    _, bad = predictor.review(s.image, (shifted > 0).astype(np.int32), shifted)
    assert 0.0 <= good < empty <= 1.0 and good < bad, (good, empty, bad)
    assert good_pred.classes.shape == s.classes.shape
    assert metrics.iou(good_pred.classes > 0, s.classes > 0) > 0.7


def test_review_puts_back_objects_the_annotation_left_out(trained, data):
    """Objects a labeller left out come back in the refined annotation where the model sees them: the refined
    map is the mean of the model's own reading and its reading through the annotation's codes (which alone
    follows the annotation's "nothing here"), and the drawn objects stay."""
    _, predictor, _ = trained
    gained, kept = [], []
    for s in data[1]:
        ids = [int(k) for k in np.unique(s.instances) if k]
        gone = np.isin(s.instances, ids[::3])                        # every third object left out
        classes, instances = np.where(gone, 0, s.classes), np.where(gone, 0, s.instances)
        refined, _ = predictor.review(s.image, classes, instances)
        gained.append((refined.classes[gone] > 0).mean())
        kept.append(metrics.iou((refined.classes > 0) & ~gone, classes > 0))
    print(f"left-out objects' pixels back {np.mean(gained):.2f}, drawn objects' IoU {np.mean(kept):.3f}")
    assert np.mean(gained) > 0.5 and np.mean(kept) > 0.8


def test_a_version_edits_annotations_only_where_its_held_back_pixels_bear_out_its_confidence(trained, data,
                                                                                               tmp_path):
    """How sure a version must be to change a person's annotation (Predictor.edit_confident) is chosen on its
    held-back tasks and kept in its checkpoint: where the pixels it is sure of are as the held-back labels have
    them, it edits at EDIT_CONFIDENT; where they are wrong, it makes no edit at all and an annotation comes back as
    drawn (with its mislabeling score still); checkpoints from before the choice edit at EDIT_CONFIDENT."""
    from tessera.model.checkpoint import load_checkpoint, save_checkpoint
    from tessera.model.inference import EDIT_CONFIDENT
    from tessera.model.train_vqvae import choose_edit_confident, drawn_rectangles

    path, served, _ = trained
    c = load_checkpoint(path, "vqvae")
    check = c["edit_check"]
    assert check["n_images"] == len(data[1]) and served.edit_confident == check["confident"] == EDIT_CONFIDENT
    assert c["metrics"]["edit_confident"] == EDIT_CONFIDENT
    assert check["wrong"][str(EDIT_CONFIDENT)] <= (1 - EDIT_CONFIDENT) / 4
    pred = Predictor.from_checkpoint(path, device="cpu")
    images = [s.image for s in data[1]]
    own = [(p[0] < 0.5).astype(np.int32) for p in pred.own_probabilities(images)]
    as_seen = [Sample(im, o, o, id=str(i)) for i, (im, o) in enumerate(zip(images, own))]
    wrong = [Sample(im, 1 - o, 1 - o, id=str(i)) for i, (im, o) in enumerate(zip(images, own))]
    assert choose_edit_confident(pred, as_seen)["confident"] == EDIT_CONFIDENT == pred.edit_confident
    got = choose_edit_confident(pred, wrong)
    assert got["confident"] is None and pred.edit_confident is None and got["wrong"][str(EDIT_CONFIDENT)] > 0.9
    assert choose_edit_confident(pred, as_seen[:3], megapixels=0.03)["n_images"] == 1      # at least one image
    # a project with masks and rectangles both: a drawn rectangle's corners are not counted against the model
    boxed = []
    for t in as_seen:
        cls, ins = t.classes.copy(), t.instances.copy()
        cls[20:80, 30:100], ins[20:80, 30:100] = 1, ins.max() + 1
        boxed.append(Sample(t.image, cls, ins, id=t.id))
    assert drawn_rectangles(boxed[0].instances)[20:80, 30:100].all() and drawn_rectangles(boxed[0].instances).sum() \
        == 60 * 70 and not drawn_rectangles(as_seen[0].instances).any()
    assert choose_edit_confident(pred, boxed)["confident"] == EDIT_CONFIDENT
    pred.box_shrink = 0.6               # a box model checks its annotations as box centres: no choice to make
    assert choose_edit_confident(pred, wrong) is None and pred.edit_confident == EDIT_CONFIDENT

    s = data[1][0]
    eroded = cv2.erode((s.instances > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    classes, instances = np.where(eroded, s.classes, 0), np.where(eroded, s.instances, 0)
    for confident in (EDIT_CONFIDENT, None, "absent"):
        c["edit_check"] = None if confident == "absent" else {**check, "confident": confident}
        save_checkpoint(c, tmp_path / "m.pt")
        p = Predictor.from_checkpoint(tmp_path / "m.pt", device="cpu")
        refined, mislabeling = p.review(s.image, classes, instances)
        changed = (refined.classes != classes).mean()
        if confident is None:
            assert p.edit_confident is None and changed == 0 and mislabeling > 0
            assert np.array_equal(refined.instances > 0, instances > 0)
        else:
            assert p.edit_confident == EDIT_CONFIDENT and changed > 0.01
            assert metrics.iou(refined.classes > 0, s.classes > 0) > metrics.iou(classes > 0, s.classes > 0)


def test_layout_codes_round_trip(trained, data):
    """Predictor.encode / decode_codes, the interface model/layouts.py recombines code maps with."""
    _, predictor, _ = trained
    s = data[1][0]  # 128 px == R of the tiny config
    classes = torch.from_numpy(s.classes[None])
    instances = torch.from_numpy(s.instances[None])
    codes = predictor.encode(classes, instances)
    assert codes.shape == (1, 16, 16) and codes.dtype == torch.long
    logits = predictor.decode_codes(codes)
    assert logits.shape == (1, 3, 128, 128)
    decoded_fg = logits[0].argmax(0).numpy() > 0
    assert metrics.iou(decoded_fg, s.classes > 0) > 0.5  # the codes alone carry the layout


def test_three_class_model_predicts_refines_and_checks():
    """Label maps with more than 4 channels (3 classes + background + outline) go through every path."""
    from tessera.model.inference import Predictor
    from tessera.model.vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    names = ["cat", "dog", "bird"]
    pred = Predictor(VQVAE(VQVAEConfig(resolution=64, n_labels=len(names) + 2, widths=(8, 16, 16, 16),
                                       codebook_size=16, embed_dim=8)), names, device="cpu")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (90, 70, 3), dtype=np.uint8)
    classes = np.zeros((90, 70), np.int32)
    classes[10:40, 10:30], classes[50:80, 30:60] = 1, 3
    instances = (classes > 0).astype(np.int32) + (classes == 3)
    p = pred.predict([image])[0]
    assert p.classes.shape == (90, 70) and p.classes.max() <= 3
    refined, mislabeling = pred.review(image, classes, instances)
    assert refined.classes.shape == (90, 70) and 0.0 <= mislabeling <= 1.0
    mask, score = pred.refine(image, classes == 1, [], [], 1)
    assert mask.shape == (90, 70) and 0.0 <= score <= 1.0


def _box_sample(label: int, i: int) -> Sample:
    """A 32 px box-labelled sample holding one box of class `label` (its centre region painted in the maps)."""
    classes, instances = np.zeros((32, 32), np.int32), np.zeros((32, 32), np.int32)
    classes[12:20, 12:20], instances[12:20, 12:20] = label, 1
    return Sample(np.full((32, 32, 3), 40 * label, np.uint8), classes, instances, id=f"{label}-{i}",
                  boxes=np.array([[8, 8, 24, 24, label]], np.float64))


def test_a_rarer_class_is_drawn_as_often_as_a_common_one():
    """Two cat photos for every dog photo (Pets heads): at class_balance 1 each class fills half of the draws;
    a class far rarer than the cap is drawn MAX_REPEAT times its share; one class, equal shares or power 0
    draw uniformly, exactly as before the option (None)."""
    cats, dogs = [_box_sample(1, i) for i in range(20)], [_box_sample(2, i) for i in range(10)]
    p = class_draw_weights(cats + dogs, 1.0)
    assert np.isclose(p[:20].sum(), 0.5) and np.isclose(p[20:].sum(), 0.5)
    sqrt = class_draw_weights(cats + dogs, 0.5)
    assert np.isclose(sqrt[20] / sqrt[0], 2 ** 0.5)
    rare = class_draw_weights(cats * 5 + dogs[:1], 1.0)                 # 100 : 1
    assert np.isclose(rare[-1] / rare[0], MAX_REPEAT)
    assert class_draw_weights(cats, 1.0) is None and class_draw_weights(cats[:10] + dogs, 1.0) is None
    assert class_draw_weights(cats + dogs, 0.0) is None
    mixed = _box_sample(1, 99)                                          # a photo holding both classes is
    mixed.boxes = np.array([[8, 8, 24, 24, 1], [0, 0, 8, 8, 2]], np.float64)   # drawn as often as a dog photo
    both = class_draw_weights(cats + dogs + [mixed], 1.0)
    assert np.isclose(both[-1], both[20]) and both[-1] > both[0]

    cfg = TrainConfig(resolution=32, crop=32, widths=(8, 8, 16, 16), codebook_size=16, embed_dim=8,
                      contact_weight=0.0)

    def dog_share(batcher: Batcher) -> float:
        drawn = []
        pick = batcher.sample_weighted
        batcher.sample_weighted = lambda i: (drawn.append(i), pick(i))[1]
        for _ in range(16):
            batcher.get_batch(32, "cpu")
        return float(np.mean(np.array(drawn) >= 20))

    assert 0.44 < dog_share(Batcher(cats + dogs, cfg, 2, seed=0)) < 0.56
    assert 0.27 < dog_share(Batcher(cats + dogs, dataclasses.replace(cfg, class_balance=0.0), 2, seed=0)) < 0.39


def test_a_run_scores_the_person_made_held_back_images_from_its_own_predictions(tiny_train_config, data, tmp_path):
    """train(judged=...): the checkpoint holds the figures of the held-back samples a person made, from the
    predictions its cut was learned on (backend.training.judge uses them instead of predicting them again)."""
    from tessera.model.checkpoint import load_checkpoint

    val = data[1][:4]
    for i, s in enumerate(val):
        s.id = s.id or f"v{i}"
    judged = {val[1].id, val[3].id}
    cfg = dataclasses.replace(tiny_train_config, max_iters=20, eval_interval=10)
    path = train(cfg, data[0][:8], val, ["nucleus"], tmp_path / "m.pt", judged=judged)
    figures = load_checkpoint(path, "vqvae")["metrics"]["judged"]
    assert figures["ids"] == sorted(judged)
    alone = evaluate(Predictor.from_checkpoint(path, device="cpu"), [val[1], val[3]])
    assert figures["fg_iou"] == pytest.approx(alone["fg_iou"], abs=1e-6)
    assert figures["box_ap50"] == pytest.approx(alone["box_ap50"], abs=1e-6)
    every = train(cfg, data[0][:8], val, ["nucleus"], tmp_path / "all.pt", judged={s.id for s in val})
    assert "judged" not in load_checkpoint(every, "vqvae")["metrics"]      # all of them: the run's own figures
