"""Unit tests for the pieces end-to-end tests only cover indirectly: the block writer, the progress ledger,
batch planning, the extraction spec and its derived forms, the store manifest, the direct shard reader, and
the module boundaries (light commands without torch, featstore without heads), dropout masks."""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featstore import ExtractSpec, extract, open_store
from featstore.cli import build_parser, spec_from_args
from featstore.errors import ConfigError, IncompleteStoreError, StoreFormatError
from featstore.extraction.corpus import CorpusSpec, load_corpus
from featstore.extraction.encoder import FrozenEncoder
from featstore.extraction.plan import ExtractionPlan
from featstore.extraction.writer import BlockWriter, ProgressLedger, Written
from featstore.options import option_fields
from featstore.store import format as fmt
from featstore.store.backends import open_backend
from featstore.store.chunks import piece_checksums
from featstore.store.integrity import digest_rows
from featstore.store.manifest import FINGERPRINT_FIELDS, StoreManifest

REPO = Path(__file__).resolve().parent.parent


class MemoryBackend:
    """Just enough of a StoreBackend for the writer and the ledger: arrays in memory, writes recorded."""

    checksum_per_layer = False

    def __init__(self, rows: int, width: int = 3) -> None:
        self.arrays = {fmt.HIDDEN_STATES: np.zeros((rows, width), np.float16), fmt.PROGRESS: np.zeros(2, np.int64)}
        self.writes: list[tuple[str, int, int]] = []

    def dtype(self, name: str) -> np.dtype:
        return self.arrays[name].dtype

    def array_names(self) -> list[str]:
        return list(self.arrays)

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        self.arrays[name][start: start + len(data)] = data
        self.writes.append((name, start, start + len(data)))


# --- BlockWriter ---------------------------------------------------------------------------------------------
def test_block_writer_writes_whole_blocks_and_hashes_them_from_memory():
    backend, block, start, stop = MemoryBackend(47), 10, 5, 47
    data = np.random.default_rng(0).standard_normal((stop - start, 3)).astype(np.float16)
    reported = []
    writer = BlockWriter(backend, block, {"sums": 5}, start, stop, 47, reported.append)
    for piece in np.split(data, [7, 9, 21, 22, 36]):  # uneven appends, some smaller than a block
        writer.append(piece)
    writer.finish()
    writes = [(first, end) for name, first, end in backend.writes if name == fmt.HIDDEN_STATES]
    assert writes[0][0] == start and writes[-1][1] == stop
    assert all(first % block == 0 for first, _ in writes[1:]) and all(end % block == 0 for _, end in writes[:-1])
    assert all(a[1] == b[0] for a, b in itertools.pairwise(writes))  # contiguous, nothing written twice
    assert np.array_equal(backend.arrays[fmt.HIDDEN_STATES][start:], data)
    digests = {index: digest for written in reported for index, digest in written.block_digests.items()}
    assert sorted(digests) == [1, 2, 3, 4]  # block 0 is only partly this writer's; block 4 is the short last one
    for index, digest in digests.items():
        assert digest == digest_rows(backend.arrays[fmt.HIDDEN_STATES][index * block: (index + 1) * block])
    sums = {index: value for written in reported for index, value in written.chunk_checksums["sums"].items()}
    assert sorted(sums) == list(range(1, 10))  # chunks of 5 rows: chunk 0 holds rows before `start`
    for index, value in sums.items():
        assert value.tolist() == piece_checksums(backend.arrays[fmt.HIDDEN_STATES][index * 5: index * 5 + 5],
                                                 False).tolist()
    assert [(written.first, written.end) for written in reported] == writes


def test_block_writer_refuses_rows_past_its_range():
    writer = BlockWriter(MemoryBackend(20), 8, {}, 0, 10, 20, lambda *_: None)
    with pytest.raises(Exception, match="internal error"):
        writer.append(np.zeros((11, 3), np.float16))
    short = BlockWriter(MemoryBackend(20), 8, {}, 0, 10, 20, lambda *_: None)
    short.append(np.zeros((4, 3), np.float16))
    with pytest.raises(Exception, match="expected 10"):
        short.finish()


