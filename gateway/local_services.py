"""The services Qantara needs, run on one machine: PostgreSQL and an MQTT broker.

Used by `qantara up` and by the test fixtures. Four ways to get them:

- `EmbeddedPostgres`: the `pgserver` wheel's PostgreSQL on a unix socket (nothing to install).
- `PrivatePostgres`: a throw-away cluster from the system's PostgreSQL binaries on a free TCP
  port, one we can stop, kill -9 and restart (fault tests).
- `PrivateMosquitto`: a private `mosquitto` on a free port with persistence in a temp dir.
- `EmbeddedBroker`: amqtt (MQTT 3.1.1 only) in this process, for machines without mosquitto.

Every wait is bounded; every process we start is stopped (then killed) by its owner. Processes are
started in their own session so a Ctrl-C at the terminal reaches us, not them. When we run as root,
PostgreSQL refuses to start and mosquitto would drop to its own user: both are started as a
service account (`postgres` / `mosquitto`, else `nobody`) that owns their temp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, cast
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import asyncpg

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
_POLL_INTERVAL = 0.05
_DDL_TIMEOUT = 30.0  # connect + CREATE/DROP DATABASE
_LOG_TAIL_BYTES = 4000

StopMode = Literal["smart", "fast", "immediate"]
_STOP_SIGNALS: dict[StopMode, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}


class LocalServiceError(RuntimeError):
    """A local service could not be found, started or stopped."""


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that was free on `host` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return cast(int, sock.getsockname()[1])


# --- probes ---------------------------------------------------------------------------------------


def _mqtt_string(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


def _mqtt_remaining_length(length: int) -> bytes:
    encoded = bytearray()
    while True:
        length, digit = divmod(length, 128)
        encoded.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(encoded)


def _mqtt_connect_packet(client_id: str, username: str | None, password: str | None) -> bytes:
    """MQTT 3.1.1 CONNECT, clean session, keep-alive 10 s."""
    flags = 0x02
    payload = _mqtt_string(client_id.encode())
    if username is not None:
        flags |= 0x80
        payload += _mqtt_string(username.encode())
        if password is not None:
            flags |= 0x40
            payload += _mqtt_string(password.encode())
    body = _mqtt_string(b"MQTT") + bytes([4, flags]) + (10).to_bytes(2, "big") + payload
    return b"\x10" + _mqtt_remaining_length(len(body)) + body


async def broker_answers(url: str, timeout: float = 2.0) -> bool:  # noqa: ASYNC109 - a probe bounds itself
    """True if an MQTT broker at `mqtt://[user:pass@]host:port` (or `mqtts://`) accepts a
    CONNECT from us (CONNACK return code 0). We then DISCONNECT."""
    parts = urlsplit(url)
    tls = parts.scheme == "mqtts"
    host = parts.hostname or LOCALHOST
    port = parts.port or (8883 if tls else 1883)
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    packet = _mqtt_connect_packet(f"qantara-probe-{secrets.token_hex(4)}", username, password)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=ssl.create_default_context() if tls else None
            )
            writer.write(packet)
            await writer.drain()
            connack = await reader.readexactly(4)
            accepted = connack[:2] == b"\x20\x02" and connack[3] == 0
            if accepted:
                writer.write(b"\xe0\x00")  # DISCONNECT
                await writer.drain()
            return accepted
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(timeout):
                    await writer.wait_closed()


async def postgres_answers(dsn: str, timeout: float = 2.0) -> bool:  # noqa: ASYNC109 - a probe bounds itself
    """True if PostgreSQL at `dsn` accepts a connection and answers `SELECT 1`."""
    try:
        async with asyncio.timeout(timeout):
            conn = await asyncpg.connect(dsn, timeout=timeout)
            try:
                return bool(await conn.fetchval("SELECT 1") == 1)
            finally:
                await conn.close()
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False


# --- databases ------------------------------------------------------------------------------------


def database_dsn(server_dsn: str, dbname: str) -> str:
    """`server_dsn` (a `postgresql://` URL) pointing at database `dbname` instead."""
    parts = urlsplit(server_dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("expected a postgresql:// URL")
    return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def ensure_database(server_dsn: str, dbname: str) -> str:
    """Create database `dbname` on the server if it is missing; return its DSN."""
    async with asyncio.timeout(_DDL_TIMEOUT):
        conn = await asyncpg.connect(server_dsn)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", dbname)
            if not exists:
                with contextlib.suppress(
                    asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError
                ):  # created concurrently by someone else: fine
                    await conn.execute(f"CREATE DATABASE {_quote_identifier(dbname)}")
                    logger.info("created database %s", dbname)
        finally:
            await conn.close()
    return database_dsn(server_dsn, dbname)


async def drop_database(server_dsn: str, dbname: str) -> None:
    """Drop database `dbname` if it exists, terminating its sessions (PostgreSQL >= 13)."""
    async with asyncio.timeout(_DDL_TIMEOUT):
        conn = await asyncpg.connect(server_dsn)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {_quote_identifier(dbname)} WITH (FORCE)")
        finally:
            await conn.close()


# --- processes ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Account:
    """The OS account a service runs as when we are root."""

    name: str
    uid: int
    gid: int


def _service_account(preferred: str) -> _Account | None:
    """None when not root (run as ourselves); else `preferred`, falling back to `nobody`."""
    if os.geteuid() != 0:
        return None
    for name in (preferred, "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return _Account(name, entry.pw_uid, entry.pw_gid)
    raise LocalServiceError(f"running as root and neither {preferred!r} nor 'nobody' exists")


def _make_owned_dir(prefix: str, account: _Account | None) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if account is not None:
        os.chown(path, account.uid, account.gid)
    return path


def _chown(path: Path, account: _Account | None) -> None:
    if account is not None:
        os.chown(path, account.uid, account.gid)


def _log_tail(path: Path) -> str:
    try:
        with path.open("rb") as log:
            log.seek(max(0, path.stat().st_size - _LOG_TAIL_BYTES))
            return log.read().decode(errors="backslashreplace")
    except OSError:
        return ""


async def _spawn(
    argv: list[str], log_path: Path, account: _Account | None, cwd: Path | None = None
) -> asyncio.subprocess.Process:
    """Start `argv` (as `account` if given) in its own session, output appended to `log_path`."""
    with log_path.open("ab") as log:
        _chown(log_path, account)
        # argv is built from a binary path we located and options we generated, no shell.
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            user=account.uid if account is not None else None,
            group=account.gid if account is not None else None,
            extra_groups=[] if account is not None else None,
        )


async def _run(
    argv: list[str], log_path: Path, account: _Account | None, time_limit: float
) -> None:
    """Run `argv` to completion within `time_limit` s; raise LocalServiceError if it fails."""
    proc = await _spawn(argv, log_path, account)
    try:
        async with asyncio.timeout(time_limit):
            returncode = await proc.wait()
    except TimeoutError:
        await _terminate(proc, signal.SIGKILL, 5.0)
        raise LocalServiceError(f"{Path(argv[0]).name} did not finish in {time_limit} s") from None
    if returncode != 0:
        raise LocalServiceError(
            f"{Path(argv[0]).name} exited with {returncode}:\n{_log_tail(log_path)}"
        )


async def _terminate(proc: asyncio.subprocess.Process, sig: signal.Signals, grace: float) -> int:
    """Send `sig`, wait up to `grace` s for the exit, then SIGKILL. Returns the exit code."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            async with asyncio.timeout(grace):
                return await proc.wait()
        except TimeoutError:
            logger.warning("pid %d ignored %s for %.0f s, killing it", proc.pid, sig.name, grace)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    return await proc.wait()  # after SIGKILL the exit is immediate


