"""Throwaway PostgreSQL 15 and RabbitMQ 3.10 servers as plain processes.

Why this exists: the development machines have no container engine, the
local runner must work on a fresh machine, and the fault tests need servers of
their own that they can stop and restart without touching anything else on
the machine.  Everything a server writes lives under one directory, and a
server is stopped by its PID or its own control tool, never by process name.

Running as root (as on the development machines), PostgreSQL refuses to run
and RabbitMQ should not, so both run as their Debian system users
(``postgres``, ``rabbitmq``) through ``runuser``, in directories chowned to
them.  Those users must be able to reach the directory: when an ancestor is
private (pytest's ``/tmp/pytest-of-root`` is mode 0700), the data goes to a
directory under the system temp dir instead, linked from the base directory;
``remove()`` deletes it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import pwd
import random
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

LOCALHOST = "127.0.0.1"
PG_VERSION = "15"
# rabbitmqctl binds a port in DIST_PORT+10000 .. DIST_PORT+10010 to talk to the node.
RABBIT_CLI_DIST_OFFSET = 10_000
RABBIT_CLI_DIST_SPAN = 11
# AMQP ports for throwaway nodes: below Linux's ephemeral range (32768-60999),
# so find_free_port() (which asks the kernel for an ephemeral port) never hands
# out one of ours, and the CLI range stays far below 65536.
RABBIT_PORT_RANGE = (20_000, 22_000)
SUN_PATH_MAX = 107

T = TypeVar("T")


class InfraError(RuntimeError):
    """A throwaway server could not be prepared, started or stopped."""


# -- ports ----------------------------------------------------------------


def find_free_port(host: str = LOCALHOST) -> int:
    """A TCP port nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = LOCALHOST) -> bool:
    """Whether a server could listen on ``port`` now.  With SO_REUSEADDR, as
    servers bind, so connections in TIME_WAIT left by a stopped server on the
    same port do not count as "in use"."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def tcp_port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_tcp(host: str, port: int, timeout: float) -> None:
    """Block until ``host:port`` accepts connections; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if tcp_port_open(host, port, timeout=min(1.0, max(0.05, remaining))):
            return
        if remaining <= 0:
            raise TimeoutError(f"nothing accepts connections on {host}:{port} after {timeout:g}s")
        time.sleep(0.05)


def find_rabbitmq_port(host: str = LOCALHOST) -> int:
    """An AMQP port P for a throwaway node such that P, its distribution port
    P+10 and the range rabbitmqctl binds (P+10+10000 .. +10010) are all free."""
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(*RABBIT_PORT_RANGE)
        cli = port + 10 + RABBIT_CLI_DIST_OFFSET
        wanted = [port, port + 10, *range(cli, cli + RABBIT_CLI_DIST_SPAN)]
        if all(port_is_free(p, host) for p in wanted):
            return port
    raise InfraError(f"no free port block for RabbitMQ in {RABBIT_PORT_RANGE}")


# -- running coroutines from synchronous code ------------------------------


