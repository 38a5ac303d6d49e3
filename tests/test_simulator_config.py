"""`qantara simulate units` options: argparse round trip and early refusal of bad values."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from simulators.fleet_units import UnitsConfig


def _parse(*argv: str) -> UnitsConfig:
    parser = argparse.ArgumentParser()
    UnitsConfig.add_arguments(parser, mqtt_url="mqtt://broker.example:1884")
    return UnitsConfig.from_args(parser.parse_args(argv))


def test_defaults_match_the_dataclass_and_take_the_settings_url() -> None:
    assert _parse() == UnitsConfig(mqtt_url="mqtt://broker.example:1884")


def test_options_reach_the_config() -> None:
    cfg = _parse(
        "--count", "100", "--rate", "0.5", "--duration", "600", "--flaky", "0.02",
        "--state-dir", "/tmp/units", "--seed", "42", "--resend-after", "5",
        "--drain-timeout", "120", "--unit-prefix", "UMMC-", "--quiet",
    )  # fmt: skip
    assert (cfg.count, cfg.rate, cfg.duration, cfg.flaky) == (100, 0.5, 600.0, 0.02)
    assert cfg.state_dir == Path("/tmp/units")
    assert (cfg.seed, cfg.resend_after, cfg.drain_timeout) == (42, 5.0, 120.0)
    assert cfg.quiet


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"count": 0}, "count"),
        ({"rate": 0.0}, "rate"),
        ({"flaky": 1.5}, "probability"),
        ({"resend_after": 0.0}, "resend_after"),
        ({"unit_prefix": "UMMC/+"}, "unit_prefix"),
        ({"mqtt_url": "http://127.0.0.1:1883"}, "scheme"),
        ({"mqtt_protocol": "4"}, "protocol"),
    ],
)
def test_bad_values_are_refused_before_anything_runs(bad: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        UnitsConfig(**bad)  # type: ignore[arg-type]
