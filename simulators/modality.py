"""A radiology modality (CR, DX, US, CT) sending synthetic studies with C-STORE.

Each study belongs to a patient drawn from `simulators.population` (Moroccan names, national id):
the header names them in French under ISO_IR 100, or in Arabic under ISO_IR 127 or ISO_IR 192,
with a facility PatientID (issuer `CHU-<province>`) and the national id in Other Patient IDs
(issuer `CIN`), the way the gateway links imaging to vitals and labs. Images are valid datasets
(pydicom) of the modality's storage SOP class with noise pixel data, explicit VR little endian.
Everything is deterministic for a seed except the UIDs (new on each run, as on a real device).
"""

from __future__ import annotations

import hashlib
import random
import ssl
import sys
import threading
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

from dicom.sop_classes import STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
from simulators.association_outcome import associate
from simulators.population import REGIONS, Patient, Population, Sex
from simulators.tls_client import pynetdicom_tls_args

SOP_CLASSES: Final = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "CT": "1.2.840.10008.5.1.4.1.1.2",
}
IMAGES_PER_STUDY: Final = {"CR": 2, "DX": 2, "US": 4, "CT": 8}
# (rows, columns, bits allocated): CR/DX 512x512x16 = 0.5 MB, CT 512x512x16, US 480x640x8.
GEOMETRY: Final = {
    "CR": (512, 512, 16),
    "DX": (512, 512, 16),
    "US": (480, 640, 8),
    "CT": (512, 512, 16),
}
DESCRIPTIONS: Final = {
    "CR": ("Thorax face", "Radiographie thoracique"),
    "DX": ("Bassin face", "Bassin et hanches face"),
    "US": ("Echographie abdominale", "Echographie obstetricale"),
    "CT": ("TDM cerebrale sans injection", "TDM thoraco-abdominale"),
}
BODY_PARTS: Final = {"CR": "CHEST", "DX": "PELVIS", "US": "ABDOMEN", "CT": "HEAD"}
CHARSETS: Final = ("ISO_IR 100", "ISO_IR 127", "ISO_IR 192")


@dataclass(frozen=True, slots=True)
class ModalityConfig:
    host: str
    port: int
    called_ae: str = "QANTARA"
    calling_ae: str = "SIM-MODALITY"
    modality: str = "CR"
    studies: int = 1
    rate: float = 0.0  # instances per second; 0: as fast as the gateway answers
    seed: int = 1
    quiet: bool = False
    tls_ca: Path | None = None  # DICOM over TLS, the gateway's certificate checked against it
    tls_cert: Path | None = None  # with tls_key: our certificate, for mutual TLS
    tls_key: Path | None = None
    commit: bool = False  # then ask for Storage Commitment of what was stored, as units do
    commit_wait: float = 30.0  # seconds the report may take
    report_port: int | None = None  # take the report on this port of our own, not the association
    report_bind: str = "0.0.0.0"  # noqa: S104 - the gateway calls us back from its own address

    def tls_args(self) -> tuple[ssl.SSLContext, str] | None:
        """pynetdicom's `tls_args` (a client context, the server name to check), or None."""
        return pynetdicom_tls_args(self.host, self.tls_ca, self.tls_cert, self.tls_key)


