"""Configuration in one place (backend/settings.py), and the web stack it runs on."""
import io
import logging
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.version import Version

from tessera.backend.cli import ProgressBars
from tessera.backend.settings import ENV_VARS, Settings, apply_thread_policy, env_names

REPO = Path(__file__).resolve().parents[1]
KEY, PASSWORD = "0123456789abcdef0123456789abcdef01234567", "pw-never-printed"


@pytest.fixture
def clean_env(monkeypatch):
    """No Tessera or upstream variable from the shell."""
    for name in {n for field in Settings.model_fields for n in env_names(field)}:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("name,value", [("TESSERA_PREDICT_BATCH", "sixteen"), ("TESSERA_PREDICT_BATCH", "0"),
                                        ("TESSERA_DEVICE", "gpu"), ("TESSERA_DEVICE", "cuda:x"),
                                        ("TESSERA_DEBOUNCE_S", "nan"), ("TESSERA_MAX_PIXELS", "1e9"),
                                        ("TESSERA_LOG_LEVEL", "loud"), ("LOG_LEVEL", "loud"),
                                        ("LABEL_STUDIO_URL", "http://127.0.0.1:1\\@ls:8080"),
                                        ("TESSERA_ALLOWED_HOSTS", "ls:8080,u@evil"),
                                        ("TESSERA_EXCLUDE_SYNTHETIC", "maybe"), ("PORT", "http"),
                                        ("WORKERS", "0"), ("OMP_WAIT_POLICY", "spin"),
                                        ("TESSERA_MIN_REGION_SCORE", "2")])
def test_a_bad_setting_names_its_variable(clean_env, name, value):
    clean_env.setenv(name, value)
    with pytest.raises(ValueError) as e:
        Settings.from_env()
    shown = name if name != "LOG_LEVEL" else "TESSERA_LOG_LEVEL"
    assert shown in str(e.value) and "is not valid" in str(e.value)


def test_the_refusal_says_what_is_valid(clean_env):
    clean_env.setenv("TESSERA_DEVICE", "gpu")
    with pytest.raises(ValueError, match=r"TESSERA_DEVICE='gpu' is not valid: expected auto, cpu, cuda or cuda:N"):
        Settings.from_env()
    clean_env.setenv("TESSERA_DEVICE", "cpu")
    clean_env.setenv("TESSERA_PREDICT_BATCH", "sixteen")
    with pytest.raises(ValueError, match=r"TESSERA_PREDICT_BATCH='sixteen' is not valid: .*valid integer"):
        Settings.from_env()


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "CUDA:0"])
def test_devices_that_are_accepted(clean_env, device):
    clean_env.setenv("TESSERA_DEVICE", device)
    assert Settings.from_env().device == device.lower()


def test_upstream_names_are_aliases_and_tessera_names_win(clean_env):
    clean_env.setenv("BASIC_AUTH_USER", "up")
    clean_env.setenv("BASIC_AUTH_PASS", "pw")
    clean_env.setenv("LOG_LEVEL", "warning")
    clean_env.setenv("LABEL_STUDIO_ACCESS_TOKEN", "upstream-token")
    s = Settings.from_env()
    assert (s.basic_auth_user, s.basic_auth_pass.get_secret_value(), s.log_level, s.basic_auth) == \
        ("up", "pw", "WARNING", True)
    assert s.label_studio_api_key == "upstream-token"
    clean_env.setenv("TESSERA_BASIC_AUTH_USER", "mine")
    clean_env.setenv("TESSERA_BASIC_AUTH_PASS", "secret")
    clean_env.setenv("LABEL_STUDIO_API_KEY", "tessera-name")
    s = Settings.from_env()
    assert (s.basic_auth_user, s.basic_auth_pass.get_secret_value(), s.label_studio_api_key) == \
        ("mine", "secret", "tessera-name")


def test_every_former_variable_is_still_read(clean_env):
    values = {"MODEL_DIR": "/tmp/m", "TESSERA_MAX_SIDE": "512", "PORT": "9191", "WORKERS": "3", "THREADS": "5",
              "TESSERA_LS_VENV": "/opt/ls", "TESSERA_LS_TEMPLATE": "/opt/tpl", "TESSERA_DEMO_ITERS": "7",
              "TESSERA_DEMO_GAN_S": "1.5", "TESSERA_ALLOWED_HOSTS": "ls:8080, Media", "TESSERA_EXCLUDE_SYNTHETIC": "yes",
              "TESSERA_MIN_REGION_SCORE": "", "OMP_WAIT_POLICY": "active"}
    for k, v in values.items():
        clean_env.setenv(k, v)
    s = Settings.from_env()
    assert (s.model_dir, s.max_side, s.port, s.workers, s.threads) == (Path("/tmp/m"), 512, 9191, 3, 5)
    assert (s.ls_venv, s.ls_template, s.demo_iters, s.demo_gan_s) == (Path("/opt/ls"), Path("/opt/tpl"), 7, 1.5)
    assert s.allowed_hosts == ("ls:8080", "media") and s.exclude_synthetic is True
    assert s.min_region_score is None and s.omp_wait_policy == "ACTIVE"


