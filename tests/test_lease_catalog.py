"""Leases and catalog housekeeping on a local (shared) filesystem."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from featstore import Catalog, ExtractConfig, extract
from featstore.cli import main
from featstore.errors import LeaseHeldError, LeaseLostError
from featstore.extraction.corpus import CorpusSpec
from featstore.sharing.lease import Lease, lock_location, read_lease
from featstore.sharing.location import resolve


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lease(target, **fields) -> None:
    now = time.time()
    info = {"owner": "other", "host": socket.gethostname(), "pid": _dead_pid(), "purpose": "featstore extract",
            "acquired_at": now, "expires_at": now + 600, **fields}
    lock_location(target).write_bytes(json.dumps(info).encode())


def test_a_second_lease_waits_then_takes_over_a_released_one(tmp_path):
    target = resolve(str(tmp_path / "s.zarr"))
    first = Lease(target, "first").acquire()
    with pytest.raises(LeaseHeldError, match=r"locked by pid \d+ on .*\(first, since"):
        Lease(target, "second").acquire()
    released = []

    def release_soon() -> None:
        time.sleep(0.5)
        first.release()
        released.append(True)

    threading.Thread(target=release_soon).start()
    second = Lease(target, "second").acquire(wait=30)
    assert released and read_lease(target).purpose == "second"
    second.release()
    assert not lock_location(target).exists()


def test_a_lease_taken_over_is_reported_lost(tmp_path):
    target = resolve(str(tmp_path / "s.zarr"))
    lease = Lease(target, "writer", ttl=0.3).acquire()
    _write_lease(target, pid=1, host="elsewhere")  # someone broke it while this process stalled
    time.sleep(0.5)
    with pytest.raises(LeaseLostError, match="taken over by pid 1 on elsewhere"):
        lease.check()
    lease.release()
    assert lock_location(target).exists()  # not ours any more: left alone


def test_gc_finds_stale_leases_partial_copies_and_abandoned_stores(tiny_models, conll_corpus, tmp_path, capsys):
    root = tmp_path / "root"
    complete = extract(ExtractConfig(out=str(root / "a" / "done.zarr"), model=tiny_models["bert"],
                                     corpus=CorpusSpec(str(conll_corpus)), progress=False)).path
    _write_lease(resolve(str(root / "a" / "gone.zarr")))  # a crashed writer that never created its store
    (root / "b").mkdir()
    (root / "b" / "copy.h5.partial").write_bytes(b"\x89HDF partial")
    live = resolve(str(root / "b" / "busy.h5.partial"))
    live.write_bytes(b"\x89HDF partial")
    _write_lease(resolve(str(root / "b" / "busy.h5")), pid=os.getpid())  # a copy in progress

    found = {entry.location.name: why for entry, why in Catalog(root).garbage()}
    assert found == {"gone.zarr": "stale lease with no store", "copy.h5.partial": "unfinished copy, nobody writing it"}
    assert main(["gc", str(root), "--delete"]) == 0
    capsys.readouterr()
    assert not lock_location(resolve(str(root / "a" / "gone.zarr"))).exists()
    assert not (root / "b" / "copy.h5.partial").exists() and (root / "b" / "busy.h5.partial").exists()
    assert [entry.location.url for entry in Catalog(root).entries() if entry.kind == "zarr"] == [complete]


def _race_to_break(target_url: str, barrier, results, index: int) -> None:
    """One of several processes that all find the same stale lease and try to take it at once."""
    from featstore.errors import LeaseHeldError

    lease = Lease(resolve(target_url), f"racer {index}", ttl=600)
    barrier.wait()
    with contextlib.suppress(LeaseHeldError):
        if lease._try_acquire() is None:
            results.put(index)
    barrier.wait()  # a winner stays alive until every racer has tried (a dead holder's lease is stale at once)


def race_breakers(target_url: str, racers: int = 2) -> list[int]:
    """Start `racers` processes against one expired lease; return the indices of those that got it."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(racers), context.Queue()
    processes = [context.Process(target=_race_to_break, args=(target_url, barrier, results, index))
                 for index in range(racers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    winners = []
    while not results.empty():
        winners.append(results.get())
    return winners


def test_exactly_one_of_two_processes_breaking_the_same_stale_lease_gets_it(tmp_path):
    target = resolve(str(tmp_path / "s.zarr"))
    for trial in range(30):
        _write_lease(target, owner=f"crashed-{trial}", host="elsewhere", expires_at=time.time() - 1)
        winners = race_breakers(target.url)
        assert len(winners) == 1, f"trial {trial}: {len(winners)} processes acquired the lease"
        assert read_lease(target).purpose == f"racer {winners[0]}"
    assert not list(tmp_path.glob("*.break-*"))  # markers are cleared


def test_a_marker_left_by_a_breaker_that_died_is_cleared(tmp_path):
    target = resolve(str(tmp_path / "s.zarr"))
    _write_lease(target, owner="crashed", host="elsewhere", expires_at=time.time() - 1)
    marker = lock_location(target).sibling(".break-crashed")
    marker.write_bytes(json.dumps({"pid": 1, "host": "elsewhere", "expires_at": time.time() - 1}).encode())
    lease = Lease(target, "writer").acquire(wait=5)
    assert read_lease(target).owner == lease.info.owner and not marker.exists()
    lease.release()


def test_a_holder_that_cannot_renew_stops_before_its_lease_can_expire(tmp_path, monkeypatch):
    target = resolve(str(tmp_path / "s.zarr"))
    lease = Lease(target, "writer", ttl=1.2).acquire()
    expires_at = lease.info.expires_at

    def outage(self, data, exclusive=False):
        raise OSError("connection refused")

    monkeypatch.setattr(type(lease.lock), "write_bytes", outage)
    time.sleep(1.2 * 0.75 + 0.2)  # past the safety margin, still before expiry for others
    assert time.time() < expires_at
    with pytest.raises(LeaseLostError, match=r"could not be renewed before it expires.*connection refused"):
        lease.check()
    assert lease._heartbeat is not None and not lease._heartbeat.is_alive()  # stopped renewing: it lost
    monkeypatch.undo()
    lease.release()


def test_a_short_outage_does_not_lose_the_lease(tmp_path, monkeypatch):
    target = resolve(str(tmp_path / "s.zarr"))
    lease = Lease(target, "writer", ttl=3).acquire()
    real_write = type(lease.lock).write_bytes
    failing_until = time.time() + 1.2  # the first renewal (at 1 s) fails, a retry soon after succeeds

    def flaky(self, data, exclusive=False):
        if time.time() < failing_until:
            raise OSError("connection reset")
        return real_write(self, data, exclusive)

    monkeypatch.setattr(type(lease.lock), "write_bytes", flaky)
    time.sleep(3.5)  # longer than the ttl: only renewals keep it
    lease.check()
    assert read_lease(target).expires_at > time.time()
    lease.release()
