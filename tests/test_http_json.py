"""FHIR JSON as the API writes it (orjson): the bytes `json.dumps` would write, text unescaped."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.http import FhirResponse


def _stdlib(content: Any) -> bytes:
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def test_arabic_and_french_text_is_written_as_utf8_not_escaped() -> None:
    body = {"resourceType": "Patient", "name": [{"family": "العلوي", "given": ["Hélène"]}]}
    rendered = FhirResponse(body).body
    assert "العلوي".encode() in rendered
    assert "Hélène".encode() in rendered
    assert b"\\u" not in rendered
    assert rendered == _stdlib(body)


def test_a_bundle_of_observations_is_byte_for_byte_what_the_standard_library_writes() -> None:
    quantities = [72, 72.5, 0.1, 36.6, 97.0, -3.25, 120.00000000000001, 2**53 + 1, 1e15]
    body = {
        "resourceType": "Bundle",
        "total": len(quantities),
        "entry": [
            {"resource": {"valueQuantity": {"value": q, "unit": "/min"}}} for q in quantities
        ],
    }
    assert FhirResponse(body).body == _stdlib(body)


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"])),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(_JSON)
def test_any_document_reads_back_as_the_same_values(content: Any) -> None:
    """Decimals stay exact (the shortest form that reads back as the same double); only the
    spelling of exponents may differ from the standard library (`1e-05` there, `1e-5` here)."""
    rendered = FhirResponse(content).body
    assert json.loads(bytes(rendered)) == json.loads(_stdlib(content))


def test_large_and_small_numbers_keep_their_value() -> None:
    for value in (1e-05, 1e16, 5e-324, 1.7976931348623157e308):
        assert json.loads(bytes(FhirResponse({"v": value}).body))["v"] == value
    assert math.isclose(
        json.loads(bytes(FhirResponse({"v": 0.1 + 0.2}).body))["v"], 0.30000000000000004
    )
