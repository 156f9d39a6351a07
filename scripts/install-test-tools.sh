#!/usr/bin/env bash
# Tools the tests use beyond Python packages: Debian's docker-compose, to validate
# docker-compose.yml (`docker-compose config`; no Docker engine needed). Best effort:
# without it that one test is skipped and says why.
set -u
command -v docker-compose >/dev/null 2>&1 && exit 0
if command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo -n"
  if [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; then
    $sudo apt-get install -y -q docker-compose >/dev/null 2>&1 \
      || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q docker-compose >/dev/null 2>&1; } \
      || true
  fi
fi
command -v docker-compose >/dev/null 2>&1 && echo "docker-compose installed" \
  || echo "docker-compose not installed; the compose-file validation test will be skipped"
exit 0
