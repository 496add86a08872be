"""Run a REAL Label Studio (1.23.2) for tests and for the demo.

No pytest dependency here (the fixtures live in ``tests/conftest_ls.py``); stdlib + ``httpx`` (and the
torch-free ``model/lockfile.py``) only; ``client()`` is label-studio-sdk's client (``backend/lsclient.py``).

A fresh Label Studio data dir costs ~70 s of migrations, so a data-dir TEMPLATE is made once with
``label-studio init`` (user, password, 40-hex user token, legacy API tokens enabled) and cached per
label-studio version; every server then starts from a copy of it in a few seconds::

    from tessera.backend.lsserver import LabelStudioServer, build_template, default_ls_venv, default_template_dir

    with LabelStudioServer(default_ls_venv(), "/tmp/ls-data") as ls:      # builds the template if needed
        ls_sdk = ls.client()
        project = ls_sdk.projects.create(title="Demo", label_config="<View>...</View>")
        print(ls.url, ls.username, ls.password)

Environment:
    TESSERA_LS_VENV      venv with label-studio installed (default ``<repo>/.venv-ls``)
    TESSERA_LS_TEMPLATE  template cache directory (default ``<repo>/.cache/ls-template``)

POSIX only (process groups, ``fcntl`` lock).
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import httpx

from tessera.backend.settings import Settings
from tessera.model.lockfile import file_lock

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_USERNAME = "admin@example.com"
TEMPLATE_META = "tessera-ls-template.json"  # written last inside a template: its presence = complete
SERVER_META = ".tessera-ls.json"  # credentials, copied into every data dir made from a template
_PRIVATE_NAMES = {SERVER_META, ".xdg", "label-studio.log"}  # ours, ignored when deciding "empty"
# Environment variables passed through to Label Studio. Everything else is dropped on purpose:
# LS reads bare names too (get_env("PORT") checks LABEL_STUDIO_PORT, HEARTEX_PORT and PORT; USERNAME,
# PASSWORD, HOST, DEBUG likewise), and a backend's PYTHONPATH must not leak into LS's interpreter.
_PASSTHROUGH_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


class LabelStudioError(RuntimeError):
    """Label Studio could not be installed-checked, initialised or started."""


# --------------------------------------------------------------------------------------------------
# locations and versions


def default_ls_venv() -> Path:
    return Path(Settings.from_env().ls_venv or REPO_ROOT / ".venv-ls")


def default_template_dir() -> Path:
    return Path(Settings.from_env().ls_template or REPO_ROOT / ".cache" / "ls-template")


def ls_executable(ls_venv: Path) -> Path:
    exe = Path(ls_venv) / "bin" / "label-studio"
    if not exe.exists():
        raise LabelStudioError(
            f"{exe} not found. Create the Label Studio venv with:\n"
            f"    python3.11 -m venv {ls_venv} && {ls_venv}/bin/pip install label-studio==1.23.2\n"
            "(or point TESSERA_LS_VENV at an existing one)."
        )
    return exe


def ls_version(ls_venv: Path) -> str:
    """Installed label-studio version, read from its dist-info (never run ``label-studio --version``:
    it starts a server)."""
    found = sorted(Path(ls_venv).glob("lib/python3*/site-packages/label_studio-*.dist-info/METADATA"))
    for meta in found:
        for line in meta.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    out = subprocess.run(
        [str(Path(ls_venv) / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('label-studio'))"],
        capture_output=True, text=True, timeout=60,
    )
    if out.returncode != 0 or not out.stdout.strip():
        raise LabelStudioError(f"label-studio is not installed in {ls_venv}: {out.stderr[-1000:]}")
    return out.stdout.strip()


def ls_environment(data_dir: Path, xdg_root: Path, ls_venv: Path,
                   extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment Label Studio runs with (see shared/LABEL_STUDIO.md)."""
    env = {k: os.environ[k] for k in _PASSTHROUGH_ENV if k in os.environ}
    home = xdg_root / "home"
    for d in (home, xdg_root / "config", xdg_root / "data", xdg_root / "cache"):
        d.mkdir(parents=True, exist_ok=True)
    env.update({
        "PATH": f"{Path(ls_venv) / 'bin'}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(home),  # nothing may land in the real ~
        "XDG_CONFIG_HOME": str(xdg_root / "config"),
        "XDG_DATA_HOME": str(xdg_root / "data"),
        "XDG_CACHE_HOME": str(xdg_root / "cache"),
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",  # allow an ML backend on 127.0.0.1
        "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",  # else no ML webhook to 127.0.0.1
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "PYTHONUNBUFFERED": "1",
    })
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def _tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        return f"<no log: {e}>"
    return "\n".join(lines[-n:])


