-- The read API: the audit trail of patient reads, the name index of Patient search, and the
-- indexes behind the other search parameters.

-- One row per read or search that returned patient data (or was refused after authentication).
-- `query_shape` names the parameters (and date prefixes) of the request, never their values;
-- `patient_ids` are the patients whose data the response carried. Written, and committed,
-- before the response is sent.
CREATE TABLE api_audit (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    token_name     text NOT NULL,
    action         text NOT NULL,          -- FHIR restful interaction: read, search-type, operation
    resource_type  text NOT NULL,
    query_shape    text NOT NULL,
    patient_ids    bigint[] NOT NULL DEFAULT '{}',
    outcome        text NOT NULL CHECK (outcome IN ('0', '4', '8', '12')),
    status         integer NOT NULL
);
CREATE INDEX api_audit_recorded_idx ON api_audit (recorded_at, id);
CREATE INDEX api_audit_token_idx ON api_audit (token_name, id);
CREATE INDEX api_audit_patients_idx ON api_audit USING gin (patient_ids);

-- Patient search by name: any part of any name, case- and accent-insensitive (Latin accents
-- folded; Arabic script kept as written), prefix match. Parts are maintained by a trigger from
-- `patient.names` (and the legacy family/given columns), so no writer needs to know about them.
CREATE FUNCTION qantara_fold(value text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT lower(translate(value,
                           'ÀÁÂÃÄÅÇÈÉÊËÌÍÎÏÑÒÓÔÕÖÙÚÛÜÝàáâãäåçèéêëìíîïñòóôõöùúûüýÿĀāĂăĄąĆćĈĉĊċČčĎďĒēĔĕĖėĘęĚěĜĝĞğĠġĢģĤĥĨĩĪīĬĭĮįİĴĵĶķĹĺĻļĽľŃńŅņŇňŌōŎŏŐőŔŕŖŗŘřŚśŜŝŞşŠšŢţŤťŨũŪūŬŭŮůŰűŲųŴŵŶŷŸŹźŻżŽžƠơƯưǍǎǏǐǑǒǓǔǕǖǗǘǙǚǛǜǞǟǠǡǦǧǨǩǪǫǬǭǰǴǵǸǹǺǻȀȁȂȃȄȅȆȇȈȉȊȋȌȍȎȏȐȑȒȓȔȕȖȗȘșȚțȞȟȦȧȨȩȪȫȬȭȮȯȰȱȲȳ',
                           'aaaaaaceeeeiiiinooooouuuuyaaaaaaceeeeiiiinooooouuuuyyaaaaaaccccccccddeeeeeeeeeegggggggghhiiiiiiiiijjkkllllllnnnnnnoooooorrrrrrssssssssttttuuuuuuuuuuuuwwyyyzzzzzzoouuaaiioouuuuuuuuuuaaaaggkkoooojggnnaaaaaaeeeeiiiioooorrrruuuusstthhaaeeooooooooyy'))
$$;

CREATE FUNCTION qantara_name_parts(names jsonb, family text, given text[]) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    fields text[] := ARRAY[family] || coalesce(given, '{}');
    entry jsonb;
    parts text[] := '{}';
    value text;
    word text;
BEGIN
    IF jsonb_typeof(names) = 'array' THEN
        FOR entry IN SELECT jsonb_array_elements(names) LOOP
            CONTINUE WHEN jsonb_typeof(entry) <> 'object';
            fields := fields || (entry ->> 'text') || (entry ->> 'family');
            IF jsonb_typeof(entry -> 'given') = 'array' THEN
                fields := fields || ARRAY(SELECT jsonb_array_elements_text(entry -> 'given'));
            END IF;
        END LOOP;
    END IF;
    FOREACH value IN ARRAY fields LOOP
        CONTINUE WHEN value IS NULL OR btrim(value) = '';
        value := qantara_fold(btrim(value));
        parts := parts || value;
        FOREACH word IN ARRAY regexp_split_to_array(value, '[[:space:],''’-]+') LOOP
            IF word <> '' THEN
                parts := parts || word;
            END IF;
        END LOOP;
    END LOOP;
    RETURN ARRAY(SELECT DISTINCT p FROM unnest(parts) AS p);
END;
$$;

CREATE TABLE patient_name_part (
    patient_id  bigint NOT NULL REFERENCES patient (id),
    -- Byte order, whatever the database's collation: a prefix is the range [p, p || U+10FFFF).
    part        text COLLATE "C" NOT NULL,
    PRIMARY KEY (part, patient_id)
);
CREATE INDEX patient_name_part_patient_idx ON patient_name_part (patient_id);

-- Row triggers, fired only when a name changes. The DELETE is planned at each run (EXECUTE):
-- a plan cached while the table was small would scan it whole, row after row of a large batch.
CREATE FUNCTION qantara_index_patient_name() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        EXECUTE 'DELETE FROM patient_name_part WHERE patient_id = $1' USING NEW.id;
    END IF;
    INSERT INTO patient_name_part (patient_id, part)
    SELECT NEW.id, part FROM unnest(qantara_name_parts(NEW.names, NEW.family, NEW.given)) AS part
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END;
$$;

CREATE TRIGGER patient_name_insert AFTER INSERT ON patient FOR EACH ROW
    WHEN (NEW.names <> '[]'::jsonb OR NEW.family IS NOT NULL OR NEW.given IS NOT NULL)
    EXECUTE FUNCTION qantara_index_patient_name();
CREATE TRIGGER patient_name_update AFTER UPDATE OF names, family, given ON patient FOR EACH ROW
    WHEN (OLD.names IS DISTINCT FROM NEW.names OR OLD.family IS DISTINCT FROM NEW.family
          OR OLD.given IS DISTINCT FROM NEW.given)
    EXECUTE FUNCTION qantara_index_patient_name();

INSERT INTO patient_name_part (patient_id, part)
SELECT p.id, part FROM patient p, unnest(qantara_name_parts(p.names, p.family, p.given)) AS part
ON CONFLICT DO NOTHING;

CREATE INDEX patient_birth_date_idx ON patient (birth_date);

-- $lastn and newest-first searches of lab results; DiagnosticReport by date.
CREATE INDEX lab_observation_patient_when_idx
    ON lab_observation (patient_id, (coalesce(observed_at, received_at)), id DESC);
CREATE INDEX lab_report_patient_observed_idx ON lab_report (patient_id, observed_at);
