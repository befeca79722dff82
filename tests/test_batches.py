"""Training batches: grouping by length keeps each sequence once per epoch and the epoch random while cutting
the padding; packed batches give a head the loss and gradients of padded ones, whatever the padding, and carry a
layout on which a step sizes nothing from the data; attention runs on the sequences binned side by side; stores
kept in memory train the same heads."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from featstore import collate_features, open_store
from featstore.store.dataset import LABEL_PADDING
from heads import Head, TrainConfig, train
from heads import batches as batching
from heads import trainer as trainer_module
from heads.batches import head_inputs, on_device, padding_ratio, training_batches
from heads.packing import LAYOUT_KEYS, Layout, Packing
from heads.trainer import Trainer, build_head_config, keeps_in_memory


@pytest.fixture()
def small_pools(monkeypatch):
    """Pools of 3 batches, so that the 240-sentence store spans several pools and a short last one."""
    monkeypatch.setattr(batching, "POOL_BATCHES", 3)


def _rows(batches):
    return [batch["index"].tolist() for batch in batches]


@pytest.mark.parametrize("grouped", [True, False])
def test_an_epoch_holds_every_sequence_once_in_as_many_batches(ner_stores, small_pools, grouped):
    with open_store(ner_stores["train"]) as store:
        epoch = _rows(training_batches(store, [0], 16, seed=1, epoch=0, group_by_length=grouped))
        assert sorted(row for rows in epoch for row in rows) == list(range(len(store)))
        assert len(epoch) == -(-len(store) // 16)
        assert all(len(rows) == 16 for rows in epoch[:-1])
        assert _rows(training_batches(store, [0], 16, seed=1, epoch=0, group_by_length=grouped)) == epoch
        assert _rows(training_batches(store, [0], 16, seed=1, epoch=1, group_by_length=grouped)) != epoch


def test_grouping_by_length_cuts_padding_and_keeps_the_epoch_random(ner_stores, small_pools):
    with open_store(ner_stores["train"]) as store:
        grouped = list(training_batches(store, [0], 16, seed=1, epoch=0, group_by_length=True))
        plain = list(training_batches(store, [0], 16, seed=1, epoch=0, group_by_length=False))
        assert padding_ratio(grouped) < 1.2 < 1.3 < padding_ratio(plain)  # measured: 1.13 and 1.41
        widths = [batch["mask"].shape[1] for batch in grouped]
        assert widths != sorted(widths) and widths != sorted(widths, reverse=True)  # batches come in random order
        # a pool's batches are drawn from the shuffled stream, not from the sorted store
        first_pool = {row for rows in _rows(grouped[:3]) for row in rows}
        assert first_pool == {row for rows in _rows(plain[:3]) for row in rows}


def _padded(batch, extra):
    """The same padded batch, `extra` padding positions wider."""
    wider = dict(batch)
    hidden = batch["hidden_states"]
    wider["hidden_states"] = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], extra, *hidden.shape[2:])], 1)
    wider["mask"] = torch.cat([batch["mask"], batch["mask"].new_zeros(hidden.shape[0], extra)], 1)
    wider["word_ids"] = torch.cat([batch["word_ids"], batch["word_ids"].new_full((hidden.shape[0], extra), -1)], 1)
    return wider


def _loss_and_gradients(head, batch):
    head.zero_grad()
    output = head(batch["hidden_states"], batch["mask"], batch["word_ids"], batch["labels"].shape[1],
                  Layout.of_batch(batch))  # the layout the batch carries, or one found from its mask
    loss = head.loss(output, batch["labels"])
    loss.backward()
    return loss.item(), {name: parameter.grad.clone() for name, parameter in head.named_parameters()
                         if parameter.grad is not None}


def _sentence_by_sentence(head, items):
    """The batch's loss and gradients from each sequence alone (a batch of one: neither padding nor neighbours),
    weighted by its words as the batch's mean over words weighs them."""
    words = [int((item.labels != LABEL_PADDING).sum()) for item in items]
    loss, gradients = 0.0, {}
    for item, count in zip(items, words):
        alone_loss, alone_gradients = _loss_and_gradients(head, collate_features([item]))
        loss += alone_loss * count / sum(words)
        for name, gradient in alone_gradients.items():
            gradients[name] = gradients.get(name, 0) + gradient * count / sum(words)
    return loss, gradients


