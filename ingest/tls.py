"""The TLS side of a listener that receives from equipment (MLLP, DICOM): one policy for both,
and a handshake whose failure is told.

TLS 1.2 at least, the listener's certificate chain and key, and with a client CA, mutual TLS:
a peer must present a certificate that CA signed, or its handshake fails before any byte of
its protocol is read. With a CRL of that CA as well, a revoked certificate fails the same way
(a stolen vehicle's modality, a decommissioned analyzer).

A listener with a TLS context accepts plain TCP and makes each connection a `TlsIntake`: reading
stays paused until `loop.start_tls` takes the socket, then the listener's own protocol gets the
TLS transport. Why not `create_server(ssl=...)`: asyncio drops a failed handshake without a
word (it logs only in debug mode), so a modality whose certificate has expired, or that does
not trust ours, was turned away and nobody on the gateway's side could see it. Here each failure
is logged with the peer's address and the reason, and counted in
`qantara_tls_handshake_failures_total{listener,reason}` (`HANDSHAKE_FAILURES`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

from ingest.errors import ConfigError
from monitoring.metrics import Metrics

logger = logging.getLogger(__name__)

LoadContext = Callable[[], ssl.SSLContext | None]
"""Reads a listener's TLS files into a context (None: no certificate configured)."""


def server_context(
    cert: Path | None, key: Path | None, client_ca: Path | None, crl: Path | None = None
) -> ssl.SSLContext | None:
    """The server TLS context when a certificate is configured, else None (plain TCP). `crl`
    (PEM, with `client_ca`): the peers' certificates it lists are refused. OpenSSL then wants
    a CRL of every client certificate's issuer, and refuses all of them once that CRL is past
    its next update: `make certs` issues one valid for ten years."""
    if cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
        if crl is not None:
            context.load_verify_locations(cafile=crl)
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def common_names(certificate: object) -> frozenset[str]:
    """The commonNames of a certificate's subject as `ssl.SSLSocket.getpeercert()` gives it (a
    dict with `subject`: RDNs of (name, value) pairs), or none when there is no certificate."""
    if not isinstance(certificate, dict):
        return frozenset()
    return frozenset(
        value
        for rdn in certificate.get("subject", ())
        for name, value in rdn
        if name == "commonName"
    )


def handshake_failure(exc: BaseException) -> tuple[str, str]:
    """The reason label of a server-side handshake that failed with `exc`, and what the log
    says of it. The labels are those of `monitoring.metrics.HANDSHAKE_FAILURES`:

    - `certificate`: the peer's certificate did not verify against the client CA (expired, not
      yet valid, signed by another CA, or listed in the CRL);
    - `no_certificate`: mutual TLS and the peer presented none;
    - `peer_refused`: the peer ended the handshake with an alert, usually because it does not
      trust our certificate (expired, or another CA than the one it was given);
    - `protocol`: not TLS (a plain MLLP or DICOM peer on the TLS port), or no version or cipher
      in common;
    - `timeout`: the handshake did not finish in time;
    - `closed`: the peer closed or reset the connection during the handshake.
    """
    if isinstance(exc, TimeoutError):
        return "timeout", "no handshake in time"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "certificate", getattr(exc, "verify_message", None) or "certificate verify failed"
    if isinstance(exc, ssl.SSLEOFError):
        return "closed", "the peer closed the connection"
    if isinstance(exc, ssl.SSLError):
        code = str(exc.reason or exc.strerror or type(exc).__name__)
        words = code.lower().replace("_", " ")
        if code == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no_certificate", words
        if "ALERT" in code:
            return "peer_refused", words
        return "protocol", words
    return "closed", type(exc).__name__


class ListenerTls:
    """A TLS listener's context, read from its files at start and again on `reload` (SIGHUP):
    a renewed certificate, a new CRL, for the connections to come. Files that cannot be read
    leave the current context in place (said in the log): the listener keeps serving."""

    def __init__(self, listener: str, context: ssl.SSLContext, load: LoadContext) -> None:
        self._listener = listener
        self._context = context
        self._load = load

    def context(self) -> ssl.SSLContext:
        return self._context

    def reload(self) -> bool:
        """True when new files were taken."""
        try:
            context = self._load()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            logger.error(
                "%s TLS files not reloaded, the current ones stay: %s", self._listener, exc
            )
            return False
        if context is None:  # not expected: the settings named a certificate at start
            return False
        self._context = context
        logger.info("%s TLS files reloaded (certificate, client CA, CRL)", self._listener)
        return True


