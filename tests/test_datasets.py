"""Datasets beyond Fashion-MNIST: scikit-learn's bundled sets (offline) and a user's
CSV or Parquet table, read from files the tests write; bad tables are refused naming the
file and the column; whole private runs on them (the real ServerApp loop and ClientApp)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.app.message.message import make_message

from client.app import query as client_query
from common import keys
from common.config import ConfigError, data_config, resolve_config
from common.data import held_out_split, input_spec, load_split, partitions_of
from common.errors import DataError
from common.models import build_model
from common.node import parse_node_config
from common.records import RunDir
from server import app as server_app
from tests.helpers import context, metadata, run_config
from tests.local_grid import LocalGrid


def _table(n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5))
    y = np.where(x[:, 0] + 0.5 * x[:, 1] > 0, "sick", "well")
    df = pd.DataFrame(x, columns=[f"f{i}" for i in range(5)])
    df["diagnosis"] = y
    return df


def _run(out, num_nodes=10, **over):
    """A whole run: the real ServerApp loop against the real ClientApp of `num_nodes`
    nodes, in process; its run directory."""
    grid = LocalGrid(num_nodes, **over)
    rc = {**run_config(**over), "output-dir": str(out)}
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=rc))
    (path,) = [p for p in Path(out).iterdir() if p.is_dir()]
    return RunDir(path)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_table_is_read_with_its_label_column_and_a_recorded_test_split(tmp_path, kind):
    df = _table()
    path = tmp_path / f"t.{kind}"
    df.to_csv(path, index=False) if kind == "csv" else df.to_parquet(path)
    cfg = resolve_config({"dataset": f"{kind}:{path}", "label-column": "diagnosis"})
    assert cfg.train.model == "logreg"  # model=auto on a table
    test, train = held_out_split(cfg.data), load_split(data_config(dataset=cfg.data.dataset, label_column="diagnosis"), "train")
    assert len(test) == 40 and len(train) == 160  # 20% carved out for the server's evaluation
    assert train.shape == (5,) and train.num_classes == 2
    assert set(np.unique(train.labels)) == {0, 1}  # "sick" -> 0, "well" -> 1 (sorted)
    assert abs(float(train.images.mean())) < 0.1  # standardised with the training part
    assert input_spec(cfg.data) == ((5,), 2)
    again = held_out_split(cfg.data)
    assert np.array_equal(again.labels, test.labels)  # the same split every time
    parts = partitions_of(cfg.data, 4)
    assert sum(len(p) for p in parts) == 160


@pytest.mark.parametrize("mangle,message", [
    (lambda df: df.drop(columns=["diagnosis"]), "no label column 'diagnosis'"),
    (lambda df: df.assign(diagnosis="sick"), "one class"),
    (lambda df: df.assign(f2=["x"] * len(df)), "column.*f2.*not numeric"),
    (lambda df: df.assign(f3=[np.nan] + [1.0] * (len(df) - 1)), "missing or non-finite"),
])
def test_bad_tables_are_refused_naming_file_and_column(tmp_path, mangle, message):
    path = tmp_path / "bad.csv"
    mangle(_table()).to_csv(path, index=False)
    with pytest.raises(DataError, match=message) as err:
        load_split(data_config(dataset=f"csv:{path}", label_column="diagnosis"), "train")
    assert str(path) in str(err.value)


def test_unreadable_and_missing_files_and_unknown_datasets_are_named(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataError, match=f"{bad}.*unreadable as parquet"):
        load_split(data_config(dataset=f"parquet:{bad}", label_column="label"), "train")
    with pytest.raises(DataError, match="no such file"):
        load_split(data_config(dataset=f"csv:{tmp_path / 'none.csv'}", label_column="label"), "train")
    with pytest.raises(ConfigError, match="dataset"):
        resolve_config({"dataset": "cifar10"})
    with pytest.raises(ConfigError, match="model.*scattering.*table"):
        resolve_config({"dataset": "breast-cancer", "model": "scatter-linear"})
    table = tmp_path / "t.csv"
    _table().to_csv(table, index=False)
    with pytest.raises(DataError, match=f"{table}.*computed from images"):
        load_split(data_config(dataset=f"csv:{table}", label_column="diagnosis"), "train", "scatter")


def test_bundled_datasets_are_real_and_offline():
    digits = load_split(data_config(dataset="digits"), "train")
    cancer = load_split(data_config(dataset="breast-cancer"), "test")
    assert digits.shape == (1, 8, 8) and digits.num_classes == 10 and len(digits) == 1438
    assert cancer.shape == (30,) and cancer.num_classes == 2 and len(cancer) == 114
    model = build_model("mlp", shape=digits.shape, classes=digits.num_classes)
    assert model(__import__("torch").from_numpy(digits.images[:3])).shape == (3, 10)


@pytest.mark.slow
@pytest.mark.parametrize("dataset,floor", [("digits", 0.6), ("breast-cancer", 0.8)])
def test_a_private_run_on_a_bundled_dataset_learns_within_budget(tmp_path, dataset, floor):
    """10 clients, every one every round, epsilon 3: far above chance (10% / 63%)."""
    over = {"dataset": dataset, "data-dir": "", "model": "auto", "num-rounds": 30,
            "fraction-train": 1.0, "target-epsilon": 3.0}
    run = _run(tmp_path, **over)
    path = run.path
    summary = run.summary()
    assert summary.final_accuracy > floor and summary.epsilon_max <= 3.0
    config = json.loads((path / "config.json").read_text())["run_config"]
    assert config["dataset"] == dataset and config["model"] == "logreg"  # auto, resolved


@pytest.mark.slow  # seconds of real work; the fast suite stays under a minute
def test_a_user_model_by_import_path_trains_privately_end_to_end(tmp_path):
    over = {"dataset": "digits", "data-dir": "", "model": "tests.user_models:small",
            "num-rounds": 10, "fraction-train": 1.0, "target-epsilon": 3.0}
    path = _run(tmp_path, **over).path
    summary = RunDir(path).summary()
    assert summary.final_accuracy > 0.3 and summary.epsilon_max <= 3.0
    weights = np.load(path / "model.npz")
    assert weights["2.weight"].shape == (32,)  # the user's GroupNorm, trained and saved


@pytest.mark.parametrize("model,message", [
    ("cnn", r"takes records of shape \(1, 28, 28\), not \(1, 8, 8\)"),
    ("tests.user_models:with_batchnorm", "BatchNorm.*ModuleValidator.fix"),
    ("tests.user_models:not_a_model", "not a torch.nn.Module"),
    ("tests.user_models:missing", "cannot import it"),
    ("no_such_package.models:build", "cannot import it"),
])
def test_a_bad_user_model_is_refused_before_anything_starts(tmp_path, model, message):
    from simulations.simulate import prepare

    with pytest.raises(ConfigError, match=message):
        prepare({"dataset": "digits", "model": model}, output_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())  # nothing created


def test_a_model_name_that_is_neither_registered_nor_a_path_is_refused():
    with pytest.raises(ConfigError, match="package.module:builder"):
        resolve_config({"model": "resnet"})


def test_natural_partitions_make_each_id_a_client_end_to_end(tmp_path):
    """A table whose `hospital` column says who holds each record: one client per
    hospital, holding exactly that hospital's training records."""
    df = _table(n=300, seed=1)
    df["hospital"] = np.random.default_rng(2).choice(["north", "south", "east", "west"], 300)
    path = tmp_path / "h.csv"
    df.to_csv(path, index=False)
    over = {"dataset": f"csv:{path}", "label-column": "diagnosis", "partitioner": "natural",
            "partition-by": "hospital", "num-partitions": 4, "data-dir": "", "model": "auto"}
    cfg = resolve_config(over)
    parts = partitions_of(cfg.data, 4)
    train = load_split(data_config(dataset=cfg.data.dataset, label_column="diagnosis", partition_by="hospital", partitioner="natural"), "train")
    assert train.shape == (5,)  # the id column is not a feature
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(train)))
    carved = df.iloc[np.random.default_rng(0).permutation(300)[60:]]  # the carved training part
    for p, name in zip(parts, ["east", "north", "south", "west"], strict=True):
        assert len(p) == int((carved["hospital"] == name).sum())
    with pytest.raises(DataError, match="4 distinct ids.*num-partitions=4"):
        partitions_of(resolve_config({**over, "num-partitions": 3}).data, 3)
    with pytest.raises(ConfigError, match="partitioner"):
        resolve_config({"partitioner": "natural", "partition-by": "hospital"})

    run_over = {**over, "num-rounds": 5, "fraction-train": 1.0, "target-epsilon": 3.0,
                "min-train-clients": 2, "min-available-clients": 2}
    run = _run(tmp_path / "runs", 4, **run_over)
    rows = run.rounds()
    assert all(sorted(r.partitions_trained) == [0, 1, 2, 3] for r in rows)
    assert run.summary().epsilon_max <= 3.0


