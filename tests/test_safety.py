"""Nothing wrong is ever used: damaged stores are refused by every reader, naming what is wrong (issue 15's
fault list; docs/fault-matrix.md lists every fault and the test that tries it)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from featstore import ExtractConfig, extract, open_store, verify_store
from featstore.errors import CorruptStoreError
from featstore.extraction.corpus import CorpusSpec
from featstore.store import format as fmt
from featstore.store.backends import open_backend
from tests.conftest import copy_path, edit_attrs

BACKENDS = {"zarr": "s.zarr", "hdf5": "s.h5"}


@pytest.fixture(scope="module")
def sound_stores(tiny_models, conll_corpus, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sound")
    return {backend: extract(ExtractConfig(out=str(root / name), model=tiny_models["bert"], backend=backend,
                                           block_tokens=64, corpus=CorpusSpec(str(conll_corpus)),
                                           progress=False)).path
            for backend, name in BACKENDS.items()}


def _read_everything(path: str) -> None:
    with open_store(path) as store:
        for _ in store.iter_epoch(shuffle=False):
            pass


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x40]))


def _hidden_data_offset(store: str) -> tuple[Path, int]:
    """A file and a byte offset inside the hidden states' data (not metadata, not an index)."""
    if Path(store).is_dir():
        return Path(store) / fmt.HIDDEN_STATES / "c" / "1" / "0" / "0", 100
    with h5py.File(store, "r") as handle:
        return Path(store), handle[fmt.HIDDEN_STATES].id.get_offset() + 64 * 3 * 32 * 2 + 100


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_flipped_data_byte_is_refused_naming_store_array_and_chunk(sound_stores, tmp_path, backend):
    damaged = copy_path(sound_stores[backend], tmp_path / BACKENDS[backend])
    _flip_byte(*_hidden_data_offset(damaged))
    with pytest.raises(CorruptStoreError, match=r"hidden_states chunk \d+ \(tokens \d+\.\.\d+") as error:
        _read_everything(damaged)
    assert damaged in str(error.value) and "featstore verify" in str(error.value)
    with open_store(damaged) as store, pytest.raises(CorruptStoreError):
        for row in range(len(store)):  # random access is checked as well
            store.sequence(row)
    assert any("does not match" in problem for problem in verify_store(damaged))


def test_a_deleted_shard_never_reads_as_zeros(sound_stores, tmp_path):
    damaged = copy_path(sound_stores["zarr"], tmp_path / "s.zarr")
    (Path(damaged) / fmt.HIDDEN_STATES / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(CorruptStoreError, match=r"object hidden_states/c/1/0/0"):
        _read_everything(damaged)


def test_a_flipped_byte_in_a_shard_index_is_refused(sound_stores, tmp_path):
    damaged = copy_path(sound_stores["zarr"], tmp_path / "s.zarr")
    shard = Path(damaged) / fmt.HIDDEN_STATES / "c" / "0" / "0" / "0"
    _flip_byte(shard, shard.stat().st_size - 12)  # inside the index, before its crc32c
    with pytest.raises(CorruptStoreError, match="shard index does not match its crc32c"):
        _read_everything(damaged)
    assert verify_store(damaged)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit,finding", [
    (lambda attrs: attrs["corpus"]["label_names"].reverse(), "changed after it was finalized (sections: corpus)"),
    (lambda attrs: attrs["extraction"]["layers"].reverse(), "extraction.layers"),
    (lambda attrs: attrs.pop("integrity"), "integrity section is missing"),
])
def test_edits_that_change_what_the_bytes_mean_are_refused(sound_stores, tmp_path, backend, edit, finding):
    damaged = copy_path(sound_stores[backend], tmp_path / BACKENDS[backend])
    edit_attrs(damaged, edit)
    with pytest.raises(CorruptStoreError, match=finding.replace("(", r"\(").replace(")", r"\)")):
        open_store(damaged)
    assert any(finding in problem for problem in verify_store(damaged))
    assert any(finding in problem for problem in verify_store(damaged, deep=False))