def test_explicit_settings_never_read_the_environment(clean_env):
    clean_env.setenv("TESSERA_PREDICT_BATCH", "3")
    clean_env.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:9")
    s = Settings(model_dir=Path("m"))
    assert (s.predict_batch, s.label_studio_url) == (16, "")
    assert Settings.from_env().predict_batch == 3


def test_replace_validates_like_the_original():
    s = Settings(label_studio_api_key=KEY)
    t = s.replace(model_dir="elsewhere", label_studio_api_key="new-key")
    assert (t.model_dir, t.label_studio_api_key, s.label_studio_api_key) == (Path("elsewhere"), "new-key", KEY)
    with pytest.raises(ValueError):
        s.replace(device="gpu")
    with pytest.raises(ValueError):
        s.replace(predict_bathc=3)                     # a typo is an error, not a silent new field
    with pytest.raises(ValueError, match="BASIC_AUTH_PASS"):
        s.replace(basic_auth_user="only-half")


def test_secrets_never_print(caplog, settings):
    s = settings.replace(label_studio_api_key=KEY, basic_auth_user="ls", basic_auth_pass=PASSWORD,
                         redis_url=f"redis://:{PASSWORD}@127.0.0.1:1/0")
    with caplog.at_level(logging.INFO):
        logging.getLogger("tessera.test").info("settings: %s %r", s, s)
    shown = [repr(s), str(s), f"{s}", s.model_dump_json(), str(s.model_dump()), caplog.text]
    for text in shown:
        assert KEY not in text and PASSWORD not in text, text[:200]
    assert s.label_studio_api_key == KEY and s.basic_auth_pass.get_secret_value() == PASSWORD


def test_status_and_health_carry_no_secret(settings):
    from tessera.backend.app import create_app
    from tests.conftest import RecordingRunner

    s = settings.replace(label_studio_api_key=KEY, redis_url=f"redis://:{PASSWORD}@127.0.0.1:1/0")
    c = create_app(s, runner=RecordingRunner()).test_client()
    for path in ("/status?project=7", "/health", "/versions"):
        body = c.get(path).get_data(as_text=True)
        assert KEY not in body and PASSWORD not in body


def test_configuration_table_lists_every_variable():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("## Security")]
    missing = [name for name in ENV_VARS if f"`{name}`" not in table]
    assert not missing, f"README's configuration table lacks {missing}"


