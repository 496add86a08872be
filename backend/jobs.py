"""Training job runners: debounced, one run per project at a time, status readable while it runs.

`ThreadJobRunner` (default) runs jobs on a background thread of the serving process. `RQJobRunner`
(REDIS_URL set) enqueues them on the RQ queue "tessera"; `tessera worker` / `python -m tessera.backend.jobs worker`
processes run them, with the debounce waited out inside the job (no rq scheduler: its lock outlives a
killed worker by a minute and a restarted worker takes it over only after 10), redis-py's Lock (TTL +
heartbeat) per project and status in a Redis hash that any process can read. A lock or a waiting job whose
process died on this host (kill -9, OOM) is taken over at once; on other hosts when its TTL runs out.
The training itself is a function `run(project_key, reason, progress) -> dict` given as a callable or a
"module:function" path. Every progress step is logged as one line.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from tessera.backend.store import Store
from tessera.model.lockfile import file_lock

logger = logging.getLogger(__name__)

RunFn = Callable[[str, str, Callable[[dict], None]], dict]
DEFAULT_RUN_FN = "tessera.backend.training:train_project"
QUEUE = "tessera"
LOCK_TTL_S = 60                 # a dead worker's project lock frees itself after this (other hosts)
WAIT_TTL_S = 15                 # a job waiting out the debounce refreshes its marker within this
LOCK_RETRY_S = 2.0              # a job finding the project locked re-queues itself after this
JOB_TIMEOUT_S = 24 * 3600       # rq's default (180 s) is far too short for training
_KEY = "tessera:{}:{}"          # tessera:<what>:<project key>


class JobRunner(Protocol):
    """What the HTTP app and the LS model class need from a runner."""
    def submit(self, project_key: str, reason: str) -> dict: ...
    def status(self, project_key: str) -> dict: ...
    def wait_idle(self, project_key: str, timeout: float) -> dict: ...


def resolve_run_fn(run_fn: str | RunFn) -> RunFn:
    """A callable as is, or "package.module:function" (or "package.module.function") imported."""
    if callable(run_fn):
        return run_fn
    module, _, name = run_fn.partition(":") if ":" in run_fn else run_fn.rpartition(".")
    if not module or not name:
        raise ValueError(f"run function {run_fn!r} must look like 'package.module:function'")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"{run_fn!r}: {module} has no function {name}")
    return fn


def _summary(reasons: list[str]) -> str:
    """['A', 'A', 'B'] -> 'A (2), B': the events one run covers."""
    counts: dict[str, int] = {}
    for r in reasons:
        counts[r] = counts.get(r, 0) + 1
    return ", ".join(r if n == 1 else f"{r} ({n})" for r, n in counts.items())


def _short_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


def _jsonable(result: Any) -> dict | None:
    """The run's result as plain JSON (non-JSON values become strings)."""
    if result is None:
        return None
    return json.loads(json.dumps(result if isinstance(result, dict) else {"result": result}, default=str))


def _progress_fields(info: dict) -> dict:
    """progress() payload {"phase", "iter", "max_iters", "loss", "eta_s"} -> status fields."""
    out: dict[str, Any] = {}
    if "phase" in info:
        out["phase"] = str(info["phase"])
    if info.get("max_iters"):
        out["fraction"] = min(1.0, float(info.get("iter", 0)) / float(info["max_iters"]))
    elif "fraction" in info:
        out["fraction"] = float(info["fraction"])
    for k in ("loss", "loss_code", "eta_s"):
        if info.get(k) is not None:
            out[k] = float(info[k])
    return out


def _log_progress(project_key: str, info: dict) -> None:
    """One log line per progress step: `project 3: train 40/600 loss 0.4121 eta 52s`."""
    parts = [f"project {project_key}: {info.get('phase', '?')}"]
    if info.get("max_iters"):
        parts.append(f"{info.get('iter', 0)}/{info['max_iters']}")
    if info.get("loss") is not None:
        parts.append(f"loss {float(info['loss']):.4f}")
    if info.get("loss_code") is not None:
        parts.append(f"(code {float(info['loss_code']):.3f})")
    if info.get("eta_s") is not None:
        parts.append(f"eta {float(info['eta_s']):.0f}s")
    logger.info(" ".join(parts))


def _idle_status(project_key: str, backend: str) -> dict:
    return {"project": project_key, "backend": backend, "state": "idle", "phase": None, "fraction": None,
            "loss": None, "loss_code": None, "eta_s": None, "pending": False, "run_at": None, "events": 0, "runs": 0,
            "reason": None, "last_error": None, "last_result": None, "submitted": None, "started": None,
            "finished": None}


