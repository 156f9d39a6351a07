# dpfl: one image for the SuperLink, the SuperNodes and the tools (CPU PyTorch).
#
# Online (a registry and the package indexes reachable):   docker build -t dpfl:latest .
# Offline or behind a mirror: scripts/build-image.sh (a base image made from Debian
# packages, the torch wheel from a local folder, the machine's CA bundle, host network).
#
# BASE_IMAGE       any Debian/Ubuntu image with python3 (3.11) and python3-venv
# PIP_INDEX_URL    the Python package index (or a mirror of it)
# TORCH_INDEX_URL  where the CPU build of torch comes from; "" = only TORCH_WHEELS
# TORCH_WHEELS     a folder in the build context holding wheels (torch's CPU wheel)
# CA_BUNDLE        a CA bundle in the build context that pip and apt trust (a proxy's)
# APT_DATASET      1: install Fashion-MNIST from Debian's dataset-fashion-mnist package
# FEATURES         1: compute the scattering features of the whole dataset into the
#                  image's /state/cache (a new node or SuperLink state volume starts
#                  with a copy: no node computes them; +560 MB, about 2 minutes)
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG PIP_INDEX_URL=https://pypi.org/simple
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_WHEELS=.docker/wheels
ARG CA_BUNDLE=.docker/ca-bundle.crt
ARG APT_DATASET=1
ARG FEATURES=0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The build context's .docker/ folder (may be empty): extra CA bundle and wheels.
COPY .docker/ /tmp/build/
RUN set -e; \
    if [ -s "/tmp/build/${CA_BUNDLE#.docker/}" ]; then \
        cp "/tmp/build/${CA_BUNDLE#.docker/}" /etc/dpfl-ca-bundle.crt; \
    else \
        cp /etc/ssl/certs/ca-certificates.crt /etc/dpfl-ca-bundle.crt 2>/dev/null || true; \
    fi
ENV PIP_CERT=/etc/dpfl-ca-bundle.crt \
    REQUESTS_CA_BUNDLE=/etc/dpfl-ca-bundle.crt \
    SSL_CERT_FILE=/etc/dpfl-ca-bundle.crt

# Fashion-MNIST from Debian where its apt reaches the package; otherwise dpfl downloads
# it (checked by SHA-256) into DPFL_CACHE_DIR on first use, or it is mounted.
RUN if [ "$APT_DATASET" = "1" ]; then \
        (apt-get -o Acquire::https::CaInfo=/etc/dpfl-ca-bundle.crt update \
         && apt-get install -y --no-install-recommends dataset-fashion-mnist || true) \
        && rm -rf /var/lib/apt/lists/*; \
    fi

RUN python3 -m venv /opt/venv
WORKDIR /app
# The CPU build of torch first (from the wheel folder, else its index), so that the
# project's pin (torch==2.13.0) is already met and pip never pulls a CUDA build.
RUN set -e; \
    links="/tmp/build/${TORCH_WHEELS#.docker/}"; \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --find-links "$links" --index-url "$TORCH_INDEX_URL" \
            --extra-index-url "$PIP_INDEX_URL" torch==2.13.0; \
    else \
        pip install --find-links "$links" --index-url "$PIP_INDEX_URL" torch==2.13.0; \
    fi
COPY pyproject.toml README.md ./
COPY common ./common
COPY client ./client
COPY server ./server
COPY simulations ./simulations
RUN pip install --find-links "/tmp/build/${TORCH_WHEELS#.docker/}" --index-url "$PIP_INDEX_URL" . \
    && python -c "import common, client.app, server.app" \
    && rm -rf /tmp/build
RUN if [ "$FEATURES" = "1" ]; then \
        DPFL_CACHE_DIR=/state/cache python -c "from common.config import data_config; \
from common.data import load_split; [load_split(data_config(), s, 'scatter') for s in ('train', 'test')]"; \
    fi

# The app code is shipped by `flwr run` with each run; the installed copy provides the
# dependencies and the `dpfl` command (certificates, ledgers).
CMD ["dpfl", "--help"]
