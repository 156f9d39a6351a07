# dpfl: one image for the SuperLink, the SuperNodes and the tools (CPU PyTorch).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

# Fashion-MNIST from Debian where the package exists; otherwise dpfl downloads it (checked
# by SHA-256) into DPFL_CACHE_DIR on first use.
RUN apt-get update \
    && (apt-get install -y --no-install-recommends dataset-fashion-mnist || true) \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# CPU build of torch first, so that the project's pin (torch==2.13.0) is already met and
# pip never pulls a CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY common ./common
COPY client ./client
COPY server ./server
COPY simulations ./simulations
RUN pip install . && python -c "import common, client.app, server.app"

# The app code is shipped by `flwr run` with each run; the installed copy provides the
# dependencies and the `dpfl` command (certificates, ledgers).
CMD ["dpfl", "--help"]
