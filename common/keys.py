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

# ... and in an evaluate reply (federated evaluation, common/fedeval.py): noisy sums over
# the node's held-out records, their exact count, the noise's standard deviations
EVAL_CORRECT = "eval-correct"
EVAL_LOSS = "eval-loss"
EVAL_EXAMPLES = "eval-examples"
EVAL_CORRECT_STD = "eval-correct-std"
EVAL_LOSS_STD = "eval-loss-std"
EVAL_METRIC_KEYS = frozenset({EVAL_CORRECT, EVAL_LOSS, EVAL_EXAMPLES, EVAL_CORRECT_STD,
                              EVAL_LOSS_STD})

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

# Secure aggregation (SecAgg+): one round is five messages of category train, each with
# its action (message type "train.<action>"), in this order.
SECAGG_KEYS = "secagg_keys"  # -> the client's signed advert: public keys, record count
SECAGG_SHARES = "secagg_shares"  # the view -> encrypted shares, one per member
SECAGG_MASKED = "secagg_masked"  # model + shares for it -> the masked integer release
SECAGG_CONFIRM = "secagg_confirm"  # survivors -> its signature of (view, survivors)
SECAGG_UNMASK = "secagg_unmask"  # survivors' signatures -> the shares that unmask the sum
SECAGG_STAGES = (SECAGG_KEYS, SECAGG_SHARES, SECAGG_MASKED, SECAGG_CONFIRM, SECAGG_UNMASK)
PUBLIC_KEYS = "public-keys"  # one client's signed advert [c hex, s hex, records, signature]
VIEW = "view"  # the round's parameters and every member's signed advert (JSON)
SHARES = "shares"  # {partition: Fernet token} (JSON)
SURVIVORS = "survivors"  # JSON list of partitions
SIGNATURE = "signature"  # one member's signature of (view, survivors), hex
SIGNATURES = "signatures"  # {partition: signature hex} (JSON)
REVEALED = "revealed"  # {partition: [kind, share hex]} (JSON)
MASKED = "masked"  # the ArrayRecord key of the masked vector
