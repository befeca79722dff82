"""Lossless compression of the hidden states (issue 11, format 1.4): `--compression zstd[:LEVEL]` on Zarr
extraction and on `featstore convert` (both backends); values read back equal the raw store's, the bytes shrink,
checks and verify work as on a raw store, and mistakes are refused before anything is written."""

from __future__ import annotations

import builtins
import re
from pathlib import Path

import numpy as np
import pytest

from featstore import ExtractConfig, extract, open_store, verify_store
from featstore.cli import main as featstore_main
from featstore.errors import ConfigError, CorruptStoreError, StoreError, StoreFormatError
from featstore.extraction.convert import convert_store
from featstore.extraction.corpus import CorpusSpec
from featstore.sharing.location import resolve
from featstore.sharing.transfer import copy_store
from featstore.store import format as fmt
from featstore.store.backends.zarr import ShardReader
from featstore.store.info import describe_store
from tests.conftest import copy_path, edit_attrs


def _extract(out, model, corpus, **options):
    return extract(ExtractConfig(out=str(out), model=model, corpus=CorpusSpec(str(corpus)), layers=[0, 3, -1],
                                 progress=False, **options)).path


@pytest.fixture(scope="module")
def raw_and_compressed(minilm_path, conll_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("compression")
    return {name: _extract(root / f"{name}.zarr", minilm_path, conll_corpus, dtype=dtype, compression=codec)
            for name, dtype, codec in (("float16", "float16", None), ("float16-zstd", "float16", "zstd"),
                                       ("int8-zstd", "int8", "zstd:9"))}


def _assert_same_values(path_a, path_b):
    with open_store(path_a) as a, open_store(path_b) as b:
        assert len(a) == len(b) and a.fingerprint == b.fingerprint
        for row in range(len(a)):
            np.testing.assert_array_equal(a.sequence(row).hidden_states, b.sequence(row).hidden_states)
        streamed = {item.index: item.hidden_states for item in b.iter_epoch(layers=[3], seed=1)}
        for row in range(len(a)):
            np.testing.assert_array_equal(streamed[row], a.sequence(row, layers=[3]).hidden_states)


def test_a_compressed_extraction_reads_back_the_raw_values_in_fewer_bytes(raw_and_compressed):
    raw, compressed = raw_and_compressed["float16"], raw_and_compressed["float16-zstd"]
    _assert_same_values(raw, compressed)  # same fingerprint too: compression does not change the content
    with open_store(raw) as a, open_store(compressed) as b:
        assert b.manifest.layout.compression == "zstd:5" and a.manifest.layout.compression is None
        assert b.manifest.format_version == fmt.FORMAT_VERSION
        assert b.backend.nbytes_stored(fmt.HIDDEN_STATES) < a.backend.nbytes_stored(fmt.HIDDEN_STATES)
    # the direct shard reader is for raw chunks only: a compressed array goes through zarr-python
    assert ShardReader.for_array(resolve(compressed).child(fmt.HIDDEN_STATES)) is None
    assert verify_store(compressed) == []
    summary = describe_store(compressed)
    assert re.search(r"compression +zstd:5 \(Blosc zstd, byte shuffle\): hidden states at 0\.\d+ of their raw", summary)


def test_an_8bit_store_compresses_too(raw_and_compressed, tmp_path):
    compressed = raw_and_compressed["int8-zstd"]
    raw = convert_store(compressed, tmp_path / "int8.zarr", compression="none", progress=False).url
    _assert_same_values(raw, compressed)
    with open_store(raw) as a, open_store(compressed) as b:
        assert b.manifest.layout.compression == "zstd:9" and b.storage_dtype == "int8"
        assert b.backend.nbytes_stored(fmt.HIDDEN_STATES) < a.backend.nbytes_stored(fmt.HIDDEN_STATES)


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_convert_compresses_and_decompresses_on_either_backend(raw_and_compressed, tmp_path, backend):
    suffix = ".h5" if backend == "hdf5" else ".zarr"
    compressed = convert_store(raw_and_compressed["float16"], tmp_path / f"c{suffix}", backend=backend,
                               compression="zstd:3", progress=False).url
    assert verify_store(compressed) == []
    _assert_same_values(raw_and_compressed["float16"], compressed)
    with open_store(compressed) as store:
        assert store.manifest.layout.compression == "zstd:3"
        assert store.manifest.extraction.extra["converted_from"]["path"] == raw_and_compressed["float16"]
    back = convert_store(compressed, tmp_path / f"raw{suffix}", compression="none", progress=False).url
    with open_store(back) as store:
        assert store.manifest.layout.compression is None
    _assert_same_values(raw_and_compressed["float16"], back)


def test_a_damaged_compressed_chunk_is_caught_by_readers_and_verify(raw_and_compressed, tmp_path):
    damaged = copy_path(raw_and_compressed["float16-zstd"], tmp_path / "d.zarr")
    shard = next(path for path in sorted((Path(damaged) / fmt.HIDDEN_STATES / "c").rglob("*")) if path.is_file())
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10  # inside a compressed chunk
    shard.write_bytes(bytes(data))
    with open_store(damaged) as store, pytest.raises(CorruptStoreError):
        for row in range(len(store)):
            store.sequence(row)
    assert verify_store(damaged)


def test_compression_mistakes_are_refused_before_anything_is_loaded(minilm_path, conll_corpus, tmp_path):
    for value, message in (("lz4", "unknown compression 'lz4'; choose from zstd"),
                           ("zstd:12", "level is an integer from 1 to 9"), ("zstd:x", "level is an integer")):
        with pytest.raises(ConfigError, match=message):
            ExtractConfig(out=str(tmp_path / "a.zarr"), model="no-such-model", corpus=CorpusSpec(str(conll_corpus)),
                          compression=value).validate()
    with pytest.raises(ConfigError, match=r"--compression needs --backend zarr.*featstore convert"):
        ExtractConfig(out=str(tmp_path / "a.h5"), model="no-such-model", corpus=CorpusSpec(str(conll_corpus)),
                      backend="hdf5", compression="zstd").validate()
    for raw in ("none", "NONE"):  # as convert takes it: raw chunks, on either backend
        spec = ExtractConfig(out=str(tmp_path / "a.h5"), model="no-such-model", corpus=CorpusSpec(str(conll_corpus)),
                             backend="hdf5", compression=raw).validate()
        assert spec.compression is None
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "a.h5").exists()


