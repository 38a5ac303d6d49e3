"""API bearer tokens: only a SHA-256 of each token is stored.

A token is `qtk_` followed by 43 URL-safe characters (256 random bits). It is shown once, when it
is created; the database keeps its digest, its name and its scopes. Revoking sets `revoked_at`;
a revoked token is refused from the next request on, since every request looks its digest up.
Scope strings are stored as given: their grammar is checked by `gateway.auth` before they get here.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from ingest.errors import StorageUnavailable
from storage.pool import is_transient
from storage.queries import Executor, patient_group_sql

TOKEN_PREFIX = "qtk_"  # noqa: S105 - a public prefix, not a secret


class TokenNameTaken(Exception):
    """A token of that name exists already (revoked or not); names are never reused."""


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What a live token allows: its name (for audit and logs) and its scopes."""

    name: str
    scopes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """One token as listed by `qantara token list`; never the token itself."""

    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None


def generate_token() -> str:
    """A new random token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    """The digest stored for and looked up by a token."""
    return hashlib.sha256(token.encode("utf-8")).digest()


async def create_token(db: Executor, name: str, scopes: Sequence[str]) -> str:
    """Store a new token named `name` with `scopes`; return the token, shown only this once.

    Raises `TokenNameTaken` when the name is in use (including by a revoked token).
    """
    token = generate_token()
    try:
        await db.execute(
            "INSERT INTO api_token (name, token_hash, scopes) VALUES ($1, $2, $3::text[])",
            name,
            hash_token(token),
            list(scopes),
        )
    except asyncpg.UniqueViolationError as exc:
        raise TokenNameTaken(name) from exc
    return token


async def revoke_token(db: Executor, name: str) -> bool:
    """Revoke the live token named `name`; False when there is none (unknown or revoked)."""
    status: str = await db.execute(
        "UPDATE api_token SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL", name
    )
    return status.endswith(" 1")


async def lookup_token(db: Executor, token_hash: bytes) -> TokenGrant | None:
    """The grant of a live token by its digest; None when unknown or revoked.

    Raises `StorageUnavailable` when the database cannot answer.
    """
    try:
        row = await db.fetchrow(
            "SELECT name, scopes FROM api_token WHERE token_hash = $1 AND revoked_at IS NULL",
            token_hash,
        )
    except Exception as exc:
        if is_transient(exc):
            raise StorageUnavailable(type(exc).__name__) from exc
        raise
    if row is None:
        return None
    return TokenGrant(name=row["name"], scopes=tuple(row["scopes"]))


async def lookup_token_and_group(
    db: Executor, token_hash: bytes, patient_ids: Sequence[int]
) -> tuple[TokenGrant | None, tuple[int, ...]]:
    """`lookup_token` and `storage.queries.patient_group(patient_ids)` in one round trip.

    The group is computed whatever the token's scopes: the caller uses it only once the grant
    allows the request. An unknown or revoked token gives `(None, ())`.
    Raises `StorageUnavailable` when the database cannot answer.
    """
    try:
        row = await db.fetchrow(
            f"""SELECT t.name, t.scopes, ARRAY({patient_group_sql("$2")}) AS patient_group
                FROM api_token t WHERE t.token_hash = $1 AND t.revoked_at IS NULL""",  # noqa: S608
            token_hash,
            list(patient_ids),
        )
    except Exception as exc:
        if is_transient(exc):
            raise StorageUnavailable(type(exc).__name__) from exc
        raise
    if row is None:
        return None, ()
    return TokenGrant(name=row["name"], scopes=tuple(row["scopes"])), tuple(row["patient_group"])


async def list_tokens(db: Executor) -> list[TokenInfo]:
    """Every token ever created, oldest first."""
    rows = await db.fetch(
        "SELECT name, scopes, created_at, revoked_at FROM api_token ORDER BY created_at, id"
    )
    return [
        TokenInfo(
            name=r["name"],
            scopes=tuple(r["scopes"]),
            created_at=r["created_at"],
            revoked_at=r["revoked_at"],
        )
        for r in rows
    ]