def test_a_changed_array_data_type_is_refused(sound_stores, tmp_path):
    damaged = copy_path(sound_stores["zarr"], tmp_path / "s.zarr")
    metadata_path = Path(damaged) / fmt.HIDDEN_STATES / "zarr.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["data_type"] = "uint16"  # same bytes, garbage values
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(CorruptStoreError, match="hidden_states has data type uint16, but the store's attributes say "
                                                "float16"):
        open_store(damaged)
    assert any("data type uint16" in problem for problem in verify_store(damaged))


@pytest.mark.parametrize("backend", BACKENDS)
def test_damaged_small_arrays_are_refused_at_open(sound_stores, tmp_path, backend):
    damaged = copy_path(sound_stores[backend], tmp_path / BACKENDS[backend])
    store = open_backend(damaged, "r+")
    labels = store.read(fmt.WORD_LABELS)
    labels[3] = (labels[3] + 1) % 3
    store.write(fmt.WORD_LABELS, 0, labels)
    store.close()
    with pytest.raises(CorruptStoreError, match="array word_labels block 0"):
        open_store(damaged)


def test_stores_from_before_checked_reads_still_read_with_one_warning(sound_stores, tmp_path, caplog):
    """A format 1.1 store (block digests, no chunk checksums) opens and reads; one warning per store."""
    old = copy_path(sound_stores["zarr"], tmp_path / "old.zarr")
    for array in (fmt.HIDDEN_CHECKSUMS, fmt.HIDDEN_SPAN_CHECKSUMS):
        shutil.rmtree(Path(old) / array)

    def as_1_1(attrs):
        attrs["format_version"] = "1.1"
        for key in ("array_types", "sections", "chunks", "span_chunks"):
            attrs["integrity"].pop(key)
        for array in (fmt.HIDDEN_CHECKSUMS, fmt.HIDDEN_SPAN_CHECKSUMS):
            attrs["integrity"]["arrays"].pop(array)

    edit_attrs(old, as_1_1)
    with caplog.at_level(logging.WARNING, logger="featstore"):
        for _ in range(2):
            with open_store(old) as store, open_store(sound_stores["zarr"]) as new:
                assert all(np.array_equal(store.sequence(row).hidden_states, new.sequence(row).hidden_states)
                           for row in range(len(store)))
    warnings = [record for record in caplog.records if "not checked" in record.getMessage()]
    assert len(warnings) == 1 and "1.1" in warnings[0].getMessage()
    assert verify_store(old) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_checked_reads_return_the_same_values_as_unchecked_ones(sound_stores, backend):
    """Widening reads to whole chunks and slicing back must not change what a reader gets."""
    with open_store(sound_stores[backend]) as store:
        raw = store.backend
        for layers in (None, [2], [0, 2]):
            columns = store.layer_columns(layers)
            for row in range(len(store)):
                position = int(store.position_of_row[row])
                start, stop = int(store.token_offsets[position]), int(store.token_offsets[position + 1])
                expected = raw.read(fmt.HIDDEN_STATES, start, stop)[:, columns]
                assert np.array_equal(store.sequence(row, layers).hidden_states, expected)


# --- half-created stores, --overwrite, names ---------------------------------------------------------------
def _extract(tiny_models, conll_corpus, out, **options):
    return extract(ExtractConfig(out=str(out), model=tiny_models["bert"], corpus=CorpusSpec(str(conll_corpus)),
                                 block_tokens=64, progress=False, **options))


def _zarr_group_only(path: Path) -> None:
    import zarr

    zarr.open_group(str(path), mode="w-")


def _zarr_arrays_without_attributes(path: Path) -> None:
    import zarr

    group = zarr.open_group(str(path), mode="w-")
    group.create_array(fmt.INPUT_IDS, shape=(5,), dtype="int32")


def _hdf5_file_only(path: Path) -> None:
    h5py.File(path, "w-").close()


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("name,make", [("s.zarr", _zarr_group_only), ("s.zarr", _zarr_arrays_without_attributes),
                                       ("s.h5", _hdf5_file_only), ("s.h5", lambda path: path.write_bytes(b""))])
def test_a_half_created_store_is_started_over(tiny_models, conll_corpus, tmp_path, name, make, overwrite):
    """What a SIGKILL leaves in the first fraction of a second (group created, attributes not yet written)."""
    target = tmp_path / name
    make(target)
    backend = "hdf5" if name.endswith(".h5") else "zarr"
    result = _extract(tiny_models, conll_corpus, target, backend=backend, overwrite=overwrite)
    assert verify_store(result.path) == []


