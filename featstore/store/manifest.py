"""`StoreManifest`: the store's attributes as typed dataclasses, validated when a store opens.

The attributes are the `featstore` key of a store (docs/store-format.md, "Attributes"). Each
section is a dataclass; `from_dict` checks that every field is present with the right type
and raises `StoreFormatError` naming the field otherwise, so a malformed store fails at open
with a clear message instead of a KeyError deep inside a reader. Keys a newer minor version
adds are kept in `extra` and written back unchanged (like HF `DatasetInfo.from_dict`, which
tolerates unknown keys), so rewriting a store's attributes never drops them.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from ..errors import StoreFormatError
from ..options import fits_type, type_name
from . import format as fmt

SectionT = TypeVar("SectionT", bound="Section")
# A field a minor version added is written only when set: the attributes (and their section digests) of a store
# that does not use it stay exactly what older versions wrote and check.
ADDED_IN_MINOR = {"added_in_minor": True}


@dataclass
class Section:
    """A typed group of attributes. Subclasses list their fields; unknown keys go to `extra`."""

    KEY: ClassVar[str] = ""

    @classmethod
    def from_dict(cls: type[SectionT], values: Any, where: str) -> SectionT:
        name = cls.KEY or "attributes"
        if not isinstance(values, dict):
            raise StoreFormatError(f"{where}: metadata section {name!r} is {type(values).__name__}, not an object")
        hints = typing.get_type_hints(cls)
        known, kwargs = set(), {}
        for item in fields(cls):
            if item.name == "extra":
                continue
            known.add(item.name)
            if item.name not in values:
                if item.default is MISSING and item.default_factory is MISSING:
                    raise StoreFormatError(f"{where}: the store's metadata lacks {name}.{item.name}; the store is "
                                           "damaged or was not written by featstore")
                continue
            value = values[item.name]
            hint = hints[item.name]
            nested = _section_type(hint)
            if nested is not None and value is not None:
                value = nested.from_dict(value, where)
            elif not fits_type(value, hint):
                raise StoreFormatError(f"{where}: the store's metadata has {name}.{item.name} = {value!r:.80}, "
                                       f"not a valid {type_name(hint)}; the store is damaged")
            kwargs[item.name] = value
        kwargs["extra"] = {key: value for key, value in values.items() if key not in known}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "extra" or (item.metadata.get("added_in_minor") and value is None):
                continue
            result[item.name] = value.to_dict() if isinstance(value, Section) else value
        return {**result, **self.extra}


def _section_type(hint: Any) -> type[Section] | None:
    for option in typing.get_args(hint) or (hint,):
        if isinstance(option, type) and issubclass(option, Section):
            return option
    return None


@dataclass
class FingerprintInputs(Section):
    """Everything that determines the stored values and nothing else (docs/store-format.md, "Fingerprint").
    The field list is the fingerprint rule: `FINGERPRINT_FIELDS` is derived from it."""

    KEY: ClassVar[str] = "fingerprint_inputs"
    format_major: int
    encoder_weights_sha256: str
    encoder_config_sha256: str
    tokenizer_sha256: str
    corpus_fingerprint: str
    layers: list[int]
    compute_dtype: str
    storage_dtype: str
    max_length: int
    stride: int
    truncation: bool
    window_rule: str
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of exactly the fingerprint fields (extras never count)."""
        return fmt.sha256_json({name: getattr(self, name) for name in FINGERPRINT_FIELDS})

    def differing(self, other: FingerprintInputs) -> list[str]:
        return [name for name in FINGERPRINT_FIELDS if getattr(self, name) != getattr(other, name)]


FINGERPRINT_FIELDS = tuple(item.name for item in fields(FingerprintInputs) if item.name != "extra")


