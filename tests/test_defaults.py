"""What `heads train` does with what a user leaves out: learning rate by head type, epochs that reach enough
steps, a final anneal when early stopping ends a schedule, and the layer of a probe that names none (a sweep on
the eval store, else the rule)."""

import itertools
import json

import pytest
import torch

import heads.sweep
from featstore import open_store
from featstore.errors import ConfigError
from heads import HEAD_TYPES, TrainConfig, Trainer, train
from heads.cli import main as heads_main
from heads.config import default_probe_layer
from heads.trainer import DEFAULT_EPOCHS, MAX_DEFAULT_EPOCHS, MIN_DEFAULT_STEPS, default_epochs


def _config(stores, out, heads, **options):
    return TrainConfig(store=stores["train"], eval_store=options.pop("eval_store", stores["dev"]), out=str(out),
                       heads=heads, batch_size=16, progress=False, **options)


def _stored_layers(stores):
    with open_store(stores["train"]) as store:
        assert store.manifest.encoder.num_hidden_states == 3  # the tiny BERT: embeddings + 2 layers
        return store.layers


def _peak_lr(run):
    return run.optimizer.param_groups[0]["max_lr"]


def test_learning_rate_by_head_type_unless_given(ner_stores, tmp_path):
    specs = [{"type": name, "name": name, **({"layers": [1]} if kind.single_layer else {})}
             for name, kind in HEAD_TYPES.items()]
    trainer = Trainer(_config(ner_stores, tmp_path, [*specs, {"type": "adapter", "name": "own", "lr": 0.02}]))
    assert {run.name: _peak_lr(run) for run in trainer.runs} == {
        **{name: kind.lr for name, kind in HEAD_TYPES.items()}, "own": 0.02}
    given = Trainer(_config(ner_stores, tmp_path, specs, lr=0.004))  # --lr applies to every head without its own
    assert {_peak_lr(run) for run in given.runs} == {0.004}