@pytest.mark.parametrize("spec", [
    {"type": "adapter"}, {"type": "linear"}, {"type": "scalar_mix"}, {"type": "mlp"}, {"type": "fusion"},
    {"type": "bilstm"}, {"type": "bilstm", "crf": True, "context_input": "concat"},
    {"type": "transformer", "context_input": "adapter"}, {"type": "tail", "tail_layers": 1}])
def test_packed_batches_give_the_loss_and_gradients_of_padded_ones(ner_stores, spec):
    """The trainer's packed batch (with the layout it carries, and without), the same batch padded, padded wider
    still, and its sequences one by one: one loss, one gradient (to float32 rounding)."""
    with open_store(ner_stores["train"]) as store:
        torch.manual_seed(0)
        head = Head(build_head_config(spec, store)).eval()  # dropout off: masks would differ with the shape
        with torch.no_grad():  # far from the initialisation's near-uniform attention, which would hide mixing errors
            for parameter in head.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.5)
        packed = next(training_batches(store, head.config.layers, 8, seed=1, epoch=0, group_by_length=False))
        items = [store.sequence(row, head.config.layers) for row in packed["index"].tolist()]
    padded = collate_features(items)
    assert padded["mask"].sum(1).min() < padded["mask"].shape[1]  # the batch is padded, unevenly
    assert packed["hidden_states"].shape[0] == padded["mask"].sum() < padded["mask"].numel()
    loss, gradients = _loss_and_gradients(head, packed)
    # rounding is measured against the head's largest gradient: some gradients are zero in exact arithmetic (a key
    # bias shifts every score of a softmax alike) and hold only rounding noise
    tolerance = 1e-4 * max(gradient.abs().max() for gradient in gradients.values())
    assert set(LAYOUT_KEYS) <= set(packed)
    unlaid = {key: value for key, value in packed.items() if key not in LAYOUT_KEYS}
    for name, (other_loss, other_gradients) in {"layout found": _loss_and_gradients(head, unlaid),
                                                "padded": _loss_and_gradients(head, padded),
                                                "wider": _loss_and_gradients(head, _padded(padded, 9)),
                                                "alone": _sentence_by_sentence(head, items)}.items():
        assert other_loss == pytest.approx(loss, rel=1e-5), name
        assert gradients.keys() == other_gradients.keys()
        for key, gradient in gradients.items():
            torch.testing.assert_close(other_gradients[key], gradient, rtol=1e-4, atol=tolerance, msg=f"{name} {key}")


