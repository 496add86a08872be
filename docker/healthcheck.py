"""The image's HEALTHCHECK, by what the container runs (PID 1, after docker/entrypoint.sh exec'd it):

- `tessera worker`: healthy while its Redis answers PING (the worker serves no HTTP);
- another one-off `tessera` command (train, versions, predict ...): healthy (it ends when done);
- anything else, i.e. the HTTP server that `tessera serve` runs: GET /health on $PORT answers 200.

Exit 0 = healthy, 1 = unhealthy, with one line saying why (`docker inspect` shows it).
"""
from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path


def pid1_argv() -> list[str]:
    try:
        raw = Path("/proc/1/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def tessera_command(argv: list[str]) -> tuple[str, list[str]] | None:
    """('worker', rest) for `python .../tessera worker ...`; None when PID 1 is not the tessera CLI."""
    for i, arg in enumerate(argv[:2]):
        if os.path.basename(arg) == "tessera" and i + 1 < len(argv):
            return argv[i + 1], argv[i + 2:]
    return None


def check_worker(args: list[str]) -> str | None:
    url = os.environ.get("REDIS_URL", "")
    if "--redis-url" in args[:-1]:
        url = args[args.index("--redis-url") + 1]
    if not url:
        return "worker without REDIS_URL"
    import redis

    try:
        redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3).ping()
    except Exception as e:  # any failure to reach Redis is "unhealthy"; say which
        return f"worker: Redis does not answer: {type(e).__name__}: {e}"
    return None


def check_http() -> str | None:
    url = f"http://127.0.0.1:{os.environ.get('PORT', '9090')}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as r:
            return None if r.status == 200 else f"{url} answered {r.status}"
    except Exception as e:  # refused, timeout, HTTP error: all unhealthy
        return f"{url}: {type(e).__name__}: {e}"


def main() -> int:
    command = tessera_command(pid1_argv())
    if command and command[0] == "worker":
        problem, role = check_worker(command[1]), "worker, Redis answers"
    elif command and command[0] != "serve":
        problem, role = None, f"one-off `tessera {command[0]}`"
    else:
        problem, role = check_http(), "serve, GET /health 200"
    print(problem or f"healthy ({role})")
    return 1 if problem else 0


if __name__ == "__main__":
    sys.exit(main())
