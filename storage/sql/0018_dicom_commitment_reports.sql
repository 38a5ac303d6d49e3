-- Storage Commitment reports on their way to a modality's own port (QANTARA_DICOM_REPORT_ADDRESSES).
-- Until this migration they waited in the memory of the replica that answered the N-ACTION, and a
-- restart dropped them; a mobile unit out of coverage for hours then never learnt that its images
-- were safe, and kept them. Now the report is committed here before the N-ACTION is answered
-- Success, and any replica delivers it: a delivery claims its row with FOR UPDATE SKIP LOCKED and
-- moves `due_at` past the attempt (a lease), so two replicas never send the same report at once,
-- and a replica killed mid-attempt leaves the row to be tried again when the lease ends.
--
-- `information` is the N-EVENT-REPORT's Event Information in Explicit VR Little Endian (the
-- Transaction UID and the SOP Class and Instance UIDs it answers for: no patient name or id).
-- A row goes once the modality answered Success, or after its last attempt.
CREATE TABLE dicom_commitment_report (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ae_title text NOT NULL CHECK (length(ae_title) BETWEEN 1 AND 16),
    event_type smallint NOT NULL CHECK (event_type IN (1, 2)),
    information bytea NOT NULL,
    attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    due_at timestamptz NOT NULL DEFAULT now(),
    queued_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX dicom_commitment_report_due_idx ON dicom_commitment_report (due_at, id);
CREATE INDEX dicom_commitment_report_ae_idx ON dicom_commitment_report (ae_title);
