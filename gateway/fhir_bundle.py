"""FHIR `Bundle` of type `searchset`: total, self and next links, matched entries."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlencode

from gateway.fhir_outcome import JsonObject
from gateway.fhir_search import CURSOR_PARAMETER


def page_url(base: str, params: Sequence[tuple[str, str]], cursor: str | None) -> str:
    """`base` with `params`, the cursor parameter replaced by `cursor` (dropped when None)."""
    kept = [(k, v) for k, v in params if k != CURSOR_PARAMETER]
    if cursor is not None:
        kept.append((CURSOR_PARAMETER, cursor))
    return f"{base}?{urlencode(kept)}" if kept else base


def searchset(
    *,
    resources: Sequence[JsonObject],
    resource_base: str,
    total: int,
    self_url: str,
    next_url: str | None,
) -> JsonObject:
    """A searchset Bundle; each entry's fullUrl is `resource_base/<type>/<id>`."""
    links = [{"relation": "self", "url": self_url}]
    if next_url is not None:
        links.append({"relation": "next", "url": next_url})
    bundle: JsonObject = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
    }
    if resources:
        bundle["entry"] = [
            {
                "fullUrl": f"{resource_base}/{r['resourceType']}/{r['id']}",
                "resource": r,
                "search": {"mode": "match"},
            }
            for r in resources
        ]
    return bundle
