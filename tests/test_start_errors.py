"""What a start that cannot go on says: the setting it comes from, in the system's own words
(the CLI prints it as one line; `tests/test_listener_ports.py` runs `serve` into each)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ingest.errors import ConfigError, ListenerError
from ingest.tls import listener_tls, server_context


def test_tls_files_that_cannot_be_loaded_are_a_configuration_error_naming_the_settings(
    tmp_path: Path,
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    with pytest.raises(ConfigError) as refused:
        listener_tls("dicom", lambda: server_context(garbage, garbage, None), "QANTARA_X_TLS_*")
    assert str(refused.value).startswith("QANTARA_X_TLS_*: cannot be loaded ([SSL] PEM lib)")


def test_a_bind_address_that_does_not_resolve_is_said_in_the_resolver_s_words() -> None:
    unknown = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    error = ListenerError.binding("mllp", "999.1.1.1", 2575, unknown)
    assert str(error) == "mllp on 999.1.1.1:2575: Name or service not known"
