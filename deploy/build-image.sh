#!/usr/bin/env bash
# `make image`: builds deploy/Dockerfile from the repository root as cellstream:<version> and prints its size.
# With docker where its daemon answers, else podman. The base is the Dockerfile's BASE_IMAGE (the official
# Python image), pulled if missing; where it cannot be pulled (no registry reachable), deploy/stand-in-base.sh
# makes a Debian bookworm stand-in locally, once.
#   IMAGE=name:tag   ENGINE=docker|podman   BASE_IMAGE=another base (both stages)
#   PIP_CERT=CA bundle for pip inside the build (default: the host pip's), passed as a build secret
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
image=${IMAGE:-cellstream:$version}
engine=${ENGINE:-}
if [ -z "$engine" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        engine=docker
    elif command -v podman >/dev/null; then
        engine=podman
    else
        echo "make image needs docker or podman (Debian: apt-get install podman runc buildah mmdebstrap)" >&2
        exit 2
    fi
fi
if [ "$engine" = podman ] && [ -z "${CONTAINERS_CONF:-}" ]; then
    export CONTAINERS_CONF="$PWD/deploy/containers.conf"
fi

base=${BASE_IMAGE:-$(sed -n 's/^ARG BASE_IMAGE=//p' deploy/Dockerfile)}
if ! "$engine" image inspect "$base" >/dev/null 2>&1 && ! "$engine" pull --quiet "$base" >/dev/null 2>&1; then
    echo "$base cannot be pulled: building on a stand-in made from Debian's packages (deploy/stand-in-base.sh)" >&2
    base=$(ENGINE="$engine" deploy/stand-in-base.sh)
fi

cert=${PIP_CERT:-$( (python3 -m pip config list 2>/dev/null || true) | sed -n "s/^global\.cert='\(.*\)'$/\1/p")}
options=()
if [ "$engine" = podman ]; then
    options+=(--format docker)  # the OCI format has no HEALTHCHECK
fi
if [ -n "$cert" ] && [ -f "$cert" ]; then
    options+=(--secret "id=pip-cert,src=$cert")
fi
# The host's network: builds here cannot set up a network namespace of their own, and need none.
"$engine" build --network=host "${options[@]}" --build-arg "BASE_IMAGE=$base" -f deploy/Dockerfile -t "$image" .
size=$("$engine" image inspect --format '{{.Size}}' "$image")
echo "$image on $base: $((size / 1000000)) MB"
