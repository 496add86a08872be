"""Tests for model/data.py: procedural nuclei, folder loading and the stable id split."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tessera.model.data import Sample, load_folder, make_nuclei, split_ids

DSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018"


def _touching_pairs(inst: np.ndarray) -> int:
    """Number of distinct instance pairs that share a 4-neighbour edge."""
    pairs = set()
    for a, b in ((inst[:, 1:], inst[:, :-1]), (inst[1:], inst[:-1])):
        m = (a > 0) & (b > 0) & (a != b)
        pairs |= set(map(tuple, np.sort(np.stack([a[m], b[m]], 1), 1)))
    return len(pairs)


def test_make_nuclei_types_and_determinism():
    a, b = make_nuclei(4, 96, seed=3), make_nuclei(6, 96, seed=3)
    c = make_nuclei(4, 96, seed=4)
    for s, t in zip(a, b):
        assert s.image.shape == (96, 96, 3) and s.image.dtype == np.uint8
        assert s.classes.dtype == np.int32 and s.instances.dtype == np.int32
        assert np.array_equal(s.image, t.image) and np.array_equal(s.instances, t.instances)
        assert s.id == t.id
        np.testing.assert_array_equal(s.classes, (s.instances > 0).astype(np.int32))
    assert not np.array_equal(a[0].image, c[0].image)


def test_make_nuclei_realistic_content():
    samples = make_nuclei(12, 256, seed=0)
    counts = [len(np.unique(s.instances)) - 1 for s in samples]
    assert min(counts) >= 3 and max(counts) <= 40
    assert len(set(counts)) > 3, "nucleus counts should vary between images"
    # touching nuclei are common and stay separate instances
    pairs = [_touching_pairs(s.instances) for s in samples]
    assert sum(p > 0 for p in pairs) >= 10 and np.mean(pairs) >= 3
    for s in samples:
        fg, bg = s.image[s.classes > 0].mean(), s.image[s.classes == 0].mean()
        assert abs(fg - bg) > 5, "nuclei must differ from background"
        # noise/texture: nuclei are not flat
        assert s.image[s.classes > 0].std() > 2
    # brightness varies between images
    assert np.ptp([s.image.mean() for s in samples]) > 20


def test_make_nuclei_non_square():
    # its speed (~12 ms per 256x256 image) is measured by bench/micro.py, not asserted here
    s = make_nuclei(2, (80, 150), seed=1)
    assert s[0].image.shape == (80, 150, 3) and s[0].instances.shape == (80, 150)
    big = make_nuclei(10, 256, seed=2)
    assert len(big) == 10 and all(b.image.shape == (256, 256, 3) and b.instances.max() > 0 for b in big)
    with pytest.raises(ValueError):
        make_nuclei(1, 8)


def _write_instance_folder(root: Path, n: int = 3, classes_json=None) -> list[Sample]:
    samples = make_nuclei(n, (64, 80), seed=7)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for s in samples:
        Image.fromarray(s.image).save(root / "images" / f"{s.id}.png")
        Image.fromarray(s.instances.astype(np.uint16)).save(root / "labels" / f"{s.id}.png")
    if classes_json is not None:
        (root / "classes.json").write_text(json.dumps(classes_json))
    return samples


def test_load_folder_instances(tmp_path):
    ref = _write_instance_folder(tmp_path)
    samples, names = load_folder(tmp_path)
    assert names == ["object"]
    assert [s.id for s in samples] == sorted(s.id for s in ref)
    by_id = {s.id: s for s in ref}
    for s in samples:
        np.testing.assert_array_equal(s.image, by_id[s.id].image)   # RGB kept as is
        np.testing.assert_array_equal(s.instances, by_id[s.id].instances)
        np.testing.assert_array_equal(s.classes, (s.instances > 0).astype(np.int32))
    one, _ = load_folder(tmp_path, ids=[ref[1].id])
    assert [s.id for s in one] == [ref[1].id]
    (tmp_path / "classes.json").write_text(json.dumps(["nucleus"]))
    assert load_folder(tmp_path)[1] == ["nucleus"]


def test_load_folder_semantic_masks_and_grey(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    grey = np.zeros((20, 30), np.uint8)
    grey[:, :] = 3
    grey[2:8, 2:8] = 40                       # dark 8-bit fluorescence: gets stretched
    Image.fromarray(grey).save(tmp_path / "images" / "a.png")
    mask = np.zeros((20, 30), np.uint8)
    mask[2:8, 2:8] = 2
    mask[10:14, 10:14] = 1
    mask[10:14, 20:24] = 1                    # two separate blobs of class 1 -> two instances
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    (tmp_path / "classes.json").write_text(json.dumps({"1": "cat", "2": "dog"}))
    (s,), names = load_folder(tmp_path)
    assert names == ["cat", "dog"]
    assert s.image.shape == (20, 30, 3) and s.image.max() == 255 and s.image.min() == 0
    assert np.array_equal(s.image[..., 0], s.image[..., 2])
    np.testing.assert_array_equal(s.classes, mask.astype(np.int32))
    assert len(np.unique(s.instances)) == 4
    assert len(np.unique(s.instances[mask == 1])) == 2
    # name -> index dict form and the default names
    (tmp_path / "classes.json").write_text(json.dumps({"dog": 2, "cat": 1}))
    assert load_folder(tmp_path)[1] == ["cat", "dog"]
    (tmp_path / "classes.json").unlink()
    assert load_folder(tmp_path)[1] == ["class_1", "class_2"]
    (tmp_path / "classes.json").write_text(json.dumps(["cat"]))
    with pytest.raises(ValueError, match="classes.json"):
        load_folder(tmp_path)


def test_load_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="not a dataset folder"):
        load_folder(tmp_path)
    ref = _write_instance_folder(tmp_path / "d", n=2)
    with pytest.raises(ValueError, match="lack an image or a label"):
        load_folder(tmp_path / "d", ids=[ref[0].id, "nope"])
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "d" / "labels" / f"{ref[0].id}.png")
    with pytest.raises(ValueError, match="size"):
        load_folder(tmp_path / "d")
    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(tmp_path / "d" / "labels" / f"{ref[0].id}.png")
    with pytest.raises(ValueError, match="single-channel"):
        load_folder(tmp_path / "d")


def test_load_dsb2018():
    if not DSB.is_dir():
        pytest.skip(f"real data set not found at {DSB} (optional; see ../shared/data/README.md)")
    ids = sorted(p.stem for p in (DSB / "images").iterdir())[:40]
    samples, names = load_folder(DSB, ids=ids)
    assert names == ["object"] and len(samples) == 40
    for s in samples:
        assert s.image.dtype == np.uint8 and s.image.shape[2] == 3
        assert s.image.shape[:2] == s.instances.shape
        assert s.instances.max() >= 1
        assert s.image.max() >= 200, "grey fluorescence must be stretched to use the uint8 range"


def test_split_ids_stable():
    ids = [f"task-{i}" for i in range(500)]
    train, val = split_ids(ids, 0.2)
    assert sorted(train + val) == sorted(ids) and not set(train) & set(val)
    assert 60 < len(val) < 140
    # the same id lands in the same split whatever else is in the list, and in any order
    train2, val2 = split_ids(list(reversed(ids[:250])), 0.2)
    assert set(val2) == set(val) & set(ids[:250])
    assert train == [i for i in ids if i in set(train)]          # input order kept
    # tiny sets still get a held-back id
    assert len(split_ids(["a", "b"], 0.2)[1]) == 1
    assert split_ids(["a", "b"], 0.0) == (["a", "b"], [])
    with pytest.raises(ValueError):
        split_ids(ids, 1.0)


def test_semantic_labels_become_the_same_objects_everywhere(tmp_path):
    """Folder loading, the GAN's layouts and the label model's targets share one semantic -> instances rule:
    per class, 8-connected (corner-touching pixels are one object, as OpenCV outlines them)."""
    from tessera.model.inference import label_map
    from tessera.model.layouts import ensure_instances

    classes = np.zeros((16, 16), np.uint8)
    classes[2:5, 2:5] = 1
    classes[5:8, 5:8] = 1            # touches the first square at a corner: one object
    classes[5:8, 8:11] = 2           # touches it along an edge but has another class: another object
    classes[12:15, 2:5] = 1
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(classes).save(tmp_path / "masks" / "a.png")
    loaded = load_folder(tmp_path)[0][0].instances
    assert len(np.unique(loaded)) == 4                         # background + 3 objects
    assert np.array_equal(ensure_instances(classes.astype(np.int32), np.zeros_like(loaded)), loaded)
    assert np.array_equal(label_map(classes.astype(np.int32), np.zeros_like(loaded), 2),
                          label_map(classes.astype(np.int32), loaded, 2))


def test_one_relabel_for_layouts_and_refined_annotations():
    from tessera.model import inference, layouts
    from tessera.model.data import relabel

    inst = np.array([[0, 7, 7, 3], [0, 0, 9, 3]], np.int32)
    assert relabel(inst).tolist() == [[0, 2, 2, 1], [0, 0, 3, 1]]
    assert relabel(inst, min_area=2).tolist() == [[0, 2, 2, 1], [0, 0, 0, 1]]     # fragments dropped
    assert inference.relabel is layouts.relabel is relabel


def _stretch_per_pixel(x):
    """The grey stretch as every pixel's arithmetic (what model.data._stretch's table must reproduce)."""
    lo, hi = np.percentile(x, (0.5, 99.8))
    if hi <= lo:
        hi = lo + 1.0
    return ((x.astype(np.float32) - lo) * (255.0 / (hi - lo))).clip(0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("seed", range(6))
def test_grey_images_stretch_to_the_same_bytes_through_the_table(seed):
    from tessera.model.data import _stretch, image_to_rgb

    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(1, 300)), int(rng.integers(1, 300))
    dark = rng.gamma(1.5, 4 + 10 * seed, (h, w)).clip(0, 255).astype(np.uint8)   # dark fluorescence, odd size
    for x in (dark, np.full((h, w), seed * 40, np.uint8), (dark.astype(np.uint16) * 257 + seed)):
        assert np.array_equal(_stretch(x), _stretch_per_pixel(x))
    rgb = image_to_rgb(Image.fromarray(dark, "L"))
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8
    assert all(np.array_equal(rgb[..., c], _stretch_per_pixel(dark)) for c in range(3))
