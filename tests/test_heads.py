"""Heads trained from stores: every head type learns, determinism, K heads in one pass, checkpoints,
mismatch errors, the encoder is never loaded, resume, and live/store prediction parity."""

import json

import numpy as np
import pytest
import torch

import featstore
from featstore import ExtractConfig, extract, open_store
from featstore.extraction.corpus import CorpusSpec
from heads import Adapter, Head, Predictor, TrainConfig, evaluate_heads, train
from heads.batches import collated_batches
from heads.cli import main as heads_main
from heads.entities import repair_bio
from heads.layers import pool_words
from heads.packing import Layout
from heads.trainer import Trainer, build_head_config

from .conftest import LABELS, sequence_store, tagged_sentences, write_tagged


def _train(stores, out, heads, **options):
    config = TrainConfig(store=stores["train"], eval_store=stores["dev"], out=str(out), heads=heads,
                         epochs=options.pop("epochs", 6), batch_size=16, lr=options.pop("lr", 5e-3), progress=False,
                         **options)
    return train(config)


@pytest.mark.parametrize("spec", [  # probes on these small features need a higher learning rate than the adapter
    {"type": "adapter"}, {"type": "adapter", "enable_tailor": False}, {"type": "linear", "layers": [0], "lr": 0.1},
    {"type": "scalar_mix", "lr": 0.1}, {"type": "mlp", "layers": [-1]}, {"type": "fusion", "lr": 0.1},
    {"type": "linear", "layers": [1], "word_pooling": "mean", "lr": 0.1}])
def test_every_head_type_learns_the_tagging_task(ner_stores, tmp_path, spec):
    summary = _train(ner_stores, tmp_path, [spec])
    (result,) = summary.values()
    assert result["best"] > 0.8, summary  # entity F1; chance (random tags) is far below 0.2
    head = Head.from_pretrained(tmp_path)
    with open_store(ner_stores["dev"]) as store:
        assert evaluate_heads([head], store)[0]["metrics"]["f1"] == pytest.approx(result["best"])


def test_same_seed_gives_identical_weights(ner_stores, tmp_path):
    _train(ner_stores, tmp_path / "a", [{"type": "adapter"}], epochs=2)
    _train(ner_stores, tmp_path / "b", [{"type": "adapter"}], epochs=2)
    a, b = Head.from_pretrained(tmp_path / "a"), Head.from_pretrained(tmp_path / "b")
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name


def test_k_heads_in_one_pass_equal_k_separate_runs(ner_stores, tmp_path):
    specs = [{"type": "adapter", "name": "adapter"}, {"type": "linear", "layers": [1], "name": "probe1"},
             {"type": "scalar_mix", "name": "mix", "seed": 7}, {"type": "fusion", "name": "fusion", "lr": 1e-3}]
    _train(ner_stores, tmp_path / "together", specs, epochs=3)
    for spec in specs:
        _train(ner_stores, tmp_path / spec["name"], [spec], epochs=3)
        together = Head.from_pretrained(tmp_path / "together" / spec["name"]).state_dict()
        alone = Head.from_pretrained(tmp_path / spec["name"]).state_dict()
        for name, tensor in alone.items():
            assert torch.equal(tensor, together[name]), (spec["name"], name)


