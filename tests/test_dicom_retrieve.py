"""The sans-IO side of C-GET: the identifier's unique keys, the sub-operation counts and final
status, role selection, the C-GET-RSP's counts, a dataset sent in pieces, the dataset's offset in a
stored file."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydicom.dataset import Dataset

from dicom import dimse, pdu, status
from dicom.audit import transferred_entry
from dicom.filemeta import dataset_offset, file_meta
from dicom.negotiation import Policy, gateway_policy, negotiate
from dicom.pdu import (
    AssociateAccept,
    AssociateRequest,
    ContextResult,
    ProposedContext,
    RoleSelection,
    UserInformation,
)
from dicom.retrieve import Progress, RetrieveError, retrieve_keys
from dicom.sop_classes import PATIENT_ROOT_GET, STUDY_ROOT_GET, STUDY_ROOT_MOVE
from gateway.fhir_audit import audit_event_resource
from storage.audit import AuditRecord
from storage.dicom_queries import RetrieveKeys
from tests.dicom_support import query

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
REQUEST = dimse.Command(dimse.C_GET_RQ, message_id=5, affected_sop_class=STUDY_ROOT_GET)


def test_series_level_keys_are_the_series_uids_and_the_study_above_them() -> None:
    keys = retrieve_keys(
        query("SERIES", StudyInstanceUID="1.2.3", SeriesInstanceUID=["1.2.4", "1.2.5"]),
        STUDY_ROOT_GET,
    )
    assert keys == RetrieveKeys("SERIES", "", ("1.2.3",), ("1.2.4", "1.2.5"), ())


def test_keys_below_the_retrieve_level_are_ignored() -> None:
    keys = retrieve_keys(
        query("STUDY", StudyInstanceUID="1.2.3", SOPInstanceUID="1.2.9"), STUDY_ROOT_GET
    )
    assert keys.instance_uids == ()


def test_patient_level_reads_the_patient_id() -> None:
    keys = retrieve_keys(query("PATIENT", PatientID="CIN-AB123"), PATIENT_ROOT_GET)
    assert keys == RetrieveKeys("PATIENT", "CIN-AB123")


def test_other_keys_of_the_identifier_are_ignored() -> None:
    keys = retrieve_keys(
        query("STUDY", StudyInstanceUID="1.2.3", PatientName="بنعلي^فاطمة"), STUDY_ROOT_GET
    )
    assert keys == RetrieveKeys("STUDY", "", ("1.2.3",))


@pytest.mark.parametrize(
    ("ds", "model", "message"),
    [
        (query("STUDY"), STUDY_ROOT_GET, "no StudyInstanceUID"),
        (query("PATIENT", PatientID="X"), STUDY_ROOT_GET, "level not in this retrieve model"),
        (
            query("IMAGES", SOPInstanceUID="1.2"),
            STUDY_ROOT_GET,
            "unknown query/retrieve level",
        ),
        (query("STUDY", StudyInstanceUID="1.2.abc"), STUDY_ROOT_GET, "is not a UID"),
        (query("STUDY", StudyInstanceUID="1." * 40), STUDY_ROOT_GET, "is not a UID"),
        (
            query("IMAGE", SeriesInstanceUID=["1.2", "1.3"], SOPInstanceUID="1.4"),
            STUDY_ROOT_GET,
            "more than one SeriesInstanceUID",
        ),
    ],
)
def test_identifier_without_usable_unique_keys_is_refused(
    ds: Dataset, model: str, message: str
) -> None:
    with pytest.raises(RetrieveError, match=message):
        retrieve_keys(ds, model)


def test_every_sub_operation_completed_is_success_without_level() -> None:
    progress = Progress(2)
    progress.answered("1.1", status.SUCCESS)
    progress.answered("1.2", status.SUCCESS)
    response, failed = progress.final(REQUEST, [])
    assert (response.status, response.completed, response.remaining, failed) == (0, 2, None, None)


def test_a_warning_answer_makes_the_final_status_b000() -> None:
    progress = Progress(2)
    assert progress.answered("1.1", 0xB007) == "warning"
    assert progress.answered("1.2", status.SUCCESS) == "completed"
    response, failed = progress.final(REQUEST, [])
    assert (response.status, response.warning, failed) == (status.GET_SOME_FAILED, 1, None)


def test_all_sub_operations_failed_is_a702_with_the_failed_uids() -> None:
    progress = Progress(2)
    progress.answered("1.1", 0xA700)
    progress.not_sent("1.2")
    response, failed = progress.final(REQUEST, [])
    assert response.status == status.GET_SUB_OPERATIONS_FAILED
    assert failed is not None
    assert list(failed.FailedSOPInstanceUIDList) == ["1.1", "1.2"]


def test_cancel_lists_what_was_not_sent_and_counts_it_as_remaining() -> None:
    progress = Progress(3)
    progress.answered("1.1", status.SUCCESS)
    response, failed = progress.final(REQUEST, ["1.2", "1.3"])
    assert (response.status, response.remaining, response.completed) == (dimse.CANCEL, 2, 1)
    assert failed is not None
    assert list(failed.FailedSOPInstanceUIDList) == ["1.2", "1.3"]


def test_pending_response_counts_what_remains() -> None:
    progress = Progress(3)
    progress.answered("1.1", status.SUCCESS)
    progress.not_sent("1.2")
    pending = progress.pending(REQUEST)
    assert (pending.status, pending.remaining, pending.completed, pending.failed) == (
        status.PENDING,
        1,
        1,
        1,
    )


def test_get_response_counts_survive_encoding() -> None:
    response = dimse.retrieve_response(REQUEST, status.PENDING, (3, 2, 1, 0))
    decoded = dimse.decode_command(dimse.encode_command(response))
    assert decoded == response
    assert decoded.command_field == dimse.C_GET_RSP
    assert decoded.responded_to == 5


def test_counts_beyond_an_unsigned_short_are_capped() -> None:
    response = dimse.retrieve_response(REQUEST, status.PENDING, (70_000, 0, 0, 0))
    assert dimse.decode_command(dimse.encode_command(response)).remaining == 0xFFFF


def request_with_roles(*roles: RoleSelection) -> AssociateRequest:
    return AssociateRequest(
        "QANTARA",
        "VIEWER",
        (ProposedContext(1, STUDY_ROOT_GET, (EXPLICIT,)), ProposedContext(3, CT, (EXPLICIT,))),
        UserInformation(max_length=16384, roles=roles),
    )


RETRIEVING = gateway_policy("QANTARA", 1 << 20, frozenset(), retrieve_aes=frozenset({"VIEWER"}))


def answered(request: AssociateRequest, policy: Policy = RETRIEVING) -> AssociateAccept:
    answer = negotiate(request, policy)
    assert isinstance(answer, AssociateAccept)
    return answer


def answered_roles(*roles: RoleSelection) -> tuple[RoleSelection, ...]:
    return answered(request_with_roles(*roles)).user_information.roles


def test_the_scp_role_is_granted_for_storage_classes() -> None:
    assert answered_roles(RoleSelection(CT, False, True)) == (RoleSelection(CT, False, True),)


def test_the_scp_role_is_refused_for_other_classes_and_their_scu_role_kept() -> None:
    assert answered_roles(RoleSelection(STUDY_ROOT_GET, True, True)) == (
        RoleSelection(STUDY_ROOT_GET, True, False),
    )


def test_without_role_items_the_answer_has_none() -> None:
    assert answered_roles() == ()


def test_a_caller_not_listed_to_retrieve_gets_the_get_context_rejected_and_no_scp_role() -> None:
    policy = gateway_policy("QANTARA", 1 << 20, frozenset(), retrieve_aes=frozenset({"OTHER"}))
    answer = answered(request_with_roles(RoleSelection(CT, True, True)), policy)
    results = {c.context_id: c.result for c in answer.contexts}
    assert results == {1: ContextResult.USER_REJECTION, 3: ContextResult.ACCEPTANCE}
    assert answer.user_information.roles == (RoleSelection(CT, True, False),)


def test_by_default_nobody_may_retrieve() -> None:
    policy = gateway_policy("QANTARA", 1 << 20, frozenset())
    answer = answered(request_with_roles(), policy)
    assert answer.contexts[0].result is ContextResult.USER_REJECTION


def test_a_caller_listed_to_retrieve_gets_the_get_context() -> None:
    assert answered(request_with_roles()).contexts[0].result is ContextResult.ACCEPTANCE


def test_a_dataset_sent_in_pieces_sets_the_last_bit_on_its_final_pdv_only() -> None:
    first = pdu.fragment_pdus(1, b"a" * 10, 10, is_command=False, last=False)
    final = pdu.fragment_pdus(1, b"b" * 3, 10, is_command=False, last=True)
    reader = pdu.PduReader(1 << 20)
    for data in (*first, *final):
        reader.feed(data)
    pdvs: list[pdu.Pdv] = []
    while (unit := reader.next_pdu()) is not None:
        assert isinstance(unit, pdu.PDataTF)
        pdvs.extend(unit.pdvs)
    assert [bytes(p.data) for p in pdvs] == [b"aaaa", b"aaaa", b"aa", b"bbb"]
    assert [p.is_last for p in pdvs] == [False, False, False, True]
    assert not any(p.is_command for p in pdvs)


def test_an_empty_piece_that_is_not_the_last_sends_nothing() -> None:
    assert pdu.fragment_pdus(1, b"", 16384, is_command=False, last=False) == []


def test_the_dataset_starts_after_the_file_meta_group() -> None:
    head = file_meta(CT, "1.2.3.4", EXPLICIT)
    assert dataset_offset(head + b"\x08\x00") == len(head)


@pytest.mark.parametrize("head", [b"", bytes(132), bytes(128) + b"DICM" + bytes(12)])
def test_a_file_without_part_10_header_has_no_dataset_offset(head: bytes) -> None:
    with pytest.raises(ValueError, match=r"Part 10|Group Length"):
        dataset_offset(head)


def dicom_audit_event(
    action: str, shape: str, outcome: str = "0", code: int = status.PENDING
) -> dict[str, Any]:
    """The AuditEvent of a DICOM listener's audit row for the patient 42, as the API renders it."""
    record = AuditRecord(
        id=7,
        recorded_at=datetime(2026, 11, 29, 8, 0, tzinfo=UTC),
        token_name="VIEWER",  # noqa: S106 - an AE title
        action=action,
        resource_type="ImagingStudy",
        query_shape=shape,
        patient_ids=(42,),
        outcome=outcome,
        status=code,
        protocol="dicom",
    )
    return audit_event_resource(record)


