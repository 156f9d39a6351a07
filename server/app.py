"""The dpfl ServerApp: FedAvg rounds over DP clients, central evaluation, the run directory.

The entry point is a list of steps; the round loop is server/loop.py, one round's
algorithm server/strategy.py.
"""

from __future__ import annotations

import logging
import math
import sys
import time

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common import audit
from common.config import ExperimentConfig, parse_config
from common.data import held_out_split, input_spec, partitions_of
from common.errors import DataError
from common.models import (
    MODEL_FEATURES,
    build_model,
    count_parameters,
    dp_problem,
    evaluate,
    get_weights,
    set_weights,
)
from common.records import RunDir, run_dir
from common.split import Split
from server import checkpoint, loop
from server.audit import CanaryScorer
from server.strategy import CohortFedAvg

app = ServerApp()
log = logging.getLogger("dpfl.server")


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s dpfl | %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def partition_sizes(cfg: ExperimentConfig) -> dict[int, int]:
    """Records per partition of the shared training set (bounds each client's
    num-examples); empty if the server cannot compute them."""
    try:
        parts = partitions_of(cfg.data, cfg.federation.num_partitions)
    except (DataError, OSError) as exc:
        log.warning("cannot compute partition sizes (%s): num-examples is bounded by what "
                    "each node declared", exc)
        return {}
    return {i: len(p) + audit.slot_count(cfg.audit.audit_canaries, len(parts), i)
            for i, p in enumerate(parts)}


def evaluator(test: Split | None, model: torch.nn.Module) -> loop.Evaluate:
    """Global model weights -> (loss, accuracy) on the test set (NaN, NaN without one)."""

    def run(weights: loop.Weights) -> tuple[float, float]:
        if test is None:
            return math.nan, math.nan
        set_weights(model, weights)
        return evaluate(model, test.images, test.labels)

    return run


def server_test_set(cfg: ExperimentConfig) -> Split | None:
    """The test set the server evaluates on. A run that evaluates at the nodes
    (evaluation=federated) needs none: where the server cannot read one, its evaluation
    is the federation's alone (None)."""
    features = MODEL_FEATURES.get(cfg.train.model, "")
    try:
        return held_out_split(cfg.data, features)
    except (DataError, OSError) as exc:
        if not cfg.evaluation.federated:
            raise
        log.info("no test set at the server (%s): the nodes' federated evaluation is the "
                 "run's only one", exc)
        return None


def describe(cfg: ExperimentConfig, state: loop.RunState, run: RunDir, parameters: int) -> None:
    fed, priv = cfg.federation, cfg.privacy
    log.info("run directory %s", run.path)
    log.info("%d rounds, %d of %d clients a round, %s, model %s (%d parameters), aggregation %s",
             fed.num_rounds, fed.clients_per_round(state.num_clients), state.num_clients,
             f"DP-SGD target epsilon={priv.target_epsilon} delta={priv.target_delta}"
             if priv.private else "NON-PRIVATE", cfg.train.model, parameters, cfg.server.aggregation)


@app.main()
def main(grid: Grid, context: Context) -> None:
    _setup_logging()
    started = time.time()
    cfg = parse_config(context.run_config)
    log.info("ServerApp started")
    run = RunDir(run_dir(cfg.runtime.output_dir, cfg.runtime.run_name, context.run_id))
    ckpt = checkpoint.load_matching(run.path, cfg) if cfg.runtime.resume else None
    run.create(resume=cfg.runtime.resume)
    torch.manual_seed(cfg.data.seed)
    if cfg.runtime.num_threads > 0:
        torch.set_num_threads(cfg.runtime.num_threads)
    test = server_test_set(cfg)
    shape, classes = (test.shape, test.num_classes) if test is not None else \
        input_spec(cfg.data, MODEL_FEATURES.get(cfg.train.model, ""))
    model = build_model(cfg.train.model, seed=cfg.data.seed, shape=shape, classes=classes)
    problem = dp_problem(model, cfg.train.model) if cfg.privacy.private else None
    if problem:
        raise ValueError(problem)
    parameters = count_parameters(model)
    log.info("%s and model ready; discovery of the federation",
             "test set" if test is not None else "no test set")
    strategy = CohortFedAvg(cfg, partition_sizes=partition_sizes(cfg))
    if ckpt is not None:
        state = loop.restore(grid, cfg, strategy, run, ckpt)
    else:
        state = loop.start(grid, cfg, strategy, run, model=get_weights(model),
                           run_id=context.run_id, model_parameters=parameters)
    describe(cfg, state, run, parameters)
    scorer = None
    if cfg.audit.audit_canaries:
        scorer = CanaryScorer(cfg, shape, classes)
        if ckpt is not None:
            scorer.load(run.canary_scores())
        log.info("privacy audit: %d canaries, each in training with probability 1/2",
                 cfg.audit.audit_canaries)
    stopped = loop.run_rounds(grid, cfg, strategy, run, state, evaluator(test, model), started,
                              scorer)
    loop.finish(cfg, strategy, run, state, stopped, started, scorer)
