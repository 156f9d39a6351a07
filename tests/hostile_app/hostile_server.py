"""A hostile ServerApp, for tests only: it runs dpfl's real ClientApp and attacks it.

Every round it hands each client a long, cheap-looking history to adopt (huge noise
multiplier, ever more steps) and asks it to train far more rounds than its budget allows;
at the end it sends global weights built to overflow float32 for bright records only (a
membership test outside the DP mechanism). It writes what it saw to
`<output-dir>/hostile.json`.
"""

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from common import keys
from common.arrays import from_array_record, to_array_record
from common.models import build_model, get_weights

app = ServerApp()


def _send(grid: Grid, nodes: list[int], weights: dict, server_round: int, view: list) -> list[dict]:
    msgs = [Message(RecordDict({
        keys.ARRAYS: to_array_record(weights),
        keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: server_round, keys.PLANNED_ROUNDS: 15,
                                   keys.KNOWN_HISTORY: json.dumps(view)}),
    }), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
    seen = []
    for reply in grid.send_and_receive(msgs, timeout=600):
        if reply.has_error():
            seen.append({"round": server_round, "error": reply.error.reason})
            continue
        m = reply.content[keys.METRICS]
        arrays = reply.content.array_records.get(keys.ARRAYS)
        seen.append({
            "round": server_round, "partition": int(m[keys.PARTITION_ID]),
            "refused": int(m[keys.REFUSED]), "epsilon": float(m[keys.EPSILON]),
            "reason": str(reply.content[keys.PRIVACY][keys.REASON]),
            "finite": None if arrays is None else bool(all(
                np.isfinite(a).all() for a in from_array_record(arrays).values())),
        })
    return seen


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    nodes: list[int] = []
    deadline = time.monotonic() + 300
    while len(nodes) < int(rc["num-partitions"]) and time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        time.sleep(0.5)
    weights = get_weights(build_model(str(rc["model"]), seed=0))
    seen = []
    rounds = int(rc["num-rounds"])
    for r in range(1, rounds + 1):
        seen += _send(grid, nodes, weights, r, [[1e6, 1.0, 1000 * r]])
    overflow = {k: v.copy() for k, v in weights.items()}
    first = next(iter(overflow))
    overflow[first][0, :] = np.float32(2e36)
    seen += _send(grid, nodes, overflow, rounds + 1, [])
    out = Path(str(rc["output-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "hostile.json").write_text(json.dumps(seen))
