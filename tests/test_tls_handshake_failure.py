"""How a failed TLS handshake of an equipment listener is named (`ingest.tls.handshake_failure`):
the reasons of `qantara_tls_handshake_failures_total`. The listeners' tests make the real
failures (test_dicom_tls.py, test_hl7_server.py); these cover the ones a test cannot provoke
on demand."""

from __future__ import annotations

import ssl

from ingest.tls import handshake_failure
from monitoring.metrics import HANDSHAKE_FAILURES


def ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    error.reason = reason
    return error


def test_a_peer_that_hangs_up_during_the_handshake_is_closed() -> None:
    assert handshake_failure(ssl.SSLEOFError(8, "EOF occurred in violation of protocol"))[0] == (
        "closed"
    )
    assert handshake_failure(ConnectionResetError())[0] == "closed"


def test_an_alert_from_the_peer_is_peer_refused_in_openssl_s_words() -> None:
    assert handshake_failure(ssl_error("SSLV3_ALERT_CERTIFICATE_EXPIRED")) == (
        "peer_refused",
        "sslv3 alert certificate expired",
    )


def test_nothing_in_common_is_protocol() -> None:
    assert handshake_failure(ssl_error("NO_SHARED_CIPHER"))[0] == "protocol"
    assert handshake_failure(ssl_error("UNSUPPORTED_PROTOCOL"))[0] == "protocol"


def test_an_expired_certificate_is_certificate_with_the_verification_s_message() -> None:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = "certificate has expired"
    assert handshake_failure(error) == ("certificate", "certificate has expired")


def test_every_reason_has_its_metric_series() -> None:
    failures = [
        TimeoutError(),
        ssl.SSLCertVerificationError(1, "x"),
        ssl_error("PEER_DID_NOT_RETURN_A_CERTIFICATE"),
        ssl_error("TLSV1_ALERT_UNKNOWN_CA"),
        ssl_error("WRONG_VERSION_NUMBER"),
        ConnectionResetError(),
    ]
    assert {handshake_failure(exc)[0] for exc in failures} == set(HANDSHAKE_FAILURES)
