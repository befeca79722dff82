"""Every code block of the README runs as written (blocks marked `<!-- not run by tests/test_readme.py: WHY -->`
excepted, each saying why and which test covers it instead), in a fresh directory holding what the text
assumes: the demo's stores, and train/dev/test corpora and sentences to predict."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from featstore.extraction.corpus import BUNDLED_CORPUS

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- not run by tests/test_readme.py: (?P<why>.*?)-->\s*)?```(?P<lang>\w+)\n(?P<code>.*?)```",
                   re.DOTALL)


def readme_blocks() -> list[tuple[str, str, str | None]]:
    """(language, code, why it is not run or None) for every fenced block, in order."""
    return [(match["lang"], match["code"], match["why"]) for match in BLOCK.finditer(README.read_text())]


def test_every_block_is_run_or_says_why_not():
    blocks = readme_blocks()
    assert len(blocks) == README.read_text().count("```") // 2
    assert all(lang in ("bash", "python") for lang, _, _ in blocks)
    assert all(why.strip() for _, _, why in blocks if why is not None)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    shutil.copy(BUNDLED_CORPUS, root / "train.conll")
    shutil.copy(BUNDLED_CORPUS.with_name("sample_ner_dev.conll"), root / "dev.conll")
    shutil.copy(BUNDLED_CORPUS.with_name("sample_ner_dev.conll"), root / "test.conll")
    (root / "sentences.jsonl").write_text('{"text": "Clara Jensen flew to Oslo ."}\n'
                                          '{"words": ["Atlas", "Freight", "hired", "Tomas", "."]}\n')
    subprocess.run([sys.executable, "-m", "featstore.cli", "demo"], cwd=root, check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return root


@pytest.mark.slow
@pytest.mark.parametrize("index", [index for index, (_, _, why) in enumerate(readme_blocks()) if why is None])
def test_readme_block_runs(workdir, index):
    lang, code, _ = readme_blocks()[index]
    command = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"README block {index} ({lang}) failed:\n{code}\n{result.stderr[-3000:]}"