def test_something_foreign_in_a_shell_is_still_refused(tiny_models, conll_corpus, tmp_path):
    import zarr

    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w-")
    group.create_array("my_results", shape=(5,), dtype="int32")
    with pytest.raises(Exception, match="not a readable featstore store"):
        _extract(tiny_models, conll_corpus, tmp_path / "s.zarr", overwrite=True)
    assert "my_results" in zarr.open_group(str(tmp_path / "s.zarr")).array_keys()


def test_overwrite_never_changes_the_bytes_an_open_hdf5_reader_sees(tiny_models, conll_corpus, tmp_path):
    target = tmp_path / "s.h5"
    _extract(tiny_models, conll_corpus, target, backend="hdf5", layers=[0, 2])
    with open_store(target) as reader:
        before = [reader.sequence(row).hidden_states.copy() for row in range(len(reader))]
        _extract(tiny_models, conll_corpus, target, backend="hdf5", layers=[1, 2], overwrite=True)
        assert all(np.array_equal(reader.sequence(row).hidden_states, before[row]) for row in range(len(reader)))
    with open_store(target) as replaced:
        assert replaced.layers == [1, 2]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["s.h5"]


def test_overwrite_of_an_open_zarr_store_gives_its_reader_an_error_never_other_data(tiny_models, conll_corpus,
                                                                                     tmp_path):
    target = tmp_path / "s.zarr"
    _extract(tiny_models, conll_corpus, target, layers=[0, 2])
    with open_store(target) as reader:
        _extract(tiny_models, conll_corpus, target, layers=[1, 2], overwrite=True)
        with pytest.raises(CorruptStoreError, match="replaced since it was opened"):
            for row in range(len(reader)):
                reader.sequence(row)
    with open_store(target) as replaced:
        assert replaced.layers == [1, 2]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["s.zarr"]


def test_an_interrupted_overwrite_leaves_the_old_store_and_resumes(tiny_models, conll_corpus, tmp_path,
                                                                   monkeypatch):
    from featstore.extraction import extract as extract_module

    target = tmp_path / "s.zarr"
    _extract(tiny_models, conll_corpus, target, layers=[0, 2])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract_module, "finalize", killed)
    with pytest.raises(KeyboardInterrupt):
        _extract(tiny_models, conll_corpus, target, layers=[1, 2], overwrite=True)
    monkeypatch.undo()
    with open_store(target) as old:  # untouched while the replacement was being built
        assert old.layers == [0, 2]
    assert (tmp_path / "s.zarr.replacement").is_dir()
    from featstore import Catalog

    listed = {entry.location.name: entry.kind for entry in Catalog(tmp_path).entries()}
    assert listed == {"s.zarr": "zarr", "s.zarr.replacement": "replacement"}  # a side object, not a store
    assert [why for _, why in Catalog(tmp_path).garbage()] == [
        "unfinished replacement store (extract --overwrite), nobody writing it"]
    result = _extract(tiny_models, conll_corpus, target, layers=[1, 2], overwrite=True)
    assert result.resumed_from == result.num_sequences  # everything was written: only finalize was left
    with open_store(target) as replaced:
        assert replaced.layers == [1, 2]
    assert verify_store(result.path) == [] and not (tmp_path / "s.zarr.replacement").exists()


@pytest.mark.parametrize("out,message", [
    ("s.zarr.lock", "may not end in '.lock'"),
    ("s.zarr.partial", "may not end in '.partial'"),
    ("inner.zarr/nested.zarr", "lies inside the store"),
])
def test_reserved_and_nested_store_locations_are_refused(sound_stores, tiny_models, conll_corpus, tmp_path, out,
                                                         message):
    copy_path(sound_stores["zarr"], tmp_path / "inner.zarr")
    with pytest.raises(Exception, match=message):
        _extract(tiny_models, conll_corpus, tmp_path / out)


# --- bad input ---------------------------------------------------------------------------------------------
def test_non_finite_regression_labels_are_refused_naming_the_row(tiny_models, tmp_path):
    from featstore.errors import CorpusError

    corpus = tmp_path / "r.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"row {i}", "label": value})
                                for i, value in enumerate([1.0, 2.5, float("nan"), 3.0])))
    with pytest.raises(CorpusError, match="row 2: regression label nan is not a finite number"):
        extract(ExtractConfig(out=str(tmp_path / "r.zarr"), model=tiny_models["bert"],
                              corpus=CorpusSpec(str(corpus)), progress=False))
    assert not (tmp_path / "r.zarr").exists()


