"""The detection head's targets and decoding: boxes -> heatmaps -> boxes, overlapping boxes kept."""
import numpy as np
import torch

from tessera.model import metrics
from tessera.model.boxhead import BoxHead, box_losses, decode_boxes, encode_boxes
from tessera.model.vqvae import VQVAE, VQVAEConfig


def _round_trip(boxes, n_classes=2, shape=(40, 48), stride=2):
    t = encode_boxes([boxes], n_classes, shape, stride)
    return decode_boxes(t["heat"], t["size"], t["offset"], stride, min_score=0.5)[0]


def test_overlapping_boxes_survive_encode_and_decode():
    boxes = np.array([[10, 10, 50, 50, 1],       # three boxes overlapping pairwise (IoU 0.39 and 0.22) ...
                      [20, 14, 60, 54, 1],
                      [30, 30, 70, 70, 2],
                      [4, 60, 13, 71, 2]], float)  # ... and a small one apart
    out = _round_trip(boxes)
    assert len(out) == 4
    ious = metrics.box_iou(out[:, :4], boxes[:, :4])
    pairs = metrics.greedy_match(ious, 0.99)
    assert len(pairs) == 4                              # every box back, in place and size
    for p, q in pairs:
        assert out[p, 5] == boxes[q, 4] and out[p, 4] == 1.0   # its class, at the peak's full score


