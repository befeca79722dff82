"""Storage encodings (issue 11): 8-bit stores with per-token scales, read back transparently, checked like every
other array, and `featstore convert`."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from featstore import ExtractConfig, FrozenEncoder, extract, open_store, verify_store
from featstore.cli import main as featstore_main
from featstore.errors import ConfigError, CorruptStoreError, StoreConflictError, StoreFormatError
from featstore.extraction.convert import convert_store
from featstore.extraction.corpus import CorpusSpec, load_corpus
from featstore.extraction.encoder import to_storage
from featstore.sharing.location import resolve
from featstore.sharing.transfer import copy_store
from featstore.store import format as fmt
from featstore.store.backends.zarr import ShardReader
from featstore.store.encoding import FLOAT8_E4M3_VALUES, decode_hidden, decoded_dtype, split_wire
from featstore.store.info import describe_store
from featstore.store.manifest import StoreManifest
from heads import Head, TrainConfig, Trainer, evaluate_heads
from tests.conftest import copy_path, edit_attrs

SCALED = ("int8", "float8_e4m3")


def _round_trip(values: torch.Tensor, storage_dtype: str) -> np.ndarray:
    encoding = fmt.ENCODINGS[storage_dtype]
    codes, scales = split_wire(to_storage(values, storage_dtype).numpy(), np.dtype(encoding.array_dtype),
                               encoding.scaled)
    return decode_hidden(codes, storage_dtype, scales).astype(np.float32)


def _error_bound(values: np.ndarray, storage_dtype: str) -> np.ndarray:
    """The largest error rounding to the encoding may make, per element."""
    absmax = np.abs(values).max(axis=-1, keepdims=True)
    if storage_dtype == "int8":  # half a code step; the step is absmax / 127
        return absmax / 127 / 2 * (1 + 1e-5)
    if storage_dtype == "float8_e4m3":  # 3 mantissa bits: half an ulp, 2**-4 relative; subnormals 2**-10 * scale
        return np.maximum(np.abs(values) * 2.0**-4, absmax / 448 * 2.0**-10) * (1 + 1e-5)
    relative, subnormal = {"float16": (2.0**-11, 2.0**-25), "bfloat16": (2.0**-8, 0.0), "float32": (0.0, 0.0)}[
        storage_dtype]
    return np.abs(values) * relative + subnormal


@pytest.mark.parametrize("storage_dtype", fmt.STORAGE_DTYPES)
def test_round_trip_error_stays_within_the_encodings_bound_on_random_values(storage_dtype):
    generator = torch.Generator().manual_seed(0)
    # heavy tails and an outlier channel, as transformer activations have; one all-zero row
    values = torch.randn(300, 3, 64, generator=generator) * torch.rand(300, 3, 1, generator=generator) * 4
    values[:, :, 7] *= 30
    values[5, 1] = 0
    decoded = _round_trip(values, storage_dtype)
    expected = values.numpy()
    assert np.all(np.abs(decoded - expected) <= _error_bound(expected, storage_dtype))
    assert np.all(decoded[5, 1] == 0)
    if fmt.ENCODINGS[storage_dtype].scaled:  # every row uses the codes' full range
        assert np.allclose(np.abs(decoded).max(-1), np.abs(expected).max(-1), rtol=1e-6)


def test_float8_table_decodes_every_code_as_torch_does():
    codes = torch.arange(256, dtype=torch.uint8)
    want = codes.view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(FLOAT8_E4M3_VALUES, want)  # NaN where torch has NaN


@pytest.fixture(scope="module")
def minilm_stores(minilm_path, conll_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("encodings")
    return {dtype: extract(ExtractConfig(out=str(root / f"{dtype}.zarr"), model=minilm_path, dtype=dtype,
                                         corpus=CorpusSpec(str(conll_corpus)), layers=[0, 3, -1],
                                         progress=False)).path
            for dtype in ("float32", *SCALED)}


@pytest.mark.parametrize("storage_dtype", SCALED)
def test_real_minilm_features_read_back_within_the_bound_of_the_live_encoder(minilm_stores, minilm_path,
                                                                               conll_corpus, storage_dtype):
    """The store against the live float32 encoder: each value within its quantisation step (plus float32
    batching noise), through random access and streaming alike."""
    encoder = FrozenEncoder.load(minilm_path, device="cpu", dtype="float32", progress=False)
    corpus = load_corpus(str(conll_corpus))
    with open_store(minilm_stores[storage_dtype]) as store:
        extraction = store.manifest.extraction
        sequences = encoder.tokenize(corpus.examples, extraction.max_length, extraction.stride)
        streamed = {item.index: item.hidden_states for item in store.iter_epoch(seed=3)}
        assert sorted(streamed) == list(range(len(store)))
        for row in range(len(store)):
            live = encoder.features([sequences[row]], store.layers)
            got = store.sequence(row).hidden_states
            assert got.dtype == np.float32
            assert np.all(np.abs(got - live) <= _error_bound(live, storage_dtype) + 1e-4), row
            np.testing.assert_array_equal(streamed[row], got)


def test_an_8bit_store_takes_about_half_the_bytes_and_says_so(minilm_stores, tmp_path):
    float16 = convert_store(minilm_stores["float32"], tmp_path / "f16.zarr", dtype="float16", progress=False)
    with open_store(float16.url) as half, open_store(minilm_stores["int8"]) as int8:
        hidden = {name: store.backend.nbytes_stored(fmt.HIDDEN_STATES)
                  + (store.backend.nbytes_stored(fmt.HIDDEN_SCALES) if name == "int8" else 0)
                  for name, store in (("float16", half), ("int8", int8))}
        # codes: half the bytes; scales: 4 bytes per token and layer against 384 codes
        assert hidden["int8"] / hidden["float16"] == pytest.approx(0.5 + 4 / (2 * 384), abs=0.01)
    summary = describe_store(minilm_stores["int8"])
    assert "stored int8 (absmax scale per token and layer" in summary and f"format {fmt.FORMAT_VERSION}" in summary


@pytest.mark.parametrize("storage_dtype", SCALED)
def test_8bit_stores_take_the_direct_read_path_and_it_reads_what_the_library_reads(minilm_stores, storage_dtype):
    path = minilm_stores[storage_dtype]
    assert ShardReader.for_array(resolve(path).child(fmt.HIDDEN_STATES)) is not None
    with open_store(path) as direct, open_store(path) as library:
        library.backend.direct_reads = False
        for row in range(len(direct)):
            np.testing.assert_array_equal(direct.sequence(row, layers=[3]).hidden_states,
                                          library.sequence(row, layers=[3]).hidden_states)


def test_a_head_trained_on_an_int8_store_equals_one_trained_on_its_dequantised_values(ner_stores, tmp_path):
    """int8 -> float32 conversion writes exactly the dequantised values; the same head and seed on both stores
    must give the same weights and scores: the reader's decoding is all the difference an encoding makes."""
    stores = {"int8": convert_store(ner_stores["train"], tmp_path / "int8.zarr", dtype="int8", progress=False).url}
    stores["float32"] = convert_store(stores["int8"], tmp_path / "deq.zarr", dtype="float32", progress=False).url
    dev = convert_store(ner_stores["dev"], tmp_path / "dev8.h5", dtype="int8", backend="hdf5", progress=False).url
    with open_store(stores["int8"]) as quantised, open_store(stores["float32"]) as dequantised:
        for row in range(0, len(quantised), 37):
            np.testing.assert_array_equal(quantised.sequence(row).hidden_states,
                                          dequantised.sequence(row).hidden_states)
    heads = {}
    for name, store in stores.items():
        summary = Trainer(TrainConfig(store=store, eval_store=dev, out=str(tmp_path / f"head-{name}"), epochs=2,
                                      heads=[{"type": "adapter", "name": "adapter"}], progress=False)).train()
        heads[name] = Head.from_pretrained(summary["adapter"]["dir"])
    for key, tensor in heads["int8"].state_dict().items():
        torch.testing.assert_close(tensor, heads["float32"].state_dict()[key], rtol=1e-5, atol=1e-6)
    scores = [result["metrics"]["f1"] for result in evaluate_heads(list(heads.values()), dev)]
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)


