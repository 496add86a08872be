"""/predict's stream of chunks: the order of the items, the isolation of a bad task, image or chunk, the memory
bound and the per-stage log line."""
import random
import threading
import time

import numpy as np
import pytest

from tessera.backend import predictions
from tessera.backend.label_config import parse_label_config
from tessera.backend.media import MediaError
from tessera.backend.predictions import Served, predict_tasks
from tessera.backend.settings import Settings
from tests.conftest import CONFIG_ALL, ThresholdPredictor

BRUSH_ONLY = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="Nucleus"/></BrushLabels></View>"""


class SquaresMedia:
    """'sq:<n>' -> an image with n separate bright squares, after a random short delay (downloads finish out
    of order); 'bad' raises MediaError."""

    def load_working(self, ref, task_id=None):
        time.sleep(random.random() * 0.01)
        if ref == "bad":
            raise MediaError("bad image reference")
        n = int(ref.split(":")[1])
        img = np.zeros((40, 12 * n + 4, 3), np.uint8)
        for k in range(n):
            img[10:20, 4 + 12 * k:12 + 12 * k] = 255
        return img, img.shape[:2]


def _run(tasks, predictor, batch=4, config=BRUSH_ONLY):
    settings = Settings(predict_batch=batch, fetch_threads=4)
    return predict_tasks(tasks, parse_label_config(config), Served("v1", predictor), SquaresMedia(), settings)


@pytest.mark.parametrize("batch", [1, 3, 4, 16])
def test_items_come_back_in_task_order(batch):
    counts = [1 + (i * 7) % 5 for i in range(23)]
    tasks = [{"id": i, "data": {"image": f"sq:{n}"}} for i, n in enumerate(counts)]
    out = _run(tasks, ThresholdPredictor(), batch)
    assert [len(o["result"]) for o in out] == counts


@pytest.mark.parametrize("n, batch, chunks", [(16, 16, [8, 8]), (40, 16, [16, 16, 8]), (6, 16, [4, 2]),
                                              (3, 16, [3]), (1, 16, [1]), (10, 4, [4, 4, 2]), (16, 2, [2] * 8)])
def test_a_request_of_one_or_two_chunks_is_cut_in_two(n, batch, chunks):
    """A batch of TESSERA_PREDICT_BATCH tasks or fewer would be one chunk, its downloads, passes and region
    encoding one after the other: it goes in two parts that overlap, the first of MIN_CHUNK tasks at least."""
    pred = ThresholdPredictor()
    out = _run([{"id": i, "data": {"image": "sq:1"}} for i in range(n)], pred, batch)
    assert [len(o["result"]) for o in out] == [1] * n
    assert pred.calls == chunks


def test_a_bad_image_or_a_failing_task_empties_only_its_own_item(monkeypatch):
    tasks = [{"id": i, "data": {"image": "bad" if i == 5 else "sq:2"}} for i in range(12)]
    real = predictions._task_item

    def task_item(task, *a, **kw):
        if task["id"] == 9:
            raise RuntimeError("encoding bug on one task")
        return real(task, *a, **kw)

    monkeypatch.setattr(predictions, "_task_item", task_item)
    out = _run(tasks, ThresholdPredictor(), batch=4)
    assert [len(o["result"]) for o in out] == [0 if i in (5, 9) else 2 for i in range(12)]


class FailingChunkPredictor(ThresholdPredictor):
    def predict(self, images):
        if len(self.calls) == 1:                          # the second chunk
            self.calls.append(len(images))
            raise RuntimeError("model failure on one chunk")
        return super().predict(images)


def test_a_model_failure_empties_only_its_chunk():
    tasks = [{"id": i, "data": {"image": "sq:1"}} for i in range(10)]
    out = _run(tasks, FailingChunkPredictor(), batch=4)
    assert [len(o["result"]) for o in out] == [1] * 4 + [0] * 4 + [1] * 2


def test_regions_of_a_chunk_are_encoded_while_the_next_chunk_is_inferred(monkeypatch):
    """Chunk 0's encoding waits (up to 5 s) until chunk 1's inference has begun: run one after the other,
    it would time out. And when inference n starts, chunks 0 .. n-2 are encoded: at most two chunks of
    predictions (one being encoded, one being inferred) are held at a time."""
    second_inference = threading.Event()
    saw_overlap, encoded_at_call, encoded = [], [], []
    real = predictions._encode_chunk

    class Recording(ThresholdPredictor):
        def predict(self, images):
            encoded_at_call.append(len(encoded))
            if len(encoded_at_call) == 2:
                second_inference.set()
            return super().predict(images)

    def encode(tasks, *a):
        if not encoded:
            saw_overlap.append(second_inference.wait(5.0))
        out = real(tasks, *a)
        encoded.append(len(tasks))
        return out

    monkeypatch.setattr(predictions, "_encode_chunk", encode)
    tasks = [{"id": i, "data": {"image": "sq:1"}} for i in range(20)]
    out = _run(tasks, Recording(), batch=4)
    assert saw_overlap == [True]
    assert all(len(o["result"]) == 1 for o in out) and sum(encoded) == 20
    assert all(done >= n - 1 for n, done in enumerate(encoded_at_call)), encoded_at_call


class TwoPartPredictor(ThresholdPredictor):
    """Has predict_parts, as model.inference.Predictor: the finishing runs later, on the encoder thread."""

    def __init__(self):
        super().__init__()
        self.finished_in: set[str] = set()

    def predict_parts(self, images, boxes=True):
        preds = self.predict(images)

        def finisher(p, im):
            def finish():
                self.finished_in.add(threading.current_thread().name)
                if im.shape[1] == 12 * 3 + 4:                  # the images with 3 squares: a bug in finishing
                    raise RuntimeError("instance split failed")
                return p
            return finish

        return [finisher(p, im) for p, im in zip(preds, images)]


def test_finishing_runs_beside_inference_and_a_failure_there_empties_only_its_task():
    pred = TwoPartPredictor()
    tasks = [{"id": i, "data": {"image": f"sq:{3 if i == 6 else 2}"}} for i in range(11)]
    out = _run(tasks, pred, batch=4)
    assert [len(o["result"]) for o in out] == [0 if i == 6 else 2 for i in range(11)]
    assert pred.finished_in and threading.current_thread().name not in pred.finished_in


def test_the_predict_log_line_names_every_stage(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="tessera.backend.predictions"):
        _run([{"id": i, "data": {"image": "sq:1"}} for i in range(6)], ThresholdPredictor(), batch=4)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("predict: "))
    assert line.startswith("predict: 6 tasks in 2 chunks of 4: ")
    for stage in ("fetch_decode", "wait_images", "inference", "wait_regions", "split_and_regions", "wall"):
        assert f"{stage} " in line, line


def test_items_as_json_are_the_items(caplog):
    """/predict's reply is built from each item's JSON text, made on the encoder thread: the same items (a bad
    task's empty one too), in order, and the log line times that stage."""
    import json
    import logging

    tasks = [{"id": i, "data": {"image": "bad" if i == 3 else f"sq:{1 + i % 3}"}} for i in range(9)]
    settings = Settings(predict_batch=4, fetch_threads=4)
    run = lambda as_json: predict_tasks(tasks, parse_label_config(CONFIG_ALL), Served("v1", ThresholdPredictor()),
                                        SquaresMedia(), settings, as_json=as_json)
    with caplog.at_level(logging.INFO, logger="tessera.backend.predictions"):
        texts = run(True)
    assert all(isinstance(t, str) for t in texts)
    assert [json.loads(t) for t in texts] == run(False)
    assert json.loads(texts[3])["result"] == [] and json.loads(texts[0])["result"]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("predict: "))
    assert " json " in line, line


