"""Features read back from a store equal what the live encoder produces for the same input."""

import numpy as np
import pytest
import torch
from transformers import AutoModel

from featstore import ExtractConfig, FrozenEncoder, extract, load_corpus, open_store
from featstore.extraction.corpus import CorpusSpec


def _reference(model_path: str, store, corpus, layers):
    """Plain transformers calls, one window at a time, assembled with the store's recorded window map."""
    model = AutoModel.from_pretrained(model_path, dtype=torch.float32).eval()
    encoder = FrozenEncoder.load(model_path, device="cpu", dtype="float32")
    extraction = store.manifest.extraction
    sequences = encoder.tokenize(corpus.examples, extraction.max_length, extraction.stride)
    expected = []
    with torch.inference_mode():
        for sequence in sequences:
            states = [model(input_ids=torch.tensor([window]), output_hidden_states=True).hidden_states
                      for window in sequence.windows]
            expected.append(np.stack([[states[w][layer][0, p].numpy() for layer in layers]
                                      for w, p in sequence.gather]))
    return sequences, expected


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "distilbert", "deberta"])
def test_float32_store_matches_live_encoder_including_windows(tiny_models, conll_corpus, tmp_path, family):
    out = str(tmp_path / "s.zarr")
    extract(ExtractConfig(out=out, model=tiny_models[family], corpus=CorpusSpec(str(conll_corpus)),
                          dtype="float32", max_batch_tokens=512, progress=False))
    corpus = load_corpus(str(conll_corpus))
    with open_store(out) as store:
        assert store.manifest.counts.num_windowed_sequences > 0
        sequences, expected = _reference(tiny_models[family], store, corpus, store.layers)
        for row, (sequence, want) in enumerate(zip(sequences, expected)):
            got = store.sequence(row)
            np.testing.assert_array_equal(got.input_ids, sequence.input_ids)
            np.testing.assert_array_equal(got.word_ids, sequence.word_ids)
            assert got.num_words == len(corpus.examples[row].words)
            # Store batches pad windows together; the reference runs each window alone. The only difference is
            # float32 GEMM rounding (observed <= 1e-6), far below any real change in the features.
            np.testing.assert_allclose(got.hidden_states, want, rtol=1e-5, atol=1e-5)


def test_store_is_bitwise_the_live_encoder_output_for_the_same_batches(tiny_models, conll_corpus, tmp_path):
    out = str(tmp_path / "s.h5")
    extract(ExtractConfig(out=out, model=tiny_models["bert"], corpus=CorpusSpec(str(conll_corpus)),
                          dtype="float32", backend="hdf5", max_batch_tokens=10**6, progress=False))
    encoder = FrozenEncoder.load(tiny_models["bert"], device="cpu", dtype="float32")
    with open_store(out) as store:
        extraction = store.manifest.extraction
        corpus = load_corpus(str(conll_corpus))
        sequences = encoder.tokenize(corpus.examples, extraction.max_length, extraction.stride)
        ordered = [sequences[row] for row in store.sequence_index]
        live = encoder.forward(ordered, store.layers).numpy()  # one batch, as the extraction ran it
        stored = np.concatenate([store.sequence(int(row)).hidden_states for row in store.sequence_index])
        np.testing.assert_array_equal(stored, live)


def test_packaged_minilm_float16_store_matches_live_encoder(minilm_path, conll_corpus, tmp_path):
    out = str(tmp_path / "m.zarr")
    extract(ExtractConfig(out=out, model=minilm_path, corpus=CorpusSpec(str(conll_corpus)), layers=[0, 3, -1],
                          max_length=32, stride=8, progress=False))
    corpus = load_corpus(str(conll_corpus))
    with open_store(out) as store:
        assert store.storage_dtype == "float16" and store.layers == [0, 3, 6]
        assert store.manifest.counts.num_windowed_sequences > 0
        _sequences, expected = _reference(minilm_path, store, corpus, [0, 3, 6])
        for row, want in enumerate(expected):
            got = store.sequence(row).hidden_states
            assert got.dtype == np.float16
            # float16 keeps 11 significant bits: one rounding step is at most 2**-11 relative (plus the
            # float32 batching difference); atol covers values near zero where float16 spacing is absolute.
            np.testing.assert_allclose(got.astype(np.float32), want, rtol=2**-10, atol=2e-3)


def test_bfloat16_storage_round_trips(tiny_models, conll_corpus, tmp_path):
    out = str(tmp_path / "b.zarr")
    extract(ExtractConfig(out=out, model=tiny_models["bert"], corpus=CorpusSpec(str(conll_corpus)),
                          dtype="bfloat16", progress=False))
    encoder = FrozenEncoder.load(tiny_models["bert"], device="cpu", dtype="float32")
    corpus = load_corpus(str(conll_corpus))
    with open_store(out) as store:
        assert store.storage_dtype == "bfloat16" and store.manifest.extraction.compute_dtype == "float32"
        got = store.sequence(0).hidden_states
        assert got.dtype == np.float32
        want = encoder.forward(encoder.tokenize(corpus.examples[:1]), store.layers).numpy()
        np.testing.assert_array_equal(got, torch.from_numpy(want).bfloat16().float().numpy())
