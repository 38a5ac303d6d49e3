"""The `qantara` command: serve, migrate, db roles, dicom verify/reindex, up, simulate, token.

Configuration comes from the environment (see README, "Configuration"); a bad value ends the
command with one line naming the variable, exit status 2, never a traceback. Exit status 3: the
database is unreachable; 4: its schema cannot be brought up to date (pending migrations that this
database user may not apply) or roles cannot be created; 5: a listener cannot take its port (in
use by another process, or not permitted), said in one line; 6: `dicom reindex` finds another
reindex running against the database.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway import retry_logs
from gateway.redacted_logs import RedactingFormatter
from gateway.settings import Settings, ae_title
from ingest.errors import ConfigError, ListenerError, StorageUnavailable
from storage.dicom_store_lock import REINDEX_WAIT_SECONDS, StoreBusy
from storage.migrations import MigrationError
from storage.pool import is_refused_login
from storage.roles import RoleError

logger = logging.getLogger("qantara")

EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 3
EXIT_SCHEMA = 4
EXIT_LISTEN = 5
EXIT_BUSY = 6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qantara",
        description=(
            "Qantara: the gateway between medical equipment (MQTT vitals, HL7 v2 over MLLP, "
            "DICOM) and the shared patient file (FHIR R4). Configured by QANTARA_* environment "
            "variables; see the README."
        ),
    )
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file with QANTARA_* keys (the environment wins)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the gateway (QANTARA_DATABASE_URL required)",
        description="Run the gateway in one process: the MQTT adapter (QANTARA_MQTT_URL), the "
        "HL7 MLLP listener (QANTARA_MLLP_PORT), the DICOM listener (QANTARA_DICOM_PORT, AE title "
        "QANTARA_DICOM_AE_TITLE, files under QANTARA_DICOM_STORAGE, calling AE titles limited by "
        "QANTARA_DICOM_ALLOWED_AES, C-GET and C-MOVE for QANTARA_DICOM_RETRIEVE_AES, TLS with "
        "QANTARA_DICOM_TLS_CERT), the pipeline and the "
        "HTTP API (QANTARA_HTTP_PORT); every setting is listed in the README. Ingest uses "
        "QANTARA_DATABASE_URL, the HTTP API "
        "QANTARA_API_DATABASE_URL (default: the same). Pending migrations are applied at start "
        "under an advisory lock, as the user of "
        "QANTARA_MIGRATE_DATABASE_URL (default: QANTARA_DATABASE_URL); when that user may not "
        "apply them (a runtime role of least privilege), or with --no-migrate, serve refuses "
        "to start on a schema with pending migrations (exit status 4). A port in use (HTTP, "
        "MLLP or DICOM) ends it at start with one line, exit status 5; TLS files that do not "
        "load, a DICOM store that cannot be opened or whose QANTARA_DICOM_STORAGE_CHECK_FILE is "
        "missing (its volume not mounted), with one line, exit status 2. C-STOREs leave "
        "QANTARA_DICOM_MIN_FREE_SPACE of the store's disk free. SIGTERM drains and "
        "stops; SIGHUP makes the HTTP, MLLP and DICOM listeners, and the DICOM outbound "
        "associations (QANTARA_DICOM_OUTBOUND_TLS_*), read their TLS files again.",
    )
    serve.add_argument(
        "--no-migrate",
        action="store_true",
        help="do not apply migrations at start; refuse to start if some are pending",
    )

    commands.add_parser(
        "migrate",
        help="apply pending database migrations and exit",
        description="Apply pending SQL migrations, in order, as the user of "
        "QANTARA_MIGRATE_DATABASE_URL (default: QANTARA_DATABASE_URL), and exit. When the "
        "group roles exist (qantara db roles), migrations run as <prefix>_owner "
        "(QANTARA_DB_ROLE_PREFIX, default qantara) and the grants of storage/sql/privileges.sql "
        "are applied again.",
    )

    db = commands.add_parser("db", help="database administration: least-privilege roles")
    db_commands = db.add_subparsers(dest="action", required=True, metavar="ACTION")
    db_roles = db_commands.add_parser(
        "roles",
        help="create the owner, writer and reader group roles and grant them (idempotent)",
        description="Create the NOLOGIN group roles <prefix>_owner (owns the schema), "
        "<prefix>_writer (the gateway's runtime) and <prefix>_reader (the HTTP API), prefix "
        "QANTARA_DB_ROLE_PREFIX (default qantara); give the owner role the schema's existing "
        "objects; apply the grants of storage/sql/privileges.sql. Connects as "
        "QANTARA_ADMIN_DATABASE_URL (default: QANTARA_MIGRATE_DATABASE_URL, then "
        "QANTARA_DATABASE_URL): a user with CREATEROLE that owns the database (the admin user "
        "of a managed PostgreSQL; no SUPERUSER needed). Without --create-logins, prints how to "
        "create the login roles.",
    )
    db_roles.add_argument(
        "--create-logins",
        action="store_true",
        help="also create (or set the password of) the login roles named by "
        "QANTARA_MIGRATE_DATABASE_URL (member of owner), QANTARA_DATABASE_URL (writer; also "
        "reader unless the API has its own URL) and QANTARA_API_DATABASE_URL (reader), with "
        "the passwords of those URLs",
    )

    dicom = commands.add_parser(
        "dicom", help="DICOM store administration: integrity check, reindex"
    )
    dicom_commands = dicom.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = dicom_commands.add_parser(
        "verify",
        help="read every indexed instance's file back and compare it with its index row",
        description="Read the file of every instance in the DICOM index (QANTARA_DATABASE_URL) "
        "from the store (QANTARA_DICOM_STORAGE) and compare its size and SHA-256 with those "
        "recorded when the modality was told 0x0000. Lists each damaged instance on stdout "
        "(missing, size, corrupt, unreadable or misnamed, with its instance id, SOP Instance "
        "UID, Study Instance UID and file; never patient data), then a summary. Changes nothing: "
        "a resend of the same instance by the modality or another archive puts its file back. "
        "Safe beside a running gateway. Progress is logged every 30 s with the last instance "
        "id, to resume a run with --after-id. Exit status: 0 every file intact, 1 damaged "
        "files found, 2 configuration error, 3 database unavailable.",
    )
    verify.add_argument(
        "--since",
        type=_since,
        default=None,
        metavar="WHEN",
        help="only the instances received since WHEN: an ISO 8601 date or time (UTC unless it "
        "gives an offset), or a duration back from now (36h, 7d)",
    )
    verify.add_argument(
        "--after-id",
        type=_instance_id,
        default=0,
        metavar="ID",
        help="start after this instance id (the last one a stopped run logged)",
    )
    verify.add_argument(
        "--rate",
        type=_rate,
        default=0.0,
        metavar="MB/S",
        help="read at most this many megabytes a second, to leave the disk to the listener "
        "(default: no limit)",
    )
    verify.add_argument(
        "--textfile",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the result as Prometheus metrics to FILE, replaced atomically, for "
        "node_exporter's textfile collector (a .prom file in its folder)",
    )

    reindex = dicom_commands.add_parser(
        "reindex",
        help="index the store's files that no index row names (after a database restore)",
        description="Index the files of the DICOM store (QANTARA_DICOM_STORAGE) that no row of "
        "the index (QANTARA_DATABASE_URL) names: the way back after the database was restored "
        "from a backup older than the store, when the listener's start-up scan reports "
        "qantara_dicom_unindexed_files. Each file is hashed again (bytes that are not its name "
        "are left and reported), parsed as a received file, and indexed with its patient linked "
        "as usual, received at its modification time. It may run beside the gateways: their "
        "orphan sweeps wait for it (a PostgreSQL advisory lock), and a second reindex against "
        "the same database is refused. Nothing is removed. Lists each file not indexed with why "
        "(never patient data), then a summary. Exit status: 0 every unindexed file is in the "
        "index afterwards, 1 some are not, 2 configuration error, 3 database unavailable, 4 "
        "pending migrations, 6 another reindex is running.",
    )
    reindex.add_argument(
        "--calling-ae",
        type=_calling_ae,
        default=None,
        metavar="AE",
        help="the AE title that sent these files: a PatientID without issuer is that sender's "
        "(dicom-ae/AE). Without it, such files are skipped and listed, never guessed; run the "
        "command again for each sender with --files naming that sender's files",
    )
    reindex.add_argument(
        "--older-than",
        type=_minutes,
        default=10.0,
        metavar="MINUTES",
        help="only files last modified this long ago (default 10: younger ones may be a store "
        "in progress)",
    )
    reindex.add_argument(
        "--files",
        type=argparse.FileType("r", encoding="utf-8"),
        default=None,
        metavar="FILE",
        help="only the files named in FILE ('-': standard input), by their content names "
        "(ab/cd/<sha256>.dcm) anywhere in its lines: a list, or the needs-calling-ae lines of "
        "an earlier run that belong to one sender, to index with that sender's --calling-ae",
    )
    reindex.add_argument("--dry-run", action="store_true", help="parse and report, commit nothing")
    reindex.add_argument(
        "--wait",
        type=_seconds,
        default=REINDEX_WAIT_SECONDS,
        metavar="SECONDS",
        help="how long to wait for the store's lock: the listeners' orphan sweeps in progress "
        f"let go within seconds, another reindex only when it ends (default "
        f"{REINDEX_WAIT_SECONDS:.0f}; then exit status 6)",
    )

    up = commands.add_parser(
        "up",
        help="run everything on this machine (embedded database and broker if needed)",
        description="Run the gateway with what it needs on one machine: embedded PostgreSQL "
        "(pgserver) unless QANTARA_DATABASE_URL is set; the broker at QANTARA_MQTT_URL if it "
        "answers, else a private mosquitto, else an embedded Python broker (MQTT 3.1.1). "
        "Prints the URLs and a read token.",
    )
    up.add_argument(
        "--simulate", type=int, default=0, metavar="N", help="also run N simulated mobile units"
    )
    up.add_argument(
        "--rate", type=float, default=1.0, help="messages per second per simulated unit"
    )
    up.add_argument(
        "--data-dir", default="./var", help="where embedded services keep their data (./var)"
    )

    simulate = commands.add_parser("simulate", help="run device simulators against a gateway")
    targets = simulate.add_subparsers(dest="target", required=True, metavar="TARGET")
    units = targets.add_parser(
        "units",
        help="simulated mobile medical units publishing vitals over MQTT",
        description="Offline-first units: each keeps a SQLite outbox and a persisted seq, "
        "publishes QoS 1 to units/{id}/vitals at QANTARA_MQTT_URL, prunes its outbox on the "
        "gateway's ack watermark and replays above it after reconnecting.",
    )
    units.add_argument("--count", type=int, default=10, help="number of units (10)")
    units.add_argument("--rate", type=float, default=1.0, help="messages/s per unit (1.0)")
    units.add_argument("--duration", type=float, default=60.0, help="seconds of generation (60)")
    units.add_argument(
        "--flaky",
        type=float,
        default=0.0,
        metavar="P",
        help="probability per second that a unit's link drops for a random span (0)",
    )
    units.add_argument("--state-dir", default="./var/units", help="outboxes (./var/units)")
    units.add_argument("--seed", type=int, default=1, help="random seed of patients and vitals")
    units.add_argument(
        "--drain-timeout", type=float, default=60.0, help="seconds to wait for acks at the end"
    )
    units.add_argument("--prefix", default="UMMC-", help="unit id prefix (UMMC-)")
    units.add_argument("--quiet", action="store_true", help="no progress line")

    lab = targets.add_parser(
        "lab",
        help="a simulated lab analyzer sending ORU^R01 over MLLP",
        description="Send realistic ORU^R01 results (CBC, chemistry, HbA1c; Arabic and French "
        "names in UTF-8, 8859/1 and 8859/6) to the MLLP listener at QANTARA_BIND:"
        "QANTARA_MLLP_PORT, one message at a time per connection, waiting for each ACK; "
        "reconnects and resends after a broken connection. Prints AA/AE/AR counts.",
    )
    lab.add_argument("--count", type=int, default=100, help="messages to send (100)")
    lab.add_argument(
        "--rate", type=float, default=10.0, help="messages/s over all connections; 0: max (10)"
    )
    lab.add_argument("--connections", type=int, default=1, help="parallel connections (1)")
    lab.add_argument(
        "--resend", action="store_true", help="send every message again at the end (dedup)"
    )
    lab.add_argument("--seed", type=int, default=1, help="seed of patients, values, MSH-10 (1)")
    lab.add_argument("--host", default=None, help="gateway host (QANTARA_BIND)")
    lab.add_argument("--port", type=int, default=None, help="MLLP port (QANTARA_MLLP_PORT)")
    lab.add_argument(
        "--retry-timeout",
        type=float,
        default=30.0,
        help="seconds to keep reconnecting for one message (30)",
    )
    lab.add_argument(
        "--ae-retry-for",
        type=_seconds,
        default=300.0,
        metavar="SECONDS",
        help="how long a message answered AE with ERR 207 (the gateway's storage unavailable) "
        "is sent again, with backoff, as an LIS's retry queue does (300; 0: never)",
    )
    lab.add_argument("--ack-log", default=None, help="append MSH-10 of each AA/CA to this file")
    lab.add_argument(
        "--facility", default="LABO-CENTRAL", help="our sending facility, MSH-4 (LABO-CENTRAL)"
    )
    _tls_arguments(lab, "MLLP")
    lab.add_argument("--quiet", action="store_true", help="no progress line")

    modality = targets.add_parser(
        "modality",
        help="a simulated radiology modality sending studies with C-STORE",
        description="Send N synthetic studies (CR, DX, US or CT; patients with Arabic names "
        "in ISO_IR 127 / ISO_IR 192 and French ones in ISO_IR 100, a facility id and the "
        "national id) to the DICOM listener at QANTARA_BIND:QANTARA_DICOM_PORT on one "
        "association, and print the C-STORE statuses. With --commit, then ask for Storage "
        "Commitment of what was stored and wait for the report on the same association, or, "
        "with --report-port, release it and wait for the report on that port of our own (the "
        "gateway's QANTARA_DICOM_REPORT_ADDRESSES must name our AE title and port). Exit "
        "status 1 when the association is refused or aborted, when any status is not a "
        "success, or with --commit when not everything stored was committed.",
    )
    modality.add_argument("--studies", type=int, default=1, help="studies to send (1)")
    modality.add_argument(
        "--modality", choices=("CR", "DX", "US", "CT"), default="CR", help="modality (CR)"
    )
    modality.add_argument(
        "--rate", type=float, default=0.0, help="instances per second; 0: max (0)"
    )
    modality.add_argument("--seed", type=int, default=1, help="seed of patients and pixels (1)")
    modality.add_argument("--host", default=None, help="gateway host (QANTARA_BIND)")
    modality.add_argument("--port", type=int, default=None, help="port (QANTARA_DICOM_PORT)")
    modality.add_argument("--calling-ae", default="SIM-MODALITY", help="our AE title")
    modality.add_argument(
        "--commit",
        action="store_true",
        help="then Storage Commitment of the instances stored (report on the association)",
    )
    modality.add_argument(
        "--report-port",
        type=int,
        default=None,
        metavar="PORT",
        help="as --commit, the report taken on this port of ours (all interfaces, plain TCP)",
    )
    modality.add_argument(
        "--commit-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="with --commit: how long the report may take (30)",
    )
    _tls_arguments(modality, "DICOM")
    modality.add_argument("--quiet", action="store_true", help="no progress line")

    workstation = targets.add_parser(
        "workstation",
        help="a simulated workstation pulling studies with C-FIND, then C-GET or C-MOVE",
        description="Find the studies of a patient (--patient-id) or of a day (--study-date) "
        "with C-FIND, then retrieve each with C-GET on the same association (the images are "
        "counted, not kept) or with C-MOVE to a destination the gateway knows "
        "(QANTARA_DICOM_MOVE_DESTINATIONS). The calling AE title must be in "
        "QANTARA_DICOM_RETRIEVE_AES. Exit status 1 when the association is refused or aborted, "
        "when the C-FIND fails, or when any retrieve ends with another status than success.",
    )
    workstation.add_argument("--patient-id", default=None, help="PatientID to find")
    workstation.add_argument(
        "--study-date", default=None, help="StudyDate to find: YYYYMMDD or YYYYMMDD-YYYYMMDD"
    )
    workstation.add_argument("--limit", type=int, default=10, help="studies retrieved at most (10)")
    workstation.add_argument(
        "--move-to", default=None, metavar="AE", help="C-MOVE to this AE title instead of C-GET"
    )
    workstation.add_argument("--host", default=None, help="gateway host (QANTARA_BIND)")
    workstation.add_argument("--port", type=int, default=None, help="port (QANTARA_DICOM_PORT)")
    workstation.add_argument("--calling-ae", default="SIM-WORKSTATION", help="our AE title")
    _tls_arguments(workstation, "DICOM")
    workstation.add_argument("--quiet", action="store_true", help="no progress line")

    fleet = targets.add_parser(
        "fleet",
        help="a region's senders at once: units (MQTT), lab analyzers (MLLP), modalities (DICOM)",
        description="Run N mobile units (flaky links, outboxes), lab analyzers and radiology "
        "modalities against one gateway (QANTARA_MQTT_URL, QANTARA_BIND, QANTARA_MLLP_PORT, "
        "QANTARA_DICOM_PORT) in one task group, with a progress line; then drain the units and "
        "print sent, acked, lost and duplicated (read from the gateway's database with "
        "--database-url, else from the acknowledgements). The senders resend as real ones do: "
        "units from their outbox, analyzers a message answered AE 207, modalities an instance "
        "answered 0xA700 (with their next study). Exit status 0 only when the units drained, "
        "everything sent was acknowledged, lost = 0 and duplicated = 0; else 1.",
    )
    fleet.add_argument("--units", type=int, default=100, help="mobile units (100)")
    fleet.add_argument("--labs", type=int, default=10, help="lab analyzers (10)")
    fleet.add_argument("--modalities", type=int, default=5, help="modalities (5)")
    fleet.add_argument("--duration", type=float, default=60.0, help="seconds of sending (60)")
    fleet.add_argument("--unit-rate", type=float, default=1.0, help="messages/s per unit hub (1.0)")
    fleet.add_argument(
        "--flaky", type=float, default=0.01, metavar="P", help="link drop probability/s (0.01)"
    )
    fleet.add_argument("--lab-rate", type=float, default=0.2, help="ORU/s per analyzer (0.2)")
    fleet.add_argument(
        "--study-interval", type=float, default=60.0, help="seconds between studies (60)"
    )
    fleet.add_argument(
        "--database-url", default=None, help="the gateway's database, to count lost/duplicated"
    )
    fleet.add_argument("--host", default=None, help="MLLP/DICOM host (QANTARA_BIND)")
    fleet.add_argument("--mllp-port", type=int, default=None, help="(QANTARA_MLLP_PORT)")
    fleet.add_argument("--dicom-port", type=int, default=None, help="(QANTARA_DICOM_PORT)")
    fleet.add_argument(
        "--state-dir", default="./var/simulator/fleet", help="outboxes (./var/simulator/fleet)"
    )
    fleet.add_argument("--seed", type=int, default=1, help="random seed (1)")
    fleet.add_argument(
        "--drain-timeout", type=float, default=120.0, help="seconds to wait for acks (120)"
    )
    fleet.add_argument("--prefix", default="UMMC-", help="unit id prefix (UMMC-)")
    fleet.add_argument("--quiet", action="store_true", help="no progress line")

    token = commands.add_parser("token", help="manage API bearer tokens")
    token_commands = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = token_commands.add_parser(
        "create",
        help="create a token; prints it as the last line (only its hash is stored)",
        description="Create a bearer token with SMART-style scopes such as "
        "system/Observation.read, system/Patient.read or system/*.read. The token is printed "
        "once, as the last line; only its SHA-256 is stored.",
    )
    create.add_argument("--name", required=True, help="unique name (shown in audit records)")
    create.add_argument(
        "--scope", action="append", required=True, help="scope to grant (repeatable)"
    )
    revoke = token_commands.add_parser(
        "revoke",
        help="revoke a token by name (takes effect on the next request)",
        description="Revoke the token of that name; the next request using it gets 401.",
    )
    revoke.add_argument("name")
    token_commands.add_parser("list", help="list tokens (names, scopes, state; never secrets)")
    return parser


def _tls_arguments(parser: argparse.ArgumentParser, protocol: str) -> None:
    parser.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        metavar="PEM",
        help=f"{protocol} over TLS, the gateway's certificate checked against this CA",
    )
    parser.add_argument(
        "--tls-cert", type=Path, default=None, metavar="PEM", help="our certificate (mutual TLS)"
    )
    parser.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="its private key")


def _since(text: str) -> datetime:
    """`--since`: an ISO 8601 date or time (naive: UTC), or `<n>h` / `<n>d` back from now."""
    if match := re.fullmatch(r"(\d+)([hd])", text.strip()):
        hours = int(match[1]) * (24 if match[2] == "d" else 1)
        return datetime.now(UTC) - timedelta(hours=hours)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: not an ISO 8601 date or time, nor a duration such as 36h or 7d"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _instance_id(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: not an instance id (0 or more)")
    return int(text)


def _non_negative(what: str) -> Callable[[str], float]:
    """An argument type: a finite number, 0 or more; else "not `what`"."""

    def parse(text: str) -> float:
        try:
            number = float(text)
        except ValueError:
            number = -1.0
        if not 0 <= number < float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r}: not {what}")
        return number

    return parse


_rate = _non_negative("a rate in MB/s (0: no limit)")
_minutes = _non_negative("a number of minutes")
_seconds = _non_negative("a number of seconds")


def _calling_ae(text: str) -> str:
    try:
        return ae_title(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: 1 to 16 printable ASCII characters, no backslash"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.load(os.environ, args.config)
    except ConfigError as exc:
        print(f"qantara: configuration error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_CONFIG
    _configure_logging(settings.log_level)
    try:
        return asyncio.run(_dispatch(args, settings))
    except ConfigError as exc:
        print(f"qantara: configuration error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_CONFIG
    except StorageUnavailable as exc:
        print(f"qantara: database unavailable: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_UNAVAILABLE
    except (MigrationError, RoleError) as exc:
        print(f"qantara: database schema: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_SCHEMA
    except ListenerError as exc:
        print(f"qantara: cannot listen: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_LISTEN
    except StoreBusy as exc:
        print(f"qantara: DICOM store busy: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_BUSY
    except Exception as exc:
        if not is_refused_login(exc):
            raise
        # The server's words name the database or the role, never a password.
        print(f"qantara: configuration error: database URL refused: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


async def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    from gateway import commands

    if args.command == "serve":
        return await commands.serve(settings, migrate=not args.no_migrate)
    if args.command == "migrate":
        return await commands.migrate(settings)
    if args.command == "db":
        return await commands.db_roles(settings, create_logins=args.create_logins)
    if args.command == "dicom" and args.action == "reindex":
        return await commands.dicom_reindex(settings, args)
    if args.command == "dicom":
        return await commands.dicom_verify(settings, args)
    if args.command == "up":
        return await commands.up(
            settings, simulate=args.simulate, rate=args.rate, data_dir=args.data_dir
        )
    if args.command == "simulate" and args.target == "lab":
        return await commands.simulate_lab(settings, args)
    if args.command == "simulate" and args.target == "modality":
        return await commands.simulate_modality(settings, args)
    if args.command == "simulate" and args.target == "workstation":
        return await commands.simulate_workstation(settings, args)
    if args.command == "simulate" and args.target == "fleet":
        return await commands.simulate_fleet(settings, args)
    if args.command == "simulate":
        return await commands.simulate_units(settings, args)
    if args.command == "token":
        if args.action == "create":
            return await commands.token_create(settings, args.name, args.scope)
        if args.action == "revoke":
            return await commands.token_revoke(settings, args.name)
        return await commands.token_list(settings)
    raise AssertionError(args.command)


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # Tracebacks keep their frames and exception types, not their messages (patient data).
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    # Libraries that would log payloads or connection details at INFO stay at WARNING.
    # pynetdicom (the DICOM simulators' library) logs whole identifiers, PatientID included.
    for noisy in ("aiomqtt", "paho", "uvicorn.error", "amqtt", "asyncio", "pynetdicom"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    retry_logs.install()  # asyncpg's retries while the database is away: a line each


if __name__ == "__main__":
    sys.exit(main())