def test_decoded_boxes_follow_the_stride_and_classes_do_not_suppress_each_other():
    same_centre = np.array([[8, 8, 24, 24, 1], [8, 8, 24, 24, 2]], float)   # one spot, two classes
    for stride in (1, 2, 4):
        out = _round_trip(same_centre, shape=(32 // stride, 32 // stride), stride=stride)
        assert sorted(out[:, 5].tolist()) == [1.0, 2.0]
        assert np.abs(out[:, :4] - same_centre[:, :4]).max() < 1e-4


def test_a_dense_image_keeps_every_box():
    # 22 x 22 objects 6 px wide, 10 px apart (a dense microscopy frame): more than the 300 boxes a fixed cap
    # kept, fewer than one per BOX_CAP_CELLS cells
    corners = np.arange(22, dtype=float) * 10 + 2
    boxes = np.array([[x, y, x + 6, y + 6, 1] for y in corners for x in corners])
    out = _round_trip(boxes, n_classes=1, shape=(110, 110), stride=2)
    assert len(out) == len(boxes) == 484
    assert len(metrics.greedy_match(metrics.box_iou(out[:, :4], boxes[:, :4]), 0.99)) == 484
    t = encode_boxes([boxes], 1, (110, 110), 2)
    assert len(decode_boxes(t["heat"], t["size"], t["offset"], 2, max_boxes=100, min_score=0.5)[0]) == 100


def test_empty_image_has_no_targets_and_no_boxes():
    t = encode_boxes([np.zeros((0, 5))], 1, (8, 8), 2)
    assert float(t["heat"].sum()) == 0 and float(t["mask"].sum()) == 0
    assert decode_boxes(t["heat"], t["size"], t["offset"], 2)[0].shape == (0, 6)


def test_head_learns_boxes_on_the_vqvae_features():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(resolution=32, n_labels=3, widths=(8, 16, 16, 16), box_classes=1))
    x = torch.rand(2, 3, 32, 32)
    boxes = [np.array([[4, 4, 14, 12, 1], [8, 6, 20, 16, 1]], float), np.zeros((0, 5))]
    t = encode_boxes(boxes, 1, (16, 16), model.box_head.stride)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    first = None
    for _ in range(60):
        loss = box_losses(model.detect(model.features(x)), t)["box"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 4
    heat, size, offset = model.detect(model.features(x))
    out = decode_boxes(heat.sigmoid(), size, offset, model.box_head.stride, min_score=0.3)
    assert len(metrics.greedy_match(metrics.box_iou(out[0][:, :4], boxes[0][:, :4]), 0.5)) == 2


def test_sizes_and_offsets_are_regressed_around_each_centre():
    """TTFNet's dense regression: every cell near a centre carries its object's box, the weights sum to 1
    per object, and a cell near two centres belongs to the nearer one."""
    boxes = np.array([[4, 4, 44, 36, 1], [30, 20, 46, 36, 1]], float)   # a large box and a small one over it
    stride = 2
    t = encode_boxes([boxes], 1, (24, 24), stride)
    m = t["mask"][0, 0].numpy()
    assert (m > 0).sum() > 10 and abs(m.sum() - 2.0) < 1e-4
    ks, js = np.nonzero(m)
    cx = (js + t["offset"][0, 0].numpy()[ks, js]) * stride
    cy = (ks + t["offset"][0, 1].numpy()[ks, js]) * stride
    w, h = (np.exp(t["size"][0, i].numpy()[ks, js]) * stride for i in (0, 1))
    decoded = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    best = metrics.box_iou(decoded, boxes[:, :4]).max(1)
    assert best.min() > 0.999                            # each cell decodes to exactly one true box ...
    owner = metrics.box_iou(decoded, boxes[:, :4]).argmax(1)
    centres = (boxes[:, :2] + boxes[:, 2:4]) / 2 / stride
    near = np.hypot(js[:, None] + 0.5 - centres[:, 0], ks[:, None] + 0.5 - centres[:, 1]) / \
        (boxes[:, 2] - boxes[:, 0])[None] * stride       # distance in units of each box's width
    assert (owner == near.argmin(1)).mean() > 0.9        # ... mostly the one whose centre is nearer


def test_models_without_a_head_keep_their_parameters():
    plain = VQVAE(VQVAEConfig(resolution=32, widths=(8, 16, 16, 16)))
    assert plain.box_head is None and not any(k.startswith("box_head") for k in plain.state_dict())
    assert isinstance(VQVAE(VQVAEConfig(resolution=32, widths=(8, 16, 16, 16), box_classes=2)).box_head, BoxHead)


def test_batcher_boxes_follow_rotations_flips_zoom_and_crops():
    from tessera.model.data import Sample
    from tessera.model.train_vqvae import Batcher, TrainConfig

    image = np.zeros((64, 80, 3), np.uint8)
    image[10:30, 20:50] = 255                                    # the object: x 20..50, y 10..30
    classes = np.zeros((64, 80), np.int32)
    sample = Sample(image=image, classes=classes, instances=classes.copy(), id="a",
                    boxes=np.array([[20, 10, 50, 30, 1]], float))
    cfg = TrainConfig(resolution=64, crop=48, jitter=0.0, scale_min=0.8, scale_max=1.25)
    batcher = Batcher([sample], cfg, 1, seed=0, invert_bright=False, scale=1.0, with_boxes=True)
    checked = 0
    for _ in range(40):
        x, _, boxes = batcher.sample_boxes(0)
        ys, xs = np.nonzero(x[..., 0] > 0.5)
        if len(boxes) == 0:
            assert len(ys) < 0.25 * 600 * 1.25 ** 2 + 20, "a box mostly inside the crop was dropped"
            continue
        assert len(boxes) == 1 and boxes[0, 4] == 1
        seen = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert np.abs(seen - boxes[0, :4]).max() <= 1.5, (seen, boxes)
        checked += 1
    assert checked >= 20
    assert Batcher([sample], cfg, 1, seed=0).get_batch(2, "cpu")[2] is None     # no boxes unless asked


def _boxed(s):
    """A mask sample as a box sample: its instances' boxes, class 1."""
    from tessera.model.postprocess import box_sample, instance_boxes

    ids = [int(i) for i in np.unique(s.instances) if i]
    boxes = np.concatenate([instance_boxes(s.instances, ids), np.ones((len(ids), 1))], 1)
    return box_sample(s.image, boxes, 0.5, s.id)


def _scales(tmp_path, base: dict, runs: dict) -> dict:
    """{name: the object scale a 2-iteration training stores} for runs {name: (TrainConfig fields, samples)}."""
    from tessera.model.checkpoint import load_checkpoint
    from tessera.model.train_vqvae import TrainConfig, train

    return {name: load_checkpoint(train(TrainConfig(**base, **kw), data[:3], data[3:], ["Nucleus"],
                                        tmp_path / f"{name}.pt"), "vqvae")["scale"]
            for name, (kw, data) in runs.items()}


def test_a_box_model_keeps_the_state_with_the_best_held_back_box_ap(tmp_path):
    """A box project is judged by box AP50, so a box model's run keeps the state with the best held-back
    box AP50 (from the vq phase on), not the best segmentation IoU of its centre map."""
    from tessera.model.checkpoint import load_checkpoint
    from tessera.model.data import make_nuclei
    from tessera.model.train_vqvae import TrainConfig, train

    samples = [_boxed(s) for s in make_nuclei(8, size=64, seed=3)]
    cfg = TrainConfig(max_iters=8, eval_interval=2, log_interval=100, resolution=64, crop=48, batch_size=4,
                      device="cpu", box_shrink=0.5, box_head=True, threads=1, seed=0)
    ckpt = load_checkpoint(train(cfg, samples[:6], samples[6:], ["Nucleus"], tmp_path / "m.pt"), "vqvae")
    scored = [h for h in ckpt["history"] if "val_box_ap50" in h]
    assert [h["iter"] for h in scored] == [4, 6, 8]                    # the vq phase on (vq_phase 0.5)
    assert ckpt["metrics"]["best_val_box_ap50"] == max(h["val_box_ap50"] for h in scored)
    assert "best_val_iou_r" not in ckpt["metrics"]


def test_a_box_model_chooses_its_state_on_a_bounded_spread_of_held_back_images(tmp_path):
    """Each in-training evaluation predicts the held-back images at full size, so a project of thousands of
    tasks would spend its run evaluating: the state is chosen on at most `select_images` of them, spread over
    the classes and the same every time, while the region cut and the metrics use them all."""
    from tessera.model.checkpoint import load_checkpoint
    from tessera.model.data import make_nuclei
    from tessera.model.postprocess import box_sample, spread_subset, true_objects
    from tessera.model.train_vqvae import TrainConfig, train

    samples = [_boxed(s) for s in make_nuclei(10, size=64, seed=3)]
    held = samples[4:]
    for s in held[:2]:                      # two held-back images whose objects are of a second class
        s.boxes[:, 4] = 2
    held[:2] = [box_sample(s.image, s.boxes, 0.5, s.id) for s in held[:2]]
    subset = spread_subset(held, 3)
    assert len(subset) == 3 and subset == spread_subset(list(reversed(held)), 3)   # the same ones, whatever the order
    assert {int(np.bincount(true_objects(s)[1]).argmax()) for s in subset} == {1, 2}  # both classes in it
    assert spread_subset(held, 0) == held and spread_subset(held, 99) == held

    cfg = TrainConfig(max_iters=4, eval_interval=2, log_interval=100, resolution=64, crop=48, batch_size=4,
                      device="cpu", box_shrink=0.5, box_head=True, threads=1, seed=0, select_images=3)
    ckpt = load_checkpoint(train(cfg, samples[:4], held, ["Nucleus", "Other"], tmp_path / "m.pt"), "vqvae")
    assert ckpt["metrics"]["box_select_images"] == 3
    assert len(ckpt["region_cut"]["grid"]) and ckpt["metrics"]["true_per_image"] == \
        sum(len(true_objects(s)[1]) for s in held) / len(held)           # metrics over all six


def test_box_max_scale_lets_a_box_model_look_closer_than_the_images_pixels(tmp_path):
    """Small objects (make_nuclei's, a few px) at box_object_px: a box model with box_max_scale 3 is seen
    closer than the image's own pixels (scale > 1, capped at 3); with box_max_scale 1 it stays at 1; a mask
    model ignores box_max_scale (its max_scale stays 1)."""
    from tessera.model.data import make_nuclei

    plain = make_nuclei(4, size=64, seed=3)
    samples = [_boxed(s) for s in plain]
    base = dict(max_iters=2, eval_interval=2, log_interval=100, resolution=64, crop=48, batch_size=2,
                device="cpu", threads=1, seed=0, box_object_px=40.0)
    scales = _scales(tmp_path, base, {"box3": (dict(box_shrink=0.5, box_head=True, box_max_scale=3.0), samples),
                                      "box1": (dict(box_shrink=0.5, box_head=True, box_max_scale=1.0), samples),
                                      "mask": (dict(box_max_scale=3.0, object_px=40.0), plain)})
    assert 1.0 < scales["box3"] <= 3.0, scales
    assert scales["box1"] == 1.0 and scales["mask"] == 1.0, scales


def test_box_floor_lets_a_box_model_see_large_objects_smaller_than_the_letterbox(tmp_path):
    """Large objects (a Pets head: half the image) at a small box_object_px: the letterbox floor holds a
    model at the scale that shows the median image R px long; a box model's floor is box_floor x that
    (seen smaller, so its receptive field spans the object), a mask model's stays the letterbox's."""
    from tessera.model.data import make_nuclei

    plain = make_nuclei(4, size=64, seed=3)
    samples = [_boxed(s) for s in plain]
    base = dict(max_iters=2, eval_interval=2, log_interval=100, resolution=64, crop=48, batch_size=2,
                device="cpu", threads=1, seed=0, box_object_px=0.5, object_px=0.5)
    scales = _scales(tmp_path, base, {"box_half": (dict(box_shrink=0.5, box_head=True, box_floor=0.5), samples),
                                      "box_full": (dict(box_shrink=0.5, box_head=True, box_floor=1.0), samples),
                                      "mask": (dict(box_floor=0.5), plain)})
    assert scales["box_half"] == 0.5, scales            # 64 px images at R 64: floor 1.0, halved
    assert scales["box_full"] == 1.0 and scales["mask"] == 1.0, scales


def _boxes_at(rows: list, size: int = 64, seed: int = 0):
    """Box samples of noise images, one box per row (x0, y0, x1, y1) in share of the image, class 1."""
    from tessera.model.postprocess import box_sample

    rng = np.random.default_rng(seed)
    return [box_sample(rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
                       np.array([[*(np.array(r) * size), 1]]), 0.5, f"s{i}") for i, r in enumerate(rows)]


def test_boxes_that_sit_off_the_middle_mean_the_images_have_an_up():
    """Heads in the top third of every photo (Pets: 0.37 of the height) -> upright; objects scattered
    over the whole image (nuclei) -> not; too few images to tell -> not."""
    from tessera.model.data import make_nuclei
    from tessera.model.train_vqvae import upright

    rng = np.random.default_rng(1)
    top = [(x, y, x + 0.3, y + 0.3) for x, y in zip(rng.uniform(0, 0.7, 20), rng.uniform(0.0, 0.25, 20))]
    spread = [(x, y, x + 0.3, y + 0.3) for x, y in zip(rng.uniform(0, 0.7, 20), rng.uniform(0.0, 0.7, 20))]
    assert upright(_boxes_at(top))
    assert not upright(_boxes_at(spread))
    assert not upright(make_nuclei(20, size=64, seed=0))
    assert not upright(_boxes_at(top[:2]))


def test_a_box_model_of_upright_images_trains_without_quarter_turns(tmp_path):
    """The run's stored train_config says what the batcher did: rot90 off for a box model whose boxes sit
    at the top, kept for the same images' mask model and for a box model of scattered boxes."""
    from tessera.model.checkpoint import load_checkpoint
    from tessera.model.train_vqvae import TrainConfig, train

    rng = np.random.default_rng(1)
    top = _boxes_at([(x, y, x + 0.3, y + 0.3) for x, y in zip(rng.uniform(0, 0.7, 8), rng.uniform(0, 0.2, 8))])
    spread = _boxes_at([(x, y, x + 0.3, y + 0.3) for x, y in zip(rng.uniform(0, 0.7, 8), rng.uniform(0, 0.7, 8))])
    base = dict(max_iters=2, eval_interval=2, log_interval=100, resolution=64, crop=48, batch_size=2,
                device="cpu", threads=1, seed=0)
    rot = {}
    for name, kw, data in (("box_top", dict(box_shrink=0.5, box_head=True), top),
                           ("mask_top", dict(), top),
                           ("box_spread", dict(box_shrink=0.5, box_head=True), spread)):
        ckpt = load_checkpoint(train(TrainConfig(**base, **kw), data[:6], data[6:], ["head"], tmp_path / f"{name}.pt"),
                               "vqvae")
        rot[name] = ckpt["train_config"]["rot90"]
    assert rot == {"box_top": False, "mask_top": True, "box_spread": True}, rot


def test_flip_average_of_an_image_and_its_mirror_decodes_the_images_boxes():
    """The head's outputs on an image and on its mirror image, averaged by flip_average, decode to the
    image's own boxes: the mirror's maps are flipped back and its x offsets (centre - cell corner) become
    1 - o. Centres sit off the cells' middles, so a plain average of the offsets would move the boxes."""
    from tessera.model.boxhead import flip_average

    h, w, stride = 12, 20, 2
    W = w * stride
    boxes = np.array([[3.0, 4, 13.6, 12, 1], [20.2, 2, 33, 20.4, 2]])
    mirror = np.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3], boxes[:, 4]], 1)

    def heads(b):
        t = encode_boxes([b], 2, (h, w), stride)
        return torch.logit(t["heat"].clamp(1e-4, 1 - 1e-4)), t["size"], t["offset"]

    heat, size, offset = flip_average(heads(boxes), heads(mirror))
    got = decode_boxes(heat.sigmoid(), size, offset, stride, min_score=0.5)[0]
    got = got[np.argsort(got[:, 0])]
    assert got.shape == (2, 6)
    assert np.allclose(got[:, :4], boxes[:, :4], atol=1e-3), (got, boxes)
    assert got[:, 5].tolist() == [1.0, 2.0]
    (a_heat, a_size, a_offset), (m_heat, m_size, m_offset) = heads(boxes), heads(mirror)
    plain = decode_boxes(((a_heat + m_heat.flip(-1)) / 2).sigmoid(), (a_size + m_size.flip(-1)) / 2,
                         (a_offset + m_offset.flip(-1)) / 2, stride, min_score=0.5)[0]
    assert not np.allclose(np.sort(plain[:, 0]), got[:, 0], atol=0.1)   # the offsets' mirroring matters