def _image_folder(root, sizes=((12, 12),) * 30):
    """Class folders of small grayscale PNGs: bright images are class 'light'."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, size in enumerate(sizes):
        cls = "light" if i % 2 else "dark"
        (root / cls).mkdir(parents=True, exist_ok=True)
        base = 200 if cls == "light" else 40
        pixels = np.clip(base + rng.normal(0, 20, size), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(root / cls / f"{i}.png")


def test_an_image_folder_is_read_with_its_classes_and_refused_with_mixed_sizes(tmp_path):
    _image_folder(tmp_path / "imgs")
    train = load_split(data_config(dataset=f"imagefolder:{tmp_path / 'imgs'}"), "train")
    assert train.shape == (1, 12, 12) and train.num_classes == 2 and len(train) == 24
    bright = train.images.reshape(len(train), -1).mean(axis=1)
    assert bright[train.labels == 1].min() > bright[train.labels == 0].max()  # 'light' after 'dark'
    _image_folder(tmp_path / "mixed", sizes=[(12, 12)] * 5 + [(10, 12)] + [(12, 12)] * 10)
    with pytest.raises(DataError, match="mixed shapes"):
        load_split(data_config(dataset=f"imagefolder:{tmp_path / 'mixed'}"), "train")
    with pytest.raises(DataError, match="no such folder"):
        load_split(data_config(dataset=f"imagefolder:{tmp_path / 'none'}"), "train")


def test_a_saved_hugging_face_dataset_uses_its_own_test_split(tmp_path):
    import datasets

    df = _table(n=120)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_pandas(df[:100]),
                               "test": datasets.Dataset.from_pandas(df[100:])})
    dd.save_to_disk(str(tmp_path / "saved"))
    ds = f"disk:{tmp_path / 'saved'}"
    train = load_split(data_config(dataset=ds, label_column="diagnosis"), "train")
    test = load_split(data_config(dataset=ds, label_column="diagnosis"), "test")
    assert len(train) == 100 and len(test) == 20 and train.shape == (5,)  # nothing carved


def test_hf_names_load_a_local_dataset_folder_and_fail_clearly_offline(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # hermetic: never the Hub
    folder = tmp_path / "local"
    folder.mkdir()
    _table(n=150).to_csv(folder / "train.csv", index=False)
    train = load_split(data_config(dataset=f"hf:{folder}", label_column="diagnosis"), "train")
    assert len(train) == 120 and train.num_classes == 2  # one split: 20% carved out
    with pytest.raises(DataError, match="hf dataset no-such-user/no-such-dataset: cannot load"):
        load_split(data_config(dataset="hf:no-such-user/no-such-dataset", label_column="label"), "train")


def test_the_groupnorm_resnet_takes_colour_images_and_opacus_accepts_it():
    import torch

    from common.models import dp_problem

    model = build_model("resnet-gn", seed=0, shape=(3, 32, 32), classes=10)
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    assert dp_problem(model, "resnet-gn") is None
    assert build_model("resnet-gn", shape=(1, 8, 8), classes=10)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="takes images"):
        build_model("resnet-gn", shape=(30,), classes=2)


@pytest.mark.slow
def test_secure_aggregation_and_an_audit_run_on_another_dataset(tmp_path):
    """The integer release, the server's decoding and the auditor take the dataset's
    shape and classes (breast-cancer: 30 features, 2 classes)."""
    over = {"dataset": "breast-cancer", "data-dir": "", "model": "auto", "num-rounds": 6,
            "fraction-train": 1.0, "target-epsilon": 3.0, "secure-aggregation": "secagg+",
            "noise": "distributed", "audit-canaries": 40}
    run = _run(tmp_path, **over)
    assert all(r.aggregated for r in run.rounds()) and run.summary().epsilon_max <= 3.0
    assert run.summary().final_accuracy > 0.7
    assert run.audit()["canaries"] == 40


def test_an_image_folder_without_the_partition_column_is_named(tmp_path):
    _image_folder(tmp_path / "imgs")
    with pytest.raises(DataError, match="no column 'hospital' to partition by"):
        load_split(data_config(dataset=f"imagefolder:{tmp_path / 'imgs'}", label_column="label", partition_by="hospital", partitioner="natural"), "train")


@pytest.mark.slow  # seconds of real work; the fast suite stays under a minute
def test_scattering_features_for_images_of_any_size_and_channels():
    from common.features import feature_shape, scattering

    assert feature_shape("scatter", (1, 28, 28)) == (81, 7, 7)
    assert feature_shape("scatter", (3, 32, 32)) == (243, 8, 8)
    x = np.random.default_rng(0).standard_normal((4, 3, 12, 16)).astype(np.float32)
    f = scattering(x)
    assert f.shape == (4, 243, 3, 4)
    # channel-major: channel 1's 81 coefficients are the transform of channel 1 alone
    assert np.allclose(scattering(x[:, 1:2]), f[:, 81:162], atol=1e-5)
    with pytest.raises(ValueError, match="at least 8x8"):
        feature_shape("scatter", (1, 4, 4))
    cfg = resolve_config({"dataset": "digits", "model": "scatter-linear"})
    assert input_spec(cfg.data, "scatter") == ((81, 2, 2), 10)
    train = load_split(data_config(dataset="digits"), "train", "scatter")
    assert train.shape == (81, 2, 2) and len(train) == 1438 and train.num_classes == 10
    model = build_model("scatter-linear", shape=(243, 8, 8), classes=10)
    assert model(__import__("torch").zeros(2, 243, 8, 8)).shape == (2, 10)


@pytest.mark.slow
def test_scattering_trains_privately_on_another_image_dataset(tmp_path):
    over = {"dataset": "digits", "data-dir": "", "model": "scatter-linear", "num-rounds": 30,
            "fraction-train": 1.0, "target-epsilon": 3.0, "learning-rate": 2.0}
    run = _run(tmp_path, **over)
    summary = run.summary()
    assert summary.final_accuracy > 0.6 and summary.epsilon_max <= 3.0


def test_the_class_list_and_standardisation_are_the_run_s_choice(tmp_path):
    df = _table()
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    ds = f"csv:{path}"
    standardised = load_split(data_config(dataset=ds, label_column="diagnosis"), "train")
    given = load_split(data_config(dataset=ds, label_column="diagnosis", standardize=False), "train")
    carved = df.iloc[np.random.default_rng(0).permutation(len(df))[40:]]
    assert np.allclose(given.images, carved[[f"f{i}" for i in range(5)]].to_numpy(), atol=1e-6)
    assert np.abs(standardised.images.mean(axis=0)).max() < 1e-5
    assert not np.allclose(standardised.images, given.images)
    reordered = load_split(data_config(dataset=ds, label_column="diagnosis", standardize=True, classes="well,sick"), "train")
    assert (reordered.labels == 1 - standardised.labels).all()  # sorted: sick, well
    with pytest.raises(DataError, match=r"'sick' are not in the run's classes \(well, ill\)"):
        load_split(data_config(dataset=ds, label_column="diagnosis", standardize=True, classes="well,ill"), "train")
    for bad, message in [("sick", "at least two"), ("a,,b", "empty"), ("a,b,a", "twice")]:
        with pytest.raises(ConfigError, match=f"classes.*{message}"):
            resolve_config({"classes": bad})


def _own_tables(tmp_path, sizes=(150, 120, 90)):
    """The server's copy (its evaluation data) and one table per node, of one schema."""
    df = _table(n=200 + sum(sizes), seed=3)
    df[:200].to_csv(tmp_path / "server.csv", index=False)
    paths, start = [], 200
    for i, n in enumerate(sizes):
        paths.append(tmp_path / f"node{i}.csv")
        df[start:start + n].to_csv(paths[-1], index=False)
        start += n
    return paths