@dataclass
class EncoderInfo(Section):
    KEY: ClassVar[str] = "encoder"
    name_or_path: str
    model_class: str
    model_type: str
    revision: str | None
    weights_sha256: str
    config: dict[str, Any]
    config_sha256: str
    tokenizer_class: str
    tokenizer_sha256: str
    num_hidden_states: int
    hidden_size: int
    special_prefix_ids: list[int]
    special_suffix_ids: list[int]
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def resolve_layer(self, layer: int) -> int | None:
        """A hidden-state index with negatives counted back from the last layer; None when out of range."""
        count = self.num_hidden_states
        return layer % count if -count <= layer < count else None


@dataclass
class CorpusInfo(Section):
    KEY: ClassVar[str] = "corpus"
    source: str
    name: str
    split: str | None
    columns: dict[str, Any]
    fingerprint: str
    task: str
    label_names: list[str] | None
    labeled: bool
    num_examples: int
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class ExtractionInfo(Section):
    KEY: ClassVar[str] = "extraction"
    layers: list[int]
    compute_dtype: str
    storage_dtype: str
    max_length: int
    stride: int
    truncation: bool
    window_rule: str
    device: str
    max_batch_tokens: int
    created_at: str
    completed_at: str | None
    versions: dict[str, Any]
    host: str
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class LayoutInfo(Section):
    KEY: ClassVar[str] = "layout"
    backend: str
    order: str
    chunk_tokens: int
    block_tokens: int
    storage_order: str
    compression: str | None = field(default=None, metadata=ADDED_IN_MINOR)  # (1.4) format.Compression's
    # "codec:level" of the hidden states; None: raw
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def codec(self) -> fmt.Compression | None:
        return None if self.compression is None else fmt.Compression.parse(self.compression)


@dataclass
class Counts(Section):
    KEY: ClassVar[str] = "counts"
    num_sequences: int
    num_tokens: int
    num_words: int
    num_windowed_sequences: int
    num_truncated_sequences: int
    hidden_bytes: int
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class ChunkChecksums(Section):
    """How `hidden_checksums` checks every hidden-states read (format 1.2; docs/store-format.md)."""

    KEY: ClassVar[str] = "integrity.chunks"
    array: str  # the array holding the checksums
    algorithm: str  # "xxh3_64"
    chunk_rows: int  # tokens per checked chunk (its own unit, see store/chunks.py)
    per_layer: bool  # one checksum per chunk and layer (Zarr), or per chunk over all layers (HDF5)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Integrity(Section):
    """What finalize records so that nothing changed afterwards is used: per-block digests of every array
    (1.1); the dtype and shape of every array, digests of the attribute sections, and the per-chunk
    checksums that readers check (1.2)."""

    KEY: ClassVar[str] = "integrity"
    algorithm: str
    block_rows: int
    arrays: dict[str, list[str]]
    array_types: dict[str, Any] | None = None  # name -> {"dtype": str, "shape": [int, ...]}
    sections: dict[str, str] | None = None  # attribute section -> sha256 of its canonical JSON
    chunks: ChunkChecksums | None = None  # small chunks: what random access checks
    span_chunks: ChunkChecksums | None = None  # large chunks: what streaming reads check
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def chunk_levels(self) -> list[ChunkChecksums]:
        return [level for level in (self.chunks, self.span_chunks) if level is not None]


