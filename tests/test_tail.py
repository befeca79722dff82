"""Tail heads: a trainable copy of the encoder's top K layers over stored layer L-K. An untrained tail
reproduces the stored layer L (BERT, RoBERTa, DistilBERT, MiniLM); tails learn, save (LoRA: only the deltas),
load, predict on the live encoder as from the store; unsupported encoders are refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import featstore
from featstore import ExtractConfig, extract, open_store
from featstore.errors import ConfigError
from featstore.extraction.corpus import CorpusSpec
from heads import Head, Predictor, TrainConfig, evaluate_heads, train
from heads.packing import Packing
from heads.tail import load_encoder_model
from heads.trainer import build_head_config

pytest.importorskip("peft")


def _untrained_tail(store, tail_layers: int, **spec) -> Head:
    config = build_head_config({"type": "tail", "tail_layers": tail_layers, **spec}, store)
    head = Head(config)
    head.tail.copy_encoder_layers(load_encoder_model(config.encoder.name_or_path, config.encoder.weights_sha256))
    return head.eval()


def _tail_parity_error(store, head: Head) -> float:
    """Largest |tail(stored layer L-K) - stored layer L| over real tokens of one-window sequences."""
    start, last = head.config.layers[0], store.manifest.encoder.num_hidden_states - 1
    worst = 0.0
    with torch.no_grad():
        for row in range(len(store)):
            features = store.sequence(row, layers=[start, last])
            if len(features.input_ids) > store.manifest.extraction.max_length:
                continue  # stitched from several windows: layer L is not one pass of the tail over layer L-K
            hidden = torch.from_numpy(features.hidden_states.astype(np.float32))  # (T, 2, H)
            output = head.tail(hidden[:, 0], Packing(torch.ones(1, len(hidden), dtype=torch.bool)))  # one sequence
            worst = max(worst, (output - hidden[:, 1]).abs().max().item())
    return worst


@pytest.mark.parametrize("model", ["bert", "roberta", "distilbert"])
# float16: both stored layers are rounded (spacing 2e-3 near the layers' largest values, ~3.5), measured <= 1.9e-3
@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("float16", 5e-3)])
def test_an_untrained_tail_reproduces_the_stored_last_layer(tiny_models, conll_corpus, tmp_path, model, dtype,
                                                            tolerance):
    path = extract(ExtractConfig(out=str(tmp_path / "s.zarr"), model=tiny_models[model],
                                 corpus=CorpusSpec(str(conll_corpus)), dtype=dtype, progress=False)).path
    with open_store(path) as store:
        for tail_layers in (1, 2):
            head = _untrained_tail(store, tail_layers)
            assert head.config.layers == [2 - tail_layers]
            assert _tail_parity_error(store, head) < tolerance, (model, dtype, tail_layers)
        untrained = Head(build_head_config({"type": "tail"}, store)).eval()  # random layers: the check can fail
        assert _tail_parity_error(store, untrained) > 10 * tolerance


@pytest.mark.slow
def test_an_untrained_minilm_tail_reproduces_the_stored_last_layer(minilm_path, conll_corpus, tmp_path):
    path = extract(ExtractConfig(out=str(tmp_path / "s.zarr"), model=minilm_path, corpus=CorpusSpec(str(conll_corpus)),
                                 dtype="float32", layers=[4, 5, 6], progress=False)).path
    with open_store(path) as store:  # a tail needs only layer L-K; L is here to compare with
        assert _tail_parity_error(store, _untrained_tail(store, 1)) < 1e-4
        assert _tail_parity_error(store, _untrained_tail(store, 2, lora_rank=4)) < 1e-4  # LoRA starts at zero
        assert _tail_parity_error(store, Head(build_head_config({"type": "tail"}, store)).eval()) > 1.0


def test_encoders_whose_layers_need_more_than_a_mask_are_refused_by_name(tiny_models, conll_corpus, tmp_path):
    path = extract(ExtractConfig(out=str(tmp_path / "s.zarr"), model=tiny_models["deberta"],
                                 corpus=CorpusSpec(str(conll_corpus)), progress=False)).path
    with open_store(path) as store, pytest.raises(ConfigError, match=r"DebertaModel .*model_type 'deberta'.* not "
                                                                      r"supported"):
        build_head_config({"type": "tail"}, store)


def _config(stores, out, heads, **options):
    return TrainConfig(store=stores["train"], eval_store=stores["dev"], out=str(out), heads=heads,
                       batch_size=16, progress=False, **options)


@pytest.mark.parametrize("spec", [{"tail_layers": 1, "lr": 5e-3}, {"tail_layers": 2, "lr": 5e-3},
                                  {"tail_layers": 1, "lora_rank": 4, "lr": 1e-2}])
def test_tails_learn_save_and_load(ner_stores, tmp_path, spec):
    summary = train(_config(ner_stores, tmp_path, [{"type": "tail", **spec}], epochs=6))
    (result,) = summary.values()
    assert result["best"] > 0.8, summary
    losses = [record["loss"] for record in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if record["event"] == "train"]
    assert losses[-1] < 0.5 * losses[0]
    head = Head.from_pretrained(tmp_path)
    assert head.config.layers == [2 - spec["tail_layers"]]
    assert evaluate_heads([head], ner_stores["dev"])[0]["metrics"]["f1"] == pytest.approx(result["best"])
    saved = set(head.state_dict()) - head._encoder_keys()
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "model.safetensors")) == saved
    if spec.get("lora_rank"):  # only the deltas and the classifier: the encoder's layers come from the encoder
        assert saved and all("lora_" in key or key.startswith("classifier") for key in saved)


@pytest.mark.parametrize("spec", [{"type": "tail", "lora_rank": 4, "lr": 1e-2},
                                  {"type": "tail", "tail_layers": 2, "lr": 5e-3}, {"type": "transformer"}])
def test_live_predictions_equal_store_predictions(ner_stores, tiny_models, tmp_path, spec):
    train(_config(ner_stores, tmp_path, [spec], epochs=2))
    head = Head.from_pretrained(tmp_path)
    from_store = evaluate_heads([head], ner_stores["dev"], return_predictions=True)[0]["predictions"]
    examples = featstore.load_corpus(ner_stores["dev_corpus"]).examples
    # from the saved directory, the encoder named explicitly (a LoRA tail reads its frozen layers from it)
    live = Predictor(str(tmp_path), model=tiny_models["bert"]).predict([list(example.words) for example in examples])
    names = head.config.label_names
    assert [record["tags"] for record in live] == [[names[i] for i in from_store[row]] for row in range(len(live))]


def test_k_tails_in_one_pass_equal_separate_runs(ner_stores, tmp_path):
    specs = [{"type": "tail", "name": "full", "lr": 2e-3}, {"type": "tail", "name": "lora", "lora_rank": 2, "seed": 3},
             {"type": "linear", "name": "probe", "layers": [1]}]
    train(_config(ner_stores, tmp_path / "together", specs, epochs=2))
    for spec in specs[:2]:
        train(_config(ner_stores, tmp_path / spec["name"], [spec], epochs=2))
        together = Head.from_pretrained(tmp_path / "together" / spec["name"]).state_dict()
        for name, tensor in Head.from_pretrained(tmp_path / spec["name"]).state_dict().items():
            assert torch.equal(tensor, together[name]), (spec["name"], name)


def test_a_tail_trains_its_types_few_epochs_beside_heads_that_train_more(ner_stores, tmp_path):
    summary = train(TrainConfig(store=ner_stores["train"], out=str(tmp_path), batch_size=16, progress=False,
                                heads=[{"type": "tail", "name": "tail"}, {"type": "linear", "name": "probe"}]))
    assert summary["tail"]["saved_epoch"] == 3  # HEAD_TYPES["tail"].epochs
    assert summary["probe"]["saved_epoch"] > 3


def test_bad_tail_settings_are_refused_before_training(ner_stores, tmp_path):
    with pytest.raises(ConfigError, match="--tail-layers must be between 1 and the encoder's 2 layers"):
        train(_config(ner_stores, tmp_path, [{"type": "tail", "tail_layers": 3}]))
    with pytest.raises(ConfigError, match="reads stored layer 1; leave --layers out"):
        train(_config(ner_stores, tmp_path, [{"type": "tail", "layers": [0]}]))
    with pytest.raises(ConfigError, match=r"LoRA .* a bilstm head has none"):
        train(_config(ner_stores, tmp_path, [{"type": "bilstm", "lora_rank": 4}]))
    assert not (tmp_path / "metrics.jsonl").exists()
