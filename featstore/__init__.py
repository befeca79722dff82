"""featstore: extract a frozen encoder's per-layer hidden states once, read them back fast.

The package is laid out by concern: `store` (format, manifest, backends, reader, integrity,
verify), `extraction` (corpus, windows, encoder, spec, plan, writer, engines), `sharing`
(locations, leases, catalog, copies) and `service` (HTTP API, jobs, client). The public API
below is imported lazily, so light commands never load torch.
"""

import logging
from typing import TYPE_CHECKING

from .errors import FeatstoreError
from .lazy import lazy_exports

__version__ = "0.2.0"
# The name on the package index: "featstore" there is an unrelated project. Import names stay featstore and heads.
DISTRIBUTION = "activation-featstore"


def install_hint(extra: str) -> str:
    """The pip command that installs an optional extra of this distribution."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


_EXPORTS = {
    "Catalog": ".sharing.catalog", "copy_store": ".sharing.transfer",
    "Corpus": ".extraction.corpus", "CorpusSpec": ".extraction.corpus", "Example": ".extraction.corpus",
    "load_corpus": ".extraction.corpus", "FrozenEncoder": ".extraction.encoder",
    "ExtractSpec": ".extraction.spec", "ExtractConfig": ".extraction.spec",
    "ExtractResult": ".extraction.extract", "extract": ".extraction.extract",
    "Store": ".store.reader", "open_store": ".store.reader", "StoreManifest": ".store.manifest",
    "FeatureDataset": ".store.dataset", "collate_features": ".store.dataset", "verify_store": ".store.verify",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .extraction.corpus import Corpus, CorpusSpec, Example, load_corpus
    from .extraction.encoder import FrozenEncoder
    from .extraction.extract import ExtractResult, extract
    from .extraction.spec import ExtractConfig, ExtractSpec
    from .sharing.catalog import Catalog
    from .sharing.transfer import copy_store
    from .store.dataset import FeatureDataset, collate_features
    from .store.manifest import StoreManifest
    from .store.reader import Store, open_store
    from .store.verify import verify_store

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Catalog", "Corpus", "CorpusSpec", "Example", "ExtractConfig", "ExtractResult", "ExtractSpec", "FeatstoreError",
    "FeatureDataset", "FrozenEncoder", "Store", "StoreManifest", "collate_features", "copy_store", "extract",
    "load_corpus", "open_store", "verify_store",
]
