"""What the ledger's lock costs a request: `python scripts/bench-ledger-lock.py` (from the
repository root, in the project's venv). Prints microseconds a request for holding the
ledger (lock, marker checks, load) against loading it alone, and for the synced save."""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flwr.app import Context, RecordDict  # noqa: E402

from client.ledger import held_ledger, load_ledger, save_ledger  # noqa: E402
from common.node import parse_node_config  # noqa: E402


def per_call(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    folder = tempfile.mkdtemp()
    node = parse_node_config({"partition-id": 0, "num-partitions": 10,
                              "ledger-path": f"{folder}/ledger.json"})
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with held_ledger(ctx, node) as ledger:
        ledger.spend((1.0, 1.0, 1))
        save_ledger(ctx, ledger, node.ledger_file)

    def held() -> None:
        with held_ledger(ctx, node):
            pass

    held_us = per_call(held, 2000)
    load_us = per_call(lambda: load_ledger(ctx, node.ledger_file), 2000)
    save_us = per_call(lambda: save_ledger(ctx, ledger, node.ledger_file), 200)
    print(f"held_ledger (lock, marker checks, load): {held_us:.0f} us; load alone: "
          f"{load_us:.0f} us; the lock and checks: {held_us - load_us:.0f} us a request; "
          f"synced save: {save_us:.0f} us")


if __name__ == "__main__":
    main()
