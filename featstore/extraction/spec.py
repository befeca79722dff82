"""`ExtractSpec`: the single, typed description of an extraction.

Every option of `featstore extract` is a field here, declared once with `option(...)`. The
`extract` and `submit` flags, the service's request model, spec files (`featstore extract
--spec FILE`, what the service's workers run) and the job queue all derive from these
fields, so adding an option means adding one field. Options marked `submit=False` describe
how *this* process runs (device, engine, waiting, where the catalog is); the service decides
those for its jobs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..options import check_values, from_flat, nested, option, parse_layers, read_options_file, to_flat
from ..sharing.lease import DEFAULT_TTL_SECONDS
from ..store.format import BACKEND_NAMES, COMPUTE_DTYPES, NO_COMPRESSION, STORAGE_DTYPES, Compression
from .corpus import CorpusSpec

DEFAULT_CHUNK_TOKENS = 4096
ENGINES = ("local", "ray")


@dataclass
class ExtractSpec:
    """Everything an extraction takes; JSON round-trips through `to_dict` / `from_dict` (flat names)."""

    out: str | None = option(None, help="store path or URL (s3://bucket/prefix/name.zarr): a directory for zarr, "
                             "a file for hdf5; optional with --catalog (for `submit`: relative to the service's "
                             "catalog)", default_text="with --catalog, <encoder>/<corpus>-<fingerprint>.zarr in it")
    catalog: str | None = option(None, submit=False, help="catalog root (directory or s3:// prefix): reuse a "
                                 "complete store with the same content fingerprint from it, else extract into it")
    model: str | None = option(None, help="local model directory or a hub id already in the local cache",
                               default_text="the packaged all-MiniLM-L6-v2 ('minilm')")
    corpus: CorpusSpec = nested(CorpusSpec)
    layers: list[int] | None = option(None, parse=parse_layers, metavar="all|0,6,-1",
                                      help="hidden states to keep (0 = embeddings, negatives count back)",
                                      default_text="all")
    dtype: str = option("float16", choices=STORAGE_DTYPES,
                        help="storage encoding: int8 and float8_e4m3 keep one scale per token and layer and take "
                             "about half the bytes of float16")
    compute_dtype: str | None = option(None, choices=COMPUTE_DTYPES, help="dtype the encoder computes in",
                                       default_text="float32 on CPU; on CUDA the storage dtype, float16 for the "
                                                    "8-bit encodings")
    backend: str = option("zarr", choices=BACKEND_NAMES, help="zarr: a directory (works on S3); hdf5: one file")
    device: str | None = option(None, submit=False, help="cpu, cuda, cuda:1 ...", default_text="cuda when available")
    max_batch_tokens: int = option(8192, minimum=1, help="padded tokens per forward pass")
    max_length: int | None = option(None, minimum=8, help="window length in tokens",
                                    default_text="the model's maximum")
    stride: int | None = option(None, minimum=0, help="overlap between windows in tokens",
                                default_text="min(128, window/4)")
    truncate: bool = option(False, help="keep only the first window of long sequences instead of splitting them")
    overwrite: bool = option(False, submit=False, help="replace an existing store made differently")
    compression: str | None = option(None, metavar="zstd[:LEVEL]|none", help="a lossless codec on the hidden states "
                                     "(zstd after a byte shuffle, level 1-9, default 5): smaller stores for some "
                                     "CPU on every read (BENCHMARKS.md, 'Storage encodings')", default_text="none")
    chunk_tokens: int = option(DEFAULT_CHUNK_TOKENS, minimum=1, help="tokens per inner chunk (the smallest "
                               "independently readable piece)")
    block_tokens: int | None = option(None, minimum=1, help="tokens per write/commit block",
                                      default_text="64 MiB worth")
    progress: bool = option(True, submit=False, help="no progress bars (model loading included)")
    lock_wait: float = option(0.0, minimum=0, submit=False, metavar="SECONDS", help="wait this long for another "
                              "process writing the same store", default_text="0: fail at once")
    lease_ttl: float = option(DEFAULT_TTL_SECONDS, minimum=1, submit=False, flag=False,
                              help="seconds a writer's lease lasts without renewal")
    storage_options: dict[str, Any] | None = option(None, submit=False, flag=False,
                                                    help="fsspec options for remote locations (featstore -S)")
    engine: str = option("local", choices=ENGINES, submit=False,
                         help="ray: split the work across Ray actors (one per GPU, else per CPU) writing one store")
    workers: int | None = option(None, minimum=1, submit=False, help="Ray actors",
                                 default_text="one per GPU, else one per CPU")
    ray_address: str | None = option(None, submit=False, help="Ray cluster to join ('auto', ray://host:10001)",
                                     default_text="start a local one")

    def validate(self) -> ExtractSpec:
        """Raise ConfigError for invalid values or combinations, before anything is loaded."""
        check_values(self)
        if self.out is None and self.catalog is None:
            raise ConfigError("give --out (where to write the store) or --catalog ROOT")
        if self.compression is not None:
            self.compression = canonical_compression(self.compression)
            if self.compression is not None and self.backend == "hdf5":
                raise ConfigError("--compression needs --backend zarr: an HDF5 file's compressed chunks change its "
                                  "metadata on every write, so a killed extraction could not resume. Extract, then "
                                  "`featstore convert SRC DST.h5 --compression ...` for a compressed HDF5 copy")
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_flat(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "extraction spec") -> ExtractSpec:
        return from_flat(cls, values, where)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> ExtractSpec:
        """A spec saved as JSON (`to_dict`), with `overrides` (flat names) applied."""
        return cls.from_dict({**read_options_file(path, "extraction spec"), **overrides}, where=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def canonical_compression(text: str) -> str | None:
    """A --compression value as stores record it ("zstd" -> "zstd:5", "none" -> None: raw); ConfigError saying
    what is accepted."""
    if text.strip().lower() == NO_COMPRESSION:
        return None
    try:
        return str(Compression.parse(text))
    except ValueError as error:
        raise ConfigError(f"--compression: {error}") from None


# The 0.2 name, kept so code written against it runs unchanged.
ExtractConfig = ExtractSpec
