"""A small client for the extraction service (`featstore submit / jobs / job`), standard library only."""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from tqdm.auto import tqdm

from ..errors import ConfigError, ServiceError

SERVER_ENV = "FEATSTORE_SERVER"
FINISHED = ("succeeded", "failed", "cancelled")


class ServiceClient:
    def __init__(self, server: str | None = None, token: str | None = None, timeout: float = 30.0) -> None:
        self.server = (server or os.environ.get(SERVER_ENV) or "").rstrip("/")
        if not self.server:
            raise ConfigError(f"no service address: pass --server URL or set {SERVER_ENV}")
        self.token = token or os.environ.get("FEATSTORE_SERVICE_TOKEN")
        self.timeout = timeout

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.server + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            with contextlib.suppress(ValueError, AttributeError):
                detail = json.loads(detail).get("detail", detail)
            raise ServiceError(f"{self.server} refused {method} {path}: HTTP {error.code}: {detail}") from None
        except urllib.error.URLError as error:
            raise ServiceError(f"cannot reach the service at {self.server}: {error.reason}") from None

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "/v1/jobs", {key: value for key, value in spec.items() if value is not None})

    def jobs(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/jobs")

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel")

    def follow(self, job_id: str, interval: float = 1.0, progress: bool = True) -> dict[str, Any]:
        """Poll until the job finishes, with a progress bar over its sequences."""
        with tqdm(total=None, unit="seq", desc=f"job {job_id}", disable=not progress) as bar:
            while True:
                job = self.job(job_id)
                state = job.get("progress") or {}
                if state.get("sequences_total"):
                    bar.total = state["sequences_total"]
                    bar.n = state.get("sequences_done", 0)
                    bar.set_postfix(status=job["status"], tok_s=f"{state.get('tokens_per_second', 0):,.0f}",
                                    eta=f"{state.get('eta_seconds', '-')}")
                    bar.refresh()
                if job["status"] in FINISHED:
                    return job
                time.sleep(interval)
