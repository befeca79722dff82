"""featstore: extract a frozen encoder's per-layer hidden states once, read them back fast."""

import logging

__version__ = "0.1.0"

from .corpus import Corpus, CorpusSpec, Example, load_corpus  # noqa: E402
from .encoder import FrozenEncoder  # noqa: E402
from .errors import FeatstoreError  # noqa: E402
from .extract import ExtractConfig, extract  # noqa: E402
from .reader import FeatureDataset, Store, collate_features, open_store  # noqa: E402
from .verify import verify_store  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Corpus", "CorpusSpec", "Example", "ExtractConfig", "FeatstoreError", "FeatureDataset", "FrozenEncoder",
    "Store", "collate_features", "extract", "load_corpus", "open_store", "verify_store",
]
