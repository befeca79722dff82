"""Heads of one architecture trained as one batched module (heads/grouped.py): the same weights as separate
runs, up to float rounding; which heads are batched together."""

import pytest
import torch

from featstore.errors import ConfigError
from heads import TrainConfig, grouped, train
from heads.grouped import HeadGroup, step_optimizers
from heads.trainer import Trainer

from .conftest import sequence_store

GROUPS = {  # heads that batch together: differing in learning rate, seed, weight decay or the layer they read
    "adapters": [{"type": "adapter", "name": "a", "lr": 5e-3}, {"type": "adapter", "name": "b", "lr": 1e-3},
                 {"type": "adapter", "name": "c", "seed": 3, "weight_decay": 0.01}],
    "adapters without tailor, feature dropout": [
        {"type": "adapter", "name": f"a{seed}", "seed": seed, "enable_tailor": False, "feature_dropout": 0.2}
        for seed in (1, 2)],
    # listed out of order: the trainer steps them by layer, reading adjacent columns
    "linear probe sweep, mean pooling": [{"type": "linear", "name": f"L{layer}", "layers": [layer], "lr": 0.05,
                                          "word_pooling": "mean"} for layer in (2, 0, 1)],
    "mlp probes, layers apart": [{"type": "mlp", "name": f"L{layer}", "layers": [layer]} for layer in (2, 0)],
    # (a scalar mix's scale diverges at much higher rates, and then rounding differences grow without bound)
    "scalar mixes": [{"type": "scalar_mix", "name": f"s{seed}", "seed": seed, "lr": 0.005} for seed in (1, 2)],
    "fusions": [{"type": "fusion", "name": f"f{seed}", "seed": seed, "lr": 0.01} for seed in (1, 2)],
}


def _config(stores, out, heads, **options):
    options = {"epochs": 2, "batch_size": 16, "warmup_ratio": 0.5, **options}
    return TrainConfig(store=stores["train"], out=str(out), heads=heads, progress=False,
                       **{"batch_heads": "always", **options})


class SGD(torch.optim.SGD):
    """The trainer's optimiser for the comparison: Adam divides by the root of each gradient's running square, so
    for a weight whose gradient is rounding noise it turns a 1e-9 difference into a full-size step; plain SGD
    keeps a float-rounding difference at float-rounding size, so the comparison can be tight."""

    def __init__(self, params, lr, weight_decay=0.0, fused=None):
        super().__init__(params, lr=lr, weight_decay=weight_decay)


def _batched_equal_separate(stores, out, specs, monkeypatch, relative_tolerance=None, **options):
    """Batched heads' weights equal separate runs': to float32 rounding (assert_close), or with
    `relative_tolerance` to that share of how far training moved them (lower-precision rounding)."""
    monkeypatch.setattr(torch.optim, "AdamW", SGD)
    specs = [{**spec, "lr": 20 * spec.get("lr", 1e-3)} for spec in specs]  # SGD takes larger steps
    batched_calls = []
    losses = HeadGroup.losses
    monkeypatch.setattr(HeadGroup, "losses", lambda self, *args: batched_calls.append(len(self.heads)) or
                        losses(self, *args))
    together = Trainer(_config(stores, out / "together", specs, **options))
    together.train()
    assert batched_calls and set(batched_calls) == {len(specs)}  # every step ran the heads as one module
    for spec, run in zip(specs, together.runs):
        alone = Trainer(_config(stores, out / spec["name"], [spec], **options))
        (solo,) = alone.runs
        initial = {key: tensor.clone() for key, tensor in solo.head.named_parameters()}
        alone.train()
        # the same dropout draws from the head's own stream (the CUDA one for heads on a GPU)
        assert torch.equal(run.rng_state, solo.rng_state)
        assert (run.cuda_rng_state is None) == (solo.cuda_rng_state is None)
        assert run.cuda_rng_state is None or torch.equal(run.cuda_rng_state, solo.cuda_rng_state)
        weights = dict(solo.head.named_parameters())
        trained = torch.cat([(weights[key] - tensor).flatten() for key, tensor in initial.items()])
        assert trained.abs().max() > 1e-3  # the heads did train
        if relative_tolerance is None:
            for key, tensor in run.head.named_parameters():
                torch.testing.assert_close(tensor, weights[key], rtol=1e-5, atol=1e-6, msg=f"{spec['name']} {key}")
        else:
            differences = torch.cat([(tensor - weights[key]).flatten() for key, tensor in run.head.named_parameters()])
            assert differences.norm() < relative_tolerance * trained.norm(), spec["name"]


@pytest.mark.parametrize("name", list(GROUPS))
def test_batched_heads_equal_separate_runs(ner_stores, tmp_path, name, monkeypatch):
    _batched_equal_separate(ner_stores, tmp_path, GROUPS[name], monkeypatch)


# bfloat16 (autocast on a GPU, the wide linear maps on a CPU): batched and one-by-one matrix products round
# differently at bfloat16's 8 bits
PRECISIONS = {"float32": None, "bfloat16": 0.05}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_batched_heads_equal_separate_runs_on_each_device_and_precision(ner_stores, tmp_path, monkeypatch, device,
                                                                        precision, wide_map_calls):
    _batched_equal_separate(ner_stores, tmp_path, GROUPS["adapters"], monkeypatch, PRECISIONS[precision],
                            device=device, precision=precision)
    assert bool(wide_map_calls) == (precision == "bfloat16" and device == "cpu")


