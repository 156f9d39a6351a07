"""What the in-process runtime's fork server imports before it forks any worker: the
ClientApp and Opacus, then every object frozen out of Python's garbage collector, so a
worker's collections never write to (and so copy) the pages it shares with the server
and the other workers (simulations/runtime.worker_context)."""

import gc

import opacus  # noqa: F401

import client.app  # noqa: F401

gc.freeze()
