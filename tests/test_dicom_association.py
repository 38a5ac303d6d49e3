"""One association, acceptor side, sans-IO: bytes in, events out; and the negotiation policy."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AllStoragePresentationContexts

from dicom import dimse, pdu
from dicom.association import (
    Aborted,
    Acceptor,
    AssociationRequested,
    CommandReceived,
    ConnectionClosed,
    DatasetComplete,
    DatasetFragment,
    Event,
    ProtocolError,
    ReleaseRequested,
    State,
)
from dicom.negotiation import Policy, Refused, gateway_policy, limit_reached, negotiate
from dicom.pdu import (
    Abort,
    AbortReason,
    AssociateAccept,
    AssociateReject,
    AssociateRequest,
    ContextResult,
    PDataTF,
    Pdv,
    ProposedContext,
    RejectResult,
    RejectSource,
    UserInformation,
)
from dicom.sop_classes import STORAGE, STUDY_ROOT_FIND, TRANSFER_SYNTAXES, VERIFICATION
from monitoring.metrics import DICOM_REFUSAL_REASONS

CT = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
JPEG = "1.2.840.10008.1.2.4.50"
POLICY = gateway_policy("QANTARA", 1 << 16, frozenset())


def request(calling: str = "CT01", *contexts: ProposedContext, max_length: int = 4096) -> bytes:
    proposed = contexts or (
        ProposedContext(1, VERIFICATION, (IMPLICIT,)),
        ProposedContext(3, CT, (EXPLICIT,)),
    )
    return pdu.encode(
        AssociateRequest("QANTARA", calling, proposed, UserInformation(max_length=max_length))
    )


def store_message(message_id: int, dataset: bytes, context_id: int = 3) -> bytes:
    command = dimse.Command(
        dimse.C_STORE_RQ,
        message_id=message_id,
        affected_sop_class=CT,
        affected_sop_instance=f"1.2.3.{message_id}",
        priority=0,
        dataset_type=0,
    )
    return b"".join(pdu.message_pdus(context_id, dimse.encode_command(command), dataset, 1000))


def drain(acceptor: Acceptor) -> list[Event]:
    events = []
    while (event := acceptor.next_event()) is not None:
        events.append(event)
    return events


def established(max_length: int = 4096) -> Acceptor:
    acceptor = Acceptor(1 << 16)
    acceptor.receive_data(request(max_length=max_length))
    [event] = drain(acceptor)
    assert isinstance(event, AssociationRequested)
    answer = negotiate(event.request, POLICY)
    assert isinstance(answer, AssociateAccept)
    acceptor.accept(answer)
    return acceptor


def summary(events: list[Event]) -> list[tuple[str, object]]:
    """Events with fragments joined per dataset (fragment boundaries depend on the feed)."""
    out: list[tuple[str, object]] = []
    data = bytearray()
    for event in events:
        if isinstance(event, DatasetFragment):
            data.extend(event.data)
        elif isinstance(event, DatasetComplete):
            out.append(("dataset", bytes(data)))
            data = bytearray()
        elif isinstance(event, CommandReceived):
            out.append(("command", event.command.message_id))
        else:
            out.append((type(event).__name__, None))
    return out


def test_association_request_is_reported_and_nothing_more_until_decided() -> None:
    acceptor = Acceptor(1 << 16)
    acceptor.receive_data(request() + store_message(1, b"x" * 10))
    events = drain(acceptor)
    assert [type(e) for e in events] == [AssociationRequested]
    assert acceptor.state is State.AWAITING_DECISION
    answer = negotiate(events[0].request, POLICY)  # type: ignore[union-attr]
    assert isinstance(answer, AssociateAccept)
    reply = pdu.decode(acceptor.accept(answer))
    assert isinstance(reply, AssociateAccept)
    assert summary(drain(acceptor)) == [("command", 1), ("dataset", b"x" * 10)]


def test_command_then_dataset_fragments_then_complete_in_order() -> None:
    acceptor = established()
    dataset = bytes(range(256)) * 20  # several PDUs of at most 1000 bytes
    acceptor.receive_data(store_message(1, dataset))
    events = drain(acceptor)
    assert isinstance(events[0], CommandReceived)
    assert events[0].transfer_syntax == EXPLICIT
    assert events[0].abstract_syntax == CT
    assert all(isinstance(e, DatasetFragment) for e in events[1:-1])
    assert isinstance(events[-1], DatasetComplete)
    assert summary(events) == [("command", 1), ("dataset", dataset)]


def test_pipelined_messages_in_one_feed_yield_every_message_in_order() -> None:
    acceptor = established()
    stream = store_message(1, b"a" * 1500) + store_message(2, b"b" * 10) + store_message(3, b"")
    acceptor.receive_data(stream)
    assert summary(drain(acceptor)) == [
        ("command", 1),
        ("dataset", b"a" * 1500),
        ("command", 2),
        ("dataset", b"b" * 10),
        ("command", 3),
        ("dataset", b""),
    ]


def test_feed_cut_at_every_byte_boundary_yields_the_same_events() -> None:
    stream = request() + store_message(1, b"z" * 1200) + pdu.encode(pdu.ReleaseRequest())
    expected = [("command", 1), ("dataset", b"z" * 1200), ("ReleaseRequested", None)]
    for cut in range(len(stream) + 1):
        acceptor = Acceptor(1 << 16)
        events: list[Event] = []
        for part in (stream[:cut], stream[cut:]):
            if part:  # b"" would mean the end of the stream
                acceptor.receive_data(part)
            for event in drain(acceptor):
                if isinstance(event, AssociationRequested):
                    answer = negotiate(event.request, POLICY)
                    assert isinstance(answer, AssociateAccept)
                    acceptor.accept(answer)
                    events.extend(drain(acceptor))
                else:
                    events.append(event)
        assert summary(events) == expected, cut


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.booleans())
def test_garbage_never_raises(data: bytes, after_association: bool) -> None:
    acceptor = established() if after_association else Acceptor(1 << 16)
    acceptor.receive_data(data)
    events = drain(acceptor)
    acceptor.receive_data(b"")
    events += drain(acceptor)
    for event in events:
        if isinstance(event, ProtocolError):
            assert isinstance(pdu.decode(event.reply), Abort | AssociateReject)
    assert acceptor.state in (State.CLOSED, State.ERROR, State.AWAITING_DECISION)


def test_p_data_before_the_association_is_aborted_as_unexpected() -> None:
    acceptor = Acceptor(1 << 16)
    acceptor.receive_data(store_message(1, b"x"))
    [event] = drain(acceptor)
    assert isinstance(event, ProtocolError)
    assert pdu.decode(event.reply) == Abort(2, AbortReason.UNEXPECTED_PDU)
    assert acceptor.state is State.ERROR


def test_pdv_on_a_context_not_accepted_is_aborted_as_invalid() -> None:
    acceptor = established()
    acceptor.receive_data(store_message(1, b"x", context_id=5))
    [event] = drain(acceptor)
    assert isinstance(event, ProtocolError)
    assert pdu.decode(event.reply) == Abort(2, AbortReason.INVALID_PARAMETER)


def test_dataset_fragment_without_its_command_is_aborted() -> None:
    acceptor = established()
    acceptor.receive_data(pdu.encode(PDataTF((Pdv(3, False, True, b"data"),))))
    [event] = drain(acceptor)
    assert isinstance(event, ProtocolError)
    assert "without its command" in event.detail


def test_malformed_command_set_is_aborted() -> None:
    acceptor = established()
    acceptor.receive_data(pdu.encode(PDataTF((Pdv(3, True, True, b"\x08\x00\x00\x00"),))))
    [event] = drain(acceptor)
    assert isinstance(event, ProtocolError)


def test_second_association_request_is_aborted_as_unexpected() -> None:
    acceptor = established()
    acceptor.receive_data(request())
    [event] = drain(acceptor)
    assert isinstance(event, ProtocolError)
    assert pdu.decode(event.reply) == Abort(2, AbortReason.UNEXPECTED_PDU)


def test_release_request_is_answered_with_a_release_reply() -> None:
    acceptor = established()
    acceptor.receive_data(pdu.encode(pdu.ReleaseRequest()))
    assert [type(e) for e in drain(acceptor)] == [ReleaseRequested]
    assert pdu.decode(acceptor.release_reply()) == pdu.ReleaseReply()
    assert acceptor.state is State.CLOSED


def test_peer_abort_mid_dataset_is_reported() -> None:
    acceptor = established()
    command = dimse.Command(dimse.C_STORE_RQ, 1, None, CT, "1.2.3", dataset_type=0)
    pdus = pdu.message_pdus(3, dimse.encode_command(command), b"q" * 3000, 1000)
    acceptor.receive_data(b"".join(pdus[:2]) + pdu.encode(Abort(0, 0)))  # command, 1 fragment
    events = drain(acceptor)
    assert isinstance(events[-1], Aborted)
    assert acceptor.state is State.CLOSED


def test_end_of_stream_is_reported_once_buffered_pdus_are_read() -> None:
    acceptor = established()
    acceptor.receive_data(store_message(1, b"x"))
    acceptor.receive_data(b"")
    assert summary(drain(acceptor)) == [
        ("command", 1),
        ("dataset", b"x"),
        ("ConnectionClosed", None),
    ]


def test_a_cut_pdu_marks_the_association_as_inside_a_message() -> None:
    acceptor = established()
    assert not acceptor.in_message
    acceptor.receive_data(store_message(1, b"x" * 100)[:20])
    drain(acceptor)
    assert acceptor.in_message


def test_c_cancel_is_reported_as_a_command() -> None:
    acceptor = Acceptor(1 << 16)
    acceptor.receive_data(request("VIEWER", ProposedContext(1, STUDY_ROOT_FIND, (IMPLICIT,))))
    [event] = drain(acceptor)
    assert isinstance(event, AssociationRequested)
    answer = negotiate(event.request, POLICY)
    assert isinstance(answer, AssociateAccept)
    acceptor.accept(answer)
    cancel = dimse.Command(dimse.C_CANCEL_RQ, responded_to=4)
    acceptor.receive_data(b"".join(pdu.message_pdus(1, dimse.encode_command(cancel), None, 0)))
    [received] = drain(acceptor)
    assert isinstance(received, CommandReceived)
    assert received.command.command_field == dimse.C_CANCEL_RQ
    assert received.command.responded_to == 4


def test_responses_respect_the_peers_maximum_length() -> None:
    acceptor = established(max_length=512)
    response = dimse.find_response(dimse.Command(dimse.C_FIND_RQ, 1), 0xFF00, identifier=True)
    sent = acceptor.send_message(1, response, b"i" * 2000)
    reader = pdu.PduReader(512)
    reader.feed(sent)
    count = 0
    while reader.next_pdu() is not None:
        count += 1
    assert count >= 5
    assert reader.buffered == 0


# --- negotiation --------------------------------------------------------------------------------


def decided(
    policy: Policy,
    *contexts: ProposedContext,
    calling: str = "CT01",
    certified: frozenset[str] = frozenset(),
) -> object:
    acceptor = Acceptor(1 << 16)
    acceptor.receive_data(request(calling, *contexts))
    [event] = drain(acceptor)
    assert isinstance(event, AssociationRequested)
    return negotiate(event.request, policy, certified)


def test_calling_ae_not_allowed_is_rejected_permanently_by_the_service_user() -> None:
    policy = gateway_policy("QANTARA", 1 << 16, frozenset({"CT01"}))
    assert decided(policy, calling="INTRUDER") == Refused(
        AssociateReject(RejectResult.PERMANENT, RejectSource.SERVICE_USER, pdu.REJECT_CALLING_AE),
        "calling_ae",
    )
    assert isinstance(decided(policy, calling="CT01"), AssociateAccept)


def test_called_ae_is_checked_only_when_required() -> None:
    strict = gateway_policy("OTHER", 1 << 16, frozenset(), require_called_ae=True)
    assert decided(strict) == Refused(
        AssociateReject(RejectResult.PERMANENT, RejectSource.SERVICE_USER, pdu.REJECT_CALLED_AE),
        "called_ae",
    )
    assert isinstance(decided(gateway_policy("OTHER", 1 << 16, frozenset())), AssociateAccept)


BOUND = gateway_policy("QANTARA", 1 << 16, frozenset(), ae_from_certificate=True)


def test_a_calling_ae_that_is_its_certificate_s_common_name_is_accepted() -> None:
    answer = decided(BOUND, calling="CR-UNIT-07", certified=frozenset({"CR-UNIT-07"}))
    assert isinstance(answer, AssociateAccept)


def test_a_calling_ae_other_than_its_certificate_s_common_name_is_refused() -> None:
    answer = decided(BOUND, calling="CT01", certified=frozenset({"CR-UNIT-07"}))
    assert answer == Refused(
        AssociateReject(RejectResult.PERMANENT, RejectSource.SERVICE_USER, pdu.REJECT_CALLING_AE),
        "certificate",
    )


def test_a_peer_without_a_certificate_is_refused_when_the_ae_is_bound_to_it() -> None:
    answer = decided(BOUND, calling="CT01")
    assert isinstance(answer, Refused)
    assert answer.reason == "certificate"


def test_the_certificate_s_names_are_ignored_unless_the_ae_is_bound_to_them() -> None:
    answer = decided(POLICY, calling="CT01", certified=frozenset({"CR-UNIT-07"}))
    assert isinstance(answer, AssociateAccept)


def test_every_refusal_reason_has_its_metric_series() -> None:
    refusals = [
        decided(gateway_policy("Q", 1 << 16, frozenset({"X"})), calling="CT01"),
        decided(BOUND, calling="CT01"),
        decided(gateway_policy("OTHER", 1 << 16, frozenset(), require_called_ae=True)),
        limit_reached(),
    ]
    reasons = {refusal.reason for refusal in refusals if isinstance(refusal, Refused)}
    assert reasons | {"application_context"} == set(DICOM_REFUSAL_REASONS)


def test_unknown_application_context_is_rejected() -> None:
    encoded = pdu.encode(
        AssociateRequest(
            "QANTARA",
            "CT01",
            (ProposedContext(1, VERIFICATION, (IMPLICIT,)),),
            application_context="1.2.3.4",
        )
    )
    acceptor = Acceptor(1 << 16)
    acceptor.receive_data(encoded)
    [event] = drain(acceptor)
    assert isinstance(event, AssociationRequested)
    assert negotiate(event.request, POLICY) == Refused(
        AssociateReject(
            RejectResult.PERMANENT, RejectSource.SERVICE_USER, pdu.REJECT_APPLICATION_CONTEXT
        ),
        "application_context",
    )


def test_each_context_gets_its_result_and_the_first_supported_transfer_syntax() -> None:
    answer = decided(
        POLICY,
        ProposedContext(1, CT, ("1.2.3.999", JPEG, EXPLICIT)),
        ProposedContext(3, "1.2.3.4.5.6", (IMPLICIT,)),
        ProposedContext(5, VERIFICATION, (JPEG,)),
        ProposedContext(7, STUDY_ROOT_FIND, (EXPLICIT, IMPLICIT)),
    )
    assert isinstance(answer, AssociateAccept)
    results = [(c.context_id, c.result, c.transfer_syntax) for c in answer.contexts]
    assert results[0] == (1, ContextResult.ACCEPTANCE, JPEG)
    assert results[1][:2] == (3, ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED)
    assert results[2][:2] == (5, ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED)
    assert results[3] == (7, ContextResult.ACCEPTANCE, EXPLICIT)


def test_our_maximum_length_is_advertised() -> None:
    answer = decided(POLICY)
    assert isinstance(answer, AssociateAccept)
    assert answer.user_information.max_length == 1 << 16
    assert answer.user_information.implementation_class_uid


def test_local_limit_is_a_transient_presentation_reject() -> None:
    refused = limit_reached()
    reject = refused.reject
    assert refused.reason == "local_limit"
    assert (reject.result, reject.source, reject.reason) == (
        RejectResult.TRANSIENT,
        RejectSource.PRESENTATION,
        pdu.REJECT_LOCAL_LIMIT,
    )


def test_closed_connection_before_a_request_is_reported() -> None:
    acceptor = Acceptor(1 << 16)
    acceptor.receive_data(b"")
    assert [type(e) for e in drain(acceptor)] == [ConnectionClosed]


def test_every_storage_sop_class_pynetdicom_serves_is_accepted() -> None:
    served = {str(context.abstract_syntax) for context in AllStoragePresentationContexts}
    assert served <= STORAGE


def test_every_transfer_syntax_pydicom_knows_is_offered() -> None:
    assert {str(uid) for uid in AllTransferSyntaxes} <= set(TRANSFER_SYNTAXES)