@dataclass(slots=True)
class ModalityReport:
    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    no_association: str | None = None  # why not, when the association was not established
    aborted: bool = False  # the association ended under the simulator (gateway gone, A-ABORT)
    stored: list[tuple[str, str]] = field(default_factory=list)  # SOP Class, Instance of 0x0000
    commit_status: str | None = None  # the N-ACTION-RSP's, when asked
    committed: int | None = None  # from the report; None: no report came
    report_on_port: bool = False  # the report was awaited on our own port

    @property
    def refused(self) -> bool:
        return self.no_association is not None

    def summary(self) -> str:
        if self.no_association is not None:
            return self.no_association
        parts = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        rate = self.sent / self.seconds if self.seconds else 0.0
        line = f"sent {self.sent} instance(s) in {self.seconds:.1f}s ({rate:.1f}/s); {parts}"
        if self.commit_status is not None:
            line += f"; storage commitment {self.commit_status}"
            if self.commit_status == "0x0000":
                line += (
                    ", no report"
                    if self.committed is None
                    else f", {self.committed} of {len(self.stored)} committed"
                )
                if self.report_on_port:
                    line += " (report on our port)"
        return line + ("; association aborted" if self.aborted else "")

    @property
    def uncommitted(self) -> bool:
        """Asked for commitment, and not everything stored was committed."""
        return self.commit_status is not None and self.committed != len(self.stored)

    @property
    def failed(self) -> int:
        return sum(n for code, n in self.statuses.items() if not code.startswith("0x0000"))


def _person_name(patient: Patient, charset: str) -> str:
    if charset == "ISO_IR 100":
        return f"{patient.family_name_fr.upper()}^{patient.given_name_fr}"
    return f"{patient.family_name_ar}^{patient.given_name_ar}"


def _latin(text: str, charset: str) -> str:
    """French text as a device set to `charset` writes it: ISO_IR 127 (Arabic) has no accented
    Latin letters, so such a device drops the accents rather than send what it cannot encode."""
    if charset != "ISO_IR 127":
        return text
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def study_datasets(
    patient: Patient, modality: str, charset: str, rng: random.Random, when: datetime
) -> list[Dataset]:
    """The instances of one study of `patient` (one series)."""
    study_uid, series_uid, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    rows, columns, bits = GEOMETRY[modality]
    description = rng.choice(DESCRIPTIONS[modality])
    province = patient.province
    facility = "CHU-" + "".join(c for c in province.name_fr.upper() if c.isascii() and c.isalpha())
    datasets = []
    for number in range(1, IMAGES_PER_STUDY[modality] + 1):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = UID(SOP_CLASSES[modality])
        ds.SpecificCharacterSet = charset
        ds.SOPClassUID = SOP_CLASSES[modality]
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality
        ds.PatientName = _person_name(patient, charset)
        digest = hashlib.sha256(f"{facility}|{patient.cin}".encode()).hexdigest()
        ds.PatientID = f"IPP{int(digest[:12], 16) % 10**8:08d}"
        ds.IssuerOfPatientID = facility[:64]
        other = Dataset()
        other.PatientID = patient.cin
        other.IssuerOfPatientID = "CIN"
        other.TypeOfPatientID = "TEXT"
        ds.OtherPatientIDsSequence = [other]
        ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
        ds.PatientSex = "F" if patient.sex is Sex.FEMALE else "M"
        ds.StudyDate = when.strftime("%Y%m%d")
        ds.StudyTime = when.strftime("%H%M%S")
        ds.TimezoneOffsetFromUTC = "+0000"
        ds.ContentDate = ds.StudyDate
        ds.AccessionNumber = f"A{rng.randrange(10**7, 10**8)}"
        ds.StudyID = str(rng.randrange(1, 10**5))
        ds.ReferringPhysicianName = ""  # General Study, Type 2: a walk-in at the mobile unit
        ds.StudyDescription = description
        ds.SeriesDescription = description
        ds.SeriesNumber = 1
        ds.InstanceNumber = number
        ds.BodyPartExamined = BODY_PARTS[modality]
        ds.InstitutionName = _latin(f"Hopital provincial {province.name_fr}", charset)
        ds.Manufacturer = "Qantara simulator"
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = bits
        ds.BitsStored = bits if bits == 8 else 12
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = _noise(rng, rows * columns, bits, ds.BitsStored)
        _image_modules(ds, modality, number, frame_of_reference)
        datasets.append(ds)
    return datasets


