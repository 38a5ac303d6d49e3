"""The `qantara` command as a user runs it: help, configuration errors, tokens."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from gateway.local_services import drop_database, ensure_database

COMMANDS: tuple[list[str], ...] = (
    [],
    ["serve"],
    ["migrate"],
    ["db"],
    ["db", "roles"],
    ["dicom"],
    ["dicom", "verify"],
    ["dicom", "reindex"],
    ["up"],
    ["simulate"],
    ["simulate", "units"],
    ["simulate", "modality"],
    ["token"],
    ["token", "create"],
    ["token", "revoke"],
)


def qantara(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("QANTARA_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "qantara")
def test_every_command_has_help(command: list[str]) -> None:
    result = qantara(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: qantara" in result.stdout


def test_bad_setting_exits_with_one_line_naming_the_variable() -> None:
    result = qantara("migrate", env={"QANTARA_HTTP_PORT": "eighty"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "QANTARA_HTTP_PORT" in lines[0]
    assert "Traceback" not in result.stderr


def test_serve_without_a_database_url_says_so() -> None:
    result = qantara("serve")
    assert result.returncode == 2
    assert "QANTARA_DATABASE_URL" in result.stderr


def test_token_create_prints_the_token_last_and_stores_only_its_hash(postgres_dsn: str) -> None:
    env = {"QANTARA_DATABASE_URL": postgres_dsn}
    result = qantara(
        "token", "create", "--name", "cli-test", "--scope", "system/Observation.read", env=env
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip().splitlines()[-1]
    assert token.startswith("qtk_")
    listed = qantara("token", "list", env=env)
    assert "cli-test\tactive\tsystem/Observation.read" in listed.stdout
    assert token not in listed.stdout
    assert qantara("token", "revoke", "cli-test", env=env).returncode == 0
    assert "cli-test\trevoked" in qantara("token", "list", env=env).stdout


def test_token_with_an_unknown_scope_is_refused(postgres_dsn: str) -> None:
    env = {"QANTARA_DATABASE_URL": postgres_dsn}
    result = qantara("token", "create", "--name", "bad-scope", "--scope", "everything", env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr


def test_serve_and_migrate_help_name_the_database_url_settings() -> None:
    serve = qantara("serve", "--help").stdout
    roles = qantara("db", "roles", "--help").stdout
    for name in ("QANTARA_DATABASE_URL", "QANTARA_API_DATABASE_URL"):
        assert name in serve
    assert "QANTARA_MIGRATE_DATABASE_URL" in qantara("migrate", "--help").stdout
    for name in ("QANTARA_ADMIN_DATABASE_URL", "QANTARA_DB_ROLE_PREFIX"):
        assert name in " ".join(roles.split())


def test_serve_with_no_migrate_refuses_a_database_with_pending_migrations(
    postgres_server_dsn: str,
) -> None:
    dbname = f"qantara_test_{secrets.token_hex(6)}"
    dsn = asyncio.run(ensure_database(postgres_server_dsn, dbname))
    try:
        result = qantara(
            "serve",
            "--no-migrate",
            env={
                "QANTARA_DATABASE_URL": dsn,
                "QANTARA_HTTP_PORT": "0",
                "QANTARA_MLLP_PORT": "0",
                "QANTARA_DICOM_PORT": "0",
            },
        )
    finally:
        asyncio.run(drop_database(postgres_server_dsn, dbname))
    assert result.returncode == 4, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "pending" in last
    assert "qantara migrate" in last


@pytest.mark.parametrize("refused", ["database", "role"])
def test_a_database_url_the_server_refuses_exits_2_with_one_line(
    refused: str, postgres_server_dsn: str
) -> None:
    parts = urlsplit(postgres_server_dsn)
    if refused == "database":
        named = "qantara_no_such_database"
        url = urlunsplit(parts._replace(path=f"/{named}"))
    else:
        named = "qantara_no_such_role"
        host = parts.netloc.rpartition("@")[2]  # empty with a socket folder in the query
        url = urlunsplit(parts._replace(netloc=f"{named}@{host}"))
    result = qantara("migrate", env={"QANTARA_DATABASE_URL": url})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "Traceback" not in result.stderr


def test_serve_with_its_database_unreachable_exits_3_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env = {
        "QANTARA_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/qantara",
        "QANTARA_DICOM_STORAGE": str(tmp_path / "dicom"),
    }
    result = qantara("serve", env=env)
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qantara: database unavailable: ")
