"""Bad input gives a clear error naming what is wrong, from the CLI as from the library."""

import json
import os
import shutil

import numpy as np
import pytest

from featstore import ExtractConfig, extract, open_store, verify_store
from featstore.cli import main
from featstore.errors import StoreFormatError
from featstore.extraction.corpus import CorpusSpec
from featstore.store import format as fmt
from featstore.store.backends import open_backend


def _run(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().err


def test_unknown_layer(capsys, tiny_models, conll_corpus, tmp_path):
    code, err = _run(capsys, "extract", "--model", tiny_models["bert"], "--corpus", str(conll_corpus),
                     "--out", str(tmp_path / "s"), "--layers", "0,5", "--no-progress")
    assert code == 2 and "layer 5 does not exist" in err and "3 hidden states" in err


def test_model_path_that_does_not_exist(capsys, conll_corpus, tmp_path):
    code, err = _run(capsys, "extract", "--model", str(tmp_path / "nope"), "--corpus", str(conll_corpus),
                     "--out", str(tmp_path / "s"))
    assert code == 2 and "does not exist" in err and "nope" in err


def test_hub_id_not_in_cache_is_not_downloaded(capsys, conll_corpus, tmp_path):
    code, err = _run(capsys, "extract", "--model", "someone/not-cached-model", "--corpus", str(conll_corpus),
                     "--out", str(tmp_path / "s"))
    assert code == 2 and "never downloads" in err


def test_output_path_that_is_not_a_store(capsys, tiny_models, conll_corpus, tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    code, err = _run(capsys, "extract", "--model", tiny_models["bert"], "--corpus", str(conll_corpus),
                     "--out", str(target), "--overwrite")
    assert code == 2 and "is not a featstore store" in err
    assert (target / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("rows,message", [
    ([], "is empty"),
    ([{"foo": ["a"]}], "no words or text column"),
    ([{"text": "a", "label": "x"}, {"text": "b"}], "rows have no value in label column 'label'"),
])
def test_bad_corpus_through_the_cli(capsys, tiny_models, tmp_path, rows, message):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps(row) for row in rows))
    code, err = _run(capsys, "extract", "--model", tiny_models["bert"], "--corpus", str(corpus), "--out",
                     str(tmp_path / "s"))
    assert code == 2 and message in err and str(corpus) in err


def test_different_arguments_into_the_same_store_are_refused(capsys, tiny_models, conll_corpus, tmp_path):
    out = str(tmp_path / "s.zarr")
    base = ["extract", "--model", tiny_models["bert"], "--corpus", str(conll_corpus), "--out", out, "--no-progress"]
    assert main(base) == 0
    code, err = _run(capsys, *base, "--layers", "-1")
    assert code == 2 and "differs in: layers" in err and "--overwrite" in err
    assert main([*base, "--layers", "-1", "--overwrite"]) == 0
    assert open_store(out).layers == [2]


def test_store_format_too_new(capsys, tiny_models, conll_corpus, tmp_path):
    out = extract(ExtractConfig(out=str(tmp_path / "s.zarr"), model=tiny_models["bert"],
                                corpus=CorpusSpec(str(conll_corpus)), progress=False)).path
    backend = open_backend(out, "r+")
    attrs = backend.get_attrs()
    backend.set_attrs({**attrs, "format_version": "2.0"})
    with pytest.raises(StoreFormatError, match=r"newer than this featstore supports.*upgrade featstore"):
        open_store(out)
    code, err = _run(capsys, "verify", out)
    assert code == 1 and "upgrade featstore" in err


def test_verify_detects_a_missing_shard_and_a_truncated_hdf5(capsys, tiny_models, conll_corpus, tmp_path):
    zarr_out = extract(ExtractConfig(out=str(tmp_path / "s.zarr"), model=tiny_models["bert"], block_tokens=64,
                                     corpus=CorpusSpec(str(conll_corpus)), progress=False)).path
    assert main(["verify", zarr_out]) == 0
    shutil.rmtree(os.path.join(zarr_out, "hidden_states", "c", "1"))
    code, err = _run(capsys, "verify", zarr_out)
    assert code == 1 and "hidden_states block 1 (tokens 64..128, object hidden_states/c/1/0/0) is missing" in err

    h5_out = extract(ExtractConfig(out=str(tmp_path / "s.h5"), model=tiny_models["bert"], backend="hdf5",
                                   corpus=CorpusSpec(str(conll_corpus)), progress=False)).path
    assert verify_store(h5_out) == []
    os.truncate(h5_out, os.path.getsize(h5_out) - 1000)
    assert any("missing" in problem or "fewer" in problem for problem in verify_store(h5_out))


def test_info_summarises_a_store(capsys, tiny_models, conll_corpus, tmp_path):
    out = extract(ExtractConfig(out=str(tmp_path / "s.zarr"), model=tiny_models["gpt2"],
                                corpus=CorpusSpec(str(conll_corpus)), progress=False)).path
    assert main(["info", out]) == 0
    text = capsys.readouterr().out
    for field in ("encoder", "layers", "hidden size", "sequences", "tokens", "bytes on disk", "bytes/token",
                  "dtype", "fingerprint", "status"):
        assert field in text
    assert "complete" in text and "GPT2Model" in text
    assert main(["info", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "complete"


def test_info_on_something_that_is_not_a_store(capsys, tmp_path):
    code, err = _run(capsys, "info", str(tmp_path))
    assert code == 2 and "not a featstore store" in err


@pytest.mark.parametrize("name,backend", [("s.zarr", "zarr"), ("s.h5", "hdf5")])
def test_verify_reports_non_finite_hidden_states_even_when_checksummed(tiny_models, conll_corpus, tmp_path, name,
                                                                        backend):
    """A NaN the encoder produced is recorded in the checksums; verify must still flag it."""
    from featstore.store.integrity import record_integrity

    out = extract(ExtractConfig(out=str(tmp_path / name), model=tiny_models["bert"], backend=backend,
                                block_tokens=64, corpus=CorpusSpec(str(conll_corpus)), progress=False)).path
    store = open_backend(out, "r+")
    rows = store.read(fmt.HIDDEN_STATES, 70, 71)
    rows[0, 0, 0] = np.nan
    store.write(fmt.HIDDEN_STATES, 70, rows)
    manifest = store.get_manifest()
    manifest.integrity = record_integrity(store, manifest, {}, {})
    store.set_manifest(manifest)
    store.close()
    assert verify_store(out) == ["hidden_states tokens 64..128 hold NaN or infinite values"]


def test_a_non_finite_training_loss_stops_training_before_anything_is_saved(ner_stores, copy_store, tmp_path):
    from featstore.errors import TrainingError
    from featstore.store.integrity import record_integrity
    from heads import TrainConfig, train

    store_path = copy_store(ner_stores["train"], tmp_path / "train.zarr")
    backend = open_backend(store_path, "r+")
    rows = backend.read(fmt.HIDDEN_STATES, 0, 1)
    rows[0, 0, 0] = np.nan  # recorded in the checksums: only the loss can tell
    backend.write(fmt.HIDDEN_STATES, 0, rows)
    manifest = backend.get_manifest()
    manifest.integrity = record_integrity(backend, manifest, {}, {})
    backend.set_manifest(manifest)
    backend.close()
    out = tmp_path / "head"
    with pytest.raises(TrainingError, match="'adapter': the training loss became infinite or NaN"):
        train(TrainConfig(store=store_path, eval_store=ner_stores["dev"], out=str(out), epochs=2, batch_size=16,
                          progress=False))
    assert not (out / "config.json").exists()