def _box_predictor(**kw):
    from tessera.model.inference import Predictor

    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(resolution=64, n_labels=4, widths=(8, 16, 32, 48), box_classes=2))
    for p in model.box_head.parameters():          # a head whose maps vary over the image
        torch.nn.init.normal_(p, std=0.3)
    return Predictor(model, ["cat", "dog"], device="cpu", **{"scale": 1.0, "box_shrink": 0.5, "bf16": False, **kw})


def test_a_box_predictor_sees_an_image_and_its_mirror_alike():
    """With the test-time flip (the default for a box head) the head's maps of a mirrored image are the
    image's maps mirrored (x offsets as 1 - o); without it, this untrained head's are not."""
    x = torch.rand(1, 3, 32, 48)

    def mirrored_pair(pred):
        _, (heat, size, offset) = pred._net(x)
        _, (m_heat, m_size, m_offset) = pred._net(x.flip(-1))
        m_offset = torch.cat([1 - m_offset[:, :1], m_offset[:, 1:]], 1).flip(-1)
        return [(a.float(), b.float()) for a, b in ((heat, m_heat.flip(-1)), (size, m_size.flip(-1)), (offset, m_offset))]

    pred = _box_predictor()
    assert pred.box_flip
    for a, b in mirrored_pair(pred):
        assert torch.allclose(a, b, atol=1e-5)
    pred.box_flip = False
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in mirrored_pair(pred))


