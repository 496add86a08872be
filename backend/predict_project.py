"""`tessera predict --project N`: predictions for a whole project, computed outside LS's 100 s timeout
and written through the REST API, skipping tasks that already have one of the served version. With
`--replace`, Tessera's own superseded label-model predictions of each task written are deleted (Label
Studio keeps every prediction otherwise; a GAN layout on a synthetic task, or anyone else's, is kept)."""
from __future__ import annotations

import itertools
import logging
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

from tessera.backend.label_config import parse_label_config
from tessera.backend import lsclient
from tessera.backend.media import MediaResolver
from tessera.backend.dataset import light_task
from tessera.backend.predictions import ModelCache, PackedResult, training_annotation, predict_tasks
from tessera.backend.settings import Settings
from tessera.backend.store import is_label_version

logger = logging.getLogger(__name__)


def superseded(task: dict, key: str, served_version: str) -> list[int]:
    """Ids of the task's predictions made by an earlier Tessera label model of this project (or the
    default model): those `--replace` deletes once the served version's prediction is written."""
    out = []
    for p in task.get("predictions") or []:
        version = (p or {}).get("model_version")
        if is_label_version(version, key) and version != served_version and p.get("id"):
            out.append(int(p["id"]))
    return out


FIRST_CHUNK = 16    # tasks: the first chunk is small, so the first predictions (and the progress) come in seconds
HELD_REFRESH_S = 5.0  # seconds between readings of which tasks a server is writing (backend/overflow.py)


def predict_view(task: dict) -> dict:
    """What `predict_project` keeps of a listed task until its prediction is written: the task without its
    annotations but the one that counts (training_annotation: /predict's label check reads it, packed), and its
    predictions' ids and versions alone (which are the served version's, which are superseded). Label Studio
    lists every annotation, draft and prediction with their regions: a 2048 px task with three versions'
    brush, polygon and box predictions is ~20 MB parsed; this is a few hundred bytes and the annotation's packed
    regions."""
    ann = training_annotation(task)
    return light_task(task, [] if ann is None else [{**ann, "result": PackedResult(ann["result"], digest=False)}],
                      [{"id": p.get("id"), "model_version": p.get("model_version")}
                       for p in task.get("predictions") or [] if isinstance(p, dict)])


def write_item(client, task: dict, item: dict | list) -> bool:
    """Write one prediction item of `task` to Label Studio; False (logged) when it fails: one task's write failing
    must not stop the others (`tessera predict --project`, and the overflow after a /predict's deadline). A LATER
    item (its image could not be fetched now, logged where that was found) is not written: the next run asks."""
    if not isinstance(item, dict):
        return False
    try:
        lsclient.create_prediction(client, task["id"], item["result"], item["score"], item["model_version"],
                                   item.get("mislabeling"))
        return True
    except Exception as e:
        logger.warning("task %s: prediction not written: %s", task["id"], e)
        return False


def ahead(items: Iterable, n: int) -> Iterator:
    """`items`, read by a thread of its own up to n ahead of the consumer (the listing's next pages come while
    a chunk is predicted); an error the reading meets is raised where the consumer reaches it."""
    q: queue.Queue = queue.Queue(maxsize=max(1, n))
    end = object()
    stop = threading.Event()

    def put(entry: tuple) -> bool:          # False once the consumer has gone
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as e:          # handed over, raised in the consumer's thread
            put((end, e))

    reader = threading.Thread(target=read, name="tessera-listing", daemon=True)
    reader.start()
    try:
        while True:
            item, error = q.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()


