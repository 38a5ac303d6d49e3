"""When a PEM certificate stops being valid (its `notAfter`, RFC 5280 4.1.2.5), and when a CRL
must be replaced (its `nextUpdate`, 5.1.2.5): read from the DER, sans-IO but for reading the
file.

Python's `ssl` module decodes a certificate only for a peer or a CA, and a CRL not at all; the
listeners' own certificate is loaded into a context that never gives it back. Walking the few
DER elements before the dates costs less than a dependency.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from pathlib import Path

_INTEGER = 0x02
_SEQUENCE = 0x30
_EXPLICIT_VERSION = 0xA0  # [0] EXPLICIT Version
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18


class CertificateError(ValueError):
    """Not a certificate (or CRL) this reader understands."""


def not_after(pem: Path) -> datetime:
    """The end of validity of the first certificate in the PEM file `pem` (the leaf of a
    chain). Raises CertificateError, or OSError when the file cannot be read."""
    return validity_end(_first_der(pem, "CERTIFICATE"))


def next_update(pem: Path) -> datetime:
    """When the first CRL in the PEM file `pem` must be replaced: past it, OpenSSL refuses
    every certificate the CRL's issuer signed. Raises CertificateError (also for a CRL without
    a next update), or OSError when the file cannot be read."""
    return crl_next_update(_first_der(pem, "X509 CRL"))


def _first_der(pem: Path, label: str) -> bytes:
    try:
        text = pem.read_text(encoding="ascii")  # PEM is ASCII: anything else is not one
    except UnicodeDecodeError as exc:
        raise CertificateError(f"not a PEM file: a byte outside ASCII at {exc.start}") from exc
    header, footer = f"-----BEGIN {label}-----", f"-----END {label}-----"
    begin = text.find(header)
    end = text.find(footer, begin)
    if begin < 0 or end < 0:
        raise CertificateError(f"no PEM {label}")
    try:
        return base64.b64decode("".join(text[begin + len(header) : end].split()), validate=True)
    except binascii.Error as exc:
        raise CertificateError(f"PEM {label} is not base64") from exc


def crl_next_update(der: bytes) -> datetime:
    """`nextUpdate` of the DER CRL `der`."""
    position = _after_version(der, _INTEGER)  # v2 CRLs only have one
    for _field in ("signature", "issuer", "thisUpdate"):
        _, _, position = _element(der, position)
    tag, content, after = _element(der, position)
    if tag not in (_UTC_TIME, _GENERALIZED_TIME):
        raise CertificateError("the CRL has no next update")
    return _time(tag, der[content:after])


def validity_end(der: bytes) -> datetime:
    """`notAfter` of the DER certificate `der`."""
    position = _after_version(der, _EXPLICIT_VERSION)  # absent in a v1 certificate
    for _field in ("serialNumber", "signature", "issuer"):
        _, _, position = _element(der, position)
    tag, validity, _ = _element(der, position)
    _expect(tag, _SEQUENCE)
    _, _, position = _element(der, validity)  # notBefore
    tag, content, after = _element(der, position)  # notAfter
    return _time(tag, der[content:after])


def _after_version(der: bytes, version_tag: int) -> int:
    """Where the to-be-signed part of the DER certificate or CRL `der` goes on after its
    version, which is optional and tagged `version_tag`."""
    tag, start, _ = _element(der, 0)  # Certificate, CertificateList
    _expect(tag, _SEQUENCE)
    tag, position, _ = _element(der, start)  # TBSCertificate, TBSCertList
    _expect(tag, _SEQUENCE)
    tag, _, end = _element(der, position)
    return end if tag == version_tag else position


def _element(der: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the DER element at `offset`."""
    if offset + 2 > len(der):
        raise CertificateError("truncated")
    tag, length = der[offset], der[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or start + count > len(der):
            raise CertificateError("bad length")
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    if start + length > len(der):
        raise CertificateError("truncated")
    return tag, start, start + length


def _expect(tag: int, wanted: int) -> None:
    if tag != wanted:
        raise CertificateError(f"tag {tag:#04x} where {wanted:#04x} was expected")


def _time(tag: int, value: bytes) -> datetime:
    try:
        text = value.decode("ascii")  # UTCTime and GeneralizedTime are digits and Z
    except UnicodeDecodeError as exc:
        raise CertificateError("a time that is not ASCII") from exc
    if not text.endswith("Z"):
        raise CertificateError(f"time {text!r} is not in UTC")
    utc = text[:-1] + "+0000"
    try:
        if tag == _UTC_TIME:  # YYMMDDHHMMSSZ; 50-99 are 19xx (RFC 5280 4.1.2.5.1)
            moment = datetime.strptime(utc, "%y%m%d%H%M%S%z")
            if moment.year >= 2050:
                moment = moment.replace(year=moment.year - 100)
            return moment
        if tag == _GENERALIZED_TIME:
            return datetime.strptime(utc, "%Y%m%d%H%M%S%z")
    except ValueError as exc:
        raise CertificateError(f"time {text!r}") from exc
    raise CertificateError(f"tag {tag:#04x} is not a time")
