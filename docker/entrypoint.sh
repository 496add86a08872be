#!/usr/bin/env bash
# Tessera container entrypoint.
#   (no args) | serve [ARGS]   -> tessera serve --host 0.0.0.0 --port ${PORT:-9090} [ARGS]   (waitress)
#   --FLAG ...                 -> the same, FLAGs go to `tessera serve` (e.g. --workers 2)
#   worker [ARGS]              -> tessera worker [ARGS]   (RQ training worker, needs REDIS_URL)
#   -h | --help                -> tessera --help
#   anything else              -> tessera ARGS   (e.g. versions --project 3, train --project 3, generate ...)
# For a shell: docker compose run --entrypoint bash tessera
set -euo pipefail

serve() {
    exec tessera serve --host 0.0.0.0 --port "${PORT:-9090}" "$@"
}

if [[ $# -eq 0 ]]; then
    serve
fi

case "$1" in
    serve)
        shift
        serve "$@"
        ;;
    worker)
        shift
        exec tessera worker "$@"
        ;;
    -h | --help | help)
        exec tessera --help
        ;;
    -*)
        serve "$@"
        ;;
    tessera)
        shift
        exec tessera "$@"
        ;;
    *)
        exec tessera "$@"
        ;;
esac