def _zarr_chunk_file(store: str, array: str) -> Path:
    return next(path for path in sorted((Path(store) / array / "c").rglob("*")) if path.is_file())


@pytest.mark.parametrize("name", ["copy.zarr", "copy.h5"])
def test_8bit_stores_copy_and_convert_between_backends_verified(minilm_stores, tmp_path, name):
    """push/pull copy every array (the scales too) and verify the copy; convert changes the backend."""
    path = minilm_stores["int8"]
    if name.endswith(".h5"):
        path = convert_store(minilm_stores["float32"], tmp_path / "src.h5", dtype="int8", backend="hdf5",
                             progress=False).url
    copied = copy_store(path, tmp_path / "out" / name, progress=False)
    assert verify_store(copied.url) == []
    with open_store(path) as source, open_store(copied.url) as copy:
        assert copy.fingerprint == source.fingerprint
        np.testing.assert_array_equal(copy.sequence(4).hidden_states, source.sequence(4).hidden_states)


def test_a_damaged_scale_is_refused_by_readers_and_named_by_verify(minilm_stores, tmp_path):
    damaged = copy_path(minilm_stores["int8"], tmp_path / "d.zarr")
    chunk = _zarr_chunk_file(damaged, fmt.HIDDEN_SCALES)
    data = bytearray(chunk.read_bytes())
    data[9] ^= 0x40
    chunk.write_bytes(bytes(data))
    with open_store(damaged) as store, pytest.raises(CorruptStoreError, match="array hidden_scales block 0"):
        store.sequence(0)
    problems = verify_store(damaged)
    assert any("hidden_scales block 0" in problem for problem in problems), problems


