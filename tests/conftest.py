"""The fast suite is hermetic: no test outside the `slow` marker may read the installed
Fashion-MNIST, the user's cache or the network. Each such test sees an empty system
folder, a fresh cache and a download address that refuses connections, so one that
reaches for the real dataset fails loudly instead of passing on a machine that has it.
Fast tests use the tiny real subset in tests/data (see tests/data/README.md)."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


@pytest.fixture(autouse=True)
def node_state(monkeypatch, tmp_path_factory):
    """Every test's nodes keep their default ledgers in a fresh folder of their own,
    never in the user's state folder (slow tests' processes inherit it too)."""
    from common.node import STATE_DIR_ENV

    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path_factory.mktemp("node-state")))


@pytest.fixture(autouse=True)
def hermetic(request, monkeypatch, tmp_path_factory):
    if request.node.get_closest_marker("slow"):
        yield
        return
    from common import cache, fashion_mnist

    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path_factory.getbasetemp() / "no-system-dataset")
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv(fashion_mnist.URL_ENV, "http://127.0.0.1:9/")  # refuses: nothing is downloaded
    yield