def run_sync(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from synchronous code.

    Also works when the calling thread already runs an event loop (an async
    test driving the synchronous runner): the coroutine then gets a thread
    and a loop of its own instead of failing with "loop already running".
    """

    async def call() -> T:
        return await factory()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(call())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, call()).result()


def describe_error(exc: BaseException) -> str:
    """One line for an error: its message, or its type when it has none."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# -- URLs -----------------------------------------------------------------


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for printing and logs."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def _database_name(url: str) -> str:
    name = unquote(urlsplit(url).path.lstrip("/"))
    if not name:
        raise InfraError(f"no database name in {redact_url(url)}")
    return name


def _maintenance_url(url: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/postgres"))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# -- reachability ---------------------------------------------------------


async def probe_postgres(url: str, connect_timeout: float = 3.0) -> str | None:
    """None when a PostgreSQL server at ``url`` lets us in, else why not.

    A server that answers "database does not exist" counts as reachable: the
    handshake and authentication worked, and :func:`ensure_database` creates it.
    """
    import asyncpg

    try:
        conn = await asyncpg.connect(url, timeout=connect_timeout)
    except asyncpg.InvalidCatalogNameError:
        return None
    except (OSError, TimeoutError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return describe_error(exc)
    try:
        await conn.fetchval("SELECT 1", timeout=connect_timeout)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return describe_error(exc)
    finally:
        conn.terminate()
    return None


async def probe_rabbitmq(url: str, connect_timeout: float = 3.0) -> str | None:
    """None when an AMQP 0-9-1 broker at ``url`` accepts our login, else why not."""
    import aio_pika
    import aio_pika.exceptions

    # A plain TCP check first: aio-pika logs every refused connection at
    # ERROR level, which would flood the output of a start-up poll.
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), connect_timeout)
    except (OSError, TimeoutError) as exc:
        return describe_error(exc)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    try:
        connection = await aio_pika.connect(url, timeout=connect_timeout)
    except (OSError, TimeoutError, ValueError, aio_pika.exceptions.AMQPError) as exc:
        return describe_error(exc)
    with contextlib.suppress(Exception):
        await connection.close()
    return None


def postgres_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether PostgreSQL at ``url`` completes a real handshake (TCP + startup + auth)."""
    return run_sync(lambda: probe_postgres(url, timeout)) is None


def rabbitmq_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether RabbitMQ at ``url`` completes a real AMQP connection (TCP + AMQP + login)."""
    return run_sync(lambda: probe_rabbitmq(url, timeout)) is None


async def ensure_database_async(url: str, connect_timeout: float = 10.0) -> bool:
    """Create the database named in ``url`` when it does not exist yet.

    Returns whether it was created.  Connects to the ``postgres`` maintenance
    database of the same server to do so; a concurrent creator is harmless.
    """
    import asyncpg

    try:
        conn = await asyncpg.connect(url, timeout=connect_timeout)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        conn.terminate()
        return False
    admin = await asyncpg.connect(_maintenance_url(url), timeout=connect_timeout)
    try:
        await admin.execute(f"CREATE DATABASE {_quote_ident(_database_name(url))}")
    except asyncpg.DuplicateDatabaseError:
        return False
    finally:
        await admin.close()
    return True


def ensure_database(url: str, timeout: float = 10.0) -> bool:
    """Synchronous :func:`ensure_database_async`."""
    return run_sync(lambda: ensure_database_async(url, timeout))


async def drop_database_async(url: str, connect_timeout: float = 10.0) -> None:
    """Drop the database named in ``url`` (if it exists), closing its sessions."""
    import asyncpg

    admin = await asyncpg.connect(_maintenance_url(url), timeout=connect_timeout)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {_quote_ident(_database_name(url))} WITH (FORCE)")
    finally:
        await admin.close()


def drop_database(url: str, timeout: float = 10.0) -> None:
    """Synchronous :func:`drop_database_async` (tests drop what they created)."""
    run_sync(lambda: drop_database_async(url, timeout))


# -- processes ------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat_line.rsplit(")", 1)[-1].split()[0] != "Z"


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants (from /proc; for checks, not for killing)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        if pid_alive(current):
            tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def read_pid_file(path: Path) -> int | None:
    """The PID on the first line of ``path``, if the file exists and holds one."""
    try:
        first = path.read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def tail_file(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ("" if unreadable), for error messages."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            data = handle.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


# -- users and directories -------------------------------------------------


def _service_user(name: str) -> pwd.struct_passwd | None:
    """The system user a server runs as when we are root; None when we are
    not root (then the server simply runs as us)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise InfraError(
            f"system user {name!r} does not exist; install the Debian package that creates it"
        ) from None


def _as_user(
    user: pwd.struct_passwd | None, argv: Sequence[str], env: Mapping[str, str] | None = None
) -> list[str]:
    """``argv`` run as ``user`` with ``env`` added (runuser resets HOME, so the
    environment goes through ``env`` after the user switch)."""
    command = [*(["env", *(f"{k}={v}" for k, v in env.items())] if env else []), *argv]
    if user is None:
        return command
    return ["runuser", "-u", user.pw_name, "--", *command]


def _can_traverse(path: Path, user: pwd.struct_passwd) -> bool:
    """Whether ``user`` may search every existing directory from / to ``path``."""
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for directory in [path, *path.parents]:
        try:
            info = directory.stat()
        except FileNotFoundError:
            continue
        if info.st_uid == user.pw_uid:
            needed = stat.S_IXUSR
        elif info.st_gid in groups:
            needed = stat.S_IXGRP
        else:
            needed = stat.S_IXOTH
        if not info.st_mode & needed:
            return False
    return True


def _server_root(base_dir: Path, name: str, user: pwd.struct_passwd | None) -> Path:
    """The directory a server keeps everything in: ``base_dir/name``, or, when
    ``user`` cannot reach ``base_dir``, a temp directory linked from there."""
    base_dir = base_dir.absolute()
    link = base_dir / name
    if link.is_symlink():
        target = link.resolve()
        if target.is_dir():
            return target
        link.unlink()
    if user is None or _can_traverse(base_dir, user):
        link.mkdir(parents=True, exist_ok=True)
        return link
    if link.exists():
        raise InfraError(f"user {user.pw_name!r} cannot reach {link}; choose a base directory it can search")
    base_dir.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix=f"pacs-{name}-"))
    if not _can_traverse(target.parent, user):
        target.rmdir()
        raise InfraError(f"user {user.pw_name!r} cannot reach {base_dir} nor the temp directory")
    _give(target, user, 0o755)
    link.symlink_to(target, target_is_directory=True)
    return target


def _give(path: Path, user: pwd.struct_passwd | None, mode: int | None = None) -> None:
    """Hand ``path`` to ``user`` (when we are root) with ``mode``."""
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)
    if mode is not None:
        path.chmod(mode)


def _remove_root(root: Path, link: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    if link.is_symlink():
        link.unlink()


def _run(argv: list[str], *, cwd: Path, timeout: float, what: str, log: Path | None) -> str:
    """Run a control command in a session of its own (so a Ctrl-C meant for
    the runner does not reach the server it starts) and fail with its output."""
    try:
        done = subprocess.run(
            argv,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise InfraError(f"{what} did not finish within {timeout:g}s") from None
    except FileNotFoundError as exc:
        raise InfraError(f"{what}: {exc}") from None
    if done.returncode != 0:
        output = (done.stderr.strip() or done.stdout.strip())[-2000:]
        tail = tail_file(log) if log else ""
        raise InfraError(f"{what} failed ({done.returncode}): {output}\n{tail}".rstrip())
    return done.stdout


# -- PostgreSQL -----------------------------------------------------------


def _find_postgres_bin() -> Path:
    candidates = [Path(f"/usr/lib/postgresql/{PG_VERSION}/bin")]
    installed = Path("/usr/lib/postgresql")
    if installed.is_dir():
        versions = [p for p in installed.iterdir() if p.name.split(".")[0].isdigit()]
        versions.sort(key=lambda p: int(p.name.split(".")[0]), reverse=True)
        candidates += [p / "bin" for p in versions]
    found = shutil.which("pg_ctl")
    if found:
        candidates.append(Path(found).parent)
    for candidate in candidates:
        if (candidate / "pg_ctl").exists() and (candidate / "initdb").exists():
            return candidate
    raise InfraError("PostgreSQL server binaries not found (apt-get install postgresql)")


class ThrowawayPostgres:
    """A private PostgreSQL cluster under ``base_dir/<name>`` on its own port.

    ``start()`` runs initdb once (trust authentication, user ``postgres``),
    starts the server listening on 127.0.0.1 only and creates ``database``;
    the data survives ``stop()`` / ``restart()``, so a fault test can restart
    the server under a running system.  ``remove()`` deletes everything.
    """

    def __init__(
        self,
        base_dir: Path | str,
        *,
        port: int | None = None,
        database: str = "pacs",
        name: str = "postgres",
        bin_dir: Path | None = None,
        server_options: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        self._user = _service_user("postgres")
        self._link = Path(base_dir).absolute() / name
        self.root = _server_root(Path(base_dir), name, self._user)
        self.data_dir = self.root / "data"
        self.log_file = self.root / "server.log"
        self.port = port or find_free_port()
        self.database = database
        self.bin_dir = bin_dir or _find_postgres_bin()
        self.server_options = dict(server_options or {})
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"ThrowawayPostgres(port={self.port}, root={str(self.root)!r})"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{LOCALHOST}:{self.port}/{self.database}"

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs."""
        pid = read_pid_file(self.data_dir / "postmaster.pid")
        return pid if pid is not None and pid_alive(pid) else None

    def is_running(self) -> bool:
        return self.pid is not None

    def start(self) -> None:
        """Initialise (first time), start, wait until it accepts connections,
        create the database.  A server left running from an earlier session
        (a killed runner) is stopped first: it may listen on another port."""
        if self.is_running():
            self.stop()
        _give(self.root, self._user, 0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        if not port_is_free(self.port):
            raise InfraError(f"port {self.port} is in use; cannot start PostgreSQL there")
        _run(
            self._ctl("start", "-l", str(self.log_file), "-o", self._server_args()),
            cwd=self.root,
            timeout=self.timeout + 5,
            what="PostgreSQL start",
            log=self.log_file,
        )
        ensure_database(self.url)

    def stop(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Stop with ``pg_ctl stop -m mode`` (fast: disconnect clients, clean
        shutdown; immediate: crash-like, recovery on the next start)."""
        if not self.is_running():
            return
        _run(
            self._ctl("stop", "-m", mode),
            cwd=self.root,
            timeout=self.timeout + 5,
            what="PostgreSQL stop",
            log=self.log_file,
        )

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        """Stop and delete the cluster and its directory."""
        self.stop(mode="immediate")
        _remove_root(self.root, self._link)

    def _ctl(self, action: str, *args: str) -> list[str]:
        argv = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-w"]
        argv += ["-t", str(int(self.timeout)), action, *args]
        return _as_user(self._user, argv)

    def _initdb(self) -> None:
        argv = [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-A", "trust"]
        argv += ["-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"]
        _run(_as_user(self._user, argv), cwd=self.root, timeout=120, what="initdb", log=None)

    def _server_args(self) -> str:
        # The Unix socket goes next to the data when the path fits in sun_path;
        # otherwise there is none (everything here uses TCP anyway).
        socket_dir = str(self.root) if len(str(self.root)) + 20 < SUN_PATH_MAX else ""
        options = {"listen_addresses": LOCALHOST, **self.server_options}
        args = ["-p", str(self.port), "-k", socket_dir]
        for key, value in options.items():
            args += ["-c", f"{key}={value}"]
        return shlex.join(args)


# -- RabbitMQ -------------------------------------------------------------


def _find_rabbitmq_bin() -> Path:
    # Debian's /usr/sbin wrappers switch to the rabbitmq user with its HOME and
    # cookie; the scripts behind them take our environment as it is.
    candidates = [Path("/usr/lib/rabbitmq/bin")]
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(Path(found).parent)
    for candidate in candidates:
        if (candidate / "rabbitmq-server").exists() and (candidate / "rabbitmqctl").exists():
            return candidate
    raise InfraError("RabbitMQ not found (apt-get install rabbitmq-server)")


class ThrowawayRabbitMQ:
    """A private RabbitMQ node under ``base_dir/<name>`` on its own ports.

    The node has its own name, Erlang cookie (``HOME`` is its directory),
    Mnesia directory, logs and config, listens on 127.0.0.1 only and keeps
    its data across ``stop()`` / ``restart()``.  The default user
    guest/guest may log in from localhost only, which is all we need.

    ``plugins=True`` enables the management UI and Prometheus endpoint on
    ports of their own; it costs ~1.5 s at start and several seconds at stop,
    so tests leave it off.  The epmd daemon the first node starts (if none
    runs) stays running afterwards, as it does for any Erlang node.
    """

    def __init__(
        self,
        base_dir: Path | str,
        *,
        port: int | None = None,
        dist_port: int | None = None,
        nodename: str | None = None,
        name: str = "rabbitmq",
        plugins: bool = False,
        management_port: int | None = None,
        prometheus_port: int | None = None,
        bin_dir: Path | None = None,
        timeout: float = 90.0,
    ) -> None:
        self._user = _service_user("rabbitmq")
        self._link = Path(base_dir).absolute() / name
        self.root = _server_root(Path(base_dir), name, self._user)
        self.port = port or find_rabbitmq_port()
        self.dist_port = dist_port or self.port + 10
        if self.dist_port + RABBIT_CLI_DIST_OFFSET + RABBIT_CLI_DIST_SPAN > 65_535:
            raise InfraError(
                f"distribution port {self.dist_port} too high: rabbitmqctl binds "
                f"{RABBIT_CLI_DIST_OFFSET} above it; pick a port below 55000"
            )
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:10]
        self.nodename = nodename or f"pacs-{digest}@localhost"
        self.plugins = plugins
        self.management_port = (management_port or find_free_port()) if plugins else None
        self.prometheus_port = (prometheus_port or find_free_port()) if plugins else None
        self.bin_dir = bin_dir or _find_rabbitmq_bin()
        self.timeout = timeout
        self.pid_file = self.root / "rabbit.pid"
        self.log_dir = self.root / "log"

    def __repr__(self) -> str:
        return f"ThrowawayRabbitMQ(port={self.port}, node={self.nodename!r})"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{LOCALHOST}:{self.port}/"

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"{self.nodename}.log"

    @property
    def pid(self) -> int | None:
        """The Erlang VM's PID while it runs."""
        pid = read_pid_file(self.pid_file)
        return pid if pid is not None and pid_alive(pid) else None

    def is_running(self) -> bool:
        return self.pid is not None

    def environment(self) -> dict[str, str]:
        """What the rabbitmq scripts (server and CLI) need to find this node."""
        return {
            "HOME": str(self.root),
            "LC_ALL": "C.UTF-8",
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": LOCALHOST,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "ERL_EPMD_ADDRESS": LOCALHOST,
        }

    def start(self) -> None:
        """Start the node and wait until it accepts an AMQP login.  A node left
        running from an earlier session is stopped first."""
        if self.is_running():
            self.stop()
        busy = [p for p in (self.port, self.dist_port) if not port_is_free(p)]
        if busy:
            raise InfraError(f"port(s) {busy} in use; cannot start RabbitMQ there")
        self._write_config()
        self.pid_file.unlink(missing_ok=True)
        _run(
            _as_user(
                self._user,
                [str(self.bin_dir / "rabbitmq-server"), "-detached"],
                self.environment(),
            ),
            cwd=self.root,
            timeout=60,
            what="rabbitmq-server -detached",
            log=None,
        )
        self._wait_started()

    def stop(self) -> None:
        """Stop the node by its PID: SIGTERM makes Erlang/OTP run the same
        orderly shutdown as ``rabbitmqctl stop``, without the seconds the CLI
        needs to boot; SIGKILL only if it does not exit within the timeout.
        Returns once the VM and its helper processes (erl_child_setup,
        inet_gethost) are gone, so the ports are free for a restart."""
        pid = self.pid
        if pid is None:
            return
        tree = process_tree(pid)
        os.kill(pid, signal.SIGTERM)
        if not _wait_exit([pid], self.timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # The helpers exit when the VM closes their pipes; give them a moment.
        if not _wait_exit(tree, 10):
            for straggler in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(straggler, signal.SIGKILL)
            _wait_exit(tree, 10)
        self.pid_file.unlink(missing_ok=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        """Stop and delete the node's directory."""
        self.stop()
        _remove_root(self.root, self._link)

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -n NODE args`` against this node; its stdout."""
        argv = [str(self.bin_dir / "rabbitmqctl"), "-n", self.nodename, *args]
        return _run(
            _as_user(self._user, argv, self.environment()),
            cwd=self.root,
            timeout=timeout,
            what=f"rabbitmqctl {' '.join(args)}",
            log=None,
        )

    def _write_config(self) -> None:
        _give(self.root, self._user, 0o755)
        lines = ["log.console = false", "log.file.level = info"]
        plugins: list[str] = []
        if self.plugins:
            plugins = ["rabbitmq_management", "rabbitmq_prometheus"]
            lines += [
                f"management.tcp.ip = {LOCALHOST}",
                f"management.tcp.port = {self.management_port}",
                f"prometheus.tcp.ip = {LOCALHOST}",
                f"prometheus.tcp.port = {self.prometheus_port}",
            ]
        # Writing enabled_plugins directly is what `rabbitmq-plugins enable
        # --offline` does, minus its second of CLI start-up.
        files = {
            "rabbitmq.conf": "\n".join(lines) + "\n",
            "enabled_plugins": f"[{','.join(plugins)}].\n",
        }
        for filename, content in files.items():
            path = self.root / filename
            path.write_text(content)
            _give(path, self._user, 0o644)

    def _wait_started(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if run_sync(lambda: probe_rabbitmq(self.url, 2.0)) is None:
                if self.prometheus_port is not None:
                    wait_for_tcp(LOCALHOST, self.prometheus_port, max(1.0, deadline - time.monotonic()))
                return
            pid = read_pid_file(self.pid_file)
            if pid is not None and not pid_alive(pid):
                raise InfraError(f"RabbitMQ exited while starting:\n{tail_file(self.log_file)}")
            time.sleep(0.2)
        raise InfraError(
            f"RabbitMQ not accepting connections on port {self.port} after "
            f"{self.timeout:g}s:\n{tail_file(self.log_file)}"
        )


def _wait_exit(pids: Sequence[int], timeout: float) -> bool:
    """Wait until none of ``pids`` is alive; whether that happened in time."""
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
