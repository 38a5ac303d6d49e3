"""All of Qantara's settings, read once from the environment (and an optional TOML file).

`Settings.load(environ, toml_path)` is the only reader of configuration: everything else receives
its slice explicitly. The environment wins over the TOML file, whose keys are the same variable
names (`QANTARA_MQTT_URL = "..."`) or their short lower-case form (`mqtt_url = "..."`). A bad value
raises `ConfigError` naming the variable and what is wrong.
"""

from __future__ import annotations

import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dicom.config import AeAddress, DicomSettings
from hl7.server import MllpSettings, strict_senders
from ingest.errors import ConfigError
from ingest.mqtt_session import MqttSettings
from ingest.pipeline import PipelineSettings

PREFIX = "QANTARA_"
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    url: str | None  # None: embedded PostgreSQL (qantara up only)
    pool_size: int
    statement_timeout_ms: int
    partitions_ahead: timedelta
    migrate_url: str | None = None
    """Migrations (`migrate`, serve's start-up): a member of the owner role. None: `url`."""
    api_url: str | None = None
    """The HTTP API's pool: a member of the reader role. None: `url`."""
    admin_url: str | None = None
    """`qantara db roles`: CREATEROLE, owner of the database. None: the migrate URL."""
    role_prefix: str = "qantara"
    """Group roles `<prefix>_owner`, `<prefix>_writer`, `<prefix>_reader`."""

    @property
    def migrate_dsn(self) -> str | None:
        return self.migrate_url or self.url

    @property
    def api_dsn(self) -> str | None:
        return self.api_url or self.url

    @property
    def admin_dsn(self) -> str | None:
        return self.admin_url or self.migrate_dsn


@dataclass(frozen=True, slots=True)
class HttpSettings:
    port: int
    default_count: int
    max_count: int
    cursor_secret: bytes | None = None
    """Signs FHIR paging cursors; replicas must share it. None: random per process."""
    statement_timeout_ms: int = 5_000
    """Statement timeout of the API's own connection pool."""
    pool_size: int = 10
    max_connections: int = 1000
    """Open connections (and requests in progress) beyond which a request is answered 503."""
    tls_cert: Path | None = None
    """PEM certificate (chain) of the HTTP listener; with `tls_key`, HTTPS only."""
    tls_key: Path | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    bind: str
    http: HttpSettings
    mqtt: MqttSettings
    database: DatabaseSettings
    pipeline: PipelineSettings
    mllp_port: int
    dicom_port: int
    dicom_ae_title: str
    dicom_storage: Path
    dicom: DicomSettings
    mllp: MllpSettings
    shutdown_timeout: float
    log_level: str
    ledger_keep: int = 10_000  # MQTT ledger rows kept below each unit's watermark
    ledger_prune_interval: float = 600.0  # seconds between pruning rounds; 0 = never prune

    @classmethod
    def load(cls, environ: Mapping[str, str], toml_path: str | Path | None = None) -> Settings:
        values: dict[str, str] = {}
        path = toml_path or environ.get(PREFIX + "CONFIG")
        if path:
            values.update(_read_toml(Path(path)))
        values.update({k: v for k, v in environ.items() if k.startswith(PREFIX)})
        return _build(_Reader(values))


class _Reader:
    """Typed access to the merged variables; each error names its variable."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = values

    def raw(self, name: str) -> str | None:
        value = self._values.get(PREFIX + name)
        return None if value is None or value == "" else value

    def get(self, name: str, default: _T, parse: Callable[[str], _T], what: str) -> _T:
        text = self.raw(name)
        if text is None:
            return default
        try:
            return parse(text)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{PREFIX}{name}: {what}, got {text!r}") from exc

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        def parse(text: str) -> int:
            value = int(text.replace("_", ""))
            if not low <= value <= high:
                raise ValueError(text)
            return value

        return self.get(name, default, parse, f"must be an integer from {low} to {high}")

    def port(self, name: str, default: int) -> int:
        return self.integer(name, default, 0, 65535)

    def duration(self, name: str, default: timedelta) -> timedelta:
        return self.get(
            name, default, parse_duration, "must be a duration such as 30s, 15m, 24h or 365d"
        )

    def text(self, name: str, default: str) -> str:
        return self.raw(name) or default

    def optional(self, name: str) -> str | None:
        return self.raw(name)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str) -> timedelta:
    """`30` (seconds), `500ms`, `30s`, `15m`, `24h`, `365d`."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(text)
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`1073741824` (bytes), `512MiB`, `1GiB`, `2TiB` (powers of 1024), `500MB`, `1GB` (of 1000);
    the unit in any case."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(text)
    unit = (match.group(2) or "b").lower()
    base = 1024 if unit.endswith("ib") else 1000
    power = "bkmgt".index(unit[0])
    return int(float(match.group(1)) * base**power)


