"""Store layout, backends and the read API."""

import json

import numpy as np
import pytest
import torch

from featstore import ExtractConfig, collate_features, extract, open_store
from featstore.extraction.corpus import CorpusSpec
from featstore.store import format as fmt
from featstore.store.reader import pool_words


@pytest.fixture(scope="module")
def stores(tiny_models, conll_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    paths = {}
    for backend, name in (("zarr", "s.zarr"), ("hdf5", "s.h5")):
        paths[backend] = extract(ExtractConfig(out=str(root / name), model=tiny_models["roberta"],
                                               corpus=CorpusSpec(str(conll_corpus)), backend=backend,
                                               block_tokens=256, chunk_tokens=64, progress=False)).path
    return paths


def test_zarr_and_hdf5_hold_identical_content(stores):
    with open_store(stores["zarr"]) as z, open_store(stores["hdf5"]) as h:
        assert z.fingerprint == h.fingerprint
        for name in (fmt.HIDDEN_STATES, fmt.INPUT_IDS, fmt.WORD_IDS, fmt.TOKEN_WINDOW, fmt.TOKEN_OFFSETS,
                     fmt.WORD_OFFSETS, fmt.SEQUENCE_INDEX, fmt.WORD_LABELS, fmt.PROGRESS):
            np.testing.assert_array_equal(z.backend.read(name), h.backend.read(name), err_msg=name)
        for row in range(len(z)):
            np.testing.assert_array_equal(z.sequence(row).hidden_states, h.sequence(row).hidden_states)


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_no_padding_is_stored(stores, backend):
    with open_store(stores[backend]) as store:
        expected = store.num_tokens * len(store.layers) * store.hidden_size * 2
        assert store.backend.shape(fmt.HIDDEN_STATES)[0] == store.num_tokens
        assert int(store.token_offsets[-1]) == store.num_tokens
        stored = store.backend.nbytes_stored(fmt.HIDDEN_STATES)
        if backend == "hdf5":
            assert stored == expected  # contiguous: exactly the raw bytes
        else:  # this store is tiny (32-dim vectors, 64-token shards): allow its per-chunk index entries
            assert expected <= stored <= expected * 1.05


def test_large_store_hidden_bytes_are_within_two_percent(tiny_models, tmp_path):
    from tests.conftest import _random_sentences, write_conll

    corpus = write_conll(tmp_path / "big.conll", _random_sentences(600, seed=9))
    out = extract(ExtractConfig(out=str(tmp_path / "big.zarr"), model=tiny_models["bert"],
                                corpus=CorpusSpec(str(corpus)), progress=False)).path
    with open_store(out) as store:
        minimum = store.num_tokens * len(store.layers) * store.hidden_size * 2
        assert minimum <= store.backend.nbytes_stored(fmt.HIDDEN_STATES) <= minimum * 1.02


def test_layer_subset_and_negative_indices(stores):
    with open_store(stores["zarr"]) as store:
        full = store.sequence(3).hidden_states
        np.testing.assert_array_equal(store.sequence(3, layers=[-1]).hidden_states, full[:, -1:])
        np.testing.assert_array_equal(store.sequence(3, layers=[0, 2]).hidden_states, full[:, [0, 2]])
        with pytest.raises(Exception, match="layer 7 is not in store"):
            store.sequence(3, layers=[7])


def test_word_pooling_first_and_mean(stores):
    with open_store(stores["hdf5"]) as store:
        for row in range(len(store)):
            tokens = store.sequence(row)
            first = store.sequence(row, pooling="first").hidden_states
            mean = store.sequence(row, pooling="mean").hidden_states
            assert len(first) == len(mean) == tokens.num_words == len(tokens.labels)
            for word in range(tokens.num_words):
                positions = np.nonzero(tokens.word_ids == word)[0]
                np.testing.assert_array_equal(first[word], tokens.hidden_states[positions[0]])
                expected = tokens.hidden_states[positions].astype(np.float32).mean(axis=0)
                np.testing.assert_allclose(mean[word].astype(np.float32), expected, rtol=1e-3, atol=1e-3)


def test_pool_words_rejects_unknown_pooling():
    with pytest.raises(Exception, match="unknown pooling"):
        pool_words(np.zeros((3, 1, 2)), np.array([-1, 0, -1]), 1, "max")


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_shuffled_epoch_visits_every_sequence_once(stores, backend):
    with open_store(stores[backend]) as store:
        orders = []
        for epoch in range(2):
            items = list(store.iter_epoch(seed=1, epoch=epoch, buffer_sequences=8, span_bytes=4096))
            rows = [item.index for item in items]
            assert sorted(rows) == list(range(len(store)))
            for item in items[:5]:
                np.testing.assert_array_equal(item.hidden_states, store.sequence(item.index).hidden_states)
            orders.append(rows)
        assert orders[0] != orders[1]
        again = [item.index for item in store.iter_epoch(seed=1, epoch=0, buffer_sequences=8, span_bytes=4096)]
        assert again == orders[0]
        assert len(store.spans(4096)) > 1


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_epochs_kept_in_memory_read_once_and_give_the_same_sequences(stores, backend, monkeypatch):
    def epoch(store, number, **options):
        return [(item.index, item.hidden_states.copy()) for item in store.iter_epoch(
            layers=[0, -1], seed=1, epoch=number, buffer_sequences=8, span_bytes=4096, **options)]

    with open_store(stores[backend]) as streamed, open_store(stores[backend]) as kept:
        assert kept.decoded_bytes([0, -1]) == kept.num_tokens * 2 * kept.hidden_size * 2  # float16, 2 layers
        reads = []
        read_raw = type(kept)._read_raw
        monkeypatch.setattr(kept, "_read_raw", lambda *args: reads.append(args) or read_raw(kept, *args))
        for number in range(3):
            expected, got = epoch(streamed, number), epoch(kept, number, keep_in_memory=True)
            assert [row for row, _ in got] == [row for row, _ in expected]  # the same order
            for (_, mine), (_, theirs) in zip(got, expected):
                np.testing.assert_array_equal(mine, theirs)
            if number == 0:
                first_epoch_reads = len(reads)
                assert first_epoch_reads == len(kept.spans(4096)) > 1
        assert len(reads) == first_epoch_reads  # later epochs read nothing
        epoch(kept, 0, keep_in_memory=False)
        assert len(reads) > first_epoch_reads  # without it, a pass reads again


def test_torch_dataset_and_collate(stores):
    with open_store(stores["zarr"]) as store:
        dataset = store.torch_dataset(layers=[-1], pooling="first")
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_features)
        batch = next(iter(loader))
        assert batch["hidden_states"].shape[:2] == batch["labels"].shape
        assert batch["hidden_states"].shape[2:] == (1, store.hidden_size)
        assert batch["mask"].sum().item() == (batch["labels"] != -100).sum().item()
        token_batch = collate_features([store.sequence(0), store.sequence(1)])
        assert token_batch["word_ids"].shape == token_batch["mask"].shape


