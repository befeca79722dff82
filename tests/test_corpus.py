import json

import datasets
import pytest

from featstore.errors import CorpusError
from featstore.extraction.corpus import (
    BUNDLED_CORPUS,
    REGRESSION,
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
    CorpusSpec,
    load_corpus,
)


def test_conll_file_reads_words_and_tags(tmp_path):
    path = tmp_path / "a.conll"
    path.write_text("-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n")
    corpus = load_corpus(str(path))
    assert corpus.task == TOKEN_CLASSIFICATION
    assert [e.words for e in corpus.examples] == [("EU", "rejects"), ("Peter",)]
    assert corpus.label_names == ["B-ORG", "B-PER", "O"]
    assert corpus.examples[0].label == (0, 2)


def test_same_content_in_jsonl_and_saved_dataset_has_the_same_fingerprint(tmp_path):
    rows = [{"tokens": ["a", "b"], "ner_tags": ["O", "B-X"]}, {"tokens": ["c"], "ner_tags": ["O"]}]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    conll = tmp_path / "c.conll"
    conll.write_text("a O\nb B-X\n\nc O\n")
    prints = {load_corpus(str(p)).fingerprint() for p in (jsonl, tmp_path / "saved", conll)}
    assert len(prints) == 1


def test_text_classification_from_csv_and_regression_from_parquet(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("sentence,label\ngood film,pos\nbad film,neg\n")
    corpus = load_corpus(CorpusSpec(path=str(csv), text_column="sentence"))
    assert corpus.task == SEQUENCE_CLASSIFICATION
    assert corpus.label_names == ["neg", "pos"] and [e.label for e in corpus.examples] == [1, 0]
    parquet = tmp_path / "r.parquet"
    datasets.Dataset.from_list([{"text": "x y", "score": 0.5}, {"text": "z", "score": 2.0}]).to_parquet(str(parquet))
    corpus = load_corpus(CorpusSpec(path=str(parquet), label_column="score"))
    assert corpus.task == REGRESSION and [e.label for e in corpus.examples] == [0.5, 2.0]


def test_class_label_names_come_from_dataset_features(tmp_path):
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER"]))})
    data = datasets.Dataset.from_dict({"tokens": [["Anna"]], "ner_tags": [[1]]}, features=features)
    datasets.DatasetDict({"train": data, "validation": data}).save_to_disk(str(tmp_path / "dd"))
    corpus = load_corpus(CorpusSpec(path=str(tmp_path / "dd"), split="validation"))
    assert corpus.label_names == ["O", "B-PER"] and corpus.examples[0].label == (1,)
    with pytest.raises(CorpusError, match="choose one with --split"):
        load_corpus(str(tmp_path / "dd"))


def test_bundled_corpus_loads():
    corpus = load_corpus(str(BUNDLED_CORPUS))
    assert len(corpus) == 240 and "B-PER" in corpus.label_names


@pytest.mark.parametrize("content,suffix,spec,message", [
    ("", ".conll", {}, "is empty"),
    ('{"text": "a"}\n', ".jsonl", {"label_column": "label"}, "no label column 'label'"),
    ('{"foo": "a"}\n', ".jsonl", {}, "no words or text column"),
    ('{"text": "a", "label": 1}\n{"text": "b", "label": null}\n', ".jsonl", {}, "1 of 2 rows have no value"),
    ('{"tokens": ["a", "b"], "tags": ["O"]}\n', ".jsonl", {}, "row 0: 2 words but 1 tags"),
    ('{"tokens": [], "tags": []}\n', ".jsonl", {}, "row 0: column 'tokens' must be a non-empty list"),
    ("a O\nb\n", ".conll", {}, ":2: expected 2 columns"),
    ("x", ".xyz", {}, "cannot tell the format"),
])
def test_bad_corpora_give_clear_errors(tmp_path, content, suffix, spec, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(CorpusError, match=message) as error:
        load_corpus(CorpusSpec(path=str(path), **spec))
    assert str(path) in str(error.value) or "row" in str(error.value)


def test_missing_corpus_path():
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus("/nonexistent/corpus.conll")


@pytest.mark.parametrize("name", ["tweets.tsv", "tweets.csv", "tweets.data", "tweets.conll"])
def test_conll_content_is_read_as_conll_whatever_the_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text("Apple\tB-ORG\nrocks\tO\n\n@user\tO\nin\tO\nParis\tB-LOC\n")
    corpus = load_corpus(str(path))
    assert corpus.task == TOKEN_CLASSIFICATION and [e.words for e in corpus.examples] == [
        ("Apple", "rocks"), ("@user", "in", "Paris")]


@pytest.mark.parametrize("name,content", [
    ("t.tsv", "text\tlabel\nthis is fine\tpos\nthat is bad\tneg\n"),
    ("t.csv", "text,label\nthis is fine,pos\nthat is bad,neg\n"),
    ("t.data", '{"text": "this is fine", "label": "pos"}\n{"text": "that is bad", "label": "neg"}\n'),
])
def test_tables_and_json_lines_are_not_mistaken_for_conll(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    corpus = load_corpus(str(path))
    assert corpus.task == SEQUENCE_CLASSIFICATION and corpus.label_names == ["neg", "pos"]


def test_label_names_from_a_store_make_dev_agree_with_train(tiny_models, tmp_path):
    from featstore import ExtractConfig, extract
    from featstore.errors import ConfigError

    train, dev = tmp_path / "train.conll", tmp_path / "dev.conll"
    train.write_text("Ann B-PER\nin O\nRome B-LOC\n\nBob B-PER\n")
    dev.write_text("Rome B-LOC\n")  # alone it would get the names ["B-LOC"] and different ids
    store = extract(ExtractConfig(out=str(tmp_path / "train.zarr"), model=tiny_models["bert"],
                                  corpus=CorpusSpec(str(train)), progress=False)).path
    corpus = load_corpus(CorpusSpec(str(dev), label_names_from=store))
    assert corpus.label_names == ["B-LOC", "B-PER", "O"] and corpus.examples[0].label == (0,)
    with pytest.raises(ConfigError, match="disagrees with the store"):
        load_corpus(CorpusSpec(str(dev), label_names_from=store, label_names=["O", "B-LOC", "B-PER"]))


def test_the_bundled_dev_split_is_held_out_from_train():
    """The demo's dev score must measure generalisation: no entity of dev occurs in train."""
    def entities(path):
        corpus = load_corpus(str(path))
        found = set()
        for example in corpus.examples:
            tags = [corpus.label_names[label] for label in example.label]
            current: list[str] = []
            for word, tag in [*zip(example.words, tags), ("", "O")]:
                if current and not tag.startswith("I-"):
                    found.add(" ".join(current))
                    current = []
                if tag != "O":
                    current.append(word)
        return found

    train, dev = entities(BUNDLED_CORPUS), entities(BUNDLED_CORPUS.with_name("sample_ner_dev.conll"))
    assert dev and not train & dev
