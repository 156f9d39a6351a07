"""Every key that crosses the wire between ServerApp and ClientApp, once (names only:
the Flower records themselves are built at the app edges, client/wire.py and
server/wire.py)."""

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
PRIVACY = "privacy"

# ConfigRecord sent with a train message
SERVER_ROUND = "server-round"
PLANNED_ROUNDS = "planned-rounds"
# The client's own history as the server last saw it (JSON): a client that has lost its
# ledger (no ledger file, lost node state) adopts it when it only lengthens its own
# history (client.ledger.adopt_view), so its epsilon never restarts.
KNOWN_HISTORY = "known-history"

# MetricRecord in a train reply (every reply carries every key)
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"
PARTITION_ID = "partition-id"
REFUSED = "refused"
REPLY_METRIC_KEYS = frozenset(
    {NUM_EXAMPLES, TRAIN_LOSS, EPSILON, NOISE_MULTIPLIER, SAMPLE_RATE, STEPS, PARTITION_ID, REFUSED}
)

# MetricRecord in a query reply (node discovery): which partition a node holds
OWN_DATA = "own-data"
QUERY_METRIC_KEYS = frozenset({PARTITION_ID, NUM_EXAMPLES, OWN_DATA})

# ConfigRecord in a train reply
HISTORY = "history"
REASON = "reason"

# Node config (common.node.NodeConfig has them all)
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_DATA_DIR = "data-dir"
NODE_LEDGER_PATH = "ledger-path"


def number(value: object, key: str) -> float:
    """A record value that must be a number (not a bool, list or string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}={value!r} is not a number")
    return float(value)

# Secure aggregation (SecAgg+): one round is four messages of category train, each with
# its action (message type "train.<action>"), in this order.
SECAGG_KEYS = "secagg_keys"  # -> the client's two public keys
SECAGG_SHARES = "secagg_shares"  # all public keys -> encrypted shares, one per peer
SECAGG_MASKED = "secagg_masked"  # model + shares for it -> the masked integer release
SECAGG_UNMASK = "secagg_unmask"  # survivors and dropped -> the shares that unmask the sum
SECAGG_STAGES = (SECAGG_KEYS, SECAGG_SHARES, SECAGG_MASKED, SECAGG_UNMASK)
PUBLIC_KEYS = "public-keys"  # {partition: [c hex, s hex]} (JSON), or one client's [c, s]
SHARES = "shares"  # {partition: Fernet token} (JSON)
SCALE = "scale"  # integer units per unit of clipped gradient
SURVIVORS = "survivors"  # JSON list of partitions
DROPPED = "dropped"
REVEALED = "revealed"  # {partition: [kind, share hex]} (JSON)
MASKED = "masked"  # the ArrayRecord key of the masked vector