def test_text_classification_store(tiny_models, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"text": text, "label": label}) for text, label in
                              [("Anna rose", "pos"), ("the lamb was said", "neg"), ("Berlin", "pos")]))
    out = extract(ExtractConfig(out=str(tmp_path / "t.zarr"), model=tiny_models["gpt2"],
                                corpus=CorpusSpec(str(path)), progress=False)).path
    with open_store(out) as store:
        assert store.task == "sequence-classification" and store.label_names == ["neg", "pos"]
        assert [int(store.sequence(row).labels) for row in range(3)] == [1, 0, 1]
        batch = collate_features([store.sequence(row, pooling="mean") for row in range(3)])
        assert batch["labels"].tolist() == [1, 0, 1]


def test_rerun_of_a_complete_store_is_a_no_op(stores, tiny_models, conll_corpus):
    before = open_store(stores["zarr"]).manifest.extraction.completed_at
    result = extract(ExtractConfig(out=stores["zarr"], model=tiny_models["roberta"],
                                   corpus=CorpusSpec(str(conll_corpus)),
                          block_tokens=256, chunk_tokens=64, progress=False))
    assert result.already_complete
    assert open_store(stores["zarr"]).manifest.extraction.completed_at == before


def test_direct_shard_reads_equal_zarr_python_reads(stores):
    with open_store(stores["zarr"]) as store:
        backend = store.backend
        assert backend._shard_reader(fmt.HIDDEN_STATES) is not None  # the layout featstore writes qualifies
        n = store.num_tokens
        for start, stop, columns in [(0, n, None), (5, n - 3, [2]), (90, 300, slice(1, 3)), (n - 10, n, [0, 2])]:
            fast = backend.read(fmt.HIDDEN_STATES, start, stop, columns)
            backend.fast_reads = False
            slow = backend.read(fmt.HIDDEN_STATES, start, stop, columns)
            backend.fast_reads = True
            np.testing.assert_array_equal(fast, slow)


def test_explicit_truncation_is_recorded_and_keeps_labels_aligned(tiny_models, conll_corpus, tmp_path):
    from featstore import load_corpus

    out = extract(ExtractConfig(out=str(tmp_path / "t.zarr"), model=tiny_models["bert"], truncate=True,
                                corpus=CorpusSpec(str(conll_corpus)), progress=False)).path
    corpus = load_corpus(str(conll_corpus))
    with open_store(out) as store:
        assert store.manifest.extraction.truncation is True
        truncated = store.manifest.counts.num_truncated_sequences
        assert truncated > 0 and store.manifest.counts.num_windowed_sequences == 0
        shortened = 0
        for row in range(len(store)):
            item = store.sequence(row)
            assert len(item.input_ids) <= store.manifest.extraction.max_length
            gold = corpus.examples[row].label
            assert list(item.labels) == list(gold[: item.num_words])
            shortened += item.num_words < len(gold)
        assert shortened == truncated


def test_checksums_taken_while_writing_equal_checksums_of_the_stored_bytes(stores):
    """The writer hashes blocks and chunks from memory; a read-back of every one must give the same values."""
    from featstore.store.chunks import piece_checksums
    from featstore.store.integrity import compute_checksums

    for path in stores.values():
        with open_store(path) as store:
            recorded = store.manifest.integrity
            assert compute_checksums(store.backend, recorded.block_rows).arrays == recorded.arrays
            assert [level.array for level in recorded.chunk_levels] == [fmt.HIDDEN_CHECKSUMS,
                                                                        fmt.HIDDEN_SPAN_CHECKSUMS]
            for level in recorded.chunk_levels:
                rows, sums = level.chunk_rows, store.backend.read(level.array)
                assert len(sums) == -(-store.num_tokens // rows)
                for chunk in range(len(sums)):
                    stored = store.backend.read(fmt.HIDDEN_STATES, chunk * rows, (chunk + 1) * rows)
                    assert (piece_checksums(stored, level.per_layer) == sums[chunk]).all()
