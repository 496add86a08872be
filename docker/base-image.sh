#!/usr/bin/env bash
# The Dockerfile's FROM image, for a machine that reaches no image registry.
#   docker/base-image.sh     present: nothing to do; else `docker pull`; else, where no registry answers,
#                            a local stand-in: Debian bookworm from Debian's package mirror by debootstrap
#                            (minbase + python3 3.11, venv, pip, ca-certificates), without docs, man pages
#                            and locales (as the slim images), `docker import`ed under the FROM name.
# The stand-in's root filesystem is kept as a tar in $STATE, so a machine makes it once (debootstrap:
# ~2-5 min) and re-imports it in seconds when the engine's images are gone.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=${TESSERA_DOCKER_STATE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/tessera-docker}
DOCKER=${DOCKER:-$(docker/engine.sh client)}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=${TESSERA_BASE_IMAGE:-$(awk 'toupper($1) == "FROM" { print $2; exit }' docker/Dockerfile)}
TAR=$STATE/bookworm-python3-minbase.tar

if "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
    echo "base image $BASE: present"
    exit 0
fi
if timeout 120 "$DOCKER" pull -q "$BASE"; then
    exit 0
fi
echo "base image $BASE: no registry answers; using a local Debian bookworm stand-in"
mkdir -p "$STATE"
if [[ ! -s "$TAR" ]]; then
    command -v debootstrap >/dev/null || {
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
    root=$(mktemp -d "$STATE/rootfs.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    echo "debootstrap bookworm into $root (log $STATE/debootstrap.log)"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$root" "$MIRROR" > "$STATE/debootstrap.log" 2>&1 \
        || { tail -n 20 "$STATE/debootstrap.log"; exit 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
    tar -C "$root" -cf "$TAR.tmp" .
    mv "$TAR.tmp" "$TAR"
fi
"$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --change 'LABEL org.opencontainers.image.description="Tessera CI stand-in: Debian bookworm minbase + python3 (debootstrap)"' \
    "$TAR" "$BASE" > /dev/null
echo "base image $BASE: imported from $TAR"