# --------------------------------------------------------------------------------------------------
# template


@dataclass(frozen=True)
class LSTemplate:
    path: Path  # the template directory (holds data/ and the meta file)
    version: str
    username: str
    password: str
    token: str  # legacy API token (40 hex chars)
    build_seconds: float

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    def credentials(self) -> dict[str, str]:
        return {"username": self.username, "password": self.password, "token": self.token,
                "version": self.version}

    @classmethod
    def load(cls, path: Path) -> "LSTemplate":
        meta = json.loads((path / TEMPLATE_META).read_text())
        return cls(path=path, version=meta["version"], username=meta["username"],
                   password=meta["password"], token=meta["token"],
                   build_seconds=float(meta.get("build_seconds", 0.0)))


def build_template(ls_venv: Path | None = None, template_dir: Path | None = None, *,
                   username: str = DEFAULT_USERNAME, timeout: float = 900.0) -> LSTemplate:
    """Make (once) and return the data-dir template for the label-studio version in ``ls_venv``.

    ``template_dir`` is the cache root; the template itself is ``<template_dir>/ls-<version>``.
    Idempotent and safe under concurrency: an exclusive file lock per version, the build goes into a
    temporary directory that is renamed into place only when complete. A second caller waits for the
    first and then reuses its result. Credentials (random password, random 40-hex token) are stored
    in the template's meta file.
    """
    ls_venv = Path(ls_venv or default_ls_venv()).absolute()
    template_dir = Path(template_dir or default_template_dir()).absolute()
    exe = ls_executable(ls_venv)
    version = ls_version(ls_venv)
    final = template_dir / f"ls-{version}"
    if (final / TEMPLATE_META).exists():
        return LSTemplate.load(final)

    with file_lock(template_dir / f".ls-{version}.lock"):
        if (final / TEMPLATE_META).exists():  # someone else built it while we waited
            return LSTemplate.load(final)
        if final.exists():  # incomplete leftover (should not happen: we rename complete dirs only)
            shutil.rmtree(final)
        for stale in template_dir.glob(f".tmp-ls-{version}-*"):  # crashed earlier builds
            shutil.rmtree(stale, ignore_errors=True)

        tmp = template_dir / f".tmp-ls-{version}-{os.getpid()}"
        data = tmp / "data"
        data.mkdir(parents=True)
        password = "pw" + secrets.token_urlsafe(12)   # never starts with "-" (argparse would take it for a flag)
        token = secrets.token_hex(20)  # 40 hex chars
        log = tmp / "init.log"
        env = ls_environment(data, tmp / "xdg", ls_venv)
        cmd = [str(exe), "init", "--data-dir", str(data), f"--username={username}", f"--password={password}",
               f"--user-token={token}", "--enable-legacy-api-token", "--quiet", "--no-browser"]
        t0 = time.monotonic()
        try:
            with open(log, "wb") as out:
                proc = subprocess.run(cmd, env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            tail = _tail(log)
            shutil.rmtree(tmp, ignore_errors=True)
            raise LabelStudioError(f"`label-studio init` took more than {timeout:.0f} s:\n{tail}") from e
        seconds = time.monotonic() - t0
        if proc.returncode != 0 or not (data / "label_studio.sqlite3").exists():
            tail = _tail(log)
            shutil.rmtree(tmp, ignore_errors=True)
            raise LabelStudioError(f"`label-studio init` failed (exit {proc.returncode}):\n{tail}")

        shutil.rmtree(tmp / "xdg", ignore_errors=True)
        meta = {"version": version, "username": username, "password": password, "token": token,
                "build_seconds": round(seconds, 1), "built_at": time.time()}
        (tmp / TEMPLATE_META).write_text(json.dumps(meta, indent=2))
        os.chmod(tmp / TEMPLATE_META, 0o600)
        os.rename(tmp, final)  # atomic on one filesystem
        return LSTemplate.load(final)


# --------------------------------------------------------------------------------------------------
# server


def port_in_use(port: int) -> bool:
    # LS's own check connects to ("localhost", port); test 127.0.0.1 and ::1 alike
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                if s.connect_ex((host, port)) == 0:
                    return True
        except OSError:
            pass
    return False


def free_port() -> int:
    """A port nothing listens on (LS silently moves to port+1 when the one it is given is busy)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not port_in_use(port) and not port_in_use(port + 1):
            return port
    raise LabelStudioError("no free TCP port found")


class LabelStudioServer:
    """One Label Studio process on 127.0.0.1 with its own data dir. Use as a context manager, or
    ``start()`` / ``stop()``. The data dir is filled from the template when it is empty; a data dir that
    already holds a database (a previous run) is reused as it is."""

    def __init__(self, ls_venv: Path | str | None = None, data_dir: Path | str = "", port: int | None = None,
                 env_extra: Mapping[str, str] | None = None, template: LSTemplate | None = None,
                 template_dir: Path | None = None, log_path: Path | None = None):
        if not data_dir:
            raise ValueError("data_dir is required")
        self.ls_venv = Path(ls_venv or default_ls_venv()).absolute()
        self.data_dir = Path(data_dir).absolute()
        self.requested_port = port
        self.port: int | None = None
        self.env_extra = dict(env_extra or {})
        self.template = template
        self.template_dir = template_dir
        self.log_path = Path(log_path) if log_path else self.data_dir / "label-studio.log"
        self.proc: subprocess.Popen | None = None
        self._creds: dict[str, str] = {}
        self.start_seconds: float | None = None

    # -- credentials / addresses
    @property
    def url(self) -> str:
        if self.port is None:
            raise LabelStudioError("server not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        """The LEGACY API token (``Authorization: Token <token>``); LS also hands it to ML backends."""
        return self._creds["token"]

    @property
    def username(self) -> str:
        return self._creds["username"]

    @property
    def password(self) -> str:
        return self._creds["password"]

    def client(self, timeout: float = 60.0):
        """label-studio-sdk's client for this server, with the legacy token (backend/lsclient.py)."""
        from tessera.backend.lsclient import connect

        return connect(self.url, self.token, timeout=timeout)

    # -- lifecycle
    def _prepare_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        meta = self.data_dir / SERVER_META
        if (self.data_dir / "label_studio.sqlite3").exists():
            if not meta.exists():
                raise LabelStudioError(f"{self.data_dir} holds a Label Studio database not made from a "
                                       "Tessera template (no credentials file): use an empty directory")
        else:
            leftovers = [p.name for p in self.data_dir.iterdir() if p.name not in _PRIVATE_NAMES]
            if leftovers:
                raise LabelStudioError(f"{self.data_dir} is neither empty nor a Label Studio data dir: "
                                       f"{sorted(leftovers)[:10]}")
            template = self.template or build_template(self.ls_venv, self.template_dir)
            shutil.copytree(template.data_dir, self.data_dir, dirs_exist_ok=True, symlinks=True)
            meta.write_text(json.dumps(template.credentials(), indent=2))
            os.chmod(meta, 0o600)
        self._creds = json.loads(meta.read_text())

    def start(self, timeout: float = 180.0) -> "LabelStudioServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        exe = ls_executable(self.ls_venv)
        self._prepare_data_dir()
        attempts = 1 if self.requested_port else 3
        last: Exception | None = None
        for _ in range(attempts):
            port = self.requested_port or free_port()
            if port_in_use(port):
                raise LabelStudioError(f"port {port} is busy (LS would silently move to {port + 1})")
            try:
                self._start_once(exe, port, timeout)
                return self
            except _PortMoved as e:  # lost a race for the port: try another one
                last = e
        raise LabelStudioError(str(last))

    def _start_once(self, exe: Path, port: int, timeout: float) -> None:
        env = ls_environment(self.data_dir, self.data_dir / ".xdg", self.ls_venv, self.env_extra)
        cmd = [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(port)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        log.write(f"\n==== tessera: {' '.join(cmd)} ====\n".encode())
        log.flush()
        t0 = time.monotonic()
        try:
            self.proc = subprocess.Popen(cmd, env=env, cwd=self.data_dir, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)  # own process group for killpg
        finally:
            log.close()
        self.port = port
        atexit.register(self.stop)
        deadline = t0 + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                self.port = None
                raise LabelStudioError(f"Label Studio exited early (code {code}); log "
                                       f"{self.log_path}:\n{_tail(self.log_path)}")
            moved = self._moved_port(port)
            if moved:
                self.stop()
                raise _PortMoved(f"port {port} was taken meanwhile; LS moved to {moved}")
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                if r.status_code == 200 and r.json().get("status") == "UP":
                    if self._moved_port(port):  # our port answered but it is not our LS
                        continue
                    self.start_seconds = time.monotonic() - t0
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                tail = _tail(self.log_path)
                self.stop()
                raise LabelStudioError(f"Label Studio not healthy on port {port} after {timeout:.0f} s; "
                                       f"log {self.log_path}:\n{tail}")
            time.sleep(0.25)

    def _moved_port(self, port: int) -> int | None:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        text = text.rsplit("==== tessera:", 1)[-1]
        if f"Port {port} is in use" in text:
            marker = "Trying to start at "
            tail = text.split(marker, 1)[1] if marker in text else ""
            digits = "".join(ch for ch in tail[:8] if ch.isdigit())
            return int(digits) if digits else port + 1
        return None

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        atexit.unregister(self.stop)
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "LabelStudioServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LabelStudioServer(url={self.url if self.port else None!r}, data_dir={str(self.data_dir)!r})"


class _PortMoved(LabelStudioError):
    pass


__all__ = [
    "LSTemplate", "LabelStudioError", "LabelStudioServer", "build_template",
    "default_ls_venv", "default_template_dir", "free_port", "ls_environment", "ls_version",
]

if __name__ == "__main__":  # python -m tessera.backend.lsserver [DATA_DIR]: build the template, run LS until Ctrl-C
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="Run a real Label Studio from the cached template.")
    ap.add_argument("data_dir", nargs="?", help="data dir (default: a new temporary one)")
    ap.add_argument("--port", type=int)
    args = ap.parse_args()
    t0 = time.monotonic()
    tpl = build_template()
    print(f"template {tpl.path} (built in {tpl.build_seconds} s; ready in {time.monotonic() - t0:.1f} s)")
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="tessera-ls-")
    with LabelStudioServer(data_dir=data_dir, port=args.port, template=tpl) as ls:
        print(f"Label Studio {tpl.version} at {ls.url} (started in {ls.start_seconds:.1f} s)\n"
              f"  user {ls.username} / {ls.password}\n  legacy token {ls.token}\n  data {ls.data_dir}\n"
              f"  log {ls.log_path}\nCtrl-C to stop.")
        try:
            while ls.running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
