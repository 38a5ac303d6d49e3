"""A fast sans-IO tokenizer for HL7 v2 ER7 ("pipe and hat") messages.

`parse_message` reads the delimiters (MSH-1, MSH-2) and the character set (MSH-18) from the raw
bytes, decodes the whole message once with that charset, splits it into segments and fields, and
checks the header fields every acknowledgement needs. Components, repetitions and subcomponents
are split only when asked for; escape sequences are decoded at the leaves.

Field numbers follow the standard: ``segment.field(5)`` is PID-5; in MSH, field 1 is the field
separator itself and field 2 the encoding characters, so MSH-3 is the first field after them.
All indexes (field, repetition, component, subcomponent) start at 1; absent parts read as ``""``.
"""

from __future__ import annotations

import binascii
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ingest.errors import InputError

SUPPORTED_VERSIONS: tuple[str, ...] = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6")

# HL7 table 0211 names (MSH-18) of the character sets we decode, and their Python codecs. Only
# ASCII-compatible single-byte sets and UTF-8: the delimiters must stay one byte each.
CHARSETS: Mapping[str, str] = MappingProxyType(
    {
        "ASCII": "ascii",
        "8859/1": "iso8859-1",
        "8859/2": "iso8859-2",
        "8859/3": "iso8859-3",
        "8859/4": "iso8859-4",
        "8859/5": "iso8859-5",
        "8859/6": "iso8859-6",
        "8859/7": "iso8859-7",
        "8859/8": "iso8859-8",
        "8859/9": "iso8859-9",
        "8859/15": "iso8859-15",
        "UNICODE UTF-8": "utf-8",
        "UTF-8": "utf-8",
    }
)

_SEGMENT_BREAKS = (b"\r", b"\n")
_FORMATTING_BREAK = ".br"


class Er7Error(InputError):
    """An ER7 message we cannot read. `header` is set when the MSH segment itself was readable,
    so that the answer can still echo MSH-10 and the sender's applications."""

    def __init__(self, reason: str, detail: str, *, header: MessageHeader | None = None) -> None:
        super().__init__(reason, detail)
        self.header = header


@dataclass(frozen=True, slots=True)
class Encoding:
    """The delimiters a message declared (MSH-1, MSH-2) and the character set it was decoded with.

    `truncation` is the v2.7 truncation character, ``""`` when absent. `charset` is the HL7 name
    (table 0211) and `codec` the Python codec used for the message text and ``\\Xhh\\`` escapes.
    """

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""
    charset: str = "UNICODE UTF-8"
    codec: str = "utf-8"

    @property
    def characters(self) -> str:
        """MSH-2 as it is written: component, repetition, escape, subcomponent (, truncation)."""
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation

    def escape_text(self, text: str) -> str:
        """Escape delimiters and line breaks so that `text` can be written as one ER7 leaf."""
        esc = self.escape
        out = text.replace(esc, f"{esc}E{esc}")
        for char, code in (
            (self.field, "F"),
            (self.component, "S"),
            (self.subcomponent, "T"),
            (self.repetition, "R"),
            (self.truncation, "P"),
        ):
            if char and char in out:
                out = out.replace(char, f"{esc}{code}{esc}")
        if "\r" in out or "\n" in out:
            out = out.replace("\r\n", "\n").replace("\r", "\n").replace("\n", f"{esc}.br{esc}")
        return out

    def unescape(self, text: str) -> str:
        """Decode escape sequences: delimiters (F S T R E P), ``\\Xhh..\\`` bytes in the message
        charset, and ``\\.br\\`` as a newline. Other sequences (highlighting, formatting, charset
        switches, Z) are kept as written."""
        esc = self.escape
        if esc not in text:
            return text
        parts = text.split(esc)
        last = len(parts) - 1
        out = [parts[0]]
        pending = bytearray()
        for j in range(1, len(parts), 2):
            if j == last:  # an escape character that is never closed is plain text
                self._flush(pending, out)
                out.append(esc + parts[j])
                break
            seq = parts[j]
            if seq[:1] == "X" and len(seq) > 1:
                try:
                    pending += binascii.unhexlify(seq[1:])
                except (binascii.Error, ValueError):
                    raise InputError(
                        "bad-escape-sequence", "a \\X..\\ escape holds something other than hex"
                    ) from None
            else:
                self._flush(pending, out)
                out.append(self._sequence(seq))
            literal = parts[j + 1]
            if literal:
                self._flush(pending, out)
                out.append(literal)
        self._flush(pending, out)
        return "".join(out)

    def _sequence(self, seq: str) -> str:
        if seq == "F":
            return self.field
        if seq == "S":
            return self.component
        if seq == "T":
            return self.subcomponent
        if seq == "R":
            return self.repetition
        if seq == "E":
            return self.escape
        if seq == "P" and self.truncation:
            return self.truncation
        if seq == _FORMATTING_BREAK:
            return "\n"
        return self.escape + seq + self.escape

    def _flush(self, pending: bytearray, out: list[str]) -> None:
        if not pending:
            return
        try:
            out.append(pending.decode(self.codec))
        except UnicodeDecodeError as exc:
            raise InputError(
                "undecodable-text", f"a \\X..\\ escape is not valid {self.charset} ({exc.reason})"
            ) from None
        pending.clear()


