"""Tag sequences as NER output: repair to valid BIO, and group into entity spans.

A tagger's argmax can be an invalid sequence (`O I-PER`, `B-LOC I-PER`). Repair follows the
CoNLL evaluation convention (conlleval, seqeval): an `I-X` that does not continue an `X` entity
starts one, so it becomes `B-X`. This also turns IOB1 output (CoNLL-2003's original scheme,
where `I-` starts entities) into the equivalent BIO. Only label sets made of `O`, `B-*` and
`I-*` are treated this way; other tag sets (part of speech, ...) are left as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def is_bio(label_names: Sequence[str] | None) -> bool:
    return bool(label_names) and all(name == "O" or name[:2] in ("B-", "I-") for name in label_names or ())


def repair_bio(tags: Sequence[str]) -> list[str]:
    """Valid BIO: every `I-X` continues a `B-X`/`I-X`, else it becomes `B-X`."""
    repaired: list[str] = []
    for tag in tags:
        if tag.startswith("I-") and (not repaired or repaired[-1] == "O" or repaired[-1][2:] != tag[2:]):
            tag = "B-" + tag[2:]
        repaired.append(tag)
    return repaired


def entity_spans(words: Sequence[str], tags: Sequence[str], scores: Sequence[float],
                 offsets: Sequence[tuple[int, int]] | None = None, text: str | None = None) -> list[dict[str, Any]]:
    """Entities of a valid BIO sequence: type, words [first, end), text, mean word score, and character
    offsets [start, end) into `text` when the words came from it."""
    spans: list[dict[str, Any]] = []
    for index, tag in enumerate(tags):
        if tag.startswith("B-"):
            spans.append({"type": tag[2:], "words": [index, index + 1]})
        elif tag.startswith("I-") and spans and spans[-1]["words"][1] == index:
            spans[-1]["words"][1] = index + 1
    for span in spans:
        first, end = span["words"]
        span["score"] = round(sum(scores[first:end]) / (end - first), 6)
        if offsets is not None and text is not None:
            span["start"], span["end"] = offsets[first][0], offsets[end - 1][1]
            span["text"] = text[span["start"]: span["end"]]
        else:
            span["text"] = " ".join(words[first:end])
    return spans
