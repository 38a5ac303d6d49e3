"""What the listener accepts of an association request (PS3.8 §7.1, PS3.7 Annex D), sans-IO.

`negotiate(request, policy, certified)` answers an A-ASSOCIATE-RQ with an A-ASSOCIATE-AC (one
result per proposed presentation context: the first transfer syntax the requestor proposes that
we support) or a `Refused`: an A-ASSOCIATE-RJ (application context, calling AE title, called AE
title) and the reason's metric label. The association limit is the server's (`limit_reached`).
TLS authenticates a certificate, not an AE title (PS3.15 B.1): with `ae_from_certificate` the
calling AE title must be one of the commonNames of the modality's certificate subject
(`certified`), so that a modality with a valid certificate cannot call as another.

C-GET and C-MOVE are for the calling AE titles of `Policy.retrieve_aes` only
(`QANTARA_DICOM_RETRIEVE_AES`, none by default: anyone who may store must not thereby read every
patient's images): for the others, the contexts of their information models get "user
rejection". C-FIND likewise for `Policy.query_aes` (`QANTARA_DICOM_QUERY_AES`) when it is set.
SCP/SCU role selection (PS3.7 D.3.3.4): each item the requestor proposes is answered; a caller
that may retrieve may take the SCP role for the storage SOP classes (`Policy.requestor_scp`), so
that a C-GET's C-STORE sub-operations go to it on the same association; every caller keeps the
SCU role it proposed for the SOP classes we accept. Asynchronous operations are not negotiated
(no item in our answer: one operation at a time applies, D.3.3.3); user identity is read and
ignored (no server response, D.3.3.7).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from dicom import sop_classes
from dicom.pdu import (
    APPLICATION_CONTEXT,
    REJECT_APPLICATION_CONTEXT,
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    REJECT_LOCAL_LIMIT,
    AssociateAccept,
    AssociateReject,
    AssociateRequest,
    ContextAnswer,
    ContextResult,
    RejectResult,
    RejectSource,
    RoleSelection,
    UserInformation,
)

IMPLEMENTATION_CLASS_UID: Final = "2.25.49029946949131750760937250553924891668"
IMPLEMENTATION_VERSION: Final = "QANTARA_1"
"""Both go into the File Meta Information of every stored file (`dicom.filemeta`): changing one
changes the content name and SHA-256 of the instances received after it, and a resend of an
instance stored before would be answered as a conflict (0xB006). See docs/dicom.md, Known limits."""


@dataclass(frozen=True, slots=True)
class Policy:
    """`syntaxes`: abstract syntax → the transfer syntaxes accepted for it. `allowed_aes` empty:
    any calling AE title; `require_called_ae`: the called AE title must be ours;
    `ae_from_certificate`: the calling AE title must be a commonName of the peer's certificate."""

    ae_title: str
    max_pdu: int
    syntaxes: Mapping[str, frozenset[str]]
    allowed_aes: frozenset[str] = frozenset()
    require_called_ae: bool = False
    ae_from_certificate: bool = False
    requestor_scp: frozenset[str] = frozenset()
    """The SOP classes for which the requestor may take the SCP role (role selection)."""
    retrieve_aes: frozenset[str] = frozenset()
    """The calling AE titles that may retrieve: for the others, a C-GET or C-MOVE model's
    context is answered "user rejection" (none: nobody may)."""
    query_aes: frozenset[str] | None = None
    """The calling AE titles that may C-FIND (None: any); for the others, "user rejection"."""


@dataclass(frozen=True, slots=True)
class Refused:
    """An association refused: the A-ASSOCIATE-RJ to send and `reason`, the label of
    `qantara_dicom_associations_rejected_total` (the calling AE title is not in it: it is the
    sender's, and goes to the log)."""

    reject: AssociateReject
    reason: str


def gateway_policy(
    ae_title: str,
    max_pdu: int,
    allowed_aes: frozenset[str],
    require_called_ae: bool = False,
    ae_from_certificate: bool = False,
    retrieve_aes: frozenset[str] = frozenset(),
    query_aes: frozenset[str] | None = None,
) -> Policy:
    """Verification, Storage of every storage SOP class in every transfer syntax, C-FIND, C-GET
    (for the calling AE titles of `retrieve_aes`; the requestor may take the SCP role of every
    storage SOP class, for the sub-operations),
    Storage Commitment (its N-EVENT-REPORT goes back on the same association, which needs no
    role selection: PS3.4 J.3.3)."""
    defaults = frozenset(sop_classes.DEFAULT_SYNTAXES)
    storage = frozenset(sop_classes.TRANSFER_SYNTAXES)
    syntaxes = {uid: storage for uid in sop_classes.STORAGE}
    syntaxes[sop_classes.VERIFICATION] = defaults
    for model in sop_classes.FIND_MODELS | sop_classes.RETRIEVE_MODELS:
        syntaxes[model] = defaults
    syntaxes[sop_classes.STORAGE_COMMITMENT] = defaults
    return Policy(
        ae_title,
        max_pdu,
        syntaxes,
        allowed_aes,
        require_called_ae,
        ae_from_certificate,
        requestor_scp=sop_classes.STORAGE,
        retrieve_aes=retrieve_aes,
        query_aes=query_aes,
    )