def _nth(text: str, sep: str, n: int) -> str:
    """The n-th (1-based) piece of `text` cut at `sep`, ``""`` when absent."""
    if n == 1:
        return text.partition(sep)[0]
    if n < 1:
        raise ValueError("HL7 positions start at 1")
    parts = text.split(sep)
    return parts[n - 1] if n <= len(parts) else ""


def _leaf(raw: str, enc: Encoding, repetition: int, component: int, subcomponent: int) -> str:
    if repetition == 1 and component == 1 and subcomponent == 1:  # the common case, inlined
        text = raw.partition(enc.repetition)[0]
        text = text.partition(enc.component)[0].partition(enc.subcomponent)[0]
    else:
        text = _nth(raw, enc.repetition, repetition)
        text = _nth(text, enc.component, component)
        text = _nth(text, enc.subcomponent, subcomponent)
    if enc.escape in text:
        return enc.unescape(text)
    return text


def _literal(enc: Encoding) -> Encoding:
    """An encoding under which nothing splits or unescapes (for MSH-1 and MSH-2).

    Segments were cut at carriage returns, so no field text contains one.
    """
    return dataclasses.replace(
        enc, component="\r", repetition="\r", escape="\r", subcomponent="\r", truncation=""
    )


@dataclass(frozen=True, slots=True)
class Repetition:
    """One repetition of a field: components, each made of subcomponents."""

    raw: str
    encoding: Encoding

    @property
    def value(self) -> str:
        """First component, first subcomponent, decoded."""
        return _leaf(self.raw, self.encoding, 1, 1, 1)

    def component(self, n: int, subcomponent: int = 1) -> str:
        """Component `n` (subcomponent `subcomponent`), decoded."""
        return _leaf(self.raw, self.encoding, 1, n, subcomponent)

    def subcomponents(self, n: int) -> tuple[str, ...]:
        """The decoded subcomponents of component `n` (``()`` when it is empty)."""
        enc = self.encoding
        text = _nth(self.raw, enc.component, n)
        if not text:
            return ()
        return tuple(enc.unescape(s) for s in text.split(enc.subcomponent))

    @property
    def components(self) -> tuple[tuple[str, ...], ...]:
        """Every component as its tuple of decoded subcomponents."""
        enc = self.encoding
        if not self.raw:
            return ()
        if enc.escape not in self.raw:
            sub = enc.subcomponent
            return tuple([tuple(c.split(sub)) for c in self.raw.split(enc.component)])
        return tuple(
            [
                tuple([enc.unescape(s) for s in c.split(enc.subcomponent)])
                for c in self.raw.split(enc.component)
            ]
        )


