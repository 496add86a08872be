"""Training samples past TESSERA_TRAIN_MEMORY_MB live in memory-mapped scratch files: the same pixels, the same
training batches, nothing left on disk; and a project's images are fetched at most a few ahead of their use."""

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tessera.backend.dataset import bounded_map, load_samples
from tessera.backend.label_config import parse_label_config
from tessera.backend.regions import instances_to_results
from tessera.backend.settings import Settings
from tessera.model.data import load_folder, make_nuclei
from tessera.model.sample_store import SampleStore, sample_bytes
from tessera.model.train_vqvae import Batcher, TrainConfig
from tests.conftest import CONFIG_ALL


def _owns_memory(a: np.ndarray) -> bool:
    """Whether an array's pixels are the process's own memory (not a file mapping)."""
    while a.base is not None and isinstance(a.base, np.ndarray):
        a = a.base
    return a.base is None


def test_samples_past_the_budget_are_mapped_from_files_that_are_gone_from_disk(tmp_path):
    samples = make_nuclei(5, size=(96, 130), seed=3)
    one = sample_bytes(samples[0])
    store = SampleStore(tmp_path / "scratch", budget_bytes=2 * one)
    kept = [store.keep(s) for s in samples]
    assert [k is s for k, s in zip(kept, samples)] == [True, True, False, False, False]
    assert store.summary()["samples_mapped"] == 3
    for k, s in zip(kept[2:], samples[2:]):
        for a, b in [(k.image, s.image), (k.classes, s.classes), (k.instances, s.instances)]:
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
            assert not _owns_memory(a) and a.ctypes.data % 8 == 0     # mapped, each array aligned
        assert k.id == s.id and k.size == s.size
    assert list((tmp_path / "scratch").iterdir()) == []               # unlinked as soon as mapped
    # copy-on-write: a write changes the sample it was made to, not the file's other samples or the original
    kept[2].instances[:] = 0
    assert kept[3].instances.any() and samples[2].instances.any()


def test_no_budget_keeps_everything_in_memory(tmp_path):
    samples = make_nuclei(3, size=64, seed=1)
    store = SampleStore(tmp_path / "scratch", budget_bytes=None)
    assert all(store.keep(s) is s for s in samples)
    assert not (tmp_path / "scratch").exists()


def test_mapped_samples_give_the_same_training_batches(tmp_path):
    """The batcher draws bit-identical crops, targets, boxes and contact weights from mapped samples."""
    samples = make_nuclei(4, size=(120, 150), seed=7)
    store = SampleStore(tmp_path, budget_bytes=0)
    mapped = [store.keep(s) for s in samples]
    assert all(not _owns_memory(m.image) for m in mapped)
    cfg = TrainConfig(crop=64, resolution=128, contact_weight=2.0)
    a, b = (Batcher(s, cfg, 1, seed=4, scale=0.8, with_boxes=True) for s in (samples, mapped))
    for _ in range(5):
        (xa, ta, ba, wa), (xb, tb, bb, wb) = a.get_batch(3, "cpu"), b.get_batch(3, "cpu")
        assert xa.equal(xb) and ta.equal(tb) and wa.equal(wb)
        assert all(np.array_equal(p, q) for p, q in zip(ba, bb))