@pytest.mark.parametrize("regression", [False, True])
def test_batched_sequence_heads_equal_separate_runs(tiny_models, tmp_path, monkeypatch, regression):
    store = sequence_store(tiny_models["bert"], tmp_path, "train", 120, 1, regression)
    specs = [{"type": "adapter", "name": f"a{seed}", "seed": seed, "sequence_pooling": "attention"}
             for seed in (1, 2)]
    _batched_equal_separate({"train": store}, tmp_path, specs, monkeypatch)


def test_batched_adam_runs_learn_like_separate_ones(ner_stores, tmp_path):
    """With the trainer's own AdamW the batched heads' weights drift from separate runs' by rounding (amplified,
    see SGD above), but what they learn is the same."""
    specs = [{"type": "adapter", "name": "a", "lr": 5e-3}, {"type": "adapter", "name": "b", "lr": 5e-3, "seed": 2}]
    options = {"eval_store": ner_stores["dev"], "epochs": 6, "warmup_ratio": 0.1}
    together = train(_config(ner_stores, tmp_path / "together", specs, **options))
    for spec in specs:
        alone = train(_config(ner_stores, tmp_path / spec["name"], [spec], **options))
        assert together[spec["name"]]["best"] == pytest.approx(alone[spec["name"]]["best"], abs=0.05)
        assert together[spec["name"]]["best"] > 0.8


def test_optimizers_stepped_together_equal_their_own_steps():
    """step_optimizers: fused AdamW optimisers of equal hyper-parameters update in one call, the others alone;
    every weight and state is exactly what each optimiser's own step makes, through its first step (which makes
    the state) and a schedule that changes the learning rate."""
    def optimizers(seed):
        torch.manual_seed(seed)
        made = []
        for lr, kind in [(1e-2, "fused"), (1e-2, "fused"), (1e-2, "fused"), (3e-2, "fused"), (1e-2, "plain"),
                         (1e-2, "fused, no grad")]:
            params = [torch.nn.Parameter(torch.randn(9, 16)), torch.nn.Parameter(torch.randn(9))]
            if kind == "fused, no grad":
                params.append(torch.nn.Parameter(torch.randn(3)))  # no gradient: Adam leaves it as it is
            made.append(torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=kind != "plain" or None))
        return made

    together, alone = optimizers(0), optimizers(0)
    schedules = [torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=4)
                 for optimizer in together + alone]
    calls = []
    adam = grouped.adam
    for step in range(4):
        torch.manual_seed(100 + step)
        for first, second in zip(together, alone):
            for a, b in zip(first.param_groups[0]["params"][:2], second.param_groups[0]["params"][:2]):
                a.grad = torch.randn_like(a)
                b.grad = a.grad.clone()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(grouped, "adam", lambda params, *args, **kwargs: calls.append(len(params)) or
                          adam(params, *args, **kwargs))
            step_optimizers(together)
        for optimizer in alone:
            optimizer.step()
        for schedule in schedules:
            schedule.step()
    # after the first step the three fused ones of lr 1e-2 with gradients everywhere and the one whose third
    # tensor has none (its two tensors) update in one call; lr 3e-2 and the plain AdamW step alone
    assert calls == [8, 8, 8]
    for first, second in zip(together, alone):
        for a, b in zip(first.param_groups[0]["params"], second.param_groups[0]["params"]):
            assert torch.equal(a, b)
            assert all(torch.equal(first.state[a][key], second.state[b][key]) for key in second.state[b])


def test_which_heads_step_together(ner_stores, tmp_path):
    specs = [{"type": "adapter", "name": "a1"}, {"type": "linear", "name": "p0", "layers": [0]},
             {"type": "adapter", "name": "a2", "lr": 1e-2}, {"type": "adapter", "name": "narrow", "attention_dim": 32},
             {"type": "linear", "name": "p2", "layers": [2]}, {"type": "bilstm", "name": "lstm"},
             {"type": "adapter", "name": "crf", "crf": True}, {"type": "adapter", "name": "a3", "dropout": 0.3}]
    trainer = Trainer(_config(ner_stores, tmp_path, specs))
    groups = [[run.name for run in runs] for runs, _ in trainer._groups(trainer.runs)]
    # a different width, dropout rate, a CRF or a type vmap cannot batch (the LSTM) steps alone
    assert groups == [["a1", "a2"], ["p0", "p2"], ["narrow"], ["lstm"], ["crf"], ["a3"]]
    alone = Trainer(_config(ner_stores, tmp_path, specs, batch_heads="never"))
    assert all(len(runs) == 1 and group is None for runs, group in alone._groups(alone.runs))
    # auto: every group on CUDA; on the CPU the probes' (their step is mostly per-operation overhead), not the rest
    auto = Trainer(_config(ner_stores, tmp_path, specs, batch_heads="auto"))
    expected = groups if auto.config.device == "cuda" else [[name] for name in ["a1", "a2"]] + [["p0", "p2"]] + \
        [[name] for name in ("narrow", "lstm", "crf", "a3")]
    assert [[run.name for run in runs] for runs, _ in auto._groups(auto.runs)] == expected
    compiled = Trainer(_config(ner_stores, tmp_path, specs, batch_heads="auto", compile=True))
    assert all(len(runs) == 1 and group is None for runs, group in compiled._groups(compiled.runs))
    with pytest.raises(ConfigError, match="--compile and --batch-heads always"):
        Trainer(_config(ner_stores, tmp_path, specs, compile=True))
    if trainer.config.device == "cpu":  # a compiled head cannot take bfloat16 wide maps on the CPU (heads.layers)
        with pytest.raises(ConfigError, match="--compile and --precision bfloat16"):
            Trainer(_config(ner_stores, tmp_path, specs, batch_heads="auto", compile=True, precision="bfloat16"))