def _child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc; empty elsewhere)."""
    children = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path("/proc", entry, "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # state, ppid, ...
            if int(fields[1]) == pid:
                children.append(int(entry))
    return children


def _process_alive(pid: int) -> bool:
    try:
        stat = Path("/proc", str(pid), "stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie holds nothing


async def _wait_ready(
    what: str,
    proc: asyncio.subprocess.Process,
    probe: Any,
    log_path: Path,
    time_limit: float,
) -> None:
    """Poll `probe()` until true; error if the process exits or `time_limit` s pass first."""
    try:
        async with asyncio.timeout(time_limit):
            while True:
                if proc.returncode is not None:
                    raise LocalServiceError(
                        f"{what} exited with {proc.returncode} while starting:\n"
                        f"{_log_tail(log_path)}"
                    )
                if await probe():
                    return
                await asyncio.sleep(_POLL_INTERVAL)
    except TimeoutError:
        await _terminate(proc, signal.SIGKILL, 5.0)
        raise LocalServiceError(
            f"{what} did not answer within {time_limit} s:\n{_log_tail(log_path)}"
        ) from None


# --- PostgreSQL -----------------------------------------------------------------------------------


def _postgres_major(bin_dir: Path) -> int:
    try:
        out = subprocess.run(  # noqa: S603 - our located binary, fixed argument
            [str(bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return -1
    match = re.search(r"\)\s*(\d+)", out)
    return int(match.group(1)) if match else -1


def find_postgres_bin_dir() -> Path:
    """The newest PostgreSQL binaries: `initdb` on PATH or /usr/lib/postgresql/*/bin."""
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    candidates.extend(Path("/usr/lib/postgresql").glob("*/bin"))
    usable = {
        d.resolve()
        for d in candidates
        if all(os.access(d / exe, os.X_OK) for exe in ("initdb", "postgres"))
    }
    if not usable:
        raise LocalServiceError(
            "no PostgreSQL binaries (initdb, postgres) on PATH or under /usr/lib"
        )
    return max(usable, key=lambda d: (_postgres_major(d), str(d)))


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on 127.0.0.1:<port>, trust auth, fsync on.

    `await start()` (initdb on first start), `await stop(mode)`, `await kill()` (SIGKILL: a
    crash), `await restart()`, `dsn(dbname)`, `await cleanup()` (stop and delete the data).
    Also an async context manager. The unix socket lives in the data directory.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        bin_dir: Path | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.host = LOCALHOST
        self.port = port if port is not None else free_port()
        self._bin_dir = bin_dir
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._account = _service_account("postgres")
        self._base: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def data_dir(self) -> Path:
        if self._base is None:
            raise LocalServiceError("PrivatePostgres has not been started")
        return self._base / "data"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / "postgres.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{quote(dbname, safe='')}"

    async def _initdb(self, bin_dir: Path) -> None:
        self._base = _make_owned_dir("qantara-pg-", self._account)
        await _run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",  # throw-away cluster; the server itself runs with fsync on
                "--no-instructions",
            ],
            self.log_path,
            self._account,
            time_limit=self._start_timeout,
        )
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.data_dir}'",
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "max_connections": "100",
            "logging_collector": "off",
        }
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as f:
            f.write("\n# qantara PrivatePostgres\n")
            f.writelines(f"{key} = {value}\n" for key, value in settings.items())

    async def start(self) -> None:
        if self.running:
            return
        bin_dir = self._bin_dir
        if bin_dir is None:
            bin_dir = self._bin_dir = await asyncio.to_thread(find_postgres_bin_dir)
        if self._base is None:
            await self._initdb(bin_dir)
        self._proc = await _spawn(
            [str(bin_dir / "postgres"), "-D", str(self.data_dir)], self.log_path, self._account
        )
        proc = self._proc
        await _wait_ready(
            "postgres",
            proc,
            lambda: postgres_answers(self.dsn(), timeout=1.0),
            self.log_path,
            self._start_timeout,
        )
        logger.info("private PostgreSQL ready on %s:%d (pid %d)", self.host, self.port, proc.pid)

    async def stop(self, mode: StopMode = "fast") -> None:
        """Shut down (smart: wait for clients; fast: disconnect them; immediate: no checkpoint)."""
        if self._proc is None:
            return
        await _terminate(self._proc, _STOP_SIGNALS[mode], self._stop_timeout)
        self._proc = None

    async def kill(self) -> None:
        """SIGKILL the postmaster and its children, as a crash would, and wait until they are
        gone (so the next start finds no live backend holding the old shared memory)."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        children = _child_pids(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await proc.wait()
        try:
            async with asyncio.timeout(self._stop_timeout):
                while any(_process_alive(pid) for pid in children):  # noqa: ASYNC110 - no event for another process's exit
                    await asyncio.sleep(_POLL_INTERVAL)
        except TimeoutError:
            raise LocalServiceError("postgres children survived SIGKILL") from None

    async def restart(self, mode: StopMode = "fast") -> None:
        await self.stop(mode)
        await self.start()

    async def cleanup(self) -> None:
        """Stop the server (immediately) and delete its files."""
        await self.stop("immediate")
        if self._base is not None:
            await asyncio.to_thread(shutil.rmtree, self._base, True)
            self._base = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.cleanup()


class EmbeddedPostgres:
    """PostgreSQL from the `pgserver` wheel, on a unix socket (`dsn` is a postgresql:// URL).

    Synchronous (pgserver is): `start()`, `dsn`, `stop()`, or `with EmbeddedPostgres() as pg:`.
    From async code use `await asyncio.to_thread(pg.start)`. With no `data_dir`, a temp dir is
    used and deleted by `stop()`; with one, the data is kept.

    As root, pgserver runs PostgreSQL as an OS user `pgserver` that it creates with `useradd` if
    missing, makes the ancestors of the data dir and of its own binaries world-traversable
    (`chmod g+rx,o+rx`) and chowns the data dir to that user.
    """

    def __init__(self, data_dir: Path | None = None) -> None:
        self._data_dir = data_dir
        self._temp_base: Path | None = None
        self._server: Any = None
        self._dsn: str | None = None

    @property
    def dsn(self) -> str:
        if self._dsn is None:
            raise LocalServiceError("EmbeddedPostgres has not been started")
        return self._dsn

    def start(self) -> None:
        if self._server is not None:
            return
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (pgserver's lock dir).
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            try:
                from pgserver.postgres_server import get_server
            except ImportError as exc:
                raise LocalServiceError("the pgserver wheel is not installed") from exc
        if self._data_dir is None:
            self._temp_base = Path(tempfile.mkdtemp(prefix="qantara-pgserver-"))
            data_dir, cleanup_mode = self._temp_base / "data", "delete"
        else:
            self._data_dir.parent.mkdir(parents=True, exist_ok=True)
            data_dir, cleanup_mode = self._data_dir, "stop"
        started = time.monotonic()
        try:
            server = get_server(data_dir, cleanup_mode=cleanup_mode)
            dsn = str(server.get_uri())
        except (OSError, subprocess.SubprocessError, AssertionError, RuntimeError) as exc:
            self._remove_temp()
            raise LocalServiceError(f"pgserver could not start PostgreSQL: {exc}") from exc
        self._server, self._dsn = server, dsn
        logger.info(
            "embedded PostgreSQL ready in %.1f s (data in %s)", time.monotonic() - started, data_dir
        )

    def stop(self) -> None:
        if self._server is not None:
            server, self._server, self._dsn = self._server, None, None
            server.cleanup()
        self._remove_temp()

    def _remove_temp(self) -> None:
        if self._temp_base is not None:
            shutil.rmtree(self._temp_base, ignore_errors=True)
            self._temp_base = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- MQTT brokers ---------------------------------------------------------------------------------


def find_mosquitto() -> Path | None:
    """The mosquitto binary: on PATH or in the usual sbin directories."""
    on_path = shutil.which("mosquitto")
    if on_path is not None:
        return Path(on_path)
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin"):
        path = Path(candidate)
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


class PrivateMosquitto:
    """A private mosquitto on 127.0.0.1:<port>, anonymous, with persistence in a temp dir.

    `await start()`, `await stop()` (SIGTERM: saves its database), `await kill()` (SIGKILL),
    `await restart()` (same port and persistence dir: sessions and retained messages survive
    a `stop`), `url`, `await cleanup()`. Also an async context manager.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: Path | None = None,
        max_inflight_messages: int = 1000,
        max_queued_messages: int = 100_000,
        max_packet_size: int = 16 * 1024 * 1024,
        autosave_interval: int = 10,
        start_timeout: float = 20.0,
        stop_timeout: float = 20.0,
    ) -> None:
        self.host = LOCALHOST
        self.port = port if port is not None else free_port()
        self._binary = binary
        self._limits = {
            "max_inflight_messages": max_inflight_messages,
            "max_queued_messages": max_queued_messages,
            "max_packet_size": max_packet_size,
            "autosave_interval": autosave_interval,
        }
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._account = _service_account("mosquitto")
        self._base: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def log_path(self) -> Path:
        if self._base is None:
            raise LocalServiceError("PrivateMosquitto has not been started")
        return self._base / "mosquitto.log"

    def _write_config(self, base: Path) -> Path:
        persistence = base / "persistence"
        persistence.mkdir()
        _chown(persistence, self._account)
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {persistence}/",
            *(f"{key} {value}" for key, value in self._limits.items()),
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        config = base / "mosquitto.conf"
        config.write_text("\n".join(lines) + "\n")
        _chown(config, self._account)
        return config

    async def start(self) -> None:
        if self.running:
            return
        binary = self._binary or find_mosquitto()
        if binary is None:
            raise LocalServiceError("no mosquitto binary on PATH or in /usr/sbin")
        if self._base is None:
            self._base = _make_owned_dir("qantara-mosquitto-", self._account)
            self._write_config(self._base)
        self._proc = await _spawn(
            [str(binary), "-c", str(self._base / "mosquitto.conf")],
            self.log_path,
            self._account,
            cwd=self._base,
        )
        proc = self._proc
        await _wait_ready(
            "mosquitto",
            proc,
            lambda: broker_answers(self.url, timeout=1.0),
            self.log_path,
            self._start_timeout,
        )
        logger.info("private mosquitto ready at %s (pid %d)", self.url, proc.pid)

    async def stop(self) -> None:
        if self._proc is not None:
            await _terminate(self._proc, signal.SIGTERM, self._stop_timeout)
            self._proc = None

    async def kill(self) -> None:
        if self._proc is not None:
            await _terminate(self._proc, signal.SIGKILL, self._stop_timeout)
            self._proc = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def cleanup(self) -> None:
        await self.stop()
        if self._base is not None:
            await asyncio.to_thread(shutil.rmtree, self._base, True)
            self._base = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.cleanup()


class EmbeddedBroker:
    """amqtt's broker in this process and event loop, MQTT 3.1.1 only, anonymous, no persistence.

    `async with EmbeddedBroker(port) as url:`; port 0 picks a free one.
    """

    def __init__(self, port: int = 0, *, start_timeout: float = 10.0) -> None:
        self.host = LOCALHOST
        self.port = port or free_port()
        self._start_timeout = start_timeout
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> None:
        if self._broker is not None:
            return
        from amqtt.broker import Broker  # imported only where mosquitto is missing

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # No packet logger: it would log payloads.
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        broker = Broker(config)
        async with asyncio.timeout(self._start_timeout):
            await broker.start()
            self._broker = broker
            while not await broker_answers(self.url, timeout=1.0):  # noqa: ASYNC110 - polling a socket
                await asyncio.sleep(_POLL_INTERVAL)
        logger.info("embedded MQTT broker (amqtt) ready at %s", self.url)

    async def stop(self) -> None:
        if self._broker is not None:
            broker, self._broker = self._broker, None
            async with asyncio.timeout(self._start_timeout):
                await broker.shutdown()

    async def __aenter__(self) -> str:
        await self.start()
        return self.url

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
