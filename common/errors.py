"""dpfl's exceptions: one family under DpflError, so that a caller can catch dpfl's own
refusals apart from bugs. Each message states the consequence (what was not done, what
was not spent). Each class keeps the built-in base it had (ValueError, RuntimeError), so
code that caught those still does.
"""

from __future__ import annotations


class DpflError(Exception):
    """Anything dpfl refuses or cannot do, with the reason and its consequence."""


class ConfigError(DpflError, ValueError):
    """A run-config or node-config value is missing, of the wrong type or out of range:
    nothing starts."""


class DataError(DpflError, RuntimeError):
    """A dataset file is missing, corrupt, truncated or of the wrong format."""


class PrivacyRefusal(DpflError, RuntimeError):
    """A node will not release: what it would spend, or what it spends from, does not
    allow it. Nothing is trained or spent."""


class BudgetExceeded(PrivacyRefusal):
    """The round would push the client's epsilon past its budget."""


class LedgerUnavailable(PrivacyRefusal):
    """This node cannot use its ledger now; it trains nothing and spends nothing. The
    message is a fixed sentence for the server; the reason is in the node's log."""


class ProtocolError(DpflError, ValueError):
    """A protocol step was asked for something that would break its guarantee."""


class FederationError(DpflError, RuntimeError):
    """Fewer nodes than the run was configured for: it does not start."""


class SimulationError(DpflError, RuntimeError):
    """The run did not complete; the message says where its logs are."""