@dataclass(frozen=True, slots=True)
class Field:
    """One field as sent (`raw`, escapes intact) and the delimiters needed to read it."""

    raw: str
    encoding: Encoding

    @property
    def value(self) -> str:
        """First repetition, first component, first subcomponent, decoded."""
        return _leaf(self.raw, self.encoding, 1, 1, 1)

    @property
    def is_empty(self) -> bool:
        return not self.raw

    @property
    def is_null(self) -> bool:
        """The explicit HL7 null ``""`` (delete the stored value), as opposed to empty."""
        return self.raw == '""'

    @property
    def repetitions(self) -> tuple[Repetition, ...]:
        """Every repetition (``()`` for an empty field)."""
        if not self.raw:
            return ()
        enc = self.encoding
        return tuple(Repetition(r, enc) for r in self.raw.split(enc.repetition))

    def repetition(self, n: int) -> Repetition:
        """Repetition `n` (empty when absent)."""
        return Repetition(_nth(self.raw, self.encoding.repetition, n), self.encoding)

    def component(self, n: int, subcomponent: int = 1) -> str:
        """Component `n` of the first repetition, decoded."""
        return _leaf(self.raw, self.encoding, 1, n, subcomponent)

    def get(self, repetition: int = 1, component: int = 1, subcomponent: int = 1) -> str:
        """Any leaf, decoded."""
        return _leaf(self.raw, self.encoding, repetition, component, subcomponent)


@dataclass(frozen=True, slots=True)
class Segment:
    """One segment. ``fields[n]`` is the raw text of field n; ``fields[0]`` is the segment id.

    In MSH, ``fields[1]`` is the field separator and ``fields[2]`` the encoding characters.
    """

    fields: tuple[str, ...]
    encoding: Encoding

    @property
    def id(self) -> str:
        """The segment id (``MSH``, ``PID``, ``OBX``...)."""
        return self.fields[0]

    def __len__(self) -> int:
        """The number of the last field present (trailing empty fields included)."""
        return len(self.fields) - 1

    def field(self, n: int) -> Field:
        """Field `n` (empty when absent)."""
        if n < 1:
            raise ValueError("HL7 field numbers start at 1")
        fields = self.fields
        raw = fields[n] if n < len(fields) else ""
        if n <= 2 and fields[0] == "MSH":
            return Field(raw, _literal(self.encoding))
        return Field(raw, self.encoding)

    def value(self, n: int, component: int = 1, subcomponent: int = 1, repetition: int = 1) -> str:
        """A decoded leaf of field `n`, without building a `Field` (the fast path)."""
        if n < 1:
            raise ValueError("HL7 field numbers start at 1")
        fields = self.fields
        if n >= len(fields):
            return ""
        raw = fields[n]
        if n <= 2 and fields[0] == "MSH":
            return raw if repetition == component == subcomponent == 1 else ""
        enc = self.encoding
        if repetition == 1 and component == 1 and subcomponent == 1:  # _leaf, inlined
            text = raw.partition(enc.repetition)[0]
            text = text.partition(enc.component)[0].partition(enc.subcomponent)[0]
            return enc.unescape(text) if enc.escape in text else text
        return _leaf(raw, enc, repetition, component, subcomponent)

    def raw(self, n: int) -> str:
        """Field `n` exactly as sent, escapes intact (``""`` when absent)."""
        fields = self.fields
        return fields[n] if 0 <= n < len(fields) else ""