def test_convert_refuses_a_copy_that_changes_nothing(raw_and_compressed, tmp_path):
    with pytest.raises(ConfigError, match=r"nothing to convert.*compression zstd:5"):
        convert_store(raw_and_compressed["float16-zstd"], tmp_path / "same.zarr", compression="zstd", progress=False)
    with pytest.raises(ConfigError, match="--compression: unknown compression"):
        convert_store(raw_and_compressed["float16"], tmp_path / "x.zarr", compression="gzip", progress=False)


def test_an_unknown_codec_asks_for_an_upgrade(raw_and_compressed, tmp_path):
    store = copy_path(raw_and_compressed["float16-zstd"], tmp_path / "new.zarr")
    edit_attrs(store, lambda attrs: attrs["layout"].update(compression="zfp:3"))
    with pytest.raises(StoreFormatError, match=r"'zfp:3', a codec this featstore does not know.*upgrade featstore"):
        open_store(store)


def test_a_compressed_hdf5_store_without_hdf5plugin_says_what_to_install(raw_and_compressed, tmp_path,
                                                                        monkeypatch):
    compressed = convert_store(raw_and_compressed["float16"], tmp_path / "c.h5", backend="hdf5",
                               compression="zstd", progress=False).url
    real_import = builtins.__import__

    def without_hdf5plugin(name, *args, **kwargs):
        if name == "hdf5plugin":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_hdf5plugin)
    with open_store(compressed) as store, pytest.raises(StoreError, match="pip install hdf5plugin"):
        store.sequence(0)


def test_extract_and_convert_take_compression_on_the_command_line(raw_and_compressed, tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    assert featstore_main(["convert", raw_and_compressed["float16"], str(out), "--dtype", "int8",
                           "--compression", "zstd:2", "--no-progress"]) == 0
    with open_store(str(out)) as store:
        assert store.manifest.layout.compression == "zstd:2" and store.storage_dtype == "int8"
    with pytest.raises(SystemExit):
        featstore_main(["extract", "--help"])
    assert "--compression zstd[:LEVEL]" in capsys.readouterr().out


def test_push_copies_a_compressed_store_as_it_is(raw_and_compressed, tmp_path):
    copied = copy_store(raw_and_compressed["int8-zstd"], tmp_path / "copies/", progress=False)
    assert verify_store(copied.url) == []
    with open_store(copied.url) as store:
        assert store.manifest.layout.compression == "zstd:9"
    _assert_same_values(raw_and_compressed["int8-zstd"], copied.url)


def test_a_raw_store_keeps_the_attributes_format_1_3_wrote(raw_and_compressed, tmp_path):
    """No `layout.compression` key unless compressed, so a store written as 1.3 (digests over its attributes as
    they are) still opens and verifies, and a raw store's attributes are what a 1.3 reader checks."""
    old = copy_path(raw_and_compressed["float16"], tmp_path / "old.zarr")

    def as_1_3(attrs):
        assert "compression" not in attrs["layout"]
        attrs["format_version"] = "1.3"
        attrs["integrity"]["sections"] = {key: fmt.sha256_json(value) for key, value in attrs.items()
                                          if key not in ("status", "integrity")}

    edit_attrs(old, as_1_3)
    assert verify_store(old) == []
    _assert_same_values(raw_and_compressed["float16"], old)
