"""A mask model that learns the detection head beside its masks: RectangleLabels get the head's boxes (which may
overlap), brush and polygon controls the masks, each kept by a cut learned on held-back tasks."""
import numpy as np
import pytest

from tessera.backend.dataset import has_rectangles
from tessera.backend.label_config import parse_label_config
from tessera.backend.predictions import prediction_to_results
from tessera.backend.regions import region_to_mask
from tessera.backend.training import val_score
from tessera.model.inference import Prediction, boxes_prediction

CONFIG = parse_label_config("""<View><Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Nucleus"/></BrushLabels>
  <RectangleLabels name="bbox" toName="image"><Label value="Nucleus"/></RectangleLabels></View>""")


def _two_touching_objects():
    """Two nuclei whose masks touch and whose boxes overlap, as a mask model's instance map and a head's boxes."""
    inst = np.zeros((60, 80), np.int32)
    inst[10:30, 10:34], inst[18:40, 30:60] = 1, 2
    classes = (inst > 0).astype(np.int32)
    dets = np.array([[10, 10, 34, 30, 0.9, 1], [30, 18, 60, 40, 0.8, 1]], np.float64)
    head = boxes_prediction(dets, 0.7)
    return Prediction(classes, inst, {1: 1, 2: 1}, {1: 0.95, 2: 0.85}, 0.7, head=head), dets


def test_rectangles_come_from_the_head_and_brush_masks_from_the_masks():
    pred, dets = _two_touching_objects()
    results = prediction_to_results(pred, CONFIG, "image", ["Nucleus"])
    rects = [r for r in results if r["type"] == "rectanglelabels"]
    brush = [r for r in results if r["type"] == "brushlabels"]
    assert len(rects) == 2 and len(brush) == 2
    # each rectangle is a head box (they overlap, so the instance map could not have drawn them both whole)
    got = sorted(tuple(np.argwhere(region_to_mask(r, 60, 80))[[0, -1]].ravel()) for r in rects)
    want = sorted((int(y0), int(x0), int(y1) - 1, int(x1) - 1) for x0, y0, x1, y1, _, _ in dets)
    assert got == want
    assert sorted(r["score"] for r in rects) == [0.8, 0.9]
    assert len({r["id"] for r in results}) == 4                    # no rectangle shares a brush region's id
    for r in brush:                                                 # the masks as they are
        k = int(r["id"].rsplit("-", 1)[1])
        assert np.array_equal(region_to_mask(r, 60, 80), pred.instances == k)


def test_without_a_head_rectangles_are_the_masks_bounding_boxes():
    pred, _ = _two_touching_objects()
    pred.head = None
    rects = [r for r in prediction_to_results(pred, CONFIG, "image", ["Nucleus"]) if r["type"] == "rectanglelabels"]
    assert len(rects) == 2
    for r in rects:
        k = int(r["id"].rsplit("-", 1)[1])
        ys, xs = np.nonzero(pred.instances == k)
        box = np.argwhere(region_to_mask(r, 60, 80))
        assert (box.min(0) == [ys.min(), xs.min()]).all() and (box.max(0) == [ys.max(), xs.max()]).all()


def test_a_project_with_rectangles_beside_masks_is_judged_on_its_rectangles_too():
    brush_only = parse_label_config("""<View><Image name="image" value="$image"/>
      <BrushLabels name="mask" toName="image"><Label value="Nucleus"/></BrushLabels></View>""")
    box_only = parse_label_config("""<View><Image name="image" value="$image"/>
      <RectangleLabels name="bbox" toName="image"><Label value="Nucleus"/></RectangleLabels></View>""")
    assert has_rectangles(CONFIG) and not has_rectangles(brush_only) and not has_rectangles(box_only)
    m = {"fg_iou": 0.8, "miou": 0.8, "instance_f1": 0.4, "box_ap50": 0.5, "head_box_ap50": 0.9}
    assert val_score(m, 1) == pytest.approx(0.6)                                 # masks alone
    assert val_score(m, 1, rectangles=True) == pytest.approx((0.6 + 0.9) / 2)    # + what the rectangles get
    old = {k: v for k, v in m.items() if k != "head_box_ap50"}                   # a version without a head
    assert val_score(old, 1, rectangles=True) == pytest.approx((0.6 + 0.5) / 2)  # its masks' boxes