def test_the_head_alone_finds_the_boxes_the_whole_pass_finds():
    """Predictor.boxes_at (the encoder and the head, no code predictor or decoder: a box model's extra scales)
    gives the boxes predict() gives at the same scale: batched, through the sliding window, traced, and
    mirrored; at another scale, other boxes."""
    from tessera.model.data import make_nuclei

    images = [s.image for s in make_nuclei(3, size=64, seed=2)]
    large = [np.tile(images[0], (2, 3, 1))[:120, :150]]           # larger than the 64 px tile: windows
    for kw in ({}, {"trace": True}, {"box_flip": False}):
        pred = _box_predictor(tile=64, overlap=16, **kw)
        for batch in (images, large):
            for _ in range(3):                     # traced once a shape recurs
                want = [np.array([[*p.boxes[k], p.instance_score[k], p.instance_label[k]] for k in sorted(p.boxes)])
                        .reshape(-1, 6) for p in pred.predict(batch, cut=False)]
                got = pred.boxes_at(batch)
                assert [len(g) for g in got] == [len(w) for w in want] and sum(map(len, want)) > 0, kw
                for g, w in zip(got, want):
                    np.testing.assert_allclose(g[np.lexsort(g.T[::-1])], w[np.lexsort(w.T[::-1])], atol=1e-4)
        other = pred.boxes_at(images, 0.7)
        assert any(len(o) != len(g) or not np.allclose(o, g) for o, g in zip(other, pred.boxes_at(images)))