@dataclass(frozen=True, slots=True)
class MessageHeader:
    """The MSH segment, with the fields acknowledgements and routing need."""

    segment: Segment

    @property
    def encoding(self) -> Encoding:
        return self.segment.encoding

    @property
    def field_separator(self) -> str:
        return self.segment.encoding.field

    @property
    def encoding_characters(self) -> str:
        """MSH-2 exactly as sent."""
        return self.segment.raw(2)

    @property
    def sending_application(self) -> str:
        """MSH-3 as sent (all components, escapes intact): part of the natural key."""
        return self.segment.raw(3)

    @property
    def sending_facility(self) -> str:
        """MSH-4 as sent: part of the natural key."""
        return self.segment.raw(4)

    @property
    def receiving_application(self) -> str:
        """MSH-5 as sent."""
        return self.segment.raw(5)

    @property
    def receiving_facility(self) -> str:
        """MSH-6 as sent."""
        return self.segment.raw(6)

    @property
    def timestamp(self) -> str:
        """MSH-7.1, the sender's date/time of message, as text."""
        return self.segment.value(7)

    @property
    def message_type(self) -> str:
        """MSH-9.1 (``ORU``, ``ADT``...)."""
        return self.segment.value(9)

    @property
    def trigger_event(self) -> str:
        """MSH-9.2 (``R01``, ``A01``...)."""
        return self.segment.value(9, 2)

    @property
    def message_structure(self) -> str:
        """MSH-9.3 (``ORU_R01``), empty before v2.3.1 or when not sent."""
        return self.segment.value(9, 3)

    @property
    def control_id(self) -> str:
        """MSH-10, decoded: with MSH-3 and MSH-4, the natural key of the message."""
        return self.segment.value(10)

    @property
    def processing_id(self) -> str:
        """MSH-11.1 (``P`` production, ``T`` training, ``D`` debugging)."""
        return self.segment.value(11)

    @property
    def version(self) -> str:
        """MSH-12.1 (``2.5.1``)."""
        return self.segment.value(12)

    @property
    def accept_ack_type(self) -> str:
        """MSH-15 (``AL``, ``ER``, ``SU``, ``NE``), empty in original mode."""
        return self.segment.value(15)

    @property
    def application_ack_type(self) -> str:
        """MSH-16 (``AL``, ``ER``, ``SU``, ``NE``), empty in original mode."""
        return self.segment.value(16)

    @property
    def charset(self) -> str:
        """MSH-18 first repetition as sent, empty when the default charset applied."""
        return self.segment.value(18).strip()

    @property
    def enhanced_mode(self) -> bool:
        """True when MSH-15 or MSH-16 is valued (enhanced acknowledgement mode)."""
        return bool(self.accept_ack_type or self.application_ack_type)


@dataclass(frozen=True, slots=True)
class Hl7Message:
    """A tokenized message: the raw bytes, their decoded text and the segments in order."""

    raw: bytes
    text: str
    encoding: Encoding
    all_segments: tuple[Segment, ...]
    header: MessageHeader

    def segments(self, segment_id: str) -> tuple[Segment, ...]:
        """Every segment with this id, in order."""
        return tuple(s for s in self.all_segments if s.fields[0] == segment_id)

    def segment(self, segment_id: str, occurrence: int = 1) -> Segment | None:
        """The `occurrence`-th segment with this id, or None."""
        seen = 0
        for s in self.all_segments:
            if s.fields[0] == segment_id:
                seen += 1
                if seen == occurrence:
                    return s
        return None

    def get(
        self,
        segment_id: str,
        field: int,
        repetition: int = 1,
        component: int = 1,
        subcomponent: int = 1,
        *,
        occurrence: int = 1,
    ) -> str:
        """One decoded leaf, addressed like ``PID-5[1].2.1``; ``""`` when absent."""
        seg = self.segment(segment_id, occurrence)
        if seg is None:
            return ""
        return seg.value(field, component, subcomponent, repetition)


def codec_for(charset: str) -> str:
    """The Python codec of an MSH-18 value; raises InputError('unsupported-charset')."""
    codec = CHARSETS.get(charset.strip().upper())
    if codec is None:
        raise InputError(
            "unsupported-charset", f"MSH-18 character set {charset!r} is not supported"
        )
    return codec


def parse_message(raw: bytes, default_charset: str = "UTF-8") -> Hl7Message:
    """Tokenize one ER7 message. Raises `Er7Error` (an `InputError`) with a precise reason.

    `default_charset` (an MSH-18 name such as ``UTF-8`` or ``8859/1``) applies when MSH-18 is
    empty. Reasons: ``not-hl7``, ``unsupported-batch``, ``bad-encoding-characters``,
    ``unsupported-charset``, ``undecodable-text``, ``bad-segment-id``, ``missing-msh-9``,
    ``missing-msh-10``.
    """
    if raw[:1].isspace():
        raw = raw.lstrip()
    if not raw.startswith(b"MSH"):
        if raw.startswith((b"FHS", b"BHS")):
            raise Er7Error("unsupported-batch", "HL7 batches (FHS/BHS) are not accepted")
        raise Er7Error("not-hl7", "the message does not start with an MSH segment")
    enc = _read_encoding(raw, default_charset)
    try:
        text = raw.decode(enc.codec)
    except UnicodeDecodeError as exc:
        raise Er7Error(
            "undecodable-text",
            f"byte 0x{raw[exc.start]:02x} at offset {exc.start} is not valid {enc.charset}",
            header=_salvage_header(raw, enc),
        ) from None
    segments = _split_segments(text, enc)
    header = MessageHeader(segments[0])
    if not header.message_type:
        raise Er7Error("missing-msh-9", "MSH-9 message type is empty", header=header)
    if not header.control_id:
        raise Er7Error("missing-msh-10", "MSH-10 message control id is empty", header=header)
    return Hl7Message(raw, text, enc, segments, header)