def test_default_epochs_give_small_stores_enough_steps(ner_stores, tmp_path):
    assert default_epochs(10_000) == DEFAULT_EPOCHS
    assert default_epochs(MIN_DEFAULT_STEPS // 30) == 30
    assert default_epochs(1) == MAX_DEFAULT_EPOCHS
    spec = [{"type": "adapter"}]
    trainer = Trainer(_config(ner_stores, tmp_path, spec))  # 240 sentences / 16 = 15 steps per epoch
    assert trainer.steps_per_epoch == 15 and trainer.epochs == default_epochs(15) == MAX_DEFAULT_EPOCHS
    assert Trainer(_config(ner_stores, tmp_path, spec, epochs=2)).epochs == 2  # given: exactly that many


def test_probe_layer_rule_without_an_eval_store(ner_stores, tmp_path):
    assert default_probe_layer(list(range(7)), 7) == 4  # 6 layers + embeddings: two thirds up
    assert default_probe_layer(list(range(13)), 13) == 8
    assert default_probe_layer([0, 6], 7) == 6  # the stored layer nearest the target
    assert default_probe_layer([0, 1, 2], 13) == 2
    summary = train(_config(ner_stores, tmp_path, [{"type": "linear"}], eval_store=None, epochs=1))
    assert summary["linear"]["layers"] == [default_probe_layer(_stored_layers(ner_stores), 3)]
    assert "layer_sweep" not in summary["linear"]


def test_probe_layer_chosen_by_a_sweep_on_the_eval_store(ner_stores, tmp_path, monkeypatch):
    summary = train(_config(ner_stores, tmp_path / "probe", [{"type": "linear", "seed": 3}], epochs=2, patience=None))
    scores = summary["linear"]["layer_sweep"]
    assert summary["linear"]["layers"] == [max(scores, key=scores.get)]
    # each score is what that probe alone scores after one epoch: the sweep measures, it does not guess
    for layer in _stored_layers(ner_stores):
        alone = train(_config(ner_stores, tmp_path / f"alone{layer}", [{"type": "linear", "layers": [layer],
                                                                         "seed": 3}], epochs=1, patience=None))
        assert alone["linear"]["best"] == pytest.approx(scores[layer], abs=1e-9)
    records = [json.loads(line) for line in (tmp_path / "probe" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "layer_sweep" and records[0]["chosen"] == summary["linear"]["layers"][0]

    def forbidden(*args, **kwargs):
        raise AssertionError("a resumed run must reuse the layer it chose")

    monkeypatch.setattr(heads.sweep, "sweep_layers", forbidden)
    resumed = Trainer(_config(ner_stores, tmp_path / "probe", [{"type": "linear", "seed": 3}], epochs=2,
                              patience=None, resume=True))
    assert resumed.runs[0].head.config.layers == summary["linear"]["layers"]


def test_cli_summary_says_which_layer_and_why(ner_stores, tmp_path, capsys):
    assert heads_main(["train", "--store", ner_stores["train"], "--eval-store", ner_stores["dev"], "--out",
                       str(tmp_path), "--head", "mlp", "--epochs", "1", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)["mlp"]
    assert len(summary["layers"]) == 1 and set(summary["layer_sweep"]) == {"0", "1", "2"}


def test_resume_with_other_heads_is_refused_before_the_checkpoint_is_used(ner_stores, tmp_path):
    train(_config(ner_stores, tmp_path, [{"type": "linear", "layers": [1]}], epochs=1, patience=None))
    more = [{"type": "linear", "layers": [1]}, {"type": "mlp", "name": "probe"}]  # a probe whose layer is unsaved
    with pytest.raises(ConfigError, match="different settings"):
        Trainer(_config(ner_stores, tmp_path, more, epochs=1, patience=None, resume=True))


def _scripted_eval(monkeypatch, scores):
    """The eval store's F1 per epoch comes from `scores` (so when patience runs out is known in advance)."""
    calls = iter(scores)

    def evaluate(heads, *args, **kwargs):
        score = next(calls)
        return [{"metrics": {"f1": score}} for _ in heads]

    monkeypatch.setattr(heads.trainer, "evaluate_heads", evaluate)


def _records(out, event):
    return [record for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if record["event"] == event]


def test_out_of_patience_a_head_anneals_to_zero_then_stops(ner_stores, tmp_path, monkeypatch):
    spec = [{"type": "adapter"}]
    scores = [0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]  # patience 2 runs out after epoch 4
    _scripted_eval(monkeypatch, scores)
    summary = train(_config(ner_stores, tmp_path / "anneal", spec, epochs=20, patience=2, log_every=1))
    evals = _records(tmp_path / "anneal", "eval")
    assert [(r["epoch"], r["annealing"], r["stopped"]) for r in evals] == [
        (1, False, False), (2, False, False), (3, False, False), (4, True, False), (5, True, False),
        (6, True, True)]
    lrs = [record["lr"] for record in _records(tmp_path / "anneal", "train")]
    steps = 15  # 240 sentences / 16
    anneal = lrs[4 * steps:]
    assert len(anneal) == 2 * steps and anneal[-1] == 0.0
    assert all(later < earlier for earlier, later in itertools.pairwise(anneal))  # linear, straight down
    assert anneal[0] == pytest.approx(lrs[4 * steps - 1] * (1 - 1 / (2 * steps)))  # from where the schedule was
    assert summary["adapter"]["saved_epoch"] == 2

    _scripted_eval(monkeypatch, scores)
    train(_config(ner_stores, tmp_path / "at-once", spec, epochs=20, patience=2, final_anneal=False))
    assert [r["stopped"] for r in _records(tmp_path / "at-once", "eval")] == [False, False, False, True]


def test_a_run_resumed_during_its_anneal_matches_an_uninterrupted_one(ner_stores, tmp_path, monkeypatch):
    spec = [{"type": "adapter", "seed": 2}]
    scores = [0.5, 0.4, 0.4, 0.4, 0.4]  # patience 1 runs out after epoch 2: the anneal is epoch 3
    _scripted_eval(monkeypatch, scores)
    train(_config(ner_stores, tmp_path / "straight", spec, epochs=6, patience=1))

    original = Trainer._end_epoch

    def crash_during_the_anneal(self, epoch, active, seconds):
        original(self, epoch, active, seconds)
        if epoch == 1:  # epoch 2 done: the anneal has just begun
            raise KeyboardInterrupt

    _scripted_eval(monkeypatch, scores)
    monkeypatch.setattr(Trainer, "_end_epoch", crash_during_the_anneal)
    with pytest.raises(KeyboardInterrupt):
        train(_config(ner_stores, tmp_path / "resumed", spec, epochs=6, patience=1))
    monkeypatch.setattr(Trainer, "_end_epoch", original)
    _scripted_eval(monkeypatch, scores[2:])
    train(_config(ner_stores, tmp_path / "resumed", spec, epochs=6, patience=1, resume=True))
    straight, resumed = (torch.load(tmp_path / name / "trainer_state.pt", weights_only=False)["runs"][0]
                         for name in ("straight", "resumed"))
    assert straight["anneal_ends"] == resumed["anneal_ends"] == 3 and straight["stopped"] and resumed["stopped"]
    for name, tensor in straight["head"].items():
        assert torch.equal(tensor, resumed["head"][name]), name