def test_a_box_model_chooses_its_extra_scales_on_held_back_images():
    """A box model also looks at each image smaller (and larger) (Predictor.box_scales) only where that raises
    its held-back box AP50: held-back boxes that are what one choice of passes gives choose it, the costlier
    only when it beats the cheaper. A mask model has no choice to make."""
    from tessera.model.data import make_nuclei
    from tessera.model.postprocess import box_sample
    from tessera.model.train_vqvae import BOX_SCALE_CANDIDATES, choose_box_scales

    pred = _box_predictor()
    images = [s.image for s in make_nuclei(4, size=64, seed=5)]
    assert pred.box_scales == ()
    plain = pred.predict(images)
    for truth in ((), *BOX_SCALE_CANDIDATES):
        pred.box_scales = truth
        held = []
        for i, (im, p) in enumerate(zip(images, pred.predict(images))):
            ids = sorted(p.boxes)
            boxes = np.array([[*p.boxes[k], p.instance_label[k]] for k in ids], float).reshape(-1, 5)
            held.append(box_sample(im, boxes, 0.5, str(i)))
        assert sum(len(h.boxes) for h in held) >= 4
        if truth:               # the fused boxes are not the model's own scale's boxes
            assert any(sorted(p.boxes.values()) != sorted(q.boxes.values())
                       for p, q in zip(plain, pred.predict(images)))
        pred.box_scales = ()
        got = choose_box_scales(pred, held)
        assert got["on"] is bool(truth) and got["factors"] == list(truth) and pred.box_scales == truth, got
        own = got["ap50"][",".join(map(str, truth)) or "none"]
        assert own == max(got["ap50"].values()) and sorted(got["ap50"].values())[-2] < own - 0.01, got
    mask = _box_predictor(box_shrink=1.0)           # a head beside masks
    assert choose_box_scales(mask, held) is None and mask.box_scales == ()