def test_thread_policy_is_set_from_settings(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    apply_thread_policy(Settings())
    import os
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


# ------------------------------------------------------------------------------------------ progress bars

class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_are_quiet_off_a_terminal():
    """No bar, no carriage returns: one line per counted phase when it ends."""
    out = io.StringIO()
    bars = ProgressBars(out)
    for i in range(1, 6):
        bars({"phase": "train", "iter": i, "max_iters": 5, "loss": 0.5, "eta_s": 1.0})
    bars({"phase": "compare"})
    for i in range(1, 5):
        bars({"phase": "predict", "iter": i, "max_iters": 4})
    bars({"phase": "done", "iter": 1, "max_iters": 1})
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 2
    assert lines[0].startswith("train: 5/5 it in ") and lines[1].startswith("predict: 4/4 tasks in ")


def test_progress_bars_follow_the_progress_dicts_on_a_terminal():
    out = _Terminal()
    bars = ProgressBars(out)
    bars({"phase": "fetch", "iter": 2, "max_iters": 4})
    bars({"phase": "train", "iter": 30, "max_iters": 60, "loss": 0.25, "eta_s": 3.0})
    bars({"phase": "done", "iter": 1, "max_iters": 1})
    text = out.getvalue()
    assert "fetch" in text and "2/4" in text and "train" in text and "30/60" in text and "loss=0.2500" in text
    assert bars.bar is None


# ------------------------------------------------------------------------------------------ the web stack

# the first releases without the published CVEs: Werkzeug 3.1.9 (GHSA-g6x2-hccm-hh4m; before it 3.0.6:
# CVE-2024-49767 multipart memory, 3.0.3: CVE-2024-34069 debugger, 2.2.3: CVE-2023-25577 multipart DoS and
# CVE-2023-23934 cookies), Flask 3.1.3 (CVE-2026-27205 Vary: Cookie; 3.1.1: CVE-2025-47278; 2.3.2: CVE-2023-30861)
SAFE = {"flask": "3.1.3", "werkzeug": "3.1.9"}


@pytest.mark.parametrize("name", sorted(SAFE))
def test_web_stack_is_past_the_published_cves(name):
    assert Version(metadata.version(name)) >= Version(SAFE[name]), f"{name} {metadata.version(name)} installed"


def test_label_studio_ml_is_neither_installed_nor_imported():
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("label-studio-ml")
    uses = re.compile(r"^\s*(from|import)\s+label_studio_ml\b|^\s*label[-_]studio[-_]ml\s*[=<>~!]|"
                      r"\blabel_studio_ml\.", re.M)
    files = [REPO / "setup.cfg"] + [p for folder in ("backend", "model", "tests", "bench", "docker")
                                    for p in (REPO / folder).rglob("*") if p.is_file()
                                    and (p.suffix in (".py", ".sh", ".txt") or p.name == "Dockerfile")]
    offenders = [str(p.relative_to(REPO)) for p in files if p != Path(__file__) and uses.search(_code(p))]
    assert not offenders, offenders


def _code(path: Path) -> str:
    """The file without comments (they may name label-studio-ml to say why it is not used)."""
    return "\n".join(line.split("#", 1)[0] for line in path.read_text(errors="replace").splitlines())


def test_pip_check_is_clean():
    p = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


# A thread that allocates and frees tensor-sized buffers, as a network pass does; prints the minor page
# faults of its last rounds (the first rounds grow the heap, which faults under any policy).
_FAULTS = """
import resource, sys, threading
import numpy as np
from tessera.backend.settings import Settings, apply_memory_policy
print(apply_memory_policy(Settings.from_env()))
out = []
def work():
    def one_round():
        bufs = [np.ones((3, 16, 312, 424), np.uint16) for _ in range(4)]   # 12.7 MB each, pages written
        bufs += [np.ones((3, 32, 156, 212), np.uint16) for _ in range(4)]
        del bufs
    for _ in range(3):
        one_round()
    f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(5):
        one_round()
    out.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0) / 5)
t = threading.Thread(target=work)
t.start(); t.join()
print(out[0])
"""


def _with_policy(script: str, keep_mb: str, arenas: str) -> subprocess.CompletedProcess:
    """`script` run in a fresh interpreter whose settings ask for this memory policy."""
    env = {**os.environ, "TESSERA_MALLOC_KEEP_MB": keep_mb, "TESSERA_MALLOC_ARENAS": arenas}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)


def _faults_per_round(keep_mb: str) -> tuple[str, float]:
    applied, faults = _with_policy(_FAULTS, keep_mb, "0").stdout.split()
    return applied, float(faults)


def test_memory_policy_keeps_freed_memory_for_the_next_pass():
    """With glibc's defaults every round of allocations takes its pages from the OS again (thousands of page
    faults); with the policy the freed memory is reused and the rounds after the first fault almost never."""
    applied, default = _faults_per_round("0")
    assert applied == "False" and default > 1000
    applied, kept = _faults_per_round("256")
    assert applied == "True" and kept < default / 20


# Eight threads, alive together, taking turns to allocate and free tensor-sized buffers (as the request,
# finishing and download threads do); then glibc's own count of its arenas (malloc_stats(3) writes one
# "Arena N:" block per arena to stderr) and the resident memory still held once every buffer is freed.
_ARENAS = """
import ctypes, threading
import numpy as np
from tessera.backend.settings import Settings, apply_memory_policy
print(apply_memory_policy(Settings.from_env()))
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20
start, barrier, turn = rss_mb(), threading.Barrier(8), threading.Lock()
def work():
    small = np.ones(4096)                   # every thread takes its arena while all are alive
    barrier.wait()
    with turn:                              # then they work one at a time, as a request's stages take turns
        bufs = [np.ones((16, 312, 424), np.float32) for _ in range(4)]     # 8.5 MB each, pages written
        del bufs
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(rss_mb() - start, flush=True)
ctypes.CDLL(None).malloc_stats()
"""


def _arenas(arenas: str) -> tuple[str, float, int]:
    out = _with_policy(_ARENAS, "256", arenas)
    applied, held = out.stdout.split()
    return applied, float(held), out.stderr.count("Arena ")


def test_memory_policy_caps_the_arenas_that_keep_freed_memory():
    """glibc gives each thread that allocates an arena of its own, and each arena keeps what it freed: eight
    threads that took turns leave eight times one turn's buffers resident. With TESSERA_MALLOC_ARENAS the
    threads share the capped arenas, and what stays resident is what those few keep."""
    applied, held_default, n_default = _arenas("0")
    assert applied == "True" and n_default >= 8, n_default         # (2 cores: glibc allows 16)
    applied, held_capped, n_capped = _arenas("2")
    assert applied == "True" and n_capped == 2, n_capped
    assert held_default > 200 and held_capped < held_default / 2, (held_default, held_capped)
