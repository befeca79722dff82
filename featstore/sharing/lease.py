"""Leases: one writer per store location, on a local/shared filesystem or on S3.

A lease is a small JSON object next to the store (`STORE.lock`), created with an
exclusive create (O_EXCL locally, `If-None-Match: *` on S3) and renewed by a heartbeat
thread. A crashed holder stops renewing: its lease is stale once it expires, or at once
when the holder ran on this host and its process is gone. A stale lease is broken and
taken over; a holder that finds its lease taken over reports it lost, and writers check
that before every commit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from ..errors import LeaseHeldError, LeaseLostError
from .location import Location

logger = logging.getLogger(__name__)

LEASE_SUFFIX = ".lock"
DEFAULT_TTL_SECONDS = 60.0


@dataclass
class LeaseInfo:
    owner: str
    host: str
    pid: int
    purpose: str
    acquired_at: float
    expires_at: float

    def stale_reason(self, now: float | None = None) -> str | None:
        """Why this lease no longer protects anything, or None while its holder is alive."""
        now = time.time() if now is None else now
        if now > self.expires_at:
            return f"it expired at {_iso(self.expires_at)} (its holder stopped renewing it)"
        if self.host == socket.gethostname() and not _process_alive(self.pid):
            return f"process {self.pid} on this host is gone"
        return None

    def describe(self) -> str:
        return (f"pid {self.pid} on {self.host} ({self.purpose}, since {_iso(self.acquired_at)}; "
                f"lease expires {_iso(self.expires_at)} unless renewed)")


def lock_location(target: Location) -> Location:
    return target.sibling(LEASE_SUFFIX)


def read_lease(target: Location) -> LeaseInfo | None:
    """The lease on `target`, or None when there is none (or it is unreadable: half-written)."""
    try:
        return LeaseInfo(**json.loads(lock_location(target).read_bytes()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


class Lease:
    """`with Lease(location, "extract"):` holds the lease on `location` for the block's duration."""

    def __init__(self, target: Location, purpose: str, ttl: float = DEFAULT_TTL_SECONDS) -> None:
        self.target, self.purpose, self.ttl = target, purpose, ttl
        self.lock = lock_location(target)
        self.info: LeaseInfo | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self, wait: float = 0.0) -> Lease:
        """Take the lease, breaking a stale one; wait up to `wait` seconds for a live holder to finish."""
        deadline = time.monotonic() + wait
        while True:
            holder = self._try_acquire()
            if holder is None:
                break
            if time.monotonic() >= deadline:
                raise LeaseHeldError(f"{self.target.url} is locked by {holder.describe()}. Wait for it to finish "
                                "(--lock-wait SECONDS); if that process is gone, its lease goes stale on its own "
                                f"(remove {self.lock.url} to break it sooner)")
            time.sleep(min(1.0, max(0.05, self.ttl / 20)))
        self._heartbeat = threading.Thread(target=self._renew_loop, name="featstore-lease", daemon=True)
        self._heartbeat.start()
        return self

    def _try_acquire(self) -> LeaseInfo | None:
        """None when acquired, else the live holder."""
        now = time.time()
        info = LeaseInfo(uuid.uuid4().hex, socket.gethostname(), os.getpid(), self.purpose, now, now + self.ttl)
        try:
            self.lock.write_bytes(_encode(info), exclusive=True)
            self.info = info
            return None
        except FileExistsError:
            pass
        holder = read_lease(self.target)
        if holder is None:  # vanished or half-written in between; try again
            return LeaseInfo("?", "?", -1, "unknown", now, now + self.ttl)
        reason = holder.stale_reason(now)
        if reason is None:
            return holder
        logger.warning("breaking the stale lease on %s held by pid %d on %s: %s", self.target.url, holder.pid,
                       holder.host, reason)
        with contextlib.suppress(FileNotFoundError):
            self.lock.remove()
        return self._try_acquire()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            current = read_lease(self.target)
            if current is None or self.info is None or current.owner != self.info.owner:
                self.lost = (f"the lease on {self.target.url} was taken over by "
                             f"{current.describe() if current else 'nobody (lock removed)'}")
                logger.error("%s", self.lost)
                return
            self.info.expires_at = time.time() + self.ttl
            try:
                self.lock.write_bytes(_encode(self.info))
            except OSError as error:  # a transient storage error: the next beat retries before expiry
                logger.warning("could not renew the lease on %s: %s", self.target.url, error)

    def check(self) -> None:
        """Raise if the lease was lost (taken over after this process stalled past its expiry)."""
        if self.lost:
            raise LeaseLostError(f"stopped writing {self.target.url}: {self.lost}")

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        current = read_lease(self.target)
        if current is not None and self.info is not None and current.owner == self.info.owner:
            with contextlib.suppress(FileNotFoundError):
                self.lock.remove()
        self.info = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _encode(info: LeaseInfo) -> bytes:
    return json.dumps(asdict(info)).encode()


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