class SlowPredictor(ThresholdPredictor):
    """Each network pass takes `seconds` (a chunk's passes on a slow CPU)."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def predict(self, images):
        time.sleep(self.seconds)
        return super().predict(images)


def test_past_the_deadline_the_first_tasks_are_answered_and_the_rest_get_no_prediction():
    """Label Studio drops a reply that comes after its ML_TIMEOUT_PREDICT whole: no chunk starts that would end
    past the deadline at the pace of the chunks before. The first chunk always runs (each request moves the
    project on); the tasks answered are the first n; each task left gets an empty list, which Label Studio
    stores as no prediction (an item {"result": []} would be stored, and the task never predicted again)."""
    tasks = [{"id": i, "data": {"image": "sq:2"}} for i in range(12)]
    settings = Settings(predict_batch=4, fetch_threads=4)
    pred, answered = ThresholdPredictor(), {}
    out = predict_tasks(tasks, parse_label_config(BRUSH_ONLY), Served("v1", pred), SquaresMedia(), settings,
                        deadline=time.monotonic() - 1, answered=answered)
    assert answered["n"] == 4 and pred.calls == [4]
    assert [len(o["result"]) for o in out[:4]] == [2] * 4 and out[4:] == [[]] * 8
    as_json = predict_tasks(tasks, parse_label_config(BRUSH_ONLY), Served("v1", ThresholdPredictor()), SquaresMedia(),
                            settings, as_json=True, deadline=time.monotonic() - 1)
    assert as_json[4:] == ["[]"] * 8 and '"result":[{' in as_json[0]

    # a deadline 1 s away and passes of 0.3 s: the request ends within a chunk's time of it, with a prefix
    slow, answered = SlowPredictor(0.3), {}
    t0 = time.monotonic()
    out = predict_tasks([{"id": i, "data": {"image": "sq:1"}} for i in range(40)], parse_label_config(BRUSH_ONLY),
                        Served("v1", slow), SquaresMedia(), settings, deadline=t0 + 1.0, answered=answered)
    took, n = time.monotonic() - t0, answered["n"]
    assert 4 <= n < 40 and n % 4 == 0 and len(slow.calls) == n // 4, (n, slow.calls)
    assert [len(o["result"]) for o in out[:n]] == [1] * n and out[n:] == [[]] * (40 - n)
    assert took < 1.0 + took / (n // 4) + 0.2, (took, n)

    # no deadline: every task
    answered = {}
    out = predict_tasks(tasks, parse_label_config(BRUSH_ONLY), Served("v1", ThresholdPredictor()), SquaresMedia(),
                        settings, answered=answered)
    assert answered["n"] == 12 and [len(o["result"]) for o in out] == [2] * 12


def test_a_reply_stops_growing_at_its_cap_in_bytes():
    """Label Studio stores a reply's predictions within its own request, which its Docker image ends after 120 s:
    no chunk starts that would take the reply's JSON past `max_bytes` at the size of the chunks before (the
    chunk inferred but not yet encoded counted too); the first two always run, as no chunk's size is known."""
    tasks = [{"id": i, "data": {"image": "sq:2"}} for i in range(16)]
    settings = Settings(predict_batch=4, fetch_threads=4)
    config = parse_label_config(BRUSH_ONLY)
    one = predict_tasks(tasks[:1], config, Served("v1", ThresholdPredictor()), SquaresMedia(), settings,
                        as_json=True)[0]
    chunk = 4 * len(one)
    for cap, want in ((0.5, 8), (2.5, 8), (3.5, 12), (4.5, 16), (100, 16)):
        answered = {}
        out = predict_tasks(tasks, config, Served("v1", ThresholdPredictor()), SquaresMedia(), settings,
                            as_json=True, max_bytes=int(cap * chunk), answered=answered)
        assert answered["n"] == want and out[:want] == [one] * want and out[want:] == ["[]"] * (16 - want), cap
