"""tessera.backend.predict_project's parts that hold a project's tasks: the view of a listed task it keeps,
and the listing read ahead on a thread of its own (the whole command runs in tests/test_e2e_ls.py)."""
import itertools
import threading
import time

import pytest

from tessera.backend.predict_project import ahead, predict_view, superseded
from tessera.backend.predictions import training_annotation, result_of


def test_a_listed_task_is_kept_as_what_predicting_it_reads():
    region = {"type": "brushlabels", "value": {"format": "rle", "rle": list(range(256)) * 40, "brushlabels": ["A"]}}
    task = {"id": 7, "data": {"image": "/data/upload/1/a.png"}, "meta": {"m": 1}, "drafts": [{"result": [region]}],
            "annotations": [{"id": 1, "result": [], "updated_at": "2026-01-01"},
                            {"id": 2, "result": [region], "updated_at": "2026-01-02"},
                            {"id": 3, "result": [region, region], "updated_at": "2026-01-03", "was_cancelled": True}],
            "predictions": [{"id": 11, "model_version": "tessera-p1-v0001", "result": [region] * 3},
                            {"id": 12, "model_version": "yolo", "result": [region]}],
            "annotations_results": "...", "predictions_results": "..."}
    view = predict_view(task)
    assert view["id"] == 7 and view["data"] == task["data"] and view["meta"] == task["meta"]
    assert "drafts" not in view and "annotations_results" not in view and "predictions_results" not in view
    assert view["predictions"] == [{"id": 11, "model_version": "tessera-p1-v0001"}, {"id": 12, "model_version": "yolo"}]
    ann = training_annotation(view)
    assert ann["id"] == 2 and result_of(ann) == [region]                  # the one that counts, packed
    assert len(ann["result"].blob) < len(str(region)) / 10
    assert superseded(view, "1", "tessera-p1-v0002") == [11]
    assert predict_view({"id": 8, "data": {}})["annotations"] == []


def test_the_listing_read_ahead_keeps_order_and_stays_bounded():
    read = []

    def listing():
        for i in range(100):
            read.append(i)
            yield i

    stream = ahead(listing(), 5)
    assert list(itertools.islice(stream, 10)) == list(range(10))
    time.sleep(0.3)
    assert len(read) <= 10 + 5 + 1, len(read)            # at most n ahead of the consumer (and one in hand)
    assert list(stream) == list(range(10, 100))


def test_the_listing_read_ahead_raises_its_error_where_it_is_reached():
    def listing():
        yield 1
        yield 2
        raise ConnectionError("Label Studio went away")

    stream = ahead(listing(), 4)
    assert next(stream) == 1 and next(stream) == 2
    with pytest.raises(ConnectionError, match="went away"):
        next(stream)


def test_a_consumer_that_stops_early_lets_the_reader_go():
    def listing():
        for i in itertools.count():
            yield i

    before = threading.active_count()
    stream = ahead(listing(), 2)
    assert next(stream) == 0
    stream.close()                                       # the run failed: the reader must not block forever
    for _ in range(30):
        if threading.active_count() <= before:
            break
        time.sleep(0.1)
    assert threading.active_count() <= before
