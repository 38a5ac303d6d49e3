-- DICOM performance. The orphan sweep asks which file locations the index names
-- (dicom.scp.DicomServer.sweep_orphans), hence an index on file_path.
CREATE INDEX IF NOT EXISTS dicom_instance_file_path_idx ON dicom_instance (file_path);

-- One round trip per batch for the DICOM index (storage/writer_dicom.py): the statements the
-- writer used to send one by one (about ten per batch), run server-side in the same order and
-- with the same locking order (studies by UID, then series by UID, then instances), each with its
-- own snapshot (READ COMMITTED), so a row another replica committed meanwhile is seen.
--
-- items: a JSON array of instance objects, the first envelope of each SOP Instance UID of the
-- batch, sorted by UID (keys: see storage/writer_dicom.py `_item`). `refs` is the sorted list of
-- [system, value] identifiers of the header; the identifiers of one header are linked to one
-- patient (the one already carrying any of them, else a new one) and empty demographics filled.
-- Returns, for every item's UID, whether this call inserted it and the SHA-256 of the indexed
-- copy (the caller tells a duplicate from a conflict).
CREATE OR REPLACE FUNCTION dicom_index_instances(items jsonb)
RETURNS TABLE (uid text, inserted boolean, stored_sha256 bytea)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    fresh jsonb;
    it jsonb;
    pid bigint;
    linked jsonb := '{}'::jsonb;  -- refs (as text) -> patient id
    new_uids text[];
BEGIN
    SELECT coalesce(jsonb_agg(x ORDER BY n), '[]'::jsonb) INTO fresh
    FROM jsonb_array_elements(items) WITH ORDINALITY AS t(x, n)
    WHERE NOT EXISTS (SELECT 1 FROM dicom_instance d WHERE d.sop_instance_uid = x->>'uid');

    FOR it IN SELECT x FROM jsonb_array_elements(fresh) WITH ORDINALITY AS t(x, n) ORDER BY n LOOP
        CONTINUE WHEN jsonb_array_length(it->'refs') = 0 OR linked ? ((it->'refs')::text);
        pid := NULL;
        SELECT coalesce(p.replaced_by, p.id) INTO pid
        FROM jsonb_array_elements(it->'refs') AS r
        JOIN patient_identifier pi ON pi.system = r->>0 AND pi.value = r->>1
        JOIN patient p ON p.id = pi.patient_id
        ORDER BY 1 LIMIT 1;
        IF pid IS NULL THEN
            INSERT INTO patient (names) VALUES ('[]'::jsonb) RETURNING id INTO pid;
        END IF;
        INSERT INTO patient_identifier (system, value, patient_id)
        SELECT r->>0, r->>1, pid FROM jsonb_array_elements(it->'refs') AS r
        ON CONFLICT (system, value) DO NOTHING;
        UPDATE patient SET
            names = CASE WHEN names = '[]'::jsonb THEN it->'names' ELSE names END,
            family = coalesce(family, it->>'family'),
            given = coalesce(given, CASE WHEN jsonb_typeof(it->'given') = 'array'
                THEN ARRAY(SELECT jsonb_array_elements_text(it->'given')) END),
            birth_date = coalesce(birth_date, (it->>'birth_date')::date),
            gender = coalesce(gender, it->>'gender'),
            updated_at = now()
        WHERE id = pid;
        linked := linked || jsonb_build_object((it->'refs')::text, pid);
    END LOOP;

    INSERT INTO dicom_study
        (study_uid, patient_id, dicom_patient_id, issuer_of_patient_id, patient_name,
         patient_birth_date, patient_sex, study_date, study_time, started, study_id,
         accession_number, description, referring_physician, charset)
    SELECT DISTINCT ON (x->>'study_uid')
        x->>'study_uid', (linked->>((x->'refs')::text))::bigint, x->>'dicom_patient_id',
        x->>'issuer_of_patient_id', x->>'patient_name', (x->>'birth_date')::date,
        x->>'patient_sex', (x->>'study_date')::date, (x->>'study_time')::time,
        (x->>'study_started')::timestamptz, x->>'study_id', x->>'accession_number',
        x->>'study_description', x->>'referring_physician', x->>'charset'
    FROM jsonb_array_elements(fresh) WITH ORDINALITY AS t(x, n)
    ORDER BY x->>'study_uid', n
    ON CONFLICT (study_uid) DO NOTHING;

    INSERT INTO dicom_series (study_id, series_uid, modality, series_number, description, body_part)
    SELECT DISTINCT ON (x->>'series_uid')
        s.id, x->>'series_uid', x->>'modality', (x->>'series_number')::int,
        x->>'series_description', x->>'body_part'
    FROM jsonb_array_elements(fresh) WITH ORDINALITY AS t(x, n)
    JOIN dicom_study s ON s.study_uid = x->>'study_uid'
    ORDER BY x->>'series_uid', n
    ON CONFLICT (series_uid) DO NOTHING;

    WITH ins AS (
        INSERT INTO dicom_instance
            (series_id, sop_instance_uid, sop_class_uid, instance_number, content_date,
             transfer_syntax, file_path, size, sha256, calling_ae, received_at)
        SELECT se.id, x->>'uid', x->>'sop_class_uid', (x->>'instance_number')::int,
            (x->>'content_date')::date, x->>'transfer_syntax', x->>'file_path',
            (x->>'size')::bigint, decode(x->>'sha256', 'hex'), x->>'calling_ae',
            (x->>'received_at')::timestamptz
        FROM jsonb_array_elements(fresh) WITH ORDINALITY AS t(x, n)
        JOIN dicom_series se ON se.series_uid = x->>'series_uid'
        ORDER BY x->>'uid'
        ON CONFLICT (sop_instance_uid) DO NOTHING
        RETURNING sop_instance_uid
    )
    SELECT coalesce(array_agg(sop_instance_uid), '{}') INTO new_uids FROM ins;

    RETURN QUERY
    SELECT d.sop_instance_uid, d.sop_instance_uid = ANY (new_uids), d.sha256
    FROM dicom_instance d
    WHERE d.sop_instance_uid IN (SELECT x->>'uid' FROM jsonb_array_elements(items) AS x);
END
$fn$;
