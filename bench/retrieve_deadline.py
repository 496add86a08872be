""""Retrieve predictions" on a whole project through a real Label Studio, as a labelling lead clicks it: what Label
Studio holds when the action returns and when every task has its prediction, with and without /predict's deadline.

Label Studio 1.23.2 sends the selected tasks as ONE /predict and waits ML_TIMEOUT_PREDICT (100 s) for the reply;
a later reply is dropped whole. A real Label Studio (tests/conftest_ls's server, its default timeout), one project
per arm of --tasks 520x696 tasks of procedural nuclei (~116 objects, 8 distinct uploads), bench.speed's model,
Tessera connected as the project's ML backend with LABEL_STUDIO_URL and a key. Arms, one after the other on the
same model store: "before" with TESSERA_PREDICT_DEADLINE_S=0 and TESSERA_PREDICT_REPLY_MB=0 (no deadline, no
cap: the code path of every revision before them), "after" with the defaults. Each: the action's wall time, the tasks with a prediction when it
returns, the seconds until every task has one (polled every --poll s, up to --wait s), tasks with more than one,
and a second "Retrieve predictions" clicked right after the first.

    OMP_WAIT_POLICY=PASSIVE python -m bench.retrieve_deadline --tasks 1000 --threads 2
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from bench.common import write_result


def counts(ls, pid: int) -> dict:
    """Tasks of project pid with at least one prediction, and with more than one: Label Studio's own counter, from
    its listing without the predictions themselves (fields=all would send ~0.2 MB a task)."""
    from tessera.backend import lsclient

    n = [t.get("total_predictions") or 0 for t in lsclient.tasks(ls, pid, page_size=1000, fields="task_only")]
    return {"with_prediction": sum(1 for x in n if x), "with_several": sum(1 for x in n if x > 1), "tasks": len(n)}


def retrieve(ls, pid: int) -> float:
    """The Data Manager's "Retrieve predictions" on every task; its wall seconds."""
    t0 = time.perf_counter()
    ls.actions.create(id="retrieve_tasks_predictions", project=pid, selected_items={"all": True, "excluded": []},
                      request_options={"timeout_in_seconds": 3600})
    return time.perf_counter() - t0


def arm(ls, server, work: Path, name: str, env: dict, pngs: list, args) -> dict:
    from bench.speed import CONFIG
    from tessera.backend import lsclient
    from tests.conftest import TesseraProcess

    pid = ls.projects.create(title=f"retrieve {name}", label_config=CONFIG).id
    urls = lsclient.upload_files(ls, pid, pngs)
    for start in range(0, args.tasks, 250):
        lsclient.import_tasks(ls, pid, [{"data": {"image": urls[i % 8]}} for i in range(start, min(args.tasks,
                                                                                                   start + 250))])
    proc = TesseraProcess(env, work / f"tessera-{name}.log").wait_up()
    try:
        first = next(lsclient.tasks(ls, pid))           # trace the passes first, as a served model has
        requests_post(proc.url + "/predict", {"tasks": [first, first], "project": f"{pid}.1", "label_config": CONFIG})
        ml = ls.ml.create(project=pid, url=proc.url, title="Tessera", is_interactive=False)
        assert ml.state == "CO", ml
        t0 = time.perf_counter()
        action_s = retrieve(ls, pid)
        at_return = counts(ls, pid)
        second_s = retrieve(ls, pid)
        after_second = counts(ls, pid)
        all_s, now = None, after_second
        while time.perf_counter() - t0 < args.wait:
            if now["with_prediction"] == args.tasks:
                all_s = time.perf_counter() - t0
                break
            time.sleep(args.poll)
            now = counts(ls, pid)
        log = proc.log_text()
        out = {"action_s": action_s, "at_return": at_return, "second_action_s": second_s,
               "after_second": after_second, "every_task_s": all_s, "end": now,
               "ls_timeouts": server.log_path.read_text(errors="replace").count("Read timed out"),
               "tessera_log": [ln.split(" INFO ", 1)[-1] for ln in log.splitlines()
                               if "deadline" in ln or "predict project" in ln or "answered with no" in ln][-8:]}
        print(name, json.dumps(out), flush=True)
        return out
    finally:
        proc.stop()


def requests_post(url: str, body: dict) -> None:
    import requests

    requests.post(url, json=body, timeout=600).raise_for_status()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wait", type=float, default=900.0, help="seconds to wait for every task's prediction")
    ap.add_argument("--poll", type=float, default=5.0)
    ap.add_argument("--arms", nargs="+", default=["after", "before"], choices=["after", "before"])
    ap.add_argument("--name", default="retrieve_deadline")
    args = ap.parse_args()

    from bench.speed import bench_model
    from bench.speed_native import mosaic_pngs, started_ls

    work, server = started_ls("tessera-retrieve-")
    res: dict = {"tasks": args.tasks, "threads": args.threads}
    try:
        bench_model(work)
        ls = server.client(timeout=3600)
        pngs = mosaic_pngs()
        env = {"MODEL_DIR": str(work / "models"), "LABEL_STUDIO_URL": server.url,
               "LABEL_STUDIO_API_KEY": server.token, "TESSERA_LOG_LEVEL": "INFO",
               "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
        for name in args.arms:
            deadline = {"before": {"TESSERA_PREDICT_DEADLINE_S": "0", "TESSERA_PREDICT_REPLY_MB": "0"},
                        "after": {}}[name]
            res[name] = arm(ls, server, work, name, {**env, **deadline}, pngs, args)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1), flush=True)
    write_result(args.name, {"summary": res, "targets": {"http_1000_tasks_520x696_one_request_s": "<= 60",
                                                         "label_studio_limit_s": "100 (ML_TIMEOUT_PREDICT)"}})


if __name__ == "__main__":
    main()
