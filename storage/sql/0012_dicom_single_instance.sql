-- dicom_index_instances (migration 0011) again, same signature, grants, locking order and
-- results, with two changes:
--
-- 1. A one-item batch, the usual one (a modality's association commits one instance per
--    batch), takes a path of its own: each row is probed by its unique key, then inserted with
--    plain VALUES. The general path builds sets (jsonb_agg, DISTINCT ON, set-returning joins)
--    that cost about 0.8 ms more per call for one item: 1.4 against 0.6 ms (bench/README.md).
-- 2. Linking an item's identifiers to a patient, and filling what the patient lacks, is
--    `dicom_link_patient`, called by both paths (the statements of 0011's loop). NULL when the
--    item carries no identifier.

CREATE OR REPLACE FUNCTION dicom_link_patient(it jsonb)
RETURNS bigint
LANGUAGE plpgsql AS $fn$
DECLARE
    pid bigint;
BEGIN
    IF jsonb_array_length(it->'refs') = 0 THEN
        RETURN NULL;
    END IF;
    SELECT coalesce(p.replaced_by, p.id) INTO pid
    FROM jsonb_array_elements(it->'refs') AS r
    JOIN LATERAL (
        SELECT pi.patient_id FROM patient_identifier pi
        WHERE pi.system = r->>0 AND pi.value = r->>1 OFFSET 0
    ) AS pi ON true
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
    WHERE id = pid
      AND (names = '[]'::jsonb AND it->'names' IS NOT NULL AND it->'names' <> '[]'::jsonb
           OR family IS NULL AND it->>'family' IS NOT NULL
           OR given IS NULL AND jsonb_typeof(it->'given') = 'array'
           OR birth_date IS NULL AND it->>'birth_date' IS NOT NULL
           OR gender IS NULL AND it->>'gender' IS NOT NULL);
    RETURN pid;
END
$fn$;
REVOKE EXECUTE ON FUNCTION dicom_link_patient(jsonb) FROM PUBLIC;

CREATE OR REPLACE FUNCTION dicom_index_instances(items jsonb)
RETURNS TABLE (uid text, inserted boolean, stored_sha256 bytea)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    firsts jsonb;  -- the first item of each UID, sorted by UID
    fresh jsonb;   -- those not indexed yet
    it jsonb;
    pid bigint;
    linked jsonb := '{}'::jsonb;  -- refs (as text) -> patient id
    new_uids text[];
    sid bigint;
    seid bigint;
    sha bytea;
BEGIN
    IF jsonb_array_length(items) = 1 THEN
        -- One association's one instance: the row is probed by its key before each insert.
        it := items->0;
        SELECT d.sha256 INTO sha FROM dicom_instance d WHERE d.sop_instance_uid = it->>'uid';
        IF NOT FOUND THEN
            pid := dicom_link_patient(it);
            SELECT s.id INTO sid FROM dicom_study s WHERE s.study_uid = it->>'study_uid';
            IF NOT FOUND THEN
                INSERT INTO dicom_study
                    (study_uid, patient_id, dicom_patient_id, issuer_of_patient_id,
                     patient_name, patient_birth_date, patient_sex, study_date, study_time,
                     started, study_id, accession_number, description, referring_physician,
                     charset)
                VALUES (
                    it->>'study_uid', pid, it->>'dicom_patient_id', it->>'issuer_of_patient_id',
                    it->>'patient_name', (it->>'birth_date')::date, it->>'patient_sex',
                    (it->>'study_date')::date, (it->>'study_time')::time,
                    (it->>'study_started')::timestamptz, it->>'study_id',
                    it->>'accession_number', it->>'study_description',
                    it->>'referring_physician', it->>'charset')
                ON CONFLICT (study_uid) DO NOTHING
                RETURNING id INTO sid;
                IF sid IS NULL THEN  -- another transaction committed it meanwhile
                    SELECT s.id INTO sid FROM dicom_study s WHERE s.study_uid = it->>'study_uid';
                END IF;
            END IF;
            SELECT se.id INTO seid FROM dicom_series se WHERE se.series_uid = it->>'series_uid';
            IF NOT FOUND THEN
                INSERT INTO dicom_series
                    (study_id, series_uid, modality, series_number, description, body_part)
                VALUES (sid, it->>'series_uid', it->>'modality', (it->>'series_number')::int,
                    it->>'series_description', it->>'body_part')
                ON CONFLICT (series_uid) DO NOTHING
                RETURNING id INTO seid;
                IF seid IS NULL THEN
                    SELECT se.id INTO seid FROM dicom_series se
                    WHERE se.series_uid = it->>'series_uid';
                END IF;
            END IF;
            INSERT INTO dicom_instance
                (series_id, sop_instance_uid, sop_class_uid, instance_number, content_date,
                 transfer_syntax, file_path, size, sha256, calling_ae, received_at)
            VALUES (seid, it->>'uid', it->>'sop_class_uid', (it->>'instance_number')::int,
                (it->>'content_date')::date, it->>'transfer_syntax', it->>'file_path',
                (it->>'size')::bigint, decode(it->>'sha256', 'hex'), it->>'calling_ae',
                (it->>'received_at')::timestamptz)
            ON CONFLICT (sop_instance_uid) DO NOTHING
            RETURNING dicom_instance.sha256 INTO sha;
            IF FOUND THEN
                RETURN QUERY SELECT it->>'uid', true, sha;
                RETURN;
            END IF;
            -- Another transaction indexed this UID meanwhile: a duplicate, as below.
            SELECT d.sha256 INTO sha FROM dicom_instance d WHERE d.sop_instance_uid = it->>'uid';
        END IF;
        IF sha <> decode(it->>'sha256', 'hex') THEN
            INSERT INTO dicom_conflict (sop_instance_uid, sha256, size, calling_ae, received_at)
            VALUES (it->>'uid', decode(it->>'sha256', 'hex'), (it->>'size')::bigint,
                it->>'calling_ae', (it->>'received_at')::timestamptz);
        END IF;
        RETURN QUERY SELECT it->>'uid', false, sha;
        RETURN;
    END IF;

    -- A batch of several: the first item of each UID, sorted by UID, is the one indexed.

    SELECT coalesce(jsonb_agg(x ORDER BY x->>'uid'), '[]'::jsonb) INTO firsts
    FROM (SELECT DISTINCT ON (x->>'uid') x
          FROM jsonb_array_elements(items) WITH ORDINALITY AS t(x, n)
          ORDER BY x->>'uid', n) AS f;

    SELECT coalesce(jsonb_agg(x ORDER BY n), '[]'::jsonb) INTO fresh
    FROM jsonb_array_elements(firsts) WITH ORDINALITY AS t(x, n)
    WHERE NOT EXISTS (SELECT 1 FROM dicom_instance d WHERE d.sop_instance_uid = x->>'uid');

    FOR it IN SELECT x FROM jsonb_array_elements(fresh) WITH ORDINALITY AS t(x, n) ORDER BY n LOOP
        CONTINUE WHEN jsonb_array_length(it->'refs') = 0 OR linked ? ((it->'refs')::text);
        pid := dicom_link_patient(it);
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
    JOIN LATERAL (
        SELECT s.id FROM dicom_study s WHERE s.study_uid = x->>'study_uid' OFFSET 0
    ) AS s ON true
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
        JOIN LATERAL (
            SELECT se.id FROM dicom_series se WHERE se.series_uid = x->>'series_uid' OFFSET 0
        ) AS se ON true
        ORDER BY x->>'uid'
        ON CONFLICT (sop_instance_uid) DO NOTHING
        RETURNING sop_instance_uid
    )
    SELECT coalesce(array_agg(sop_instance_uid), '{}') INTO new_uids FROM ins;

    -- Conflicts: every item whose content differs from the indexed copy's (the one this call
    -- inserted is that copy), in batch order. None when this call inserted every item.
    IF cardinality(new_uids) < jsonb_array_length(items) THEN
        INSERT INTO dicom_conflict (sop_instance_uid, sha256, size, calling_ae, received_at)
        SELECT x->>'uid', decode(x->>'sha256', 'hex'), (x->>'size')::bigint, x->>'calling_ae',
            (x->>'received_at')::timestamptz
        FROM jsonb_array_elements(items) WITH ORDINALITY AS t(x, n)
        JOIN LATERAL (
            SELECT d.sha256 FROM dicom_instance d WHERE d.sop_instance_uid = x->>'uid' OFFSET 0
        ) AS d ON true
        WHERE d.sha256 <> decode(x->>'sha256', 'hex')
        ORDER BY n;
    END IF;

    RETURN QUERY
    SELECT d.sop_instance_uid, d.sop_instance_uid = ANY (new_uids), d.sha256
    FROM jsonb_array_elements(firsts) AS f(x)
    JOIN LATERAL (
        SELECT d.sop_instance_uid, d.sha256 FROM dicom_instance d
        WHERE d.sop_instance_uid = x->>'uid' OFFSET 0
    ) AS d ON true;
END
$fn$;
