"""The extraction service's persistent job queue and its workers.

Jobs live in SQLite (one file in the service's state directory), so queued jobs survive a
restart; jobs that were running when the service died are queued again at start-up and
resume through the store's own resume logic. A worker writes each job's full `ExtractSpec`
to a file and runs it as a child `featstore extract --spec FILE --status-file F` process:
cancelling is terminating it, a GPU is pinned with CUDA_VISIBLE_DEVICES, and the child
reports progress through the status file (status.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..extraction.spec import ExtractSpec
from ..store.format import canonical_json
from .confine import copy_confined

logger = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)
POLL_SECONDS = 0.25
TERMINATE_GRACE_SECONDS = 10
JOB_LOCK_WAIT_SECONDS = 86400.0  # a job waits for another writer of its store rather than fail


def job_key(spec: dict[str, Any]) -> str:
    """Identical requests have identical keys (used to coalesce concurrent submissions)."""
    return hashlib.sha256(canonical_json(spec)).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Job:
    id: str
    key: str
    spec: dict[str, Any]
    status: str
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    store: str | None = None
    reused: bool = False
    progress: dict[str, Any] | None = None
    error: str | None = None
    cancel_requested: bool = False

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("key")
        data.pop("cancel_requested")
        progress = self.progress or {}
        rate, total, done = progress.get("tokens_per_second") or 0, progress.get("tokens_total"), progress.get(
            "tokens_done")
        if self.status == RUNNING and rate and total is not None and done is not None:
            progress["eta_seconds"] = round((total - done) / rate, 1)
        data["progress"] = progress or None
        return data


class JobQueue:
    """SQLite-backed queue; safe to share between the API's threads and the workers."""

    COLUMNS = ("id", "key", "spec", "status", "created_at", "started_at", "finished_at", "store", "reused",
               "progress", "error", "cancel_requested")

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.lock = threading.Lock()
        self.db.execute("""CREATE TABLE IF NOT EXISTS jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, key TEXT NOT NULL, spec TEXT NOT NULL,
            status TEXT NOT NULL, created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT, store TEXT,
            reused INTEGER NOT NULL DEFAULT 0, progress TEXT, error TEXT,
            cancel_requested INTEGER NOT NULL DEFAULT 0)""")

    def _rows(self, where: str = "", args: tuple = ()) -> list[Job]:
        with self.lock:
            rows = self.db.execute(f"SELECT {', '.join(self.COLUMNS)} FROM jobs {where} ORDER BY seq", args).fetchall()
        jobs = []
        for row in rows:
            values = dict(zip(self.COLUMNS, row))
            values["spec"] = json.loads(values["spec"])
            values["progress"] = json.loads(values["progress"]) if values["progress"] else None
            values["reused"], values["cancel_requested"] = bool(values["reused"]), bool(values["cancel_requested"])
            jobs.append(Job(**values))
        return jobs

    def submit(self, spec: dict[str, Any]) -> tuple[Job, bool]:
        """A new queued job, or the active job with the same request (coalesced = True)."""
        key = job_key(spec)
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                active = self.db.execute("SELECT id FROM jobs WHERE key = ? AND status IN (?, ?) ORDER BY seq LIMIT 1",
                                         (key, *ACTIVE)).fetchone()
                if active is None:
                    job_id = uuid.uuid4().hex[:16]
                    self.db.execute("INSERT INTO jobs (id, key, spec, status, created_at) VALUES (?, ?, ?, ?, ?)",
                                    (job_id, key, json.dumps(spec), QUEUED, _now()))
                else:
                    job_id = active[0]
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        job = self.get(job_id)
        assert job is not None
        return job, active is not None

    def get(self, job_id: str) -> Job | None:
        found = self._rows("WHERE id = ?", (job_id,))
        return found[0] if found else None

    def list(self) -> list[Job]:
        return self._rows()

    def claim(self) -> Job | None:
        """Atomically move the oldest queued job to running."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                row = self.db.execute("SELECT id FROM jobs WHERE status = ? ORDER BY seq LIMIT 1",
                                      (QUEUED,)).fetchone()
                if row is not None:
                    self.db.execute("UPDATE jobs SET status = ?, started_at = ? WHERE id = ?",
                                    (RUNNING, _now(), row[0]))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return self.get(row[0]) if row else None

    def update(self, job_id: str, **values: Any) -> None:
        encoded = {name: json.dumps(value) if name == "progress" else value for name, value in values.items()}
        assignments = ", ".join(f"{name} = ?" for name in encoded)
        with self.lock:
            self.db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*encoded.values(), job_id))

    def cancel(self, job_id: str) -> Job | None:
        """Queued: cancelled now. Running: flagged; its worker stops it. Finished: unchanged."""
        with self.lock:
            self.db.execute("UPDATE jobs SET status = ?, finished_at = ? WHERE id = ? AND status = ?",
                            (CANCELLED, _now(), job_id, QUEUED))
            self.db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = ?", (job_id, RUNNING))
        return self.get(job_id)

    def requeue_interrupted(self) -> list[str]:
        """At start-up: jobs left running by a previous service process go back to the queue."""
        interrupted = [job.id for job in self._rows("WHERE status = ?", (RUNNING,))]
        with self.lock:
            self.db.execute("UPDATE jobs SET status = ?, started_at = NULL WHERE status = ?", (QUEUED, RUNNING))
        return interrupted

    def close(self) -> None:
        with self.lock:
            self.db.close()


@dataclass(frozen=True)
class InputRoots:
    """Where a job's inputs may be read from (resolved directories)."""

    corpus: list[Path]
    model: list[Path]


