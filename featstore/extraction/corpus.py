"""Corpus input: CoNLL column files and anything Hugging Face `datasets` loads locally.

A corpus is normalised into a list of `Example`s of one task shape:

* token classification — pre-split words with one tag per word;
* sequence classification — a text (or words) with one class label;
* regression — a text (or words) with one float target;

plus the ordered label names. Its fingerprint is a hash of that normalised content,
so the same sentences and labels give the same fingerprint whatever the file format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, CorpusError
from ..options import option

# The task names are part of the store format (`corpus.task`).
from ..store.format import REGRESSION, SEQUENCE_CLASSIFICATION, TASKS, TOKEN_CLASSIFICATION

logger = logging.getLogger(__name__)

CONLL_SUFFIXES = {".conll", ".conllu", ".txt", ".iob", ".bio"}
DATASETS_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
WORDS_COLUMNS = ("tokens", "words")
TEXT_COLUMNS = ("text", "sentence", "content")
LABEL_COLUMNS = ("ner_tags", "tags", "labels", "label", "pos_tags")

CORPUS_FORMATS = ("auto", "conll", "json", "csv", "parquet", "disk")
BUNDLED_CORPUS = Path(__file__).parent.parent / "data" / "sample_ner.conll"


@dataclass(frozen=True)
class Example:
    """One corpus row. Exactly one of `words` / `text` is set; `label` is None when unlabeled.

    For token classification `label` is a tuple of label ids, one per word.
    """

    words: tuple[str, ...] | None = None
    text: str | None = None
    label: int | float | tuple[int, ...] | None = None


@dataclass
class CorpusSpec:
    """Where a corpus lives and how to read it. Column names left as None are auto-detected."""

    path: str = option(str(BUNDLED_CORPUS), name="corpus", required_to_submit=True,
                       help="CoNLL file, JSONL/CSV/Parquet file or save_to_disk directory (for `submit`: as the "
                       "service sees it, under a corpus root)", default_text="the bundled sample NER corpus")
    format: str = option("auto", name="corpus_format", choices=CORPUS_FORMATS,
                         help="how to read the corpus; auto: from its content (token-tag columns with blank lines "
                         "between sentences are CoNLL, whatever the extension), else the suffix")
    split: str | None = option(None, pattern=r"[A-Za-z0-9_.-]+",
                               help="split to read from a saved DatasetDict; also recorded in the store")
    words_column: str | None = option(None, help="column of pre-split words (token classification)",
                                      default_text="tokens or words")
    text_column: str | None = option(None, help="column of raw text (sequence tasks)",
                                     default_text="text, sentence or content")
    label_column: str | None = option(None, help="column of labels (tags per word, or one per row)",
                                      default_text="ner_tags, tags, labels, label or pos_tags")
    task: str | None = option(None, choices=TASKS, help="the task shape", default_text="inferred from the columns")
    label_names: list[str] | None = option(None, metavar="A,B,...", help="comma-separated label names fixing the "
                                           "id order, e.g. to share it between train and dev stores",
                                           default_text="sorted, or the dataset's ClassLabel names")
    label_names_from: str | None = option(None, submit=False, metavar="STORE",
                                          help="take the label names, in their order, from this store (e.g. the "
                                          "train store when extracting dev or test), so that both agree")
    conll_token_column: int = option(0, help="CoNLL column holding the token")
    conll_tag_column: int = option(-1, help="CoNLL column holding the tag")


@dataclass
class Corpus:
    """A normalised corpus ready for tokenization."""

    examples: list[Example]
    task: str
    label_names: list[str] | None
    source: str
    split: str | None
    spec: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def labeled(self) -> bool:
        return self.examples[0].label is not None

    @property
    def name(self) -> str:
        return Path(self.source.rstrip("/")).stem or self.source

    def fingerprint(self) -> str:
        """sha256 of the normalised content: task, label names, and every example's words/text/label."""
        digest = hashlib.sha256()
        digest.update(json.dumps({"task": self.task, "label_names": self.label_names}).encode())
        for example in self.examples:
            row = {"words": example.words, "text": example.text, "label": example.label}
            digest.update(json.dumps(row, ensure_ascii=False).encode())
            digest.update(b"\n")
        return digest.hexdigest()


