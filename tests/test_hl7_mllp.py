"""MLLP framing: bytes in, events out. No sockets."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hl7.mllp import (
    ConnectionClosed,
    FramingError,
    Message,
    MllpEvent,
    MllpFramer,
    MllpState,
)
from ingest.errors import InputError

SB, EB = b"\x0b", b"\x1c\x0d"
ORU = b"MSH|^~\\&|LAB|HOSP|QANTARA|NAT|20240101120000||ORU^R01|1|P|2.5.1\rPID|1||123\r"
ADT = b"MSH|^~\\&|HIS|HOSP|QANTARA|NAT|20240101120000||ADT^A01|2|P|2.5.1\rPID|1||456\r"


def payloads(events: list[MllpEvent]) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, Message)]


def test_one_frame_yields_its_payload() -> None:
    assert MllpFramer().receive_data(SB + ORU + EB) == [Message(ORU)]


def test_several_frames_in_one_read_yield_every_payload_in_order() -> None:
    framer = MllpFramer()
    assert payloads(framer.receive_data(SB + ORU + EB + SB + ADT + EB)) == [ORU, ADT]


def test_frame_split_at_every_byte_yields_same_messages() -> None:
    stream = SB + ORU + EB + SB + ADT + EB
    framer = MllpFramer()
    events: list[MllpEvent] = []
    for i in range(len(stream)):
        events += framer.receive_data(stream[i : i + 1])
    assert payloads(events) == [ORU, ADT]


def test_frame_cut_between_end_block_bytes_completes_on_the_carriage_return() -> None:
    framer = MllpFramer()
    assert framer.receive_data(SB + ORU + b"\x1c") == []
    assert framer.state is MllpState.END_BLOCK
    assert framer.receive_data(b"\r") == [Message(ORU)]


def test_whitespace_between_frames_is_ignored() -> None:
    framer = MllpFramer()
    events = framer.receive_data(b"\r\n " + SB + ORU + EB + b"\n\t\r\n" + SB + ADT + EB + b"\n")
    assert payloads(events) == [ORU, ADT]
    assert framer.state is MllpState.IDLE


def test_empty_frame_yields_an_empty_payload() -> None:
    assert MllpFramer().receive_data(SB + EB) == [Message(b"")]


def test_end_of_stream_between_frames_yields_connection_closed() -> None:
    framer = MllpFramer()
    framer.receive_data(SB + ORU + EB)
    assert framer.receive_data(b"") == [ConnectionClosed()]
    assert framer.state is MllpState.CLOSED


def test_end_of_stream_inside_a_frame_is_a_truncated_frame() -> None:
    framer = MllpFramer()
    framer.receive_data(SB + ORU[:10])
    with pytest.raises(FramingError) as caught:
        framer.receive_data(b"")
    assert caught.value.reason == "mllp-truncated-frame"


def test_end_of_stream_after_the_end_block_byte_is_a_truncated_frame() -> None:
    framer = MllpFramer()
    framer.receive_data(SB + ORU + b"\x1c")
    with pytest.raises(FramingError, match="mllp-truncated-frame"):
        framer.receive_data(b"")


def test_data_after_end_of_stream_is_refused() -> None:
    framer = MllpFramer()
    framer.receive_data(b"")
    with pytest.raises(FramingError, match="mllp-data-after-close"):
        framer.receive_data(SB)


def test_bytes_before_the_start_block_are_junk() -> None:
    with pytest.raises(FramingError) as caught:
        MllpFramer().receive_data(b"MSH|" + SB)
    assert caught.value.reason == "mllp-junk-before-start"


def test_start_block_inside_a_frame_is_refused() -> None:
    with pytest.raises(FramingError, match="mllp-start-inside-frame"):
        MllpFramer().receive_data(SB + ORU + SB + ADT + EB)


def test_start_block_inside_a_frame_is_refused_across_reads() -> None:
    framer = MllpFramer()
    framer.receive_data(SB + ORU)
    with pytest.raises(FramingError, match="mllp-start-inside-frame"):
        framer.receive_data(b"more" + SB)


def test_end_block_not_followed_by_carriage_return_is_refused() -> None:
    with pytest.raises(FramingError, match="mllp-bad-end-block"):
        MllpFramer().receive_data(SB + ORU + b"\x1c\n")


def test_message_of_exactly_the_limit_is_accepted() -> None:
    assert MllpFramer(100).receive_data(SB + b"A" * 100 + EB) == [Message(b"A" * 100)]


def test_message_over_the_limit_is_refused() -> None:
    with pytest.raises(FramingError) as caught:
        MllpFramer(100).receive_data(SB + b"A" * 101 + EB)
    assert caught.value.reason == "mllp-message-too-large"


def test_buffer_stays_within_limit_when_the_end_block_never_comes() -> None:
    framer = MllpFramer(10_000)
    framer.receive_data(SB)
    for _ in range(10):
        framer.receive_data(b"A" * 999)
        assert framer.buffered_bytes <= 10_000
    with pytest.raises(FramingError, match="mllp-message-too-large"):
        framer.receive_data(b"A" * 999)
    assert framer.buffered_bytes == 0


def test_one_huge_read_over_the_limit_is_refused_without_buffering_it() -> None:
    framer = MllpFramer(1000)
    with pytest.raises(FramingError, match="mllp-message-too-large"):
        framer.receive_data(SB + b"A" * 1_000_000)
    assert framer.buffered_bytes == 0


def test_framer_in_error_refuses_further_data() -> None:
    framer = MllpFramer()
    with pytest.raises(FramingError):
        framer.receive_data(b"junk")
    assert framer.state is MllpState.ERROR
    with pytest.raises(FramingError, match="mllp-junk-before-start"):
        framer.receive_data(SB + ORU + EB)


def test_framer_in_error_refuses_end_of_stream() -> None:
    framer = MllpFramer()
    with pytest.raises(FramingError):
        framer.receive_data(b"junk")
    with pytest.raises(FramingError):
        framer.receive_data(b"")


def test_messages_completed_before_an_error_are_returned_and_the_error_raised_next() -> None:
    framer = MllpFramer()
    assert framer.receive_data(SB + ORU + EB + b"junk") == [Message(ORU)]
    assert framer.state is MllpState.ERROR
    assert framer.pending_error is not None
    assert framer.pending_error.reason == "mllp-junk-before-start"
    with pytest.raises(FramingError, match="mllp-junk-before-start"):
        framer.receive_data(b"")


def test_framing_error_is_an_input_error_with_a_reason_and_detail() -> None:
    with pytest.raises(InputError) as caught:
        MllpFramer().receive_data(b"x")
    assert caught.value.reason == "mllp-junk-before-start"
    assert "0x78" in caught.value.detail


def test_bytearray_reads_yield_immutable_payloads() -> None:
    events = MllpFramer().receive_data(bytearray(SB + ORU + EB))
    assert events == [Message(ORU)]
    assert type(events[0].payload) is bytes  # type: ignore[union-attr]


def test_frame_wraps_payload_in_start_and_end_blocks() -> None:
    assert MllpFramer().frame(ORU) == SB + ORU + EB


def test_frame_refuses_a_payload_holding_block_characters() -> None:
    with pytest.raises(ValueError, match="0x0B or 0x1C"):
        MllpFramer().frame(b"a\x1cb")


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        MllpFramer(0)


_payload = st.binary(max_size=300).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b""))


@given(
    messages=st.lists(_payload, min_size=1, max_size=6),
    gaps=st.lists(st.sampled_from([b"", b"\r", b"\n", b"\r\n", b" \t"]), min_size=6, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=12),
)
def test_frames_cut_at_any_positions_yield_the_same_payloads(
    messages: list[bytes], gaps: list[bytes], cuts: list[int]
) -> None:
    framer = MllpFramer(300)
    stream = b"".join(gap + framer.frame(m) for gap, m in zip(gaps, messages, strict=False))
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    events: list[MllpEvent] = []
    for start, end in itertools.pairwise(bounds):
        if start < end:  # a read never returns b"" before end of stream
            events += framer.receive_data(stream[start:end])
    events += framer.receive_data(b"")
    assert payloads(events) == messages
    assert events[-1] == ConnectionClosed()


_noise = st.lists(
    st.one_of(
        st.binary(max_size=80),
        st.sampled_from([b"\x0b", b"\x1c", b"\x1c\r", b"\r\n", b"\x0bMSH|", b" "]),
    ),
    max_size=40,
)


@settings(max_examples=300)
@given(chunks=_noise, limit=st.integers(min_value=1, max_value=64))
def test_random_bytes_raise_only_input_errors_and_never_outgrow_the_limit(
    chunks: list[bytes], limit: int
) -> None:
    framer = MllpFramer(limit)
    try:
        for chunk in [*chunks, b""]:
            for event in framer.receive_data(chunk):
                if isinstance(event, Message):
                    assert len(event.payload) <= limit
            assert framer.buffered_bytes <= limit
    except InputError:
        assert framer.state is MllpState.ERROR
        assert framer.buffered_bytes == 0