def negotiate(
    request: AssociateRequest, policy: Policy, certified: frozenset[str] = frozenset()
) -> AssociateAccept | Refused:
    """`certified`: the commonNames of the peer's verified certificate (none without TLS)."""
    if request.application_context != APPLICATION_CONTEXT:
        return _user_reject(REJECT_APPLICATION_CONTEXT, "application_context")
    if policy.allowed_aes and request.calling_ae not in policy.allowed_aes:
        return _user_reject(REJECT_CALLING_AE, "calling_ae")
    if policy.ae_from_certificate and request.calling_ae not in certified:
        return _user_reject(REJECT_CALLING_AE, "certificate")
    if policy.require_called_ae and request.called_ae != policy.ae_title:
        return _user_reject(REJECT_CALLED_AE, "called_ae")
    answers: list[ContextAnswer] = []
    for proposed in request.contexts:
        accepted = policy.syntaxes.get(proposed.abstract_syntax)
        # A refused context still carries a transfer syntax item (not significant, PS3.8 9.3.3.2).
        first = (*proposed.transfer_syntaxes, sop_classes.IMPLICIT_VR_LITTLE_ENDIAN)[0]
        if accepted is None:
            result = ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED
            answers.append(ContextAnswer(proposed.context_id, result, first))
            continue
        if _refused_to(request.calling_ae, proposed.abstract_syntax, policy):
            answers.append(ContextAnswer(proposed.context_id, ContextResult.USER_REJECTION, first))
            continue
        chosen = next((ts for ts in proposed.transfer_syntaxes if ts in accepted), None)
        if chosen is None:
            result = ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED
            answers.append(ContextAnswer(proposed.context_id, result, first))
        else:
            answers.append(ContextAnswer(proposed.context_id, ContextResult.ACCEPTANCE, chosen))
    return AssociateAccept(
        called_ae=request.called_ae,
        calling_ae=request.calling_ae,
        contexts=tuple(answers),
        user_information=our_user_information(policy.max_pdu, _roles(request, policy)),
        application_context=request.application_context,
    )


def our_user_information(max_pdu: int, roles: tuple[RoleSelection, ...] = ()) -> UserInformation:
    """The User Information of our side of any association: our maximum length, our
    implementation class UID and version, and the role selection answers."""
    return UserInformation(
        max_length=max_pdu,
        implementation_class_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version=IMPLEMENTATION_VERSION,
        roles=roles,
    )


def _refused_to(calling_ae: str, abstract_syntax: str, policy: Policy) -> bool:
    """A query or retrieve model the caller may not use."""
    if abstract_syntax in sop_classes.RETRIEVE_MODELS:
        return calling_ae not in policy.retrieve_aes
    if abstract_syntax in sop_classes.FIND_MODELS:
        return policy.query_aes is not None and calling_ae not in policy.query_aes
    return False


def _roles(request: AssociateRequest, policy: Policy) -> tuple[RoleSelection, ...]:
    """Our answer to each proposed role selection item (one per SOP class, the first kept): the
    roles proposed that we accept, 0 for the others (the SCP role only to a caller that may
    retrieve)."""
    retrieves = request.calling_ae in policy.retrieve_aes
    answers: dict[str, RoleSelection] = {}
    for role in request.user_information.roles:
        if role.sop_class not in answers:
            scu = role.scu and role.sop_class in policy.syntaxes
            scp = role.scp and retrieves and role.sop_class in policy.requestor_scp
            answers[role.sop_class] = RoleSelection(role.sop_class, scu, scp)
    return tuple(answers.values())


def limit_reached() -> Refused:
    """Too many associations open: transient, so that the sender retries later."""
    reject = AssociateReject(RejectResult.TRANSIENT, RejectSource.PRESENTATION, REJECT_LOCAL_LIMIT)
    return Refused(reject, "local_limit")


def _user_reject(code: int, reason: str) -> Refused:
    return Refused(AssociateReject(RejectResult.PERMANENT, RejectSource.SERVICE_USER, code), reason)
