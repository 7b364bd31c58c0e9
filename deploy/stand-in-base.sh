#!/usr/bin/env bash
# Makes a stand-in for the Dockerfile's default base (the official python:3.11-slim-bookworm image) where no
# registry of container images is reachable: a Debian bookworm root filesystem built from Debian's packages
# (mmdebstrap, minbase) with Debian's Python 3.11, its venv module and `python`, imported into the engine's
# image store. Prints the image's name. An image of that name already there is reused: the name carries a
# hash of this script, so a change here makes a new one.
#   ENGINE=podman|docker (default podman)
set -euo pipefail
engine=${ENGINE:-podman}
here=$(cd "$(dirname "$0")" && pwd)
name="localhost/cellstream-base:bookworm-$(sha256sum "$here/stand-in-base.sh" | cut -c1-12)"
if "$engine" image inspect "$name" >/dev/null 2>&1; then
    echo "$name"
    exit 0
fi
command -v mmdebstrap >/dev/null || { echo "stand-in-base.sh needs mmdebstrap (Debian: apt-get install mmdebstrap)" >&2; exit 2; }
# What python:*-slim leaves out too: documentation, manuals, translations. usrmerge (and the perl it pulls in)
# is replaced by mmdebstrap's merged-usr hook; no recommended packages.
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,python-is-python3 \
    --aptopt='APT::Install-Recommends "false"' \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    bookworm - \
    | "$engine" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python"]' - "$name" >/dev/null
echo "$name"
