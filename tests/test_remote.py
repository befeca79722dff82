"""Remote stores against a real S3 server (SeaweedFS on loopback): extract, stream-train, push/pull,
catalog, integrity, concurrency and read-only access."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import s3fs

from featstore import ExtractConfig, extract, open_store, verify_store
from featstore.cli import main
from featstore.errors import ConfigError, IncompleteStoreError, LeaseHeldError, StoreError
from featstore.extraction.corpus import CorpusSpec
from featstore.sharing.catalog import Catalog
from featstore.sharing.lease import Lease, lock_location
from featstore.sharing.location import resolve
from featstore.sharing.transfer import copy_store
from featstore.store import format as fmt
from featstore.store.backends import detect_backend, open_backend
from heads.cli import main as heads_main
from tests.conftest import _random_sentences, write_conll
from tests.s3server import READER, environment_with

pytestmark = pytest.mark.slow


def _extract(model: str, corpus: Path, out: str | None = None, **options) -> str:
    options.setdefault("block_tokens", 128)
    options.setdefault("chunk_tokens", 32)
    return extract(ExtractConfig(out=out, model=model, corpus=CorpusSpec(str(corpus)), progress=False,
                                 **options))


def _s3() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_extract_to_s3_equals_local_extraction(s3_root, tiny_models, conll_corpus, tmp_path):
    local = _extract(tiny_models["bert"], conll_corpus, str(tmp_path / "local.zarr")).path
    remote = _extract(tiny_models["bert"], conll_corpus, f"{s3_root}/stores/remote.zarr").path
    assert remote == f"{s3_root}/stores/remote.zarr"
    assert verify_store(remote) == []
    with open_store(local) as expected, open_store(remote) as actual:
        assert actual.fingerprint == expected.fingerprint and actual.status == "complete"
        for row in range(len(expected)):
            assert np.array_equal(actual.sequence(row).hidden_states, expected.sequence(row).hidden_states)
            assert np.array_equal(actual.sequence(row, layers=[0, 2]).hidden_states,
                                  expected.sequence(row, layers=[0, 2]).hidden_states)
        streamed = {item.index: item.hidden_states for item in actual.iter_epoch(seed=3, span_bytes=4096)}
        assert sorted(streamed) == list(range(len(expected)))
        assert np.array_equal(streamed[5], expected.sequence(5).hidden_states)
    # HDF5 needs in-place file updates: refused on object storage with what to do instead
    with pytest.raises(StoreError, match="extract locally and `featstore push`"):
        _extract(tiny_models["bert"], conll_corpus, f"{s3_root}/stores/remote.h5", backend="hdf5")


def test_train_a_head_streaming_from_s3(s3_root, tiny_models, conll_corpus, tmp_path):
    train = _extract(tiny_models["bert"], conll_corpus, f"{s3_root}/train.zarr").path
    assert heads_main(["train", "--store", train, "--eval-store", train, "--out", str(tmp_path / "head"),
                       "--head", "linear", "--layers", "-1", "--epochs", "2", "--no-progress"]) == 0
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    with open_store(train) as store:
        assert config["store_fingerprint"] == store.fingerprint
    records = [json.loads(line) for line in (tmp_path / "head" / "metrics.jsonl").read_text().splitlines()]
    assert [record["event"] for record in records].count("epoch") == 2


@pytest.mark.parametrize("backend,name", [("zarr", "s.zarr"), ("hdf5", "s.h5")])
def test_push_pull_round_trip_is_byte_identical(s3_root, tiny_models, conll_corpus, tmp_path, backend, name):
    local = _extract(tiny_models["bert"], conll_corpus, str(tmp_path / "src" / name), backend=backend).path
    assert main(["push", local, f"{s3_root}/shared/", "--no-progress"]) == 0
    assert verify_store(f"{s3_root}/shared/{name}") == []
    assert main(["pull", f"{s3_root}/shared/{name}", str(tmp_path / "back") + "/", "--no-progress"]) == 0
    source, pulled = Path(local), tmp_path / "back" / name
    if backend == "zarr":
        assert _files(pulled) == _files(source)
    else:
        assert pulled.read_bytes() == source.read_bytes()
    assert not list((tmp_path / "back").glob("*.partial")) and not list((tmp_path / "back").glob("*.lock"))
    # pushing again is a verified no-op
    assert main(["push", local, f"{s3_root}/shared/", "--no-progress"]) == 0


def test_an_interrupted_copy_never_looks_complete(s3_root, tiny_models, conll_corpus, tmp_path, monkeypatch):
    local = _extract(tiny_models["bert"], conll_corpus, str(tmp_path / "s.zarr")).path
    target = f"{s3_root}/copy/s.zarr"
    calls = []
    original = type(resolve(target)).write_bytes

    def failing_write(self, data, exclusive=False):
        calls.append(self.path)
        if "/hidden_states/c/" in self.path and len([c for c in calls if "/hidden_states/c/" in c]) > 2:
            raise OSError("network went away")
        return original(self, data, exclusive)

    monkeypatch.setattr(type(resolve(target)), "write_bytes", failing_write)
    with pytest.raises(OSError, match="network went away"):
        copy_store(local, target, progress=False)
    monkeypatch.undo()
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        open_store(target)
    assert any("incomplete" in problem for problem in verify_store(target))
    garbage = Catalog(s3_root).garbage()
    assert [entry.location.url for entry, _ in garbage] == [target]
    copy_store(local, target, progress=False)  # re-running completes it
    assert verify_store(target) == [] and Catalog(s3_root).garbage() == []


def test_catalog_reuses_a_complete_store_and_misses_on_different_content(s3_root, tiny_models, conll_corpus,
                                                                          capsys):
    root = f"{s3_root}/catalog"
    first = _extract(tiny_models["bert"], conll_corpus, catalog=root)
    assert first.path.startswith(f"{root}/tiny-bert/train-") and first.path.endswith(".zarr")
    assert not first.reused
    with open_store(first.path) as store:
        completed = store.manifest.extraction.completed_at
    hit = _extract(tiny_models["bert"], conll_corpus, catalog=root, out=f"{s3_root}/elsewhere.zarr")
    assert hit.reused and hit.path == first.path and hit.encode_seconds == 0
    assert not resolve(f"{s3_root}/elsewhere.zarr").exists()
    with open_store(first.path) as store:
        assert store.manifest.extraction.completed_at == completed
    miss = _extract(tiny_models["bert"], conll_corpus, catalog=root, layers=[-1])
    assert not miss.reused and miss.path != first.path and miss.fingerprint != first.fingerprint

    assert main(["ls", root, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(row["fingerprint"] for row in rows) == sorted([first.fingerprint, miss.fingerprint])
    for row in rows:
        assert row["status"] == "complete" and row["encoder"] == "tiny-bert" and row["corpus"] == "train"
        assert row["tokens"] == first.num_tokens and row["size_bytes"] > 0 and row["created"]
    assert {tuple(row["layers"]) for row in rows} == {(0, 1, 2), (2,)}
    assert main(["ls", root]) == 0
    table = capsys.readouterr().out
    assert "FINGERPRINT" in table and first.fingerprint[:12] in table and "tiny-bert" in table


def _flip_byte(fs: s3fs.S3FileSystem, path: str, position: int) -> None:
    data = bytearray(fs.cat_file(path))
    data[position] ^= 0xFF
    fs.pipe_file(path, bytes(data))


def test_verify_names_corrupted_truncated_and_missing_objects_on_s3(s3_root, tiny_models, conll_corpus, capsys):
    store = _extract(tiny_models["bert"], conll_corpus, f"{s3_root}/v.zarr").path
    fs, base = _s3(), store[len("s3://"):]
    assert main(["verify", store]) == 0
    capsys.readouterr()

    _flip_byte(fs, f"{base}/hidden_states/c/1/0/0", 100)
    assert main(["verify", store]) == 1
    assert "hidden_states block 1 (rows 128..256, object hidden_states/c/1/0/0) does not match its checksum" \
        in capsys.readouterr().err
    _flip_byte(fs, f"{base}/hidden_states/c/1/0/0", 100)  # undo
    assert verify_store(store) == []

    fs.pipe_file(f"{base}/hidden_states/c/2/0/0", fs.cat_file(f"{base}/hidden_states/c/2/0/0")[:-500])
    problems = verify_store(store)
    assert any("hidden_states block 2" in problem for problem in problems), problems

    fs.rm(f"{base}/hidden_states/c/3/0/0")
    problems = verify_store(store, deep=False)
    assert any("hidden_states block 3 (tokens 384..505, object hidden_states/c/3/0/0) is missing" in problem
               for problem in problems), problems
    # a damaged store is not offered for reuse by the catalog
    with open_store(store) as opened:
        assert Catalog(s3_root).find_complete(opened.fingerprint) is None


def test_verify_names_a_flipped_byte_in_a_local_hdf5_store(tiny_models, conll_corpus, tmp_path):
    store = _extract(tiny_models["bert"], conll_corpus, str(tmp_path / "v.h5"), backend="hdf5").path
    backend = open_backend(store)
    offset = backend.handle[fmt.HIDDEN_STATES].id.get_offset()
    row_bytes = backend.handle[fmt.HIDDEN_STATES].dtype.itemsize * int(np.prod(backend.shape(fmt.HIDDEN_STATES)[1:]))
    backend.close()
    with open(store, "r+b") as handle:
        handle.seek(offset + 200 * row_bytes + 7)
        value = handle.read(1)
        handle.seek(offset + 200 * row_bytes + 7)
        handle.write(bytes([value[0] ^ 0x01]))
    problems = verify_store(store)
    assert "hidden_states block 1 (rows 128..256) does not match its checksum (corrupted)" in problems
    # the chunk checksums that readers use (both levels) name the same damaged rows
    assert {problem.split(" (tokens ")[1].split(")")[0] for problem in problems if " chunk " in problem} == \
        {"128..256"}
    assert {problem.rsplit("(", 1)[1] for problem in problems if " chunk " in problem} == \
        {"hidden_checksums)", "hidden_span_checksums)"}


def test_half_written_store_is_refused_listed_and_collected(s3_root, tiny_models, conll_corpus, capsys):
    store = _extract(tiny_models["bert"], conll_corpus, f"{s3_root}/cat/half.zarr").path
    backend = open_backend(store, "r+")
    attrs = backend.get_attrs()
    backend.set_attrs({**attrs, "status": fmt.STATUS_WRITING})
    backend.write(fmt.PROGRESS, 0, np.array([3, 60], np.int64))
    backend.close()
    with pytest.raises(IncompleteStoreError, match=r"incomplete \(3 of 40 sequences committed\)"):
        open_store(store)
    assert open_store(store, allow_incomplete=True).num_sequences == 40  # the explicit debugging override
    assert main(["verify", store]) == 1
    assert "incomplete: status 'writing', 3 of 40 sequences committed" in capsys.readouterr().err
    assert main(["ls", f"{s3_root}/cat"]) == 0
    assert "writing" in capsys.readouterr().out
    # a store someone is still writing is never garbage
    with Lease(resolve(store), "test writer"):
        assert Catalog(f"{s3_root}/cat").garbage() == []
    assert main(["gc", f"{s3_root}/cat"]) == 0
    assert "abandoned" in capsys.readouterr().out
    assert main(["gc", f"{s3_root}/cat", "--delete"]) == 0
    # (SeaweedFS may list the emptied prefix for a moment; S3 has no directories)
    assert detect_backend(store) is None and Catalog(f"{s3_root}/cat").entries() == []


def test_a_live_lease_blocks_a_second_writer_and_a_stale_one_is_recovered(s3_root, tiny_models, conll_corpus):
    target = resolve(f"{s3_root}/locked.zarr")
    with Lease(target, "another extraction"), pytest.raises(LeaseHeldError, match=r"locked by pid \d+ on .*another "):
        _extract(tiny_models["bert"], conll_corpus, target.url)
    # a crashed holder: its process is gone (same host) ...
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    info = {"owner": "crashed", "host": socket.gethostname(), "pid": dead.pid, "purpose": "featstore extract",
            "acquired_at": time.time(), "expires_at": time.time() + 600}
    lock_location(target).write_bytes(json.dumps(info).encode())
    assert _extract(tiny_models["bert"], conll_corpus, target.url).path == target.url
    # ... or on another host, it stopped renewing and its lease expired
    lock_location(target).write_bytes(json.dumps({**info, "host": "elsewhere", "expires_at": 0}).encode())
    assert _extract(tiny_models["bert"], conll_corpus, target.url).already_complete
    assert not lock_location(target).exists()


def test_two_concurrent_extractions_of_the_same_content(s3_server, s3_root, tiny_models, tmp_path):
    corpus = write_conll(tmp_path / "c.conll", _random_sentences(3000, seed=9))
    root = f"{s3_root}/team"
    command = [sys.executable, "-m", "featstore.cli", "extract", "--model", tiny_models["bert"], "--corpus",
               str(corpus), "--catalog", root, "--lock-wait", "300", "--block-tokens", "2048", "--no-progress"]
    env = environment_with({"HF_HUB_OFFLINE": "1"})
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in outputs]
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1
    logs = " ".join(err for _, err in outputs)
    assert logs.count("extraction complete") == 1
    assert "already complete" in logs or "reusing" in logs
    assert verify_store(paths.pop()) == []
    assert [entry.status for entry in Catalog(root).entries()] == ["complete"]


def _reader_env(s3_server) -> dict[str, str]:
    return environment_with({**s3_server.env(READER), "HF_HUB_OFFLINE": "1"})


def test_read_only_credentials_can_read_but_not_write(s3_server, s3_root, tiny_models, conll_corpus, tmp_path):
    store = _extract(tiny_models["bert"], conll_corpus, f"{s3_root}/ro/s.zarr").path
    env = _reader_env(s3_server)

    def featstore(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "featstore.cli", *args], env=env, capture_output=True,
                              text=True, timeout=300)

    for args in (("verify", store), ("info", store), ("ls", f"{s3_root}/ro"), ("pull", store, str(tmp_path) + "/")):
        result = featstore(*args)
        assert result.returncode == 0, (args, result.stderr)
    assert (tmp_path / "s.zarr" / "zarr.json").is_file()
    streamed = subprocess.run(
        [sys.executable, "-c", "import featstore, sys; s = featstore.open_store(sys.argv[1]); "
         "print(sum(1 for _ in s.iter_epoch()))", store], env=env, capture_output=True, text=True, timeout=300)
    assert streamed.stdout.strip() == "40", streamed.stderr
    denied = featstore("extract", "--model", tiny_models["bert"], "--corpus", str(conll_corpus), "--out",
                       f"{s3_root}/ro/new.zarr", "--no-progress")
    assert denied.returncode == 2 and "permission denied" in denied.stderr
    assert not resolve(f"{s3_root}/ro/new.zarr").exists()


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(path): (path.stat().st_mtime_ns, path.stat().st_size) for path in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name,backend", [("s.zarr", "zarr"), ("s.h5", "hdf5")])
def test_reading_a_local_store_never_writes(tiny_models, conll_corpus, tmp_path, capsys, name, backend):
    store = _extract(tiny_models["bert"], conll_corpus, str(tmp_path / "shared" / name), backend=backend).path
    before = _snapshot(tmp_path / "shared")
    with open_store(store) as opened:
        assert sum(1 for _ in opened.iter_epoch()) == 40
    assert verify_store(store) == []
    for command in (["info", store], ["ls", str(tmp_path / "shared")], ["gc", str(tmp_path / "shared")]):
        assert main(command) == 0
    capsys.readouterr()
    assert _snapshot(tmp_path / "shared") == before


def test_reading_from_a_read_only_mount(tiny_models, conll_corpus, tmp_path):
    _extract(tiny_models["bert"], conll_corpus, str(tmp_path / "src" / "s.zarr"))
    mount = tmp_path / "ro"
    mount.mkdir()
    bound = subprocess.run(["mount", "--bind", "-o", "ro", str(tmp_path / "src"), str(mount)], capture_output=True)
    if bound.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {bound.stderr.decode().strip()}")
    try:
        with pytest.raises(OSError):
            (mount / "probe").write_text("x")
        assert verify_store(str(mount / "s.zarr")) == []
        with open_store(str(mount / "s.zarr")) as opened:
            assert sum(1 for _ in opened.iter_epoch()) == 40
        assert main(["ls", str(mount)]) == 0
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_storage_options_from_the_environment_are_validated(monkeypatch):
    monkeypatch.setenv("FEATSTORE_STORAGE_OPTIONS", "{not json")
    with pytest.raises(ConfigError, match="FEATSTORE_STORAGE_OPTIONS is not valid JSON"):
        resolve("s3://bucket/x.zarr")
    monkeypatch.setenv("FEATSTORE_STORAGE_OPTIONS", '["a list"]')
    with pytest.raises(ConfigError, match="must be a JSON object"):
        resolve("s3://bucket/x.zarr")


def test_exactly_one_of_two_processes_breaking_the_same_stale_lease_on_s3_gets_it(s3_root):
    from tests.test_lease_catalog import race_breakers

    target = resolve(f"{s3_root}/raced.zarr")
    for trial in range(10):
        info = {"owner": f"crashed-{trial}", "host": "elsewhere", "pid": 1, "purpose": "featstore extract",
                "acquired_at": 0, "expires_at": 0}
        lock_location(target).write_bytes(json.dumps(info).encode())
        winners = race_breakers(target.url)
        assert len(winners) == 1, f"trial {trial}: {len(winners)} processes acquired the lease"
        assert json.loads(lock_location(target).read_bytes())["purpose"] == f"racer {winners[0]}"


def test_an_s3_outage_mid_lease_stops_the_writer_before_a_second_one_can_take_over(s3_server, s3_root):
    from featstore.errors import LeaseLostError
    from tests.s3server import CuttableProxy

    proxy = CuttableProxy(s3_server.endpoint)
    options = {"client_kwargs": {"endpoint_url": proxy.endpoint}, "skip_instance_cache": True,
               "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}}}
    target = resolve(f"{s3_root}/outage.zarr", options)
    first = Lease(target, "first writer", ttl=3).acquire()
    proxy.cut()
    try:
        time.sleep(3)  # a 4 s outage in all: the lease cannot be renewed before it would expire
        with pytest.raises(LeaseLostError, match="could not be renewed before it expires"):
            first.check()
        time.sleep(1)
    finally:
        proxy.restore()
    time.sleep(0.5)
    second = Lease(resolve(f"{s3_root}/outage.zarr"), "second writer", ttl=60).acquire(wait=10)
    with pytest.raises(LeaseLostError):  # the first stays stopped: it never writes again
        first.check()
    assert json.loads(lock_location(target).read_bytes())["purpose"] == "second writer"
    second.release()
    first.release()
    proxy.cut()