def predict_project(settings: Settings, key: str, batch: int = 128, overwrite: bool = False,
                    replace: bool = False, out=sys.stderr, progress=None) -> dict:
    """Predictions of the served version for every task of project `key` that has none, written as they are
    made. The listing streams (pages sized by their bytes, read a chunk ahead on a thread of its own) and each
    task is cut down to `predict_view` as it comes: memory holds a page and two chunks, whatever the
    project's size, and the first predictions are written while later pages are still being listed."""
    client = lsclient.from_settings(settings)
    config = parse_label_config(lsclient.project(client, key).label_config or "")
    from tessera.backend.overflow import Overflow     # it imports predict_view from here

    cache = ModelCache(settings)
    served = cache.served(key, config)
    server = Overflow(settings, cache)         # only read: the tasks a server of this MODEL_DIR is writing
    if served.predictor is None:
        return {"status": "skipped", "reason": "no trained model serves this project yet", "written": 0}
    media = MediaResolver(settings)
    counts = {"written": 0, "failed": 0, "empty": 0, "not_fetched": 0, "superseded_deleted": 0}
    lock = threading.Lock()
    t0 = time.time()
    listing: dict = {}
    listed = {"tasks": 0, "skipped_existing": 0, "held_by_server": 0}
    held = {"ids": set(), "at": -1e9}

    def delete_superseded(task: dict) -> None:
        for pid in superseded(task, key, served.version):
            try:
                client.predictions.delete(pid)
            except Exception as e:
                logger.warning("task %s: superseded prediction %s not deleted: %s", task["id"], pid, e)
                continue
            with lock:
                counts["superseded_deleted"] += 1

    def write(task: dict, item: dict) -> None:
        ok = write_item(client, task, item)
        with lock:
            counts["written" if ok else "failed"] += 1
        if ok and replace:               # only once the served version's prediction is there
            delete_superseded(task)

    def todo(writer: ThreadPoolExecutor) -> Iterator[dict]:
        """The listed tasks without a prediction of the served version (every task with `overwrite`), as
        predict_view; a task that has one is counted, and with `replace` its superseded ones deleted."""
        for task in lsclient.tasks(client, key, listing=listing):
            view = predict_view(task)
            del task
            listed["tasks"] += 1
            if time.monotonic() - held["at"] > HELD_REFRESH_S:
                held.update(ids=server.held_elsewhere(key), at=time.monotonic())
            if not overwrite and view["id"] in held["ids"]:    # the server writes its prediction
                listed["held_by_server"] += 1
                continue
            if overwrite or not any(p["model_version"] == served.version for p in view["predictions"]):
                yield view
                continue
            listed["skipped_existing"] += 1
            if replace:
                writer.submit(delete_superseded, view)

    # each chunk's writes go out on a few threads while the next chunk is fetched and inferred; at most
    # one chunk of writes is pending, so a stopped run loses at most two chunks (rerunning resumes: tasks
    # with a prediction of the served version are skipped)
    pending: list = []
    done = 0
    with ThreadPoolExecutor(max_workers=4) as writer:
        tasks = ahead(todo(writer), batch)
        sizes = itertools.chain([min(batch, FIRST_CHUNK)], itertools.repeat(batch))
        while chunk := list(itertools.islice(tasks, next(sizes))):
            items = predict_tasks(chunk, config, served, media, settings)
            for f in pending:
                f.result()
            # a task whose image could not be fetched now (the connection, a setting) gets no prediction: the next
            # run predicts it, where an empty one would stand for the served version
            counts["not_fetched"] += sum(1 for item in items if not isinstance(item, dict))
            counts["empty"] += sum(1 for item in items if isinstance(item, dict) and not item["result"])
            pending = [writer.submit(write, task, item) for task, item in zip(chunk, items) if isinstance(item, dict)]
            done += len(chunk)
            # to do: the listed tasks not predicted yet and every one not listed yet (some may turn out done)
            left = (listed["tasks"] - listed["skipped_existing"] - listed["held_by_server"] - done
                    + max(listing["total"] - listed["tasks"], 0))
            if progress is not None:     # the progress-dict protocol (the CLI's tqdm bar)
                progress({"phase": "predict", "iter": done, "max_iters": done + left})
                continue
            rate = done / max(time.time() - t0, 1e-6)
            print(f"\rpredict project {key}: {done}/{done + left} tasks, {rate:.1f}/s, "
                  f"eta {left / max(rate, 1e-6):.0f}s", end="", file=out, flush=True)
        for f in pending:
            f.result()
    if progress is None:
        print(file=out)
    try:                                 # so that "Prediction score" sorts by these predictions
        lsclient.follow_version(client, key, served.version)
    except Exception as e:
        logger.warning("project %s: Label Studio connection not renamed to %s: %s", key, served.version, e)
    return {"status": "done", "model_version": served.version, "tasks": listed["tasks"],
            "skipped_existing": listed["skipped_existing"], "held_by_server": listed["held_by_server"], **counts,
            "seconds": round(time.time() - t0, 1)}
