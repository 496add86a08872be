"""docker/: the compose file, the Dockerfile, the entrypoint and the health check, checked by reading and by
running the entrypoint with a stand-in `tessera` and with the real CLI (`python -m tessera.backend.cli`). The image
itself is built and run by tests/test_docker_image.py."""

from __future__ import annotations

import configparser
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
ENTRYPOINT = DOCKER / "entrypoint.sh"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERIGNORE = REPO / ".dockerignore"
REQUIREMENTS = DOCKER / "requirements.txt"
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?+]([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"bad line in .env.example: {line!r}"
            out[key.strip()] = value.strip()
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def json_or_shell(args: str) -> list[str]:
    args = args.strip()
    if args.startswith("["):
        return yaml.safe_load(args)  # JSON form
    return shlex.split(args)


# ------------------------------------------------------------------------------------------------ compose


def test_compose_services(compose):
    services = compose["services"]
    assert set(services) == {"label-studio", "tessera", "worker", "redis"}
    assert services["label-studio"]["image"] == "heartexlabs/label-studio:1.23.2"
    assert services["redis"]["image"].startswith("redis:7")
    # tessera and worker: one image, one model store
    for name in ("tessera", "worker"):
        svc = services[name]
        assert svc["image"] == services["tessera"]["image"]
        assert "models:/data/models" in svc["volumes"]
        assert svc["environment"]["MODEL_DIR"] == "/data/models"
        assert svc["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert svc["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc["security_opt"]
    assert services["tessera"]["command"] == ["serve"]
    assert services["worker"]["command"] == ["worker"]
    # the image's health check follows the role (docker/healthcheck.py): nothing to override for the worker
    assert "healthcheck" not in services["worker"] and "healthcheck" not in services["tessera"]
    assert set(compose["volumes"]) >= {"ls-data", "models"}
    assert "ls-data:/label-studio/data" in services["label-studio"]["volumes"]


def test_build_context_and_files_exist(compose):
    for name, svc in compose["services"].items():
        if "build" not in svc:
            continue
        context = (COMPOSE.parent / svc["build"]["context"]).resolve()
        assert context == REPO, f"{name}: build context must be the repository root"
        dockerfile = context / svc["build"]["dockerfile"]
        assert dockerfile.resolve() == DOCKERFILE.resolve()
    # every COPY source exists in the context (a [..] pattern may match nothing: README.m[d])
    for word, args in dockerfile_instructions():
        if word != "COPY":
            continue
        parts = [p for p in json_or_shell(args) if not p.startswith("--")]
        for src in parts[:-1]:
            if "[" in src or "*" in src:
                continue
            assert (REPO / src).exists(), f"COPY source {src} missing"
    assert ENTRYPOINT.exists() and ENTRYPOINT.read_text().startswith("#!/usr/bin/env bash")
    assert os.access(ENTRYPOINT, os.X_OK), "docker/entrypoint.sh must be executable (git keeps the bit)"


def test_dockerignore_keeps_what_the_image_copies_or_mounts():
    keep = {line[1:].rstrip("/") for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")}
    assert "**" in DOCKERIGNORE.read_text().splitlines(), "exclude everything, then re-include"
    for word, args in dockerfile_instructions():
        if word == "COPY" and "--from=" not in args:
            for src in [p for p in json_or_shell(args) if not p.startswith("--")][:-1]:
                assert src.replace("README.m[d]", "README.md").rstrip("/") in keep, src
        for source in re.findall(r"--mount=type=bind,source=([^,\s]+)", args):
            assert source in keep, f"bind-mounted {source} is not in the build context"
            assert (REPO / source).is_dir(), f"{source} must exist in a fresh clone (keep its .gitignore)"


def test_every_compose_variable_is_documented(env_example):
    text = COMPOSE.read_text()
    used = {m.group(1): m.group(2) for m in VAR.finditer(text)}
    assert used, "compose uses no variables?"
    missing = sorted(set(used) - set(env_example))
    assert not missing, f"not in docker/.env.example: {missing}"
    # the compose defaults and the example agree, so an unedited copy changes nothing
    for name, default in used.items():
        if default is not None:
            assert env_example[name] == default, f"{name}: compose default {default!r} != .env.example"


def test_backend_env_matches_settings(compose):
    from tessera.backend.settings import ENV_VARS

    env = compose["services"]["tessera"]["environment"]
    unknown = sorted(set(env) - set(ENV_VARS) - {"PORT", "WORKERS", "THREADS"})
    assert not unknown, f"compose sets variables the backend does not read: {unknown}"
    for name, value in env.items():
        m = VAR.fullmatch(str(value))
        if m and m.group(1) == name and name in ENV_VARS and ENV_VARS[name][0]:
            assert m.group(2) == ENV_VARS[name][0], f"{name}: compose default differs from backend.settings"


def test_label_studio_reaches_tessera_by_service_name(compose):
    services = compose["services"]
    ls_env = services["label-studio"]["environment"]
    tessera_env = services["tessera"]["environment"]
    assert tessera_env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    assert "label-studio" in tessera_env["TESSERA_ALLOWED_HOSTS"].split(",")
    # one token: what LS creates for its admin is what the backend sends
    assert tessera_env["LABEL_STUDIO_API_KEY"] == ls_env["LABEL_STUDIO_USER_TOKEN"]
    assert ls_env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    # `tessera` resolves to a private compose-network address, which LS's SSRF guards would refuse
    assert ls_env["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false"
    assert ls_env["LABEL_STUDIO_SSRF_PROTECTION_ENABLED"] == "false"
    # no call to the package index at start-up (the demo sets the same)
    assert ls_env["LABEL_STUDIO_LATEST_VERSION_CHECK"] == "false"
    # the URL to enter in LS is documented, and no service is told to find another at localhost
    assert "http://tessera:9090" in COMPOSE.read_text()
    for name, svc in services.items():
        for key, value in (svc.get("environment") or {}).items():
            assert not re.search(r"(localhost|127\.0\.0\.1)", str(value)), f"{name}.{key}={value}"
    # all on the default network (no service opts out)
    assert not any("network_mode" in svc for svc in services.values())


# ------------------------------------------------------------------------------------------------ Dockerfile


def test_dockerfile():
    text = DOCKERFILE.read_text()
    assert "# syntax=" not in text, "a syntax line makes BuildKit pull a frontend image first"
    ins = dockerfile_instructions()
    words = [w for w, _ in ins]
    assert ins[0] == ("FROM", "python:3.11-slim") and words.count("FROM") == 1
    # torch: pinned, from a source given as a build argument whose default is the PyTorch CPU index
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    assert yaml.safe_load(args["TORCH_PIP_ARGS"]) == "--index-url https://download.pytorch.org/whl/cpu"
    runs = [a for w, a in ins if w == "RUN"]
    assert any(re.search(r"install --no-compile \$TORCH_PIP_ARGS torch==2\.13\.0\b", a) for a in runs)
    # pip's CA bundle is a BuildKit secret: mounted for each pip step, never copied into a layer
    for a in runs:
        if re.search(r"\bpip\b.* install ", a) and "/tmp/wheel/" not in a:  # from an index
            assert "--mount=type=secret,id=pip_ca" in a and "PIP_CERT=/run/secrets/pip_ca" in a, a
    assert not any("pip_ca" in a for w, a in ins if w in ("COPY", "ADD", "ENV"))
    # Tessera itself: no dependencies (requirements.txt has them), no build tools downloaded
    assert any("pip wheel -q --no-build-isolation --no-deps -w /tmp/wheel /src" in a
               and "install --no-compile --no-deps /tmp/wheel/*.whl" in a for a in runs)
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as non-root"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "USER after the last RUN"
    (health,) = [json_or_shell(a.split("CMD", 1)[1]) for w, a in ins if w == "HEALTHCHECK"]
    assert health == ["python", "/usr/local/bin/tessera-healthcheck"]
    assert any(w == "COPY" and "docker/healthcheck.py /usr/local/bin/tessera-healthcheck" in a for w, a in ins)
    assert ("EXPOSE", "9090") in ins
    env = " ".join(a for w, a in ins if w == "ENV")
    assert "MODEL_DIR=/data/models" in env
    assert any(w == "VOLUME" and "/data/models" in a for w, a in ins)
    (entry,) = [json_or_shell(a) for w, a in ins if w == "ENTRYPOINT"]
    (cmd,) = [json_or_shell(a) for w, a in ins if w == "CMD"]
    copied = [json_or_shell(a) for w, a in ins if w == "COPY" and "docker/entrypoint.sh" in a]
    assert copied and copied[0][-1] == entry[0], "ENTRYPOINT must be the copied docker/entrypoint.sh"
    assert cmd == ["serve"]


def _requirement_specs(lines) -> dict[str, str]:
    from packaging.requirements import Requirement

    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            out[re.sub(r"[-_.]+", "-", req.name).lower()] = str(req.specifier)
    return out


def test_image_requirements_follow_setup_cfg():
    """docker/requirements.txt = setup.cfg's install_requires (same bounds) less torch and label-studio-sdk,
    which the Dockerfile installs pinned as setup.cfg pins them, plus the part of the SDK's requirements
    that Tessera imports."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    setup = _requirement_specs(cfg["options"]["install_requires"].splitlines())
    image = _requirement_specs(REQUIREMENTS.read_text().splitlines())
    text = DOCKERFILE.read_text()
    for name in ("torch", "label-studio-sdk"):
        spec = setup.pop(name)
        assert spec.startswith("==") and f"{name}{spec}" in text, f"{name}: Dockerfile must install {name}{spec}"
    for name, spec in setup.items():
        assert name in image, f"{name} (setup.cfg) missing from docker/requirements.txt"
        assert image[name] == spec or name in ("numpy", "pillow", "opencv-python-headless"), (name, spec)
    for name in ("pandas", "httpx", "pydantic", "jsf", "nltk", "lxml", "xmljson"):  # what the SDK imports
        assert name in image, name
    for name in ("datamodel-code-generator", "typer", "watchfiles", "requests-mock", "pytest"):
        assert name not in image, f"{name} is not needed at run time"


# ------------------------------------------------------------------------------------------------ health check

def _healthcheck_module():
    spec = importlib.util.spec_from_file_location("tessera_healthcheck", DOCKER / "healthcheck.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("argv, role", [
    (["/opt/venv/bin/python", "/opt/venv/bin/tessera", "worker"], "worker"),
    (["/opt/venv/bin/python", "/opt/venv/bin/tessera", "train", "--data", "d"], "one-off"),
    (["/opt/venv/bin/python", "/opt/venv/bin/tessera", "serve", "--port", "9090"], "serve"),
    (["/opt/venv/bin/python", "-m", "gunicorn", "--bind", "0.0.0.0:9090", "tessera.backend.wsgi:app"], "serve"),
    ([], "serve"),
])
def test_healthcheck_follows_the_role(monkeypatch, capsys, argv, role):
    hc = _healthcheck_module()
    monkeypatch.setattr(hc, "pid1_argv", lambda: argv)
    monkeypatch.setattr(hc, "check_http", lambda: "http checked")
    monkeypatch.setattr(hc, "check_worker", lambda args: "worker checked")
    code = hc.main()
    out = capsys.readouterr().out
    expected = {"worker": "worker checked", "serve": "http checked"}.get(role)
    if expected:
        assert code == 1 and expected in out
    else:
        assert code == 0 and "one-off `tessera train`" in out


def test_healthcheck_probes(monkeypatch):
    """The real probes against nothing listening: both say why they fail (a refused loopback port)."""
    hc = _healthcheck_module()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("PORT", str(port))
    assert f"127.0.0.1:{port}/health" in hc.check_http()
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}/0")
    assert "Redis does not answer" in hc.check_worker([])
    monkeypatch.delenv("REDIS_URL")
    assert hc.check_worker([]) == "worker without REDIS_URL"
    assert "Redis does not answer" in hc.check_worker(["--redis-url", f"redis://127.0.0.1:{port}/1"])


# ------------------------------------------------------------------------------------------------ entrypoint


def run_entrypoint(tmp_path: Path, *args: str, env: dict | None = None, fake: bool = True):
    """Run docker/entrypoint.sh with `tessera` on PATH: a stand-in that prints its argv (fake=True), or a
    shim that runs the real CLI (`python -m tessera.backend.cli`) from this checkout."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    shim = bindir / "tessera"
    if fake:
        shim.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "tessera" "$@"\n')
    else:
        shim.write_text(f'#!/usr/bin/env bash\ncd {shlex.quote(str(REPO))} && exec '
                        f'{shlex.quote(sys.executable)} -m tessera.backend.cli "$@"\n')
    shim.chmod(0o755)
    full_env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path)}
    full_env.update(env or {})
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env=full_env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(
    "args, env, expected",
    [
        ((), {}, "serve --host 0.0.0.0 --port 9090"),
        ((), {"PORT": "8123"}, "serve --host 0.0.0.0 --port 8123"),
        (("serve",), {}, "serve --host 0.0.0.0 --port 9090"),
        (("serve", "--workers", "2"), {}, "serve --host 0.0.0.0 --port 9090 --workers 2"),
        (("--threads", "4"), {}, "serve --host 0.0.0.0 --port 9090 --threads 4"),
        (("worker",), {}, "worker"),
        (("worker", "--redis-url", "redis://r:6379/1"), {}, "worker --redis-url redis://r:6379/1"),
        (("versions", "--project", "3"), {}, "versions --project 3"),
        (("tessera", "generate", "--project", "3", "--count", "2"), {}, "generate --project 3 --count 2"),
        (("--help",), {}, "--help"),
        (("generate", "--label", "two words"), {}, "generate --label two words"),
    ],
)
def test_entrypoint_routing(tmp_path, args, env, expected):
    r = run_entrypoint(tmp_path, *args, env=env)
    assert r.returncode == 0, r.stderr
    argv = r.stdout.splitlines()
    assert argv[0] == "tessera"
    assert " ".join(argv[1:]) == expected
    if args and args[-1] == "two words":
        assert argv[-1] == "two words"  # arguments are passed through unsplit


def test_entrypoint_with_the_real_cli(tmp_path):
    r = run_entrypoint(tmp_path, "--help", fake=False)
    assert r.returncode == 0, r.stderr
    assert "serve" in r.stdout and "worker" in r.stdout
    # the serve line the image runs is accepted by the real parser (--help exits before serving)
    r = run_entrypoint(tmp_path, "serve", "--help", fake=False, env={"PORT": "9191"})
    assert r.returncode == 0, r.stderr
    assert "--port" in r.stdout and "--host" in r.stdout
    r = run_entrypoint(tmp_path, "worker", "--help", fake=False)
    assert r.returncode == 0, r.stderr
