"""Bearer tokens and SMART-style scopes for the FHIR API.

Scopes are `system/<Type|*>.<permissions>`: SMART v1 `read` (or `*`, read and write) and SMART v2
letters `c r u d s` in that order (`rs`, `cruds`). Reading a resource by id needs `r`, searching
needs `s`; v1 `read` grants both. Only the `system/` context is accepted (backend services).

Every request looks the token's SHA-256 up in the database (one indexed query, no cache), so a
revoked token is refused from the next request on.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from gateway.fhir_outcome import Forbidden, Unauthenticated
from storage.queries import Executor
from storage.tokens import (
    TOKEN_PREFIX,
    TokenGrant,
    create_token,
    hash_token,
    lookup_token,
    lookup_token_and_group,
)

MAX_TOKEN_LENGTH: Final = 256
_SCOPE = re.compile(r"system/(?P<type>\*|[A-Z][A-Za-z]{0,63})\.(?P<perms>[a-z*]+)", re.ASCII)
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*", re.ASCII)
_V2_ORDER: Final = "cruds"


class Interaction(enum.StrEnum):
    READ = "read"
    SEARCH = "search"


class InvalidScope(ValueError):
    """A scope string that is not `system/<Type|*>.<read|write|*|cruds letters>`."""


@dataclass(frozen=True, slots=True)
class Scope:
    resource_type: str
    """A FHIR resource type, or `*` for all."""
    read: bool
    search: bool

    def allows(self, resource_type: str, interaction: Interaction) -> bool:
        if self.resource_type not in ("*", resource_type):
            return False
        return self.read if interaction is Interaction.READ else self.search


def parse_scope(text: str) -> Scope:
    """One scope string; raises `InvalidScope`."""
    match = _SCOPE.fullmatch(text)
    if match is None:
        raise InvalidScope(f"not a system/<Type|*>.<permissions> scope: {text!r}")
    perms = match.group("perms")
    if perms in ("read", "*"):
        return Scope(match.group("type"), read=True, search=True)
    if perms == "write":
        return Scope(match.group("type"), read=False, search=False)
    position = -1
    for letter in perms:
        index = _V2_ORDER.find(letter)
        if index <= position:
            raise InvalidScope(f"permissions must be letters of 'cruds' in order: {text!r}")
        position = index
    return Scope(match.group("type"), read="r" in perms, search="s" in perms)


def allows(scopes: Iterable[str], resource_type: str, interaction: Interaction) -> bool:
    """Whether any of `scopes` (unparseable ones ignored) permits the interaction."""
    for text in scopes:
        try:
            scope = parse_scope(text)
        except InvalidScope:
            continue
        if scope.allows(resource_type, interaction):
            return True
    return False


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None when no bearer was sent."""
    if authorization is None:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip()


def _well_formed(authorization: str | None) -> str:
    """The bearer token of the header, checked for shape; raises `Unauthenticated` (401)."""
    token = bearer_token(authorization)
    if token is None:
        raise Unauthenticated("a bearer token is required", token_given=False)
    if (
        not token.startswith(TOKEN_PREFIX)
        or len(token) > MAX_TOKEN_LENGTH
        or not _TOKEN68.fullmatch(token)
    ):
        raise Unauthenticated("the bearer token is not valid", token_given=True)
    return token


async def authenticate(db: Executor, authorization: str | None) -> TokenGrant:
    """The grant of the request's bearer token; raises `Unauthenticated` (401)."""
    grant = await lookup_token(db, hash_token(_well_formed(authorization)))
    if grant is None:
        raise Unauthenticated("the bearer token is unknown or revoked", token_given=True)
    return grant


async def authenticate_with_group(
    db: Executor, authorization: str | None, patient_ids: Sequence[int]
) -> tuple[TokenGrant, tuple[int, ...]]:
    """`authenticate`, and the patient group of `patient_ids` read in the same round trip.

    The group may be used only after `authorize` accepts the grant.
    """
    grant, group = await lookup_token_and_group(
        db, hash_token(_well_formed(authorization)), patient_ids
    )
    if grant is None:
        raise Unauthenticated("the bearer token is unknown or revoked", token_given=True)
    return grant, group


def authorize(grant: TokenGrant, resource_type: str, interaction: Interaction) -> None:
    """Raise `Forbidden` (403) unless the grant's scopes permit the interaction."""
    if not allows(grant.scopes, resource_type, interaction):
        needed = f"system/{resource_type}.read"
        raise Forbidden(f"this token lacks the scope {needed}", scope=needed)


async def issue_token(db: Executor, name: str, scopes: Sequence[str]) -> str:
    """Check the scopes, store a new token named `name`, return it (shown once).

    Raises `InvalidScope` for a malformed scope, `storage.tokens.TokenNameTaken` for a used name.
    """
    if not scopes:
        raise InvalidScope("a token needs at least one scope")
    for scope in scopes:
        parse_scope(scope)
    if not name or len(name) > 200 or not name.isprintable():
        raise ValueError("a token name is 1 to 200 printable characters")
    return await create_token(db, name, scopes)