def _data_uri(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _task(i: int, sample) -> dict:
    h, w = sample.instances.shape
    labels = {int(k): "Nucleus" for k in np.unique(sample.instances) if k}
    control = parse_label_config(CONFIG_ALL).controls[0]
    result = instances_to_results(sample.instances, labels, {}, control)
    return {"id": i, "data": {"image": _data_uri(sample.image)},
            "annotations": [{"id": i, "result": result}]}


def test_a_project_past_the_memory_budget_loads_the_same_samples_mapped(tmp_path):
    """load_samples with TESSERA_TRAIN_MEMORY_MB 1: the ~0.6 MB samples past the first one are mapped, and equal
    to the samples of an unlimited run; no scratch file remains."""
    made = make_nuclei(4, size=(200, 260), seed=2)
    tasks = [_task(i + 1, s) for i, s in enumerate(made)]
    config = parse_label_config(CONFIG_ALL)
    free, _ = load_samples(Settings(model_dir=tmp_path / "a", train_memory_mb=0), config, tasks)
    s = Settings(model_dir=tmp_path / "b", train_memory_mb=1)
    capped, used = load_samples(s, config, tasks)
    assert [t["id"] for t in used] == [1, 2, 3, 4]
    assert all(_owns_memory(f.image) for f in free)
    assert [_owns_memory(c.image) for c in capped] == [True, False, False, False]
    for f, c in zip(free, capped):
        assert f.id == c.id and np.array_equal(f.image, c.image)
        assert np.array_equal(f.classes, c.classes) and np.array_equal(f.instances, c.instances)
    scratch = tmp_path / "b" / "cache" / "samples"
    assert scratch.is_dir() and list(scratch.iterdir()) == []


def test_folder_training_data_past_the_budget_is_mapped_as_it_is_read(tmp_path):
    """`tessera train --data`: each sample goes through `keep` as it is read."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i, s in enumerate(make_nuclei(3, size=96, seed=4)):
        Image.fromarray(s.image).save(tmp_path / "images" / f"n{i}.png")
        Image.fromarray(s.instances.astype(np.uint16)).save(tmp_path / "labels" / f"n{i}.png")
    seen = []
    store = SampleStore(tmp_path / "scratch", budget_bytes=0)
    samples, names = load_folder(tmp_path, keep=lambda s: seen.append(s.id) or store.keep(s))
    assert seen == ["n0", "n1", "n2"] and names == ["object"]
    assert all(not _owns_memory(s.image) and not _owns_memory(s.instances) for s in samples)
    plain, _ = load_folder(tmp_path)
    assert all(np.array_equal(a.instances, b.instances) for a, b in zip(samples, plain))


def test_fetches_run_at_most_a_window_ahead_of_their_use():
    done, lock = [], threading.Lock()

    def fetch(i):
        with lock:
            done.append(i)
        return i

    with ThreadPoolExecutor(max_workers=4) as pool:
        out = []
        for i in bounded_map(pool, fetch, list(range(40)), ahead=6):
            time.sleep(0.005)            # the slower consumer: Executor.map would have run all 40 by now
            with lock:
                assert len(done) - len(out) <= 7      # the one being consumed + 6 ahead
            out.append(i)
    assert out == list(range(40))


def test_a_fetch_that_raises_surfaces_in_order():
    def fetch(i):
        if i == 3:
            raise ValueError("bad task 3")
        return i

    with ThreadPoolExecutor(max_workers=2) as pool:
        got = bounded_map(pool, fetch, list(range(6)), ahead=2)
        assert [next(got) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="bad task 3"):
            next(got)


# ------------------------------------------------------------------------ held-back images a run evaluates

def _held(n: int, side: int, prefix: str = "t"):
    from tessera.model.data import Sample

    return [Sample(image=np.zeros((side, side, 3), np.uint8), classes=np.zeros((side, side), np.int32),
                   instances=np.zeros((side, side), np.int32), id=f"{prefix}{k}:image") for k in range(n)]


def test_a_run_evaluates_held_back_images_up_to_a_pixel_budget_person_made_first():
    from tessera.backend.dataset import evaluated_held_back

    held = _held(40, 1000)                                  # 40 megapixels
    assert evaluated_held_back(held, None, 48) is held      # under the budget: all of them
    assert evaluated_held_back(held, None, 0) is held       # 0: no budget
    judged = {s.id for s in held[30:]}
    val = evaluated_held_back(held, judged, 12.5)
    assert len(val) == 12 and sum(s.image.shape[0] * s.image.shape[1] for s in val) <= 12.5e6
    assert judged <= {s.id for s in val}                    # what promotion rests on comes first
    ids = {s.id for s in val}
    assert [s.id for s in val] == [s.id for s in held if s.id in ids]     # in the held-back order
    again = evaluated_held_back(held[::-1], judged, 12.5)   # the choice does not depend on the order given
    assert {s.id for s in again} == {s.id for s in val}
    assert len(evaluated_held_back(_held(3, 5000), None, 1)) == 1     # never none


def test_a_folder_run_records_every_held_back_task_and_evaluates_within_the_budget(tmp_path):
    """`tessera train --data` with TESSERA_EVAL_MEGAPIXELS 0.1: the version's figures come from the held-back
    images within 0.1 megapixels, and it records every held-back task, so that later runs hold them back too."""
    from tessera.backend.dataset import previous_held_back
    from tessera.backend.predictions import ModelCache
    from tessera.backend.training import train_from_folder
    from tessera.model.data import split_ids

    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "labels").mkdir()
    for i, s in enumerate(make_nuclei(20, size=(120, 160), seed=6)):
        Image.fromarray(s.image).save(tmp_path / "data" / "images" / f"n{i:02d}.png")
        Image.fromarray(s.instances.astype(np.uint16)).save(tmp_path / "data" / "labels" / f"n{i:02d}.png")
    _, val_ids = split_ids([f"n{i:02d}" for i in range(20)], 0.2)
    assert len(val_ids) >= 3
    settings = Settings(model_dir=tmp_path / "models", eval_megapixels=0.05, train_budget_s=0)
    result = train_from_folder(settings, tmp_path / "data", iters=4)
    info = ModelCache(settings).registry("default").versions("label")[-1]
    assert result["metrics"]["n_val"] == 2 == info.metrics["n_val"]     # 2 x 19,200 px of 50,000
    assert info.metrics["n_held_back_tasks"] == len(val_ids)
    assert previous_held_back(ModelCache(settings).registry("default")) == set(val_ids)
