#!/usr/bin/env bash
# A Docker engine for the image's build and smoke test (tests/test_docker_image.py, `make docker-image`).
#   docker/engine.sh start    an engine answers, or install Debian's docker.io and start dockerd (root):
#                             storage driver overlay2, else vfs. Exit 0 when `docker info` answers;
#                             exit 3 with the reason (also written to $STATE/no-engine) when no engine can
#                             run here: then the Docker tests skip with that reason.
#   docker/engine.sh client   the docker client that builds with BuildKit: one with buildx, or Debian's
#                             20.10 client (DOCKER_BUILDKIT=1) when the one first on PATH lacks buildx
#   docker/engine.sh stop     stop the dockerd that `start` started (none other)
set -euo pipefail

STATE=${TESSERA_DOCKER_STATE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/tessera-docker}
mkdir -p "$STATE"
LOG=$STATE/dockerd.log
PIDFILE=$STATE/dockerd.pid

client() {
    local c major
    for c in docker /usr/bin/docker; do
        command -v "$c" >/dev/null 2>&1 || continue
        if "$c" buildx version >/dev/null 2>&1; then echo "$c"; return 0; fi
        major=$("$c" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1 || true)
        if [[ "$major" =~ ^[0-9]+$ ]] && ((major < 23)); then echo "$c"; return 0; fi
    done
    echo docker
}

no_engine() {
    echo "$*" > "$STATE/no-engine"
    echo "no Docker engine can run here: $*" >&2
    exit 3
}

answers() { timeout 20 "$(client)" info >/dev/null 2>&1; }

start() {
    rm -f "$STATE/no-engine"
    if answers; then echo "docker engine: already running"; return 0; fi
    [[ "$(id -u)" == 0 ]] || no_engine "no engine answers and this user is not root (cannot install or start dockerd)"
    if ! command -v dockerd >/dev/null 2>&1; then
        echo "installing Debian's docker.io"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null; } \
            || no_engine "apt-get install docker.io failed"
    fi
    local driver i
    for driver in overlay2 vfs; do
        echo "starting dockerd (storage driver $driver), log $LOG"
        setsid dockerd --storage-driver="$driver" >>"$LOG" 2>&1 < /dev/null &
        echo $! > "$PIDFILE"
        for i in $(seq 60); do
            if answers; then echo "docker engine: dockerd $(cat "$PIDFILE"), $driver"; return 0; fi
            kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break
            sleep 1
        done
        stop
    done
    no_engine "dockerd did not start with overlay2 or vfs (see $LOG): $(tail -n 3 "$LOG" | tr '\n' ' ')"
}

stop() {
    [[ -s "$PIDFILE" ]] || return 0
    local pid i
    pid=$(cat "$PIDFILE")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for i in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        echo "stopped dockerd $pid"
    fi
    rm -f "$PIDFILE"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    client) client ;;
    *) echo "usage: $0 start|stop|client" >&2; exit 2 ;;
esac
