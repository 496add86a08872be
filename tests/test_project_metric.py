"""Promotion by the project's own metric, box-only projects' boxes, and the region-cut settings."""
import numpy as np
import pytest

from tessera.backend import training
from tessera.backend.label_config import parse_label_config
from tessera.backend.regions import boxes_to_results, results_to_boxes
from tessera.backend.settings import Settings

BOXES = """<View><Image name="image" value="$image"/>
  <RectangleLabels name="bbox" toName="image"><Label value="Cell"/><Label value="Platelet"/></RectangleLabels></View>"""
MIXED = """<View><Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Cell"/></BrushLabels>
  <RectangleLabels name="bbox" toName="image"><Label value="Cell"/></RectangleLabels></View>"""


def test_box_only_projects_are_judged_by_box_ap50_mask_projects_by_iou_and_f1():
    m = {"fg_iou": 0.8, "miou": 0.6, "instance_f1": 0.4, "box_ap50": 0.9}
    assert training.val_score(m, 1, box_only=True) == 0.9
    assert training.val_score(m, 1) == pytest.approx(0.6)            # (0.8 + 0.4) / 2
    assert training.val_score(m, 2) == pytest.approx(0.5)            # (0.6 + 0.4) / 2
    assert training.val_score({"fg_iou": 0.7, "miou": 0.7}, 1) == 0.7   # versions made before these figures
    assert training.is_box_only(parse_label_config(BOXES))
    assert not training.is_box_only(parse_label_config(MIXED))


def test_a_class_going_to_zero_blocks_promotion():
    served = {"class_recall": {"Cell": 0.8, "Platelet": 0.3}}
    assert training.lost_classes({"class_recall": {"Cell": 0.9, "Platelet": 0.0}}, served) == ["Platelet"]
    assert training.lost_classes({"class_recall": {"Cell": 0.9, "Platelet": 0.1}}, served) == []
    assert training.lost_classes({"class_recall": {"Cell": 0.9, "Platelet": 0.0}},
                                 {"class_recall": {"Cell": 0.8, "Platelet": 0.0}}) == []   # never found: no loss


def test_overlapping_boxes_all_reach_training_and_come_back_as_boxes():
    control = parse_label_config(BOXES).controls[0]
    boxes = {1: (10.0, 10.0, 50.0, 50.0), 2: (20.0, 20.0, 60.0, 60.0), 3: (22.0, 22.0, 58.0, 58.0)}
    results = boxes_to_results(boxes, {1: "Cell", 2: "Cell", 3: "Platelet"}, {1: 0.9, 2: 0.8, 3: 0.7},
                               control, 80, 100)
    assert len(results) == 3 and results[2]["value"]["rectanglelabels"] == ["Platelet"]
    back = results_to_boxes(results, "image", 80, 100, {"Cell": 1, "Platelet": 2})
    assert back.shape == (3, 5)          # the 3rd box lies >= 50% on the others: a label map would drop it
    assert np.allclose(back[:, :4], np.array(list(boxes.values())), atol=0.01)
    assert back[:, 4].tolist() == [1, 1, 2]


def test_region_cut_settings(monkeypatch):
    assert Settings.from_env().min_region_score is None
    monkeypatch.setenv("TESSERA_MIN_REGION_SCORE", "0.8")
    monkeypatch.setenv("TESSERA_PRECISION_TARGET", "0.9")
    s = Settings.from_env()
    assert s.min_region_score == 0.8 and s.precision_target == 0.9
    monkeypatch.setenv("TESSERA_PRECISION_TARGET", "90")
    with pytest.raises(ValueError, match="TESSERA_PRECISION_TARGET"):
        Settings.from_env()