def test_a_trained_mask_version_serves_its_heads_boxes_after_their_own_learned_cut(trained_model_dir):
    """The fixture's version (brush-labelled procedural nuclei, the default TrainConfig) learned the head beside
    its masks: the checkpoint keeps the head's cut and held-back figures, and the served predictor's head
    boxes, after that cut, find the objects of images it never saw."""
    from tessera.model.checkpoint import load_checkpoint
    from tessera.model.data import make_nuclei
    from tessera.model.inference import Predictor
    from tessera.model.metrics import box_iou
    from tessera.model.postprocess import true_objects

    path = next(p for p in sorted(trained_model_dir.rglob("model.pt")))
    ckpt = load_checkpoint(path, "vqvae")
    assert ckpt["box_cut"]["match"] == "box" and ckpt["box_cut"]["chosen"]["source"].startswith("learned")
    assert 0.0 <= ckpt["metrics"]["head_box_ap50"] <= 1.0 and "head_recall" in ckpt["metrics"]
    pred = Predictor.from_checkpoint(path, device="cpu")
    assert pred.head_beside_masks and pred.box_cut.source.startswith("learned")
    assert not pred.box_flip                                        # one encoder pass: no mirror image for boxes
    found = true_n = 0
    for s in make_nuclei(4, size=128, seed=99):
        p = pred.predict([s.image])[0]
        assert p.head is not None and p.head.boxes is not None
        scores = np.array(list(p.head.instance_score.values()))
        assert (scores >= pred.box_cut.min_score).all()             # the cut was applied
        t_boxes, _ = true_objects(s)
        boxes = np.array([p.head.boxes[k] for k in sorted(p.head.boxes)]).reshape(-1, 4)
        iou = box_iou(boxes, t_boxes) if len(boxes) else np.zeros((0, len(t_boxes)))
        found += int((iou.max(0) >= 0.5).sum()) if len(boxes) else 0
        true_n += len(t_boxes)
    assert found >= 0.5 * true_n, (found, true_n)


def test_a_version_draws_rectangles_from_its_masks_where_their_boxes_rank_better(trained_model_dir, tmp_path):
    """rectangles_from: the head where its held-back box AP50 is at least the masks' (DSB's nuclei), the masks'
    bounding boxes where it is lower (Pets' whole animals); such a version does not run its head at all."""
    import torch

    from tessera.model.checkpoint import load_checkpoint, save_checkpoint
    from tessera.model.data import make_nuclei
    from tessera.model.inference import Predictor
    from tessera.model.train_vqvae import rectangles_from

    assert rectangles_from({"box_ap50": 0.63, "head_box_ap50": 0.74}) == "head"
    assert rectangles_from({"box_ap50": 0.77, "head_box_ap50": 0.39}) == "masks"
    assert rectangles_from({"box_ap50": 0.77}) == "masks"
    path = next(p for p in sorted(trained_model_dir.rglob("model.pt")))
    ckpt = load_checkpoint(path, "vqvae")
    assert ckpt["box_cut"]["rectangles"] == ckpt["metrics"]["rectangles"] == rectangles_from(ckpt["metrics"])
    ckpt["box_cut"]["rectangles"] = "masks"
    save_checkpoint(ckpt, tmp_path / "masks.pt")
    pred = Predictor.from_checkpoint(tmp_path / "masks.pt", device="cpu")
    assert not pred.has_box_head and not pred.head_beside_masks
    image = make_nuclei(1, size=128, seed=5)[0].image
    p = pred.predict([image])[0]
    assert p.head is None and p.instance_label                      # rectangles from the masks' boxes
    with torch.inference_mode():                                    # the pass returns the logits alone
        assert len(pred._passes(torch.zeros(1, 3, 64, 64))) == 1
    served = Predictor.from_checkpoint(path, device="cpu")
    both = served.predict([image])[0]
    assert both.head is not None and served.predict([image], boxes=False)[0].head is None
    assert np.array_equal(both.instances, served.predict([image], boxes=False)[0].instances)   # same masks


