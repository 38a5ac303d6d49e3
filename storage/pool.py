"""The asyncpg connection pool of the hot path, and the classification of database errors.

`is_transient` is the one place that decides whether a failure means "the database is not
reachable right now" (retry, acknowledge nothing) or "this statement is wrong for these rows".
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

from ingest.errors import StorageUnavailable


@dataclass(frozen=True, slots=True)
class PoolSettings:
    dsn: str
    min_size: int = 1
    max_size: int = 10
    connect_timeout: float = 5.0
    statement_timeout_ms: int = 30_000
    application_name: str = "qantara"


async def create_pool(settings: PoolSettings) -> asyncpg.Pool:
    """A pool whose connections carry the application name and a statement timeout.

    No reset query on release: asyncpg's default sends `pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL` each time a connection goes back to the pool, one more round trip
    (0.25-0.35 ms) on every commit of the ingest pipeline, after COMMIT and before the
    acknowledgements. Our pooled connections never change session state: settings come with the
    connection (`server_settings`) or are `SET LOCAL`/`set_config(..., true)`, advisory locks are
    transaction-scoped (`storage.ledger`), no LISTEN, no cursor outlives its transaction;
    migrations and `qantara db roles` (`SET ROLE`, session advisory lock) use connections of
    their own. A transaction left open is still rolled back on release (asyncpg does that
    before calling `reset`).

    A server that cannot be reached is `StorageUnavailable` (a command's exit status 3).
    """
    try:
        pool = await asyncpg.create_pool(
            settings.dsn,
            min_size=settings.min_size,
            max_size=settings.max_size,
            timeout=settings.connect_timeout,
            command_timeout=settings.statement_timeout_ms / 1000 + 5,
            server_settings={
                "application_name": settings.application_name,
                "statement_timeout": str(settings.statement_timeout_ms),
            },
            reset=_keep_session,
        )
    except Exception as exc:
        if is_transient(exc):
            raise StorageUnavailable(f"cannot connect: {type(exc).__name__}") from exc
        raise
    assert pool is not None  # noqa: S101 - asyncpg types the result as optional
    return pool


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's `reset`: nothing to undo (see `create_pool`)."""


_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "58")  # connection, resources, operator, system


def is_transient(exc: BaseException) -> bool:
    """True when the failure says the database is unreachable or unavailable, not the data bad."""
    if isinstance(exc, OSError | asyncio.TimeoutError | ConnectionError):
        return True
    if isinstance(
        exc,
        asyncpg.InterfaceError
        | asyncpg.exceptions.ConnectionDoesNotExistError
        # "cannot switch to state ...": a connection left mid-operation when the server went.
        | asyncpg.InternalClientError,
    ):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or ""
        if sqlstate.startswith(_TRANSIENT_SQLSTATE_CLASSES):
            return True
        # 40001 serialization / 40P01 deadlock: retrying the same batch is right.
        return sqlstate in ("40001", "40P01")
    return False


def is_refused_login(exc: BaseException) -> bool:
    """True when the server refused the connection's settings: no such database (3D000), no
    such role, a wrong password or no pg_hba.conf entry (class 28). A configuration error of
    the URL, not an outage: retrying will not help."""
    sqlstate = (
        getattr(exc, "sqlstate", None) or "" if isinstance(exc, asyncpg.PostgresError) else ""
    )
    return sqlstate == "3D000" or sqlstate.startswith("28")
