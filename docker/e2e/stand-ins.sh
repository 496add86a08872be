#!/usr/bin/env bash
# The compose file's other images (Label Studio, Redis), for a machine that reaches no image registry:
# present, or pulled, or built here from docker/e2e/*.Dockerfile on the Tessera base image under the
# compose file's names. Used by `make docker-e2e`.
set -euo pipefail
cd "$(dirname "$0")/../.."
DOCKER=${DOCKER:-$(docker/engine.sh client)}
export DOCKER_BUILDKIT=1
STATE=${TESSERA_DOCKER_STATE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/tessera-docker}
mkdir -p "$STATE"
ca=${PIP_CA_BUNDLE:-${PIP_CERT:-${REQUESTS_CA_BUNDLE:-}}}
secret=()
[[ -n "$ca" && -s "$ca" ]] && secret=(--secret "id=pip_ca,src=$ca")

docker/base-image.sh
for pair in "label-studio:heartexlabs/label-studio:1.23.2" "redis:redis:7-alpine"; do
    name=${pair%%:*} image=${pair#*:}
    if "$DOCKER" image inspect "$image" >/dev/null 2>&1; then echo "$image: present"; continue; fi
    if timeout 300 "$DOCKER" pull -q "$image" 2>/dev/null; then continue; fi
    echo "$image: no registry answers; building the stand-in docker/e2e/$name.Dockerfile"
    start=$(date +%s)
    "$DOCKER" build "${secret[@]}" -f "docker/e2e/$name.Dockerfile" -t "$image" docker/e2e \
        > "$STATE/stand-in-$name.log" 2>&1 || { tail -n 30 "$STATE/stand-in-$name.log"; exit 1; }
    echo "$image: built in $(( $(date +%s) - start )) s"
done
