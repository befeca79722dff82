"""A linear-chain CRF over word emissions (`--crf`): training maximises the log-likelihood of the gold tag
sequence (forward algorithm), prediction is the Viterbi path.

Kept small and our own: the CRF packages on the index (pytorch-crf, TorchCRF) have not been released since
2019-2020. Transitions are learned freely, so a training corpus with invalid BIO sequences (IOB1 data, say)
still trains; with `allowed` given, decoding only ever takes allowed transitions (a valid BIO sequence).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .entities import is_bio


def bio_allowed_transitions(label_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(allowed[i, j]: tag j may follow tag i, allowed_start[j]: a sentence may start with j) for BIO tags:
    I-X only continues B-X or I-X."""
    names = list(label_names)

    def continues(previous: str | None, tag: str) -> bool:
        if not tag.startswith("I-"):
            return True
        return previous is not None and previous[:2] in ("B-", "I-") and previous[2:] == tag[2:]

    allowed = torch.tensor([[continues(previous, tag) for tag in names] for previous in names])
    return allowed, torch.tensor([continues(None, tag) for tag in names])


class CRF(nn.Module):
    def __init__(self, num_labels: int, constrain_bio_of: Sequence[str] | None = None) -> None:
        super().__init__()
        self.transitions = nn.Parameter(torch.zeros(num_labels, num_labels))  # [previous, next]
        self.start = nn.Parameter(torch.zeros(num_labels))
        self.end = nn.Parameter(torch.zeros(num_labels))
        allowed = torch.ones(num_labels, num_labels, dtype=torch.bool)
        start_allowed = torch.ones(num_labels, dtype=torch.bool)
        if constrain_bio_of is not None and is_bio(constrain_bio_of):
            allowed, start_allowed = bio_allowed_transitions(constrain_bio_of)
        # buffers, not saved: they follow from the config's label names
        self.register_buffer("allowed", allowed, persistent=False)
        self.register_buffer("start_allowed", start_allowed, persistent=False)

    def nll(self, emissions: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of the gold sequences, summed: emissions (B, W, C), labels (B, W), mask (B, W)
        True on the words of each sentence (a prefix; labels elsewhere are ignored)."""
        tags = labels.clamp(min=0)
        gold = self.start[tags[:, 0]] + emissions[:, 0].gather(1, tags[:, :1]).squeeze(1)
        steps = mask[:, 1:].to(emissions.dtype)
        emitted = emissions[:, 1:].gather(2, tags[:, 1:, None]).squeeze(2)
        gold = gold + ((self.transitions[tags[:, :-1], tags[:, 1:]] + emitted) * steps).sum(1)
        last = tags.gather(1, (mask.sum(1, keepdim=True) - 1).clamp(min=0)).squeeze(1)
        gold = gold + self.end[last]
        present = mask[:, 0]
        return ((self.log_partition(emissions, mask) - gold) * present).sum()

    def log_partition(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log Z per sentence (the forward algorithm)."""
        score = self.start + emissions[:, 0]  # (B, C)
        for step in range(1, emissions.shape[1]):
            following = torch.logsumexp(score[:, :, None] + self.transitions + emissions[:, step, None, :], dim=1)
            score = torch.where(mask[:, step, None], following, score)
        return torch.logsumexp(score + self.end, dim=1)

    @torch.no_grad()
    def viterbi(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The best tag sequence per sentence (B, W); -1 beyond each sentence's words."""
        forbidden = torch.finfo(emissions.dtype).min
        transitions = self.transitions.masked_fill(~self.allowed, forbidden)
        score = self.start.masked_fill(~self.start_allowed, forbidden) + emissions[:, 0]
        backpointers = []
        for step in range(1, emissions.shape[1]):
            best, previous = (score[:, :, None] + transitions + emissions[:, step, None, :]).max(dim=1)
            backpointers.append(previous)
            score = torch.where(mask[:, step, None], best, score)
        lengths = mask.sum(1)
        last = (score + self.end).argmax(1)
        paths = torch.full(mask.shape, -1, dtype=torch.long, device=emissions.device)
        for row in range(mask.shape[0]):
            length = int(lengths[row])
            if length == 0:
                continue
            tag = int(last[row])
            paths[row, length - 1] = tag
            for step in range(length - 1, 0, -1):
                tag = int(backpointers[step - 1][row, tag])
                paths[row, step - 1] = tag
        return paths