def test_a_box_versions_choice_of_extra_scales_is_kept_and_served(tmp_path):
    """A box model's run makes the choice on its held-back tasks and keeps it (and what it rests on) in the
    checkpoint; the served predictor applies it, and checkpoints from before the choice or that declined it
    look once. A mask model's checkpoint has no choice."""
    from tessera.backend.predictions import _load_predictor
    from tessera.backend.settings import Settings
    from tessera.model.checkpoint import load_checkpoint, save_checkpoint
    from tessera.model.data import make_nuclei
    from tessera.model.train_vqvae import BOX_SCALE_CANDIDATES, TrainConfig, train

    plain = make_nuclei(5, size=64, seed=3)
    base = dict(max_iters=2, eval_interval=2, log_interval=100, resolution=64, crop=48, batch_size=2,
                device="cpu", threads=1, seed=0)
    path = train(TrainConfig(**base, box_shrink=0.5, box_head=True), [_boxed(s) for s in plain[:3]],
                 [_boxed(s) for s in plain[3:]], ["Nucleus"], tmp_path / "box.pt")
    c = load_checkpoint(path, "vqvae")
    got = c["box_scales"]
    assert got["n_images"] == 2 and set(got["ap50"]) == {"none", "0.7", "0.7,1.4"}
    assert got["on"] == bool(got["factors"]) and c["metrics"]["box_scales"] == got["factors"]
    for factors in (None, (), *BOX_SCALE_CANDIDATES):      # None: a checkpoint from before the choice
        c["box_scales"] = None if factors is None else {**got, "on": bool(factors), "factors": list(factors)}
        save_checkpoint(c, tmp_path / "m.pt")
        assert _load_predictor(tmp_path / "m.pt", "cpu", Settings()).box_scales == (factors or ())
    mask = train(TrainConfig(**base), plain[:3], plain[3:], ["Nucleus"], tmp_path / "mask.pt")
    assert load_checkpoint(mask, "vqvae")["box_scales"] is None


def test_a_box_model_trained_without_mirror_images_is_not_flipped_at_test_time(tmp_path):
    """from_checkpoint turns the test-time flip on for a box head trained with flips, off without them
    (it never saw mirror images), and a model without a head has none."""
    from tessera.model.data import make_nuclei
    from tessera.model.inference import Predictor
    from tessera.model.train_vqvae import TrainConfig, train

    plain = make_nuclei(4, size=64, seed=3)
    samples = [_boxed(s) for s in plain]
    base = dict(max_iters=2, eval_interval=2, log_interval=100, resolution=64, crop=48, batch_size=2,
                device="cpu", threads=1, seed=0)
    flips = {}
    for name, kw, data in (("box", dict(box_shrink=0.5, box_head=True), samples),
                           ("box_noflip", dict(box_shrink=0.5, box_head=True, flips=False), samples),
                           ("mask", dict(), plain)):
        path = train(TrainConfig(**base, **kw), data[:3], data[3:], ["Nucleus"], tmp_path / f"{name}.pt")
        flips[name] = Predictor.from_checkpoint(path, device="cpu").box_flip
    assert flips == {"box": True, "box_noflip": False, "mask": False}, flips
