"""HL7 test support: messages made by the tests (every version and charset), a raw MLLP client.

Messages are built as text with `\\r` segment breaks and encoded with the charset their MSH-18
declares, exactly as a sender would put them on the wire. `MllpClient` speaks MLLP over a plain
asyncio stream: it writes frames (whole, split, pipelined) and reads acknowledgements, each
parsed with our tokenizer into an `Ack` (MSA-1, MSA-2, ERR-3).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from hl7.er7 import parse_message

START, END = b"\x0b", b"\x1c\x0d"
CODECS = {"UNICODE UTF-8": "utf-8", "8859/1": "iso8859-1", "8859/6": "iso8859-6", "": "utf-8"}
_ids = itertools.count(1)


def control_id() -> str:
    return f"T{secrets.token_hex(4)}-{next(_ids)}"


def new_id(prefix: str = "T") -> str:
    return prefix + secrets.token_hex(5).upper()


def msh(
    message_type: str,
    control: str,
    *,
    version: str = "2.5.1",
    charset: str = "UNICODE UTF-8",
    app: str = "LAB",
    facility: str = "CHU-RABAT",
    processing: str = "P",
    accept_ack: str = "",
    app_ack: str = "",
) -> str:
    fields = [
        "MSH",
        "^~\\&",
        app,
        facility,
        "QANTARA",
        "MOH",
        "20261127101500",
        "",
        message_type,
        control,
        processing,
        version,
        "",
        "",
        accept_ack,
        app_ack,
        "",
        charset,
    ]
    while fields and fields[-1] == "":
        fields.pop()
    return "|".join(fields)


OBR_CBC = "|".join(  # OBR-7 observed, OBR-22 issued, OBR-25 status
    ["OBR", "1", "PL-1", "FL-1", "58410-2^CBC panel^LN", "", "", "20261127090000+0100"]
    + [""] * 14
    + ["20261127100000", "", "", "F"]
)


def pid(identifiers: str, name: str = "", *, birth: str = "19800214", sex: str = "F") -> str:
    return f"PID|1||{identifiers}||{name}||{birth}|{sex}"


def oru(
    control: str,
    identifiers: str,
    name: str = "Benali^Fatima",
    *,
    version: str = "2.5.1",
    charset: str = "UNICODE UTF-8",
    obx: list[str] | None = None,
    app: str = "LAB",
    facility: str = "CHU-RABAT",
    accept_ack: str = "",
    app_ack: str = "",
    include_pid: bool = True,
) -> str:
    message_type = "ORU^R01" if version == "2.3" else "ORU^R01^ORU_R01"
    segments = [
        msh(
            message_type,
            control,
            version=version,
            charset=charset,
            app=app,
            facility=facility,
            accept_ack=accept_ack,
            app_ack=app_ack,
        )
    ]
    if include_pid:
        segments.append(pid(identifiers, name))
    segments.append(OBR_CBC)
    comment = "عينة متحللة" if charset == "8859/6" else "Prélèvement hémolysé"
    segments.extend(
        obx
        if obx is not None
        else [
            "OBX|1|NM|718-7^Hemoglobin^LN||13.2|g/dL|12.0-16.0|N|||F|||20261127090500",
            "OBX|2|NM|6690-2^Leukocytes^LN||11.8|10*3/uL|4.0-10.0|H|||F",
            f"OBX|3|ST|8251-1^Comment^LN||{comment}||||||F",
            "OBX|4|CWE|882-1^ABO+Rh group^LN||A+^A Rh positive^L||||||F",
            "OBX|5|SN|2160-0^Creatinine^LN||<^0.3|mg/dL|0.6-1.2|L|||F",
        ]
    )
    return "\r".join(segments) + "\r"


def adt(
    control: str,
    event: str,
    identifiers: str,
    names: str,
    *,
    version: str = "2.5.1",
    charset: str = "UNICODE UTF-8",
    birth: str = "19800214",
    sex: str = "F",
    mrg: str | None = None,
) -> str:
    structure = {"A40": "ADT_A39"}.get(event, "ADT_A01")
    message_type = f"ADT^{event}" if version == "2.3" else f"ADT^{event}^{structure}"
    segments = [
        msh(message_type, control, version=version, charset=charset),
        f"EVN|{event}|20261127101500",
        pid(identifiers, names, birth=birth, sex=sex),
    ]
    if mrg is not None:
        segments.append(f"MRG|{mrg}")
    return "\r".join(segments) + "\r"


def encode(text: str, charset: str = "UNICODE UTF-8") -> bytes:
    return text.encode(CODECS[charset])


def frame(payload: bytes) -> bytes:
    return START + payload + END


@dataclass(frozen=True, slots=True)
class Ack:
    code: str  # MSA-1
    acknowledged: str  # MSA-2
    error_code: str  # ERR-3.1
    error_text: str  # ERR-8
    charset: str  # MSH-18
    raw: bytes


def parse_ack(payload: bytes, default_charset: str = "UTF-8") -> Ack:
    message = parse_message(payload, default_charset)
    return Ack(
        code=message.get("MSA", 1),
        acknowledged=message.get("MSA", 2),
        error_code=message.get("ERR", 3),
        error_text=message.get("ERR", 8),
        charset=message.header.charset,
        raw=payload,
    )


class MllpClient:
    """A raw MLLP client: frames out, acknowledgements in."""

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._buffer = b""

    async def __aenter__(self) -> Self:
        self._reader, self._writer = await asyncio.open_connection(
            self._host, self._port, ssl=self._ssl
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await self._writer.wait_closed()
            self._writer = None

    async def write(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)
        await self._writer.drain()

    async def send(self, payload: bytes) -> None:
        await self.write(frame(payload))

    async def read_frame(self, timeout: float = 10.0) -> bytes | None:  # noqa: ASYNC109
        """The next acknowledgement payload, or None at end of stream."""
        assert self._reader is not None
        async with asyncio.timeout(timeout):
            while END not in self._buffer:
                chunk = await self._reader.read(65536)
                if not chunk:
                    return None
                self._buffer += chunk
        end = self._buffer.index(END)
        start = self._buffer.index(START)
        payload = self._buffer[start + 1 : end]
        self._buffer = self._buffer[end + 2 :]
        return payload

    async def read_ack(self, timeout: float = 10.0, charset: str = "UTF-8") -> Ack:  # noqa: ASYNC109
        payload = await self.read_frame(timeout)
        assert payload is not None, "the connection closed before an acknowledgement"
        return parse_ack(payload, charset)

    async def request(self, payload: bytes, timeout: float = 10.0) -> Ack:  # noqa: ASYNC109
        await self.send(payload)
        return await self.read_ack(timeout)

    async def at_eof(self, timeout: float = 10.0) -> bool:  # noqa: ASYNC109
        """True once the server closed the connection (after reading what is left)."""
        assert self._reader is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    chunk = await self._reader.read(65536)
                    if not chunk:
                        return True
                    self._buffer += chunk
        except ConnectionError:
            return True