def load_corpus(spec: CorpusSpec | str) -> Corpus:
    """Load and validate a corpus; raises `CorpusError` naming the file/row on bad input."""
    if isinstance(spec, str):
        spec = CorpusSpec(path=spec)
    path = Path(spec.path)
    if not path.exists():
        raise CorpusError(f"corpus {spec.path!r} does not exist; pass a CoNLL file, a JSONL/CSV/Parquet "
                             "file, or a directory saved with datasets' save_to_disk")
    if spec.task is not None and spec.task not in TASKS:
        raise ConfigError(f"unknown task {spec.task!r}; choose one of {', '.join(TASKS)}")
    if spec.label_names_from is not None:
        spec = CorpusSpec(**{**spec.__dict__, "label_names": _label_names_from(spec)})
    fmt = _resolve_format(path, spec.format)
    if path.is_file() and _is_blank(path):
        raise CorpusError(f"corpus {spec.path!r} is empty: it holds no examples")
    if fmt == "conll":
        rows, columns = _read_conll(path, spec), ["tokens", "tags"]
        spec_words, spec_labels = "tokens", "tags"
        spec = CorpusSpec(**{**spec.__dict__, "words_column": spec_words, "label_column": spec_labels})
        label_feature = None
    else:
        rows, columns, label_feature = _read_with_datasets(path, fmt, spec)
    corpus = _normalise(rows, columns, label_feature, spec, source=str(path))
    logger.info("loaded %d %s examples from %s", len(corpus), corpus.task, path)
    return corpus


def _label_names_from(spec: CorpusSpec) -> list[str]:
    from ..store.backends import read_manifest

    names = read_manifest(spec.label_names_from).corpus.label_names
    if names is None:
        raise ConfigError(f"--label-names-from {spec.label_names_from}: that store has no label names")
    if spec.label_names is not None and list(spec.label_names) != list(names):
        raise ConfigError(f"--label-names {','.join(spec.label_names)} disagrees with the store given to "
                          f"--label-names-from ({','.join(names)}); give one of them")
    return list(names)


def _is_blank(path: Path) -> bool:
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _resolve_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in CORPUS_FORMATS:
            raise ConfigError(f"unknown corpus format {fmt!r}; choose one of {', '.join(CORPUS_FORMATS[1:])}")
        return fmt
    if path.is_dir():
        return "disk"
    suffix = path.suffix.lower()
    sniffed = _sniff_text_format(path) if suffix != ".parquet" else None
    if sniffed == "conll" or (sniffed is None and suffix in CONLL_SUFFIXES):
        if suffix not in CONLL_SUFFIXES:
            logger.info("%s holds CoNLL columns (token tag lines, blank lines between sentences): reading it as "
                        "CoNLL; pass --corpus-format to read it otherwise", path)
        return "conll"
    if suffix in DATASETS_BUILDERS:
        return DATASETS_BUILDERS[suffix]
    if sniffed is not None:
        return sniffed
    raise CorpusError(f"cannot tell the format of corpus {str(path)!r} from its content or its suffix {suffix!r}; "
                      "pass --corpus-format conll|json|csv|parquet|disk")


SNIFF_BYTES = 1 << 16


def _sniff_text_format(path: Path) -> str | None:
    """"conll" or "json" when the start of the file shows it, else None. CoNLL: every non-blank line holds the
    same number (two or more) of whitespace-separated columns, with blank lines between sentences (or a
    -DOCSTART- line), whatever the file's extension; JSON lines start with an object."""
    with path.open("rb") as handle:
        head = handle.read(SNIFF_BYTES)
    text = head.decode("utf-8", errors="replace")
    lines = text.splitlines()[:-1] if len(head) == SNIFF_BYTES else text.splitlines()  # the last may be cut
    content = [line for line in lines if line.strip()]
    if not content:
        return None
    if content[0].lstrip().startswith(("{", "[")):
        return "json"
    widths = {len(line.split()) for line in content if not line.startswith("-DOCSTART-")}
    separated = len(content) < len(lines) or any(line.startswith("-DOCSTART-") for line in content)
    tabular_header = any(separator in content[0] for separator in (",", "\t")) and len(content[0].split()) < 2
    if len(widths) == 1 and min(widths) >= 2 and separated and not tabular_header:
        return "conll"
    return None


