"""bench.common.code_changes: which model/ files' code changed since a result's commit (what decides whether a
benchmark may reuse that result's trained arms)."""
import subprocess

import pytest

from bench.common import code_changes

SOURCE = '''"""A module."""


def f(x):
    """Twice x."""
    return 2 * x  # doubled
'''


def git(repo, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "a.py").write_text(SOURCE)
    (tmp_path / "model" / "b.py").write_text("Y = 1\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "first")
    return tmp_path


def test_comments_and_docstrings_are_not_code_changes(repo):
    commit = git(repo, "rev-parse", "HEAD")
    edited = SOURCE.replace("Twice x.", "Twice x, measured.").replace("# doubled", "# doubled, see HISTORY")
    body = edited.split("\n", 1)[1]
    (repo / "model" / "a.py").write_text('"""Another module docstring."""\n# a new comment\n' + body)
    assert code_changes(commit, "model", repo) == []


def test_code_edits_and_deleted_files_are(repo):
    commit = git(repo, "rev-parse", "HEAD")
    (repo / "model" / "a.py").write_text(SOURCE.replace("2 * x", "3 * x"))
    (repo / "model" / "b.py").unlink()
    assert code_changes(commit, "model", repo) == ["model/a.py", "model/b.py"]
    with pytest.raises(SystemExit, match="0000000"):
        code_changes("0000000", "model", repo)
