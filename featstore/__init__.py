"""featstore: extract a frozen encoder's per-layer hidden states once, read them back fast."""

import logging

__version__ = "0.2.0"

from .catalog import Catalog
from .corpus import Corpus, CorpusSpec, Example, load_corpus
from .encoder import FrozenEncoder
from .errors import FeatstoreError
from .extract import ExtractConfig, ExtractResult, extract
from .reader import FeatureDataset, Store, collate_features, open_store
from .transfer import copy_store
from .verify import verify_store

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Catalog", "Corpus", "CorpusSpec", "Example", "ExtractConfig", "ExtractResult", "FeatstoreError", "FeatureDataset",
    "FrozenEncoder", "Store", "collate_features", "copy_store", "extract", "load_corpus", "open_store", "verify_store",
]
