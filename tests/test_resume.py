"""Killing an extraction (SIGKILL) and re-running the same command resumes it to an identical store."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from featstore import open_store, verify_store
from featstore.cli import main
from featstore.errors import IncompleteStoreError
from featstore.store import format as fmt
from featstore.store.backends import open_backend
from tests.conftest import _random_sentences, write_conll


def _command(model, corpus, out, backend):
    return ["extract", "--model", model, "--corpus", str(corpus), "--out", str(out), "--backend", backend,
            "--max-batch-tokens", "64", "--block-tokens", "96", "--no-progress"]


def _progress(path):
    try:
        backend = open_backend(path)
    except Exception:  # not created yet
        return None
    try:
        return int(backend.read(fmt.PROGRESS)[0]), backend.get_attrs()["counts"]["num_sequences"]
    except Exception:
        return None
    finally:
        backend.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend,suffix", [("zarr", ".zarr"), ("hdf5", ".h5")])
def test_resume_after_sigkill_gives_the_uninterrupted_store(tiny_models, tmp_path, backend, suffix):
    corpus = write_conll(tmp_path / "c.conll", _random_sentences(6000, seed=5))
    killed, reference = tmp_path / f"killed{suffix}", tmp_path / f"reference{suffix}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "featstore.cli", *_command(tiny_models["bert"], corpus,
                                killed, backend)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            progress = _progress(killed)
            if progress and progress[0] > 0:
                break
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        process.kill()
    committed, total = _progress(killed)
    assert 0 < committed < total, "the extraction finished before it could be killed; enlarge the corpus"

    with pytest.raises(IncompleteStoreError, match="incomplete"):
        open_store(killed)
    assert any("incomplete" in problem for problem in verify_store(killed))

    assert main(_command(tiny_models["bert"], corpus, killed, backend)) == 0
    assert main(_command(tiny_models["bert"], corpus, reference, backend)) == 0
    assert verify_store(killed) == []
    a, b = open_backend(killed), open_backend(reference)
    for name in b.array_names():
        np.testing.assert_array_equal(a.read(name), b.read(name), err_msg=name)
    assert a.get_attrs()["fingerprint"] == b.get_attrs()["fingerprint"]
