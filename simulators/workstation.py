"""A radiologist's or a specialist's workstation pulling studies from the gateway: C-FIND of the
studies of a patient or of a day, then C-GET of each (the images come back on the association), or
C-MOVE of each to a destination the gateway knows.

One association, calling as `calling_ae` (the gateway must list it in
`QANTARA_DICOM_RETRIEVE_AES`), Study Root. For C-GET it proposes, for the storage SOP classes the
modality simulator makes, a context in explicit and one in implicit VR little endian, with the
SCP role for them; what arrives is counted (instances, bytes), not kept.
"""

from __future__ import annotations

import ssl
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt

from simulators.association_outcome import associate
from simulators.modality import SOP_CLASSES
from simulators.tls_client import pynetdicom_tls_args

STUDY_ROOT_FIND: Final = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_GET: Final = "1.2.840.10008.5.1.4.1.2.2.3"
STUDY_ROOT_MOVE: Final = "1.2.840.10008.5.1.4.1.2.2.2"


@dataclass(frozen=True, slots=True)
class WorkstationConfig:
    host: str
    port: int
    called_ae: str = "QANTARA"
    calling_ae: str = "SIM-WORKSTATION"
    patient_id: str | None = None
    study_date: str | None = None  # YYYYMMDD or a range YYYYMMDD-YYYYMMDD
    limit: int = 10  # studies retrieved at most
    move_to: str | None = None  # C-MOVE to this AE title instead of C-GET
    quiet: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def tls_args(self) -> tuple[ssl.SSLContext, str] | None:
        return pynetdicom_tls_args(self.host, self.tls_ca, self.tls_cert, self.tls_key)


@dataclass(slots=True)
class WorkstationReport:
    found: int = 0
    find_status: str | None = None
    statuses: Counter[str] = field(default_factory=Counter)  # final status of each retrieve
    completed: int = 0
    failed: int = 0
    received: int = 0  # instances that came back on the association (C-GET)
    received_bytes: int = 0
    seconds: float = 0.0
    no_association: str | None = None  # why not, when the association was not established
    aborted: bool = False

    @property
    def refused(self) -> bool:
        return self.no_association is not None

    def summary(self) -> str:
        if self.no_association is not None:
            return self.no_association
        if self.find_status != "0x0000":
            return f"C-FIND {self.find_status or 'no answer'}"
        parts = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        line = (
            f"found {self.found} study(ies); {self.completed} instance(s) completed, "
            f"{self.failed} failed; {parts or 'nothing retrieved'}"
        )
        if self.received:
            rate = self.received / self.seconds if self.seconds else 0.0
            line += (
                f"; received {self.received} instance(s), {self.received_bytes / 1e6:.1f} MB in "
                f"{self.seconds:.1f}s ({rate:.1f}/s)"
            )
        return line + ("; association aborted" if self.aborted else "")

    @property
    def ok(self) -> bool:
        return (
            not self.refused
            and not self.aborted
            and self.find_status == "0x0000"
            and all(code == "0x0000" for code in self.statuses)
        )


def _status(answer: Dataset) -> str:
    return f"0x{int(answer.Status):04X}" if "Status" in answer else "no answer"


def run_workstation(config: WorkstationConfig) -> WorkstationReport:
    """Blocking: find the studies, retrieve each; statuses and counts in the report."""
    report = WorkstationReport()
    ae = AE(ae_title=config.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(STUDY_ROOT_FIND)
    roles: list[Any] = []  # pynetdicom's role selection items
    if config.move_to:
        ae.add_requested_context(STUDY_ROOT_MOVE)
    else:
        ae.add_requested_context(STUDY_ROOT_GET)
        for sop_class in SOP_CLASSES.values():
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
            ae.add_requested_context(sop_class, [ImplicitVRLittleEndian])
            roles.append(build_role(sop_class, scp_role=True))

    def received(event: Any) -> int:
        report.received += 1
        report.received_bytes += len(event.request.DataSet.getvalue())
        return 0x0000

    started = time.monotonic()
    assoc, report.no_association = associate(
        ae,
        config.host,
        config.port,
        ae_title=config.called_ae,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, received)],
        tls_args=config.tls_args(),
    )
    if report.no_association is not None:
        return report
    model = STUDY_ROOT_MOVE if config.move_to else STUDY_ROOT_GET
    try:
        studies = _find(assoc, config, report)
        if studies and not any(c.abstract_syntax == model for c in assoc.accepted_contexts):
            report.statuses["retrieve refused at association"] += len(studies)
            studies = []  # not in QANTARA_DICOM_RETRIEVE_AES
        for n, study in enumerate(studies):
            _retrieve(assoc, config, study, report)
            if not assoc.is_established:
                report.aborted = True
                break
            if not config.quiet:
                print(f"\rstudies {n + 1}/{len(studies)}", end="", file=sys.stderr)  # noqa: T201
    finally:
        if assoc.is_established:
            assoc.release()
        report.seconds = time.monotonic() - started
        if not config.quiet:
            print(file=sys.stderr)  # noqa: T201
    return report


def _find(assoc: Any, config: WorkstationConfig, report: WorkstationReport) -> list[str]:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.PatientID = config.patient_id or ""
    query.StudyDate = config.study_date or ""
    studies: list[str] = []
    for answer, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
        code = _status(answer)
        if code in ("0xFF00", "0xFF01") and identifier is not None:
            studies.append(str(identifier.StudyInstanceUID))
        else:
            report.find_status = code
    report.found = len(studies)
    return studies[: config.limit]


def _retrieve(assoc: Any, config: WorkstationConfig, study: str, report: WorkstationReport) -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    if config.move_to:
        answers = assoc.send_c_move(identifier, config.move_to, STUDY_ROOT_MOVE)
    else:
        answers = assoc.send_c_get(identifier, STUDY_ROOT_GET)
    final: Dataset | None = None
    for answer, _ in answers:
        if "Status" in answer and int(answer.Status) not in (0xFF00, 0xFF01):
            final = answer
    if final is None:
        report.statuses["no answer"] += 1
        return
    report.statuses[_status(final)] += 1
    report.completed += int(final.get("NumberOfCompletedSuboperations", 0) or 0)
    report.failed += int(final.get("NumberOfFailedSuboperations", 0) or 0)
