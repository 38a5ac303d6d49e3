"""The unit outbox: consecutive persisted seqs, watermark pruning, resend selection."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from simulators.outbox import Outbox


def _payload(seq: int) -> bytes:
    return f'{{"seq":{seq}}}'.encode()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "UMMC-FM-001.sqlite3"


def test_seqs_start_at_one_and_are_consecutive(path: Path) -> None:
    with Outbox(path) as outbox:
        assert [outbox.append(_payload) for _ in range(5)] == [1, 2, 3, 4, 5]


def test_builder_receives_the_seq_it_is_stored_under(path: Path) -> None:
    with Outbox(path) as outbox:
        outbox.append(_payload)
        seq = outbox.append(_payload)
        assert outbox.due_for_send(now=0.0, resend_after=10.0) == [
            (1, b'{"seq":1}'),
            (2, b'{"seq":2}'),
        ]
        assert seq == 2


def test_numbering_continues_after_reopen(path: Path) -> None:
    with Outbox(path) as outbox:
        for _ in range(3):
            outbox.append(_payload)
        outbox.prune(3)
    with Outbox(path) as outbox:
        assert outbox.append(_payload) == 4
        assert outbox.watermark == 3


def test_failing_builder_consumes_no_seq(path: Path) -> None:
    def broken(seq: int) -> bytes:
        raise RuntimeError("device glitch")

    with Outbox(path) as outbox:
        with pytest.raises(RuntimeError):
            outbox.append(broken)
        assert outbox.append(_payload) == 1
        assert outbox.pending() == 1


def test_file_uses_wal_and_the_documented_tables(path: Path) -> None:
    Outbox(path).close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = [row[1] for row in db.execute("PRAGMA table_info(outbox)")]
        assert columns == ["seq", "payload", "created_at", "last_sent"]
        assert db.execute("SELECT next_seq, watermark FROM meta").fetchone() == (1, 0)
    finally:
        db.close()


def test_prune_deletes_up_to_the_watermark_only(path: Path) -> None:
    with Outbox(path) as outbox:
        for _ in range(10):
            outbox.append(_payload)
        assert outbox.prune(6) == 6
        assert outbox.pending() == 4
        assert [seq for seq, _ in outbox.due_for_send(0.0, 10.0)] == [7, 8, 9, 10]


def test_watermark_never_moves_back(path: Path) -> None:
    with Outbox(path) as outbox:
        for _ in range(4):
            outbox.append(_payload)
        outbox.prune(3)
        outbox.prune(1)
        assert outbox.watermark == 3
        assert outbox.pending() == 1


def test_watermark_beyond_our_numbering_moves_numbering_past_it(path: Path) -> None:
    # the outbox was lost but the gateway remembers seq 500: new messages must not reuse 1..500
    with Outbox(path) as outbox:
        outbox.prune(500)
        assert outbox.append(_payload) == 501


def test_never_sent_messages_are_due_in_seq_order(path: Path) -> None:
    with Outbox(path) as outbox:
        for _ in range(3):
            outbox.append(_payload)
        assert [seq for seq, _ in outbox.due_for_send(now=100.0, resend_after=10.0)] == [1, 2, 3]


def test_sent_message_is_due_again_only_after_resend_after(path: Path) -> None:
    with Outbox(path) as outbox:
        for _ in range(3):
            outbox.append(_payload)
        outbox.mark_sent([1, 2], now=100.0)
        assert [seq for seq, _ in outbox.due_for_send(now=105.0, resend_after=10.0)] == [3]
        assert [seq for seq, _ in outbox.due_for_send(now=110.0, resend_after=10.0)] == [1, 2, 3]


def test_acked_message_is_never_due(path: Path) -> None:
    with Outbox(path) as outbox:
        for _ in range(3):
            outbox.append(_payload)
        outbox.mark_sent([1, 2, 3], now=100.0)
        outbox.prune(2)
        assert [seq for seq, _ in outbox.due_for_send(now=1000.0, resend_after=10.0)] == [3]


def test_due_for_send_honours_the_limit(path: Path) -> None:
    with Outbox(path) as outbox:
        for _ in range(5):
            outbox.append(_payload)
        assert [seq for seq, _ in outbox.due_for_send(0.0, 10.0, limit=2)] == [1, 2]


def test_reset_sent_makes_everything_above_the_watermark_due(path: Path) -> None:
    with Outbox(path) as outbox:
        for _ in range(3):
            outbox.append(_payload)
        outbox.mark_sent([1, 2, 3], now=100.0)
        outbox.reset_sent()
        assert [seq for seq, _ in outbox.due_for_send(now=100.0, resend_after=10.0)] == [1, 2, 3]


def test_unacked_messages_survive_reopen(path: Path) -> None:
    with Outbox(path) as outbox:
        for _ in range(4):
            outbox.append(_payload)
        outbox.prune(1)
    with Outbox(path) as outbox:
        assert outbox.due_for_send(now=0.0, resend_after=10.0) == [
            (2, b'{"seq":2}'),
            (3, b'{"seq":3}'),
            (4, b'{"seq":4}'),
        ]
