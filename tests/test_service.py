"""The extraction service, driven over HTTP: a real `featstore serve` subprocess on a random loopback port."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from featstore import open_store, verify_store
from featstore.errors import IncompleteStoreError
from tests.conftest import _random_sentences, write_conll

pytestmark = pytest.mark.slow
TOKEN = "test-token-0123456789"
FINISHED = ("succeeded", "failed", "cancelled")


class Service:
    def __init__(self, root: Path, model_root: str, workers: int = 1, extra_args: tuple[str, ...] = ()) -> None:
        self.root, self.model_root, self.workers, self.extra_args = root, model_root, workers, extra_args
        self.catalog, self.corpora = root / "catalog", root / "corpora"
        self.corpora.mkdir(parents=True, exist_ok=True)
        (root / "token").write_text(TOKEN)
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> Service:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        command = [sys.executable, "-m", "featstore.cli", "serve", "--catalog", str(self.catalog), "--port",
                   str(self.port), "--corpus-root", str(self.corpora), "--model-root", self.model_root,
                   "--state-dir", str(self.root / "state"), "--token-file", str(self.root / "token"),
                   "--workers", str(self.workers), "--max-request-bytes", "4096", *self.extra_args]
        self.log = (self.root / "service.log").open("ab")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.root / "service.log").read_text()
            try:
                if self.request("GET", "/health", token=None)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError((self.root / "service.log").read_text())

    def request(self, method: str, path: str, body: object = None, token: str | None = TOKEN,
                raw: bytes | None = None) -> tuple[int, object]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def submit(self, **spec: object) -> dict:
        code, job = self.request("POST", "/v1/jobs", spec)
        assert code == 202, job
        return job

    def wait(self, job_id: str, until=lambda job: job["status"] in FINISHED, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, job = self.request("GET", f"/v1/jobs/{job_id}")
            assert code == 200, job
            if until(job):
                return job
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id}: {job}")

    def stop(self, crash: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            # crash: SIGKILL the whole process group (service and the extraction it runs), like a power cut
            os.killpg(self.process.pid, signal.SIGKILL if crash else signal.SIGTERM)
            self.process.wait(timeout=60)
        self.log.close()


@pytest.fixture()
def service(tmp_path, tiny_models):
    model_root = str(Path(tiny_models["bert"]).parent)
    running = Service(tmp_path, model_root).start()
    yield running
    running.stop()


def corpus_file(service: Service, name: str, sentences: int, seed: int) -> str:
    write_conll(service.corpora / name, _random_sentences(sentences, seed=seed))
    return name


def test_submit_extract_reuse_and_list(service, tiny_models):
    corpus = corpus_file(service, "small.conll", 40, seed=1)
    job = service.submit(corpus=corpus, model=tiny_models["bert"], layers=[0, -1])
    assert job["status"] in ("queued", "running") and not job["coalesced"]
    done = service.wait(job["id"])
    assert done["status"] == "succeeded", done
    assert done["store"].startswith(str(service.catalog)) and not done["reused"]
    assert done["progress"]["sequences_done"] == done["progress"]["sequences_total"] == 40
    assert verify_store(done["store"]) == []
    with open_store(done["store"]) as store:
        assert store.layers == [0, 2] and len(store) == 40
    # the same content again: finishes at once, pointing at the existing store
    again = service.wait(service.submit(corpus=corpus, model=tiny_models["bert"], layers=[0, -1])["id"])
    assert again["status"] == "succeeded" and again["reused"] and again["store"] == done["store"]
    code, jobs = service.request("GET", "/v1/jobs")
    assert code == 200 and [item["id"] for item in jobs] == [job["id"], again["id"]]
    code, schema = service.request("GET", "/openapi.json")
    assert code == 200 and {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel"} <= set(schema["paths"])


def test_coalesce_cancel_and_concurrent_status_load(service, minilm_path):
    corpus = corpus_file(service, "big.conll", 6000, seed=2)
    first = service.submit(corpus=corpus, max_batch_tokens=256)
    twin = service.submit(corpus=corpus, max_batch_tokens=256)
    assert twin["coalesced"] and twin["id"] == first["id"]
    running = service.wait(first["id"], until=lambda job: (job["progress"] or {}).get("sequences_done", 0) > 0)
    assert running["status"] == "running" and running["progress"]["tokens_per_second"] > 0
    assert running["progress"]["eta_seconds"] >= 0 and running["store"]

    with ThreadPoolExecutor(max_workers=32) as pool:
        codes = list(pool.map(lambda _: service.request("GET", f"/v1/jobs/{first['id']}")[0], range(200)))
    assert codes == [200] * 200

    code, cancelling = service.request("POST", f"/v1/jobs/{first['id']}/cancel")
    assert code == 200 and cancelling["id"] == first["id"]
    final = service.wait(first["id"])
    assert final["status"] == "cancelled"
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        open_store(final["store"])
    code, error = service.request("POST", f"/v1/jobs/{first['id']}/cancel")
    assert code == 409 and "already cancelled" in error["detail"]


def test_queued_jobs_survive_a_crash_and_the_interrupted_job_resumes(tmp_path, tiny_models, minilm_path):
    service = Service(tmp_path, str(Path(tiny_models["bert"]).parent)).start()
    big = service.submit(corpus=corpus_file(service, "big.conll", 6000, seed=3), max_batch_tokens=256)
    small = service.submit(corpus=corpus_file(service, "small.conll", 30, seed=4), model=tiny_models["bert"])
    service.wait(big["id"], until=lambda job: (job["progress"] or {}).get("sequences_done", 0) > 1000)
    assert service.request("GET", f"/v1/jobs/{small['id']}")[1]["status"] == "queued"
    service.stop(crash=True)

    service.start()
    try:
        finished = [service.wait(job["id"]) for job in (big, small)]
        assert [job["status"] for job in finished] == ["succeeded", "succeeded"], finished
        assert [verify_store(job["store"]) for job in finished] == [[], []]
        log = next((tmp_path / "state" / "logs").glob(f"{big['id']}.log")).read_text()
        assert "resuming" in log
    finally:
        service.stop()


def test_authentication_confinement_and_validation(service, tiny_models, tmp_path):
    corpus = corpus_file(service, "c.conll", 5, seed=5)
    assert service.request("GET", "/v1/jobs", token=None)[0] == 401
    assert service.request("GET", "/v1/jobs", token="wrong")[0] == 401
    assert service.request("POST", "/v1/jobs", {"corpus": corpus}, token=None)[0] == 401
    assert service.request("GET", "/health", token=None)[0] == 200
    for route in ("/openapi.json", "/docs", "/redoc"):  # the schema needs the token; the pages are off
        assert service.request("GET", route, token=None)[0] in (401, 404), route

    outside = tmp_path / "outside.conll"
    shutil.copy(service.corpora / corpus, outside)
    for spec, code, message in (
        ({"corpus": "../outside.conll"}, 403, "outside the corpus roots"),
        ({"corpus": str(outside)}, 403, "outside the corpus roots"),
        ({"corpus": "/etc/passwd"}, 403, "outside the corpus roots"),
        ({"corpus": "file:///etc/passwd"}, 403, "URLs are not accepted"),
        ({"corpus": "missing.conll"}, 400, "does not exist"),
        ({"corpus": corpus, "model": "/etc"}, 403, "outside the model roots"),
        ({"corpus": corpus, "model": "../../models"}, 403, "outside the model roots"),
        ({"corpus": corpus, "out": "../escape.zarr"}, 400, "relative path inside the catalog"),
        ({"corpus": corpus, "out": "/abs.zarr"}, 400, "relative path inside the catalog"),
        ({"corpus": corpus, "out": "a.zarr.lock"}, 400, "may not end in '.lock'"),
        ({"corpus": corpus + "\u0000x"}, 400, "NUL bytes"),
        ({"corpus": corpus, "out": "x\u0000.zarr"}, 400, "NUL bytes"),
        ({"corpus": "x" * 300 + ".conll"}, 400, "invalid path"),
    ):
        status, body = service.request("POST", "/v1/jobs", spec)
        assert (status, message in body["detail"]) == (code, True), (spec, status, body)
    for spec in ({"corpus": corpus, "unknown": 1}, {"corpus": corpus, "layers": "all"}, {"corpus": corpus,
                 "dtype": "int4"}, {"model": "x"}, {"corpus": corpus, "max_batch_tokens": -1}):
        status, body = service.request("POST", "/v1/jobs", spec)
        assert status == 422 and body["detail"], (spec, body)
    assert service.request("POST", "/v1/jobs", raw=b"{not json")[0] == 422
    assert service.request("POST", "/v1/jobs", raw=json.dumps({"corpus": corpus, "label_names": ["x" * 100] * 100}
                                                             ).encode())[0] == 413
    assert service.request("GET", "/v1/jobs/nope")[0] == 404
    assert service.request("GET", "/v1/jobs", token=None)[0] == 401
    assert service.request("GET", "/v1/jobs")[1] == []  # nothing invalid was queued


def test_the_client_commands(service, tiny_models, capsys):
    from featstore.cli import main

    corpus = corpus_file(service, "c.conll", 10, seed=6)
    server = ["--server", f"http://127.0.0.1:{service.port}", "--token", TOKEN]
    # Every extraction option the service accepts can be sent, e.g. the three `submit` once lacked.
    assert main(["submit", *server, "--corpus", corpus, "--model", tiny_models["bert"], "--compute-dtype", "float32",
                 "--stride", "4", "--max-length", "16", "--max-batch-tokens", "256", "--follow"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["status"] == "succeeded" and verify_store(job["store"]) == []
    assert (job["spec"]["compute_dtype"], job["spec"]["stride"], job["spec"]["max_batch_tokens"]) == ("float32", 4, 256)
    with open_store(job["store"]) as store:
        extraction = store.manifest.extraction
        assert (extraction.compute_dtype, extraction.stride, extraction.max_batch_tokens) == ("float32", 4, 256)
    assert main(["jobs", *server]) == 0
    assert job["id"] in capsys.readouterr().out
    assert main(["job", job["id"], *server[:2], "--token", "wrong"]) == 2
    assert "HTTP 401" in capsys.readouterr().err


def test_refuses_a_public_address_without_a_token(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "FEATSTORE_SERVICE_TOKEN"}
    result = subprocess.run([sys.executable, "-m", "featstore.cli", "serve", "--catalog", str(tmp_path), "--host",
                             "0.0.0.0", "--corpus-root", str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "without a bearer token" in result.stderr


def test_a_store_cannot_be_nested_inside_another_and_a_swapped_corpus_is_never_read(service, tiny_models,
                                                                                   tmp_path):
    corpus = corpus_file(service, "c.conll", 8, seed=6)
    first = service.wait(service.submit(corpus=corpus, model=tiny_models["bert"], out="team/a.zarr")["id"])
    assert first["status"] == "succeeded", first
    status, body = service.request("POST", "/v1/jobs", {"corpus": corpus, "out": "team/a.zarr/inner.zarr"})
    assert status == 400 and "lies inside the store" in body["detail"]

    # accepted while it is a plain file under the corpus root, then swapped for a symlink to a secret outside
    secret = tmp_path / "secret.conll"
    secret.write_text("TOPSECRET O\nPASSWORD O\n")
    swapped = corpus_file(service, "swapped.conll", 8, seed=7)
    blocker = service.submit(corpus=corpus_file(service, "big.conll", 3000, seed=8), model=tiny_models["bert"],
                             max_batch_tokens=64)  # keeps the worker busy while the swap happens
    job = service.submit(corpus=swapped, model=tiny_models["bert"])
    (service.corpora / swapped).unlink()
    (service.corpora / swapped).symlink_to(secret)
    done = service.wait(job["id"])
    assert done["status"] == "failed" and "outside the service's roots" in done["error"], done
    assert "TOPSECRET" not in json.dumps(done) and done["store"] is None
    assert service.wait(blocker["id"])["status"] == "succeeded"


def test_job_errors_never_quote_the_corpus(service, tiny_models):
    (service.corpora / "bad.conll").write_text("Alice B-PER\nSECRETWORD O extra\n")
    done = service.wait(service.submit(corpus="bad.conll", model=tiny_models["bert"])["id"])
    assert done["status"] == "failed" and "the corpus was refused at" in done["error"] and "bad.conll:2" in \
        done["error"]
    assert "SECRETWORD" not in json.dumps(done)
    (service.corpora / "binary.conll").write_bytes(b"caf\xe9 O\n")
    done = service.wait(service.submit(corpus="binary.conll", model=tiny_models["bert"])["id"])
    assert done["status"] == "failed" and "binary.conll:1" in done["error"]