def _noise(rng: random.Random, pixels: int, allocated: int, stored: int) -> bytes:
    """Random pixels whose values fit in `stored` bits, as real 12-bit detectors send them."""
    size = pixels * allocated // 8
    raw = rng.randbytes(size)
    if stored == allocated:
        return raw
    mask = int.from_bytes(((1 << stored) - 1).to_bytes(allocated // 8, "little") * pixels, "little")
    return (int.from_bytes(raw, "little") & mask).to_bytes(size, "little")


def _code(code: Code) -> Dataset:
    """A Code Sequence item (PS3.3 Table 8.8-1), from pydicom's tables of the standard's codes."""
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _image_modules(ds: Dataset, modality: str, number: int, frame_of_reference: str) -> None:
    """The Type 1 and Type 2 elements of the IOD's mandatory modules (PS3.3 A.2 CR, A.26 DX
    For Presentation, A.59 US, A.3 CT) beyond the patient, study, series and pixel data ones:
    the image type, the content time, and each modality's own image modules."""
    ds.ContentTime = ds.StudyTime
    # General Image, Type 2C: no orientation known, but for DX (its DX Image module: Type 1).
    ds.PatientOrientation = ["L", "F"] if modality == "DX" else ""  # DX: AP, seen from the front
    if modality == "CR":
        ds.ViewPosition = "PA"  # CR Series, Type 2
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
    elif modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"  # DX Series
        ds.ImageType = ["ORIGINAL", "PRIMARY"]  # DX Image
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY"
        ds.LossyImageCompression = "00"
        ds.BurnedInAnnotation = "NO"
        ds.DetectorType = "SCINTILLATOR"  # DX Detector
        ds.ImagerPixelSpacing = [0.143, 0.143]
        ds.ImageLaterality = "U"  # DX Anatomy Imaged: unpaired (pelvis, chest...)
        ds.AnatomicRegionSequence = [_code(codes.SCT.Pelvis)]  # CID 4009
        ds.ViewPosition = "AP"  # DX Positioning
        ds.ViewCodeSequence = [_code(codes.SCT.AnteroPosterior)]  # CID 4010
        ds.PositionerType = "COLUMN"
        ds.AcquisitionContextSequence = []  # Acquisition Context, Type 2: nothing recorded
        ds.WindowCenter = 2048  # VOI LUT, for presentation: the whole 12-bit range
        ds.WindowWidth = 4096
    elif modality == "US":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL"]  # US Image
        ds.LossyImageCompression = "00"
    elif modality == "CT":
        ds.PatientPosition = "HFS"  # General Series, Type 2C for CT
        ds.FrameOfReferenceUID = frame_of_reference  # Frame of Reference, one per series
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]  # CT Image
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.PixelSpacing = [0.5, 0.5]  # Image Plane: contiguous 5 mm axial slices
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-128, -128, 5.0 * (number - 1)]
        ds.SliceThickness = 5
        ds.SliceLocation = 5.0 * (number - 1)


def _status(code: int | None) -> str:
    if code is None:
        return "no answer"
    return f"0x{code:04X}"


def run_modality(config: ModalityConfig) -> ModalityReport:
    """Blocking: send `config.studies` studies on one association; statuses counted."""
    if config.modality not in SOP_CLASSES:
        raise ValueError(f"modality must be one of {', '.join(SOP_CLASSES)}")
    ae = AE(ae_title=config.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(SOP_CLASSES[config.modality], [ExplicitVRLittleEndian])
    report = ModalityReport()
    commitment = _Commitment()
    handlers: list[Any] = []  # pynetdicom's (event, handler) pairs
    reports_server = None
    if config.commit:
        ae.add_requested_context(STORAGE_COMMITMENT, [ExplicitVRLittleEndian])
        handlers.append((evt.EVT_N_EVENT_REPORT, commitment.report))
        if config.report_port is not None:
            address = (config.report_bind, config.report_port)
            reports_server = _listen_for_reports(config.calling_ae, address, commitment)
            report.report_on_port = True
    try:
        _send_studies(ae, config, report, commitment, handlers)
    finally:
        if reports_server is not None:
            reports_server.shutdown()
    return report


def _listen_for_reports(ae_title: str, address: tuple[str, int], commitment: _Commitment) -> Any:
    """Our own Storage Commitment port, as a modality named in the gateway's
    QANTARA_DICOM_REPORT_ADDRESSES has: the gateway calls it, takes the SCP role, and sends the
    report there (pynetdicom's server, in its threads; plain TCP)."""
    listener = AE(ae_title=ae_title)
    listener.acse_timeout = listener.dimse_timeout = listener.network_timeout = 30
    listener.add_supported_context(
        STORAGE_COMMITMENT,
        [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
        scu_role=True,
        scp_role=True,
    )
    return listener.start_server(
        address,
        block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, commitment.report)],
    )