def test_cli_iters_train_them_all_unless_a_budget_is_given(monkeypatch, tmp_path):
    seen = {}

    def fake(settings, key, train, val, names, reason, iters, progress, budget_s=0.0, config=None, **kw):
        seen.update(iters=iters, budget_s=budget_s, box_only=training.is_box_only(config))
        return {"status": "rejected", "metrics": {}}

    from tessera.model.data import Sample
    samples = [Sample(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.int32), np.zeros((8, 8), np.int32),
                      id=f"{i}:image") for i in range(1, 7)]
    tasks = [{"id": i} for i in range(1, 7)]
    monkeypatch.setattr(training, "from_settings", lambda settings: None)
    monkeypatch.setattr(training, "annotated_tasks", lambda *a: (parse_label_config(BOXES), tasks))
    monkeypatch.setattr(training, "load_samples", lambda *a, **k: (samples, tasks))
    monkeypatch.setattr(training, "held_back_samples", lambda *a: (samples[:5], samples[5:], None))
    monkeypatch.setattr(training, "_train_and_register", fake)
    s = Settings(train_budget_s=90.0, gan_min_annotations=1000, model_dir=tmp_path)
    training.train_project("3", "cli", settings=s, iters=2400, force=True)
    assert seen == {"iters": 2400, "budget_s": 0.0, "box_only": True}
    training.train_project("3", "cli", settings=s, iters=2400, budget_s=60.0, force=True)
    assert seen["budget_s"] == 60.0
    training.train_project("3", "webhook", settings=s, force=True)
    assert seen["budget_s"] == 90.0 and seen["iters"] is None


def test_status_and_versions_say_plainly_when_a_class_is_missed(settings, capsys):
    from tessera.backend.app import create_app
    from tessera.backend.cli import cmd_versions
    from tessera.backend.predictions import ModelCache
    from tests.conftest import RecordingRunner

    f = settings.model_dir / "stub.pt"
    f.write_bytes(b"stub")
    metrics = {"label_names": ["Cell", "Platelet"], "val_iou": 0.6, "box_ap50": 0.41, "precision": 0.73,
               "recall": 0.65, "class_recall": {"Cell": 0.9, "Platelet": 0.0}, "missed_classes": ["Platelet"],
               "region_cut": {"min_score": 0.8, "min_area": 12.0, "nms_iou": 0.5, "source": "learned f1"},
               "follow_edges": False, "edit_confident": None}
    ModelCache(settings).registry("7").add(f, metrics, promote=True, kind="label")
    app = create_app(settings, runner=RecordingRunner(), cache=ModelCache(settings, loader=lambda p, d: None))
    served = app.test_client().get("/status?project=7").json["served"]
    assert served["precision"] == 0.73 and served["recall"] == 0.65 and served["val_iou"] == 0.6
    assert served["missed_classes"] == ["Platelet"] and "Platelet" in served["warning"]
    assert served["region_cut"]["min_score"] == 0.8 and served["follow_edges"] is False
    assert "edit_confident" in served and served["edit_confident"] is None      # it suggests no label edits
    assert served["label_edits"].startswith("off: ")

    class Args:
        project, json = "7", False
    cmd_versions(Args(), settings)
    out = capsys.readouterr().out
    assert "box_ap50=0.410" in out and "precision=0.730" in out and "MISSES CLASS Platelet" in out
    assert "recall per label: Cell 0.90, Platelet 0.00" in out
    assert "no label-edit suggestions" in out


def test_a_first_version_trains_until_its_plateau_within_a_stated_cap():
    s = Settings(train_iters=600, precision_target=0.9)
    first = training.train_config(s, None, 300.0, box_only=True, until_plateau=True)
    later = training.train_config(s, None, 90.0)
    assert first.max_iters == 4 * 600 and first.patience == training.PLATEAU_EVALS and first.time_budget_s == 300
    assert first.eval_interval == later.eval_interval == 150
    assert first.box_shrink == training.BOX_SHRINK and first.precision_target == 0.9
    assert later.max_iters == 600 and later.patience == 0 and later.box_shrink == 1.0
