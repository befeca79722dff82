"""On a CUDA device: fp16 extraction against the live encoder, the pinned-memory writer path, batches prefetched
onto the device, a head's step that never waits for the device, and heads trained there (K heads in one pass =
separate runs; same predictions on CPU). Skipped where no GPU is present."""

import numpy as np
import pytest
import torch

from featstore import ExtractConfig, FrozenEncoder, extract, load_corpus, open_store
from featstore.extraction.corpus import CorpusSpec
from heads import Head, TrainConfig, evaluate_heads, train
from heads.batches import head_inputs, on_device, training_batches
from heads.trainer import build_head_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _extract(model, corpus, out, **options):
    return extract(ExtractConfig(out=str(out), model=model, corpus=CorpusSpec(str(corpus)), device="cuda",
                                 progress=False, **options)).path


def test_fp16_extraction_on_cuda_matches_the_live_encoder(minilm_path, conll_corpus, tmp_path):
    """The store written through pinned host buffers holds what the encoder computes on the device."""
    out = _extract(minilm_path, conll_corpus, tmp_path / "m.zarr", max_length=32, stride=8)
    live = FrozenEncoder.load(minilm_path, device="cuda")
    corpus = load_corpus(str(conll_corpus))
    with open_store(out) as store:
        assert store.manifest.extraction.compute_dtype == "float16" and store.storage_dtype == "float16"
        extraction = store.manifest.extraction
        sequences = live.tokenize(corpus.examples, extraction.max_length, extraction.stride)
        for row in range(len(store)):
            want = live.forward([sequences[row]], store.layers).float().cpu().numpy()
            # one sentence alone vs padded in a batch: fp16 GEMMs round differently, a few float16 steps at most
            np.testing.assert_allclose(store.sequence(row).hidden_states.astype(np.float32), want, rtol=1e-2,
                                       atol=1e-2)


def test_float32_extraction_on_cuda_matches_the_cpu_store(tiny_models, conll_corpus, tmp_path):
    gpu = _extract(tiny_models["bert"], conll_corpus, tmp_path / "gpu.zarr", dtype="float32")
    cpu = extract(ExtractConfig(out=str(tmp_path / "cpu.zarr"), model=tiny_models["bert"], device="cpu",
                                corpus=CorpusSpec(str(conll_corpus)), dtype="float32", progress=False)).path
    with open_store(gpu) as on_gpu, open_store(cpu) as on_cpu:
        for row in range(len(on_cpu)):
            np.testing.assert_allclose(on_gpu.sequence(row).hidden_states, on_cpu.sequence(row).hidden_states,
                                       rtol=1e-4, atol=1e-4)


def test_batches_prefetched_onto_the_device_are_the_cpu_batches(ner_stores, ner_float16_store):
    """As the trainer moves them (float16 features as stored, widened on the device): the CPU's float32 batches."""
    for path in (ner_float16_store, ner_stores["train"]):
        with open_store(path) as store:
            batches = list(training_batches(store, store.layers, 16, seed=1, epoch=0))
            moved = list(on_device(training_batches(store, store.layers, 16, seed=1, epoch=0, as_stored=True),
                                   "cuda"))
        assert len(moved) == len(batches)
        for batch, on_gpu in zip(batches, moved):
            assert batch.keys() == on_gpu.keys()
            for key, value in batch.items():
                assert on_gpu[key].device.type == "cuda"
                assert torch.equal(on_gpu[key].cpu(), value), key


@pytest.mark.parametrize("spec", [{"type": "adapter"}, {"type": "linear", "layers": [-1]}])
def test_a_training_step_on_cuda_never_waits_for_the_device(ner_stores, spec):
    """The batch carries its layout (found on the CPU), so the head's forward and backward pass never make the
    host wait to learn a size: a synchronising call here raises."""
    with open_store(ner_stores["train"]) as store:
        head = Head(build_head_config(spec, store)).to("cuda").train()
        batch = next(on_device(training_batches(store, head.config.layers, 16, seed=1, epoch=0), "cuda"))
    hidden, mask, word_ids, layout = head_inputs(batch, slice(None))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        output = head(hidden, mask, word_ids, batch["labels"].shape[1], layout)
        head.loss(output, batch["labels"]).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _train(stores, out, heads, device):
    return train(TrainConfig(store=stores["train"], eval_store=stores["dev"], out=str(out), heads=heads, epochs=3,
                             batch_size=16, lr=5e-3, device=device, progress=False))


def test_k_heads_on_cuda_equal_separate_runs_and_predict_the_same_on_cpu(ner_stores, tmp_path):
    specs = [{"type": "adapter", "name": "adapter"}, {"type": "bilstm", "name": "bilstm", "seed": 3}]
    together = _train(ner_stores, tmp_path / "together", specs, "cuda")
    for spec in specs:  # each head keeps its own CUDA random stream: dropout draws what it would alone
        _train(ner_stores, tmp_path / spec["name"], [spec], "cuda")
        alone = Head.from_pretrained(tmp_path / spec["name"]).state_dict()
        for name, tensor in Head.from_pretrained(tmp_path / "together" / spec["name"]).state_dict().items():
            torch.testing.assert_close(tensor, alone[name], rtol=1e-5, atol=1e-6, msg=name)
        assert together[spec["name"]]["best"] > 0.8
    head = Head.from_pretrained(tmp_path / "together" / "adapter")
    with open_store(ner_stores["dev"]) as store:
        on_cpu = evaluate_heads([head], store, return_predictions=True)[0]
        on_gpu = evaluate_heads([head.to("cuda")], store, device="cuda", return_predictions=True)[0]
    same = sum(on_gpu["predictions"][row] == predicted for row, predicted in on_cpu["predictions"].items())
    assert same >= 0.99 * len(on_cpu["predictions"])  # GPU and CPU kernels round differently: near-ties may flip
