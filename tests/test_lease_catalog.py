"""Leases and catalog housekeeping on a local (shared) filesystem."""

from __future__ import annotations

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
