-- A study sent with a UTC offset but no StudyTime was given `started` at midnight of its date in
-- that zone, converted to UTC: a study of 2026-11-20 at +0100 started at 2026-11-19T23:00:00Z,
-- and `ImagingStudy?started=2026-11-20` missed it. `dicom.metadata._started` now gives no
-- instant without a time; the rows written before lose theirs, so that their date is used.
UPDATE dicom_study SET started = NULL WHERE started IS NOT NULL AND study_time IS NULL;