@pytest.mark.parametrize("content,finding", [
    (b"Alice B-PER\ncaf\xe9 O\n", "c.conll:2: not valid UTF-8"),
    (b"Alice B-PER\n\x00\x01\x02 O\n", "c.conll:2: holds a NUL byte"),
])
def test_undecodable_corpora_are_refused_naming_file_and_line(tiny_models, tmp_path, content, finding):
    from featstore.errors import CorpusError

    corpus = tmp_path / "c.conll"
    corpus.write_bytes(content)
    with pytest.raises(CorpusError, match=finding):
        extract(ExtractConfig(out=str(tmp_path / "c.zarr"), model=tiny_models["bert"],
                              corpus=CorpusSpec(str(corpus)), progress=False))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes(b'{"text": "fine", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: not valid UTF-8"):
        extract(ExtractConfig(out=str(tmp_path / "j.zarr"), model=tiny_models["bert"],
                              corpus=CorpusSpec(str(jsonl)), progress=False))


@pytest.fixture(scope="module")
def trained_head(sound_stores, tmp_path_factory) -> str:
    from heads import TrainConfig, train

    out = tmp_path_factory.mktemp("head") / "head"
    train(TrainConfig(store=sound_stores["zarr"], out=str(out), heads=[{"type": "linear", "layers": [2]}],
                      epochs=1, progress=False))
    return str(out)


def test_a_head_refuses_a_store_of_another_task_before_training(trained_head, sound_stores, tiny_models,
                                                                tmp_path, capsys):
    from featstore.errors import IncompatibleHeadError
    from heads import TrainConfig, train
    from heads.cli import main as heads_main

    corpus = tmp_path / "s.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"some words {i}", "label": "ab"[i % 2]}) for i in range(12)))
    sequence_store = extract(ExtractConfig(out=str(tmp_path / "seq.zarr"), model=tiny_models["bert"],
                                           corpus=CorpusSpec(str(corpus)), progress=False)).path
    assert heads_main(["evaluate", "--head", trained_head, "--store", sequence_store]) == 2
    assert "is a token-classification head but store" in capsys.readouterr().err
    with pytest.raises(IncompatibleHeadError, match="sequence-classification corpus"):
        train(TrainConfig(store=sound_stores["zarr"], eval_store=sequence_store, out=str(tmp_path / "never"),
                          heads=[{"type": "linear", "layers": [2]}], epochs=1, progress=False))
    assert not (tmp_path / "never").exists()  # refused before the first epoch


@pytest.mark.parametrize("damage,finding", [
    (lambda head: _flip_byte(head / "model.safetensors", (head / "model.safetensors").stat().st_size - 3),
     "does not match the sha256 recorded"),
    (lambda head: (head / "config.json").write_text((head / "config.json").read_text()[:40]), "not valid JSON"),
    (lambda head: (head / "model.safetensors").write_bytes((head / "model.safetensors").read_bytes()[:50]),
     "does not match the sha256 recorded"),
    (lambda head: (head / "config.json").write_text(json.dumps({**json.loads((head / "config.json").read_text()),
                                                                "layers": "two"})), "malformed head"),
])
def test_damaged_heads_are_refused_at_load(trained_head, tmp_path, damage, finding):
    from featstore.errors import HeadFormatError
    from heads import Head

    head = Path(copy_path(trained_head, tmp_path / "head"))
    damage(head)
    with pytest.raises(HeadFormatError, match=finding):
        Head.from_pretrained(head)


def test_training_on_a_damaged_store_exits_with_an_error(sound_stores, tmp_path, capsys):
    from heads.cli import main as heads_main

    damaged = copy_path(sound_stores["hdf5"], tmp_path / "s.h5")
    _flip_byte(*_hidden_data_offset(damaged))
    code = heads_main(["train", "--store", damaged, "--out", str(tmp_path / "head"), "--head", "linear",
                       "--layers", "2", "--epochs", "1", "--no-progress"])
    assert code == 2 and "does not match its checksum" in capsys.readouterr().err
