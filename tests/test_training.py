"""Unit tests for backend/training.py and the runner pieces it relies on (no Label Studio, no training)."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from tessera.backend import dataset, gan_runs, training, workdir
from tessera.backend.jobs import ThreadJobRunner, _holder_dead, _token, pid_alive
from tessera.backend.label_config import parse_label_config
from tessera.backend.regions import instances_to_results, results_to_maps
from tessera.backend.predictions import ModelCache, PackedResult, training_annotation, result_of
from tessera.backend.store import DEFAULT_KEY
from tests.conftest import CONFIG_ALL, register_stub

CONTROLS = {c.type: c for c in parse_label_config(CONFIG_ALL).controls}


def _two_objects() -> np.ndarray:
    inst = np.zeros((40, 60), np.int32)
    yy, xx = np.mgrid[:40, :60]
    inst[(yy - 12) ** 2 + (xx - 14) ** 2 < 64] = 1
    inst[(yy - 26) ** 2 + (xx - 40) ** 2 < 81] = 2
    return inst


def _results(inst: np.ndarray, kinds) -> list[dict]:
    out = []
    for kind in kinds:
        out += instances_to_results(inst, {1: "Nucleus", 2: "Nucleus"}, {}, CONTROLS[kind])
    return out


def test_an_accepted_prediction_trains_as_masks_not_boxes():
    inst = _two_objects()
    results = _results(inst, ("rectanglelabels", "polygonlabels", "brushlabels"))   # boxes first: would win
    classes, instances = results_to_maps(results, "image", *inst.shape, {"Nucleus": 1})
    assert np.array_equal(classes > 0, inst > 0) and len(np.unique(instances)) == 3
    assert np.array_equal(instances, inst)                  # brush ids in drawing order: 1, 2


def test_regions_of_different_objects_are_all_kept():
    inst = _two_objects()
    only_first = np.where(inst == 1, 1, 0)
    only_second = np.where(inst == 2, 2, 0)
    results = _results(only_first, ("brushlabels",)) + _results(only_second, ("rectanglelabels",))
    classes, instances = results_to_maps(results, "image", *inst.shape, {"Nucleus": 1})
    assert len(np.unique(instances)) == 3 and (instances == 2).sum() > (inst == 2).sum()   # the box, whole
    other_image = [{**r, "to_name": "other"} for r in results]
    assert not results_to_maps(other_image, "image", *inst.shape, {"Nucleus": 1})[1].any()


def test_the_annotation_that_counts_skips_cancelled_and_keeps_empty():
    task = {"annotations": [
        {"id": 1, "result": [{"x": 1}], "was_cancelled": False, "updated_at": "2024-01-01T00:00:00"},
        {"id": 2, "result": [{"x": 2}], "was_cancelled": True, "updated_at": "2024-01-03T00:00:00"},
        {"id": 3, "result": [], "was_cancelled": False, "updated_at": "2024-01-02T00:00:00"}]}
    assert training_annotation(task)["id"] == 3          # "no object here" is an answer too
    assert training_annotation({"annotations": [task["annotations"][1]]}) is None
    assert training_annotation({}) is None


def test_the_annotation_starred_as_ground_truth_counts_over_a_later_one():
    """Several people labelled the task (overlap): the answer a reviewer starred counts, not whoever saved last;
    a skip stays no answer even where it carries the star."""
    starred = {"id": 1, "result": [{"x": 1}], "ground_truth": True, "updated_at": "2024-01-01T00:00:00"}
    later = {"id": 2, "result": [{"x": 2}], "ground_truth": False, "updated_at": "2024-01-03T00:00:00"}
    assert training_annotation({"annotations": [starred, later]})["id"] == 1
    assert training_annotation({"annotations": [{**starred, "ground_truth": False}, later]})["id"] == 2
    assert training_annotation({"annotations": [{**starred, "was_cancelled": True}, later]})["id"] == 2
    # the fingerprint a run compares follows the star: moving it is something new to train on
    assert dataset.data_fingerprint([{"id": 9, "annotations": [starred, later]}]) != \
        dataset.data_fingerprint([{"id": 9, "annotations": [{**starred, "ground_truth": False},
                                                           {**later, "ground_truth": True}]}])


def test_split_is_by_task_id_and_stable_as_the_project_grows():
    small = [str(i) for i in range(1, 41)]
    big = [str(i) for i in range(1, 201)]
    train_s, val_s = dataset.split_tasks(small)
    train_b, val_b = dataset.split_tasks(big)
    assert set(val_s) <= set(val_b) and set(train_s) <= set(train_b)
    assert dataset.split_tasks(list(reversed(small)))[1] == list(reversed(val_s))
    assert 0.1 < len(val_b) / len(big) < 0.3
    assert dataset.split_tasks(["7", "8"])[1], "two tasks: one is held back"


def test_served_baseline_falls_back_to_a_fitting_default_model(settings):
    cache = ModelCache(settings)
    folder = dataset.folder_config
    assert cache.source("3", folder(["Nucleus"])) is None
    register_stub(settings, DEFAULT_KEY, labels=("nucleus",))
    key, _, info = cache.source("3", folder(["Nucleus"]))
    assert key == DEFAULT_KEY and info.version == "v0001"
    assert cache.source("3", folder(["Cat", "Dog"])) is None       # other labels: nothing to beat
    register_stub(settings, "3")
    assert cache.source("3", folder(["Nucleus"]))[0] == "3"        # its own version wins
    f = settings.model_dir / "gan.pt"
    f.write_bytes(b"stub")
    cache.registry(DEFAULT_KEY).add(f, {"label_names": ["Nucleus"]}, promote=True, kind="gan")
    assert cache.source("3", folder(["Nucleus"]), kind="gan")[0] == DEFAULT_KEY   # the generator: same rule
    assert cache.source("4", folder(["Cat", "Dog"]), kind="gan") is None


def test_work_dirs_of_dead_runs_are_removed(settings):
    reg = ModelCache(settings).registry("5")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    assert not pid_alive(pid) and pid_alive(os.getpid())
    work = reg.root / ".work"
    stale = work / f"{workdir.process_space()}-pid{pid}-abc"
    mine = work / f"{workdir.process_space()}-pid{os.getpid()}-def"
    elsewhere = work / f"otherhost.1-pid{pid}-ghi"
    for d in (stale, mine, elsewhere):
        d.mkdir(parents=True)
    fresh = workdir.work_dir(reg)
    assert fresh.is_dir() and not stale.exists() and mine.exists() and elsewhere.exists()


def test_lock_tokens_name_their_process():
    assert not _holder_dead(_token())
    gone = subprocess.run([sys.executable, "-c", "from tessera.backend.jobs import _token; print(_token())"],
                          capture_output=True, text=True, check=True, cwd=os.getcwd()).stdout.strip()
    assert _holder_dead(gone) and _holder_dead(gone.encode())
    assert not _holder_dead(gone.replace(gone.split("|")[0], "otherhost/pid:[1]"))   # can't judge: wait TTL
    assert not _holder_dead(None) and not _holder_dead("garbage")


def test_every_progress_step_is_one_log_line(caplog):
    def run(key, reason, progress):
        progress({"phase": "fetch", "iter": 3, "max_iters": 6, "loss": None, "eta_s": None})
        progress({"phase": "train", "iter": 20, "max_iters": 600, "loss": 0.41234, "eta_s": 52.4})
        progress({"phase": "register", "iter": 0, "max_iters": 0, "loss": None, "eta_s": None})
        return {"status": "promoted"}

    runner = ThreadJobRunner(run, debounce_s=0.01)
    with caplog.at_level(logging.INFO, logger="tessera.backend.jobs"):
        runner.submit("9", "START_TRAINING")
        st = runner.wait_idle("9", 10)
    runner.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("project 9: ")]
    assert lines == ["project 9: fetch 3/6", "project 9: train 20/600 loss 0.4123 eta 52s", "project 9: register"]
    assert st["state"] == "done" and st["phase"] == "register" and st["fraction"] == 1.0


def test_the_gan_retrains_only_when_the_data_grew(settings):
    from tessera.model.data import Sample

    def samples(n, synthetic=0):
        img, lab = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.int32)
        return [Sample(img, lab, lab, id=str(i), synthetic=i < synthetic) for i in range(n)]

    assert gan_runs.gan_up_to_date(settings, "4", samples(3)) == ""                 # no GAN yet
    reg = ModelCache(settings).registry("4")
    f = settings.model_dir / "gan.pt"
    f.write_bytes(b"stub")
    reg.add(f, {"n_train": 40}, promote=True, kind="gan")
    assert "retrains at 48" in gan_runs.gan_up_to_date(settings, "4", samples(47))
    assert "retrains at 48" in gan_runs.gan_up_to_date(settings, "4", samples(50, synthetic=3))
    assert gan_runs.gan_up_to_date(settings, "4", samples(48)) == ""


CONFIG_TWO = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Nucleus"/><Label value="Cell"/></BrushLabels>
</View>"""


