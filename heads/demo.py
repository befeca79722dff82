"""The main job end to end on embedded defaults (`featstore demo`, added to featstore's CLI by this package).

1. Extract the bundled sample NER corpus (train and dev) with the packaged all-MiniLM-L6-v2 into
   local Zarr stores, verify them, and print the train store's summary.
2. Check a sequence read back from the store against the live encoder.
3. Train the layer-attention adapter from the store (the encoder is not run again), evaluate it on dev,
   whose names and sentence templates are held out of train (a test of generalisation, not memory).
4. Attach the trained head to the live encoder and tag a new sentence (held out too): tags and entities.
5. Write the head's report (HTML page and figures: learning curves, per-type scores, confusion matrix, the
   adapter's layer attention per label) and print where it is.

Only `DemoCommand` is loaded when featstore builds its parser; the work imports what it needs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


class DemoCommand:
    """The `featstore demo` command (entry point `featstore.commands: demo`)."""

    def add_parser(self, subparsers: Any, name: str) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help="end to end on the bundled corpus and packaged MiniLM: extract, "
                                       "verify, train an adapter from the store, predict with the live encoder, "
                                       "write its report")
        parser.add_argument("--workdir", default="featstore-demo", help="where the demo writes its stores and head "
                            "(default: %(default)s)")
        return parser

    def run(self, args: argparse.Namespace) -> int:
        return run_demo(args.workdir)


command = DemoCommand()


def run_demo(workdir: str = "featstore-demo") -> int:
    import numpy as np

    from featstore import ExtractSpec, FrozenEncoder, extract, load_corpus, open_store, verify_store
    from featstore.extraction.corpus import BUNDLED_CORPUS, CorpusSpec
    from featstore.store.info import describe_store

    from .predict import Predictor
    from .report import build_report
    from .trainer import TrainConfig, train

    root = Path(workdir)
    train_store = extract(ExtractSpec(out=str(root / "sample_ner.zarr"))).path
    with open_store(train_store) as store:
        labels = store.label_names
    dev_store = extract(ExtractSpec(out=str(root / "sample_ner_dev.zarr"),
                                    corpus=CorpusSpec(str(BUNDLED_CORPUS.with_name("sample_ner_dev.conll")),
                                                      label_names=labels))).path
    for path in (train_store, dev_store):
        problems = verify_store(path)
        if problems:
            print("\n".join(f"verify {path}: {problem}" for problem in problems))
            return 1
    print(describe_store(train_store))

    with open_store(train_store) as store:
        manifest = store.manifest
        encoder = FrozenEncoder.load(manifest.encoder.name_or_path, device="cpu", dtype=store.storage_dtype)
        example = load_corpus(manifest.corpus.source).examples[0]
        live = encoder.features(encoder.tokenize([example], manifest.extraction.max_length,
                                                 manifest.extraction.stride), store.layers).astype(np.float32)
        cached = store.sequence(0).hidden_states.astype(np.float32)
        print(f"\nstore vs live encoder, sequence 0 ({' '.join(example.words)}): hidden states {cached.shape}, "
              f"max |difference| = {np.abs(cached - live).max():.1e} (float16 storage)")

    out = root / "adapter"
    summary = train(TrainConfig(store=train_store, eval_store=dev_store, out=str(out), heads=[{"type": "adapter"}],
                                epochs=8, batch_size=16, lr=3e-3, progress=False))
    print(f"\nadapter trained from the store: entity F1 {summary['adapter']['best']:.3f} on the dev split, whose "
          "names, places, organisations and sentence templates are all unseen in training "
          f"(best epoch {summary['adapter']['saved_epoch']}), saved to {out}")

    # Held out like the dev split: no name, place, organisation or template of this sentence is in train.
    sentence = "Ines Carvalho flew from Windhoek to Cork for Granite Works ."
    (prediction,) = Predictor(out).predict([sentence])
    print(f"live encoder + trained head on a new sentence: {sentence!r}")
    print(f"  tags: {json.dumps(dict(zip(prediction['words'], prediction['tags'])))}")
    print(f"  entities: {json.dumps([(entity['text'], entity['type']) for entity in prediction['entities']])}")
    report = build_report(out, root / "report")
    print(f"\nreport (learning curves, per-type scores, confusion matrix, layer attention): {report}")
    print(f"\ndone: stores and head under {root}/")
    return 0
