"""Identifier systems: the short names senders use (`CIN`) and the URIs FHIR shows.

This is the one place that maps them. Payloads and HL7 segments name systems by short names,
which is what `patient_identifier.system` stores; FHIR identifiers carry URIs. A short name we do
not know maps to `urn:qantara:sid:<name>`; a system stored as a URI is shown as it is.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

UNKNOWN_SYSTEM_PREFIX: Final = "urn:qantara:sid:"

SYSTEM_URIS: Final = MappingProxyType(
    {
        "CIN": "https://qantara.ma/fhir/sid/cin",
    }
)
"""Short system name as senders write it → FHIR identifier system URI."""

_SHORT_NAMES: Final = MappingProxyType({uri: short for short, uri in SYSTEM_URIS.items()})


def _is_uri(system: str) -> bool:
    return ":" in system


def system_uri(stored: str) -> str:
    """The FHIR `Identifier.system` of a system as stored."""
    if _is_uri(stored):
        return stored
    return SYSTEM_URIS.get(stored) or UNKNOWN_SYSTEM_PREFIX + stored


def stored_systems(system: str) -> tuple[str, ...]:
    """The stored spellings that a search's `system` (short name or URI) stands for."""
    if not _is_uri(system):
        uri = SYSTEM_URIS.get(system)
        return (system, uri) if uri else (system, UNKNOWN_SYSTEM_PREFIX + system)
    short = _SHORT_NAMES.get(system)
    if short is not None:
        return (short, system)
    if system.startswith(UNKNOWN_SYSTEM_PREFIX) and len(system) > len(UNKNOWN_SYSTEM_PREFIX):
        return (system[len(UNKNOWN_SYSTEM_PREFIX) :], system)
    return (system,)
