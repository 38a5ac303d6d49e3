-- dicom_link_patient (migration 0013) again, same signature, with one change: when the
-- identifiers of a header name different patients, the patient of the national id (system `CIN`,
-- `ingest.records.NATIONAL_ID_SYSTEM`) wins, as in HL7 (`hl7.mapping.identifiers` puts it first),
-- and only then the lowest patient id. Before, the lowest id won whatever the identifier: an
-- image whose hospital number had been given to another patient by mistake went to that patient
-- although its national id named the right one.

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
    ORDER BY r->>0 <> 'CIN', 1 LIMIT 1;
    IF pid IS NULL THEN
        INSERT INTO patient (names, family, given, birth_date, gender)
        VALUES (
            coalesce(nullif(it->'names', 'null'::jsonb), '[]'::jsonb),
            it->>'family',
            CASE WHEN jsonb_typeof(it->'given') = 'array'
                THEN ARRAY(SELECT jsonb_array_elements_text(it->'given')) END,
            (it->>'birth_date')::date,
            it->>'gender')
        RETURNING id INTO pid;
        INSERT INTO patient_identifier (system, value, patient_id)
        SELECT r->>0, r->>1, pid FROM jsonb_array_elements(it->'refs') AS r
        ON CONFLICT (system, value) DO NOTHING;
        RETURN pid;
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