def test_a_store_missing_its_scales_is_refused_at_open(minilm_stores, tmp_path):
    damaged = copy_path(minilm_stores["int8"], tmp_path / "d.zarr")
    shutil.rmtree(Path(damaged) / fmt.HIDDEN_SCALES)
    with pytest.raises((CorruptStoreError, StoreFormatError), match="hidden_scales"):
        open_store(damaged)
    assert any("hidden_scales" in problem for problem in verify_store(damaged))


def test_format_1_2_stores_still_read(minilm_stores, tmp_path):
    """A float32 store as featstore 0.2 wrote it (format 1.2: the same arrays, no encodings) opens and reads."""
    old = convert_store(minilm_stores["float32"], tmp_path / "old.zarr", layers=[0], progress=False).url

    def as_1_2(attrs):
        attrs["format_version"] = "1.2"
        attrs["extraction"].pop("converted_from")
        attrs["integrity"]["sections"] = StoreManifest.from_attrs(attrs, old).section_digests()

    edit_attrs(old, as_1_2)
    assert verify_store(old) == []
    with open_store(old) as store, open_store(minilm_stores["float32"]) as new:
        assert store.manifest.format_version == "1.2"
        np.testing.assert_array_equal(store.sequence(2).hidden_states, new.sequence(2, layers=[0]).hidden_states)


def test_an_unknown_encoding_asks_for_an_upgrade(minilm_stores, tmp_path):
    newer = copy_path(minilm_stores["int8"], tmp_path / "n.zarr")
    edit_attrs(newer, lambda attrs: attrs["extraction"].update(storage_dtype="int4"))
    with pytest.raises(StoreFormatError, match=r"'int4', an encoding this featstore does not know.*upgrade"):
        open_store(newer)


def test_convert_from_the_command_line(minilm_stores, tmp_path, capsys, caplog):
    source = minilm_stores["float32"]
    target = tmp_path / "small.h5"
    command = ["convert", source, str(target), "--dtype", "int8", "--layers", "-1", "--backend", "hdf5",
               "--no-progress"]
    assert featstore_main(command) == 0
    assert capsys.readouterr().out.strip() == str(target)
    with open_store(str(target)) as small, open_store(source) as big:
        assert (small.storage_dtype, small.layers, small.manifest.layout.backend) == ("int8", [6], "hdf5")
        converted_from = small.manifest.extraction.extra["converted_from"]
        assert converted_from["fingerprint"] == big.fingerprint and converted_from["layers"] == [0, 3, 6]
        assert small.fingerprint != big.fingerprint
        want = big.sequence(1, layers=[-1]).hidden_states
        assert np.all(np.abs(small.sequence(1).hidden_states - want) <= _error_bound(want, "int8"))
    with caplog.at_level(logging.INFO, logger="featstore"):
        assert featstore_main(command) == 0  # the same conversion again: nothing to do
    assert any("nothing to do" in record.getMessage() for record in caplog.records)
    assert featstore_main(["convert", source, str(target), "--dtype", "float8_e4m3"]) == 2
    assert "already exists and holds a different store" in capsys.readouterr().err


def test_convert_refuses_what_it_cannot_do(minilm_stores, tmp_path):
    source = minilm_stores["float32"]
    with pytest.raises(ConfigError, match="layer 5 is not in"):
        convert_store(source, tmp_path / "a.zarr", layers=[5], progress=False)
    with pytest.raises(ConfigError, match="nothing to convert"):
        convert_store(source, tmp_path / "a.zarr", progress=False)
    with pytest.raises(ConfigError, match="unknown dtype"):
        convert_store(source, tmp_path / "a.zarr", dtype="int4", progress=False)
    with pytest.raises(StoreConflictError, match="already exists and holds a different store"):
        convert_store(source, minilm_stores["int8"], dtype="float16", progress=False)
    assert not (tmp_path / "a.zarr").exists()


@pytest.mark.parametrize("storage_dtype", fmt.STORAGE_DTYPES)
def test_decoded_dtype_is_what_decoding_returns(storage_dtype):
    """A store kept in memory is sized by decoded_dtype: it must be what decode_hidden gives."""
    encoding = fmt.ENCODINGS[storage_dtype]
    stored = np.zeros((3, 2, 4), dtype=encoding.array_dtype)
    scales = np.ones((3, 2), dtype=np.float32) if encoding.scaled else None
    assert decode_hidden(stored, storage_dtype, scales).dtype == decoded_dtype(storage_dtype)
