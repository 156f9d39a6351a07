"""What a round may spend: the budget guard, against the node's ledger and its policy.

The noise multiplier is fixed once per node (calibrated for the releases the run plans,
or taken from the run config; never below the node's floor) and kept in the ledger for
every later round and run. A round that would pass the budget raises BudgetExceeded
before anything is trained. Pure accounting (common.privacy) under the ledger's history.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from client.ledger import Ledger
from common import ddp, privacy
from common.config import PrivacyConfig, TrainConfig
from common.errors import BudgetExceeded


def plan_spend(
    ledger: Ledger, *, num_examples: int, train: TrainConfig, priv: PrivacyConfig,
    planned_rounds: int, client: str, min_noise_multiplier: float = 0.0,
    also_planned: Sequence[privacy.Entry] = (),
) -> privacy.RoundPlan:
    """Decide this round's (noise_multiplier, sample_rate, steps) and check the budget.

    The noise multiplier is fixed once per client (calibrated for `planned_rounds` rounds of
    local training after its history and `also_planned`, the other releases it plans
    (federated evaluations, common/fedeval.py); or taken from config; never below the
    node's `min_noise_multiplier`) and kept in the ledger for every later round. Raises
    BudgetExceeded if the round would pass target_epsilon.
    """
    q, steps = privacy.poisson_plan(num_examples, train.batch_size, train.local_epochs)
    if not priv.private:
        return privacy.RoundPlan(
            noise_multiplier=0.0, sample_rate=q, steps=steps,
            epsilon_before=math.inf if ledger.history else 0.0, epsilon_after=math.inf,
        )
    priv.check_delta(num_examples, client=client)
    if ledger.noise_multiplier is None:
        if priv.noise_multiplier > 0:
            sigma = priv.noise_multiplier
        else:
            sigma = privacy.calibrate_noise(
                target_epsilon=priv.target_epsilon, target_delta=priv.target_delta,
                sample_rate=q, steps=steps * planned_rounds, accountant=priv.accountant,
                prior=[*ledger.history, *also_planned],
            )
        ledger.noise_multiplier = sigma
    # The node's floor also holds for a sigma fixed before it was set (more noise only).
    ledger.noise_multiplier = max(ledger.noise_multiplier, min_noise_multiplier)
    plan = privacy.plan_round(
        ledger.history, noise_multiplier=ledger.noise_multiplier, sample_rate=q, steps=steps,
        delta=priv.target_delta, accountant=priv.accountant,
    )
    if plan.epsilon_after > priv.target_epsilon:
        raise BudgetExceeded(
            f"{client} would reach epsilon={plan.epsilon_after:.3f} > budget "
            f"{priv.target_epsilon} (spent {plan.epsilon_before:.3f}); it does not train"
        )
    return plan


def plan_release(
    ledger: Ledger, *, encoding: ddp.Encoding, priv: PrivacyConfig, planned_rounds: int,
    threshold: int, distributed: bool, client: str, num_examples: int,
    agreed_noise_multiplier: float = 0.0, min_noise_multiplier: float = 0.0,
    min_share_noise_multiplier: float = 0.0, max_epsilon_alone: float = math.inf,
) -> privacy.ReleasePlan:
    """This round's integer release under secure aggregation, within the budget.

    The Skellam noise multiplier z (noise std over the rounded L2 sensitivity) is fixed
    once per client like sigma, calibrated for `planned_rounds` releases (or taken from
    noise-multiplier; never below the node's floor): its ledger needs the sum to carry
    mu = (z l2)^2. With distributed noise the cohort signed one agreed level z_a, so every
    other of the `threshold` survivors the sum holds adds at least a = (z_a l2)^2 / t; this
    client adds share = max(a, mu - (t - 1) a) and records share + (t - 1) a >= mu:
    nothing it records depends on what the server told anyone else (an agreed level below
    its need makes it add the difference itself). With local noise it adds and records mu.
    The node's share floor raises its share to (min_share_noise_multiplier * l2)^2, and its
    `max_epsilon_alone` bounds the epsilon of its releases with only its own shares
    (`privacy.epsilon_alone`: what it keeps against a server with colluding members).
    Raises BudgetExceeded."""
    priv.check_delta(num_examples, client=client)
    l1, l2 = encoding.rounded_l1_bound, encoding.rounded_l2_bound
    if ledger.noise_multiplier is None:
        ledger.noise_multiplier = privacy.skellam_noise_multiplier(
            fixed=priv.noise_multiplier, target_epsilon=priv.target_epsilon,
            target_delta=priv.target_delta, l1=l1, l2=l2, steps=planned_rounds,
            prior=ledger.history, beta=encoding.tail)
    ledger.noise_multiplier = max(ledger.noise_multiplier, min_noise_multiplier)
    need = (ledger.noise_multiplier * l2) ** 2
    floor = (min_share_noise_multiplier * l2) ** 2
    if distributed:
        others = (agreed_noise_multiplier * l2) ** 2 / threshold  # each other survivor's least
        share = max(others, need - (threshold - 1) * others, floor)
        mu = share + (threshold - 1) * others
    else:
        share = mu = max(need, floor)
    problem = ddp.skellam_problem(share)
    if problem:
        raise BudgetExceeded(f"{client}: {problem}; it does not train")
    entry = privacy.skellam_entry(mu=mu, l1=l1, l2=l2, share=share, beta=encoding.tail)
    before = privacy.epsilon(ledger.history, priv.target_delta)
    after = privacy.epsilon([*ledger.history, entry], priv.target_delta)
    if after > priv.target_epsilon:
        raise BudgetExceeded(f"{client} would reach epsilon={after:.3f} > budget "
                             f"{priv.target_epsilon} (spent {before:.3f}); it does not train")
    alone = privacy.epsilon_alone([*ledger.history, entry], priv.target_delta)
    if alone > max_epsilon_alone:
        raise BudgetExceeded(
            f"{client}'s releases with only its own noise would reach epsilon={alone:.3f} > "
            f"node max-epsilon-alone={max_epsilon_alone:g} (what it keeps if the server and "
            "colluding members unmask its release); it does not train")
    return privacy.ReleasePlan(
        noise_multiplier=math.sqrt(mu) / l2, mu=mu, mu_share=share, l1=l1, l2=l2,
        epsilon_before=before, epsilon_after=after, beta=encoding.tail)