def test_encoder_is_never_loaded_during_training(ner_stores, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the encoder was loaded during heads train")

    import transformers

    monkeypatch.setattr(featstore.FrozenEncoder, "load", forbidden)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", forbidden)
    assert heads_main(["train", "--store", ner_stores["train"], "--eval-store", ner_stores["dev"], "--out",
                       str(tmp_path), "--head", "linear", "--epochs", "1", "--no-progress"]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {record["event"] for record in records} == {"layer_sweep", "train", "epoch", "eval"}  # no layer named
    assert heads_main(["train", "--store", ner_stores["train"], "--out", str(tmp_path), "--head", "linear",
                       "--epochs", "1", "--no-progress"]) == 0
    again = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [record["event"] for record in again].count("epoch") == 1  # a new run starts a new log


def test_resume_after_a_crash_matches_an_uninterrupted_run(ner_stores, tmp_path, monkeypatch):
    specs = [{"type": "adapter", "name": "adapter"}, {"type": "linear", "name": "probe", "layers": [2]}]
    _train(ner_stores, tmp_path / "straight", specs, epochs=4, patience=None)

    original = Trainer._end_epoch

    def crash_after_two(self, epoch, active, seconds):
        original(self, epoch, active, seconds)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_end_epoch", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        _train(ner_stores, tmp_path / "resumed", specs, epochs=4, patience=None)
    monkeypatch.setattr(Trainer, "_end_epoch", original)
    _train(ner_stores, tmp_path / "resumed", specs, epochs=4, patience=None, resume=True)
    state_a = torch.load(tmp_path / "straight" / "trainer_state.pt", weights_only=False)
    state_b = torch.load(tmp_path / "resumed" / "trainer_state.pt", weights_only=False)
    for run_a, run_b in zip(state_a["runs"], state_b["runs"]):
        for name, tensor in run_a["head"].items():
            assert torch.equal(tensor, run_b["head"][name]), name


def test_checkpoint_round_trip_and_cli_evaluate(ner_stores, tmp_path, capsys):
    _train(ner_stores, tmp_path, [{"type": "adapter"}], epochs=2)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["head_type"] == "adapter" and config["label_names"] == LABELS.split(",")
    assert config["layers"] == [0, 1, 2] and config["encoder"]["weights_sha256"]
    assert config["store_fingerprint"] == open_store(ner_stores["train"]).fingerprint
    head = Head.from_pretrained(tmp_path)
    again = Head.from_pretrained(tmp_path)
    hidden, mask = torch.randn(2, 5, 3, 32), torch.ones(2, 5, dtype=torch.bool)
    word_ids = torch.tensor([[-1, 0, 1, 2, -1]] * 2)
    assert torch.equal(head(hidden, mask, word_ids), again(hidden, mask, word_ids))
    assert heads_main(["evaluate", "--head", str(tmp_path), "--store", ner_stores["dev"], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["f1"] > 0.5 and set(report["per_type"]) == {"PER", "LOC"}
    assert all(set(row) == {"precision", "recall", "f1", "support"} for row in report["per_type"].values())
    assert heads_main(["evaluate", "--head", str(tmp_path), "--store", ner_stores["dev"]]) == 0
    table = capsys.readouterr().out
    assert "PER" in table and "LOC" in table and f"{report['f1']:.4f}" in table
    by_path = evaluate_heads([tmp_path], ner_stores["dev"])[0]  # a head directory and a store path work too
    assert by_path["metrics"]["f1"] == pytest.approx(report["f1"]) and "predictions" not in by_path


def test_mismatched_store_or_layers_are_refused(ner_stores, tiny_models, tmp_path, capsys):
    _train(ner_stores, tmp_path / "head", [{"type": "linear", "layers": [2], "lr": 0.1}], epochs=1)
    other = extract(ExtractConfig(out=str(tmp_path / "rob.zarr"), model=tiny_models["roberta"],
                                  corpus=CorpusSpec(ner_stores["dev_corpus"]), progress=False)).path
    assert heads_main(["evaluate", "--head", str(tmp_path / "head"), "--store", other]) == 2
    assert "was trained on encoder" in capsys.readouterr().err
    subset = extract(ExtractConfig(out=str(tmp_path / "l0.zarr"), model=tiny_models["bert"], layers=[0],
                                   corpus=CorpusSpec(ner_stores["dev_corpus"], label_names=LABELS.split(",")),
                                   dtype="float32", progress=False)).path
    assert heads_main(["evaluate", "--head", str(tmp_path / "head"), "--store", subset]) == 2
    assert "lacks [2]" in capsys.readouterr().err
    code = heads_main(["train", "--store", ner_stores["train"], "--out", str(tmp_path / "x"), "--head", "linear",
                       "--layers", "0,1"])
    assert code == 2 and "exactly one layer" in capsys.readouterr().err


def test_live_predictions_of_a_minilm_head_equal_store_predictions(minilm_path, tmp_path):
    """Packaged MiniLM, float16 storage (the CPU default): live features are rounded the same way."""
    corpus = write_tagged(tmp_path / "c.conll", tagged_sentences(120, 3))
    store_path = extract(ExtractConfig(out=str(tmp_path / "m.zarr"), model=minilm_path, progress=False,
                                       corpus=CorpusSpec(str(corpus), label_names=LABELS.split(",")))).path
    stores = {"train": store_path, "dev": store_path}
    _train(stores, tmp_path / "head", [{"type": "adapter", "enable_tailor": False}], epochs=2, lr=3e-3)
    head = Head.from_pretrained(tmp_path / "head")
    with open_store(store_path) as store:
        from_store = evaluate_heads([head], store, return_predictions=True)[0]["predictions"]
    examples = featstore.load_corpus(str(corpus)).examples
    live = Predictor(head).predict([list(example.words) for example in examples])
    names = head.config.label_names
    assert [record["tags"] for record in live] == [repair_bio([names[i] for i in from_store[row]])
                                                   for row in range(len(live))]


def test_live_predictions_equal_store_predictions(ner_stores, tmp_path, capsys):
    _train(ner_stores, tmp_path / "head", [{"type": "adapter"}], epochs=3)
    head = Head.from_pretrained(tmp_path / "head")
    with open_store(ner_stores["dev"]) as store:
        from_store = evaluate_heads([head], store, return_predictions=True)[0]["predictions"]
    corpus = featstore.load_corpus(ner_stores["dev_corpus"])
    words = [list(example.words) for example in corpus.examples]
    predictor = Predictor(tmp_path / "head")
    live = predictor.predict(words)
    names = head.config.label_names
    assert [record["tags"] for record in live] == [repair_bio([names[i] for i in from_store[row]])
                                                   for row in range(len(words))]
    # and through the CLI, from a JSONL file and a plain text file
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps({"words": w}) for w in words[:3]))
    assert heads_main(["predict", "--head", str(tmp_path / "head"), "--input", str(tmp_path / "in.jsonl")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["tags"] for line in lines] == [record["tags"] for record in live[:3]]
    (tmp_path / "in.txt").write_text("Anna visited Berlin\n")
    assert heads_main(["predict", "--head", str(tmp_path / "head"), "--input", str(tmp_path / "in.txt")]) == 0
    assert json.loads(capsys.readouterr().out)["words"] == ["Anna", "visited", "Berlin"]


@pytest.mark.parametrize("pooling", ["first", "mean", "attention"])
def test_sequence_classification_heads(tiny_models, tmp_path, pooling):
    stores = {split: sequence_store(tiny_models["bert"], tmp_path, split, count, seed)
              for split, count, seed in (("train", 300, 1), ("dev", 100, 2))}
    summary = _train(stores, tmp_path / "out", [{"type": "adapter", "sequence_pooling": pooling}], epochs=8)
    assert summary["adapter"]["best"] > 0.85  # accuracy; the majority class is ~0.6


def test_regression_head(tiny_models, tmp_path):
    stores = {split: sequence_store(tiny_models["bert"], tmp_path, split, count, seed, True)
              for split, count, seed in (("train", 300, 1), ("dev", 100, 2))}
    assert open_store(stores["train"]).task == "regression"
    summary = _train(stores, tmp_path / "out", [{"type": "scalar_mix", "sequence_pooling": "mean", "lr": 0.1}],
                     epochs=8)
    assert summary["scalar_mix"]["best"] > 0.8  # Pearson r


def test_adapter_wraps_a_live_encoder_and_trains_only_its_head(tiny_models):
    from transformers import AutoModel, AutoTokenizer

    encoder = AutoModel.from_pretrained(tiny_models["bert"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["bert"])
    adapter = Adapter(encoder, num_labels=3)
    assert all(not p.requires_grad for p in encoder.parameters())
    assert {id(p) for p in adapter.trainable_parameters()} == {id(p) for p in adapter.head.parameters()}
    adapter.train()
    assert adapter.head.training and not encoder.training
    batch = tokenizer(["Anna visited Berlin", "Oslo"], padding=True, return_tensors="pt")
    logits = adapter(batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (2, batch["input_ids"].shape[1], 3)
    before = {name: p.clone() for name, p in encoder.named_parameters()}
    optimizer = torch.optim.Adam(adapter.trainable_parameters(), lr=1e-2)
    logits.sum().backward()
    optimizer.step()
    assert all(torch.equal(p, before[name]) for name, p in encoder.named_parameters())


def test_head_word_pooling_matches_store_pooling(ner_stores):
    """Words pooled from a packed batch of several sequences equal the store's own pooling of each sequence, with
    the layout the trainer's batch carries (found when collated) as with one found from its mask and word ids."""
    with open_store(ner_stores["dev"]) as store:
        rows = [0, 1, 2]
        (batch,) = collated_batches([store.sequence(row, layers=[-1]) for row in rows], batch_size=3)
        carried = Layout.of_batch(batch)
        found = Layout.of(batch["mask"], batch["word_ids"], batch["labels"].shape[1])
        assert torch.equal(carried.tokens.index, found.tokens.index)
        for pooling in ("first", "mean"):
            for layout in (carried, found):
                words = layout.words
                got = words.packing.unpack(pool_words(batch["hidden_states"][:, 0], words, pooling))
                for position, row in enumerate(rows):
                    expected = store.sequence(row, layers=[-1], pooling=pooling).hidden_states[:, 0]
                    np.testing.assert_allclose(got[position, : len(expected)].numpy(), expected, rtol=1e-6,
                                               atol=1e-6)
                    assert not got[position, len(expected):].any()  # padded words stay empty


@pytest.mark.parametrize("head_type", ["linear", "adapter"])
@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_logits_pooled_from_tokens_equal_the_classifier_on_pooled_words(ner_stores, head_type, pooling):
    """A linear classifier (a probe's, or the adapter's chain of two maps) pools its logits (C per token) rather
    than the features (H): the same logits as the classifier on each word's first subword or subword mean, for
    words of several subwords."""
    with open_store(ner_stores["dev"]) as store:
        head = Head(build_head_config({"type": head_type, "layers": [-1] if head_type == "linear" else None,
                                       "word_pooling": pooling}, store)).eval()
    assert head.classifies_tokens
    word_ids = torch.tensor([[-1, 0, 0, 1, 2, 2, 2, -1], [-1, 0, 1, 1, -1, -1, -1, -1]])
    mask = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    hidden = torch.randn(2, 8, len(head.config.layers), head.config.hidden_size)
    with torch.no_grad():
        got = head(hidden, mask, word_ids, 3)
        packing = Layout.of(mask).tokens
        vectors = packing.unpack(head.mixer(packing.pack(hidden), packing))  # what the classifier reads per token
        for row in range(2):
            for word in range(3):
                tokens = vectors[row, word_ids[row] == word]
                if not len(tokens):
                    assert not got[row, word].any()  # a padded word stays empty
                    continue
                pooled = tokens[0] if pooling == "first" else tokens.mean(0)
                torch.testing.assert_close(got[row, word], head.classifier(pooled), rtol=1e-4, atol=1e-5)


def test_raw_text_predictions_read_like_ner_output(ner_stores, tmp_path):
    _train(ner_stores, tmp_path / "head", [{"type": "adapter"}], epochs=3)
    text = "Anna met Reyes in Paris, then flew to Oslo."
    (record,) = Predictor(tmp_path / "head").predict([text])
    # split like the tokenizer's pre-tokenizer: punctuation is its own word
    assert record["words"] == ["Anna", "met", "Reyes", "in", "Paris", ",", "then", "flew", "to", "Oslo", "."]
    assert record["text"] == text and len(record["tags"]) == len(record["scores"]) == len(record["words"])
    for entity in record["entities"]:
        first, end = entity["words"]
        assert entity["text"] == text[entity["start"]: entity["end"]] == " ".join(record["words"][first:end])
        assert record["tags"][first] == "B-" + entity["type"] and 0 < entity["score"] <= 1
    assert {entity["text"] for entity in record["entities"]} & {"Anna", "Reyes", "Paris", "Oslo"}


def test_bfloat16_training_keeps_float32_heads_and_is_the_default_where_the_cpu_multiplies_it(
        ner_stores, tmp_path, wide_map_calls, monkeypatch):
    """`auto` takes bfloat16 on a CPU with bfloat16 instructions, unless the heads are compiled. On the CPU, bfloat16
    reaches the adapter's wide maps (its tailor's feed-forward: heads.layers), and the head still learns, saves and
    records float32 weights and its precision."""
    from heads.trainer import training_dtype

    for capabilities, expected in (({"avx512_bf16": True}, torch.bfloat16), ({"amx_bf16": True}, torch.bfloat16),
                                   ({"avx512_bf16": False, "avx2": True}, None)):
        with monkeypatch.context() as patched:
            patched.setattr(torch.cpu, "get_capabilities", lambda capabilities=capabilities: capabilities)
            assert training_dtype("auto", "cpu") is expected
            assert training_dtype("auto", "cpu", compiled=True) is None
    assert training_dtype("float32", "cuda") is None and training_dtype("float32", "cpu") is None
    assert training_dtype("bfloat16", "cpu") is torch.bfloat16
    summary = _train(ner_stores, tmp_path, [{"type": "adapter"}], precision="bfloat16", epochs=4)
    assert summary["adapter"]["best"] > 0.8 and wide_map_calls, summary
    head = Head.from_pretrained(tmp_path)
    assert head.training_record.recipe["precision"] == "bfloat16"
    assert all(tensor.dtype == torch.float32 for tensor in head.state_dict().values())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_compiled_heads_learn_what_eager_heads_learn(ner_stores, tmp_path, device):
    """--compile (torch.compile, inductor): a probe's weights equal the eager run's up to the rounding of fused
    kernels; a head with dropout (the compiler draws its masks) learns the task; the heads save and load as any
    other (which heads step one by one: test_grouped); nothing in them breaks the compiled graph."""
    from torch._dynamo.utils import counters

    counters.clear()
    probe = {"type": "linear", "layers": [1], "word_pooling": "mean", "lr": 0.1}
    options = {"device": device, "precision": "float32"}
    for compiling in (True, False):
        trainer = Trainer(TrainConfig(store=ner_stores["train"], out=str(tmp_path / f"compile={compiling}"),
                                      heads=[probe], epochs=2, batch_size=16, progress=False, compile=compiling,
                                      **options))
        trainer.train()
        assert (trainer.runs[0].head._compiled_call_impl is not None) == compiling
    eager, compiled = Head.from_pretrained(tmp_path / "compile=False"), Head.from_pretrained(tmp_path / "compile=True")
    for name, tensor in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    summary = _train(ner_stores, tmp_path / "mlp", [{"type": "mlp", "layers": [-1]}], compile=True, **options)
    assert summary["mlp"]["best"] > 0.8, summary
    assert counters["stats"]["unique_graphs"] and not counters["graph_break"], dict(counters["graph_break"])