@pytest.mark.parametrize("lengths", [[3, 7, 1, 7, 4, 2, 5], [5], [2, 0, 2], [9, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
def test_bins_hold_each_sequence_whole_in_one_row_and_few_rows(lengths):
    width = max(lengths)
    mask = torch.arange(width + 2) < torch.tensor(lengths)[:, None]  # padded wider than the longest
    packing = Packing(mask)
    bins = packing.bins
    rows, bin_width = bins.segments.shape
    assert bin_width == width
    assert rows == max(-(-sum(lengths) // width), 1)  # first fit decreasing packs these as tight as can be
    tokens = torch.arange(sum(lengths), dtype=torch.float32)[:, None]
    grid = bins.unpack(tokens)
    assert torch.equal(bins.pack(grid), tokens)
    for sequence, length in enumerate(lengths):  # each sequence whole, in order, in one row
        positions = (bins.segments == sequence).nonzero()
        assert len(positions) == length
        if length:
            assert positions[:, 0].unique().numel() == 1
            row, start = positions[0].tolist()
            assert torch.equal(grid[row, start:start + length, 0], tokens[packing.segment == sequence, 0])
    # a token attends to the tokens of its own sequence, and to no other
    row, column = bins.grid.index // bin_width, bins.grid.index % bin_width
    attends = bins.mask[row[:, None], column[:, None], column[None, :]] & (row[:, None] == row[None, :])
    assert torch.equal(attends, packing.segment[:, None] == packing.segment[None, :])


def test_heads_trained_on_grouped_and_plain_batches_both_learn(ner_stores, tmp_path):
    for grouped in (True, False):
        summary = train(TrainConfig(store=ner_stores["train"], eval_store=ner_stores["dev"], out=str(tmp_path / str(
            grouped)), heads=[{"type": "adapter"}], epochs=4, batch_size=16, lr=5e-3, group_by_length=grouped,
            progress=False))
        assert summary["adapter"]["best"] > 0.8, (grouped, summary)


def test_batches_reach_another_device_with_every_tensor(ner_stores):
    with open_store(ner_stores["train"]) as store:
        batch = next(on_device(training_batches(store, [0], 8, seed=1, epoch=0), "meta"))
    assert set(batch) == {"hidden_states", "mask", "index", "word_ids", "labels", *LAYOUT_KEYS}
    assert all(tensor.device.type == "meta" for tensor in batch.values())


def test_stores_kept_in_memory_train_the_same_heads(ner_stores, tmp_path, monkeypatch):
    weights = {}
    for keep in ("always", "never"):
        trainer = Trainer(TrainConfig(store=ner_stores["train"], eval_store=ner_stores["dev"], out=str(tmp_path / keep),
                                      heads=[{"type": "adapter"}], epochs=2, batch_size=16, progress=False,
                                      keep_in_memory=keep))
        assert trainer.keep_in_memory == (keep == "always")
        trainer.train()
        weights[keep] = trainer.runs[0].head.state_dict()
    assert all(torch.equal(tensor, weights["never"][key]) for key, tensor in weights["always"].items())
    # auto: when training runs more than one epoch and the stores fit in half the available memory
    monkeypatch.setattr(trainer_module, "available_memory", lambda: 4 * 10**9)
    assert keeps_in_memory("auto", 2 * 10**9, epochs=2)
    assert not keeps_in_memory("auto", 2 * 10**9, epochs=1)
    assert not keeps_in_memory("auto", 3 * 10**9, epochs=2)
    assert keeps_in_memory("always", 3 * 10**9, epochs=1) and not keeps_in_memory("never", 1, epochs=5)


class _OpsCalled(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# ops whose result size depends on the data, or that read a value back: on an accelerator the host waits
DATA_DEPENDENT = {"nonzero", "_local_scalar_dense", "bincount", "masked_select", "unique", "_unique2"}


@pytest.mark.parametrize("spec", [{"type": "adapter"}, {"type": "linear"}])
def test_a_step_on_a_carried_layout_never_sizes_from_data(ner_stores, spec):
    """The CPU's stand-in for tests/test_cuda.py's sync check: with the layout the batch carries, a head's forward
    and backward pass run no op that sizes a result from the data; without it they do (the layout is found)."""
    with open_store(ner_stores["train"]) as store:
        head = Head(build_head_config(spec, store)).train()
        batch = next(training_batches(store, head.config.layers, 8, seed=1, epoch=0))
    unlaid = {key: value for key, value in batch.items() if key not in LAYOUT_KEYS}
    called = {}
    for name, inputs in {"carried": batch, "found": unlaid}.items():
        with _OpsCalled() as ops:
            hidden, mask, word_ids, layout = head_inputs(inputs, slice(None))
            head.loss(head(hidden, mask, word_ids, inputs["labels"].shape[1], layout), inputs["labels"]).backward()
        called[name] = ops.names & DATA_DEPENDENT
    assert called == {"carried": set(), "found": {"nonzero"}}


def test_batches_travel_as_stored_and_widen_on_the_device(ner_stores, ner_float16_store):
    """float16 features collated as stored (half the bytes to pin and move to a GPU) reach the heads widened by
    `on_device`: exactly the float32 batch. Other stores' features are float32 either way."""
    for path, travels in ((ner_float16_store, torch.float16), (ner_stores["train"], torch.float32)):
        with open_store(path) as store:
            wide = list(training_batches(store, store.layers, 8, seed=1, epoch=0))
            narrow = list(training_batches(store, store.layers, 8, seed=1, epoch=0, as_stored=True))
        assert {batch["hidden_states"].dtype for batch in narrow} == {travels}
        assert next(on_device(iter(narrow), "meta"))["hidden_states"].dtype == torch.float32
        for expected, got in zip(wide, on_device(iter(narrow), "cpu"), strict=True):
            assert expected.keys() == got.keys()
            for key, value in expected.items():
                assert torch.equal(got[key], value), key
