"""Tests for model/checkpoint.py: round trip, interrupted save, version and kind checks."""
import os

import pytest
import torch

from tessera.model.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint


class _Unpicklable:
    """Raises while torch.save pickles it: a save interrupted half-way."""
    def __reduce__(self):
        raise RuntimeError("disk went away mid-save")


def _payload(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    net = torch.nn.Linear(4, 3)
    return {"kind": "vqvae", "model": net.state_dict(), "model_config": {"n_labels": 2, "embed_dim": 8},
            "iter_num": 7, "best_val_loss": 0.5, "label_names": ["cell"]}


def test_round_trip(tmp_path):
    path = save_checkpoint(_payload(), tmp_path / "sub" / "ckpt.pt")
    got = load_checkpoint(path, "vqvae")
    assert got["format_version"] == FORMAT_VERSION and got["iter_num"] == 7 and got["label_names"] == ["cell"]
    for k, v in _payload()["model"].items():
        assert torch.equal(got["model"][k], v)
    assert load_checkpoint(path, None)["kind"] == "vqvae"
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]        # no tmp file left


def test_interrupted_save_keeps_old_file(tmp_path):
    path = save_checkpoint(_payload(0), tmp_path / "ckpt.pt")
    before = path.read_bytes()
    bad = _payload(1)
    bad["extra"] = _Unpicklable()
    with pytest.raises(RuntimeError, match="mid-save"):
        save_checkpoint(bad, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert load_checkpoint(path, "vqvae")["iter_num"] == 7


def test_wrong_version_kind_and_garbage_raise(tmp_path):
    path = save_checkpoint({**_payload(), "format_version": FORMAT_VERSION + 1}, tmp_path / "new.pt")
    with pytest.raises(ValueError, match="format_version") as e:
        load_checkpoint(path, "vqvae")
    assert str(path) in str(e.value)
    ok = save_checkpoint(_payload(), tmp_path / "ok.pt")
    with pytest.raises(ValueError, match="kind"):
        load_checkpoint(ok, "maskgan")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(junk, "vqvae")
    assert junk.read_bytes() == b"not a checkpoint"                      # never deleted
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", "vqvae")
    with pytest.raises(ValueError, match="kind"):
        save_checkpoint({"model": {}}, tmp_path / "nokind.pt")


def test_code_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format_version": FORMAT_VERSION, "kind": "vqvae", "x": _Evil()}, path)
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(path, "vqvae")


class _Evil:
    """A pickled object: weights_only loading must refuse it."""
