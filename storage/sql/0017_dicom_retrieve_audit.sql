-- DICOM retrievals (C-GET) go into the same audit trail as the read API, so that whoever reads a
-- patient's AuditEvents sees the images sent to a workstation too. `protocol` tells the rows
-- apart: for a 'dicom' row, `token_name` is the calling AE title, `query_shape` the operation and
-- its level ("C-GET STUDY"), `status` the DICOM status of the response it was written before.
ALTER TABLE api_audit
    ADD COLUMN protocol text NOT NULL DEFAULT 'http' CHECK (protocol IN ('http', 'dicom'));
