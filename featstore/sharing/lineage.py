"""Lineage: which heads were trained and evaluated on which stores of a catalog.

A head registered with a catalog leaves one small JSON record under `ROOT/_heads/` naming where the head is,
the content fingerprints of the stores it was trained and evaluated on, and its metrics. The catalog reads
them to list a store's consumers (`featstore ls --heads`) and to keep `gc` away from stores a head still
names; `heads train --catalog` and `heads register` write them. Records name stores by fingerprint, not path,
so a store pulled or copied elsewhere in the catalog is still recognised.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from ..errors import StoreFormatError
from .location import Location

logger = logging.getLogger(__name__)

HEADS_DIR = "_heads"  # under the catalog root; never a store (no zarr.json, no .h5)
RECORD_FORMAT = "featstore-head-lineage/1"


@dataclass
class HeadRecord:
    name: str
    location: str  # where the saved head is (a path or URL)
    head_type: str
    task: str
    weights_sha256: str
    stores: dict[str, str]  # role ("train", "eval") -> store content fingerprint
    store_locations: dict[str, str] = field(default_factory=dict)  # role -> where it was when the head trained
    metrics: dict[str, float] = field(default_factory=dict)  # on the eval store, at the saved epoch
    registered_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def key(self) -> str:
        """The record's file name: one record per head (name and weights), registering again replaces it."""
        return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', self.name).strip('-.') or 'head'}-{self.weights_sha256[:12]}.json"

    def names(self, fingerprint: str | None) -> bool:
        return fingerprint is not None and fingerprint in self.stores.values()

    def to_dict(self) -> dict[str, Any]:
        return {"format": RECORD_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HeadRecord:
        """Tolerates unknown keys (a later version's)."""
        names = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


def register(root: Location, record: HeadRecord) -> Location:
    """Write (or replace) the record of a head under the catalog root."""
    target = root.child(HEADS_DIR, record.key)
    target.write_bytes(json.dumps(record.to_dict(), indent=2).encode())
    return target


def read_records(root: Location) -> list[HeadRecord]:
    """Every head record under the root, sorted by name; a damaged record is skipped with a warning."""
    directory = root.child(HEADS_DIR)
    if not directory.isdir():
        return []
    records = []
    for path in sorted(directory.fs.ls(directory.path, detail=False)):
        location = directory.child(str(path).rstrip("/").rsplit("/", 1)[-1])
        if not location.name.endswith(".json"):
            continue
        try:
            values = json.loads(location.read_bytes())
            if values.get("format") != RECORD_FORMAT:
                raise StoreFormatError(f"format {values.get('format')!r}")
            records.append(HeadRecord.from_dict(values))
        except (ValueError, TypeError, StoreFormatError) as error:
            logger.warning("skipping the damaged head record %s: %s", location.url, error)
    return sorted(records, key=lambda record: (record.name, record.registered_at))