# --- ProgressLedger ------------------------------------------------------------------------------------------
def _ledger(start: int = 0, before_commit=lambda: None):
    token_offsets = np.array([0, 6, 11, 15, 20, 24, 27], dtype=np.int64)  # 6 sequences
    batches = [range(0, 2), range(2, 4), range(4, 6)]
    backend = MemoryBackend(27)
    return backend, ProgressLedger(backend, token_offsets, [b for b in batches if b.start >= start], start,
                                   before_commit)


def test_ledger_commits_the_last_batch_boundary_inside_the_written_prefix():
    backend, ledger = _ledger()
    ledger.written(Written(0, 10, {}, {}))  # batch 0 ends at row 11: not yet
    assert backend.arrays[fmt.PROGRESS].tolist() == [0, 0]
    ledger.written(Written(20, 27, {3: "d"}, {}))  # beyond a gap: recorded, not committed
    assert ledger.committed == 0 and ledger.digests == {3: "d"}
    ledger.written(Written(10, 15, {}, {}))  # prefix now 0..15: batch 0 (11) done, batch 1 ends at 20
    assert backend.arrays[fmt.PROGRESS].tolist() == [2, 11]
    ledger.written(Written(15, 20, {}, {}))  # the gap closes: everything is written
    assert backend.arrays[fmt.PROGRESS].tolist() == [6, 27] and ledger.frontier == 27
    ledger.written(Written(0, 10, {}, {}))  # a retried share re-reports: no change
    assert backend.arrays[fmt.PROGRESS].tolist() == [6, 27]


def test_ledger_starts_at_the_resume_point_and_checks_the_lease_before_committing():
    calls = []
    backend, ledger = _ledger(start=2, before_commit=lambda: calls.append("check"))
    assert ledger.frontier == 11
    ledger.written(Written(11, 20, {}, {}))
    assert calls == ["check"] and backend.arrays[fmt.PROGRESS].tolist() == [4, 20]

    def lost():
        raise RuntimeError("lease lost")

    backend, ledger = _ledger(before_commit=lost)
    with pytest.raises(RuntimeError, match="lease lost"):
        ledger.written(Written(0, 27, {}, {}))
    assert backend.arrays[fmt.PROGRESS].tolist() == [0, 0]  # nothing committed without the lease


# --- ExtractionPlan ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plan(tiny_models, conll_corpus) -> ExtractionPlan:
    spec = ExtractSpec(out="unused", max_length=24, stride=6, max_batch_tokens=96)
    return ExtractionPlan.build(spec, load_corpus(CorpusSpec(str(conll_corpus))), FrozenEncoder.load(
        tiny_models["bert"], device="cpu"))