def test_a_dicom_query_audit_row_is_a_query_event() -> None:
    event = dicom_audit_event("search-type", "C-FIND STUDY, 2 match(es)")
    assert (event["type"]["code"], event["type"]["display"]) == ("110112", "Query")


def test_a_dicom_audit_row_is_a_begin_transferring_dicom_instances_event() -> None:
    event = dicom_audit_event("read", "C-GET STUDY, 2 instance(s)")
    assert event["type"]["code"] == "110102"
    assert event["type"]["system"] == "http://dicom.nema.org/resources/ontology/DCM"
    assert "subtype" not in event
    assert event["action"] == "E"
    assert event["outcomeDesc"] == "DICOM 0xFF00 (success)"
    assert event["agent"][0]["who"]["display"] == "VIEWER"
    assert event["entity"][0]["what"]["reference"] == "Patient/42"


def test_move_request_and_its_sub_operation_fields_survive_encoding() -> None:
    move = dimse.Command(
        dimse.C_MOVE_RQ,
        message_id=9,
        affected_sop_class=STUDY_ROOT_MOVE,
        priority=0,
        dataset_type=dimse.HAS_DATASET,
        move_destination="WORKSTATION",
    )
    assert dimse.decode_command(dimse.encode_command(move)) == move
    store = dimse.store_request(3, CT, "1.2.3", 0, originator=("VIEWER", 9))
    decoded = dimse.decode_command(dimse.encode_command(store))
    assert (decoded.move_originator_ae, decoded.move_originator_id) == ("VIEWER", 9)


