-- C-FIND by person name (storage/dicom_queries.py): PatientName and ReferringPhysicianName match
-- whatever their case and Latin accents, as Patient search does (`qantara_fold`, 0005). The
-- folded names are stored beside the names, so that a query compares them as they are:
-- `=` for an exact name, `LIKE 'el amr%'` with a trailing wildcard, and a leading wildcard
-- (`*Fatima`) reads the table at the speed of a plain comparison instead of folding every row
-- of the archive on the way (10 µs a row).
--
-- PatientName is indexed: without an index every such query read the whole of dicom_study
-- (27-30 ms at 300,000 studies, growing with the archive); with it, 0.5 ms for an exact name
-- (bench machine of 2026-11-28). `text_pattern_ops` compares byte by byte, so a prefix is a range
-- whatever the database's collation; `=` uses it too. Adding the columns rewrites the table once.
-- The folded values are computed when a row is written: a migration that ever changes what
-- `qantara_fold` returns must rewrite them (`UPDATE dicom_study SET patient_name = patient_name,
-- referring_physician = referring_physician`), as it must rebuild `patient_name_part`.
ALTER TABLE dicom_study
    ADD COLUMN patient_name_folded text
        GENERATED ALWAYS AS (qantara_fold(patient_name)) STORED,
    ADD COLUMN referring_physician_folded text
        GENERATED ALWAYS AS (qantara_fold(referring_physician)) STORED;

CREATE INDEX dicom_study_patient_name_folded_idx
    ON dicom_study (patient_name_folded text_pattern_ops);
