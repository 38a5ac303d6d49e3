"""The DICOM index as FHIR R4 ImagingStudy resources (searched by `gateway.http`).

One resource per study: its Study Instance UID as identifier (`urn:dicom:uid`), the patient, the
start (an instant when the header gave a UTC offset, else the study date), modalities, series with
their instance counts.
"""

from __future__ import annotations

from typing import Final

from gateway.fhir_outcome import JsonObject
from storage.dicom_queries import ImagingStudyRecord

DICOM_MODALITY_SYSTEM: Final = "http://dicom.nema.org/resources/ontology/DCM"


def imaging_study_resource(record: ImagingStudyRecord) -> JsonObject:
    resource: JsonObject = {
        "resourceType": "ImagingStudy",
        "id": f"s-{record.id}",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{record.study_uid}"}],
        "status": "available",
        "subject": {"reference": f"Patient/{record.subject_id}"},
        "numberOfSeries": len(record.series),
        "numberOfInstances": record.instances,
    }
    if record.modalities:
        resource["modality"] = [
            {"system": DICOM_MODALITY_SYSTEM, "code": m} for m in record.modalities
        ]
    if record.started is not None:
        resource["started"] = record.started.isoformat().replace("+00:00", "Z")
    elif record.study_date is not None:
        resource["started"] = record.study_date.isoformat()
    if record.description:
        resource["description"] = record.description
    series = []
    for s in record.series:
        entry: JsonObject = {"uid": s.uid, "numberOfInstances": s.instances}
        if s.number is not None:
            entry["number"] = s.number
        if s.modality:
            entry["modality"] = {"system": DICOM_MODALITY_SYSTEM, "code": s.modality}
        if s.description:
            entry["description"] = s.description
        if s.body_part:
            entry["bodySite"] = {"display": s.body_part}
        series.append(entry)
    if series:
        resource["series"] = series
    return resource
