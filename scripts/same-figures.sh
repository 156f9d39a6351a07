#!/bin/bash
# Do two revisions give the same runs, bit for bit? Runs the default private simulation,
# a secure-aggregation simulation and an audit on REV (a git worktree) and on this tree,
# with every secret draw (Poisson sample, noise, keys) taken from one seeded generator in
# every process (comparison only: a real run draws them from `secrets`) and one worker,
# then prints accuracy, epsilon and a hash of the final model for each.
#   usage: scripts/same-figures.sh REV        e.g. scripts/same-figures.sh HEAD~1
set -euo pipefail
rev=${1:?usage: scripts/same-figures.sh REV}
here=$(cd "$(dirname "$0")/.." && pwd)
PY=$here/.venv/bin/python
work=$(mktemp -d /tmp/dpfl-same-XXXX)
trap 'git -C "$here" worktree remove --force "$work/old" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$here" worktree add --detach "$work/old" "$rev" >/dev/null 2>&1
mkdir -p "$work/site"
cat > "$work/site/sitecustomize.py" <<'PYEOF'
import random
import secrets

_r = random.Random(20261203)
secrets.randbits = _r.getrandbits
secrets.token_bytes = lambda n=32: _r.randbytes(n)
PYEOF
export PYTHONPATH=$work/site FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
secure="secure-aggregation='secagg+' noise='distributed' secagg-threshold=0.9 num-rounds=20 \
max-grad-norm=0.2 learning-rate=2.0 server-lr-schedule='constant'"
for tree in "$work/old" "$here"; do
  for name in default secure audit; do
    out=$work/runs/$(basename "$tree")-$name
    mkdir -p "$out"
    export DPFL_STATE_DIR=$out/state
    case $name in
      default) args=(simulate) ;;
      secure) args=(simulate -c "$secure") ;;
      audit) args=(audit -c "num-rounds=5" --canaries 200) ;;
    esac
    (cd "$tree" && "$PY" -m simulations.cli "${args[@]}" --quiet --workers 1 --output-dir "$out" \
      >/dev/null 2>"$out.err") || { echo "$name on $tree failed:"; tail -5 "$out.err"; exit 1; }
    "$PY" - "$(ls -d "$out"/*/ | head -1)" "$([ "$tree" = "$here" ] && echo this || echo "$rev")" "$name" <<'PYEOF'
import hashlib, json, pathlib, sys
run = pathlib.Path(sys.argv[1])
s = json.loads((run / "summary.json").read_text())
digest = hashlib.sha256((run / "model.npz").read_bytes()).hexdigest()[:16]
print(f"{sys.argv[2]:>10} {sys.argv[3]:8} accuracy {s['final_accuracy']:.4f} "
      f"epsilon {s['epsilon_max']:.6f} lower bound {s.get('epsilon_lower_bound')} model {digest}")
PYEOF
  done
done
