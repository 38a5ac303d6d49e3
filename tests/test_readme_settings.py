"""The README's configuration table names every setting the gateway reads: a setting nobody can
find is one nobody sets (or one set with a typo, silently ignored)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway import settings as settings_module
from gateway.settings import PREFIX, Settings

README = Path(__file__).resolve().parent.parent / "README.md"
QUOTED = re.compile(r"`(QANTARA_[A-Z0-9_]+|_[A-Z0-9_]+)`")


def names_read(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The variables `Settings.load` asks for, whatever their values."""
    asked: set[str] = set()
    original = settings_module._Reader.raw

    def recording(reader: settings_module._Reader, name: str) -> str | None:
        asked.add(PREFIX + name)
        return original(reader, name)

    monkeypatch.setattr(settings_module._Reader, "raw", recording)
    Settings.load({})
    return asked


def documented() -> set[str]:
    """Every name of the README, with the table's shorthand spelled out: on a line
    `QANTARA_HTTP_TLS_CERT` / `_KEY`, `_KEY` stands for QANTARA_HTTP_TLS_KEY."""
    names: set[str] = set()
    for line in README.read_text(encoding="utf-8").splitlines():
        quoted = QUOTED.findall(line)
        full = [q for q in quoted if q.startswith(PREFIX)]
        names.update(full)
        for suffix in (q for q in quoted if not q.startswith(PREFIX)):
            for name in full:
                names.update(name[:i] + suffix for i, c in enumerate(name) if c == "_")
    return names


def test_every_setting_the_gateway_reads_is_in_the_readme(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read = names_read(monkeypatch)
    assert len(read) > 40  # the recording saw the settings
    assert read - documented() == set()
