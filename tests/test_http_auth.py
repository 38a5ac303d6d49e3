"""Bearer tokens on the FHIR routes: 401 without a usable token, 403 without the scope."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from storage.tokens import revoke_token
from tests.http_support import TokenFactory, validate_fhir

SEARCH = "/fhir/Observation?patient=1"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_no_token_is_401_with_a_bearer_challenge(client: httpx.AsyncClient) -> None:
    response = await client.get(SEARCH)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="qantara"'
    outcome = response.json()
    validate_fhir(outcome)
    assert outcome["issue"][0]["code"] == "security"


@pytest.mark.parametrize(
    "authorization", ["Bearer qtk_never-issued", "Bearer ", "Bearer not a token", "Bearer x"]
)
async def test_unknown_or_malformed_token_is_401_invalid_token(
    client: httpx.AsyncClient, authorization: str
) -> None:
    response = await client.get(SEARCH, headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == ('Bearer realm="qantara", error="invalid_token"')


async def test_other_authorization_scheme_is_401_without_error(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get(SEARCH, headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="qantara"'


async def test_token_without_the_resource_scope_is_403(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    token = await make_token("system/Patient.read")
    response = await client.get(SEARCH, headers=_bearer(token))
    assert response.status_code == 403
    outcome = response.json()
    validate_fhir(outcome)
    assert outcome["issue"][0]["code"] == "security"
    assert "system/Observation.read" in outcome["issue"][0]["diagnostics"]
    assert 'error="insufficient_scope"' in response.headers["www-authenticate"]


async def test_resource_scope_grants_its_own_type_only(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    token = await make_token("system/Observation.read")
    assert (await client.get(SEARCH, headers=_bearer(token))).status_code == 200
    response = await client.get("/fhir/Patient?identifier=X", headers=_bearer(token))
    assert response.status_code == 403


@pytest.mark.parametrize("scope", ["system/*.read", "system/Observation.rs", "system/*.cruds"])
async def test_wildcard_and_v2_scopes_grant_search(
    client: httpx.AsyncClient, make_token: TokenFactory, scope: str
) -> None:
    token = await make_token(scope)
    assert (await client.get(SEARCH, headers=_bearer(token))).status_code == 200


async def test_read_only_v2_scope_allows_read_but_not_search(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    token = await make_token("system/Observation.r")
    assert (await client.get(SEARCH, headers=_bearer(token))).status_code == 403
    response = await client.get("/fhir/Observation/v-9000000000000000000", headers=_bearer(token))
    assert response.status_code == 404  # allowed to read; there is no such row


async def test_revoked_token_is_refused_on_the_next_request(
    client: httpx.AsyncClient, api_pool: asyncpg.Pool, make_token: TokenFactory
) -> None:
    token = await make_token("system/*.read")
    assert (await client.get(SEARCH, headers=_bearer(token))).status_code == 200
    row = await api_pool.fetchrow("SELECT name FROM api_token ORDER BY id DESC LIMIT 1")
    assert await revoke_token(api_pool, row["name"])
    response = await client.get(SEARCH, headers=_bearer(token))
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


async def test_authentication_comes_before_parameter_checks(client: httpx.AsyncClient) -> None:
    response = await client.get("/fhir/Observation?date=garbage")
    assert response.status_code == 401


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_operational_endpoints_need_no_token(client: httpx.AsyncClient, path: str) -> None:
    assert (await client.get(path)).status_code == 200