def _not_started(status: dict) -> dict:
    """A scheduled run has no progress yet: the previous run's phase, fraction and loss ("done", 1.0) are
    not shown as if they were the new run's (its outcome stays in last_result)."""
    if status.get("state") == "scheduled":
        status.update(phase=None, fraction=None, loss=None, loss_code=None, eta_s=None)
    return status


# ----------------------------------------------------------------------------------------------------
# in-process runner

@dataclass
class _Project:
    status: dict
    due: float | None = None                  # monotonic time the next run may start (None: nothing pending)
    running: bool = False
    reasons: list[str] = field(default_factory=list)


class ThreadJobRunner:
    """Runs jobs on background threads of this process (max_parallel runs at once over all projects).

    With lock_dir, a run also holds an flock on lock_dir/<key>.lock, so several serving processes sharing
    MODEL_DIR never train one project twice at once (their status views stay per process: use Redis then).
    """

    def __init__(self, run_fn: str | RunFn = DEFAULT_RUN_FN, debounce_s: float = 10.0, max_parallel: int = 1,
                 lock_dir: Path | None = None):
        self.run_fn, self.debounce_s, self.max_parallel = run_fn, float(debounce_s), max_parallel
        self.lock_dir = Path(lock_dir) if lock_dir else None
        self._cond = threading.Condition()
        self._projects: dict[str, _Project] = {}
        self._active = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, project_key: str, reason: str) -> dict:
        """Record an event; a run starts once events for the project settle for debounce_s."""
        with self._cond:
            if self._closed:
                raise RuntimeError("job runner is closed")
            p = self._projects.setdefault(project_key, _Project(_idle_status(project_key, "thread")))
            p.due = time.monotonic() + self.debounce_s
            p.reasons.append(reason)
            p.status.update(submitted=time.time(), events=p.status["events"] + 1, pending=True,
                            run_at=time.time() + self.debounce_s)
            if not p.running:
                p.status["state"] = "scheduled"
            if self._thread is None:        # started lazily: safe under a forking server (tessera serve --workers N)
                self._thread = threading.Thread(target=self._loop, name="tessera-jobs", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return _not_started(dict(p.status))

    def status(self, project_key: str) -> dict:
        """State of a project's runs: idle | scheduled | running | failed | done, plus progress."""
        with self._cond:
            p = self._projects.get(project_key)
            return _not_started(dict(p.status)) if p else _idle_status(project_key, "thread")

    def wait_idle(self, project_key: str, timeout: float) -> dict:
        """Block until nothing is scheduled or running for the project; TimeoutError after timeout s."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                p = self._projects.get(project_key)
                if p is None or (not p.running and p.due is None):
                    return self.status(project_key)
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"project {project_key} still {p.status['state']} after {timeout} s")
                self._cond.wait(left)

    def close(self) -> None:
        """Stop starting new runs (a run in progress finishes on its own thread)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _loop(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                waiting = [p for p in self._projects.values() if p.due is not None and not p.running]
                due = [p for p in waiting if p.due <= now]
                if due and self._active < self.max_parallel:
                    self._start(min(due, key=lambda p: p.due))
                    continue
                timeout = None
                if waiting and self._active < self.max_parallel:
                    timeout = min(p.due for p in waiting) - now
                self._cond.wait(timeout)

    def _start(self, p: _Project) -> None:
        """Mark p running and start its thread (called with the lock held)."""
        reason = _summary(p.reasons)
        p.running, p.due, p.reasons = True, None, []
        self._active += 1
        p.status.update(state="running", phase="starting", fraction=0.0, loss=None, loss_code=None, eta_s=None,
                        pending=False,
                        run_at=None, reason=reason, started=time.time(), finished=None)
        threading.Thread(target=self._run, args=(p, reason), name=f"tessera-run-{p.status['project']}",
                         daemon=True).start()

    def _run(self, p: _Project, reason: str) -> None:
        key = p.status["project"]

        def progress(info: dict) -> None:
            fields = _progress_fields(info)
            _log_progress(key, info)
            with self._cond:
                p.status.update(fields)

        result, error = None, None
        try:
            lock = self.lock_dir / f"{key}.lock" if self.lock_dir else None
            with contextlib.nullcontext() if lock is None else file_lock(lock):
                logger.info("training run for project %s (%s)", key, reason)
                result = _jsonable(resolve_run_fn(self.run_fn)(key, reason, progress))
        except Exception as e:  # a failed run is recorded; it must not stop later runs
            logger.exception("training run for project %s failed", key)
            error = _short_error(e)
        with self._cond:
            self._active -= 1
            p.running = False
            p.status.update(state="failed" if error else "done", finished=time.time(),
                            runs=p.status["runs"] + 1, last_error=error, eta_s=None)
            if error is None:
                p.status.update(last_result=result, fraction=1.0)
            if p.due is not None:                  # events came in during the run: one follow-up
                p.status.update(state="scheduled", pending=True)
            self._cond.notify_all()


# ----------------------------------------------------------------------------------------------------
# Redis / RQ runner

def _redis(url: str):
    from redis import Redis
    return Redis.from_url(url)


def _queue(conn):
    from rq import Queue
    return Queue(QUEUE, connection=conn)


def _enqueue(conn, project_key: str, debounce_s: float, run_fn: str) -> str:
    """Queue _rq_job for the project; returns the rq job id (recorded as the project's pending job)."""
    job = _queue(conn).enqueue(_rq_job, project_key, debounce_s, run_fn, job_timeout=JOB_TIMEOUT_S,
                               result_ttl=600, failure_ttl=7 * 86400,
                               description=f"tessera training run for project {project_key}")
    conn.set(_KEY.format("pending", project_key), job.id)
    return job.id


def _process_space() -> str:
    """Where a pid means something: host name + pid namespace (two containers can share a host name)."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return f"{socket.gethostname()}/{ns}"


def _token() -> str:
    """A lock value naming its holder: '<process space>|<pid>|<random>'."""
    return f"{_process_space()}|{os.getpid()}|{uuid.uuid4().hex}"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` (of this pid namespace) still runs; a zombie (killed, not yet reaped by
    its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _holder_dead(token: bytes | str | None) -> bool:
    """Whether a lock value names a process of this process space that no longer exists."""
    if not token:
        return False
    text = token.decode(errors="replace") if isinstance(token, bytes) else token
    space, _, rest = text.partition("|")
    pid = rest.split("|", 1)[0]
    return space == _process_space() and pid.isdigit() and not pid_alive(int(pid))


def _job_alive(conn, project_key: str, job_id: bytes | None) -> bool:
    """Whether the project's pending rq job will still run: queued, or started and waiting out the
    debounce in a process that is alive (it refreshes tessera:waiting:<key> with its token)."""
    if not job_id:
        return False
    if job_id == b"enqueueing":                # another process is enqueueing it right now
        return True
    from rq.exceptions import NoSuchJobError
    from rq.job import Job
    try:
        job = Job.fetch(job_id.decode(), connection=conn)
        status = job.get_status()
    except NoSuchJobError:
        return False
    if status in ("finished", "failed", "stopped", "canceled"):
        return False
    if status == "started":
        waiting = conn.get(_KEY.format("waiting", project_key))
        if waiting and waiting.split(b"#", 1)[0] == job_id:
            return not _holder_dead(waiting.split(b"#", 1)[1])
        started = job.started_at.timestamp() if job.started_at else 0.0   # before its first marker
        return time.time() - started < WAIT_TTL_S
    return True


class RQJobRunner:
    """Enqueues debounced runs on the RQ queue "tessera"; status lives in Redis (any process can read it).

    Redis keys per project: tessera:status:<key> (hash), tessera:events:<key> (reasons not yet run),
    tessera:pending:<key> (id of the one scheduled job), tessera:lock:<key> (held while a run runs).
    """

    def __init__(self, redis_url: str, run_fn: str = DEFAULT_RUN_FN, debounce_s: float = 10.0):
        if not isinstance(run_fn, str):
            raise ValueError("RQJobRunner needs run_fn as a 'module:function' path the workers can import")
        self.redis_url, self.run_fn, self.debounce_s = redis_url, run_fn, float(debounce_s)
        self.conn = _redis(redis_url)

    def submit(self, project_key: str, reason: str) -> dict:
        """Record the event in Redis and make sure exactly one (delayed) job is pending for the project."""
        now = time.time()
        k = lambda what: _KEY.format(what, project_key)  # noqa: E731
        pipe = self.conn.pipeline()
        pipe.hset(k("status"), mapping={"submitted": now, "debounce_s": self.debounce_s})
        pipe.hincrby(k("status"), "events", 1)
        pipe.rpush(k("events"), reason)
        pipe.ltrim(k("events"), -200, -1)
        pipe.get(k("pending"))
        pending = pipe.execute()[-1]
        if not _job_alive(self.conn, project_key, pending):
            # SET NX: of several processes submitting at once, one enqueues
            if self.conn.set(k("pending"), "enqueueing", nx=True, ex=60) or pending:
                _enqueue(self.conn, project_key, self.debounce_s, self.run_fn)
        return self.status(project_key)

    def status(self, project_key: str) -> dict:
        """Status from the Redis hash; a "running" run whose lock expired, or whose process died on this
        host, is reported as failed."""
        k = lambda what: _KEY.format(what, project_key)  # noqa: E731
        pipe = self.conn.pipeline()
        pipe.hgetall(k("status"))
        pipe.exists(k("pending"))
        pipe.get(k("lock"))
        raw, pending, lock = pipe.execute()
        locked = bool(lock) and not _holder_dead(lock)
        st = _idle_status(project_key, "rq")
        h = {a.decode(): b.decode() for a, b in raw.items()}
        for f in ("fraction", "loss", "loss_code", "eta_s", "submitted", "started", "finished"):
            if h.get(f):
                st[f] = float(h[f])
        for f in ("events", "runs"):
            st[f] = int(h.get(f, 0))
        for f in ("phase", "reason", "last_error"):
            st[f] = h.get(f) or None
        st["last_result"] = json.loads(h["last_result"]) if h.get("last_result") else None
        state = h.get("state", "idle")
        if locked:                                  # the lock is held only while a run runs
            state = "running"
        elif state == "running":
            state, st["last_error"] = "failed", "the worker running this project stopped (lock expired)"
            if lock:
                st["last_error"] = "the worker running this project died (its process is gone)"
        st["pending"] = bool(pending)
        if pending and state != "running":
            state = "scheduled"
            st["run_at"] = st["submitted"] + float(h.get("debounce_s", self.debounce_s))
        st["state"] = state
        return _not_started(st)

    def wait_idle(self, project_key: str, timeout: float) -> dict:
        """Poll until nothing is scheduled or running for the project; TimeoutError after timeout s."""
        end = time.monotonic() + timeout
        while True:
            st = self.status(project_key)
            if st["state"] not in ("scheduled", "running"):
                return st
            if time.monotonic() > end:
                raise TimeoutError(f"project {project_key} still {st['state']} after {timeout} s "
                                   f"(is a `tessera worker` running on {QUEUE!r}?)")
            time.sleep(0.1)


def _project_lock(conn, project_key: str):
    """redis-py's Lock on tessera:lock:<key>, held while a run runs: TTL LOCK_TTL_S, renewed by a
    heartbeat, non-blocking (a busy project re-queues its job), shared by the heartbeat thread."""
    return conn.lock(_KEY.format("lock", project_key), timeout=LOCK_TTL_S, blocking=False, thread_local=False)


def _take_lock(lock) -> bool:
    """Acquire the project lock with a token naming this process; a lock whose holder died on this host
    (kill -9, OOM: no release, and the TTL is a minute away) is released first and taken over."""
    from redis.exceptions import LockNotOwnedError

    token = _token()
    if lock.acquire(token=token):
        return True
    holder = lock.redis.get(lock.name)
    if not _holder_dead(holder):
        return False
    try:
        lock.do_release(holder)                 # only while it still holds the dead process's token
    except LockNotOwnedError:
        return False
    logger.warning("%s: the process holding it died; taking it over", lock.name)
    return lock.acquire(token=token)


def _heartbeat(lock, stop: threading.Event) -> None:
    """Reset the lock's TTL every LOCK_TTL_S / 4 until `stop` is set (or the lock was lost)."""
    from redis.exceptions import LockError

    while not stop.wait(LOCK_TTL_S / 4):
        try:
            lock.reacquire()
        except LockError as e:                  # expired (e.g. a long stall) and perhaps taken: say so
            logger.warning("%s: lost while the run goes on: %s", lock.name, e)
            return


def _rq_job(project_key: str, debounce_s: float, run_fn: str) -> None:
    """The RQ job: wait out the debounce, take the project lock, run, record the outcome in Redis."""
    from rq import get_current_job

    job = get_current_job()
    conn = job.connection
    k = lambda what: _KEY.format(what, project_key)  # noqa: E731
    token = _token()                               # names this job's process in the waiting marker
    while True:                                    # newer events push the run back until they settle
        settle = float(conn.hget(k("status"), "submitted") or 0) + debounce_s - time.time()
        if settle <= 0.05:
            break
        conn.set(k("waiting"), f"{job.id}#{token}", ex=WAIT_TTL_S)
        time.sleep(min(settle, WAIT_TTL_S / 3))
    lock = _project_lock(conn, project_key)
    if not _take_lock(lock):
        # another worker is training this project: queue again (this job stays the one follow-up)
        conn.set(k("waiting"), f"{job.id}#{token}", ex=WAIT_TTL_S)
        time.sleep(LOCK_RETRY_S)
        _enqueue(conn, project_key, debounce_s, run_fn)
        return
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(lock, stop), daemon=True).start()
    try:
        pipe = conn.pipeline()                     # atomically: the pending job is now this run
        pipe.delete(k("pending"))
        pipe.delete(k("waiting"))
        pipe.lrange(k("events"), 0, -1)
        pipe.delete(k("events"))
        pipe.hset(k("status"), mapping={"state": "running", "phase": "starting", "fraction": 0.0, "loss": "",
                                        "loss_code": "",
                                        "eta_s": "", "started": time.time(), "finished": ""})
        reason = _summary([r.decode() for r in pipe.execute()[2]]) or "retry"
        conn.hset(k("status"), "reason", reason)
        _execute(conn, project_key, reason, run_fn)
    finally:
        stop.set()
        _release(lock)


def _release(lock) -> None:
    from redis.exceptions import LockError

    try:
        lock.release()
    except LockError as e:                      # it expired during the run: nothing of ours to release
        logger.warning("%s: not released: %s", lock.name, e)


def _execute(conn, project_key: str, reason: str, run_fn: str) -> None:
    """Call the run function with a progress callback writing to Redis; record result or error."""
    key = _KEY.format("status", project_key)
    last_write = [0.0]

    def progress(info: dict) -> None:
        fields = _progress_fields(info)
        _log_progress(project_key, info)
        now = time.monotonic()
        if "phase" in info or now - last_write[0] > 0.5:      # throttle Redis writes
            last_write[0] = now
            conn.hset(key, mapping={f: ("" if v is None else v) for f, v in fields.items()})

    logger.info("training run for project %s (%s)", project_key, reason)
    try:
        result = _jsonable(resolve_run_fn(run_fn)(project_key, reason, progress))
    except Exception as e:  # recorded; the next event still schedules a run
        logger.exception("training run for project %s failed", project_key)
        conn.hset(key, mapping={"state": "failed", "last_error": _short_error(e), "finished": time.time(),
                                "eta_s": ""})
    else:
        conn.hset(key, mapping={"state": "done", "last_error": "", "fraction": 1.0, "eta_s": "",
                                "last_result": json.dumps(result), "finished": time.time()})
    conn.hincrby(key, "runs", 1)


def worker_main(redis_url: str, burst: bool = False) -> None:
    """Run an RQ worker on queue "tessera". The default run function (and torch) is imported here, once:
    rq forks a work horse per job, which then starts with it loaded."""
    from rq import Worker

    try:
        resolve_run_fn(DEFAULT_RUN_FN)
    except Exception as e:  # a worker for other run functions still works; the job will report it
        logger.warning("could not preload %s: %s", DEFAULT_RUN_FN, e)
    conn = _redis(redis_url)
    logger.info("tessera worker on queue %r", QUEUE)
    Worker([_queue(conn)], connection=conn).work(burst=burst)


def make_runner(settings: Any, run_fn: str | RunFn | None = None) -> JobRunner:
    """RQJobRunner if settings.redis_url is set, else ThreadJobRunner. Reads redis_url, debounce_s and
    optionally run_fn_path and model_dir (for the cross-process project lock) from `settings`."""
    run_fn = run_fn or getattr(settings, "run_fn_path", None) or DEFAULT_RUN_FN
    debounce_s = float(getattr(settings, "debounce_s", 10.0))
    if getattr(settings, "redis_url", ""):
        return RQJobRunner(settings.redis_url, run_fn=run_fn, debounce_s=debounce_s)
    model_dir = getattr(settings, "model_dir", None)
    return ThreadJobRunner(run_fn, debounce_s=debounce_s, lock_dir=Store(model_dir).jobs_dir if model_dir else None)


def main(argv: list[str] | None = None) -> int:
    """`python -m tessera.backend.jobs worker --redis-url URL [--burst]`."""
    p = argparse.ArgumentParser(prog="python -m tessera.backend.jobs")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker", help="run an RQ worker on queue 'tessera'")
    w.add_argument("--redis-url", required=True)
    w.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    args = p.parse_args(argv)
    from tessera.backend.settings import configure_logging

    configure_logging("INFO")
    worker_main(args.redis_url, burst=args.burst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
