#!/usr/bin/env bash
# Tools the tests use beyond Python packages, from Debian's packages: docker-compose (the
# compose-file validation), and docker.io and debootstrap for the container test (its own
# Docker engine, a base image made without a registry). Installed where this machine can:
# as root (or with password-less sudo) through apt-get.
#
#   scripts/install-test-tools.sh            install what is missing (best effort; exit 0)
#   scripts/install-test-tools.sh --required prints 1 where the container test must run:
#       root and a package index that offers docker.io. `make test` passes it to the slow
#       suite as DPFL_REQUIRE_CONTAINERS, so CI fails, rather than skips, the container
#       test on such a machine (tests/test_containers.py).
set -u
PACKAGES="docker.io docker-compose debootstrap"
TOOLS="dockerd docker docker-compose debootstrap"

sudo=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && sudo="sudo -n"
can_install() { { [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; } && command -v apt-get >/dev/null 2>&1; }
offered() {  # the package index offers docker.io (a candidate version)
    LC_ALL=C apt-cache policy docker.io 2>/dev/null | grep -q 'Candidate: [0-9]'
}

if [ "${1:-}" = "--required" ]; then
    # root for the engine itself, and the tools or a way to get them
    if [ "$(id -u)" -eq 0 ] && can_install && offered; then echo 1; else echo 0; fi
    exit 0
fi

missing=""
for tool in $TOOLS; do command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"; done
[ -z "$missing" ] && exit 0
if can_install; then
    if ! offered; then
        $sudo apt-get update -q >/dev/null 2>&1 || true
    fi
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
        $PACKAGES >/dev/null 2>&1 \
        || { $sudo apt-get update -q >/dev/null 2>&1 \
             && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q \
                --no-install-recommends $PACKAGES >/dev/null 2>&1; } \
        || echo "apt-get could not install $PACKAGES"
fi
still=""
for tool in $TOOLS; do command -v "$tool" >/dev/null 2>&1 || still="$still $tool"; done
if [ -z "$still" ]; then
    echo "test tools installed:$missing"
else
    echo "test tools missing:$still; the tests that need them will be skipped and say why"
fi
exit 0