def listener_tls(listener: str, load: LoadContext, settings: str) -> ListenerTls | None:
    """The listener's TLS, or None for plain TCP (no certificate configured). Raises
    ConfigError naming `settings` (the variables of its files) when they cannot be loaded: a
    file that is no PEM, a key that is not the certificate's."""
    try:
        context = load()
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(
            f"{settings}: cannot be loaded ({load_failure(exc)}); each must be a PEM file, "
            "the key the certificate's"
        ) from exc
    return None if context is None else ListenerTls(listener, context, load)


def load_failure(exc: OSError | ValueError) -> str:
    """What went wrong with a TLS file, in OpenSSL's or the system's words."""
    if isinstance(exc, ssl.SSLError):  # "[SSL] PEM lib (_ssl.c:3905)": not where in CPython
        return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", exc.strerror or str(exc))
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc.strerror)
    return type(exc).__name__


class _UntilMade(asyncio.Protocol):
    """The TLS transport's protocol from the end of the handshake until `hand_over`.

    asyncio's TLS layer hands application data to its protocol as soon as the handshake is over,
    before `start_tls` has returned the transport: a client's first request often arrives with
    its handshake's last message. uvicorn's protocol, given data before `connection_made`,
    answered with a transport it did not have. This one keeps what arrives, then gives the
    listener's protocol the transport first and what it kept after, and steps aside."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self._inner = inner
        self._kept: list[bytes] = []
        self._eof = False
        self._lost: tuple[Exception | None] | None = None

    def data_received(self, data: bytes) -> None:
        self._kept.append(data)

    def eof_received(self) -> bool:
        self._eof = True
        return True  # the listener's protocol decides at `hand_over`

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = (exc,)

    def hand_over(self, transport: asyncio.Transport) -> None:
        inner = self._inner
        inner.connection_made(transport)
        if self._lost is not None:
            inner.connection_lost(self._lost[0])
            return
        transport.set_protocol(inner)
        for data in self._kept:
            inner.data_received(data)
        self._kept.clear()
        if self._eof and not inner.eof_received():
            transport.close()


class TlsIntake(asyncio.Protocol):
    """A new connection to a TLS listener, until its handshake is over.

    `connection_made` pauses reading (before asyncio starts it, so no byte of the ClientHello is
    read by anyone but the TLS layer) and hands `handshake(transport)` to `spawn`, the
    listener's task group (False: not taken, the connection is dropped). On success the
    listener's protocol (`secured`, made then) is given the TLS transport with
    `connection_made` (`_UntilMade`: before any byte it receives); on failure the socket is
    closed, and the failure logged and counted.
    `context` gives the listener's TLS context of the moment (`reloaded`: SIGHUP)."""

    def __init__(
        self,
        context: Callable[[], ssl.SSLContext],
        secured: Callable[[], asyncio.BaseProtocol],
        spawn: Callable[[Coroutine[Any, Any, None]], bool],
        *,
        listener: str,
        within: float,
        metrics: Metrics,
    ) -> None:
        self._context = context
        self._secured = secured
        self._spawn = spawn
        self._listener = listener
        self._within = within
        self._metrics = metrics

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # a stream server's transport
        stream.pause_reading()
        if not self._spawn(self.handshake(stream)):  # the listener is stopping
            stream.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        return None  # before the handshake started: `handshake` sees the closed transport

    async def handshake(self, transport: asyncio.Transport) -> None:
        """Upgrade `transport`, then hand it to the listener's protocol. Never raises but for
        cancellation: a task of the listener's group must not end the group."""
        peer = _peer(transport)
        if transport.is_closing():  # the peer left before its handshake could start
            self._failed(peer, "closed", "the peer closed the connection")
            return
        pending = _UntilMade(cast(asyncio.Protocol, self._secured()))
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._within):
                secure = await loop.start_tls(
                    transport,
                    pending,
                    self._context(),
                    server_side=True,
                    ssl_handshake_timeout=self._within + 1,  # ours above is the one that acts
                )
            if secure is None:  # the transport was closed under us
                raise ConnectionResetError
            pending.hand_over(secure)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            transport.abort()
            self._failed(peer, *handshake_failure(exc))
        except Exception as exc:  # noqa: BLE001 - one connection's failure must not end the others
            transport.abort()
            logger.error(
                "%s TLS handshake from %s failed: %s", self._listener, peer, type(exc).__name__
            )
            self._metrics.tls_handshake_failures.labels(self._listener, "closed").inc()

    def _failed(self, peer: str, reason: str, detail: str) -> None:
        level = logging.INFO if reason in ("closed", "timeout", "protocol") else logging.WARNING
        logger.log(
            level, "%s TLS handshake from %s failed (%s): %s", self._listener, peer, reason, detail
        )
        self._metrics.tls_handshake_failures.labels(self._listener, reason).inc()


def _peer(transport: asyncio.BaseTransport) -> str:
    address = transport.get_extra_info("peername")
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return "unknown"
