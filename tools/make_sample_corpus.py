"""Regenerate featstore/data/sample_ner{,_dev}.conll, the small bundled NER corpus used by the demo.

Sentences are built from templates and invented names, so the file carries no third-party
text. The dev split is held out: its names, places, organisations and sentence templates never
occur in train, so its score measures generalisation, not memory (the demo's example sentence
is held out in the same way). Deterministic: `python tools/make_sample_corpus.py` rewrites the
same files.
"""

import random
from pathlib import Path

PEOPLE = ["Anna Keller", "Tomas Reyes", "Mira Okafor", "Jonas Lind", "Priya Natarajan", "Leo Brandt",
          "Sofia Marchetti", "Daniel Osei", "Yuki Tanaka", "Elena Petrova", "Omar Haddad", "Clara Jensen"]
PLACES = ["Lisbon", "Nairobi", "Oslo", "Montreal", "Kyoto", "Valparaiso", "Gdansk", "Adelaide", "Tunis",
          "New Delhi", "Rotterdam", "Quito"]
ORGS = ["Northwind Traders", "Helios Energy", "the Baltic Rail Authority", "Vireo Labs", "Crescent Bank",
        "the Coastal Research Institute", "Atlas Freight", "Bluefin Media", "Orbital Systems"]
MISC = ["Nordic", "Andean", "Olympic", "Atlantic", "Pacific", "Alpine"]
# Held out of train: dev sentences and the demo's example use only these.
HELD_OUT_PEOPLE = ["Ines Carvalho", "Kwame Mensah", "Hana Novak", "Rafael Ortiz"]
HELD_OUT_PLACES = ["Tbilisi", "Cork", "Windhoek", "Porto Alegre"]
HELD_OUT_ORGS = ["Granite Works", "Solace Pharma", "the Delta Water Board"]
HELD_OUT_MISC = ["Baltic", "Celtic"]
HELD_OUT_TEMPLATES = [
    "{PER} flew from {LOC} to {LOC} for {ORG} .",
    "A spokesman for {ORG} told {PER} that the {MISC} talks in {LOC} had ended .",
    "In {LOC} , {PER} signed a deal with {ORG} .",
]
TEMPLATES = [
    "{PER} visited {LOC} on Monday .",
    "{ORG} opened a new office in {LOC} .",
    "{PER} joined {ORG} as chief engineer last year .",
    "Shares of {ORG} rose 3 percent after {PER} spoke in {LOC} .",
    "The {MISC} summit in {LOC} was chaired by {PER} .",
    "{PER} and {PER} met officials from {ORG} .",
    "Rain delayed the {MISC} games in {LOC} for two hours .",
    "{ORG} said it would hire 200 people in {LOC} .",
    "According to {PER} , {ORG} expects growth in the {MISC} market .",
    "Police in {LOC} questioned {PER} about the incident .",
]


def tagged(kind: str, text: str) -> list[tuple[str, str]]:
    words = text.split()
    if kind == "O":
        return [(word, "O") for word in words]
    # Leading "the" in organisation names stays outside the entity, as in CoNLL-2003.
    if words[0] == "the":
        return [("the", "O"), *tagged(kind, " ".join(words[1:]))]
    return [(word, ("B-" if i == 0 else "I-") + kind) for i, word in enumerate(words)]


def sentence(rng: random.Random, held_out: bool) -> list[tuple[str, str]]:
    pools = ({"PER": HELD_OUT_PEOPLE, "LOC": HELD_OUT_PLACES, "ORG": HELD_OUT_ORGS, "MISC": HELD_OUT_MISC}
             if held_out else {"PER": PEOPLE, "LOC": PLACES, "ORG": ORGS, "MISC": MISC})
    out: list[tuple[str, str]] = []
    for piece in rng.choice(HELD_OUT_TEMPLATES if held_out else TEMPLATES).split():
        if piece.startswith("{") and piece.endswith("}"):
            kind = piece[1:-1]
            out.extend(tagged(kind, rng.choice(pools[kind])))
        else:
            out.extend(tagged("O", piece))
    return out


def write_split(name: str, count: int, seed: int, held_out: bool) -> None:
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        lines.extend(f"{word} {tag}" for word, tag in sentence(rng, held_out))
        lines.append("")
    path = Path(__file__).resolve().parent.parent / "featstore" / "data" / name
    path.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {path}")


def main() -> None:
    write_split("sample_ner.conll", 240, seed=13, held_out=False)
    write_split("sample_ner_dev.conll", 60, seed=14, held_out=True)


if __name__ == "__main__":
    main()
