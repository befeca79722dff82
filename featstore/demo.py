"""`featstore demo`: the main job end to end on embedded defaults.

Extracts the bundled sample NER corpus with the packaged all-MiniLM-L6-v2 into a local
Zarr store, verifies it, prints its summary, and checks one sequence read back from the
store against the live encoder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .corpus import load_corpus
from .encoder import FrozenEncoder
from .extract import ExtractConfig, extract
from .reader import open_store
from .verify import describe_store, verify_store

logger = logging.getLogger(__name__)


def run_demo(workdir: str = "featstore-demo") -> int:
    store_path = str(Path(workdir) / "sample_ner.zarr")
    extract(ExtractConfig(out=store_path))
    problems = verify_store(store_path)
    if problems:
        for problem in problems:
            print(f"verify: {problem}")
        return 1
    print(describe_store(store_path))

    with open_store(store_path) as store:
        encoder = FrozenEncoder.load(store.attrs["encoder"]["name_or_path"], device="cpu",
                                     dtype=store.storage_dtype)
        corpus = load_corpus(store.attrs["corpus"]["source"])
        row = 0
        cached = store.sequence(row).hidden_states.astype(np.float32)
        tokenized = encoder.tokenize([corpus.examples[row]], store.attrs["extraction"]["max_length"],
                                     store.attrs["extraction"]["stride"])
        live = encoder.forward(tokenized, store.layers).float().numpy()
        words = store.sequence(row, layers=[-1], pooling="first")
        print(f"\nsequence {row}: {' '.join(corpus.examples[row].words)}")
        print(f"  cached hidden states {cached.shape}, max |store - live encoder| = "
              f"{np.abs(cached - live).max():.2e}")
        print(f"  last-layer first-subword word vectors {words.hidden_states.shape}, tags "
              f"{[store.label_names[i] for i in words.labels]}")
        seen = sum(1 for _ in store.iter_epoch(seed=0))
        print(f"  shuffled epoch iterator visited {seen} of {len(store)} sequences")
    print(f"\nstore ready at {store_path}")
    return 0