def test_a_first_version_must_beat_the_default_model_that_serves_the_project(settings):
    """Serving and training agree on which model serves a project: a default model for ["Nucleus"] serves
    a ["Nucleus", "Cell"] project, so the project's first version is compared with it."""
    from tessera.model.data import make_nuclei

    samples = make_nuclei(6, size=64, seed=3)
    quiet = lambda info: None  # noqa: E731
    training._train_and_register(settings, DEFAULT_KEY, samples[:4], samples[4:], ["Nucleus"], "default", 2, quiet)
    config = parse_label_config(CONFIG_TWO)
    assert ModelCache(settings).version("3", config) == "tessera-default-v0001"      # what LS is shown
    result = training._train_and_register(settings, "3", samples[:4], samples[4:], ["Nucleus", "Cell"], "run",
                                          2, quiet, config=config)
    assert "vs served tessera-default-v0001" in result["reason"], result
    assert 0 <= result["metrics"]["current_val_iou"] <= 1


def test_a_first_version_trains_on_every_core_while_nothing_is_served(settings):
    """Before anything is served /predict has no network pass to run, so a project's first version trains on
    every core; once a version serves (this project's, another's or the default model), runs keep half the
    cores for /predict. TESSERA_TRAIN_THREADS decides when set."""
    from tessera.model.data import make_nuclei

    cores = os.cpu_count() or 2
    s = settings.model_copy(update={"train_iters": 2, "first_train_budget_s": 30.0})
    samples = make_nuclei(6, size=64, seed=3)
    quiet = lambda info: None  # noqa: E731
    store = ModelCache(s).store
    assert not store.serves_any()
    first = training._train_and_register(s, "3", samples[:4], samples[4:], ["Nucleus"], "run", None, quiet,
                                         budget_s=30.0)
    assert first["status"] == "promoted" and store.serves_any()
    assert first["metrics"]["train_threads"] == cores and first["metrics"]["train_max_iters"] == 8
    other = training._train_and_register(s, "4", samples[:4], samples[4:], ["Nucleus"], "run", None, quiet,
                                         budget_s=30.0)        # project 4's first version: project 3 is served
    assert other["metrics"]["train_threads"] == max(1, cores // 2) and other["metrics"]["train_max_iters"] == 8
    pinned = s.model_copy(update={"train_threads": 1})
    assert training.train_config(pinned, None, 30.0, until_plateau=True, all_cores=True).threads == 1


def test_a_held_back_task_stays_held_back_as_the_project_grows():
    """The smallest-hash fallback of a small project must not move to training later (issue 11: a task
    held back at 7 tasks was trained on at 17)."""
    ids = [str(i) for i in range(23, 83)]      # 23..27 hash above the threshold: a small project of them
    first_true = next(n for n in range(1, 60) if any(training.split_ids([t], 0.2)[1] for t in ids[:n]))
    assert first_true > 2, "need a prefix with no id under the hash threshold for this test"
    previous: set[str] = set()
    for n in range(2, 61):
        train, held = dataset.split_tasks(ids[:n], previous)
        assert previous <= set(held), (n, previous - set(held))        # once held back, always held back
        assert held and not set(train) & set(held)
        previous |= set(held)
    plain = dataset.split_tasks(ids[:first_true - 1])[1]               # hash only: the fallback
    assert plain[0] not in dataset.split_tasks(ids[:first_true])[1], "the case the previous set fixes"


def _registry_with(settings, key, metrics, status_promote=True):
    reg = ModelCache(settings).registry(key)
    f = settings.model_dir / "stub.pt"
    f.write_bytes(b"stub")
    reg.add(f, metrics, promote=status_promote, kind="label")
    return reg


def test_nothing_new_since_the_newest_version(settings):
    inst = _two_objects()
    tasks = [{"id": i, "annotations": [{"id": 10 + i, "result": _results(inst, ("brushlabels",))}]} for i in (1, 2)]
    fp = dataset.data_fingerprint(tasks)
    assert fp == dataset.data_fingerprint(list(reversed(tasks)))
    reg = _registry_with(settings, "6", {"label_names": ["Nucleus"], "data_fingerprint": fp}, status_promote=False)
    assert dataset.nothing_new(reg, fp).version == "v0001"            # a rejected version counts too
    changed = [tasks[0], {"id": 2, "annotations": [{"id": 12, "result": _results(inst, ("polygonlabels",))}]}]
    assert dataset.nothing_new(reg, dataset.data_fingerprint(changed)) is None
    assert dataset.nothing_new(reg, dataset.data_fingerprint(tasks + [{"id": 3, "annotations": []}])) is not None
    assert dataset.previous_held_back(_registry_with(settings, "6", {"val_task_ids": ["4", "9"]})) == {"4", "9"}


def test_an_accepted_prediction_is_not_a_persons_judgement():
    from tessera.model.data import Sample

    inst = _two_objects()
    index = {"Nucleus": 1}
    brush = _results(inst, ("brushlabels",))
    classes, instances = results_to_maps(brush, "image", *inst.shape, index)
    sample = Sample(np.zeros((*inst.shape, 3), np.uint8), classes, instances, id="1:image")
    accepted = {"predictions": [{"model_version": "tessera-p1-v0002",
                                 "result": _results(inst, ("rectanglelabels", "polygonlabels", "brushlabels"))}]}
    assert not dataset.person_made(accepted, sample, "image", index)
    from_gan = {"predictions": [{**accepted["predictions"][0], "model_version": "tessera-p1-gan-v0003"}]}
    assert dataset.person_made(from_gan, sample, "image", index)     # a generated layout, not the label model
    from_edit = {"predictions": [{**accepted["predictions"][0], "model_version": "tessera-edit-1"}]}
    assert dataset.person_made(from_edit, sample, "image", index)    # real objects' masks, pasted
    assert dataset.person_made({"predictions": []}, sample, "image", index)
    later = {"annotations": [{"id": 1, "result": brush, "created_at": "2026-11-30T10:00:00Z"}],
             "predictions": [{**accepted["predictions"][0], "created_at": "2026-11-30T11:00:00Z"}]}
    assert dataset.person_made(later, sample, "image", index)        # predicted after: can't be its start
    later["predictions"][0]["created_at"] = "2026-11-30T09:00:00Z"
    assert not dataset.person_made(later, sample, "image", index)
    one_removed = np.where(inst == 1, 1, 0).astype(np.int32)
    c2, i2 = results_to_maps(_results(one_removed, ("brushlabels",)), "image", *inst.shape, index)
    fixed = Sample(sample.image, c2, i2, id="1:image")
    assert dataset.person_made(accepted, fixed, "image", index)      # a person deleted an object


def test_a_run_keeps_of_each_task_only_what_training_reads():
    """dataset.training_view: the training annotation and the label-model predictions it may have started
    from, not every annotation, prediction and draft; person_made reads the same on both."""
    from tessera.model.data import Sample

    inst = _two_objects()
    index = {"Nucleus": 1}
    brush = _results(inst, ("brushlabels",))
    classes, instances = results_to_maps(brush, "image", *inst.shape, index)
    sample = Sample(np.zeros((*inst.shape, 3), np.uint8), classes, instances, id="7:image")
    full = _results(inst, ("rectanglelabels", "polygonlabels", "brushlabels"))
    other = _results(np.where(inst == 1, 1, 0).astype(np.int32), ("brushlabels",))
    pred = lambda i, version, at, result: {"id": i, "model_version": version, "created_at": at,  # noqa: E731
                                          "result": result}
    task = {"id": 7, "data": {"image": "x.png"}, "meta": {"m": 1}, "drafts": [{"result": brush}],
            "annotations_results": "huge", "predictions_results": "huge",
            "annotations": [{"id": 1, "result": other, "created_at": "2026-11-30T08:00:00Z"},
                            {"id": 2, "result": brush, "created_at": "2026-11-30T10:00:00Z", "parent_prediction": 12,
                             "updated_at": "2026-11-30T10:00:00Z"},
                            {"id": 3, "result": [], "was_cancelled": True, "updated_at": "2026-12-01"}],
            "predictions": [pred(11, "tessera-p7-v0001", "2026-11-30T07:00:00Z", other),
                            pred(12, "tessera-p7-v0002", "2026-11-30T09:00:00Z", full),
                            pred(13, "tessera-p7-gan-v0001", "2026-11-30T09:00:00Z", full),
                            pred(14, "tessera-p7-v0003", "2026-11-30T11:00:00Z", full)]}
    view = dataset.training_view(task)
    assert [a["id"] for a in view["annotations"]] == [2] and training_annotation(view)["id"] == 2
    assert [p["id"] for p in view["predictions"]] == [12]              # the one it started from
    # kept packed (PackedResult), read back as they were
    assert isinstance(view["annotations"][0]["result"], PackedResult) and result_of(view["annotations"][0]) == brush
    assert result_of(view["predictions"][0]) == full and result_of(task["predictions"][0]) is other
    assert view["id"] == 7 and view["data"] == task["data"] and view["meta"] == task["meta"]
    assert not {"drafts", "annotations_results", "predictions_results"} & view.keys()
    assert dataset.person_made(view, sample, "image", index) == dataset.person_made(task, sample, "image", index)
    assert not dataset.person_made(view, sample, "image", index)
    assert dataset.data_fingerprint([view]) == dataset.data_fingerprint([task])
    del task["annotations"][1]["parent_prediction"]                    # no parent named: every label version before it
    assert [p["id"] for p in dataset.training_view(task)["predictions"]] == [11, 12]


def test_an_accepted_prediction_on_a_reduced_image_is_not_a_persons_judgement():
    """A sample decoded smaller than its original (TESSERA_MAX_SIDE): the predictions' brush RLE counts the
    original's pixels, so they are drawn at the original size and compared at the sample's."""
    from tessera.backend.regions import results_to_maps_at
    from tessera.model.data import Sample

    inst = np.kron(_two_objects(), np.ones((3, 3), np.int32))         # the original, 3x the sample's size
    small = _two_objects().shape
    index = {"Nucleus": 1}
    brush = _results(inst, ("brushlabels",))
    classes, instances = results_to_maps_at(brush, "image", inst.shape, small, index)
    sample = Sample(np.zeros((*small, 3), np.uint8), classes, instances, id="1:image", size=inst.shape)
    accepted = {"predictions": [{"model_version": "tessera-p1-v0002",
                                 "result": _results(inst, ("rectanglelabels", "polygonlabels", "brushlabels"))}]}
    assert not dataset.person_made(accepted, sample, "image", index)
    one_removed = np.where(inst == 1, 1, 0).astype(np.int32)
    c2, i2 = results_to_maps_at(_results(one_removed, ("brushlabels",)), "image", inst.shape, small, index)
    assert dataset.person_made(accepted, Sample(sample.image, c2, i2, id="1:image", size=inst.shape), "image", index)


@pytest.mark.parametrize("judged, scores, promote, rule", [
    ({"a", "b", "c"}, {"new": {"abc": 0.80}, "old": {"abc": 0.805}}, True, "compared"),    # within tolerance
    ({"a", "b", "c"}, {"new": {"abc": 0.70}, "old": {"abc": 0.80}}, False, "compared"),
    (set(), {"new": {"abcd": 0.62}, "old": {"abcd": 0.99}}, True, "thin evidence"),       # accepted predictions
    (set(), {"new": {"abcd": 0.40}, "old": {"abcd": 0.99}}, False, "thin evidence"),      # a broken run
    ({"a"}, {"new": {"abcd": 0.62, "a": 0.70}, "old": {"abcd": 0.99, "a": 0.72}}, True, "thin evidence"),
    ({"a"}, {"new": {"abcd": 0.62, "a": 0.50}, "old": {"abcd": 0.99, "a": 0.72}}, False, "thin evidence"),
])
def test_promotion_rests_on_what_people_made(monkeypatch, settings, judged, scores, promote, rule):
    import tessera.model.train_vqvae as tv

    val = [types_sample(t) for t in "abcd"]

    def evaluate(which, samples):
        key = "".join(sorted(s.id[0] for s in samples))
        return {"fg_iou": scores[str(which)].get(key, 0.0), "miou": 0.0}

    monkeypatch.setattr(tv, "evaluate", evaluate)
    metrics = {"val_iou": scores["new"].get("abcd", 0.0)}
    served = lambda samples: evaluate("old", samples)["fg_iou"]  # noqa: E731
    ok, why = training.judge("new", served, "tessera-p1-v0001", val, {f"{t}:image" for t in judged}, ["Nucleus"],
                             settings, metrics)
    assert ok is promote and metrics["decision"] == rule and "vs served tessera-p1-v0001" in why
    assert metrics["n_val_judged"] == len(judged) and metrics["n_val_tasks"] == 4
    if 0 < len(judged) < 4:     # train()'s own figures on the person-made ones: the same decision, no new pass
        key = "".join(sorted(judged))
        figures = {"ids": sorted(f"{t}:image" for t in judged), "fg_iou": scores["new"].get(key, 0.0), "miou": 0.0}
        asked = []
        monkeypatch.setattr(tv, "evaluate", lambda which, samples: asked.append(which) or evaluate(which, samples))
        again = {"val_iou": scores["new"].get("abcd", 0.0)}
        ok2, why2 = training.judge("new", served, "tessera-p1-v0001", val, {f"{t}:image" for t in judged},
                                   ["Nucleus"], settings, again, judged_figures=figures)
        assert (ok2, why2) == (ok, why) and asked == []
        stale = {**figures, "ids": ["z:image"]}             # figures of other images are not used
        training.judge("new", served, "tessera-p1-v0001", val, {f"{t}:image" for t in judged}, ["Nucleus"],
                       settings, {"val_iou": 0.5}, judged_figures=stale)
        assert asked == ["new"]


def types_sample(task: str):
    from tessera.model.data import Sample

    z = np.zeros((4, 4), np.int32)
    return Sample(np.zeros((4, 4, 3), np.uint8), z, z, id=f"{task}:image")


def test_progress_shows_a_stable_loss_and_no_fake_zero():
    seen = []
    report = training._model_progress(seen.append)
    report({"phase": "train", "iter": 300, "max_iters": 600, "loss": 1.45, "loss_pix": 0.13, "loss_code": 6.6,
            "eta_s": 3})
    report({"phase": "done", "iter": 600, "max_iters": 600, "loss": 0.0, "eta_s": 0.0})
    assert seen[0]["loss"] == 0.13 and seen[0]["loss_code"] == 6.6
    assert seen[1]["phase"] == "trained" and seen[1]["loss"] is None


def test_folder_samples_over_the_max_side_are_trained_at_the_size_predict_decodes_them_to():
    """`tessera train --data`: a sample larger than TESSERA_MAX_SIDE is resampled to the size /predict decodes
    such an image to (media.decode_image), its maps nearest, its boxes scaled; smaller ones are left alone."""
    import io

    from PIL import Image

    from tessera.backend.dataset import working_size
    from tessera.backend.media import decode_image
    from tessera.model.data import Sample

    image = np.zeros((900, 1200, 3), np.uint8)
    image[90:450, 120:600] = 255
    maps = (image[:, :, 0] > 0).astype(np.int32)
    sample = Sample(image, maps, maps * 7, "a", boxes=np.array([[120.0, 90, 600, 450, 1]]))
    assert working_size(sample, 1200) is sample
    small = working_size(sample, 256)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    decoded, original = decode_image(buf.getvalue(), 10 ** 8, max_side=256)
    assert small.image.shape == decoded.shape == (192, 256, 3) and small.size == original == (900, 1200)
    assert small.classes.dtype == np.int32 and set(np.unique(small.instances)) == {0, 7}
    assert np.array_equal(small.classes, small.instances // 7)
    np.testing.assert_allclose(small.boxes, [[25.6, 19.2, 128, 96, 1]])
    assert abs(int(small.classes.sum()) - 77 * 102) < 400          # the object at 256 / 1200 of its size


def test_the_served_version_predicts_each_held_back_image_once(monkeypatch):
    """The comparison judges the served version on the person-made held-back images and on all of them: one
    network pass per image, and the same figures as evaluating each set on its own."""
    from pathlib import Path

    import torch

    from tessera.model import inference
    from tessera.model.data import make_nuclei
    from tessera.model.train_vqvae import evaluate
    from tessera.model.vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    model = inference.Predictor(VQVAE(VQVAEConfig(resolution=64, n_labels=3, widths=(8, 16, 16, 16), codebook_size=16,
                                                  embed_dim=8)), ["Nucleus"], device="cpu")
    seen = []
    predict = model.predict
    model.predict = lambda images, *a, **k: seen.extend(id(im) for im in images) or predict(images, *a, **k)
    monkeypatch.setattr(inference.Predictor, "from_checkpoint", lambda *a, **k: model)
    samples = make_nuclei(5, size=64, seed=2)
    for i, s in enumerate(samples):
        s.id = f"{i}:image"
    config = parse_label_config(CONFIG_ALL)
    served = training._served_metrics_fn(Path("served.pt"), config, ["Nucleus"], "cpu")
    mine, every = served(samples[1:3]), served(samples)
    assert sorted(seen) == sorted(id(s.image) for s in samples) and served(samples) is every
    plain = training._AsServed(model, config, ["Nucleus"])
    for got, alone in ((mine, evaluate(plain, samples[1:3])), (every, evaluate(plain, samples))):
        assert got.keys() == alone.keys()       # the same figures, to float noise (a pass's batch differs)
        for k, v in got.items():
            assert v == (pytest.approx(alone[k], rel=1e-6, nan_ok=True) if isinstance(v, float) else alone[k]), k
