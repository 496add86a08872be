"""`tessera serve` as a real process: slow clients, authentication settings, access logs; CLI failures.

Every connection goes to 127.0.0.1 and a server this test started; loops are bounded and stop by themselves.
"""
import base64
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tessera.backend.app import create_app
from tessera.backend.settings import Settings
from tests.conftest import CONFIG_ALL, RecordingRunner, TesseraProcess, free_port

TESSERA = str(Path(sys.executable).with_name("tessera"))


def _env(tmp_path, **extra):
    return {"MODEL_DIR": str(tmp_path / "models"), "TESSERA_LOG_LEVEL": "INFO", **extra}


def _slow_client(port: int, stop: threading.Event, opened: list) -> None:
    """A POST whose body arrives one byte a second (bounded: at most 30 bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n")
        opened.append(1)
        for _ in range(30):
            if stop.wait(1.0):
                return
            try:
                s.sendall(b" ")
            except OSError:
                return


def test_health_answers_while_sixteen_clients_trickle_their_bodies(tmp_path):
    proc = TesseraProcess(_env(tmp_path), tmp_path / "serve.log").wait_up()
    stop, opened = threading.Event(), []
    clients = [threading.Thread(target=_slow_client, args=(proc.port, stop, opened), daemon=True) for _ in range(16)]
    try:
        for t in clients:
            t.start()
        deadline = time.time() + 5
        while len(opened) < 16 and time.time() < deadline:
            time.sleep(0.05)
        assert len(opened) == 16
        time.sleep(2.0)                              # every worker thread would now be stuck in a body read
        for _ in range(3):
            t0 = time.perf_counter()
            r = requests.get(proc.url + "/health", timeout=5)
            elapsed = time.perf_counter() - t0
            assert r.status_code == 200 and elapsed < 2.0, f"/health took {elapsed:.2f}s under slow clients"
            time.sleep(0.5)
    finally:
        stop.set()
        for t in clients:
            t.join(10)
        proc.stop()


def test_upstream_auth_names_are_honoured_and_the_access_log_has_no_credentials(tmp_path):
    user, password = "alice-the-annotator", "pw-\u00e9t\u00e9-7"
    proc = TesseraProcess(_env(tmp_path, BASIC_AUTH_USER=user, BASIC_AUTH_PASS=password),
                          tmp_path / "serve.log").wait_up()
    try:
        body = {"project": "3.1", "schema": CONFIG_ALL}
        assert requests.post(proc.url + "/setup", json=body, timeout=10).status_code == 401
        assert requests.post(proc.url + "/setup", json=body, auth=(user, "nope"), timeout=10).status_code == 401
        ok = requests.post(proc.url + "/setup", json=body, timeout=10, headers={
            "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()})
        assert ok.status_code == 200
        time.sleep(0.5)
        log = proc.log_text()
        assert '"POST /setup" 200' in log and '"POST /setup" 401' in log
        assert user not in log and password not in log
    finally:
        proc.stop()


@pytest.mark.parametrize("env", [{"TESSERA_BASIC_AUTH_USER": "u"}, {"BASIC_AUTH_PASS": "p"},
                                 {"BASIC_AUTH_USER": "u", "TESSERA_BASIC_AUTH_PASS": ""}])
def test_serve_refuses_to_start_with_half_the_credentials(tmp_path, env):
    clean = {k: v for k, v in os.environ.items() if "BASIC_AUTH" not in k}
    p = subprocess.run([TESSERA, "serve", "--host", "127.0.0.1", "--port", str(free_port())],
                       env={**clean, **_env(tmp_path), **env}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "BASIC_AUTH_USER" in p.stderr and "BASIC_AUTH_PASS" in p.stderr and "Traceback" not in p.stderr


def test_serve_with_two_worker_processes(tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([TESSERA, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
                             "--threads", "2"], env={**os.environ, **_env(tmp_path)}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, pids = time.time() + 60, set()
        while time.time() < deadline and len(pids) < 2:
            try:
                requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
            except requests.RequestException:
                time.sleep(0.3)
            pids = {line.split("pid ")[-1].rstrip(")") for line in (tmp_path / "serve.log").read_text().splitlines()
                    if "tessera serving on" in line}
        assert len(pids) == 2
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


# ----------------------------------------------------------------------------------------- basic auth

@pytest.mark.parametrize("raw", [b"\xc3\xa9l\xc3\xa8ve:pw", b"ls:\xff\xfe", "ls:pw-\u00e9".encode(), b"\xff:\xff",
                                 b"no-colon", b"", b"ls:pw:extra"])
def test_non_ascii_and_odd_credentials_are_a_401(settings, raw):
    s = Settings(model_dir=settings.model_dir, basic_auth_user="ls", basic_auth_pass="pw")
    c = create_app(s, runner=RecordingRunner()).test_client()
    for header in ("Basic " + base64.b64encode(raw).decode(), "Basic !!!", "Bearer x", "Basic \u00e9"):
        r = c.post("/setup", json={"project": "1.1", "schema": CONFIG_ALL}, headers={"Authorization": header})
        assert r.status_code == 401, (raw, header)


def test_non_ascii_credentials_that_match_are_accepted(settings):
    s = Settings(model_dir=settings.model_dir, basic_auth_user="l\u00e9a", basic_auth_pass="m\u00f8t-de-passe")
    c = create_app(s, runner=RecordingRunner()).test_client()
    hdr = {"Authorization": "Basic " + base64.b64encode("l\u00e9a:m\u00f8t-de-passe".encode()).decode()}
    assert c.post("/setup", json={"project": "1.1", "schema": CONFIG_ALL}, headers=hdr).status_code == 200


# ------------------------------------------------------------------------------------------ CLI

def _tiny_dataset(root: Path) -> Path:
    from tessera.model.data import make_nuclei

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, s in enumerate(make_nuclei(6, size=64, seed=1)):
        Image.fromarray(s.image).save(root / "images" / f"{i}.png")
        Image.fromarray(s.instances.astype(np.uint16)).save(root / "labels" / f"{i}.png")
    return root


def test_train_with_label_studio_unreachable_prints_one_line(tmp_path):
    env = {**os.environ, **_env(tmp_path), "LABEL_STUDIO_URL": f"http://127.0.0.1:{free_port()}",
           "LABEL_STUDIO_API_KEY": "k"}
    p = subprocess.run([TESSERA, "train", "--project", "3"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    line = [x for x in p.stderr.splitlines() if "tessera train failed" in x]
    assert len(line) == 1 and "LABEL_STUDIO_URL" in line[0]
    debug = subprocess.run([TESSERA, "train", "--project", "3"], env={**env, "TESSERA_LOG_LEVEL": "DEBUG"},
                           capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_train_on_a_full_disk_prints_one_line_and_keeps_the_store(tmp_path):
    data = _tiny_dataset(tmp_path / "data")

    def small_files():           # file writes past 64 kB fail (EFBIG), as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))

    p = subprocess.run([TESSERA, "train", "--data", str(data), "--iters", "2"], env={**os.environ, **_env(tmp_path)},
                       preexec_fn=small_files, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "tessera train failed" in p.stderr and "disk" in p.stderr and "served model is unchanged" in p.stderr
    versions = subprocess.run([TESSERA, "versions"], env={**os.environ, **_env(tmp_path)}, capture_output=True,
                              text=True, timeout=60)
    assert versions.returncode == 0 and "no versions" in versions.stdout


def test_serve_stops_on_sigterm(tmp_path):
    """Also as a container's PID 1, where a signal without a handler would be ignored."""
    proc = TesseraProcess(_env(tmp_path), tmp_path / "serve.log").wait_up()
    try:
        os.killpg(proc.proc.pid, signal.SIGTERM)
        assert proc.proc.wait(10) == 0
    finally:
        proc.stop()
