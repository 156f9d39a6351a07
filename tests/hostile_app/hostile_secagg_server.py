"""A hostile secure-aggregation ServerApp, for tests only, against dpfl's real ClientApp
in real processes. It tells partition 0 (the target) a story of its own: a cohort of
three with its own threshold, while partitions 1-3 are shown the full cohort of four.
It forwards the target every share it has (the others their own view's), splits the
survivor list, and asks everyone to reveal with every signature it collected. It writes what it received
(errors, shares, masked vectors, signatures, reveals) to `<output-dir>/hostile.json`.
"""

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from common import keys
from common.arrays import to_array_record
from common.config import parse_config
from common.models import build_model, get_weights
from common.secagg import Advert
from server.secure_round import SecureExchange
from server.strategy import CohortFedAvg
from server.wire import stage_message, train_config

app = ServerApp()
ROUND = 1


def _ask(grid: Grid, msgs: list[Message]) -> dict[int, Message]:
    """Each node's reply (by the node the message went to)."""
    dst = [m.metadata.dst_node_id for m in msgs]
    ids = list(grid.push_messages(msgs))
    node_of = dict(zip(ids, dst, strict=True))
    out: dict[int, Message] = {}
    deadline = time.monotonic() + 600
    while len(out) < len(ids) and time.monotonic() < deadline:
        for r in grid.pull_messages([i for i in ids if node_of[i] not in out]):
            out[node_of[r.metadata.reply_to_message_id]] = r
        time.sleep(0.2)
    return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = parse_config(dict(rc))
    n = int(rc["num-partitions"])
    nodes: list[int] = []
    deadline = time.monotonic() + 300
    while len(nodes) < n and time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        time.sleep(0.5)
    query = [Message(RecordDict({keys.CONFIG: ConfigRecord({})}), dst_node_id=d,
                     message_type=MessageType.QUERY) for d in nodes]
    pid = {src: int(r.content[keys.METRICS][keys.PARTITION_ID]) for src, r in _ask(grid, query).items()}
    node = {p: d for d, p in pid.items()}
    model = get_weights(build_model(str(rc["model"]), seed=0))
    dim = sum(v.size for v in model.values())
    secure = SecureExchange(cfg, CohortFedAvg(cfg))
    seen: dict = {"errors": {}, "masked": [], "signatures": {}, "revealed": []}

    def note(stage: str, replies: dict[int, Message]) -> dict[int, Message]:
        ok = {}
        for d, r in replies.items():
            if r.has_error():
                seen["errors"].setdefault(str(pid[d]), []).append(f"{stage}: {r.error.reason}")
            elif keys.METRICS in r.content.metric_records and r.content[keys.METRICS][keys.REFUSED]:
                seen["errors"].setdefault(str(pid[d]), []).append(
                    f"{stage}: {r.content[keys.PRIVACY][keys.REASON]}")
            else:
                ok[pid[d]] = r
        return ok

    rnd = {keys.SERVER_ROUND: ROUND}
    got = note("keys", _ask(grid, [stage_message(node[p], keys.SECAGG_KEYS, rnd) for p in range(n)]))
    adverts = {p: Advert.from_json(p, json.loads(str(r.content[keys.CONFIG][keys.PUBLIC_KEYS])))
               for p, r in got.items()}
    small = secure.view_for(ROUND, [adverts[p] for p in (0, 1, 2)], dim, 3)
    full = secure.view_for(ROUND, list(adverts.values()), dim, 3)
    views = {p: (small if p == 0 else full) for p in adverts}
    got = note("shares", _ask(grid, [stage_message(node[p], keys.SECAGG_SHARES,
                                                   {**rnd, keys.VIEW: views[p].to_json()})
                                     for p in adverts]))
    shares = {p: json.loads(str(r.content[keys.CONFIG][keys.SHARES])) for p, r in got.items()}
    arrays = to_array_record(model)
    msgs = []
    for p in shares:  # the target: every share addressed to it, from either view;
        # the others: their own view's shares, so that they release and spend
        config = train_config(server_round=ROUND, planned_rounds=3, known_history=None)
        config[keys.SHARES] = json.dumps({str(i): s[str(p)] for i, s in shares.items()
                                          if str(p) in s and (p == 0 or i != 0)})
        msgs.append(stage_message(node[p], keys.SECAGG_MASKED, config, arrays))
    masked = note("masked", _ask(grid, msgs))
    seen["masked"] = sorted(masked)
    survivors = sorted(masked)
    lists = {p: survivors if i % 2 == 0 else survivors[:-1] for i, p in enumerate(survivors)}
    got = note("confirm", _ask(grid, [stage_message(node[p], keys.SECAGG_CONFIRM, {
        **rnd, keys.SURVIVORS: json.dumps(lists[p])}) for p in survivors]))
    signatures = {str(p): str(r.content[keys.CONFIG][keys.SIGNATURE]) for p, r in got.items()}
    seen["signatures"] = signatures
    got = note("unmask", _ask(grid, [stage_message(node[p], keys.SECAGG_UNMASK, {
        **rnd, keys.SIGNATURES: json.dumps(signatures)}) for p in range(n)]))
    seen["revealed"] = {str(p): json.loads(str(r.content[keys.CONFIG][keys.REVEALED]))
                        for p, r in got.items()}
    out = Path(str(rc["output-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "hostile.json").write_text(json.dumps(seen))
