"""Tests for backend/jobs.py: debounce, one run per project, follow-up runs, failures; the RQ path against
a real redis-server and real worker processes (set TESSERA_SKIP_REDIS=1 to skip that part)."""
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tessera.backend.jobs import RQJobRunner, ThreadJobRunner, make_runner, resolve_run_fn

REPO = Path(__file__).resolve().parents[1]


class Recorder:
    """A run function that records its calls, can block, fail, and report progress."""

    def __init__(self, duration: float = 0.0, fail_first: int = 0):
        self.calls: list[dict] = []
        self.duration, self.fail_left = duration, fail_first
        self.lock = threading.Lock()
        self.active = self.max_active = 0
        self.release = threading.Event()
        self.release.set()

    def __call__(self, project_key, reason, progress):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.calls.append({"project": project_key, "reason": reason, "start": time.monotonic()})
        try:
            progress({"phase": "train", "iter": 5, "max_iters": 10, "loss": 0.25, "eta_s": 3.0})
            self.release.wait(10)
            time.sleep(self.duration)
            if self.fail_left:
                self.fail_left -= 1
                raise RuntimeError("out of patience")
            return {"version": f"v{len(self.calls):04d}"}
        finally:
            with self.lock:
                self.active -= 1


def _wait_for(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


def test_burst_coalesces_into_one_run():
    rec = Recorder()
    # debounce 1 s: the burst must fit in it even on a loaded CI box (submit takes ~0.05 ms; its speed is
    # not asserted here: a run started inside submit() would show in rec.calls)
    runner = ThreadJobRunner(rec, debounce_s=1.0)
    assert runner.status("p")["state"] == "idle"
    for _ in range(4):
        st = runner.submit("p", "ANNOTATION_CREATED")
    st = runner.submit("p", "START_TRAINING")
    assert st["state"] == "scheduled" and st["pending"] and not rec.calls
    final = runner.wait_idle("p", 10)
    assert len(rec.calls) == 1 and rec.calls[0]["reason"] == "ANNOTATION_CREATED (4), START_TRAINING"
    assert final["state"] == "done" and final["last_result"] == {"version": "v0001"} and final["runs"] == 1
    assert final["fraction"] == 1.0 and final["events"] == 5 and final["finished"] >= final["started"]
    runner.close()


def test_a_scheduled_run_does_not_show_the_previous_runs_progress():
    rec = Recorder()
    runner = ThreadJobRunner(rec, debounce_s=0.3)
    runner.submit("p", "A")
    done = runner.wait_idle("p", 10)
    assert done["state"] == "done" and done["fraction"] == 1.0
    for st in (runner.submit("p", "B"), runner.status("p")):
        assert st["state"] == "scheduled" and st["phase"] is None and st["fraction"] is None and st["loss"] is None
    assert st["last_result"] == done["last_result"]           # the previous outcome stays, as last_result
    runner.wait_idle("p", 10)
    runner.close()


def test_debounce_waits_for_events_to_settle():
    rec = Recorder()
    runner = ThreadJobRunner(rec, debounce_s=1.0)    # 5x the gap: a loaded box may stretch a sleep
    t0 = time.monotonic()
    for _ in range(4):                       # events 0.2 s apart keep pushing the run back
        runner.submit("p", "ANNOTATION_UPDATED")
        time.sleep(0.2)
    runner.wait_idle("p", 10)
    assert len(rec.calls) == 1 and rec.calls[0]["start"] - t0 >= 0.6 + 1.0 - 0.05
    runner.close()


def test_one_run_at_a_time_and_one_follow_up():
    rec = Recorder()
    rec.release.clear()
    runner = ThreadJobRunner(rec, debounce_s=0.05)
    runner.submit("p", "A")
    _wait_for(lambda: runner.status("p")["phase"] == "train")
    st = runner.status("p")
    assert st["phase"] == "train" and st["fraction"] == 0.5 and st["loss"] == 0.25 and st["eta_s"] == 3.0
    for _ in range(3):
        runner.submit("p", "B")
    time.sleep(0.2)                          # well past the debounce: still only the first run
    assert len(rec.calls) == 1 and runner.status("p")["state"] == "running" and runner.status("p")["pending"]
    rec.release.set()
    final = runner.wait_idle("p", 10)
    assert [c["reason"] for c in rec.calls] == ["A", "B (3)"] and rec.max_active == 1
    assert final["runs"] == 2 and final["state"] == "done"
    runner.close()


def test_failure_is_recorded_and_next_event_runs():
    rec = Recorder(fail_first=1)
    runner = ThreadJobRunner(rec, debounce_s=0.01)
    runner.submit("p", "A")
    st = runner.wait_idle("p", 10)
    assert st["state"] == "failed" and "out of patience" in st["last_error"] and st["last_result"] is None
    runner.submit("p", "B")
    st = runner.wait_idle("p", 10)
    assert st["state"] == "done" and st["last_error"] is None and st["runs"] == 2
    # a bad run function path fails the run, not the submit
    bad = ThreadJobRunner("no_such_module_xyz:run", debounce_s=0.01)
    bad.submit("p", "A")
    assert "no_such_module_xyz" in bad.wait_idle("p", 10)["last_error"]
    runner.close()
    bad.close()


def test_projects_are_independent_and_serialised():
    rec = Recorder(duration=0.1)
    runner = ThreadJobRunner(rec, debounce_s=0.01)
    runner.submit("a", "A")
    runner.submit("b", "B")
    runner.wait_idle("a", 10)
    runner.wait_idle("b", 10)
    assert sorted(c["project"] for c in rec.calls) == ["a", "b"] and rec.max_active == 1   # max_parallel=1
    with pytest.raises(TimeoutError):
        rec.release.clear()
        runner.submit("a", "A")
        runner.wait_idle("a", 0.2)
    rec.release.set()
    runner.close()


def test_lock_dir_keeps_two_processes_off_one_project(tmp_path):
    rec = Recorder(duration=0.3)             # two runners stand in for two server worker processes
    r1 = ThreadJobRunner(rec, debounce_s=0.01, lock_dir=tmp_path)
    r2 = ThreadJobRunner(rec, debounce_s=0.01, lock_dir=tmp_path)
    r1.submit("p", "A")
    r2.submit("p", "B")
    r1.wait_idle("p", 10)
    r2.wait_idle("p", 10)
    assert len(rec.calls) == 2 and rec.max_active == 1


def test_make_runner_and_resolve():
    runner = make_runner(SimpleNamespace(redis_url="", debounce_s=0.5, model_dir=None), run_fn=Recorder())
    assert isinstance(runner, ThreadJobRunner) and runner.debounce_s == 0.5
    assert resolve_run_fn("json:dumps") is json.dumps and resolve_run_fn("json.dumps") is json.dumps
    with pytest.raises(ValueError):
        resolve_run_fn("json:nope")
    with pytest.raises(ValueError):
        RQJobRunner("redis://localhost:1", run_fn=Recorder())


# ---- RQ + real Redis ---------------------------------------------------------------------------------

RUNS_ENV = "TESSERA_TEST_RUNS_FILE"


def _hold_file(runs: Path, project_key: str) -> Path:
    return runs.with_name(f"hold-{project_key}")


def rq_recording_run(project_key, reason, progress):
    """Run function for the RQ workers: appends a line per run to $TESSERA_TEST_RUNS_FILE. While the file
    hold-<project> exists beside it, the run stays in its "train" phase (see _holding)."""
    start = time.time()
    progress({"phase": "train", "iter": 1, "max_iters": 4, "loss": 0.5, "eta_s": 1.0})
    hold = _hold_file(Path(os.environ[RUNS_ENV]), project_key)
    end = time.monotonic() + 120
    while hold.exists() and time.monotonic() < end:
        time.sleep(0.02)
    time.sleep(float(os.environ.get("TESSERA_TEST_RUN_S", "1.0")))
    with open(os.environ[RUNS_ENV], "a") as f:
        f.write(json.dumps({"project": project_key, "reason": reason, "start": start, "end": time.time(),
                            "pid": os.getpid()}) + "\n")
    if "FAIL" in reason:
        raise RuntimeError("asked to fail")
    return {"version": "v0001", "reason": reason}


@pytest.fixture(scope="module")
def rq_workers(redis_url, tmp_path_factory):
    """Two real `python -m tessera.backend.jobs worker` processes; yields the runs file they append to."""
    runs = tmp_path_factory.mktemp("rq") / "runs.jsonl"
    runs.touch()
    env = {**os.environ, RUNS_ENV: str(runs), "PYTHONPATH": str(REPO), "TESSERA_TEST_RUN_S": "0.6"}
    logs = [open(runs.with_name(f"worker{i}.log"), "w") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "tessera.backend.jobs", "worker", "--redis-url", redis_url],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    _wait_workers_registered(redis_url, procs, logs)
    yield runs
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
    for log in logs:
        log.close()


def _wait_workers_registered(redis_url: str, procs: list, logs: list, timeout: float = 300.0) -> None:
    """Block until every worker has registered on the queue: a worker preloads torch, which takes ~3 s
    on an idle box and 40 s on a loaded one; the tests' own timeouts are for the runs, not for that."""
    from redis import Redis
    from rq import Queue, Worker

    conn = Redis.from_url(redis_url)
    queue = Queue("tessera", connection=conn)
    end = time.monotonic() + timeout
    while len(Worker.all(queue=queue)) < len(procs):
        for p, log in zip(procs, logs):
            assert p.poll() is None, f"rq worker exited {p.returncode}: {Path(log.name).read_text()[-3000:]}"
        assert time.monotonic() < end, f"rq workers did not register in {timeout:.0f} s"
        time.sleep(0.2)


@contextlib.contextmanager
def _holding(runs: Path, project_key: str):
    """Runs of the project stay in their "train" phase until the block exits (no timing window to hit)."""
    hold = _hold_file(runs, project_key)
    hold.touch()
    try:
        yield
    finally:
        hold.unlink(missing_ok=True)


def _runs(path: Path, project: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["project"] == project]


RUN_FN = "tests.test_jobs:rq_recording_run"


@pytest.mark.redis
def test_rq_burst_runs_once_and_status_is_shared(redis_url, rq_workers):
    # debounce 2 s: the five submits (a few Redis round trips each, no training; their speed is not
    # asserted here) must fall within it even on a loaded CI box
    runner = RQJobRunner(redis_url, run_fn=RUN_FN, debounce_s=2.0)
    with _holding(rq_workers, "p1"):
        for _ in range(5):
            st = runner.submit("p1", "ANNOTATION_CREATED")
        assert st["state"] == "scheduled" and st["backend"] == "rq"
        other = RQJobRunner(redis_url, run_fn=RUN_FN, debounce_s=2.0)    # e.g. another server worker process
        _wait_for(lambda: other.status("p1")["phase"] == "train", timeout=30)
        st = other.status("p1")
        assert st["state"] == "running" and st["fraction"] == 0.25 and st["loss"] == 0.5
    final = runner.wait_idle("p1", 30)
    runs = _runs(rq_workers, "p1")
    assert len(runs) == 1 and runs[0]["reason"] == "ANNOTATION_CREATED (5)"
    assert final["state"] == "done" and final["runs"] == 1 and final["events"] == 5
    assert final["last_result"] == {"version": "v0001", "reason": "ANNOTATION_CREATED (5)"}
    assert other.status("p1") == final


@pytest.mark.redis
def test_rq_event_during_run_gives_one_follow_up(redis_url, rq_workers):
    runner = RQJobRunner(redis_url, run_fn=RUN_FN, debounce_s=0.3)
    with _holding(rq_workers, "p2"):
        runner.submit("p2", "A")
        # phase "train" = the run has taken its events (an event before that would join this run)
        _wait_for(lambda: runner.status("p2")["phase"] == "train", timeout=30)
        for _ in range(3):
            runner.submit("p2", "B")
        st = runner.status("p2")
        assert st["state"] == "running" and st["pending"]
    final = runner.wait_idle("p2", 40)
    runs = sorted(_runs(rq_workers, "p2"), key=lambda r: r["start"])
    assert [r["reason"] for r in runs] == ["A", "B (3)"], runs
    assert runs[0]["end"] <= runs[1]["start"], "two runs of one project overlapped"
    assert final["state"] == "done" and final["runs"] == 2


@pytest.mark.redis
def test_rq_failure_recorded_then_next_succeeds(redis_url, rq_workers):
    runner = RQJobRunner(redis_url, run_fn=RUN_FN, debounce_s=0.2)
    runner.submit("p3", "FAIL")
    st = runner.wait_idle("p3", 30)
    assert st["state"] == "failed" and "asked to fail" in st["last_error"]
    runner.submit("p3", "ANNOTATION_CREATED")
    assert runner.status("p3")["state"] == "scheduled" and runner.status("p3")["phase"] is None
    st = runner.wait_idle("p3", 30)
    assert st["state"] == "done" and st["last_error"] is None and st["runs"] == 2


@pytest.mark.redis
def test_rq_project_lock_is_taken_over_only_from_a_dead_holder(redis_url, monkeypatch):
    from redis import Redis

    from tessera.backend import jobs

    conn = Redis.from_url(redis_url)
    gone = subprocess.run([sys.executable, "-c", "from tessera.backend.jobs import _token; print(_token())"],
                          capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()
    lock = jobs._project_lock(conn, "lk1")
    conn.set(lock.name, gone, ex=60)                        # a worker of this host killed with -9
    assert jobs._take_lock(lock) and not jobs._holder_dead(conn.get(lock.name))
    assert not jobs._take_lock(jobs._project_lock(conn, "lk1")), "a live holder keeps its lock"
    jobs._release(lock)
    elsewhere = gone.replace(gone.split("|")[0], "otherhost/pid:[1]")
    conn.set(lock.name, elsewhere, ex=60)                   # can't judge another host's pids: wait for the TTL
    assert not jobs._take_lock(jobs._project_lock(conn, "lk1")) and conn.get(lock.name).decode() == elsewhere
    conn.delete(lock.name)

    monkeypatch.setattr(jobs, "LOCK_TTL_S", 0.8)            # the heartbeat keeps a long run's lock
    lock = jobs._project_lock(conn, "lk2")
    stop = threading.Event()
    assert jobs._take_lock(lock)
    threading.Thread(target=jobs._heartbeat, args=(lock, stop), daemon=True).start()
    time.sleep(2.0)
    assert lock.owned() and conn.pttl(lock.name) > 0
    stop.set()
    jobs._release(lock)
    assert conn.get(lock.name) is None