def _read_conll(path: Path, spec: CorpusSpec) -> list[dict[str, Any]]:
    """Read a CoNLL column file: one token per line, blank lines between sentences, -DOCSTART- skipped."""
    rows: list[dict[str, Any]] = []
    words: list[str] = []
    tags: list[str] = []
    n_columns: int | None = None

    def flush() -> None:
        if words:
            rows.append({"tokens": list(words), "tags": list(tags) if tags else None})
            words.clear()
            tags.clear()

    for line_number, line in _text_lines(path):
        fields = line.split()
        if not fields:
            flush()
            continue
        if fields[0] == "-DOCSTART-":
            flush()
            continue
        if n_columns is None:
            n_columns = len(fields)
        if len(fields) != n_columns:
            raise CorpusError(f"{path}:{line_number}: expected {n_columns} columns like the first "
                              f"token line, found {len(fields)}: {line.rstrip()!r}", f"{path}:{line_number}")
        try:
            words.append(fields[spec.conll_token_column])
            if n_columns > 1:
                tags.append(fields[spec.conll_tag_column])
        except IndexError:
            raise CorpusError(f"{path}:{line_number}: column index out of range for a line with "
                              f"{n_columns} columns; check --conll-token-column/--conll-tag-column",
                              f"{path}:{line_number}") from None
    flush()
    return rows


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; binary or undecodable content is refused naming the line."""
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if b"\0" in raw:
                raise CorpusError(f"{path}:{line_number}: holds a NUL byte: this is a binary file, not a text "
                                  "corpus", f"{path}:{line_number}")
            try:
                yield line_number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise CorpusError(f"{path}:{line_number}: not valid UTF-8 (byte {error.start + 1} of the line: "
                                  f"{error.reason}); featstore reads text corpora as UTF-8: convert the file, e.g. "
                                  "`iconv -f latin1 -t utf-8`", f"{path}:{line_number}") from None


def _read_with_datasets(path: Path, fmt: str, spec: CorpusSpec) -> tuple[list[dict[str, Any]], list[str], Any]:
    import datasets

    datasets.disable_progress_bars()
    if fmt in ("json", "csv"):
        for _ in _text_lines(path):  # a clear error naming the line, before the parser's own
            pass
    try:
        if fmt == "disk":
            loaded = datasets.load_from_disk(str(path))
        else:
            kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            loaded = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except FileNotFoundError as error:
        raise CorpusError(f"corpus {str(path)!r} could not be loaded as {fmt}: {error}") from None
    except Exception as error:  # datasets raises many types for malformed files
        raise CorpusError(f"corpus {str(path)!r} could not be parsed as {fmt}: "
                             f"{type(error).__name__}: {error}") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = spec.split
        if split is None:
            if len(loaded) != 1:
                raise CorpusError(f"corpus {str(path)!r} holds splits {sorted(loaded)}; choose one with --split")
            split = next(iter(loaded))
        if split not in loaded:
            raise CorpusError(f"corpus {str(path)!r} has no split {split!r}; it has {sorted(loaded)}")
        loaded = loaded[split]
    label_column = spec.label_column or _first_present(LABEL_COLUMNS, loaded.column_names)
    label_feature = loaded.features.get(label_column) if label_column else None
    return loaded.to_list(), list(loaded.column_names), label_feature


def _first_present(candidates: Sequence[str], columns: Sequence[str]) -> str | None:
    return next((name for name in candidates if name in columns), None)


def _require_column(name: str | None, columns: Sequence[str], what: str, source: str) -> None:
    if name is not None and name not in columns:
        raise CorpusError(f"corpus {source!r} has no {what} column {name!r}; its columns are {list(columns)}")


def _normalise(rows: list[dict[str, Any]], columns: list[str], label_feature: Any, spec: CorpusSpec,
               source: str) -> Corpus:
    if not rows:
        raise CorpusError(f"corpus {source!r} is empty: it holds no examples")
    for name, what in ((spec.words_column, "words"), (spec.text_column, "text"), (spec.label_column, "label")):
        _require_column(name, columns, what, source)
    words_column = spec.words_column or (None if spec.text_column else _first_present(WORDS_COLUMNS, columns))
    text_column = spec.text_column or (None if words_column else _first_present(TEXT_COLUMNS, columns))
    if words_column is None and text_column is None:
        raise CorpusError(f"corpus {source!r} has no words or text column; its columns are {columns}. "
                             "Name them with --words-column or --text-column")
    label_column = spec.label_column or _first_present(LABEL_COLUMNS, columns)

    raw_labels = [row.get(label_column) for row in rows] if label_column else [None] * len(rows)
    missing = [index for index, value in enumerate(raw_labels) if value is None]
    if label_column and missing and len(missing) < len(rows):
        raise CorpusError(f"corpus {source!r}: {len(missing)} of {len(rows)} rows have no value in label "
                             f"column {label_column!r} (first: row {missing[0]}); label every row or none")
    labeled = label_column is not None and not missing

    task = spec.task or _infer_task(words_column, labeled, raw_labels, label_feature)
    if task == TOKEN_CLASSIFICATION and words_column is None:
        raise CorpusError(f"corpus {source!r}: token classification needs pre-split words "
                             f"(a words column such as {WORDS_COLUMNS}); found only text column {text_column!r}")

    inputs: list[tuple[tuple[str, ...] | None, str | None]] = []
    for index, row in enumerate(rows):
        if words_column:
            words = row.get(words_column)
            if not isinstance(words, list) or not words:
                raise CorpusError(f"corpus {source!r} row {index}: column {words_column!r} must be a "
                                     f"non-empty list of words, got {words!r}")
            if any(not isinstance(word, str) or not word.strip() for word in words):
                raise CorpusError(f"corpus {source!r} row {index}: every word must be a non-blank string")
            inputs.append((tuple(words), None))
        else:
            text = row.get(text_column)
            if not isinstance(text, str) or not text.strip():
                raise CorpusError(f"corpus {source!r} row {index}: column {text_column!r} must be "
                                     f"non-empty text, got {text!r}")
            inputs.append((None, text))

    label_names, labels = _encode_labels(task, raw_labels if labeled else None, label_feature, spec, source,
                                         inputs)
    examples = [Example(words=words, text=text, label=label) for (words, text), label in zip(inputs, labels)]
    return Corpus(examples=examples, task=task, label_names=label_names, source=source, split=spec.split,
                  spec={"words_column": words_column, "text_column": text_column, "label_column": label_column
                        if labeled else None, "format": spec.format})


def _infer_task(words_column: str | None, labeled: bool, raw_labels: list[Any], label_feature: Any) -> str:
    first = raw_labels[0] if labeled else None
    if isinstance(first, list):
        return TOKEN_CLASSIFICATION
    if isinstance(first, float) and not _is_class_label(label_feature):
        return REGRESSION
    if labeled:
        return SEQUENCE_CLASSIFICATION
    return TOKEN_CLASSIFICATION if words_column else SEQUENCE_CLASSIFICATION


def _is_class_label(feature: Any) -> bool:
    return type(feature).__name__ == "ClassLabel"


def _feature_names(feature: Any) -> list[str] | None:
    """Label names declared by a datasets ClassLabel (or a sequence of them)."""
    if feature is None:
        return None
    if _is_class_label(feature):
        return list(feature.names)
    inner = getattr(feature, "feature", None)
    if inner is None and isinstance(feature, list) and feature:
        inner = feature[0]
    return list(inner.names) if _is_class_label(inner) else None


def _encode_labels(task: str, raw_labels: list[Any] | None, label_feature: Any, spec: CorpusSpec, source: str,
                   inputs: list[tuple[tuple[str, ...] | None, str | None]]
                   ) -> tuple[list[str] | None, list[Any]]:
    if raw_labels is None:
        return spec.label_names, [None] * len(inputs)
    if task == REGRESSION:
        try:
            targets = [float(value) for value in raw_labels]
        except (TypeError, ValueError):
            raise CorpusError(f"corpus {source!r}: regression labels must be numbers") from None
        bad = next((row for row, value in enumerate(targets) if not math.isfinite(value)), None)
        if bad is not None:
            raise CorpusError(f"corpus {source!r} row {bad}: regression label {targets[bad]} is not a finite "
                              "number; fix or drop that row", f"row {bad}")
        return None, targets

    per_row = [value if isinstance(value, list) else [value] for value in raw_labels]
    if task == TOKEN_CLASSIFICATION:
        for index, (tags, (words, _)) in enumerate(zip(per_row, inputs)):
            if not isinstance(raw_labels[index], list) or len(tags) != len(words):
                raise CorpusError(f"corpus {source!r} row {index}: {len(words)} words but "
                                     f"{len(tags) if isinstance(raw_labels[index], list) else 'no list of'} tags")
    values = [value for tags in per_row for value in tags]
    names = spec.label_names or _feature_names(label_feature)
    if names is None:
        if all(isinstance(value, str) for value in values):
            names = sorted(set(values))
        elif all(isinstance(value, int) and not isinstance(value, bool) for value in values):
            names = [str(i) for i in range(max(values) + 1)]
        else:
            raise CorpusError(f"corpus {source!r}: labels must be all strings or all integers")
    index_of = {name: i for i, name in enumerate(names)}

    def encode(value: Any, row: int) -> int:
        if isinstance(value, str):
            if value not in index_of:
                raise CorpusError(f"corpus {source!r} row {row}: label {value!r} is not in the label names "
                                     f"{names}")
            return index_of[value]
        if not isinstance(value, int) or not 0 <= value < len(names):
            raise CorpusError(f"corpus {source!r} row {row}: label {value!r} is outside 0..{len(names) - 1}")
        return value

    if task == TOKEN_CLASSIFICATION:
        return names, [tuple(encode(v, row) for v in tags) for row, tags in enumerate(per_row)]
    return names, [encode(tags[0], row) for row, tags in enumerate(per_row)]
