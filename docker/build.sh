#!/usr/bin/env bash
# Build the Tessera image as `make docker-image` does:
#   docker/build.sh [TAG] [extra `docker build` arguments]       (TAG default: tessera:local)
# - the FROM image: docker/base-image.sh (pulled, or a local stand-in where no registry answers);
# - torch: when this machine's pip finds the CPU wheel torch==2.13.0+cpu (a find-links folder, a mirror),
#   it is copied to docker/wheels/ and installed from there (a +cpu local version sorts above PyPI's 2.13.0); else from the PyTorch CPU index;
# - a CA bundle for pip in the build (a proxy that re-signs HTTPS): $PIP_CA_BUNDLE, else the host pip's
#   $PIP_CERT or $REQUESTS_CA_BUNDLE, passed as the BuildKit secret pip_ca when the file exists.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${1:-tessera:local}
shift || true
DOCKER=${DOCKER:-$(docker/engine.sh client)}
PYTHON=${PYTHON:-python3}
STATE=${TESSERA_DOCKER_STATE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/tessera-docker}
LOG=$STATE/build.log
mkdir -p "$STATE"
export DOCKER_BUILDKIT=1

docker/base-image.sh
args=(-f docker/Dockerfile -t "$TAG" --progress=plain)
if "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
        --platform manylinux_2_28_x86_64 -d docker/wheels 'torch==2.13.0+cpu' >/dev/null 2>&1; then
    echo "torch: $(basename docker/wheels/torch-*.whl) from this machine's pip sources"
    args+=(--build-arg "TORCH_PIP_ARGS=--find-links /wheels")
else
    echo "torch: from the PyTorch CPU index (the Dockerfile's default)"
fi
ca=${PIP_CA_BUNDLE:-${PIP_CERT:-${REQUESTS_CA_BUNDLE:-}}}
if [[ -n "$ca" && -s "$ca" ]]; then
    echo "pip in the build trusts $ca"
    args+=(--secret "id=pip_ca,src=$ca")
fi
echo "+ $DOCKER build ${args[*]} $* ."
start=$(date +%s)
"$DOCKER" build "${args[@]}" "$@" . > "$LOG" 2>&1 \
    || { tail -n 40 "$LOG"; exit 1; }
echo "built $TAG in $(( $(date +%s) - start )) s, $("$DOCKER" image inspect -f '{{.Size}}' "$TAG" \
    | awk '{ printf "%.0f MB", $1 / 1e6 }') (log: $LOG)"
