"""HTTP-facing errors of the FHIR API and the `OperationOutcome` bodies they become.

Each error carries its status, its FHIR issue type and a diagnostics sentence that names what was
wrong (a parameter, a resource type) without echoing patient data. `gateway.http` maps them to
responses in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from ingest.errors import QantaraError

JsonObject = dict[str, Any]

AUTH_REALM: Final = "qantara"


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> JsonObject:
    """An `OperationOutcome` with one issue."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


class FhirError(QantaraError):
    """An error answered with `status` and an OperationOutcome of issue type `code`."""

    status: int = 400
    code: str = "invalid"

    def __init__(self, diagnostics: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(diagnostics)
        self.diagnostics = diagnostics
        self.headers: dict[str, str] = dict(headers or {})


class ResourceNotFound(FhirError):
    status = 404
    code = "not-found"


class Unauthenticated(FhirError):
    """No usable bearer token: 401 with a `WWW-Authenticate` challenge."""

    status = 401
    code = "security"

    def __init__(self, diagnostics: str, *, token_given: bool) -> None:
        challenge = f'Bearer realm="{AUTH_REALM}"'
        if token_given:
            challenge += ', error="invalid_token"'
        super().__init__(diagnostics, {"WWW-Authenticate": challenge})


class Forbidden(FhirError):
    """A valid token without the scope the request needs: 403."""

    status = 403
    code = "security"

    def __init__(self, diagnostics: str, *, scope: str) -> None:
        challenge = f'Bearer realm="{AUTH_REALM}", error="insufficient_scope", scope="{scope}"'
        super().__init__(diagnostics, {"WWW-Authenticate": challenge})
