"""The main job end to end on embedded defaults (`featstore demo`).

1. Extract the bundled sample NER corpus (train and dev) with the packaged all-MiniLM-L6-v2 into
   local Zarr stores, verify them, and print the train store's summary.
2. Check a sequence read back from the store against the live encoder.
3. Train the layer-attention adapter from the store (the encoder is not run again), evaluate it on dev.
4. Attach the trained head to the live encoder and tag a new sentence.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from featstore import ExtractConfig, FrozenEncoder, extract, load_corpus, open_store, verify_store
from featstore.extraction.corpus import BUNDLED_CORPUS, CorpusSpec
from featstore.store.verify import describe_store

from .predict import Predictor
from .trainer import TrainConfig, train

BUNDLED_DEV_CORPUS = BUNDLED_CORPUS.with_name("sample_ner_dev.conll")


def run_demo(workdir: str = "featstore-demo") -> int:
    root = Path(workdir)
    train_store = extract(ExtractConfig(out=str(root / "sample_ner.zarr"))).path
    with open_store(train_store) as store:
        labels = store.label_names
    dev_store = extract(ExtractConfig(out=str(root / "sample_ner_dev.zarr"),
                                      corpus=CorpusSpec(str(BUNDLED_DEV_CORPUS), label_names=labels))).path
    for path in (train_store, dev_store):
        problems = verify_store(path)
        if problems:
            print("\n".join(f"verify {path}: {problem}" for problem in problems))
            return 1
    print(describe_store(train_store))

    with open_store(train_store) as store:
        extraction = store.attrs["extraction"]
        encoder = FrozenEncoder.load(store.attrs["encoder"]["name_or_path"], device="cpu",
                                     dtype=store.storage_dtype)
        example = load_corpus(store.attrs["corpus"]["source"]).examples[0]
        live = encoder.forward(encoder.tokenize([example], extraction["max_length"], extraction["stride"]),
                               store.layers).float().numpy()
        cached = store.sequence(0).hidden_states.astype(np.float32)
        print(f"\nstore vs live encoder, sequence 0 ({' '.join(example.words)}): hidden states {cached.shape}, "
              f"max |difference| = {np.abs(cached - live).max():.1e} (float16 storage)")

    out = root / "adapter"
    summary = train(TrainConfig(store=train_store, eval_store=dev_store, out=str(out), heads=[{"type": "adapter"}],
                                epochs=8, batch_size=16, lr=3e-3, progress=False))
    print(f"\nadapter trained from the store: dev entity F1 {summary['adapter']['best']:.3f} "
          f"(best epoch {summary['adapter']['best_epoch']}), saved to {out}")

    sentence = "Clara Jensen flew from Oslo to Quito for Atlas Freight ."
    (prediction,) = Predictor(out).predict([sentence])
    print(f"live encoder + trained head: {json.dumps(dict(zip(prediction['words'], prediction['tags'])))}")
    print(f"\ndone: stores and head under {root}/")
    return 0
