"""Self-training: a real (tiny) label model's most confident predictions on unlabelled images become
pseudo-labelled samples, and labelled samples keep about half of the mix."""

import numpy as np
import pytest
import torch

from tessera.model.data import make_nuclei
from tessera.model.inference import Predictor
from tessera.model.self_train import mix, pseudo_label
from tessera.model.train_vqvae import TrainConfig, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    cfg = TrainConfig(max_iters=60, eval_interval=1000, log_interval=1000, batch_size=8, lr=5e-3, device="cpu",
                      threads=1, resolution=64, crop=64, widths=(8, 16, 32, 32), codebook_size=32, embed_dim=16,
                      bf16=False)
    path = train(cfg, make_nuclei(8, size=64, seed=0), [], ["nucleus"], tmp_path_factory.mktemp("st") / "m.pt")
    return Predictor.from_checkpoint(path, device="cpu")


def test_pseudo_labels_are_the_most_confident_predictions(predictor):
    pool = make_nuclei(10, size=64, seed=5)
    images, ids = [s.image for s in pool], [f"t{i}" for i in range(len(pool))]
    out = pseudo_label(predictor, images, ids, keep_share=0.4, batch_size=3)
    preds = predictor.predict(images)
    scores = [p.score for p in preds]
    assert [s.id for s in out] == [f"pseudo:{ids[i]}" for i in np.argsort(scores, kind="stable")[::-1][:4]]
    for s in out:
        i = ids.index(s.id.split(":", 1)[1])
        assert s.synthetic and s.image is images[i]
        assert np.array_equal(s.classes, preds[i].classes) and np.array_equal(s.instances, preds[i].instances)
    # the model learned something: its pseudo-labels overlap the hidden truth of the images kept
    truth = {f"pseudo:t{i}": p for i, p in enumerate(pool)}
    ious = [((s.classes > 0) & (truth[s.id].classes > 0)).sum() / max(((s.classes > 0) | (truth[s.id].classes > 0))
                                                                      .sum(), 1) for s in out]
    assert np.mean(ious) > 0.3
    # a floor on the score keeps fewer; nothing above an impossible floor
    assert pseudo_label(predictor, images, ids, keep_share=1.0, min_score=1.01) == []


def test_pseudo_label_checks_its_arguments(predictor):
    with pytest.raises(ValueError, match="keep_share"):
        pseudo_label(predictor, [], [], keep_share=0.0)
    with pytest.raises(ValueError, match="ids"):
        pseudo_label(predictor, [np.zeros((8, 8, 3), np.uint8)], [], keep_share=0.5)


def test_mix_keeps_labelled_samples_about_half():
    labelled, extra = make_nuclei(3, size=32, seed=1), make_nuclei(10, size=32, seed=2)
    mixed = mix(labelled, extra)
    n_lab = sum(any(m is s for s in labelled) for m in mixed)
    assert n_lab == 9 and mixed[-10:] == extra
    assert mix(labelled, []) == labelled


def test_mix_gives_labelled_samples_the_share_asked():
    labelled, extra = make_nuclei(2, size=32, seed=1), make_nuclei(12, size=32, seed=2)
    mixed = mix(labelled, extra, labelled_share=0.75)          # 12 extra -> 36 labelled = 18 repeats of 2
    assert sum(any(m is s for s in labelled) for m in mixed) == 36 and mixed[-12:] == extra
    with pytest.raises(ValueError, match="labelled_share"):
        mix(labelled, extra, labelled_share=1.0)


def test_only_confident_regions_are_kept_and_dropped_ones_can_be_inpainted(predictor):
    pool = make_nuclei(4, size=64, seed=7)
    images, ids = [s.image for s in pool], [f"t{i}" for i in range(len(pool))]
    preds = predictor.predict(images)
    scores = sorted(v for p in preds for v in p.instance_score.values())
    assert len(scores) >= 4
    floor = scores[len(scores) // 2]                            # about half the regions score under it
    kept = pseudo_label(None, images, ids, keep_share=1.0, min_region_score=floor, preds=preds)
    painted = pseudo_label(None, images, ids, keep_share=1.0, min_region_score=floor, inpaint_dropped=True,
                           preds=preds)
    n_dropped = 0
    for s, q, p in zip(kept, painted, sorted(range(4), key=lambda i: -preds[i].score)):
        pred = preds[p]
        want = {k for k, v in pred.instance_score.items() if v >= floor}
        assert set(np.unique(s.instances[s.instances > 0])) == want
        assert np.array_equal(s.classes > 0, np.isin(s.instances, list(want)))
        assert s.image is images[p]                             # without inpainting the image is the task's
        gone = (pred.instances > 0) & ~np.isin(pred.instances, list(want))
        n_dropped += int(gone.sum())
        if gone.any():  # inpainted: the dropped objects' pixels now look like the background around them,
            # the kept regions' pixels are untouched
            assert q.image is not images[p] and np.array_equal(q.classes, s.classes)
            bg = np.median(images[p][pred.instances == 0].astype(float), 0)
            before = np.abs(images[p][gone] - bg).mean()
            assert np.abs(q.image[gone] - bg).mean() < 0.6 * before
            assert np.array_equal(q.image[s.instances > 0], images[p][s.instances > 0])
    assert n_dropped > 0
