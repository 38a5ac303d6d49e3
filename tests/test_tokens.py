"""API tokens in the database: only a digest is stored; revocation is immediate."""

from __future__ import annotations

import asyncpg
import pytest

from gateway.auth import InvalidScope, issue_token
from storage.tokens import (
    TokenGrant,
    TokenNameTaken,
    create_token,
    hash_token,
    list_tokens,
    lookup_token,
    lookup_token_and_group,
    revoke_token,
)


async def test_created_token_is_prefixed_and_looked_up_by_its_digest(
    api_pool: asyncpg.Pool,
) -> None:
    token = await create_token(api_pool, "lookup-by-digest", ["system/Observation.read"])
    assert token.startswith("qtk_")
    assert len(token) >= 40
    grant = await lookup_token(api_pool, hash_token(token))
    assert grant == TokenGrant("lookup-by-digest", ("system/Observation.read",))


async def test_only_the_digest_of_a_token_is_stored(api_pool: asyncpg.Pool) -> None:
    token = await create_token(api_pool, "digest-only", ["system/*.read"])
    row = await api_pool.fetchrow("SELECT * FROM api_token WHERE name = $1", "digest-only")
    assert row is not None
    assert token not in {str(v) for v in row.values()}
    assert bytes(row["token_hash"]) == hash_token(token)


async def test_unknown_token_is_not_found(api_pool: asyncpg.Pool) -> None:
    assert await lookup_token(api_pool, hash_token("qtk_never-issued")) is None


async def test_revoked_token_is_no_longer_found(api_pool: asyncpg.Pool) -> None:
    token = await create_token(api_pool, "to-revoke", ["system/*.read"])
    assert await revoke_token(api_pool, "to-revoke") is True
    assert await lookup_token(api_pool, hash_token(token)) is None


async def test_revoking_twice_or_an_unknown_name_reports_false(api_pool: asyncpg.Pool) -> None:
    await create_token(api_pool, "revoke-twice", ["system/*.read"])
    assert await revoke_token(api_pool, "revoke-twice") is True
    assert await revoke_token(api_pool, "revoke-twice") is False
    assert await revoke_token(api_pool, "no-such-token") is False


async def test_a_token_name_is_never_reused(api_pool: asyncpg.Pool) -> None:
    await create_token(api_pool, "unique-name", ["system/*.read"])
    with pytest.raises(TokenNameTaken):
        await create_token(api_pool, "unique-name", ["system/*.read"])


async def test_listing_shows_names_scopes_and_revocation_but_no_token(
    api_pool: asyncpg.Pool,
) -> None:
    await create_token(api_pool, "listed-live", ["system/Patient.read"])
    await create_token(api_pool, "listed-revoked", ["system/*.read"])
    await revoke_token(api_pool, "listed-revoked")
    listed = {t.name: t for t in await list_tokens(api_pool)}
    assert listed["listed-live"].scopes == ("system/Patient.read",)
    assert listed["listed-live"].revoked_at is None
    assert listed["listed-revoked"].revoked_at is not None


async def test_issuing_a_token_with_a_malformed_scope_stores_nothing(
    api_pool: asyncpg.Pool,
) -> None:
    with pytest.raises(InvalidScope):
        await issue_token(api_pool, "bad-scope", ["system/Observation.read", "read-all"])
    assert await api_pool.fetchval("SELECT count(*) FROM api_token WHERE name = 'bad-scope'") == 0


async def test_token_and_patient_group_come_in_one_lookup(api_pool: asyncpg.Pool) -> None:
    token = await create_token(api_pool, "lookup-with-group", ["system/*.read"])
    survivor = await api_pool.fetchval("INSERT INTO patient DEFAULT VALUES RETURNING id")
    merged = await api_pool.fetchval(
        "INSERT INTO patient (replaced_by) VALUES ($1) RETURNING id", survivor
    )
    grant, group = await lookup_token_and_group(api_pool, hash_token(token), (merged,))
    assert grant == TokenGrant("lookup-with-group", ("system/*.read",))
    assert group == tuple(sorted((survivor, merged)))
    assert await lookup_token_and_group(api_pool, hash_token(token), ()) == (grant, ())


async def test_unknown_or_revoked_token_gives_no_group(api_pool: asyncpg.Pool) -> None:
    patient = await api_pool.fetchval("INSERT INTO patient DEFAULT VALUES RETURNING id")
    unknown = hash_token("qtk_never-issued")
    assert await lookup_token_and_group(api_pool, unknown, (patient,)) == (None, ())
    token = await create_token(api_pool, "revoked-with-group", ["system/*.read"])
    await revoke_token(api_pool, "revoked-with-group")
    assert await lookup_token_and_group(api_pool, hash_token(token), (patient,)) == (None, ())
