"""Edited images (model/edit.py): objects that stand beside a photo's object (fit), and pasted classes that
keep every class's pixel share (balance)."""

import numpy as np

from tessera.model.data import Sample
from tessera.model.edit import Editor


def _photo(label: int, seed: int, size: int = 96, side: int = 44) -> Sample:
    """A 'pet photo': one big object of class `label` in the middle of a textured background."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
    classes = np.zeros((size, size), np.int32)
    a = (size - side) // 2
    classes[a:a + side, a:a + side] = label
    image[classes > 0] = (200, 120, 40) if label == 1 else (40, 160, 220)
    return Sample(image, classes, (classes > 0).astype(np.int32), id=f"photo{label}_{seed}")


def _totals(samples, n_labels=2):
    return np.bincount(np.concatenate([s.classes.ravel() for s in samples]), minlength=n_labels + 1)


def test_fit_shrinks_the_object_beside_the_photos_object_instead_of_covering_it():
    samples = [_photo(1, 0), _photo(1, 1), _photo(2, 2)]
    by_id = {s.id: s for s in samples}
    kept = {}
    for fit in (1.0, 0.4):
        edits = Editor(samples, n_labels=2, max_objects=1, fit=fit).edit(8, label=2, seed=3)
        kept[fit] = []
        for e in edits:
            bg = by_id[e.background]
            before = bg.classes > 0
            kept[fit].append(float((e.sample.classes[before] == bg.classes[before]).mean()))
            assert ((e.sample.classes > 0) == (e.sample.instances > 0)).all()
            assert len(e.labels) == 1 and e.labels == [2]
            if fit < 1:  # beside: the photo's own pixels of class 2 stay, the pasted ones add to them
                assert (e.sample.classes == 2).sum() > (bg.classes == 2).sum()
    # at the scene's scale the pasted object (as big as the photo's) has no free place and covers it;
    # with fit it is shrunk until it stands beside it, and every labelled pixel of the photo keeps its label
    assert np.mean(kept[1.0]) < 0.9
    assert min(kept[0.4]) == 1.0


def test_balance_pastes_the_requested_label_first_and_then_the_class_with_fewest_pixels():
    samples = [_photo(1, s, size=128) for s in range(4)] + [_photo(2, 9, size=128, side=20)]
    plain = Editor(samples, n_labels=2, max_objects=3, fit=0.4).edit(20, label=2, seed=1)
    balanced = Editor(samples, n_labels=2, max_objects=3, fit=0.4, balance=True).edit(20, label=2, seed=1)
    assert all(set(e.labels) == {2} for e in plain)
    assert all(e.labels[0] == 2 for e in balanced)  # every edit still holds the requested label
    assert any(1 in e.labels for e in balanced)     # once class 2 caught up, class 1 is pasted too
    t0 = _totals(samples)
    tp, tb = t0 + sum(_totals([e.sample]) for e in plain), t0 + sum(_totals([e.sample]) for e in balanced)
    assert t0[2] < t0[1] and tp[2] > tp[1]          # the rare label alone overshoots: class 1 is the minority now
    assert abs(tb[2] - tb[1]) < abs(tp[2] - tp[1])  # balanced edits keep the two classes closer
    assert tb[2] > t0[2] * 3                        # and still add many pixels of the rare label


def _frame(brightness: int, seed: int, size: int = 96) -> Sample:
    """A grey 'fluorescence frame': dark background, a few disks at the frame's exposure."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 6, (size, size), dtype=np.uint8)
    instances = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    for k, (cy, cx) in enumerate([(20, 20), (20, 70), (70, 45)], start=1):
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= 8 ** 2
        instances[disk] = k
        image[disk] = brightness + rng.integers(-5, 6, int(disk.sum()))
    rgb = np.repeat(image[..., None], 3, axis=2)
    return Sample(rgb, (instances > 0).astype(np.int32), instances, id=f"frame{brightness}_{seed}")


def test_a_grey_object_keeps_its_own_pixels_in_a_frame_of_another_exposure():
    # stop 24 scaled it to the frame's exposure; stop 25 measured that as easier to tell from real frames
    # (realism classifier 58.2 vs 55.2%, 3 of 3 seeds) and no better for training, and took it out
    dim, bright = _frame(40, 0), _frame(140, 1)
    editor = Editor([dim, bright], n_labels=1, max_objects=1, feather=0)
    edits = [e for e in editor.edit(40, seed=3) if e.background == dim.id and e.objects == [bright.id]]
    assert edits, "no edit pasted a bright frame's object into the dim frame"
    for e in edits:
        pasted = e.sample.instances > 3                  # the frame's own objects are 1..3 (relabel keeps order)
        assert pasted.any()
        assert abs(float(np.median(e.sample.image[pasted][:, 0])) - 140) <= 6   # its own frame's exposure


def test_colour_objects_keep_their_pixels():
    a, b = _photo(1, 0), _photo(2, 1)
    editor = Editor([a, b], n_labels=2, max_objects=1, feather=0)
    for e in editor.edit(10, seed=0):
        cls = e.labels[0]
        colour = (200, 120, 40) if cls == 1 else (40, 160, 220)
        pasted = e.sample.instances == e.sample.instances.max()
        assert (e.sample.image[pasted] == colour).all(axis=1).mean() > 0.9
