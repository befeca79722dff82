"""Heads of one architecture trained as one batched module: a step's K forward and backward passes become one.

Heads trained together that differ only in what does not change their shapes (learning rate, weight decay,
seed, the layer a probe reads) run as one module under `torch.func.vmap`: their weights are stacked for the
step, so each matrix product runs once for all K heads instead of K times, and the per-operation overhead is
paid once. Each head keeps its own parameters, optimiser and schedule (the stack is differentiable: gradients
land on each head's own weights), and its dropout masks come from its own random stream
(heads.layers.batched_heads), so each head's weights equal those of a separate run up to float rounding. Their
optimisers step together too (`step_optimizers`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence

import torch
from torch.func import functional_call, vmap
from torch.optim.adam import adam

from .config import HEAD_TYPES, HeadConfig
from .head import Head
from .layers import Dropout, batched_heads, training_precision
from .packing import Layout


def batch_key(config: HeadConfig) -> str | None:
    """Heads whose keys are equal can step as one batched module; None: a head that steps alone (its type has
    modules vmap cannot batch, or a CRF)."""
    if not HEAD_TYPES[config.head_type].batched or config.crf:
        return None
    values = config.to_dict()
    values.pop("name")
    values["layers"] = len(config.layers)  # which layers a head reads is an input, not a shape
    return json.dumps(values, sort_keys=True, default=str)


def group_by_key(configs: Sequence[HeadConfig]) -> list[list[int]]:
    """Indices of `configs` in groups that step together (in first-seen order; a head alone is a group of 1)."""
    groups: dict[str, list[int]] = {}
    for index, config in enumerate(configs):
        key = batch_key(config)
        groups.setdefault(key if key is not None else f"alone {index}", []).append(index)
    return list(groups.values())


class HeadGroup:
    """K heads of one architecture (equal `batch_key`s) whose training losses are computed in one batched pass."""

    def __init__(self, heads: Sequence[Head]) -> None:
        if len({batch_key(head.config) for head in heads}) != 1 or batch_key(heads[0].config) is None:
            raise ValueError("a HeadGroup needs heads of one batchable architecture")
        self.heads = list(heads)
        # a stateless copy to call with each head's weights in turn (functional_call swaps them in under vmap)
        self.template = copy.deepcopy(heads[0])
        # each parameter of the template's, in every head (found once: looking them up by name every step showed in
        # the profile of a sweep's step)
        self.by_name = {name: [head.get_parameter(name) for head in self.heads]
                        for name, _ in self.template.named_parameters()}
        # a batched step draws random numbers only for its dropout masks (batched_heads): without dropout, the
        # heads' random streams need no generators
        self.draws_randomness = any(isinstance(module, Dropout) and module.p > 0 for module in self.template.modules())

    def losses(self, hidden: torch.Tensor, heads_dim: int | None, mask: torch.Tensor, word_ids: torch.Tensor | None,
               num_words: int | None, layout: Layout, labels: torch.Tensor, generators: Sequence[torch.Generator],
               training_dtype: torch.dtype | None) -> torch.Tensor:
        """Each head's training loss on the batch, (K,). `hidden`: the layers every head reads, packed (N, L, H), or
        each head's own stacked along `heads_dim` (e.g. (N, K, L, H) with heads_dim 1); `layout`: the batch's
        tokens and words (heads.packing), the same for every head. `generators`: each head's random stream for its
        dropout (none where the heads have no dropout: `draws_randomness`). The forward runs in `training_dtype`
        (None: float32; heads.layers.training_precision), the loss in float32, as when the head trains alone; token
        tasks' logits stay packed for it (Task.losses)."""
        parameters = {name: torch.stack(each) for name, each in self.by_name.items()}
        template = self.template
        device_type = hidden.device.type

        def head_output(weights: dict[str, torch.Tensor], head_index: torch.Tensor, features: torch.Tensor
                        ) -> torch.Tensor:
            with batched_heads(generators, head_index), training_precision(device_type, training_dtype):
                return functional_call(template, weights, (features, mask, word_ids, num_words, layout),
                                       {"packed_words": True})

        index = torch.arange(len(self.heads), device=hidden.device)
        # randomness "same": the only random draws are the dropout masks, made outside vmap's batching from
        # each head's own generator (batched_heads)
        outputs = vmap(head_output, in_dims=(0, 0, heads_dim), randomness="same")(parameters, index, hidden)
        # the losses outside vmap, in one call for the K heads (no grouped head has a CRF: batch_key)
        return template.config.task_def.losses(outputs.float(), labels, layout)

    def zero_grad(self) -> None:
        """Every head's gradients set to None: what each optimiser's zero_grad(set_to_none=True) does, without its
        per-call overhead."""
        for parameters in self.by_name.values():
            for parameter in parameters:
                parameter.grad = None

    def train(self, mode: bool = True) -> None:
        self.template.train(mode)


# what an Adam(W) update depends on besides the tensors: optimisers equal in these take one update together
_ADAM_HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay",
                         "capturable")


def step_optimizers(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """`optimizer.step()` of each, with the fused Adam(W) optimisers (one parameter group, state made by a step
    already) whose hyper-parameters are equal at this step (a sweep's probes; an lr grid's heads are not) updated
    in one fused call: the kernel updates each tensor on its own, so each head's weights and state are exactly
    what its own step gives, and K heads pay the optimiser's per-call overhead once (7 probes' steps 0.25 ms
    one by one on a 2-core CPU, 0.07 ms together; BENCHMARKS.md, "Speed")."""
    together: dict[tuple, list[tuple[torch.optim.Optimizer, list[torch.Tensor]]]] = {}
    for optimizer in optimizers:
        group = optimizer.param_groups[0]
        params = [param for param in group["params"] if param.grad is not None]
        fusable = isinstance(optimizer, torch.optim.Adam) and len(optimizer.param_groups) == 1 and group["fused"] \
            and params and all(optimizer.state[param] for param in params) and not isinstance(group["lr"], torch.Tensor)
        # one that cannot (its first step makes its state; an optimiser this does not know) steps on its own
        key = tuple(group[name] for name in _ADAM_HYPERPARAMETERS) if fusable else (id(optimizer),)
        together.setdefault(key, []).append((optimizer, params))
    for key, members in together.items():
        if len(members) == 1:
            members[0][0].step()
            continue
        group = dict(zip(_ADAM_HYPERPARAMETERS, key))
        params = [param for _, own in members for param in own]
        states = [optimizer.state[param] for optimizer, own in members for param in own]
        with torch.no_grad():
            adam(params, [param.grad for param in params], [state["exp_avg"] for state in states],
                 [state["exp_avg_sq"] for state in states],
                 [state["max_exp_avg_sq"] for state in states] if group["amsgrad"] else [],
                 [state["step"] for state in states], fused=True, capturable=group["capturable"],
                 decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=group["amsgrad"],
                 beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                 weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])