def _msh_bytes(raw: bytes) -> bytes:
    end = len(raw)
    for brk in _SEGMENT_BREAKS:
        i = raw.find(brk, 0, end)
        if i >= 0:
            end = i
    return raw[:end]


def _read_encoding(raw: bytes, default_charset: str) -> Encoding:
    msh = _msh_bytes(raw)
    fs = msh[3:4]
    if not fs or not (0x21 <= fs[0] <= 0x7E) or fs.isalnum():
        raise Er7Error("bad-encoding-characters", "MSH-1 is not a printable separator")
    parts = msh.split(fs)
    chars = parts[1] if len(parts) > 1 else b""
    declared = b""
    if len(parts) > 17 and chars:  # parts[k] is MSH-(k+1): MSH-1 is the separator we split on
        declared = parts[17].split(chars[1:2])[0].strip()
    key = (fs + chars, declared, default_charset)
    enc = _ENCODINGS.get(key)
    if enc is None:
        enc = _new_encoding(fs, chars, declared, default_charset)
        if len(_ENCODINGS) >= _ENCODING_CACHE_SIZE:
            _ENCODINGS.clear()
        _ENCODINGS[key] = enc
    return enc


# Encodings are immutable and senders reuse the same few: memoize the checks below.
_ENCODINGS: dict[tuple[bytes, bytes, str], Encoding] = {}
_ENCODING_CACHE_SIZE = 64


def _new_encoding(fs: bytes, chars: bytes, declared: bytes, default_charset: str) -> Encoding:
    if (
        len(chars) not in (4, 5)
        or not all(0x21 <= c <= 0x7E and not chr(c).isalnum() for c in chars)
        or len(set(chars)) != len(chars)
    ):
        raise Er7Error("bad-encoding-characters", "MSH-2 must hold 4 or 5 distinct delimiters")
    comp, rep, esc, sub = (chr(c) for c in chars[:4])
    trunc = chr(chars[4]) if len(chars) == 5 else ""
    if declared:
        if not declared.isascii():
            raise Er7Error("unsupported-charset", "MSH-18 is not an ASCII name")
        charset = declared.decode("ascii")
    else:
        charset = default_charset
    codec = CHARSETS.get(charset.upper())
    if codec is None:
        detail = f"MSH-18 character set {charset!r} is not supported"
        raise Er7Error("unsupported-charset", detail)
    return Encoding(fs.decode("ascii"), comp, rep, esc, sub, trunc, charset, codec)


def _split_segments(text: str, enc: Encoding) -> tuple[Segment, ...]:
    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    fs = enc.field
    segments: list[Segment] = []
    append = segments.append
    for line in text.split("\r"):
        if not line:
            continue
        fields = line.split(fs)
        sid = fields[0]
        if sid == "MSH":
            fields.insert(1, fs)
        elif len(sid) != 3 or not sid.isalnum() or not sid.isascii():
            if line.isspace():
                continue
            number = len(segments) + 1
            raise Er7Error("bad-segment-id", f"segment {number} has no valid 3-character id")
        append(Segment(tuple(fields), enc))
    return tuple(segments)


def _salvage_header(raw: bytes, enc: Encoding) -> MessageHeader | None:
    """The header of a message whose body does not decode, when the MSH segment alone does."""
    try:
        text = _msh_bytes(raw).decode(enc.codec)
    except UnicodeDecodeError:
        return None
    fields = text.split(enc.field)
    fields.insert(1, enc.field)
    return MessageHeader(Segment(tuple(fields), enc))
