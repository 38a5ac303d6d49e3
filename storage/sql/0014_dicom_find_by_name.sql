-- C-FIND by PatientName: `s.patient_name = $1` or, with a trailing wildcard,
-- `s.patient_name LIKE 'El Amr%'` (storage/dicom_queries.py). Without an index every such query
-- read the whole of dicom_study: 27-30 ms at 300,000 studies, growing with the archive; with this
-- one, 0.5 ms for an exact name and 2-8 ms for a prefix (bench machine of 2026-11-28).
-- `text_pattern_ops` compares byte by byte, so a prefix is a range whatever the database's
-- collation; `=` uses it too. A leading wildcard (`*Fatima`) still reads the table.
CREATE INDEX IF NOT EXISTS dicom_study_patient_name_idx
    ON dicom_study (patient_name text_pattern_ops);
