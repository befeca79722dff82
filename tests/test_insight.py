"""Seeing what heads learned and finding them again: `heads sweep` (probing curve), model cards and training
records, experiment tracking (TensorBoard read back), `heads report` (rendered in headless Chromium when it is
installed), lineage in the catalog (`heads ls`, `featstore ls --heads`, gc), and the distribution name."""

from __future__ import annotations

import base64
import csv
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

import featstore
from featstore.cli import main as featstore_main
from featstore.errors import ConfigError
from featstore.store import format as fmt
from heads import Head, TrainConfig, evaluate_heads, train
from heads.cli import main as heads_main

from .conftest import copy_path, edit_attrs, sequence_store


def _config(stores, out, heads, **options):
    return TrainConfig(store=stores["train"], eval_store=options.pop("eval_store", stores["dev"]), out=str(out),
                       heads=heads, batch_size=16, progress=False, **options)


def _check_png(path: Path) -> None:
    """A real picture: decodes, has a size, and is not one flat colour."""
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100 and np.ptp(image[..., :3]) > 0.1, path


@pytest.fixture(scope="module")
def multi_run(ner_stores, tmp_path_factory):
    """Three heads trained together (adapter, scalar mix, linear probe), with TensorBoard tracking."""
    out = tmp_path_factory.mktemp("multi")
    train(_config(ner_stores, out, [{"type": "adapter", "lr": 0.01}, {"type": "scalar_mix"},
                                    {"type": "linear", "layers": [1]}], epochs=3, report_to="tensorboard"))
    return out


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- heads sweep ------------------------------------------------------------------------------------------
def test_sweep_trains_a_probe_per_layer_and_draws_the_probing_curve(ner_stores, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert heads_main(["sweep", "--store", ner_stores["train"], "--eval-store", ner_stores["dev"], "--out", str(out),
                       "--epochs", "2", "--lr", "0.05", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    table = json.loads((out / "sweep.json").read_text())
    assert printed["best_layer"] == table["best_layer"] and table["head_type"] == "linear"
    assert [row["layer"] for row in table["layers"]] == [0, 1, 2]  # every stored layer of the tiny BERT
    with (out / "sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(row["layer"]), float(row["f1"])) for row in rows] == [(row["layer"], row["f1"])
                                                                       for row in table["layers"]]
    # each layer's score is its saved probe's score on the eval store
    scores = evaluate_heads([row["head"] for row in table["layers"]], ner_stores["dev"])
    for row, result in zip(table["layers"], scores):
        assert Head.from_pretrained(row["head"]).config.layers == [row["layer"]]
        assert result["metrics"]["f1"] == pytest.approx(row["f1"])
    assert table["best"] == max(row["f1"] for row in table["layers"])
    _check_png(out / "sweep.png")


def test_sweep_needs_an_eval_store_and_a_probe_type(ner_stores, tmp_path):
    with pytest.raises(SystemExit):  # argparse: mlp and linear only
        heads_main(["sweep", "--store", ner_stores["train"], "--eval-store", ner_stores["dev"], "--out",
                    str(tmp_path), "--head", "adapter"])
    assert heads_main(["sweep", "--store", ner_stores["train"], "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()  # refused before anything was trained


# --- model card and training record ------------------------------------------------------------------------
def test_a_saved_head_carries_its_training_record_and_model_card(ner_stores, multi_run):
    head = Head.from_pretrained(multi_run / "adapter")
    record = head.training_record
    with featstore.open_store(ner_stores["train"]) as train_store, featstore.open_store(ner_stores["dev"]) as dev:
        assert record.train_store_fingerprint == train_store.fingerprint == head.config.store_fingerprint
        assert record.eval_store_fingerprint == dev.fingerprint
        measured = evaluate_heads([head], dev)[0]["metrics"]
    assert record.metrics["f1"] == pytest.approx(measured["f1"])  # the saved epoch's weights, re-scored
    assert record.recipe["lr"] == 0.01 and record.recipe["epochs"] == 3 and record.recipe["batch_size"] == 16
    evals = [row for row in _log(multi_run) if row["event"] == "eval" and row["head"] == "adapter"]
    assert record.epoch == max(evals, key=lambda row: row["f1"])["epoch"]
    card = (multi_run / "adapter" / "README.md").read_text()
    config = json.loads((multi_run / "adapter" / "config.json").read_text())
    for fact in (head.config.encoder.weights_sha256, record.train_store_fingerprint, record.eval_store_fingerprint,
                 config["weights_sha256"], f"{record.metrics['f1']:.4f}", "token-classification", "`B-PER`",
                 "Head.from_pretrained", "heads predict"):
        assert fact in card, fact
    assert card.startswith("---\nlibrary_name: featstore\n")


# --- experiment tracking ------------------------------------------------------------------------------------
def test_tensorboard_receives_the_jsonl_records(multi_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(multi_run / "tensorboard")).Reload()
    log = _log(multi_run)
    for name in ("adapter", "scalar_mix", "linear"):
        evals = [row for row in log if row["event"] == "eval" and row["head"] == name]
        logged = events.Scalars(f"{name}/eval/f1")
        assert [(event.step, event.value) for event in logged] == \
            [(row["epoch"], pytest.approx(row["f1"], abs=1e-6)) for row in evals]
        losses = [row for row in log if row["event"] == "train" and row["head"] == name]
        assert [(event.step, event.value) for event in events.Scalars(f"{name}/train/loss")] == \
            [(row["global_step"], pytest.approx(row["loss"], rel=1e-6)) for row in losses]
    assert "adapter/eval/per_type/PER/f1" in events.Tags()["scalars"]


def test_a_tracker_that_is_not_installed_is_named_with_its_install_command(ner_stores, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it fails as when it is not installed
    with pytest.raises(ConfigError, match=re.escape(featstore.install_hint("wandb"))):
        train(_config(ner_stores, tmp_path, [{"type": "linear", "layers": [1]}], epochs=1, report_to="wandb"))
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before the first epoch


class _Recorder:
    """Stands in for the wandb / mlflow module: records what the tracker calls."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return self

        return call


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_wandb_and_mlflow_get_every_record_at_its_step(ner_stores, tmp_path, monkeypatch, name):
    fake = _Recorder()
    monkeypatch.setitem(sys.modules, name, fake)
    train(_config(ner_stores, tmp_path, [{"type": "linear", "layers": [1]}], epochs=2, report_to=name))
    log = _log(tmp_path)
    logged = [call for call in fake.calls if call[0] in ("log", "log_metrics")]
    assert len(logged) == len(log)  # one call per metrics.jsonl record
    evals = [(record, call) for record, call in zip(log, logged) if record["event"] == "eval"]
    for record, (_, args, kwargs) in evals:
        values = args[0]
        assert values["linear/eval/f1"] == pytest.approx(record["f1"])
        assert (values["epoch"] if name == "wandb" else kwargs["step"]) == record["epoch"]
    assert [call[0] for call in fake.calls][-1] == ("finish" if name == "wandb" else "end_run")


# --- heads report -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def multi_report(multi_run, ner_stores, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert heads_main(["report", str(multi_run), "--store", ner_stores["dev"], "--out", str(out)]) == 0
    return out


def test_report_compares_the_heads_of_a_run_with_the_numbers_of_evaluate(multi_run, multi_report, ner_stores):
    summary = json.loads((multi_report / "report.json").read_text())
    names = [head["name"] for head in summary["heads"]]
    assert sorted(names) == ["adapter", "linear", "scalar_mix"]
    measured = evaluate_heads([multi_run / name for name in names], ner_stores["dev"])
    for head, result in zip(summary["heads"], measured):
        assert head["metrics"]["f1"] == pytest.approx(result["metrics"]["f1"])
        assert head["per_label"] == result["metrics"]["per_type"]  # entity types, as seqeval scores them
        for figure in head["figures"].values():
            _check_png(multi_report / figure)
    adapter = summary["heads"][names.index("adapter")]
    by_label = adapter["layer_weights"]["by_label"]
    assert sorted(by_label) == ["B-LOC", "B-PER", "O"]
    for weights in by_label.values():  # per token the layer weights are a softmax: their mean sums to 1
        assert list(weights) == ["0", "1", "2"] and sum(weights.values()) == pytest.approx(1, abs=1e-5)
    mix = summary["heads"][names.index("scalar_mix")]["layer_weights"]["scalar_mix"]
    assert sum(mix.values()) == pytest.approx(1)
    page = (multi_report / "index.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    # self-contained: learning curves + per head (per label, confusion) + adapter attention + scalar mix weights
    assert len(images) == 1 + 2 * 3 + 1 + 1
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    _check_png(multi_report / "learning_curves.png")


def test_report_of_a_single_head_uses_its_recorded_eval_store(ner_stores, tmp_path):
    train(_config(ner_stores, tmp_path / "head", [{"type": "linear", "layers": [2]}], epochs=1))
    page = tmp_path / "report"
    assert heads_main(["report", str(tmp_path / "head"), "--out", str(page)]) == 0
    summary = json.loads((page / "report.json").read_text())
    assert summary["eval_store"] == ner_stores["dev"] and summary["heads"][0]["metrics"]["f1"] >= 0
    assert (page / "linear_confusion.png").is_file()


@pytest.mark.parametrize("regression", [False, True], ids=["classification", "regression"])
def test_report_of_sequence_heads(tiny_models, tmp_path, regression):
    stores = {split: sequence_store(tiny_models["bert"], tmp_path, split, count, seed, regression)
              for split, count, seed in (("train", 120, 1), ("dev", 60, 2))}
    train(_config(stores, tmp_path / "head", [{"type": "adapter"}], epochs=2))
    assert heads_main(["report", str(tmp_path / "head"), "--out", str(tmp_path / "report")]) == 0
    (head,) = json.loads((tmp_path / "report" / "report.json").read_text())["heads"]
    if regression:  # no labels: metrics and learning curves only
        assert set(head["metrics"]) == {"pearson", "spearman", "mse"} and head["per_label"] == {}
        assert head["figures"] == {}
        return
    per_label = head["per_label"]  # from the confusion matrix: its supports and recalls give the accuracy
    assert sorted(per_label) == ["no", "yes"] and sum(row["support"] for row in per_label.values()) == 60
    correct = sum(row["recall"] * row["support"] for row in per_label.values())
    assert correct / 60 == pytest.approx(head["metrics"]["accuracy"])
    by_label = head["layer_weights"]["by_label"]
    assert all(sum(weights.values()) == pytest.approx(1, abs=1e-5) for weights in by_label.values())
    assert len(head["figures"]) == 3


def test_report_refuses_a_directory_without_heads(tmp_path):
    assert heads_main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium (Debian: apt-get install chromium) "
                    "is not installed")
def test_report_renders_in_a_browser_with_the_numbers_of_the_metrics(multi_report, tmp_path):
    page = (multi_report / "index.html").as_uri()
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*browser, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    summary = json.loads((multi_report / "report.json").read_text())
    cells = re.findall(r"<td>([^<]*)</td>", dom)
    for head in summary["heads"]:
        assert f"{head['metrics']['f1']:.4f}" in cells and f"{head['metrics']['precision']:.4f}" in cells
    assert dom.count("<img") == 9
    shot = tmp_path / "page.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1200,2000", page], capture_output=True,
                   timeout=120, check=True)
    _check_png(shot)


# --- lineage in the catalog ---------------------------------------------------------------------------------
@pytest.fixture()
def catalog(ner_stores, tmp_path):
    root = tmp_path / "catalog"
    root.mkdir()
    stores = {split: copy_path(ner_stores[split], root / f"{split}.zarr") for split in ("train", "dev")}
    return root, stores


def test_heads_registered_with_a_catalog_are_listed_with_their_stores(catalog, tmp_path, capsys):
    root, stores = catalog
    summary = train(TrainConfig(store=stores["train"], eval_store=stores["dev"], out=str(tmp_path / "adapter"),
                                heads=[{"type": "adapter"}], epochs=1, progress=False, catalog=str(root)))
    assert Path(summary["adapter"]["catalog_record"]).is_file()
    capsys.readouterr()
    assert heads_main(["ls", str(root), "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["name"] == "adapter" and row["location"] == str((tmp_path / "adapter").resolve())
    assert {role: store["location"] for role, store in row["stores"].items()} == {"train": stores["train"],
                                                                                "eval": stores["dev"]}
    assert row["metrics"]["f1"] == pytest.approx(summary["adapter"]["best"])
    assert featstore_main(["ls", str(root), "--heads", "--json"]) == 0
    listed = {Path(item["path"]).stem: item["heads"] for item in map(json.loads, capsys.readouterr().out.splitlines())}
    assert listed == {"train": ["adapter"], "dev": ["adapter"]}


def test_gc_keeps_the_stores_a_registered_head_names_unless_asked(catalog, tmp_path, capsys):
    root, stores = catalog
    # a probe trained without an eval store names the train store only
    train(TrainConfig(store=stores["train"], out=str(tmp_path / "probe"), heads=[{"type": "linear", "layers": [1]}],
                      epochs=1, progress=False))
    assert heads_main(["register", str(tmp_path / "probe"), "--catalog", str(root)]) == 0
    assert featstore_main(["gc", str(root), "--unused", "--delete"]) == 0
    assert not Path(stores["dev"]).exists() and Path(stores["train"]).exists()  # dev: no head names it
    edit_attrs(stores["train"], lambda attrs: attrs.update(status=fmt.STATUS_WRITING))  # abandoned mid-write
    capsys.readouterr()
    assert featstore_main(["gc", str(root), "--delete"]) == 0
    assert "kept" in capsys.readouterr().out and Path(stores["train"]).exists()
    assert featstore_main(["gc", str(root), "--delete", "--include-named"]) == 0
    assert not Path(stores["train"]).exists()


# --- the distribution --------------------------------------------------------------------------------------
def test_the_distribution_name_is_the_installed_one_and_names_its_extras():
    distribution = importlib.metadata.distribution(featstore.DISTRIBUTION)
    assert distribution.metadata["Name"] == featstore.DISTRIBUTION != "featstore"
    extras = distribution.metadata.get_all("Provides-Extra")
    assert {"ray", "tensorboard", "wandb", "mlflow", "hdf5-compression", "lora"} <= set(extras)
    scripts = {entry.name for entry in distribution.entry_points if entry.group == "console_scripts"}
    assert scripts == {"featstore", "heads"}
