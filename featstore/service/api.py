"""`featstore serve`: the extraction service's HTTP API (FastAPI + uvicorn).

One process owns the accelerators: it queues extraction jobs (persistently, see jobs.py),
runs one at a time per GPU (or one on CPU), and puts finished stores in the catalog. The
API only validates, queues and reports; all paths a request names are confined to the
configured roots (checked again when a job reads them, see confine.py), and every route but
/health, the schema included, needs the bearer token when one is set.
"""

# No `from __future__ import annotations`: FastAPI resolves the route signatures at run time, and the
# dependency annotations refer to names local to create_app.
import hmac
import ipaddress
import logging
import os
import re
import threading
import typing
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, create_model

from ..errors import ConfigError
from ..extraction.corpus import BUNDLED_CORPUS
from ..extraction.models import PACKAGED_MINILM_ALIASES
from ..extraction.spec import ExtractSpec
from ..options import OptionField, option_fields
from ..sharing.catalog import check_store_location
from ..sharing.location import resolve
from .jobs import QUEUED, RUNNING, InputRoots, JobQueue, Worker

logger = logging.getLogger(__name__)

TOKEN_ENV = "FEATSTORE_SERVICE_TOKEN"
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024
MAX_STRING = 4096  # characters in any string option of a request
MAX_LIST = 10_000  # items in any list option (layers, label names)
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
STORE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*$")


@dataclass
class ServiceConfig:
    catalog: str
    state_dir: str
    corpus_roots: list[str] = field(default_factory=list)
    model_roots: list[str] = field(default_factory=list)
    token: str | None = None
    workers: int | None = None  # default: one per GPU, one on CPU; with Ray: one (the cluster runs the job)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    engine: str = "local"  # "ray": each job runs on Ray actors (a local instance, or the cluster at ray_address)
    ray_address: str | None = None


def _request_field(item: OptionField) -> tuple[Any, Any]:
    """A request-model field from a spec option: its type (choices as a Literal), default, bounds and help."""
    settings = item.option
    annotation: Any = Literal[settings.choices] if settings.choices else item.hint  # type: ignore[valid-type]
    constraints: dict[str, Any] = {"description": settings.help}
    if typing.get_origin(item.hint) is list:
        (element,) = typing.get_args(item.hint)
        annotation = list[Annotated[element, Field(max_length=MAX_STRING)] if element is str else element]
        constraints["max_length"] = MAX_LIST
    if settings.minimum is not None:
        constraints["ge"] = settings.minimum
    if settings.maximum is not None:
        constraints["le"] = settings.maximum
    if settings.pattern is not None:
        constraints["pattern"] = f"^{settings.pattern}$"
    if item.hint is str:
        constraints["max_length"] = MAX_STRING
        constraints["min_length"] = 1 if settings.required_to_submit else 0
    if settings.required_to_submit:
        return annotation, Field(..., **constraints)
    if item.optional:
        annotation = annotation | None
    return annotation, Field(item.default, **constraints)


# An extraction job: the submittable options of `ExtractSpec`, derived from it (adding an option to the spec adds
# it here); paths are confined to the service's roots when the job is accepted.
JobRequest = create_model(
    "JobRequest", __config__=ConfigDict(extra="forbid"),
    **{item.name: _request_field(item) for item in option_fields(ExtractSpec) if item.option.submit})


class JobView(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    spec: dict[str, Any]
    created_at: str
    started_at: str | None
    finished_at: str | None
    store: str | None = Field(description="the resulting store (path or URL) once known")
    reused: bool = Field(description="an identical store was already complete in the catalog")
    progress: dict[str, Any] | None = Field(description="sequences_done/total, tokens_done/total, "
                                            "tokens_per_second, eta_seconds")
    error: str | None
    coalesced: bool = Field(False, description="the request matched an active job, which is returned")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_token(token_file: str | None) -> str | None:
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ConfigError(f"token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def _has_control_characters(value: Any) -> bool:
    if isinstance(value, str):
        return any(ord(character) < 32 or ord(character) == 127 for character in value)
    if isinstance(value, list):
        return any(_has_control_characters(item) for item in value)
    return False


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


class Confinement:
    """Turns request paths into allowed absolute paths, or a 403 saying which roots are allowed."""

    def __init__(self, config: ServiceConfig) -> None:
        self.corpus_roots = [Path(root).resolve() for root in config.corpus_roots]
        self.model_roots = [Path(root).resolve() for root in config.model_roots]
        self.bundled = Path(BUNDLED_CORPUS).resolve().parent

    def corpus(self, requested: str) -> str:
        if "://" in requested:
            raise HTTPException(status.HTTP_403_FORBIDDEN, "corpus URLs are not accepted; give a path under a "
                                "corpus root")
        roots = [*self.corpus_roots, self.bundled]
        candidate = Path(requested)
        resolved = (candidate if candidate.is_absolute() else (roots[0] / candidate)).resolve()
        if not _inside(resolved, roots):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"corpus {requested!r} is outside the corpus roots "
                                f"({', '.join(map(str, roots))})")
        if not resolved.exists():
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"corpus {requested!r} does not exist")
        return str(resolved)

    def model(self, requested: str | None) -> str | None:
        if requested is None or requested in PACKAGED_MINILM_ALIASES:
            return requested
        candidate = Path(requested)
        if candidate.is_absolute() or requested.startswith("."):
            resolved = candidate.resolve() if candidate.is_absolute() else None
            if resolved is None or not _inside(resolved, self.model_roots):
                raise HTTPException(status.HTTP_403_FORBIDDEN, f"model {requested!r} is outside the model roots "
                                    f"({', '.join(map(str, self.model_roots)) or 'none configured'})")
            return str(resolved)
        if ".." in requested or not HUB_ID.match(requested):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"model {requested!r} is neither a hub id nor an "
                                "absolute directory")
        return requested

    @staticmethod
    def out(requested: str | None, catalog: str) -> str | None:
        if requested is None:
            return None
        if ".." in requested.split("/") or not STORE_NAME.match(requested):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"out {requested!r} must be a relative path inside "
                                "the catalog (letters, digits, '._-', '/'; no '..')")
        out = catalog.rstrip("/") + "/" + requested
        try:  # not a lease or side-object name of another store, not inside another store
            check_store_location(resolve(out))
        except ConfigError as error:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(error)) from None
        return out

    def roots(self) -> InputRoots:
        return InputRoots([*self.corpus_roots, self.bundled], self.model_roots)