def _send_studies(
    ae: AE,
    config: ModalityConfig,
    report: ModalityReport,
    commitment: _Commitment,
    handlers: list[Any],
) -> None:
    rng = random.Random(config.seed)
    population = Population(date.today())  # noqa: DTZ011 - birth dates relative to today
    region = REGIONS[config.seed % len(REGIONS)]
    started = time.monotonic()
    assoc, report.no_association = associate(
        ae,
        config.host,
        config.port,
        ae_title=config.called_ae,
        tls_args=config.tls_args(),
        evt_handlers=handlers,
    )
    if report.no_association is not None:
        return
    try:
        for n in range(config.studies):
            patient = population.patient(rng, rng.choice(region.provinces))
            charset = CHARSETS[n % len(CHARSETS)]
            for ds in study_datasets(patient, config.modality, charset, rng, datetime.now(UTC)):
                if config.rate > 0:
                    due = started + report.sent / config.rate
                    time.sleep(max(0.0, due - time.monotonic()))
                if not assoc.is_established:  # pynetdicom would raise
                    report.aborted = True
                    break
                answer = assoc.send_c_store(ds)
                code = int(answer.Status) if "Status" in answer else None
                report.sent += 1
                report.statuses[_status(code)] += 1
                if code == 0x0000:
                    report.stored.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
                if code is None:  # aborted or timed out: pynetdicom has ended the association
                    report.aborted = True
                    break
            if not config.quiet:
                print(f"\rstudies {n + 1}/{config.studies}", end="", file=sys.stderr)  # noqa: T201
            if report.aborted:
                break
        if config.commit and report.stored and assoc.is_established:
            _ask_commitment(assoc, report, commitment)
            if report.report_on_port and assoc.is_established:
                assoc.release()  # as such modalities do: the report comes to our port
            if report.commit_status == "0x0000" and commitment.arrived.wait(config.commit_wait):
                report.committed = commitment.committed
    finally:
        if assoc.is_established:
            assoc.release()
        report.seconds = time.monotonic() - started
        if not config.quiet:
            print(file=sys.stderr)  # noqa: T201


class _Commitment:
    """The Storage Commitment report of our transaction, on the association or on our port (a
    report of an earlier run's transaction, which the gateway may still deliver, is taken and
    not counted)."""

    def __init__(self) -> None:
        self.transaction = ""
        self.committed: int | None = None
        self.arrived = threading.Event()

    def report(self, event: evt.Event) -> tuple[int, None]:
        information = event.event_information
        if str(information.get("TransactionUID", "")) == self.transaction:
            self.committed = len(information.get("ReferencedSOPSequence", []))
            self.arrived.set()
        return 0x0000, None


def _ask_commitment(assoc: object, report: ModalityReport, commitment: _Commitment) -> None:
    """N-ACTION for every instance stored; its status in `report`."""
    information = Dataset()
    information.TransactionUID = commitment.transaction = generate_uid()
    items = []
    for sop_class, sop_instance in report.stored:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    information.ReferencedSOPSequence = items
    answer, _ = assoc.send_n_action(  # type: ignore[attr-defined]
        information, 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
    )
    report.commit_status = _status(int(answer.Status) if "Status" in answer else None)
