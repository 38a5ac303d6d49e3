"""Settings: read once from the environment (and TOML), each bad value named precisely."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from dicom.config import AeAddress
from gateway.settings import Settings, parse_duration, parse_size
from ingest.errors import ConfigError


def test_defaults_follow_the_design() -> None:
    settings = Settings.load({})
    assert settings.mqtt.url == "mqtt://127.0.0.1:1883"
    assert settings.mqtt.client_id.startswith("qantara-")
    assert settings.mqtt.max_payload == 256 * 1024
    assert settings.mqtt.shared_group is None
    assert settings.http.port == 8080
    assert settings.bind == "127.0.0.1"
    assert settings.database.url is None


def test_shared_group_subscribes_through_share() -> None:
    settings = Settings.load({"QANTARA_MQTT_SHARED_GROUP": "qantara"})
    assert settings.mqtt.vitals_subscription == "$share/qantara/units/+/vitals"


def test_without_shared_group_subscribes_to_every_unit() -> None:
    assert Settings.load({}).mqtt.vitals_subscription == "units/+/vitals"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("QANTARA_HTTP_PORT", "http"),
        ("QANTARA_HTTP_PORT", "70000"),
        ("QANTARA_MQTT_URL", "http://broker"),
        ("QANTARA_DATABASE_URL", "mysql://db"),
        ("QANTARA_MQTT_MAX_PAYLOAD", "-1"),
        ("QANTARA_SAMPLE_MAX_FUTURE", "tomorrow"),
        ("QANTARA_MQTT_PROTOCOL", "4.0"),
        ("QANTARA_MQTT_SHARED_GROUP", "a/b"),
        ("QANTARA_LOG_LEVEL", "chatty"),
        ("QANTARA_MIGRATE_DATABASE_URL", "mysql://db"),
        ("QANTARA_API_DATABASE_URL", "http://db"),
        ("QANTARA_ADMIN_DATABASE_URL", "db"),
        ("QANTARA_DB_ROLE_PREFIX", "Qantara-Prod"),
        ("QANTARA_DB_ROLE_PREFIX", "9lives"),
        ("QANTARA_MQTT_LEDGER_KEEP", "-5"),
        ("QANTARA_DICOM_REQUIRE_CALLED_AE", "maybe"),
        ("QANTARA_MQTT_LEDGER_PRUNE_INTERVAL", "often"),
        ("QANTARA_DICOM_REPORT_ADDRESSES", "CR-UNIT-07=10.8.0.7"),
        ("QANTARA_DICOM_REPORT_ADDRESSES", "CR-UNIT-07=10.8.0.7:70000"),
        ("QANTARA_DICOM_REPORT_ADDRESSES", "10.8.0.7:104"),
        ("QANTARA_DICOM_MOVE_DESTINATIONS", "RAD-WS-1=10.20.0.5"),
        ("QANTARA_DICOM_RETRIEVE_AES", "AN-AE-TITLE-LONGER-THAN-16"),
    ],
)
def test_bad_value_is_refused_with_the_variable_named(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.load({name: value})


def test_environment_wins_over_the_toml_file(tmp_path: Path) -> None:
    config = tmp_path / "qantara.toml"
    config.write_text('mqtt_url = "mqtt://from-file:1883"\nQANTARA_HTTP_PORT = 9000\n')
    settings = Settings.load({"QANTARA_MQTT_URL": "mqtt://from-env:1883"}, config)
    assert settings.mqtt.url == "mqtt://from-env:1883"
    assert settings.http.port == 9000


def test_unreadable_toml_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="QANTARA_CONFIG"):
        Settings.load({}, config)


def test_ledger_pruning_runs_every_ten_minutes_unless_set_to_zero() -> None:
    assert Settings.load({}).ledger_prune_interval == 600.0
    assert Settings.load({"QANTARA_MQTT_LEDGER_PRUNE_INTERVAL": "0"}).ledger_prune_interval == 0.0


def test_dicom_called_ae_check_is_off_unless_asked() -> None:
    assert not Settings.load({}).dicom.require_called_ae
    assert Settings.load({"QANTARA_DICOM_REQUIRE_CALLED_AE": "true"}).dicom.require_called_ae


def test_dicom_report_addresses_name_each_modality_s_own_port() -> None:
    text = "CR-UNIT-07=10.8.0.7:104, US-UNIT-07 = [fd00::7]:11112"
    dicom = Settings.load({"QANTARA_DICOM_REPORT_ADDRESSES": text}).dicom
    assert dicom.report_address("CR-UNIT-07") == AeAddress("CR-UNIT-07", "10.8.0.7", 104)
    assert dicom.report_address("US-UNIT-07") == AeAddress("US-UNIT-07", "fd00::7", 11112)
    assert dicom.report_address("DX-UNIT-01") is None


def test_dicom_move_destinations_and_retrieving_callers_are_settings() -> None:
    dicom = Settings.load(
        {
            "QANTARA_DICOM_MOVE_DESTINATIONS": "RAD-WS-1=10.20.0.5:104",
            "QANTARA_DICOM_RETRIEVE_AES": "RAD-WS-1,TELE-CARDIO",
        }
    ).dicom
    assert dicom.move_destination("RAD-WS-1") == AeAddress("RAD-WS-1", "10.20.0.5", 104)
    assert dicom.move_destination("ELSEWHERE") is None
    assert dicom.retrieve_aes == frozenset({"RAD-WS-1", "TELE-CARDIO"})


def test_a_tls_address_needs_the_outbound_ca_and_is_marked_tls(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    dicom = Settings.load(
        {
            "QANTARA_DICOM_MOVE_DESTINATIONS": "PACS=tls://pacs.chu-rabat.ma:2762,WS=10.0.0.9:104",
            "QANTARA_DICOM_OUTBOUND_TLS_CA": str(ca),
        }
    ).dicom
    assert dicom.move_destination("PACS") == AeAddress("PACS", "pacs.chu-rabat.ma", 2762, True)
    assert dicom.move_destination("WS") == AeAddress("WS", "10.0.0.9", 104, False)
    assert dicom.outbound_tls_ca == ca
    with pytest.raises(ConfigError, match="DICOM_OUTBOUND_TLS_CA"):
        Settings.load({"QANTARA_DICOM_REPORT_ADDRESSES": "CR-UNIT-07=tls://10.8.0.7:2762"})


def test_the_outbound_certificate_needs_its_key(tmp_path: Path) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="OUTBOUND_TLS_CERT"):
        Settings.load({"QANTARA_DICOM_OUTBOUND_TLS_CERT": str(cert)})


def test_nobody_may_retrieve_unless_listed() -> None:
    assert Settings.load({}).dicom.retrieve_aes == frozenset()


def test_anyone_may_query_unless_query_aes_is_set() -> None:
    assert Settings.load({}).dicom.query_aes is None
    listed = Settings.load({"QANTARA_DICOM_QUERY_AES": "RIS,RAD-WS-1"}).dicom.query_aes
    assert listed == frozenset({"RIS", "RAD-WS-1"})


def test_dicom_orphan_sweep_timings_are_settings() -> None:
    dicom = Settings.load(
        {
            "QANTARA_DICOM_ORPHAN_AGE": "30m",
            "QANTARA_DICOM_ORPHAN_LOOKBACK": "7d",
            "QANTARA_DICOM_SWEEP_INTERVAL": "1m",
        }
    ).dicom
    assert (dicom.orphan_age, dicom.orphan_lookback, dicom.sweep_interval) == (1800, 604800, 60)


def test_dicom_mount_check_file_is_off_unless_named_and_relative_to_the_store() -> None:
    assert Settings.load({}).dicom.limits().mount_check is None
    dicom = Settings.load(
        {"QANTARA_DICOM_STORAGE": "/srv/dicom", "QANTARA_DICOM_STORAGE_CHECK_FILE": ".volume"}
    ).dicom
    assert dicom.limits().mount_check == Path("/srv/dicom/.volume")
    elsewhere = Settings.load({"QANTARA_DICOM_STORAGE_CHECK_FILE": "/mnt/pacs/.mounted"}).dicom
    assert elsewhere.limits().mount_check == Path("/mnt/pacs/.mounted")
    with pytest.raises(ConfigError, match="QANTARA_DICOM_STORAGE_CHECK_FILE"):
        Settings.load({"QANTARA_DICOM_STORAGE_CHECK_FILE": ".."})


def test_dicom_store_keeps_a_gibibyte_free_unless_told_otherwise() -> None:
    assert Settings.load({}).dicom.min_free_space == 1 << 30
    told = Settings.load({"QANTARA_DICOM_MIN_FREE_SPACE": "20GiB"}).dicom.min_free_space
    assert told == 20 << 30
    assert Settings.load({"QANTARA_DICOM_MIN_FREE_SPACE": "0"}).dicom.min_free_space == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1073741824", 1 << 30),
        ("512MiB", 512 << 20),
        ("1.5 GiB", 3 << 29),
        ("2tib", 2 << 40),
        ("500MB", 500_000_000),
        ("1GB", 10**9),
        ("64kB", 64_000),
        ("7B", 7),
    ],
)
def test_sizes_are_bytes_or_a_number_with_a_unit(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1GiB", "1 PiB", "1GiBs", "ten"])
def test_a_size_without_a_number_and_a_known_unit_names_its_variable(text: str) -> None:
    with pytest.raises(ConfigError, match="QANTARA_DICOM_MIN_FREE_SPACE: must be a size"):
        Settings.load({"QANTARA_DICOM_MIN_FREE_SPACE": text or " "})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30", timedelta(seconds=30)),
        ("500ms", timedelta(milliseconds=500)),
        ("15m", timedelta(minutes=15)),
        ("24h", timedelta(hours=24)),
        ("365d", timedelta(days=365)),
    ],
)
def test_durations_accept_the_usual_units(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


def test_http_tls_needs_both_certificate_and_key(tmp_path: Path) -> None:
    cert = tmp_path / "gateway.crt"
    cert.write_text("not checked here")
    with pytest.raises(ConfigError, match="QANTARA_HTTP_TLS_CERT"):
        Settings.load({"QANTARA_HTTP_TLS_CERT": str(cert)})


def test_http_tls_file_that_does_not_exist_is_named() -> None:
    with pytest.raises(ConfigError, match="QANTARA_HTTP_TLS_KEY"):
        Settings.load({"QANTARA_HTTP_TLS_KEY": "/nowhere/gateway.key"})


@pytest.mark.parametrize("listener", ["MLLP", "DICOM"])
@pytest.mark.parametrize("without_certificate", ["TLS_KEY", "TLS_CLIENT_CA"])
def test_a_listener_s_tls_key_or_client_ca_needs_its_certificate(
    tmp_path: Path, listener: str, without_certificate: str
) -> None:
    pem = tmp_path / "file.pem"
    pem.write_text("not checked here")
    with pytest.raises(ConfigError, match=f"QANTARA_{listener}_TLS_CERT"):
        Settings.load({f"QANTARA_{listener}_{without_certificate}": str(pem)})


def tls_files(
    folder: Path, listener: str, names: tuple[str, ...] = ("CERT", "KEY", "CLIENT_CA")
) -> dict[str, str]:
    """QANTARA_{listener}_TLS_{name} for each of `names`, each naming a file made in `folder`
    (`<listener>-<name>.pem`; the settings check that it exists, not what it holds)."""
    environ = {}
    for name in names:
        path = folder / f"{listener}-{name}.pem"
        path.write_text("not checked here")
        environ[f"QANTARA_{listener}_TLS_{name}"] = str(path)
    return environ


def test_dicom_tls_settings_reach_the_listener(tmp_path: Path) -> None:
    dicom = Settings.load(tls_files(tmp_path, "DICOM")).dicom
    cert, key, ca = (tmp_path / f"DICOM-{n}.pem" for n in ("CERT", "KEY", "CLIENT_CA"))
    assert (dicom.tls_cert, dicom.tls_key, dicom.tls_client_ca) == (cert, key, ca)
    assert not dicom.tls_ae_from_cn


def test_dicom_ae_from_the_certificate_reaches_the_listener(tmp_path: Path) -> None:
    environ = tls_files(tmp_path, "DICOM") | {"QANTARA_DICOM_TLS_AE_FROM_CN": "true"}
    assert Settings.load(environ).dicom.tls_ae_from_cn


@pytest.mark.parametrize(
    "switch", ["QANTARA_DICOM_TLS_AE_FROM_CN", "QANTARA_MLLP_TLS_FACILITY_FROM_CN"]
)
def test_a_sender_bound_to_its_certificate_needs_a_client_ca(tmp_path: Path, switch: str) -> None:
    cert = tmp_path / "gw.crt"
    cert.write_text("not checked here")
    listener = switch.split("_")[1]
    environ = {f"QANTARA_{listener}_TLS_CERT": str(cert), switch: "true"}
    with pytest.raises(ConfigError, match=f"{switch}: needs"):
        Settings.load(environ)


def test_mllp_facility_from_the_certificate_reaches_the_listener(tmp_path: Path) -> None:
    environ = tls_files(tmp_path, "MLLP") | {"QANTARA_MLLP_TLS_FACILITY_FROM_CN": "true"}
    assert Settings.load(environ).mllp.tls_facility_from_cn
    assert not Settings.load({}).mllp.tls_facility_from_cn


def test_migrate_and_api_urls_default_to_the_database_url() -> None:
    database = Settings.load({"QANTARA_DATABASE_URL": "postgresql://app@db/qantara"}).database
    assert database.migrate_dsn == "postgresql://app@db/qantara"
    assert database.api_dsn == "postgresql://app@db/qantara"
    assert database.admin_dsn == "postgresql://app@db/qantara"
    assert database.role_prefix == "qantara"


def test_each_database_url_is_used_for_its_own_job() -> None:
    database = Settings.load(
        {
            "QANTARA_DATABASE_URL": "postgresql://app@db/qantara",
            "QANTARA_MIGRATE_DATABASE_URL": "postgresql://migrate@db/qantara",
            "QANTARA_API_DATABASE_URL": "postgresql://api@db/qantara",
            "QANTARA_ADMIN_DATABASE_URL": "postgresql://admin@db/qantara",
        }
    ).database
    assert database.url == "postgresql://app@db/qantara"
    assert database.migrate_dsn == "postgresql://migrate@db/qantara"
    assert database.api_dsn == "postgresql://api@db/qantara"
    assert database.admin_dsn == "postgresql://admin@db/qantara"


def test_admin_url_falls_back_to_the_migrate_url() -> None:
    database = Settings.load(
        {
            "QANTARA_DATABASE_URL": "postgresql://app@db/qantara",
            "QANTARA_MIGRATE_DATABASE_URL": "postgresql://migrate@db/qantara",
        }
    ).database
    assert database.admin_dsn == "postgresql://migrate@db/qantara"


def test_a_bad_database_url_is_named_without_showing_its_password() -> None:
    with pytest.raises(ConfigError, match="QANTARA_MIGRATE_DATABASE_URL") as raised:
        Settings.load({"QANTARA_MIGRATE_DATABASE_URL": "mysql://root:hunter2@db/qantara"})
    assert "hunter2" not in str(raised.value)


@pytest.mark.parametrize("listener", ["MLLP", "DICOM"])
def test_a_listener_s_crl_needs_its_client_ca(tmp_path: Path, listener: str) -> None:
    pem = tmp_path / "file.pem"
    pem.write_text("not checked here")
    environ = {f"QANTARA_{listener}_TLS_CERT": str(pem), f"QANTARA_{listener}_TLS_CRL": str(pem)}
    with pytest.raises(ConfigError, match=f"QANTARA_{listener}_TLS_CRL: needs"):
        Settings.load(environ)


def test_the_crls_reach_both_listeners(tmp_path: Path) -> None:
    names = ("CERT", "KEY", "CLIENT_CA", "CRL")
    environ = tls_files(tmp_path, "MLLP", names) | tls_files(tmp_path, "DICOM", names)
    settings = Settings.load(environ)
    assert settings.mllp.tls_crl == tmp_path / "MLLP-CRL.pem"
    assert settings.dicom.tls_crl == tmp_path / "DICOM-CRL.pem"
