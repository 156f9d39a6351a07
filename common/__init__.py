"""Pure parts shared by server and client: config, data, models, privacy math, results."""

import os

# Every dpfl process: no telemetry, no update check, and never let a SuperLink `uv sync`
# the app's dependencies at run time (that pulls a multi-GB CUDA torch).
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # A deployed node's SuperExec looks for a message to run every second by default.
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}
for _k, _v in FLOWER_ENV.items():
    os.environ.setdefault(_k, _v)