def job_extract_spec(spec: dict[str, Any], catalog: str, engine: dict[str, Any]) -> ExtractSpec:
    """The full extraction spec a job runs: the client's (validated, confined) options plus what the service
    decides: its catalog, its engine, no progress bar, and waiting for a writer of the same store."""
    return ExtractSpec.from_dict({**spec, "catalog": catalog, "progress": False, "lock_wait": JOB_LOCK_WAIT_SECONDS,
                                  **engine}, where="job spec")


def extract_command(spec_file: Path, status_file: Path) -> list[str]:
    """The child process that runs a job: `featstore extract --spec FILE`."""
    return [sys.executable, "-m", "featstore.cli", "extract", "--spec", str(spec_file), "--status-file",
            str(status_file)]


class Worker(threading.Thread):
    """Runs queued jobs one at a time, each in a child process; `device` pins a GPU (None: CPU or Ray, whose
    actors take the cluster's GPUs)."""

    def __init__(self, queue: JobQueue, catalog: str, state_dir: Path, device: int | None, stop: threading.Event,
                 engine: dict[str, Any] | None = None, roots: InputRoots | None = None) -> None:
        super().__init__(name=f"featstore-worker-{'cpu' if device is None else device}", daemon=True)
        self.queue, self.catalog, self.state_dir, self.device, self.stop = queue, catalog, state_dir, device, stop
        self.engine = engine or {}
        self.roots = roots

    def run(self) -> None:
        while not self.stop.is_set():
            job = self.queue.claim()
            if job is None:
                self.stop.wait(POLL_SECONDS)
                continue
            try:
                self._run(job)
            except Exception as error:  # a worker outlives any one job
                logger.exception("job %s failed in the worker", job.id)
                self.queue.update(job.id, status=FAILED, finished_at=_now(), error=f"{type(error).__name__}: {error}")

    def _run(self, job: Job) -> None:
        status_file = self.state_dir / "status" / f"{job.id}.json"
        status_file.parent.mkdir(parents=True, exist_ok=True)
        log_path = self.state_dir / "logs" / f"{job.id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ}
        if self.device is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.device)
        logger.info("job %s: starting on %s", job.id, "cpu" if self.device is None else f"cuda:{self.device}")
        spec_file = self.state_dir / "specs" / f"{job.id}.json"
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        inputs = self.state_dir / "inputs" / job.id
        try:
            spec = self._confined_inputs(job.spec, inputs)
        except (ConfigError, OSError) as error:
            shutil.rmtree(inputs, ignore_errors=True)
            logger.warning("job %s: refused its inputs: %s", job.id, error)
            self.queue.update(job.id, status=FAILED, finished_at=_now(),
                              error="an input lies outside the service's roots or cannot be read; nothing was read")
            return
        try:
            self._run_child(job, spec, spec_file, status_file, log_path, env)
        finally:
            shutil.rmtree(inputs, ignore_errors=True)

    def _confined_inputs(self, spec: dict[str, Any], inputs: Path) -> dict[str, Any]:
        """The job's spec reading private copies of its corpus and local model, made through descriptors
        checked to lie under the roots at the moment they are read (confine.py)."""
        if self.roots is None:
            return spec
        spec = dict(spec)
        corpus = Path(spec["corpus"])
        spec["corpus"] = str(copy_confined(corpus, self.roots.corpus, inputs / "corpus" / corpus.name))
        model = spec.get("model")
        if model and Path(model).is_absolute():
            spec["model"] = str(copy_confined(model, self.roots.model, inputs / "model" / Path(model).name))
        return spec

    def _run_child(self, job: Job, spec: dict[str, Any], spec_file: Path, status_file: Path, log_path: Path,
                   env: dict[str, str]) -> None:
        job_extract_spec(spec, self.catalog, self.engine).save(spec_file)
        with log_path.open("ab") as log:
            command = extract_command(spec_file, status_file)
            child = subprocess.Popen(command, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, cwd=self.state_dir)
            while child.poll() is None:
                self._report(job.id, status_file)
                current = self.queue.get(job.id)
                if self.stop.is_set() or (current is not None and current.cancel_requested):
                    self._terminate(child)
                    if self.stop.is_set() and not (current and current.cancel_requested):
                        return  # service shutting down: the job stays running and is requeued at the next start
                    self._report(job.id, status_file)
                    self.queue.update(job.id, status=CANCELLED, finished_at=_now())
                    logger.info("job %s: cancelled", job.id)
                    return
                time.sleep(POLL_SECONDS)
        status = self._report(job.id, status_file)
        final = self.queue.get(job.id)
        if child.returncode == 0 and final is not None and final.store:
            self.queue.update(job.id, status=SUCCEEDED, finished_at=_now())
            logger.info("job %s: succeeded -> %s", job.id, final.store)
        else:
            # The client sees the child's own safe summary, never its log (which may quote the corpus).
            error = (status or {}).get("error") or (f"the extraction exited with code {child.returncode}; see the "
                                                    f"service's log of job {job.id}")
            self.queue.update(job.id, status=FAILED, finished_at=_now(), error=error)
            logger.warning("job %s: failed (exit %s), log %s", job.id, child.returncode, log_path)

    def _report(self, job_id: str, status_file: Path) -> dict[str, Any] | None:
        try:
            status = json.loads(status_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if "path" in status:
            self.queue.update(job_id, progress=status, store=status["path"], reused=status["state"] == "reused")
        return status

    @staticmethod
    def _terminate(child: subprocess.Popen) -> None:
        child.terminate()
        try:
            child.wait(TERMINATE_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
