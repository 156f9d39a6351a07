#!/bin/bash
# What a secure round costs on REV against this tree, same settings on the same machine:
# median seconds a round, payload bytes a client sends and receives, accuracy, epsilon.
#   usage: scripts/secure-round-cost.sh REV [ROUNDS]      e.g. scripts/secure-round-cost.sh acf2d78 30
set -euo pipefail
rev=${1:?usage: scripts/secure-round-cost.sh REV [ROUNDS]}
rounds=${2:-30}
here=$(cd "$(dirname "$0")/.." && pwd)
PY=$here/.venv/bin/python
work=$(mktemp -d /tmp/dpfl-cost-XXXX)
trap 'git -C "$here" worktree remove --force "$work/old" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$here" worktree add --detach "$work/old" "$rev" >/dev/null 2>&1
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
secure="secure-aggregation='secagg+' noise='distributed' secagg-threshold=0.9 num-rounds=$rounds \
max-grad-norm=0.2 learning-rate=2.0 server-lr-schedule='constant'"
for tree in "$work/old" "$here"; do
  out=$work/runs/$(basename "$tree")
  mkdir -p "$out"
  (cd "$tree" && DPFL_STATE_DIR=$out/state "$PY" -m simulations.cli simulate --quiet \
    --output-dir "$out" -c "$secure" >/dev/null 2>"$out.err") || { tail -5 "$out.err"; exit 1; }
  "$PY" - "$(ls -d "$out"/*/ | head -1)" "$([ "$tree" = "$here" ] && echo this || echo "$rev")" <<'PYEOF'
import json, pathlib, statistics, sys
run = pathlib.Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
s = json.loads((run / "summary.json").read_text())
up = statistics.median(r["bytes_up"] / max(r["clients_trained"], 1) for r in rows)
down = statistics.median(r["bytes_down"] / max(r["clients_sampled"], 1) for r in rows)
print(f"{sys.argv[2]:>10}: {len(rows)} rounds, median {statistics.median(r['seconds'] for r in rows):.3f} s "
      f"a round, {up:,.0f} B up and {down:,.0f} B down a client, accuracy "
      f"{s['final_accuracy']:.4f}, epsilon {s['epsilon_max']:.4f}")
PYEOF
done
