#!/usr/bin/env bash
# A base image for dpfl made from Debian packages alone, for machines that reach no
# container registry: `debootstrap` a minimal Debian (Python 3.11 with venv and the CA
# certificates), then `docker import`. Needs root, debootstrap (installed when missing)
# and a running Docker engine.
#   scripts/make-base-image.sh [TAG]          (default TAG: dpfl-base:bookworm)
# DEBIAN_MIRROR (default http://deb.debian.org/debian) and SUITE (bookworm) can be set.
set -euo pipefail
TAG=${1:-dpfl-base:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if ! command -v debootstrap >/dev/null; then
    apt-get install -y debootstrap
fi
ROOT=$(mktemp -d /tmp/dpfl-rootfs-XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
echo "debootstrap $SUITE from $MIRROR into $ROOT"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$ROOT" "$MIRROR"
# the image's apt uses the same mirror; nothing cached
echo "deb $MIRROR $SUITE main" > "$ROOT/etc/apt/sources.list"
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
tar -C "$ROOT" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "$TAG"
docker run --rm "$TAG" python3 -c "import sys, venv; print('base image ready:', sys.version.split()[0])"
