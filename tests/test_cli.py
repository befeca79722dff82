"""What a newcomer sees on the command line: help with defaults, versions, quiet runs, valid JSON output."""

from __future__ import annotations

import argparse
import json

import pytest

import featstore
from featstore.cli import build_parser as featstore_parser
from featstore.cli import main as featstore_main
from heads import HEAD_TYPES
from heads.cli import build_parser as heads_parser
from heads.cli import main as heads_main


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("build", [featstore_parser, heads_parser])
def test_every_option_has_a_description(build):
    for name, command in _subcommands(build()).items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help text"


def test_training_help_shows_the_defaults():
    def option_help(command: argparse.ArgumentParser, flag: str) -> str:
        options = command.format_help().split("options:", 1)[1]
        return " ".join(options.split("\n  " + flag, 1)[1].split("\n  -", 1)[0].split())

    train = _subcommands(heads_parser())["train"]
    lr_by_type = ", ".join(f"{name} {kind.lr:g}" for name, kind in HEAD_TYPES.items())
    for flag, default in (("--epochs", "10, or as many as make 3,000 steps"), ("--batch-size", "32"),
                          ("--lr", f"by head type: {lr_by_type}"), ("--patience", "3")):
        assert f"default: {default}" in option_help(train, flag), flag
    assert "default: " in option_help(_subcommands(featstore_parser())["extract"], "--max-batch-tokens")


@pytest.mark.parametrize("main,name", [(featstore_main, "featstore"), (heads_main, "heads")])
def test_version(main, name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"{name} {featstore.__version__}"


def test_no_progress_silences_every_bar(tiny_models, conll_corpus, tmp_path, capfd):
    assert featstore_main(["extract", "--model", tiny_models["bert"], "--corpus", str(conll_corpus), "--out",
                           str(tmp_path / "s.zarr"), "--no-progress"]) == 0
    assert "it/s" not in capfd.readouterr().err  # neither the extraction bar nor the model-loading bar


def test_training_without_an_eval_store_prints_valid_json(tiny_models, conll_corpus, tmp_path, capsys):
    featstore_main(["extract", "--model", tiny_models["bert"], "--corpus", str(conll_corpus), "--out",
                    str(tmp_path / "s.zarr"), "--no-progress"])
    capsys.readouterr()
    assert heads_main(["train", "--store", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "head"), "--head",
                       "linear", "--epochs", "2", "--no-progress"]) == 0

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    summary = json.loads(capsys.readouterr().out, parse_constant=refuse)["linear"]
    assert summary["saved_epoch"] == 2 and summary["best"] is None
    assert summary["selected_by"] == "last epoch (no --eval-store given)"


def test_unknown_keys_in_a_training_config_are_refused(tmp_path, capsys):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"store": "s", "out": "o", "epoch": 3}))
    assert heads_main(["train", "--config", str(config)]) == 2
    assert "unknown option(s) epoch" in capsys.readouterr().err


def test_a_refused_re_extraction_fails_before_the_encoder_loads(tiny_models, conll_corpus, tmp_path, monkeypatch,
                                                                capsys):
    from featstore.extraction.encoder import FrozenEncoder

    out = str(tmp_path / "s.zarr")
    assert featstore_main(["extract", "--model", tiny_models["bert"], "--corpus", str(conll_corpus), "--out", out,
                           "--no-progress"]) == 0
    other = tmp_path / "other.conll"
    other.write_text("Ann B-PER\n")

    def never(*args, **kwargs):
        raise AssertionError("the encoder was loaded")

    monkeypatch.setattr(FrozenEncoder, "load", never)
    capsys.readouterr()
    for extra in (["--corpus", str(other)], ["--corpus", str(conll_corpus), "--dtype", "float32"]):
        assert featstore_main(["extract", "--model", tiny_models["bert"], "--out", out, *extra]) == 2
        assert "already holds a store made with different arguments" in capsys.readouterr().err
