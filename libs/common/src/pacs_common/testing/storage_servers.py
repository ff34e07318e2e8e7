"""Real storage servers for tests: moto (S3) and Azurite (Azure Blob).

Both run as child processes on free loopback ports, started once per test
session and stopped at its end; every test gets its own bucket/container, so
tests do not see each other's objects.  The plain ``start_*`` helpers are for
end-to-end tests that need the servers outside pytest fixtures.

This module is a pytest plugin (``pytest_plugins`` in the root conftest).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import pytest

from pacs_common.storage.filesystem import FilesystemStorage

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from pacs_common.storage.azure import AzureBlobStorage
    from pacs_common.storage.s3 import S3Storage

# The SDK-backed modules are imported where used: this plugin is loaded by
# every test session of the repository, most of which never touch S3/Azure.

#: Azurite's fixed development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
#: moto accepts any credentials; these only have to be present.
MOTO_ACCESS_KEY = "testing"
MOTO_SECRET_KEY = "testing"
#: Parts/blocks of 5 MiB in tests, so a 20 MB object really goes multipart.
TEST_PART_SIZE = 5 * 1024 * 1024
_START_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port nothing listens on right now (the usual small race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A server child process with its log; ``stop`` is idempotent."""

    process: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""


@dataclass
class MotoServer:
    """A running moto S3 server."""

    url: str
    server: ServerProcess

    def client(self) -> S3Client:
        from pacs_common.storage.s3 import make_s3_client

        return make_s3_client(
            endpoint_url=self.url,
            access_key_id=MOTO_ACCESS_KEY,
            secret_access_key=MOTO_SECRET_KEY,
        )

    def create_bucket(self, name: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        finally:
            client.close()

    def stop(self) -> None:
        self.server.stop()


@dataclass
class AzuriteServer:
    """A running Azurite blob service (in-memory)."""

    blob_endpoint: str
    connection_string: str
    server: ServerProcess

    def stop(self) -> None:
        self.server.stop()


def _spawn(command: list[str], name: str, ready_url: str) -> ServerProcess:
    workdir = Path(tempfile.mkdtemp(prefix=f"pacs-{name}-"))
    log_path = workdir / f"{name}.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        command,
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a Ctrl-C in the test run does not kill it mid-teardown
    )
    server = ServerProcess(process=process, workdir=workdir, log_path=log_path, _log=log)
    try:
        _wait_until_answering(server, ready_url)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_until_answering(server: ServerProcess, url: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.process.args!r} exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is serving
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {_START_TIMEOUT}s:\n{server.log_tail()}")


def start_moto_server(port: int | None = None) -> MotoServer:
    """Start ``moto_server`` from this interpreter's environment."""
    port = port or free_port()
    binary = Path(sys.executable).parent / "moto_server"
    command = [str(binary)] if binary.exists() else [shutil.which("moto_server") or "moto_server"]
    url = f"http://127.0.0.1:{port}"
    server = _spawn([*command, "-H", "127.0.0.1", "-p", str(port)], "moto", url)
    return MotoServer(url=url, server=server)


def repo_root() -> Path:
    """The workspace root (holds uv.lock), from this file or else the cwd."""
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for candidate in (start, *start.parents):
            if (candidate / "uv.lock").is_file() and (candidate / "pyproject.toml").is_file():
                return candidate
    return Path.cwd()


def find_azurite_bin(install: bool = True) -> Path:
    """``$PACS_AZURITE_BIN``, else ``<repo>/.tools``, else PATH; installs
    ``azurite@3`` into ``<repo>/.tools`` with npm when none is found."""
    if env := os.environ.get("PACS_AZURITE_BIN"):
        return Path(env)
    tools = repo_root() / ".tools"
    local = tools / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return local
    if on_path := shutil.which("azurite-blob"):
        return Path(on_path)
    if not install:
        raise FileNotFoundError("azurite-blob not found")
    tools.mkdir(parents=True, exist_ok=True)
    # A lock, so parallel test processes do not run npm into the same folder.
    with (tools / ".azurite-install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not local.exists():
            subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(tools), "azurite@3"],
                check=True,
                stdin=subprocess.DEVNULL,
                timeout=600,
            )
    if not local.exists():
        raise FileNotFoundError(f"npm install did not produce {local}")
    return local


def make_azurite_connection_string(blob_endpoint: str) -> str:
    return (
        "DefaultEndpointsProtocol=http;"
        f"AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={blob_endpoint};"
    )


def start_azurite(port: int | None = None) -> AzuriteServer:
    """Start an in-memory Azurite blob service."""
    port = port or free_port()
    binary = find_azurite_bin()
    blob_endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    # --skipApiVersionCheck: the SDK is newer than Azurite's API version;
    # --disableTelemetry: otherwise it tries to reach the internet.
    command = [
        str(binary),
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(port),
        "--inMemoryPersistence",
        "--skipApiVersionCheck",
        "--loose",
        "--disableTelemetry",
    ]
    # cwd is the server's temporary workdir, so anything Azurite writes goes there.
    server = _spawn(command, "azurite", blob_endpoint)
    return AzuriteServer(
        blob_endpoint=blob_endpoint,
        connection_string=make_azurite_connection_string(blob_endpoint),
        server=server,
    )


def unique_name(prefix: str = "t") -> str:
    """A bucket/container name valid for both S3 and Azure (3-63 chars, lowercase)."""
    return f"{prefix}{uuid.uuid4().hex[:20]}"


# -- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = start_moto_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_server_url(moto_server: MotoServer) -> str:
    return moto_server.url


@pytest.fixture(scope="session")
def azurite() -> Iterator[AzuriteServer]:
    server = start_azurite()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def azurite_connection_string(azurite: AzuriteServer) -> str:
    return azurite.connection_string


@pytest.fixture
def fs_storage(tmp_path: Path) -> FilesystemStorage:
    return FilesystemStorage(tmp_path / "objects")


@pytest.fixture
def s3_storage(moto_server: MotoServer) -> Iterator[S3Storage]:
    """A fresh bucket per test, 5 MiB multipart threshold and parts."""
    from pacs_common.storage.s3 import S3Storage

    bucket = unique_name()
    moto_server.create_bucket(bucket)
    storage = S3Storage(
        bucket,
        client=moto_server.client(),
        multipart_threshold=TEST_PART_SIZE,
        multipart_chunk=TEST_PART_SIZE,
    )
    try:
        yield storage
    finally:
        with contextlib.suppress(Exception):  # free moto's memory; best effort
            for key in list(storage.iter_keys()):
                storage.delete(key)
        storage.close()


@pytest.fixture
def azure_storage(azurite: AzuriteServer) -> Iterator[AzureBlobStorage]:
    """A fresh container per test, 5 MiB single-put threshold, 4 MiB blocks."""
    from pacs_common.storage.azure import AzureBlobStorage

    storage = AzureBlobStorage.from_connection_string(
        azurite.connection_string,
        unique_name(),
        block_size=4 * 1024 * 1024,
        single_put_threshold=TEST_PART_SIZE,
    )
    try:
        yield storage
    finally:
        with contextlib.suppress(Exception):
            storage.container.delete_container()
        storage.close()
