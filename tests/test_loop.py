"""The server's round loop with the real ServerApp and ClientApp in process: a round's
evaluation and records overlap the next round's training, and what they write is still
exactly the state after their own round."""

import math

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from common.config import parse_config
from common.data import held_out_split
from common.models import build_model, evaluate, set_weights
from common.records import RunDir
from server import app as server_app
from server import checkpoint
from tests.helpers import run_config
from tests.local_grid import LocalGrid

# non-private, so that the same schedule trains the same model to the last bit
OVER = {"num-rounds": 5, "fraction-train": 0.3, "target-epsilon": math.inf, "seed": 3,
        "server-ema": 0.0}  # the evaluated model is the checkpoint's


class CutGrid(LocalGrid):
    """A grid whose training messages of round `cut` never get replies: the run stops
    there, as one killed while that round trains."""

    def __init__(self, num_nodes, cut, **overrides):
        super().__init__(num_nodes, **overrides)
        self.cut, self.rounds = cut, 0

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.rounds += 1
            if self.rounds == self.cut:
                raise KeyboardInterrupt("cut off while round trains")
        return super().send_and_receive(messages, timeout)


def _run(tmp_path, grid, name, **extra):
    rc = {**run_config(**OVER), "output-dir": str(tmp_path), "run-name": name, **extra}
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=rc))
    return RunDir(tmp_path / name)


def _accuracy(weights):
    cfg = parse_config(run_config(**OVER))
    test = held_out_split(cfg.data)
    model = build_model("logreg", shape=test.shape, classes=test.num_classes)
    set_weights(model, weights)
    return evaluate(model, test.images, test.labels)[1]


def test_a_run_cut_off_while_the_next_round_trains_resumes_as_if_never_cut(tmp_path):
    whole = _run(tmp_path, LocalGrid(10, **OVER), "whole")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, CutGrid(10, cut=4, **OVER), "cut")
    cut = RunDir(tmp_path / "cut")
    # Round 3's records were written while round 4 trained, after round 4's cohort was
    # drawn: its checkpoint still holds round 3's model, evaluation and sampler.
    saved = checkpoint.load(cut.path)
    rows = cut.rounds()
    assert saved.meta["round"] == 3 and [r.round for r in rows] == [1, 2, 3]
    assert rows[-1].test_accuracy == _accuracy(saved.model)

    _run(tmp_path, LocalGrid(10, **OVER), "cut", resume=True)
    again, straight = cut.rounds(), whole.rounds()
    assert [r.partitions_sampled for r in again] == [r.partitions_sampled for r in straight]
    assert [r.test_accuracy for r in again] == [r.test_accuracy for r in straight]
    with np.load(cut.path / "model.npz") as a, np.load(whole.path / "model.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in b.files)
        assert straight[-1].test_accuracy == _accuracy({k: b[k] for k in b.files})


def test_every_round_s_row_evaluates_that_round_s_model(tmp_path):
    """The evaluation that overlaps the next round is of its own round's model: each
    round's accuracy is that of the model the checkpoint holds after it."""
    accuracies = []
    for cut in range(2, 6):
        name = f"cut{cut}"
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, CutGrid(10, cut=cut, **OVER), name)
        run = RunDir(tmp_path / name)
        saved = checkpoint.load(run.path)
        assert saved.meta["round"] == cut - 1
        accuracies.append(_accuracy(saved.model))
        assert run.rounds()[-1].test_accuracy == accuracies[-1]
        # payload both ways: the model down to each member, updates up
        assert all(r.bytes_down > r.clients_sampled * 7850 * 4 and r.bytes_up > 0
                   for r in run.rounds())
    assert len(set(accuracies)) > 1  # the model moved from round to round


# ---- the records it writes after every round ------------------------------------------------


def test_records_are_written_as_python_s_json_reads_them_back():
    import json

    from common.records import ClientRecord, PrivacyRecord, encode, pretty

    client = ClientRecord(history=[[1.1, 0.05, 19]], epsilon=math.inf, noise_multiplier=1.1)
    assert client.to_json() is client.to_json()  # encoded once
    assert client.to_json() == {**encode(client), "epsilon": "inf"}
    record = PrivacyRecord(accountant="rdp", delta=1e-5, target_epsilon=3.0, private=True,
                           clients={"10": client, "2": ClientRecord(epsilon=0.5)})
    text = pretty(encode(record.to_json()))
    assert json.loads(text) == json.loads(json.dumps(encode(record.to_json())))
    lines = text.splitlines()
    assert lines[0] == "{" and any(line.startswith('    "2": {') for line in lines)  # a client a line
    assert list(json.loads(text)["clients"]) == ["2", "10"]
    assert pretty({}) == "{}" and pretty([1, {"a": 2}]) == '[1, {"a": 2}]'


def test_malloc_keeps_freed_memory_where_glibc_runs():
    import platform

    from simulations.runtime import keep_freed_memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert keep_freed_memory() is True
