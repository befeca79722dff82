"""Leases: one writer per store location, on a local/shared filesystem or on S3.

A lease is a small JSON object next to the store (`STORE.lock`), created with an
exclusive create (O_EXCL locally, `If-None-Match: *` on S3) and renewed by a heartbeat
thread. A crashed holder stops renewing: its lease is stale once it expires, or at once
when the holder ran on this host and its process is gone.

Breaking a stale lease is a compare-and-delete, which neither POSIX nor S3 offers for a
whole object, so breakers first take a marker named after the stale lease's owner
(`STORE.lock.break-OWNER`, the same exclusive create): of all the processes that found the
same stale lease, exactly one gets the marker, checks the lease is still that stale one,
deletes it and competes (by exclusive create) for the new lease. A marker left by a breaker
that died is itself stale after `BREAK_MARKER_TTL_SECONDS`.

A holder that cannot renew (storage outage, a stalled process) or finds its lease taken
over marks it lost a safety margin *before* it could expire for others; writers check that
before every commit and stop with `LeaseLostError`, so two writers never commit at once.
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
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

from ..errors import LeaseHeldError, LeaseLostError
from .location import Location

logger = logging.getLogger(__name__)

LEASE_SUFFIX = ".lock"
BREAK_SUFFIX = ".break-"
DEFAULT_TTL_SECONDS = 60.0
BREAK_MARKER_TTL_SECONDS = 30.0  # breaking takes milliseconds; a marker this old belongs to a dead breaker


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
        self._confirmed_until = 0.0  # expiry of the last renewal known to have been written
        self._last_error: str | None = None
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
        while True:
            now = time.time()
            info = LeaseInfo(uuid.uuid4().hex, socket.gethostname(), os.getpid(), self.purpose, now, now + self.ttl)
            try:
                self.lock.write_bytes(_encode(info), exclusive=True)
                self.info, self._confirmed_until = info, info.expires_at
                return None
            except FileExistsError:
                pass
            holder = read_lease(self.target)
            if holder is None:  # vanished or half-written in between
                return LeaseInfo("?", "?", -1, "unknown", now, now + self.ttl)
            reason = holder.stale_reason(now)
            if reason is None:
                return holder
            if not self._break(holder, reason):
                return read_lease(self.target) or holder  # another process broke it first: it holds it now

    def _break(self, stale: LeaseInfo, reason: str) -> bool:
        """Delete the stale lease `stale` if this process is the one that breaks it (see the module doc)."""
        marker = self.lock.sibling(BREAK_SUFFIX + stale.owner)
        now = time.time()
        try:
            marker.write_bytes(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                           "expires_at": now + BREAK_MARKER_TTL_SECONDS}).encode(), exclusive=True)
        except FileExistsError:
            try:
                left = json.loads(marker.read_bytes()).get("expires_at", 0)
            except (FileNotFoundError, ValueError, AttributeError):
                return False
            if now > float(left):  # its breaker died mid-break: clear it, the next attempt retries
                with contextlib.suppress(FileNotFoundError):
                    marker.remove()
            return False
        try:
            if read_lease(self.target) != stale:
                return False  # renewed or already replaced since we looked
            logger.warning("breaking the stale lease on %s held by pid %d on %s: %s", self.target.url, stale.pid,
                           stale.host, reason)
            with contextlib.suppress(FileNotFoundError):
                self.lock.remove()
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                marker.remove()

    def _renew_loop(self) -> None:
        """Renew every ttl/3; after a failure retry within a second or two. Never dies silently: any failure
        to confirm the lease in time marks it lost (also checked by `check`, in case this thread is stuck in
        a hung storage call)."""
        interval = self.ttl / 3
        while not self._stop.wait(interval):
            try:
                current = read_lease(self.target)
                if current is None or self.info is None or current.owner != self.info.owner:
                    self._mark_lost(f"the lease on {self.target.url} was taken over by "
                                    f"{current.describe() if current else 'nobody (lock removed)'}")
                    return
                expires_at = time.time() + self.ttl
                self.lock.write_bytes(_encode(replace(self.info, expires_at=expires_at)))
                self.info.expires_at = self._confirmed_until = expires_at
                interval = self.ttl / 3
            except Exception as error:  # a storage outage: retry soon, give up before the lease can expire
                self._last_error = f"{type(error).__name__}: {error}"
                logger.warning("could not renew the lease on %s: %s", self.target.url, self._last_error)
                if self._expiring():
                    return
                interval = min(2.0, max(0.1, self.ttl / 30))

    def _expiring(self) -> bool:
        """Past the point where this holder must stop: others may take the lease soon after."""
        if self.lost is None and self.info is not None and time.time() > self._confirmed_until - self.ttl / 4:
            why = f" (last error: {self._last_error})" if self._last_error else ""
            self._mark_lost(f"the lease on {self.target.url} could not be renewed before it expires{why}; another "
                            "writer may take it over")
        return self.lost is not None

    def _mark_lost(self, reason: str) -> None:
        self.lost = reason
        logger.error("%s", reason)

    def check(self) -> None:
        """Raise if the lease was lost (taken over, or not renewed in time): stop before committing anything."""
        self._expiring()
        if self.lost:
            raise LeaseLostError(f"stopped writing {self.target.url}: {self.lost}. Nothing more was committed; "
                                 "re-run the command to resume from the last commit")

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