def test_batches_partition_the_sequences_within_the_token_budget(plan):
    batches = plan.batches()
    assert batches[0].start == 0 and batches[-1].stop == len(plan.sequences)
    assert all(a.stop == b.start for a, b in itertools.pairwise(batches))
    for batch in batches:
        windows = [window for sequence in plan.sequences[batch.start: batch.stop] for window in sequence.windows]
        padded = len(windows) * max(len(window) for window in windows)
        assert padded <= plan.spec.max_batch_tokens or len(batch) == 1
    # Resuming from any batch boundary repeats the same batches a run from 0 makes.
    for index in (1, len(batches) // 2, len(batches) - 1):
        assert plan.batches(batches[index].start) == batches[index:]


def test_plan_orders_longest_first_and_describes_the_store(plan):
    lengths = np.diff(plan.token_offsets)
    assert np.all(lengths[:-1] >= lengths[1:])
    assert sorted(plan.order.tolist()) == list(range(len(plan.sequences)))
    manifest = plan.manifest
    assert manifest.status == fmt.STATUS_WRITING and manifest.counts.num_tokens == plan.num_tokens
    assert manifest.fingerprint == manifest.fingerprint_inputs.fingerprint()
    assert manifest.counts.num_windowed_sequences > 0  # max_length 24 splits some sentences
    names = [array.name for array, _ in plan.arrays()]
    assert names[-1] == fmt.HIDDEN_STATES and fmt.WORD_LABELS in names and fmt.PROGRESS in names


# --- ExtractSpec and what derives from it --------------------------------------------------------------------
def test_spec_round_trips_through_json():
    spec = ExtractSpec(out="s.zarr", layers=[0, -1], dtype="bfloat16", stride=8, truncate=True,
                       corpus=CorpusSpec("c.jsonl", format="json", label_names=["O", "B-X"], task="regression"),
                       storage_options={"anon": True})
    assert ExtractSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.to_dict()["corpus"] == "c.jsonl" and spec.to_dict()["corpus_format"] == "json"


@pytest.mark.parametrize("values,message", [
    ({"out": "s", "not_an_option": 1}, "unknown option"),
    ({"out": "s", "layers": "0,1"}, "layers"),
    ({"out": "s", "truncate": "yes"}, "truncate"),
])
def test_spec_refuses_unknown_or_mistyped_values(values, message):
    with pytest.raises(ConfigError, match=message):
        ExtractSpec.from_dict(values)


@pytest.mark.parametrize("changes,message", [
    ({"max_batch_tokens": 0}, "--max-batch-tokens must be at least 1"),
    ({"dtype": "int4"}, "--dtype 'int4' is not one of"),
    ({"engine": "spark"}, "--engine"),
    ({"out": None}, "give --out"),
    ({"corpus": CorpusSpec(split="train; rm -rf /")}, "--split"),
])
def test_spec_validation_names_the_flag(changes, message):
    with pytest.raises(ConfigError, match=message):
        ExtractSpec(**{"out": "s.zarr", **changes}).validate()


def _subparser(name: str) -> argparse.ArgumentParser:
    commands = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    return commands.choices[name]


def test_every_spec_option_has_its_flags_and_service_field():
    from featstore.service.api import JobRequest

    extract_flags = {flag for action in _subparser("extract")._actions for flag in action.option_strings}
    submit_flags = {flag for action in _subparser("submit")._actions for flag in action.option_strings}
    for item in option_fields(ExtractSpec):
        if item.option.flag:
            assert item.flag in extract_flags
        assert (item.flag in submit_flags) == (item.option.submit and item.option.flag)
        assert (item.name in JobRequest.model_fields) == item.option.submit
        if item.option.submit and not item.option.required_to_submit:
            assert JobRequest.model_fields[item.name].default == item.default


def test_cli_flags_and_spec_files_give_the_same_spec(tmp_path):
    argv = ["extract", "--out", "s.zarr", "--corpus", "c.conll", "--layers", "0,-1", "--dtype", "float32",
            "--label-names", "O,B-X", "--no-progress", "--truncate", "--stride", "4"]
    from_flags = spec_from_args(build_parser().parse_args(argv))
    assert from_flags == ExtractSpec(out="s.zarr", layers=[0, -1], dtype="float32", progress=False, truncate=True,
                                     stride=4, corpus=CorpusSpec("c.conll", label_names=["O", "B-X"]))
    from_flags.save(tmp_path / "spec.json")
    parsed = build_parser().parse_args(["extract", "--spec", str(tmp_path / "spec.json"), "--stride", "5"])
    assert spec_from_args(parsed) == ExtractSpec(**{**from_flags.__dict__, "stride": 5})


def test_help_shows_defaults():
    text = _subparser("extract").format_help()
    assert "default: 8192" in text and "default: float16" in text and "default: all" in text


def test_job_specs_add_what_the_service_decides(tmp_path):
    from featstore.service.api import JobRequest
    from featstore.service.jobs import job_extract_spec

    request = JobRequest(corpus="/data/c.conll", layers=[1], max_batch_tokens=512, compute_dtype="float32")
    spec = job_extract_spec(request.model_dump(), "/catalog", {"engine": "ray", "ray_address": "auto"})
    assert spec.catalog == "/catalog" and spec.engine == "ray" and spec.ray_address == "auto"
    assert spec.progress is False and spec.lock_wait > 0
    assert spec.layers == [1] and spec.max_batch_tokens == 512 and spec.compute_dtype == "float32"


# --- StoreManifest -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_store(tiny_models, conll_corpus, tmp_path_factory) -> str:
    return extract(ExtractSpec(out=str(tmp_path_factory.mktemp("manifest") / "s.zarr"), model=tiny_models["bert"],
                               corpus=CorpusSpec(str(conll_corpus)), block_tokens=64, progress=False)).path


def _edited_copy(store: str, tmp_path: Path, edit) -> str:
    import shutil

    target = str(tmp_path / "edited.zarr")
    shutil.copytree(store, target)
    backend = open_backend(target, "r+")
    attrs = backend.get_attrs()
    edit(attrs)
    backend.set_attrs(attrs)
    backend.close()
    return target


@pytest.mark.parametrize("edit,message", [
    (lambda attrs: attrs["counts"].pop("num_tokens"), "lacks counts.num_tokens"),
    (lambda attrs: attrs["extraction"].update(layers="all"), "extraction.layers = 'all'"),
    (lambda attrs: attrs.update(encoder=[]), "section 'encoder' is list"),
    (lambda attrs: attrs.update(format_version="2.0"), "upgrade featstore"),
    (lambda attrs: attrs.pop("format"), "not a featstore store"),
])
def test_a_malformed_manifest_fails_at_open_naming_the_field(small_store, tmp_path, edit, message):
    damaged = _edited_copy(small_store, tmp_path, edit)
    with pytest.raises(StoreFormatError, match=message):
        open_store(damaged)


def test_unknown_keys_of_a_newer_minor_version_are_kept(small_store, tmp_path):
    def add_keys(attrs):  # as a newer writer would: its finalize digests the sections with their new keys
        attrs["format_version"] = "1.9"
        attrs["extraction"]["future_option"] = {"x": 1}
        attrs["future_section"] = [1, 2]
        attrs["integrity"]["sections"] = StoreManifest.from_attrs(attrs, "newer").section_digests()

    newer = _edited_copy(small_store, tmp_path, add_keys)
    with open_store(newer) as store:
        manifest = store.manifest
        assert manifest.extraction.extra == {"future_option": {"x": 1}}
        assert manifest.to_dict() == open_backend(newer).get_attrs()  # written back unchanged


def test_fingerprint_rule_is_the_documented_field_list():
    documented = (REPO / "docs" / "store-format.md").read_text()
    rule = documented.split("and `FIELDS` are:")[1].split("These are")[0]
    assert [name.strip(" `\n") for name in rule.split(",")] == list(FINGERPRINT_FIELDS)


def test_incomplete_store_error_type(small_store, tmp_path):
    writing = _edited_copy(small_store, tmp_path, lambda attrs: attrs.update(status="writing"))
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        open_store(writing)
    assert StoreManifest.from_attrs(open_backend(writing).get_attrs(), writing).status == "writing"


# --- direct shard reader -------------------------------------------------------------------------------------
def test_direct_shard_reads_equal_the_storage_library_reads(small_store):
    direct = open_backend(small_store)
    library = open_backend(small_store)
    library.direct_reads = False
    assert direct._shard_reader(fmt.HIDDEN_STATES) is not None  # the layout qualifies: the direct path is used
    rows, layers = direct.shape(fmt.HIDDEN_STATES)[:2]
    block = direct.get_manifest().layout.block_tokens
    rng = np.random.default_rng(3)
    cases = [(0, rows), (0, 1), (rows - 1, rows), (block - 1, block + 1), (block, 2 * block), (3, 3 * block + 5)]
    cases += [tuple(sorted(rng.integers(0, rows, 2))) for _ in range(10)]
    selections = [None, slice(1, 2), [0, layers - 1], [layers - 1, 0]]
    for start, stop in cases:
        stop = max(stop, start + 1)
        for columns in selections:
            expected = library.read(fmt.HIDDEN_STATES, start, stop, columns)
            assert np.array_equal(direct.read(fmt.HIDDEN_STATES, start, stop, columns), expected), (start, stop)


# --- module boundaries ---------------------------------------------------------------------------------------
def test_light_commands_do_not_import_torch():
    code = ("import sys, featstore.cli, featstore.service.api, featstore.store.verify, featstore.store.info, "
            "featstore.sharing.catalog, featstore.sharing.transfer; featstore.cli.build_parser(); "
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_featstore_never_imports_heads():
    for path in (REPO / "featstore").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not any(name == "heads" or name.startswith("heads.") for name in names), path


# --- heads: configs of the first head format still load -----------------------------------------------------
def test_a_first_format_head_config_loads_with_its_extraction_settings():
    from heads.config import HeadConfig

    old = {"format": "featstore-head/1", "head_type": "linear", "task": "token-classification", "hidden_size": 8,
           "layers": [2], "label_names": ["O", "B-X"], "some_future_key": 1,
           "encoder": {"name_or_path": "m", "weights_sha256": "ab", "tokenizer_sha256": "cd", "hidden_size": 8,
                       "num_hidden_states": 3, "max_length": 64, "stride": 16, "storage_dtype": "float16"}}
    config = HeadConfig.from_dict(old)
    assert config.encoder.weights_sha256 == "ab" and config.encoder.num_hidden_states == 3
    assert (config.extraction.max_length, config.extraction.stride, config.extraction.storage_dtype) == (
        64, 16, "float16")
    assert HeadConfig.from_dict(config.to_dict()) == config
    assert config.task_def.primary_metric == "f1" and config.num_outputs == 2


# --- NER output ----------------------------------------------------------------------------------------------
def test_tag_sequences_are_repaired_to_valid_bio_and_grouped_into_spans():
    from heads.entities import entity_spans, is_bio, repair_bio

    assert repair_bio(["O", "I-PER", "I-PER", "B-LOC", "I-PER", "I-ORG", "I-ORG"]) == [
        "O", "B-PER", "I-PER", "B-LOC", "B-PER", "B-ORG", "I-ORG"]
    assert repair_bio(["I-PER", "I-PER", "O"]) == ["B-PER", "I-PER", "O"]  # IOB1 becomes the equivalent BIO
    assert is_bio(["O", "B-PER", "I-PER"]) and not is_bio(["NN", "VB"]) and not is_bio(None)
    text = "Ann Lee went to New York"
    words = ["Ann", "Lee", "went", "to", "New", "York"]
    offsets = [(0, 3), (4, 7), (8, 12), (13, 15), (16, 19), (20, 24)]
    spans = entity_spans(words, ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC"], [0.9, 0.7, 1, 1, 0.8, 0.6],
                         offsets, text)
    assert spans == [{"type": "PER", "words": [0, 2], "score": 0.8, "start": 0, "end": 7, "text": "Ann Lee"},
                     {"type": "LOC", "words": [4, 6], "score": 0.7, "start": 16, "end": 24, "text": "New York"}]
    assert entity_spans(words[:2], ["B-PER", "B-PER"], [1.0, 0.5])[1] == {"type": "PER", "words": [1, 2],
                                                                       "score": 0.5, "text": "Lee"}


def test_raw_text_is_split_into_words_as_the_tokenizer_pre_tokenizes(tiny_models):
    for name in ("bert", "roberta"):
        encoder = FrozenEncoder.load(tiny_models[name], device="cpu")
        text = "Apple,  Inc. hired Ann."
        words = encoder.split_words(text)
        assert all(text[start:end] == word and word.strip() == word for word, (start, end) in words)
        assert "".join(word for word, _ in words) == "".join(text.split())  # every character, once
        if name == "bert":  # whitespace and punctuation: "Apple," is two words
            assert [word for word, _ in words] == ["Apple", ",", "Inc", ".", "hired", "Ann", "."]


def test_dropout_masks_keep_the_asked_share_in_every_lane_and_the_mean():
    import torch

    from heads.layers import keep_mask

    generator = torch.Generator().manual_seed(0)
    for keep in (0.5, 0.9):
        mask = keep_mask(torch.Size([400, 500]), keep, torch.device("cpu"), generator).flatten()
        kept = (mask > 0).double()
        for lane in range(4):  # each 64-bit random word gives four elements their bits: every lane is uniform
            assert kept[lane::4].mean().item() == pytest.approx(keep, abs=0.01)
        assert mask.double().mean().item() == pytest.approx(1.0, abs=0.01)  # inverted dropout keeps the mean
        again = keep_mask(torch.Size([400, 500]), keep, torch.device("cpu"), generator).flatten()
        assert not torch.equal(again, mask)  # the stream moves on
    nearly_all = keep_mask(torch.Size([50, 60]), 1 - 1e-6, torch.device("cpu"), generator)
    assert torch.equal(nearly_all, torch.ones(50, 60))  # a keep rate that rounds to 1 keeps every element


@pytest.mark.parametrize("widths", [(384, 256, 9), (8, 32, 16), (6, 4, 5, 3), (4, 2, 8)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_a_linear_chain_gives_the_outputs_and_gradients_of_its_maps_one_after_another(widths, with_bias):
    from itertools import pairwise

    import torch
    from torch import nn

    from heads.layers import LinearChain

    torch.manual_seed(0)
    chain = LinearChain(*(nn.Linear(width, height, bias=with_bias) for width, height in pairwise(widths)))
    inputs = torch.randn(40, widths[0])
    outputs = chain(inputs)
    one_after_another = nn.Sequential.forward(chain, inputs)
    torch.testing.assert_close(outputs, one_after_another, rtol=1e-4, atol=1e-5)
    target = torch.randn_like(outputs)
    gradients = torch.autograd.grad((outputs * target).sum(), list(chain.parameters()))
    expected = torch.autograd.grad((one_after_another * target).sum(), list(chain.parameters()))
    for gradient, reference in zip(gradients, expected):
        torch.testing.assert_close(gradient, reference, rtol=1e-4, atol=1e-4)
    assert (chain.in_features, chain.out_features) == (widths[0], widths[-1])


@pytest.mark.parametrize("shared", [True, False])
def test_mixing_layers_weighs_each_layer_as_the_sum_does(shared):
    import torch

    from heads.layers import mix_layers

    torch.manual_seed(0)
    hidden = torch.randn(30, 7, 12)
    weights = torch.randn(7 if shared else (30, 7), requires_grad=True)
    mixed = mix_layers(weights, hidden)
    per_token = weights.expand(30, 7)
    expected = (per_token[:, :, None] * hidden).sum(1)
    torch.testing.assert_close(mixed, expected)
    target = torch.randn(30, 12)
    gradient, = torch.autograd.grad((mixed * target).sum(), weights)
    reference, = torch.autograd.grad((expected * target).sum(), weights)
    torch.testing.assert_close(gradient, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("outputs", [2, 9, 200])  # narrow maps take the batched layout; 200 outputs do not
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
def test_linear_maps_of_batched_heads_equal_a_plain_linear_map(outputs, with_bias, input_grad, autocast):
    """heads.layers.linear, as HeadGroup runs it (vmapped over K heads inside batched_heads), also under a caller's
    bfloat16 autocast, gives the outputs (their dtype too) and the weight, bias and input gradients of
    nn.functional.linear run the same way."""
    import torch
    from torch.func import vmap

    from heads.layers import batched_heads, linear

    torch.manual_seed(0)
    heads, rows, features = 3, 50, 24
    weight = torch.randn(heads, outputs, features, requires_grad=True)
    bias = torch.randn(heads, outputs, requires_grad=True) if with_bias else None
    inputs = torch.randn(rows, heads, features, requires_grad=input_grad)  # each head reads its own column
    generators = [torch.Generator() for _ in range(heads)]

    def each_head(function, x, w, b):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            return function(x, w, b)

    with batched_heads(generators, torch.arange(heads)):
        batched = vmap(lambda *args: each_head(linear, *args), in_dims=(1, 0, 0 if with_bias else None))(
            inputs, weight, bias)
    expected = vmap(lambda *args: each_head(torch.nn.functional.linear, *args),
                    in_dims=(1, 0, 0 if with_bias else None))(inputs, weight, bias)
    assert batched.dtype == expected.dtype
    tolerance = {"rtol": 2e-2, "atol": 5e-2} if autocast else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(batched, expected, **tolerance)
    target = torch.randn(expected.shape)
    wanted = [tensor for tensor in (weight, bias, inputs) if tensor is not None and tensor.requires_grad]
    gradients = torch.autograd.grad((batched.float() * target).sum(), wanted)
    references = torch.autograd.grad((expected.float() * target).sum(), wanted)
    for gradient, reference in zip(gradients, references):
        torch.testing.assert_close(gradient, reference, **tolerance)


def test_a_task_gives_each_of_k_heads_the_loss_it_gives_one():
    """Task.losses on K heads' outputs as HeadGroup makes them (word logits packed) equals each head's `loss` on its
    padded output, value and gradient, a labelled word without tokens (zero logits when padded) included."""
    import torch

    from heads.packing import Layout
    from heads.tasks import TASKS

    torch.manual_seed(0)
    words = torch.randint(0, 5, (3, 7))
    words[0, 4:] = words[2, 6:] = -100  # padded words
    word_ids = torch.tensor([[-1, 0, 1, 1, 2, 3, -1, -1, -1],
                             [-1, 0, 1, 2, 4, 5, 6, 6, -1],  # word 3, labelled, has no token
                             [-1, 0, 1, 2, 3, 4, 5, -1, -1]])
    layout = Layout.of(torch.arange(9) < torch.tensor([7, 9, 8])[:, None], word_ids, num_words=7)
    present = len(layout.words.packing.index)
    assert present == 16
    labels = {"token-classification": words, "sequence-classification": torch.tensor([0, 4, 2]),
              "regression": torch.tensor([0.5, -1.0, 2.0])}
    outputs = {"token-classification": (4, present, 5), "sequence-classification": (4, 3, 5), "regression": (4, 3)}
    for name, task in TASKS.items():
        stacked = torch.randn(outputs[name], requires_grad=True)
        padded = torch.stack([layout.words.packing.unpack(output) for output in stacked]) if task.per_word \
            else stacked
        expected = torch.stack([task.loss(output, labels[name]) for output in padded])
        losses = task.losses(stacked, labels[name], layout)
        torch.testing.assert_close(losses, expected, msg=name)
        weights = torch.randn(4)
        torch.testing.assert_close(torch.autograd.grad((losses * weights).sum(), stacked)[0],
                                   torch.autograd.grad((expected * weights).sum(), stacked)[0], msg=name)


@pytest.mark.parametrize("shape", [(37,), (3, 5)])  # rows that the product pads; a 3-D input
def test_training_precision_on_the_cpu_takes_bfloat16_for_wide_maps_only(shape):
    """heads.layers.training_precision on a CPU: a wide map (both sides >= WIDE_FEATURES) computes in bfloat16 and
    returns float32, its gradients float32 and near float32's; a narrow map, and any map outside the context, is
    exactly float32."""
    import torch
    from torch.nn.functional import linear as plain

    from heads.layers import WIDE_FEATURES, Linear, training_precision

    torch.manual_seed(0)
    wide, narrow = Linear(WIDE_FEATURES, WIDE_FEATURES + 8), Linear(WIDE_FEATURES, 9)
    x = torch.randn(*shape, WIDE_FEATURES, requires_grad=True)
    with training_precision("cpu", torch.bfloat16):
        low, kept = wide(x), narrow(x)
    assert low.dtype == kept.dtype == torch.float32 and low.shape == (*shape, WIDE_FEATURES + 8)
    assert torch.equal(kept, plain(x, narrow.weight, narrow.bias)) and torch.equal(wide(x), plain(x, wide.weight,
                                                                                                 wide.bias))
    in_bfloat16 = plain(x.bfloat16(), wide.weight.bfloat16(), wide.bias.bfloat16()).float()
    torch.testing.assert_close(low, in_bfloat16, rtol=2**-7, atol=1e-6)  # at most bfloat16's last bit
    float32 = plain(x, wide.weight, wide.bias)
    assert (low - float32).abs().max() > 1e-3  # it did not compute in float32
    target = torch.randn(low.shape)
    gradients = torch.autograd.grad((low * target).sum(), [x, wide.weight, wide.bias])
    references = torch.autograd.grad((float32 * target).sum(), [x, wide.weight, wide.bias])
    for gradient, reference in zip(gradients, references):
        assert gradient.dtype == torch.float32
        torch.testing.assert_close(gradient, reference, rtol=0.05, atol=0.05)
