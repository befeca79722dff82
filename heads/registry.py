"""Heads in a catalog: register saved heads (their lineage record: featstore.sharing.lineage) and list them
with the stores they were trained and evaluated on and their metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from featstore.errors import ConfigError
from featstore.sharing.catalog import Catalog
from featstore.sharing.lineage import HeadRecord, register

from .head import Head


def head_record(directory: str | Path) -> HeadRecord:
    """The lineage record of a saved head: its stores come from its training record (heads saved by older
    versions, without one, name only the training store their config records)."""
    directory = Path(directory).resolve()
    head = Head.from_pretrained(directory)
    config, training = head.config, head.training_record
    stores = {"train": config.store_fingerprint} if config.store_fingerprint else {}
    locations: dict[str, str] = {}
    metrics: dict[str, float] = {}
    if training is not None:
        for role, fingerprint, location in (("train", training.train_store_fingerprint, training.train_store),
                                            ("eval", training.eval_store_fingerprint, training.eval_store)):
            if fingerprint:
                stores[role] = fingerprint
            if location:
                locations[role] = location
        metrics = {key: value for key, value in training.metrics.items() if isinstance(value, float)}
    if not stores:
        raise ConfigError(f"{directory} records no store fingerprint; it cannot be registered with a catalog")
    return HeadRecord(name=config.name, location=str(directory), head_type=config.head_type, task=config.task,
                      weights_sha256=head.weights_sha256, stores=stores, store_locations=locations, metrics=metrics)


def register_heads(directories: list[str | Path], root: str, storage_options: dict[str, Any] | None = None
                   ) -> list[str]:
    """Register saved heads with the catalog at `root`; returns where each record was written."""
    catalog = Catalog(root, storage_options)
    records = [head_record(directory) for directory in directories]  # every head checked before any is written
    return [register(catalog.root, record).url for record in records]


def list_heads(root: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The heads registered under `root`, each with its stores (found in the catalog by fingerprint, else
    where they were when the head trained, marked as missing) and metrics."""
    catalog = Catalog(root, storage_options)
    by_fingerprint = {entry.fingerprint: entry for entry in catalog.entries() if entry.fingerprint}
    rows = []
    for record in catalog.head_records():
        stores = {}
        for role, fingerprint in record.stores.items():
            entry = by_fingerprint.get(fingerprint)
            stores[role] = {"fingerprint": fingerprint, "in_catalog": entry is not None,
                            "location": entry.location.url if entry else record.store_locations.get(role)}
        rows.append({"name": record.name, "type": record.head_type, "task": record.task,
                     "location": record.location, "stores": stores, "metrics": record.metrics,
                     "registered_at": record.registered_at})
    return rows
