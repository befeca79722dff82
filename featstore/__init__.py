"""featstore: extract a frozen encoder's per-layer hidden states once, read them back fast."""

import logging

__version__ = "0.2.0"

from .errors import FeatstoreError
from .extraction.corpus import Corpus, CorpusSpec, Example, load_corpus
from .extraction.encoder import FrozenEncoder
from .extraction.extract import ExtractConfig, ExtractResult, extract
from .sharing.catalog import Catalog
from .sharing.transfer import copy_store
from .store.reader import FeatureDataset, Store, collate_features, open_store
from .store.verify import verify_store

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Catalog", "Corpus", "CorpusSpec", "Example", "ExtractConfig", "ExtractResult", "FeatstoreError", "FeatureDataset",
    "FrozenEncoder", "Store", "collate_features", "copy_store", "extract", "load_corpus", "open_store", "verify_store",
]
