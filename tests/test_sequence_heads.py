"""Sequence-context heads (bilstm, transformer) and the CRF output layer: the CRF's partition function and
Viterbi path against brute force, constrained decoding, training on tiny stores, save/load, live parity and
K heads in one pass."""

from __future__ import annotations

import itertools

import pytest
import torch

import featstore
from featstore.errors import ConfigError
from heads import Head, Predictor, TrainConfig, evaluate_heads, train
from heads.crf import CRF, bio_allowed_transitions
from heads.entities import repair_bio

BIO = ["O", "B-X", "I-X", "B-Y", "I-Y"]


def _random_crf(num_labels: int, seed: int) -> CRF:
    torch.manual_seed(seed)
    crf = CRF(num_labels)
    with torch.no_grad():
        for parameter in crf.parameters():
            parameter.normal_()
    return crf


def _path_score(crf: CRF, emissions: torch.Tensor, path: tuple[int, ...]) -> torch.Tensor:
    score = crf.start[path[0]] + emissions[0, path[0]] + crf.end[path[-1]]
    for step in range(1, len(path)):
        score = score + crf.transitions[path[step - 1], path[step]] + emissions[step, path[step]]
    return score


def test_crf_likelihood_and_viterbi_equal_brute_force():
    crf = _random_crf(3, seed=0)
    emissions = torch.randn(3, 4, 3)
    lengths = [4, 2, 1]  # padded batches: each sentence's own words only
    mask = torch.tensor([[step < length for step in range(4)] for length in lengths])
    labels = torch.randint(0, 3, (3, 4)).masked_fill(~mask, -100)
    log_z = crf.log_partition(emissions, mask)
    paths = crf.viterbi(emissions, mask)
    nll = torch.zeros(())
    for row, length in enumerate(lengths):
        every = list(itertools.product(range(3), repeat=length))
        scores = torch.stack([_path_score(crf, emissions[row], path) for path in every])
        assert log_z[row].item() == pytest.approx(torch.logsumexp(scores, 0).item(), abs=1e-5)
        assert tuple(paths[row, :length].tolist()) == every[int(scores.argmax())]
        assert (paths[row, length:] == -1).all()
        nll = nll + torch.logsumexp(scores, 0) - _path_score(crf, emissions[row], tuple(labels[row, :length].tolist()))
    assert crf.nll(emissions, labels, mask).item() == pytest.approx(nll.item(), abs=1e-4)


def test_constrained_viterbi_never_takes_an_invalid_bio_transition():
    allowed, start_allowed = bio_allowed_transitions(BIO)
    assert not allowed[0, 2] and allowed[1, 2] and allowed[2, 2] and not allowed[1, 4] and not start_allowed[2]
    crf = CRF(len(BIO), constrain_bio_of=BIO)
    torch.manual_seed(1)
    valid = [path for path in itertools.product(range(5), repeat=4)
             if start_allowed[path[0]] and all(allowed[a, b] for a, b in itertools.pairwise(path))]
    for _ in range(20):
        emissions = torch.randn(1, 4, 5) * 3
        emissions[0, :, 2] += 4  # I-X everywhere is what the emissions want
        path = tuple(crf.viterbi(emissions, torch.ones(1, 4, dtype=torch.bool))[0].tolist())
        assert path in valid
        scores = torch.stack([_path_score(crf, emissions[0], candidate) for candidate in valid])
        assert path == valid[int(scores.argmax())]  # the best valid path, not merely some valid one
        assert [BIO[i] for i in path] == repair_bio([BIO[i] for i in path])


def _config(stores, out, heads, **options):
    return TrainConfig(store=stores["train"], eval_store=stores["dev"], out=str(out), heads=heads,
                       epochs=options.pop("epochs", 6), batch_size=16, progress=False, **options)


@pytest.mark.parametrize("spec", [
    {"type": "bilstm", "lr": 5e-3}, {"type": "bilstm", "crf": True, "lr": 5e-3},
    {"type": "bilstm", "context_input": "concat", "context_layers": 2, "context_dim": 32, "lr": 5e-3},
    {"type": "bilstm", "context_input": "adapter", "lr": 5e-3},
    {"type": "transformer", "context_input": "adapter", "lr": 2e-3, "epochs": 8},
    {"type": "linear", "layers": [1], "crf": True, "lr": 0.05}])
def test_sequence_heads_learn_the_tagging_task(ner_stores, tmp_path, spec):
    spec = dict(spec)
    summary = train(_config(ner_stores, tmp_path, [spec], epochs=spec.pop("epochs", 6)))
    (result,) = summary.values()
    assert result["best"] > 0.8, summary  # entity F1
    log = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    losses = [float(line.split('"loss": ')[1].split(",")[0]) for line in log]
    assert losses[-1] < 0.5 * losses[0]
    head = Head.from_pretrained(tmp_path)  # saved and loaded: the same score
    assert evaluate_heads([head], ner_stores["dev"])[0]["metrics"]["f1"] == pytest.approx(result["best"])


def test_a_crf_heads_live_predictions_equal_its_store_predictions(ner_stores, tmp_path):
    train(_config(ner_stores, tmp_path, [{"type": "bilstm", "crf": True, "lr": 5e-3}], epochs=3))
    head = Head.from_pretrained(tmp_path)
    from_store = evaluate_heads([head], ner_stores["dev"], return_predictions=True)[0]["predictions"]
    examples = featstore.load_corpus(ner_stores["dev_corpus"]).examples
    live = Predictor(head).predict([list(example.words) for example in examples])
    names = head.config.label_names  # the CRF's path is valid BIO: predict's repair leaves it as it is
    assert [record["tags"] for record in live] == [[names[i] for i in from_store[row]] for row in range(len(live))]


def test_k_sequence_heads_in_one_pass_equal_separate_runs(ner_stores, tmp_path):
    specs = [{"type": "bilstm", "name": "lstm_crf", "crf": True}, {"type": "transformer", "name": "tf", "seed": 3}]
    train(_config(ner_stores, tmp_path / "together", specs, epochs=2))
    for spec in specs:
        train(_config(ner_stores, tmp_path / spec["name"], [spec], epochs=2))
        together = Head.from_pretrained(tmp_path / "together" / spec["name"]).state_dict()
        for name, tensor in Head.from_pretrained(tmp_path / spec["name"]).state_dict().items():
            assert torch.equal(tensor, together[name]), (spec["name"], name)


def test_bad_sequence_head_settings_are_refused_before_training(ner_stores, tmp_path):
    with pytest.raises(ConfigError, match="not divisible by 5 attention heads"):
        train(_config(ner_stores, tmp_path, [{"type": "transformer", "context_heads": 5}]))
    with pytest.raises(ConfigError, match="context_input must be one of"):
        train(_config(ner_stores, tmp_path, [{"type": "bilstm", "context_input": "last"}]))
    assert not (tmp_path / "metrics.jsonl").exists()
