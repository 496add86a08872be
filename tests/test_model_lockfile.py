"""model/lockfile.py: the one flock helper of the registry, the job runner, the LS template and the demo."""
import subprocess
import sys

import pytest

from tessera.backend import demo, jobs, lsserver
from tessera.model import registry
from tessera.model.lockfile import file_lock


def test_every_lock_is_the_one_helper():
    assert jobs.file_lock is lsserver.file_lock is registry.file_lock is demo.file_lock is file_lock


def test_a_held_lock_excludes_other_processes_and_is_freed_on_exit(tmp_path):
    path = tmp_path / "sub" / "x.lock"
    probe = [sys.executable, "-c", "import sys; from pathlib import Path; from model.lockfile import file_lock\n"
             "try:\n with file_lock(Path(sys.argv[1]), blocking=False): print('got')\n"
             "except BlockingIOError: print('busy')", str(path)]
    with file_lock(path):
        assert subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip() == "busy"
        with pytest.raises(BlockingIOError):            # another open file in this process: excluded too
            with file_lock(path, blocking=False):
                pass
    assert subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip() == "got"