@dataclass
class StoreManifest(Section):
    """All of a store's attributes. `from_attrs` also refuses non-featstore and too-new stores."""

    format: str
    format_version: str
    status: str
    fingerprint: str
    fingerprint_inputs: FingerprintInputs
    encoder: EncoderInfo
    corpus: CorpusInfo
    extraction: ExtractionInfo
    layout: LayoutInfo
    counts: Counts
    integrity: Integrity | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_attrs(cls, attrs: Any, where: str) -> StoreManifest:
        """The validated manifest of the store at `where` (named in errors)."""
        if not isinstance(attrs, dict) or attrs.get("format") != fmt.FORMAT_NAME:
            raise StoreFormatError(f"{where} is not a featstore store (no featstore attributes)")
        version = attrs.get("format_version", "?")
        try:
            major = fmt.format_major(version)
        except ValueError:
            raise StoreFormatError(f"{where} has an unreadable format version {version!r}") from None
        if major > fmt.format_major(fmt.FORMAT_VERSION):
            raise StoreFormatError(f"{where} uses store format {version}, newer than this featstore supports "
                                   f"({fmt.FORMAT_VERSION}); upgrade featstore to read it")
        manifest = cls.from_dict(attrs, where)
        if manifest.extraction.storage_dtype not in fmt.ENCODINGS:
            raise StoreFormatError(f"{where} stores hidden states as {manifest.extraction.storage_dtype!r}, an "
                                   f"encoding this featstore does not know ({', '.join(fmt.ENCODINGS)}); upgrade "
                                   "featstore to read it")
        try:
            manifest.layout.codec  # noqa: B018 - parsed to refuse an unknown codec at open
        except ValueError:
            raise StoreFormatError(f"{where} compresses its hidden states with {manifest.layout.compression!r}, a "
                                   f"codec this featstore does not know ({', '.join(fmt.COMPRESSION_CODECS)}); "
                                   "upgrade featstore to read it") from None
        return manifest

    @property
    def complete(self) -> bool:
        return self.status == fmt.STATUS_COMPLETE

    @property
    def hidden_shape(self) -> tuple[int, int, int]:
        return self.counts.num_tokens, len(self.extraction.layers), self.encoder.hidden_size

    @property
    def encoding(self) -> fmt.Encoding:
        return fmt.ENCODINGS[self.extraction.storage_dtype]

    def label_array(self) -> tuple[str, str] | None:
        """(name, dtype) of the labels array of a labeled store, by task."""
        if not self.corpus.labeled:
            return None
        if self.corpus.task == fmt.TOKEN_CLASSIFICATION:
            return fmt.WORD_LABELS, fmt.ARRAY_DTYPES[fmt.WORD_LABELS]
        return fmt.LABELS, "float32" if self.corpus.task == fmt.REGRESSION else "int64"

    def expected_arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """(shape, dtype) of every array a store with these attributes holds; the chunk checksums only once
        finalize has described them."""
        n_seq, n_tok = self.counts.num_sequences, self.counts.num_tokens
        arrays = {fmt.HIDDEN_STATES: (self.hidden_shape, self.encoding.array_dtype),
                  fmt.INPUT_IDS: ((n_tok,), ""), fmt.WORD_IDS: ((n_tok,), ""), fmt.TOKEN_WINDOW: ((n_tok,), ""),
                  fmt.TOKEN_OFFSETS: ((n_seq + 1,), ""), fmt.WORD_OFFSETS: ((n_seq + 1,), ""),
                  fmt.SEQUENCE_INDEX: ((n_seq,), ""), fmt.PROGRESS: ((2,), "")}
        if self.encoding.scaled:
            arrays[fmt.HIDDEN_SCALES] = (self.hidden_shape[:2], "")
        labels = self.label_array()
        if labels is not None:
            name, dtype = labels
            arrays[name] = ((self.counts.num_words if name == fmt.WORD_LABELS else n_seq,), dtype)
        for level in self.integrity.chunk_levels if self.integrity is not None else []:
            pieces = len(self.extraction.layers) if level.per_layer else 1
            arrays[level.array] = ((-(-n_tok // level.chunk_rows), pieces), "")
        return {name: (shape, dtype or fmt.ARRAY_DTYPES[name]) for name, (shape, dtype) in arrays.items()}

    def section_digests(self) -> dict[str, str]:
        """sha256 of every attribute section but `status` (a copy in progress says "writing") and `integrity`
        (which holds these digests): label names, layers, dtypes... cannot change unnoticed after finalize."""
        attrs = self.to_dict()
        return {key: fmt.sha256_json(value) for key, value in sorted(attrs.items())
                if key not in ("status", Integrity.KEY)}
