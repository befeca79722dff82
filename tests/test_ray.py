"""Scale-out on a local Ray cluster: same store as a single process, even when an actor is killed mid-share."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from featstore import ExtractConfig, ExtractSpec, extract, open_store, verify_store
from featstore.extraction.corpus import CorpusSpec
from featstore.extraction.encoder import FrozenEncoder
from featstore.extraction.plan import ExtractionPlan
from featstore.extraction.ray_engine import plan_shares
from tests.conftest import _random_sentences, write_conll
from tests.test_service import Service, corpus_file


def test_shares_cover_every_row_once_on_block_boundaries(tiny_models, conll_corpus):
    from featstore.extraction.corpus import load_corpus

    encoder = FrozenEncoder.load(tiny_models["bert"])
    spec = ExtractSpec(out="unused", max_length=48, stride=12, max_batch_tokens=64)
    plan = ExtractionPlan.build(spec, load_corpus(CorpusSpec(str(conll_corpus))), encoder)
    batches = plan.batches(3)
    for block in (16, 50, 10_000):
        shares = plan_shares(plan.token_offsets, batches, 3, block, 5, plan.sequences)
        assert shares[0].start == plan.token_offsets[3] and shares[-1].stop == plan.num_tokens
        assert all(a.stop == b.start and b.start % block == 0 for a, b in itertools.pairwise(shares))
        for share in shares:  # the batches given cover the share exactly as the single-process plan does
            first, last = share.batch_starts[0], share.batch_starts[-1] + sum(s.num_tokens for s in share.batches[-1])
            assert first <= share.start and last >= share.stop


@pytest.mark.slow
def test_ray_extraction_equals_single_process_even_when_an_actor_dies(minilm_path, tmp_path):
    pytest.importorskip("ray")
    corpus = write_conll(tmp_path / "c.conll", _random_sentences(2500, seed=11))
    single = extract(ExtractConfig(out=str(tmp_path / "single.zarr"), model=minilm_path, block_tokens=1024,
                                   corpus=CorpusSpec(str(corpus)), progress=False)).path
    killed: list[int] = []

    def kill_one_writing_actor() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            found = subprocess.run(["pgrep", "-f", "ShareWriter.write"], capture_output=True, text=True).stdout.split()
            if found:
                time.sleep(1.0)  # let it write part of its share first
                os.kill(int(found[0]), signal.SIGKILL)
                killed.append(int(found[0]))
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one_writing_actor, daemon=True)
    killer.start()
    out = tmp_path / "ray.zarr"
    result = subprocess.run([sys.executable, "-m", "featstore.cli", "extract", "--engine", "ray", "--workers", "2",
                             "--model", minilm_path, "--corpus", str(corpus), "--out", str(out), "--block-tokens",
                             "1024", "--no-progress"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"})
    killer.join(timeout=1)
    assert result.returncode == 0, result.stderr[-4000:]
    assert killed, "no Ray actor was caught writing; the retry path was not exercised"
    assert verify_store(str(out)) == []
    with open_store(single) as expected, open_store(str(out)) as actual:
        assert actual.fingerprint == expected.fingerprint
        assert np.array_equal(actual.backend.read("hidden_states"), expected.backend.read("hidden_states"))


@pytest.mark.slow
def test_a_killed_ray_driver_resumes_from_its_committed_blocks(minilm_path, tmp_path):
    """Progress is committed per block during a Ray run, so killing the driver (and its local cluster) loses only
    the blocks past the written prefix; the re-run resumes there and gives the single-process store."""
    pytest.importorskip("ray")
    from featstore.store import format as fmt
    from featstore.store.backends import open_backend

    corpus = write_conll(tmp_path / "c.conll", _random_sentences(1500, seed=21))
    single = extract(ExtractConfig(out=str(tmp_path / "single.zarr"), model=minilm_path, block_tokens=512,
                                   corpus=CorpusSpec(str(corpus)), progress=False)).path
    total = open_store(single).num_sequences
    out = tmp_path / "ray.zarr"
    command = [sys.executable, "-m", "featstore.cli", "extract", "--engine", "ray", "--workers", "2", "--model",
               minilm_path, "--corpus", str(corpus), "--out", str(out), "--block-tokens", "512", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    committed, deadline = 0, time.monotonic() + 300
    try:
        while driver.poll() is None and time.monotonic() < deadline and not 0 < committed < total:
            time.sleep(0.05)
            if (out / "progress" / "zarr.json").exists():
                backend = open_backend(str(out))
                committed = int(backend.read(fmt.PROGRESS)[0])
                backend.close()
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray processes it started: a crash
        driver.wait()
    assert 0 < committed < total, f"no mid-run progress was seen (committed {committed} of {total})"
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming {out}" in resumed.stderr
    assert verify_store(str(out)) == []
    with open_store(single) as expected, open_store(str(out)) as actual:
        assert np.array_equal(actual.backend.read("hidden_states"), expected.backend.read("hidden_states"))


@pytest.mark.slow
def test_the_service_runs_jobs_on_ray(tmp_path, tiny_models):
    pytest.importorskip("ray")
    service = Service(tmp_path, str(Path(tiny_models["bert"]).parent), extra_args=("--engine", "ray")).start()
    try:
        corpus = corpus_file(service, "c.conll", 300, seed=12)
        job = service.wait(service.submit(corpus=corpus, model=tiny_models["bert"])["id"])
        assert job["status"] == "succeeded", job
        assert verify_store(job["store"]) == []
        log = (tmp_path / "state" / "logs" / f"{job['id']}.log").read_text()
        assert "ray: " in log and "CPU actors" in log
    finally:
        service.stop()
