"""`tessera predict --project N`: predictions for a whole project, computed outside LS's 100 s timeout
and written through the REST API, skipping tasks that already have one of the served version. With
`--replace`, Tessera's own superseded label-model predictions of each task written are deleted (Label
Studio keeps every prediction otherwise; a GAN layout on a synthetic task, or anyone else's, is kept)."""
from __future__ import annotations

import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tessera.backend.label_config import parse_label_config
from tessera.backend import lsclient
from tessera.backend.media import MediaResolver
from tessera.backend.predictions import ModelCache, predict_tasks
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


def predict_project(settings: Settings, key: str, batch: int = 128, overwrite: bool = False,
                    replace: bool = False, out=sys.stderr, progress=None) -> dict:
    client = lsclient.from_settings(settings)
    config = parse_label_config(lsclient.project(client, key).label_config or "")
    served = ModelCache(settings).served(key, config)
    if served.predictor is None:
        return {"status": "skipped", "reason": "no trained model serves this project yet", "written": 0}
    media = MediaResolver(settings)
    tasks = list(lsclient.tasks(client, key))
    todo = [t for t in tasks if overwrite or not any(
        (p.get("model_version") if isinstance(p, dict) else None) == served.version
        for p in t.get("predictions") or [])]
    counts = {"written": 0, "failed": 0, "empty": 0, "superseded_deleted": 0}
    lock = threading.Lock()
    t0 = time.time()

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
        try:
            lsclient.create_prediction(client, task["id"], item["result"], item["score"], item["model_version"],
                                       item.get("mislabeling"))
            ok = True
        except Exception as e:           # one task's write failing must not stop the project
            ok = False
            logger.warning("task %s: prediction not written: %s", task["id"], e)
        with lock:
            counts["written" if ok else "failed"] += 1
        if ok and replace:               # only once the served version's prediction is there
            delete_superseded(task)

    # each chunk's writes go out on a few threads while the next chunk is fetched and inferred; at most
    # one chunk of writes is pending, so a stopped run loses at most two chunks (rerunning resumes: tasks
    # with a prediction of the served version are skipped)
    pending: list = []
    with ThreadPoolExecutor(max_workers=4) as writer:
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            items = predict_tasks(chunk, config, served, media, settings)
            for f in pending:
                f.result()
            counts["empty"] += sum(1 for item in items if not item["result"])
            pending = [writer.submit(write, task, item) for task, item in zip(chunk, items)]
            done = start + len(chunk)
            rate = done / max(time.time() - t0, 1e-6)
            if progress is not None:     # the progress-dict protocol (the CLI's tqdm bar)
                progress({"phase": "predict", "iter": done, "max_iters": len(todo)})
                continue
            print(f"\rpredict project {key}: {done}/{len(todo)} tasks, {rate:.1f}/s, "
                  f"eta {(len(todo) - done) / max(rate, 1e-6):.0f}s", end="", file=out, flush=True)
        for f in pending:
            f.result()
    if progress is None:
        print(file=out)
    if replace:                          # tasks that already had the served version's prediction
        todo_ids = {t["id"] for t in todo}
        for task in tasks:
            if task["id"] not in todo_ids:
                delete_superseded(task)
    try:                                 # so that "Prediction score" sorts by these predictions
        lsclient.follow_version(client, key, served.version)
    except Exception as e:
        logger.warning("project %s: Label Studio connection not renamed to %s: %s", key, served.version, e)
    return {"status": "done", "model_version": served.version, "tasks": len(tasks),
            "skipped_existing": len(tasks) - len(todo), **counts,
            "seconds": round(time.time() - t0, 1)}