def test_objects_too_large_for_the_head_get_none():
    """mask_head_max_px: where the median object is larger than the head's cells can see whole (Pets' animals,
    ~68 model px), a mask model learns no head and its rectangles are the masks' boxes; small nuclei get one."""
    from tessera.model.data import Sample, make_nuclei
    from tessera.model.train_vqvae import TrainConfig, _setup, mask_object_px

    small = make_nuclei(4, size=128, seed=1)
    big = []
    for i, s in enumerate(small):                  # one object filling most of each image, as a pet its photo
        inst = np.zeros(s.instances.shape, np.int32)
        inst[16:112, 20:108] = 1
        big.append(Sample(s.image, (inst > 0).astype(np.int32), inst, id=f"big{i}"))
    cfg = TrainConfig(device="cpu", max_iters=1)
    assert mask_object_px(cfg, small) <= cfg.mask_head_max_px < mask_object_px(cfg, big)
    assert _setup(cfg, small, small[:1], ["Nucleus"], None, None).model.box_head is not None
    assert _setup(cfg, big, big[:1], ["Nucleus"], None, None).model.box_head is None
    assert _setup(TrainConfig(device="cpu", mask_head_max_px=200), big, big[:1], ["Nucleus"], None,
                  None).model.box_head is not None


def test_a_short_run_weighs_the_head_less():
    """mask_head_weight: a run too short to learn both gives the head's loss less weight (at full weight it took
    over the tests' small model: test_model_train's instance split found no more objects than connected
    components), by the square of its share of mask_box_full_iters; a warm start counts its earlier iterations."""
    from tessera.model.data import make_nuclei
    from tessera.model.train_vqvae import TrainConfig, _setup, mask_head_weight

    assert mask_head_weight(TrainConfig(max_iters=600)) == 1.0
    assert mask_head_weight(TrainConfig(max_iters=2400)) == 1.0
    assert mask_head_weight(TrainConfig(max_iters=150)) == pytest.approx(1 / 16)
    assert mask_head_weight(TrainConfig(max_iters=300), iter0=600) == 1.0
    data = make_nuclei(4, size=128, seed=1)
    run = _setup(TrainConfig(device="cpu", max_iters=300), data, data[:1], ["Nucleus"], None, None)
    assert run.model.box_head is not None and run.cfg.mask_box_weight == pytest.approx(0.25)
    assert _setup(TrainConfig(device="cpu", max_iters=600), data, data[:1], ["Nucleus"], None,
                  None).cfg.mask_box_weight == 1.0


def test_the_masks_are_parted_at_the_heads_objects_whatever_the_config(trained_model_dir):
    """A served mask version with a head splits a mask that holds two of the head's objects (score >= 0.4)
    between them, also for a config without rectangles (boxes=False: no Prediction.head); weaker peaks, or
    a version whose rectangles come from the masks, leave it whole."""
    from tessera.model.inference import HEAD_SPLIT_MIN_SCORE, Predictor

    path = next(p for p in sorted(trained_model_dir.rglob("model.pt")))
    served = Predictor.from_checkpoint(path, device="cpu")
    assert served.head_beside_masks
    C = served.n_classes
    probs = np.zeros((C + 2, 40, 90), np.float32)
    probs[0] = 1.0
    probs[0, 10:30, 5:55], probs[1, 10:30, 5:55] = 0.0, 1.0           # one wide object of class 1
    dets = np.array([[5, 10, 30, 30, 0.9, 1], [30, 10, 55, 30, 0.7, 1]], np.float64)
    for with_head in (True, False):
        p = served._prediction(probs, dets, with_head=with_head)
        assert len(p.instance_label) == 2 and (p.head is not None) == with_head
        assert p.instances[20, 10] != p.instances[20, 50] and np.array_equal(p.instances > 0, probs[0] < 0.5)
    weak = dets.copy()
    weak[1, 4] = HEAD_SPLIT_MIN_SCORE - 0.05
    assert len(served._prediction(probs, weak).instance_label) == 1
    served.has_box_head = served.head_beside_masks = False               # rectangles from the masks: no head
    assert len(served._prediction(probs, None).instance_label) == 1