def create_app(config: ServiceConfig) -> FastAPI:
    """The API; workers start with the app and stop with it."""
    state_dir = Path(config.state_dir).resolve()
    queue = JobQueue(state_dir / "jobs.sqlite")
    confinement = Confinement(config)
    stop = threading.Event()
    workers: list[Worker] = []

    def start_workers() -> None:
        for job_id in queue.requeue_interrupted():
            logger.info("job %s was interrupted by a restart; queued again (its store resumes)", job_id)
        count = config.workers
        devices: list[int | None]
        engine = {"engine": config.engine, "ray_address": config.ray_address}
        if count is None and config.engine == "local":
            import torch

            devices = list(range(torch.cuda.device_count())) or [None]
        else:
            devices = [None] * (count or 1)
        for device in devices:
            workers.append(Worker(queue, config.catalog, state_dir, device, stop, engine, confinement.roots()))
            workers[-1].start()

    def stop_workers() -> None:
        stop.set()
        for worker in workers:
            worker.join()
        queue.close()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        start_workers()
        yield
        stop_workers()

    # The schema is served under the token like every route but /health; the interactive pages are off
    # (a browser page cannot send the token when it fetches the schema).
    app = FastAPI(title="featstore extraction service", version="1", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None,
                  description="Submit corpora for extraction by a frozen encoder; finished stores land in the "
                  "catalog.")
    bearer = HTTPBearer(auto_error=False)

    def authorize(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if config.token is None:
            return
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), config.token.encode()):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def limit_request_size(request: Request, call_next):
        declared = request.headers.get("content-length")
        if declared is None and request.method == "POST" and request.url.path == "/v1/jobs":
            return JSONResponse({"detail": "send a Content-Length header (chunked bodies are not accepted)"},
                                status_code=status.HTTP_411_LENGTH_REQUIRED)
        if declared is not None and (not declared.isdigit() or int(declared) > config.max_request_bytes):
            return JSONResponse({"detail": f"request body larger than {config.max_request_bytes} bytes"},
                                status_code=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        return await call_next(request)

    def view(job: Any, coalesced: bool = False) -> JobView:
        return JobView(**job.public(), coalesced=coalesced)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "workers": len(workers)}

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorize)])
    def schema() -> dict[str, Any]:
        return app.openapi()

    @app.post("/v1/jobs", status_code=status.HTTP_202_ACCEPTED, dependencies=[Depends(authorize)])
    def submit(request: JobRequest) -> JobView:
        spec = request.model_dump()
        bad = sorted(name for name, value in spec.items() if _has_control_characters(value))
        if bad:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{', '.join(bad)}: NUL bytes and other control "
                                "characters are not accepted in paths or names")
        try:
            spec["corpus"] = confinement.corpus(request.corpus)
            spec["model"] = confinement.model(request.model)
            spec["out"] = confinement.out(request.out, config.catalog)
        except (OSError, ValueError) as error:  # a path the OS cannot even look at (too long, ...)
            reason = error.strerror if isinstance(error, OSError) else str(error)
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"invalid path: {reason}") from None
        job, coalesced = queue.submit(spec)
        if coalesced:
            logger.info("request coalesced with active job %s", job.id)
        return view(job, coalesced)

    @app.get("/v1/jobs", dependencies=[Depends(authorize)])
    def list_jobs() -> list[JobView]:
        return [view(job) for job in queue.list()]

    @app.get("/v1/jobs/{job_id}", dependencies=[Depends(authorize)])
    def get_job(job_id: str) -> JobView:
        job = queue.get(job_id)
        if job is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")
        return view(job)

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=[Depends(authorize)])
    def cancel_job(job_id: str) -> JobView:
        job = queue.get(job_id)
        if job is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")
        if job.status not in (QUEUED, RUNNING):
            raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} already {job.status}")
        cancelled = queue.cancel(job_id)
        assert cancelled is not None
        return view(cancelled)

    return app


def serve(config: ServiceConfig, host: str, port: int) -> None:
    """Run the service until interrupted. Refuses a non-loopback address without a token."""
    import uvicorn

    if config.token is None and not is_loopback(host):
        raise ConfigError(f"refusing to listen on {host} without a bearer token: set {TOKEN_ENV} or pass "
                             "--token-file (or listen on 127.0.0.1)")
    if not config.corpus_roots:
        config.corpus_roots = [os.getcwd()]
        logger.info("no --corpus-root given: requests may read corpora under %s only", config.corpus_roots[0])
    logger.info("featstore service on http://%s:%d, catalog %s, state %s", host, port, config.catalog,
                config.state_dir)
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning")