def _own_node(path, **extra):
    return {"dataset": f"csv:{path}", "label-column": "diagnosis", "classes": "sick,well",
            **extra}


def test_a_deployed_node_trains_on_its_own_table(tmp_path):
    """Deployment: each node reads its own table (node config dataset, label-column,
    classes: the data holder's), used whole and as given; the server evaluates on its own
    copy. The nodes keep their default policy and never read what the run config names."""
    paths = _own_tables(tmp_path)
    over = {"dataset": f"csv:{tmp_path / 'server.csv'}", "label-column": "diagnosis",
            "classes": "sick,well", "standardize": False, "data-dir": "", "model": "auto",
            "num-partitions": 3, "num-rounds": 15, "fraction-train": 1.0,
            "target-epsilon": 3.0}
    grid = LocalGrid(3, **over)
    for p, path in enumerate(paths):
        grid.contexts[1000 + p] = context(
            partition_id=p, num_partitions=3, harness_policy=False, **over,
            node_extra=_own_node(path, **{"ledger-path": str(tmp_path / f"ledger{p}.json")}))
    rc = {**run_config(**over), "output-dir": str(tmp_path / "runs")}
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=rc))
    (path,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    run = RunDir(path)
    assert run.summary().final_accuracy > 0.8 and run.summary().epsilon_max <= 3.0
    assert all(sorted(r.partitions_trained) == [0, 1, 2] for r in run.rounds())
    for p, n in enumerate((150, 120, 90)):  # each node declares its own records, whole
        reply = client_query(make_message(metadata(message_type="query"), content=RecordDict(
            {"config": ConfigRecord({})})), grid.contexts[1000 + p])
        assert int(reply.content[keys.METRICS][keys.NUM_EXAMPLES]) == n
        assert json.loads((tmp_path / f"ledger{p}.json").read_text())["history"]  # spent, kept


def test_a_server_cannot_probe_a_node_s_own_records(tmp_path, capsys):
    """The node owns its schema: a run with other classes or standardisation is refused
    from the configs alone (the same reason whatever the file holds, or whether it
    exists); what is wrong with the node's own file goes to the node's log, and the
    server learns only that it cannot be used."""
    from tests.test_hostile_server import BUDGET, _ask

    (path, *_) = _own_tables(tmp_path)
    bad = tmp_path / "bad.csv"
    pd.concat([_table(n=50), pd.DataFrame({"f0": [0.0], "f1": [0.0], "f2": [0.0], "f3": [0.0],
                                          "f4": [0.0], "diagnosis": ["HIV+"]})]
              ).to_csv(bad, index=False)
    run = {"model": "logreg", "data_dir": "", "dataset": f"csv:{tmp_path / 'server.csv'}",
           "label_column": "diagnosis", "classes": "well,sick", "standardize": False,
           "target_epsilon": BUDGET}
    reasons = set()
    for node_file in (path, bad, tmp_path / "none.csv"):
        ctx = context(partition_id=0, harness_policy=False, **run, node_extra=_own_node(
            node_file, **{"ledger-path": str(tmp_path / "n.json"), "max-epsilon": BUDGET}))
        reply, m = _ask(ctx, 1)
        assert int(m[keys.REFUSED]) == 1
        reasons.add(str(reply.content[keys.PRIVACY][keys.REASON]))
    assert len(reasons) == 1 and "classes" in reasons.pop()  # the file changes nothing
    ctx = context(partition_id=0, harness_policy=False, **{**run, "classes": "sick,well",
                                                           "standardize": True},
                  node_extra=_own_node(path, **{"ledger-path": str(tmp_path / "n.json"),
                                                "max-epsilon": BUDGET}))
    reply, m = _ask(ctx, 1)
    assert int(m[keys.REFUSED]) == 1
    assert "standardize=false" in str(reply.content[keys.PRIVACY][keys.REASON])
    # the configs agree, the node's own file holds a label outside its classes
    ctx = context(partition_id=0, harness_policy=False, **{**run, "classes": "sick,well"},
                  node_extra=_own_node(bad, **{"ledger-path": str(tmp_path / "n2.json"),
                                               "max-epsilon": BUDGET}))
    capsys.readouterr()
    with pytest.raises(DataError) as caught:
        _ask(ctx, 1)
    assert "HIV" not in str(caught.value) and "node's log" in str(caught.value)
    assert "'HIV+' are not in the run's classes" in capsys.readouterr().err
    gone = context(partition_id=0, harness_policy=False, **{**run, "classes": "sick,well"},
                   node_extra=_own_node(tmp_path / "gone.csv", **{
                       "ledger-path": str(tmp_path / "n3.json"), "max-epsilon": BUDGET}))
    with pytest.raises(DataError) as caught:  # a missing file: its path stays on the node
        _ask(gone, 1)
    assert "gone.csv" not in str(caught.value) and "node's log" in str(caught.value)
    assert "gone.csv" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="node config classes"):
        parse_node_config({"partition-id": 0, "num-partitions": 1, "dataset": f"csv:{path}"})
    with pytest.raises(ConfigError, match="node config dataset.*data-dir"):
        parse_node_config({"partition-id": 0, "num-partitions": 1, "dataset": f"csv:{path}",
                           "classes": "a,b", "data-dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="node config dataset"):
        parse_node_config({"partition-id": 0, "num-partitions": 1, "dataset": "digits",
                           "classes": "a,b"})
