"""The overflow's queue (backend/overflow.py) without Label Studio: what it holds while it works, a task taken out
for the request that opens it, a queue dropped when another version is served. Its writes go to a loopback port
nothing listens on, so each one fails and is counted; the writes that land are tests/test_e2e_ls.py's."""
import time

from tessera.backend.label_config import parse_label_config
from tessera.backend.lsclient import connect
from tessera.backend.lsserver import free_port
from tessera.backend.overflow import CHUNKS, Overflow
from tessera.backend.predictions import ModelCache
from tessera.backend.settings import Settings
from tests.conftest import CONFIG_ALL, register_stub
from tests.test_predict_stream import SlowPredictor, SquaresMedia

CLOSED = f"http://127.0.0.1:{free_port()}"


def _overflow(tmp_path, predictor, batch=2):
    s = Settings(model_dir=tmp_path, predict_batch=batch, fetch_threads=2)
    register_stub(s, "7")
    cache = ModelCache(s, loader=lambda path, device: predictor)
    version = cache.version("7", parse_label_config(CONFIG_ALL))
    assert version.startswith("tessera-p7-v"), version
    return Overflow(s, cache, connect=lambda url, key: connect(url, key, timeout=2)), version


def _wait_idle(overflow, key, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = overflow.status(key)
        if not st["queued"] and not st["writing"]:
            return st
        time.sleep(0.05)
    raise AssertionError(f"overflow still busy: {overflow.status(key)}")


def test_queued_tasks_are_held_a_task_opened_is_taken_out_and_each_one_is_written_once(tmp_path):
    pred = SlowPredictor(0.3)
    overflow, version = _overflow(tmp_path, pred)
    tasks = [{"id": i, "data": {"image": "sq:1"}} for i in range(20)]
    config = parse_label_config(CONFIG_ALL)
    assert overflow.submit("7", tasks, config, version, SquaresMedia(), (CLOSED, "key")) == 20
    assert overflow.submit("7", tasks[:5], config, version, SquaresMedia(), (CLOSED, "key")) == 0   # not twice
    time.sleep(0.1)                                  # the first chunk of CHUNKS x 2 tasks is being predicted
    assert overflow.held("7", list(range(25))) == set(range(20))
    assert overflow.held("8", list(range(25))) == set()
    assert overflow.take("7", 19) and not overflow.take("7", 19)       # opened in the editor: the request has it
    assert not overflow.take("7", 0)                 # being predicted: its prediction is on the way
    st = _wait_idle(overflow, "7")
    # 19 predicted in chunks of CHUNKS x TESSERA_PREDICT_BATCH; every write refused (nothing listens), counted
    assert st["failed"] == 19 and st["written"] == 0 and st["dropped"] == 0, st
    assert sum(pred.calls) == 19 and max(pred.calls) <= 2 and len(pred.calls) >= 19 // (CHUNKS * 2), pred.calls
    assert overflow.held("7", list(range(20))) == set()      # a failed write leaves the task to the next retrieve


def test_a_queue_is_dropped_when_another_version_is_served(tmp_path):
    pred = SlowPredictor(0.0)
    overflow, version = _overflow(tmp_path, pred)
    tasks = [{"id": i, "data": {"image": "sq:1"}} for i in range(6)]
    overflow.submit("7", tasks, parse_label_config(CONFIG_ALL), "tessera-p7-v0000", SquaresMedia(), (CLOSED, "key"))
    st = _wait_idle(overflow, "7")
    assert st["dropped"] == 6 and st["written"] == st["failed"] == 0 and pred.calls == [], st
    assert st["version"] == "tessera-p7-v0000" != version


def test_another_process_holds_what_this_one_queued_until_its_file_goes_stale(tmp_path, monkeypatch):
    """With `tessera serve --workers 2` a second "Retrieve predictions" may reach the process that did not queue
    the tasks: it reads the other's file in MODEL_DIR/.overflow and answers them with no prediction too."""
    from tessera.backend import overflow as overflow_module

    pred = SlowPredictor(0.5)
    first, version = _overflow(tmp_path, pred)
    second = Overflow(first.settings, first.cache)           # the same MODEL_DIR, another process's file
    second.ident = "another-process"
    tasks = [{"id": i, "data": {"image": "sq:1"}} for i in range(12)]
    first.submit("7", tasks, parse_label_config(CONFIG_ALL), version, SquaresMedia(), (CLOSED, "key"))
    assert second.held("7", list(range(14))) == set(range(12)) and second.held("8", [1]) == set()
    assert second.status("7") is None                       # its own queue is empty
    monkeypatch.setattr(overflow_module, "STALE_S", -1.0)   # the first process gone quiet: its file is ignored
    assert second.held("7", list(range(14))) == set()
    monkeypatch.setattr(overflow_module, "STALE_S", 300.0)
    st = _wait_idle(first, "7")
    assert st["failed"] == 12 and st["dropped"] == 0, st
    # every write failed (nothing listens): nothing is held any more, here or there
    assert first.held("7", list(range(12))) == set() and second.held("7", list(range(12))) == set()