def test_a_move_response_answers_with_the_move_command_field() -> None:
    move = dimse.Command(dimse.C_MOVE_RQ, message_id=9, affected_sop_class=STUDY_ROOT_MOVE)
    assert dimse.retrieve_response(move, 0, (None, 1, 0, 0)).command_field == dimse.C_MOVE_RSP


def test_the_move_context_is_for_the_callers_allowed_to_retrieve_only() -> None:
    request = AssociateRequest(
        "QANTARA",
        "VIEWER",
        (ProposedContext(1, STUDY_ROOT_MOVE, (EXPLICIT,)),),
        UserInformation(max_length=16384),
    )
    assert answered(request).contexts[0].result is ContextResult.ACCEPTANCE
    closed = gateway_policy("QANTARA", 1 << 20, frozenset())
    assert answered(request, closed).contexts[0].result is ContextResult.USER_REJECTION


def find_request(calling: str) -> AssociateRequest:
    return AssociateRequest(
        "QANTARA",
        calling,
        (ProposedContext(1, "1.2.840.10008.5.1.4.1.2.2.1", (EXPLICIT,)),),
        UserInformation(max_length=16384),
    )


def test_c_find_is_open_to_any_caller_unless_query_aes_is_set() -> None:
    assert answered(find_request("ANYONE")).contexts[0].result is ContextResult.ACCEPTANCE


def test_with_query_aes_set_c_find_is_for_the_listed_callers_only() -> None:
    policy = gateway_policy("QANTARA", 1 << 20, frozenset(), query_aes=frozenset({"RIS"}))
    assert answered(find_request("RIS"), policy).contexts[0].result is ContextResult.ACCEPTANCE
    refused = answered(find_request("ANYONE"), policy).contexts[0].result
    assert refused is ContextResult.USER_REJECTION


def test_the_end_of_a_transfer_is_a_dicom_instances_transferred_event_with_its_status() -> None:
    shape = "C-GET STUDY: 1 completed, 0 warning, 1 failed, 0 cancelled"
    event = dicom_audit_event("transferred", shape, "4", status.GET_SOME_FAILED)
    assert (event["type"]["code"], event["type"]["display"]) == (
        "110104",
        "DICOM Instances Transferred",
    )
    assert (event["outcome"], event["outcomeDesc"]) == ("4", "DICOM 0xB000 (minor failure)")


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (status.SUCCESS, "0"),
        (status.GET_SOME_FAILED, "4"),
        (0xFE00, "4"),  # cancelled
        (status.GET_SUB_OPERATIONS_FAILED, "8"),
    ],
)
def test_a_transfer_s_final_status_gives_its_audit_outcome(code: int, outcome: str) -> None:
    assert transferred_entry("VIEWER", "C-GET STUDY: ...", [42], code).outcome == outcome
