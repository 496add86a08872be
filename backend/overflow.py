"""The tasks of a /predict that Label Studio's time limit leaves unanswered: predicted after the reply and written
through the REST API.

Label Studio sends "Retrieve predictions" on N selected tasks as ONE /predict and waits ML_TIMEOUT_PREDICT (100 s)
for the reply; a later reply is dropped whole and nothing is stored (label_studio/ml/api_connector.py,
data_manager/functions.py, 1.23.2). It then stores the reply's predictions within the same request, which its
Docker image ends after 120 s (uwsgi harakiri). On a CPU without bf16 instructions 1,000 520x696 tasks take
~175 s, so /predict answers what it has done at TESSERA_PREDICT_DEADLINE_S or TESSERA_PREDICT_REPLY_MB
(`predict_tasks`' deadline and cap: a prefix of the tasks) and gives each task left an empty list, which Label
Studio reads as "no prediction" (not as an empty prediction of the served version, which would mark the task
done). The tasks left are queued here, cut down to `predict_view`; one thread per process waits until Label
Studio has stored the reply, predicts them in chunks and writes each prediction with POST /api/predictions,
carrying the version it was made with.

- Writes go to LABEL_STUDIO_URL only, with LABEL_STUDIO_API_KEY or the token a /setup from that same origin
  handed over. Without them nothing is queued: the tasks stay without a prediction and the next "Retrieve
  predictions" sends them again (Label Studio leaves out the tasks that have one of the served version), so
  each retrieve still moves the project forward.
- A task queued or being written is answered with an empty list again if Label Studio sends it meanwhile
  (another "Retrieve predictions"): it gets one prediction, not two. A task opened in the editor (a /predict of
  that one task) is taken out of the queue and predicted in the request.
- A project's queue is dropped when another version is served (a promotion or a rollback): its predictions
  must carry the served version, and the next retrieve asks for them.
- The queue is in memory; which tasks it holds is also written to MODEL_DIR/.overflow (a file per project and
  process, rewritten as each chunk starts and ends), so that with `--workers` > 1 a retrieve reaching another
  process holds them too, and `tessera predict --project` leaves them alone. A file not rewritten for STALE_S
  (its process gone) is ignored. A restart loses the queue: its tasks wait for the next "Retrieve predictions".
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tessera.backend import lsclient
from tessera.backend.label_config import LabelConfig
from tessera.backend.media import MediaResolver
from tessera.backend.predict_project import predict_view, write_item
from tessera.backend.predictions import ModelCache, predict_tasks
from tessera.backend.settings import Settings
from tessera.backend.store import Store

logger = logging.getLogger(__name__)

WRITERS = 4         # threads writing one chunk's predictions to Label Studio
RECENT_S = 60.0     # a task written this recently is answered with no prediction (it has one): see `held`
REPLY_WAIT_S = 120.0  # most seconds the queue waits for Label Studio to store the reply (see `_await_reply`)
CHUNKS = 4          # TESSERA_PREDICT_BATCH chunks per predict_tasks call: its downloads, passes and encoding overlap
FAILED = object()   # a chunk whose prediction failed
STALE_S = 600.0     # another process's file not rewritten for this long is ignored (its process is gone: a
                    # chunk of 64 2048 px tasks takes ~2 minutes here, and the wait for the reply at most 2 more)


@dataclass
class _Project:
    """One project's queue: the tasks left, in order, and what they are predicted and written with."""
    key: str
    version: str
    config: LabelConfig
    media: MediaResolver
    client: Any                                     # label_studio_sdk LabelStudio towards LABEL_STUDIO_URL
    queued: OrderedDict = field(default_factory=OrderedDict)      # task id -> predict_view(task)
    busy: set = field(default_factory=set)          # ids of the chunk being predicted and written
    # id -> when written: Label Studio may have chosen a second retrieve's tasks before the write landed
    written: dict = field(default_factory=dict)
    counts: dict = field(default_factory=lambda: {"written": 0, "failed": 0, "dropped": 0})
    reply: tuple | None = None      # (the reply's last answered task id, wait until): see Overflow._await_reply


