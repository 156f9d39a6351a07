#!/usr/bin/env bash
# Build the dpfl image (dpfl:latest) where no container registry or PyTorch index is
# reachable: the base image from Debian packages (scripts/make-base-image.sh, made once),
# torch's CPU wheel from a local folder, this machine's CA bundle trusted inside the
# build, and the build on the host network (containers on the default bridge may reach
# no package index). Then `docker-compose up -d` uses the image as it is.
#   TAG (dpfl:latest), BASE_IMAGE (dpfl-base:bookworm), TORCH_WHEELS_DIR (/opt/wheels),
#   CA_BUNDLE (/etc/ssl/certs/ca-certificates.crt), PIP_INDEX_URL (https://pypi.org/simple),
#   TORCH_INDEX_URL (empty when the wheel folder holds torch 2.13.0, else PyTorch's CPU index),
#   FEATURES (1: the dataset's features computed into the image, so no node computes them)
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${TAG:-dpfl:latest}
BASE=${BASE_IMAGE:-dpfl-base:bookworm}
WHEELS=${TORCH_WHEELS_DIR:-/opt/wheels}
CA=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
INDEX=${PIP_INDEX_URL:-https://pypi.org/simple}

docker image inspect "$BASE" >/dev/null 2>&1 || scripts/make-base-image.sh "$BASE"
rm -rf .docker/wheels && mkdir -p .docker/wheels
if compgen -G "$WHEELS/torch-2.13.0*.whl" >/dev/null; then
    cp "$WHEELS"/torch-2.13.0*.whl .docker/wheels/
    TORCH_INDEX=${TORCH_INDEX_URL-}
else
    TORCH_INDEX=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
fi
if [ -s "$CA" ]; then cp "$CA" .docker/ca-bundle.crt; else rm -f .docker/ca-bundle.crt; fi
start=$(date +%s)
docker build --network host -t "$TAG" \
    --build-arg BASE_IMAGE="$BASE" --build-arg PIP_INDEX_URL="$INDEX" \
    --build-arg TORCH_INDEX_URL="$TORCH_INDEX" --build-arg FEATURES="${FEATURES:-0}" .
echo "built $TAG in $(( $(date +%s) - start )) s: $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.2f GB", $1/1e9}')"
