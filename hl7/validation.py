"""Optional strict structure validation with hl7apy, for the senders listed in
`QANTARA_HL7_STRICT_SENDERS` (the only module outside the tests that imports hl7apy).

hl7apy builds and validates a full element tree (tens of milliseconds per ORU), so it runs in a
worker thread (`asyncio.to_thread`) and never on the hot path of other senders. A failure is
answered AE with hl7apy's own text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from hl7.er7 import Hl7Message

_MAX_TEXT = 200


def sender_is_strict(message: Hl7Message, strict_senders: Collection[str]) -> bool:
    """True when MSH-3.1, MSH-4.1 or ``MSH-3.1/MSH-4.1`` is listed."""
    if not strict_senders:
        return False
    seg = message.header.segment
    app, facility = seg.value(3), seg.value(4)
    return (
        app in strict_senders
        or facility in strict_senders
        or f"{app}/{facility}" in (strict_senders)
    )


def _validate_sync(text: str) -> str | None:
    from hl7apy.core import Message  # noqa: F401 - loads the element classes parse_message needs
    from hl7apy.exceptions import HL7apyException
    from hl7apy.parser import parse_message
    from hl7apy.validation import VALIDATION_LEVEL

    try:
        message = parse_message(
            text.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True
        )
        message.validate()
    except HL7apyException as exc:
        return str(exc)[:_MAX_TEXT] or type(exc).__name__
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"[:_MAX_TEXT]
    return None


async def validate_structure(message: Hl7Message) -> str | None:
    """hl7apy's error text when the message breaks its version's structure, else None."""
    return await asyncio.to_thread(_validate_sync, message.text)