class Overflow:
    """The queues of one process and the thread that works them through (started with the first task)."""

    def __init__(self, settings: Settings, cache: ModelCache, connect: Callable[[str, str], Any] | None = None):
        self.settings, self.cache = settings, cache
        self.connect = connect or (lambda url, key: lsclient.connect(url, key, 60, settings.ca_bundle))
        self.dir = Store(settings.model_dir).overflow_dir
        self.ident = str(os.getpid())      # this process's file: <project>-<ident>.json
        self._lock = threading.Condition()
        self._projects: dict[str, _Project] = {}
        self._thread: threading.Thread | None = None

    def held(self, key: str, ids: list) -> set:
        """Those of `ids` whose prediction this process writes or wrote (queued, being written, or written in the
        last RECENT_S: a retrieve that chose its tasks before the write landed must not add a second one; after
        that a task Label Studio sends again lost its prediction, e.g. deleted, and is predicted again)."""
        mine: set = set()
        with self._lock:
            p = self._projects.get(key)
            if p is not None:
                _forget_old_writes(p)
                mine = {i for i in ids if i in p.queued or i in p.busy or i in p.written}
        return mine | (self.held_elsewhere(key) & set(ids))

    def take(self, key: str, task_id: Any) -> bool:
        """Take a queued task out of the queue (the request predicts it); False when it is not queued."""
        with self._lock:
            p = self._projects.get(key)
            return p is not None and p.queued.pop(task_id, None) is not None

    def submit(self, key: str, tasks: list[dict], config: LabelConfig, version: str, media: MediaResolver,
               credentials: tuple[str, str], after_task: Any = None) -> int:
        """Queue the tasks for project `key`'s `version`, to be written to Label Studio at `credentials`
        (url, key); returns how many were queued (tasks already queued are not queued twice). `after_task`: the
        last task the reply answers; the queue waits until Label Studio has stored its prediction."""
        views = [predict_view(t) for t in tasks if isinstance(t, dict) and isinstance(t.get("id"), (int, str))]
        with self._lock:
            p = self._projects.get(key)
            if p is None or p.version != version:
                if p is not None:
                    self._drop(key, p, f"{version} is served now")
                p = self._projects[key] = _Project(key, version, config, media, self.connect(*credentials))
            if after_task is not None:
                p.reply = (after_task, time.monotonic() + REPLY_WAIT_S)
            n = 0
            for view in views:
                if view["id"] not in p.queued and view["id"] not in p.busy and view["id"] not in p.written:
                    p.queued[view["id"]] = view
                    n += 1
            self._publish(p)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="tessera-overflow", daemon=True)
                self._thread.start()
            self._lock.notify_all()
        logger.info("project %s: %d tasks left past the deadline are predicted after the reply and written to "
                    "Label Studio (%d queued)", key, n, len(p.queued))
        return n

    def _file(self, key: str) -> Path:
        return self.dir / f"{key}-{self.ident}.json"

    def _publish(self, p: _Project) -> None:
        """Write which tasks this process holds for the project (called under the lock), for the others."""
        now, wall = time.monotonic(), time.time()
        ids = [*p.queued, *p.busy, *p.written]
        written_at = [None] * (len(p.queued) + len(p.busy)) + [wall - (now - t) for t in p.written.values()]
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self._file(p.key).with_suffix(".tmp")
            tmp.write_text(json.dumps({"at": wall, "ids": ids, "written_at": written_at}))
            os.replace(tmp, self._file(p.key))
        except OSError as e:        # a full or read-only disk: this process still holds its own
            logger.warning("project %s: could not write %s: %s", p.key, self._file(p.key), e)

    def held_elsewhere(self, key: str) -> set:
        """The task ids other processes of this MODEL_DIR hold for project `key` (their files, fresh ones): the
        other workers of a server, or the server for `tessera predict --project`."""
        out: set = set()
        wall = time.time()
        for f in self.dir.glob(f"{key}-*.json") if self.dir.is_dir() else ():
            if f == self._file(key):
                continue
            try:
                d = json.loads(f.read_text())
            except (OSError, ValueError):
                continue            # being replaced, or gone
            if wall - float(d.get("at") or 0) > STALE_S:
                continue
            out |= {i for i, t in zip(d.get("ids") or [], d.get("written_at") or [])
                    if t is None or wall - t <= RECENT_S}
        return out

    def status(self, key: str) -> dict | None:
        """{"version", "queued", "writing", "written", "failed", "dropped"} of project `key`, None if it never had a
        queue in this process."""
        with self._lock:
            p = self._projects.get(key)
            if p is None:
                return None
            return {"version": p.version, "queued": len(p.queued), "writing": len(p.busy), **p.counts}

    # ------------------------------------------------------------------------------------------------ work
    def _drop(self, key: str, p: _Project, why: str) -> None:
        if p.queued:
            logger.info("project %s: %d queued tasks dropped (%s); the next \"Retrieve predictions\" asks for "
                        "them again", key, len(p.queued), why)
        p.counts["dropped"] += len(p.queued)
        p.queued.clear()
        self._publish(p)

    def _next(self) -> tuple[str, _Project, list[dict]]:
        """The next chunk to predict (waits for one): the project with the oldest queue goes first."""
        with self._lock:
            while True:
                for key, p in self._projects.items():
                    if p.queued:
                        n = CHUNKS * max(1, self.settings.predict_batch)
                        chunk = [p.queued.popitem(last=False)[1] for _ in range(min(n, len(p.queued)))]
                        p.busy.update(t["id"] for t in chunk)
                        self._publish(p)                                    # "at": this process is alive
                        self._projects[key] = self._projects.pop(key)      # round-robin between projects
                        return key, p, chunk
                self._lock.wait()

    def _run(self) -> None:
        # a chunk's writes go out (WRITERS at a time) while the next chunk is predicted: at most one chunk of
        # writes is pending. Label Studio parses and stores each prediction (~0.2 MB of JSON for a 520x696
        # task) on the same cores
        with ThreadPoolExecutor(max_workers=1) as chunks, ThreadPoolExecutor(max_workers=WRITERS) as writers:
            writing = None
            while True:
                key, p, chunk = self._next()
                self._await_reply(key, p)
                try:
                    items = self._predict(key, p, chunk)
                except Exception:           # a chunk failing must not end the thread
                    logger.exception("project %s: %d queued tasks not predicted", key, len(chunk))
                    items = FAILED
                if writing is not None:
                    try:
                        writing.result()
                    except Exception:       # _write's own failure: logged, the thread goes on
                        logger.exception("project %s: a chunk's writes failed", key)
                writing = chunks.submit(self._write, p, chunk, items, writers)

    def _await_reply(self, key: str, p: _Project) -> None:
        """Wait (at most REPLY_WAIT_S) until Label Studio holds the prediction of the reply's last task: it stores
        a reply's predictions in order after it came, ~0.1 s of its CPU each for 520x696 tasks, and the queue's
        passes beside that on 2 cores slowed both. 1,000 such tasks (`bench/retrieve_deadline.py`, 2 cores): the
        action 158 -> 103 s, the last prediction written at 215 -> 249 s."""
        with self._lock:
            reply, p.reply = p.reply, None
        if reply is None:
            return
        task, until = reply
        while time.monotonic() < until:
            try:
                if lsclient.task_predictions(p.client, task):
                    return
            except Exception as e:       # Label Studio busy or gone: the writes will say so
                logger.info("project %s: could not see whether Label Studio stored the reply: %s", key, e)
                return
            time.sleep(1.0)

    def _predict(self, key: str, p: _Project, chunk: list[dict]) -> list[dict] | None:
        """The chunk's prediction items; None when another version is served now (the queue is dropped)."""
        served = self.cache.served(key, p.config)
        if served.version != p.version:
            with self._lock:
                p.counts["dropped"] += len(chunk)
                self._drop(key, p, f"{served.version} is served now, not {p.version}")
            return None
        return predict_tasks(chunk, p.config, served, p.media, self.settings)

    def _write(self, p: _Project, chunk: list[dict], items, writers: ThreadPoolExecutor) -> None:
        ok: list[bool] = []
        try:
            if isinstance(items, list):
                ok = list(writers.map(lambda task, item: write_item(p.client, task, item), chunk, items))
        finally:
            with self._lock:
                _forget_old_writes(p)
                p.written.update((t["id"], time.monotonic()) for t, done in zip(chunk, ok) if done)
                p.counts["written"] += sum(ok)
                if items is not None:       # None: dropped, counted as such
                    p.counts["failed"] += len(chunk) - sum(ok)
                p.busy.difference_update(t["id"] for t in chunk)
                self._publish(p)


def _forget_old_writes(p: _Project) -> None:
    """Forget the tasks written more than RECENT_S ago (called under the lock)."""
    now = time.monotonic()
    for i in [i for i, t in p.written.items() if now - t > RECENT_S]:
        del p.written[i]