def _mqtt_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(text)
    _ = parts.port  # raises ValueError on a bad port
    return text


def _database_url(text: str) -> str:
    if urlsplit(text).scheme not in ("postgresql", "postgres"):
        raise ValueError(text)
    return text


def _database_url_setting(r: _Reader, name: str) -> str | None:
    """A connection URL; an error names the variable, never the value (it may hold a password)."""
    text = r.optional(name)
    if text is None:
        return None
    try:
        return _database_url(text)
    except ValueError:
        raise ConfigError(
            f"{PREFIX}{name}: must be a postgresql://... connection URL (value not shown)"
        ) from None


def _role_prefix(text: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", text):
        raise ValueError(text)
    return text


def _protocol(text: str) -> int:
    versions = {"5": 5, "5.0": 5, "3.1.1": 4, "4": 4, "311": 4}
    if text not in versions:
        raise ValueError(text)
    return versions[text]


def _group(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", text):
        raise ValueError(text)
    return text


def ae_title(text: str) -> str:
    """A DICOM AE title: 1 to 16 printable ASCII characters, no backslash; ValueError else."""
    if not re.fullmatch(r"[ -~]{1,16}", text) or "\\" in text or not text.strip():
        raise ValueError(text)
    return text.strip()


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(text)
    return level


def _build(r: _Reader) -> Settings:
    client_id = r.get(
        "MQTT_CLIENT_ID",
        f"qantara-{socket.gethostname()}"[:64],
        _group,
        "must be 1 to 64 characters of letters, digits, '_', '.', '-'",
    )
    mqtt = MqttSettings(
        url=r.get(
            "MQTT_URL",
            "mqtt://127.0.0.1:1883",
            _mqtt_url,
            "must be mqtt://host[:port] or mqtts://host[:port]",
        ),
        client_id=client_id,
        shared_group=r.get(
            "MQTT_SHARED_GROUP",
            None,
            _group,
            "must be 1 to 64 characters of letters, digits, '_', '.', '-'",
        ),
        max_payload=r.integer("MQTT_MAX_PAYLOAD", 256 * 1024, 64, 256 * 1024 * 1024),
        receive_maximum=r.integer("MQTT_RECEIVE_MAXIMUM", 2000, 1, 65535),
        session_expiry=int(r.duration("MQTT_SESSION_EXPIRY", timedelta(days=7)).total_seconds()),
        protocol=r.get("MQTT_PROTOCOL", 5, _protocol, "must be 5 or 3.1.1"),
        username=r.optional("MQTT_USERNAME"),
        password=r.optional("MQTT_PASSWORD"),
        ca_file=r.optional("MQTT_CA_FILE"),
        max_future=r.duration("SAMPLE_MAX_FUTURE", timedelta(hours=24)),
        max_past=r.duration("SAMPLE_MAX_AGE", timedelta(days=365)),
        unit_metrics_max=r.integer("UNIT_METRICS_MAX", 1000, 0, 1_000_000),
    )
    database = DatabaseSettings(
        url=_database_url_setting(r, "DATABASE_URL"),
        pool_size=r.integer("DB_POOL_SIZE", 10, 2, 1000),
        statement_timeout_ms=int(
            r.duration("DB_STATEMENT_TIMEOUT", timedelta(seconds=30)).total_seconds() * 1000
        ),
        partitions_ahead=r.duration("PARTITIONS_AHEAD", timedelta(days=14)),
        migrate_url=_database_url_setting(r, "MIGRATE_DATABASE_URL"),
        api_url=_database_url_setting(r, "API_DATABASE_URL"),
        admin_url=_database_url_setting(r, "ADMIN_DATABASE_URL"),
        role_prefix=r.get(
            "DB_ROLE_PREFIX",
            "qantara",
            _role_prefix,
            "must be 1 to 41 characters of lower-case letters, digits and '_', not a digit first",
        ),
    )
    pipeline = PipelineSettings(
        max_pending=r.integer("PIPELINE_MAX_PENDING", 20_000, 1, 10_000_000),
        max_batch=r.integer("PIPELINE_MAX_BATCH", 5_000, 1, 100_000),
    )
    http = HttpSettings(
        port=r.port("HTTP_PORT", 8080),
        default_count=r.integer("API_DEFAULT_COUNT", 50, 1, 1000),
        max_count=r.integer("API_MAX_COUNT", 1000, 1, 10_000),
        cursor_secret=_cursor_secret(r.optional("API_CURSOR_SECRET")),
        statement_timeout_ms=int(
            r.duration("API_STATEMENT_TIMEOUT", timedelta(seconds=5)).total_seconds() * 1000
        ),
        pool_size=r.integer("API_DB_POOL_SIZE", 10, 1, 1000),
        max_connections=r.integer("HTTP_MAX_CONNECTIONS", 1000, 1, 100_000),
        tls_cert=r.get("HTTP_TLS_CERT", None, _file, "must name a readable PEM certificate file"),
        tls_key=r.get("HTTP_TLS_KEY", None, _file, "must name a readable PEM private key file"),
    )
    if (http.tls_cert is None) != (http.tls_key is None):
        raise ConfigError(f"{PREFIX}HTTP_TLS_CERT: must be set together with HTTP_TLS_KEY")
    return Settings(
        bind=r.text("BIND", "127.0.0.1"),
        http=http,
        mqtt=mqtt,
        database=database,
        pipeline=pipeline,
        mllp_port=r.port("MLLP_PORT", 2575),
        dicom_port=r.port("DICOM_PORT", 11112),
        dicom_ae_title=r.get(
            "DICOM_AE_TITLE", "QANTARA", ae_title, "must be 1 to 16 printable ASCII characters"
        ),
        dicom_storage=Path(r.text("DICOM_STORAGE", "./var/dicom")),
        dicom=_dicom(r),
        mllp=_mllp(r),
        shutdown_timeout=r.duration("SHUTDOWN_TIMEOUT", timedelta(seconds=30)).total_seconds(),
        log_level=r.get("LOG_LEVEL", "INFO", _log_level, "must be DEBUG, INFO, WARNING or ERROR"),
        ledger_keep=r.integer("MQTT_LEDGER_KEEP", 10_000, 0, 1_000_000_000),
        ledger_prune_interval=r.duration(
            "MQTT_LEDGER_PRUNE_INTERVAL", timedelta(minutes=10)
        ).total_seconds(),
    )


def _cursor_secret(text: str | None) -> bytes | None:
    """The cursor secret; an error never quotes it."""
    if text is None:
        return None
    secret = text.encode("utf-8")
    if len(secret) < 16:
        raise ConfigError(f"{PREFIX}API_CURSOR_SECRET: must be at least 16 bytes (value not shown)")
    return secret


def _time_zone(text: str) -> str:
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(text) from exc
    return text


def _file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise ValueError(text)
    return path


@dataclass(frozen=True, slots=True)
class _ListenerTls:
    """`{listener}_TLS_CERT`, `_KEY`, `_CLIENT_CA` and `_CRL` of an equipment listener."""

    cert: Path | None
    key: Path | None
    client_ca: Path | None
    crl: Path | None


def _listener_tls(r: _Reader, listener: str) -> _ListenerTls:
    """A key or a CA needs the certificate; a CRL needs the CA whose certificates it revokes."""
    cert = r.get(f"{listener}_TLS_CERT", None, _file, "must name a readable PEM certificate file")
    key = r.get(f"{listener}_TLS_KEY", None, _file, "must name a readable PEM private key file")
    client_ca = r.get(f"{listener}_TLS_CLIENT_CA", None, _file, "must name a readable PEM CA file")
    crl = r.get(f"{listener}_TLS_CRL", None, _file, "must name a readable PEM CRL file")
    if (key is not None or client_ca is not None) and cert is None:
        raise ConfigError(
            f"{PREFIX}{listener}_TLS_CERT: must be set with {listener}_TLS_KEY/_CLIENT_CA"
        )
    if crl is not None and client_ca is None:
        raise ConfigError(f"{PREFIX}{listener}_TLS_CRL: needs {listener}_TLS_CLIENT_CA")
    return _ListenerTls(cert, key, client_ca, crl)


@dataclass(frozen=True, slots=True)
class _OutboundTls:
    """`DICOM_OUTBOUND_TLS_CA`, `_CERT` and `_KEY`: the associations the gateway opens."""

    ca: Path | None
    cert: Path | None
    key: Path | None


def _outbound_tls(r: _Reader, needed: bool) -> _OutboundTls:
    """The DICOM_OUTBOUND_TLS_* files: the CA that checks the `tls://` addresses' certificates
    (needed once one is `tls://`), and our certificate and key for mutual TLS."""
    ca = r.get("DICOM_OUTBOUND_TLS_CA", None, _file, "must name a readable PEM CA file")
    cert = r.get(
        "DICOM_OUTBOUND_TLS_CERT", None, _file, "must name a readable PEM certificate file"
    )
    key = r.get("DICOM_OUTBOUND_TLS_KEY", None, _file, "must name a readable PEM private key file")
    if needed and ca is None:
        raise ConfigError(f"{PREFIX}DICOM_OUTBOUND_TLS_CA: needed by the tls:// addresses")
    if (cert is None) != (key is None):
        raise ConfigError(f"{PREFIX}DICOM_OUTBOUND_TLS_CERT and _KEY: one needs the other")
    return _OutboundTls(ca, cert, key)


def _from_certificate(r: _Reader, name: str, listener: str, client_ca: Path | None) -> bool:
    """A `{listener}_TLS_..._FROM_CN` switch: true needs the client CA whose certificates name
    the senders."""
    value = r.get(name, False, _boolean, "must be true or false")
    if value and client_ca is None:
        raise ConfigError(f"{PREFIX}{name}: needs {listener}_TLS_CLIENT_CA (senders' certificates)")
    return value


def _mllp(r: _Reader) -> MllpSettings:
    def seconds(name: str, default: float) -> float:
        value = r.duration(name, timedelta(seconds=default)).total_seconds()
        if value <= 0:
            raise ConfigError(f"{PREFIX}{name}: must be a positive duration")
        return value

    tls = _listener_tls(r, "MLLP")
    return MllpSettings(
        host=r.text("BIND", "127.0.0.1"),
        port=r.port("MLLP_PORT", 2575),
        max_message_bytes=r.integer("MLLP_MAX_MESSAGE", 16 * 1024 * 1024, 1024, 1 << 30),
        idle_timeout=seconds("MLLP_IDLE_TIMEOUT", 300.0),
        max_connections=r.integer("MLLP_MAX_CONNECTIONS", 256, 1, 100_000),
        window=r.integer("MLLP_WINDOW", 64, 1, 10_000),
        ack_timeout=seconds("HL7_ACK_TIMEOUT", 30.0),
        tls_cert=tls.cert,
        tls_key=tls.key,
        tls_client_ca=tls.client_ca,
        tls_crl=tls.crl,
        tls_facility_from_cn=_from_certificate(
            r, "MLLP_TLS_FACILITY_FROM_CN", "MLLP", tls.client_ca
        ),
        strict_senders=strict_senders(r.text("HL7_STRICT_SENDERS", "")),
        timezone=r.get(
            "HL7_TIMEZONE", "Africa/Casablanca", _time_zone, "must be an IANA time zone name"
        ),
    )


def _ae_titles(text: str) -> frozenset[str]:
    return frozenset(ae_title(part) for part in text.split(",") if part.strip())


def _ae_addresses(text: str) -> tuple[AeAddress, ...]:
    """`AE=host:port,AE=tls://host:port`: where the gateway calls each AE title (Storage
    Commitment reports, C-MOVE destinations), over TLS with `tls://`."""
    addresses: dict[str, AeAddress] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        title, equals, address = part.partition("=")
        address = address.strip()
        tls = address.startswith("tls://")
        host, colon, port = address.removeprefix("tls://").rpartition(":")
        if not equals or not colon or not host.strip():
            raise ValueError(part)
        number = int(port)
        if not 0 < number < 65536:
            raise ValueError(part)
        ae = ae_title(title)
        addresses[ae] = AeAddress(ae, host.strip().strip("[]"), number, tls)
    return tuple(addresses.values())


def _dicom(r: _Reader) -> DicomSettings:
    def seconds(name: str, default: float) -> float:
        return r.duration(name, timedelta(seconds=default)).total_seconds()

    tls = _listener_tls(r, "DICOM")
    ae_from_cn = _from_certificate(r, "DICOM_TLS_AE_FROM_CN", "DICOM", tls.client_ca)
    no_addresses: tuple[AeAddress, ...] = ()
    what = "must be a comma-separated list of AE=host:port or AE=tls://host:port"
    report_addresses = r.get("DICOM_REPORT_ADDRESSES", no_addresses, _ae_addresses, what)
    move_destinations = r.get("DICOM_MOVE_DESTINATIONS", no_addresses, _ae_addresses, what)
    outbound = _outbound_tls(r, any(a.tls for a in (*report_addresses, *move_destinations)))
    return DicomSettings(
        port=r.port("DICOM_PORT", 11112),
        ae_title=r.get(
            "DICOM_AE_TITLE", "QANTARA", ae_title, "must be 1 to 16 printable ASCII characters"
        ),
        storage=Path(r.text("DICOM_STORAGE", "./var/dicom")),
        allowed_aes=r.get(
            "DICOM_ALLOWED_AES",
            frozenset(),
            _ae_titles,
            "must be a comma-separated list of AE titles of 1 to 16 printable ASCII characters",
        ),
        query_aes=r.get(
            "DICOM_QUERY_AES",
            None,
            _ae_titles,
            "must be a comma-separated list of AE titles of 1 to 16 printable ASCII characters",
        ),
        retrieve_aes=r.get(
            "DICOM_RETRIEVE_AES",
            frozenset(),
            _ae_titles,
            "must be a comma-separated list of AE titles of 1 to 16 printable ASCII characters",
        ),
        require_called_ae=r.get(
            "DICOM_REQUIRE_CALLED_AE", False, _boolean, "must be true or false"
        ),
        max_associations=r.integer("DICOM_MAX_ASSOCIATIONS", 16, 1, 1000),
        max_pdu=r.integer("DICOM_MAX_PDU", 1 << 20, 4096, 1 << 26),
        acse_timeout=seconds("DICOM_ACSE_TIMEOUT", 30.0),
        dimse_timeout=seconds("DICOM_DIMSE_TIMEOUT", 60.0),
        network_timeout=seconds("DICOM_NETWORK_TIMEOUT", 120.0),
        store_timeout=seconds("DICOM_STORE_TIMEOUT", 60.0),
        max_find_results=r.integer("DICOM_MAX_FIND_RESULTS", 1000, 1, 100_000),
        storage_check_file=r.get(
            "DICOM_STORAGE_CHECK_FILE", None, _check_file, "must be a file name or path"
        ),
        min_free_space=r.get(
            "DICOM_MIN_FREE_SPACE",
            1 << 30,
            parse_size,
            "must be a size such as 0, 500MiB, 2GiB or 1073741824 (bytes)",
        ),
        orphan_age=seconds("DICOM_ORPHAN_AGE", 600.0),
        orphan_lookback=seconds("DICOM_ORPHAN_LOOKBACK", 2 * 86400.0),
        sweep_interval=seconds("DICOM_SWEEP_INTERVAL", 600.0),
        tls_cert=tls.cert,
        tls_key=tls.key,
        tls_client_ca=tls.client_ca,
        tls_crl=tls.crl,
        tls_ae_from_cn=ae_from_cn,
        report_addresses=report_addresses,
        move_destinations=move_destinations,
        outbound_tls_ca=outbound.ca,
        outbound_tls_cert=outbound.cert,
        outbound_tls_key=outbound.key,
    )


def _check_file(text: str) -> Path:
    """A mount check file: relative to the store's folder, or absolute (the store's `/` below)."""
    path = Path(text.strip())
    if not path.name or path.name in (".", ".."):
        raise ValueError(text)
    return path


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(text)


def _read_toml(path: Path) -> dict[str, str]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{PREFIX}CONFIG: cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{PREFIX}CONFIG: {path} is not valid TOML: {exc}") from exc
    values: dict[str, str] = {}
    for key, value in data.items():
        name = key.upper()
        if not name.startswith(PREFIX):
            name = PREFIX + name
        if isinstance(value, bool):
            values[name] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            values[name] = str(value)
        else:
            raise ConfigError(f"{path}: {key} must be a string or a number")
    return values
