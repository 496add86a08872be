"""Tests for model/registry.py: versions, promote/reject/rollback, pruning, crash and concurrency safety."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tessera.model.registry as registry
from tessera.model.checkpoint import load_checkpoint, save_checkpoint
from tessera.model.registry import Registry

REPO = Path(__file__).resolve().parents[1]


def _ckpt(tmp_path: Path, i: int, kind: str = "vqvae") -> Path:
    return save_checkpoint({"kind": kind, "model": {"w": torch.full((3,), float(i))}, "iter_num": i},
                           tmp_path / f"incoming-{i}.pt")


def test_add_promote_reject_rollback(tmp_path):
    reg = Registry(tmp_path / "store")
    assert reg.current() is None and reg.versions() == []
    src = _ckpt(tmp_path, 1)
    v1 = reg.add(src, {"iou": 0.5}, promote=True, reason="first")
    assert (v1.version, v1.status, v1.kind) == ("v0001", "current", "label")
    assert not src.exists(), "the checkpoint is moved into the store"
    assert load_checkpoint(reg.path("v0001"), "vqvae")["iter_num"] == 1
    pointer = (reg.root / "current.json").read_bytes()
    v2 = reg.add(_ckpt(tmp_path, 2), {"iou": 0.4}, promote=False, reason="worse")
    assert v2.status == "rejected" and reg.current().version == "v0001"
    assert (reg.root / "current.json").read_bytes() == pointer, "a rejected version does not touch the pointer"
    reg.add(_ckpt(tmp_path, 3), {"iou": 0.7}, promote=True)
    assert reg.current().version == "v0003" and reg.current().metrics == {"iou": 0.7}
    assert [(v.version, v.status) for v in reg.versions()] == [
        ("v0003", "current"), ("v0002", "rejected"), ("v0001", "kept")]
    assert reg.versions()[2].reason == "first"
    assert reg.rollback("v0001").status == "current"
    assert reg.current().version == "v0001" and reg.get("v0003").status == "kept"
    reg.rollback("v0002")                                           # a rejected version can be served too
    assert Registry(tmp_path / "store").current().version == "v0002"  # other instances see it
    with pytest.raises(ValueError, match="v0009"):
        reg.rollback("v0009")
    with pytest.raises(ValueError):
        reg.path("../../etc")
    with pytest.raises(ValueError, match="JSON"):
        reg.add(_ckpt(tmp_path, 4), {"bad": object()}, promote=True)


def test_kinds_have_their_own_current(tmp_path):
    reg = Registry(tmp_path)
    reg.add(_ckpt(tmp_path, 1), {}, promote=True)
    g = reg.add(_ckpt(tmp_path, 2, kind="maskgan"), {"fid": 10.0}, promote=True)
    assert g.kind == "gan" and reg.current("gan").version == "v0002"
    assert reg.current("label").version == "v0001"
    assert [v.version for v in reg.versions("gan")] == ["v0002"]
    assert reg.add(_ckpt(tmp_path, 3), {}, promote=False, kind="gan").kind == "gan"


def test_keep_n_never_deletes_current(tmp_path):
    reg = Registry(tmp_path / "store", keep_n=3)
    reg.add(_ckpt(tmp_path, 1), {}, promote=True)
    for i in range(2, 7):
        reg.add(_ckpt(tmp_path, i), {}, promote=False)
    assert [v.version for v in reg.versions()] == ["v0006", "v0005", "v0004", "v0001"]
    reg.rollback("v0005")
    reg.add(_ckpt(tmp_path, 7), {}, promote=False)
    assert [v.version for v in reg.versions()] == ["v0007", "v0006", "v0005"]
    assert not (tmp_path / "store" / "versions" / "v0001").exists()
    assert [p.name for p in (tmp_path / "store" / "versions").iterdir() if p.name.startswith(".")] == []


def test_failed_save_leaves_current_intact(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "store")
    reg.add(_ckpt(tmp_path, 1), {"iou": 0.5}, promote=True)

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    src = _ckpt(tmp_path, 2)
    with monkeypatch.context() as m:                   # fails while staging the version
        m.setattr(registry, "_write_json", disk_full)
        with pytest.raises(OSError):
            reg.add(src, {"iou": 0.9}, promote=True)
    assert src.exists(), "the source checkpoint survives a failed add"
    assert [v.version for v in reg.versions()] == ["v0001"] and reg.current().version == "v0001"
    with monkeypatch.context() as m:                   # fails while switching current.json
        m.setattr(Registry, "_switch", disk_full)
        with pytest.raises(OSError):
            reg.add(src, {"iou": 0.9}, promote=True)
    assert [v.version for v in reg.versions()] == ["v0001"] and reg.current().version == "v0001"
    assert sorted(os.listdir(tmp_path / "store" / "versions")) == ["v0001"]
    assert reg.add(src, {"iou": 0.9}, promote=True).version == "v0002"


_ADD_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    import tessera.model.registry as registry
    from tessera.model.checkpoint import save_checkpoint
    root, stop_at, n, go = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    def hook(step):
        if step == stop_at:
            print("AT", step, flush=True)
            time.sleep(60)
    registry._fault_hook = hook
    reg = registry.Registry(root / "store", keep_n=100)
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.01)
    for i in range(n):
        ck = save_checkpoint({"kind": "vqvae", "model": {"w": torch.zeros(100_000)}},
                             root / f"in-{stop_at}-{i}-{id(reg)}.pt")
        print(reg.add(ck, {"i": i}, promote=True).version, flush=True)
""")


def _spawn(tmp_path: Path, stop_at: str, n: int) -> subprocess.Popen:
    script = tmp_path / "add.py"
    script.write_text(_ADD_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), stop_at, str(n), str(tmp_path / "go")],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("stop_at", ["staged", "committed"])
def test_sigkill_mid_add_keeps_current_readable(tmp_path, stop_at):
    reg = Registry(tmp_path / "store")
    reg.add(_ckpt(tmp_path, 1), {"iou": 0.5}, promote=True)
    proc = _spawn(tmp_path, stop_at, 1)
    (tmp_path / "go").touch()
    try:
        assert proc.stdout.readline().strip() == f"AT {stop_at}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    # the lock died with the process; the old version is still served and loads
    assert reg.current().version == "v0001"
    assert load_checkpoint(reg.path("v0001"), "vqvae")["iter_num"] == 1
    expected = ["v0001"] if stop_at == "staged" else ["v0002", "v0001"]   # committed = complete but not served
    assert [v.version for v in reg.versions()] == expected
    for v in reg.versions():
        load_checkpoint(reg.path(v.version), "vqvae")
    nxt = reg.add(_ckpt(tmp_path, 3), {}, promote=True)       # cleans the leftover staging dir
    assert nxt.version == f"v{len(expected) + 1:04d}" and reg.current().version == nxt.version
    assert not [p for p in (tmp_path / "store" / "versions").iterdir() if p.name.startswith(".")]


def test_concurrent_adds_from_two_processes(tmp_path):
    procs = [_spawn(tmp_path, "never", 4) for _ in range(2)]
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=300)[0].split() for p in procs]     # a bound on a hang, not a speed limit
    assert all(p.returncode == 0 for p in procs)
    got = outs[0] + outs[1]
    assert sorted(got) == [f"v{i:04d}" for i in range(1, 9)], got
    reg = Registry(tmp_path / "store")
    assert reg.current().version in got and len(reg.versions()) == 8
    assert json.loads((tmp_path / "store" / "current.json").read_text())["label"]["version"] == \
        reg.current().version
