-- The HL7 part of a batch in one statement (storage/writer_hl7.py; figures in bench/README.md,
-- HL7 section). Before, a small batch of ORU^R01 for new patients took nine round trips (BEGIN,
-- ledger, identifier select, new patients, identifiers, re-select, demographics, reports with
-- observations, COMMIT). On this machine a round trip costs 0.13-0.25 ms of the gateway's CPU
-- and more when the processes wake from idle, so at a steady 200 msg/s, where each batch holds one
-- or two messages, the round trips were most of the latency and of the CPU.
--
-- Now the writer reads which identifiers are known (one select, no transaction needed) and
-- decides which new patients to create and which identifiers to link to whom, then calls this
-- function once. A batch of HL7 messages only is then that call alone, committed on its own.
--
-- Arguments (arrays of equal length per group; numbers are 1-based positions):
--   messages     m_*: one per distinct key of the batch, the ledger row;
--   new patients n_*: one per patient to create, with what the first ORU of the batch about
--                them says (names as JSON, birth date, sex; '[]' and NULLs when nothing), so that
--                a patient first seen in a lab result is written once, not created then filled;
--   links        l_*: identifiers to link, each to a stored patient (l_owner > 0) or to the new
--                patient number -l_owner;
--   groups       g_*: the identifiers of one PID (or MRG) seen together, with the patient the
--                writer resolved them to (g_owner, as l_owner). Should another replica have
--                linked one of the batch's new identifiers meanwhile (fewer links inserted than
--                asked), a group's patient is read again: the survivor of the patient its first
--                identifier belongs to, and a new patient nothing points to is removed;
--   demographics d_*: per PID, with its group; ADT (d_replace) replaces what is stored if its
--                stamp (MSH-7) is not older, the newest of the batch per patient winning; ORU
--                fills what is missing, the first of the batch per patient (the writer leaves
--                out the ORU that can fill nothing, as the select showed the patient);
--   merges       x_*: ADT^A40, survivor and prior groups, applied in batch order;
--   reports      r_*: per OBR, with its group;
--   observations o_rows: per OBX, a JSON object naming its report by position (key r), its
--                set id (s) and its fields under the names of the record below (an absent key
--                is NULL), OBX-8 flags as an array (flags). One parameter instead of eighteen
--                arrays: asyncpg checks every array element's type in Python, and the
--                gateway's event loop is the scarcer of the two sides.
-- Content of a message that turns out to be in the ledger already (a resend racing its first
-- copy through another replica) is skipped. Returns, per message, the ledger id this call
-- inserted, or NULL for a duplicate.
CREATE FUNCTION hl7_write_batch(
    m_app text[], m_facility text[], m_control text[], m_type text[], m_version text[],
    m_charset text[], m_sent_at timestamptz[], m_received_at timestamptz[], m_size int[],
    m_sha256 bytea[], m_raw bytea[],
    n_names text[], n_birth_date date[], n_gender text[], l_system text[], l_value text[], l_owner bigint[],
    g_message int[], g_owner bigint[], g_system text[], g_value text[],
    d_group int[], d_replace boolean[], d_names text[], d_birth_date date[], d_gender text[],
    d_stamp timestamptz[],
    x_survivor int[], x_prior int[],
    r_group int[], r_placer text[], r_filler text[], r_service_system text[],
    r_service_code text[], r_service_display text[], r_observed_at timestamptz[],
    r_issued_at timestamptz[], r_status text[],
    o_rows json
) RETURNS bigint[]
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    fresh bigint[];       -- per message: the id inserted now, NULL for a duplicate
    new_ids bigint[];
    patient_of bigint[];  -- per group: its patient
    merge_row record;
    v_survivor bigint;
    v_prior bigint;
    linked bigint := 0;
BEGIN
    WITH inserted AS (
        INSERT INTO hl7_message (sending_application, sending_facility, control_id, message_type,
                                 version, charset, sent_at, received_at, size, sha256, raw)
        SELECT * FROM unnest(m_app, m_facility, m_control, m_type, m_version, m_charset,
                             m_sent_at, m_received_at, m_size, m_sha256, m_raw)
        ON CONFLICT (sending_application, sending_facility, control_id) DO NOTHING
        RETURNING id, sending_application, sending_facility, control_id
    )
    SELECT array_agg(i.id ORDER BY m.n) INTO fresh
    FROM unnest(m_app, m_facility, m_control) WITH ORDINALITY AS m (app, facility, control, n)
    LEFT JOIN inserted i ON (i.sending_application, i.sending_facility, i.control_id)
                            = (m.app, m.facility, m.control);
    IF cardinality(array_remove(fresh, NULL)) = 0 THEN
        RETURN fresh;  -- resends only: nothing else to write
    END IF;

    IF cardinality(n_names) > 0 THEN
        WITH created AS (
            INSERT INTO patient (names, birth_date, gender)
            SELECT n.names::jsonb, n.birth_date, n.gender
            FROM unnest(n_names, n_birth_date, n_gender) WITH ORDINALITY
                 AS n (names, birth_date, gender, k)
            ORDER BY n.k
            RETURNING id
        )
        SELECT array_agg(id ORDER BY id) INTO new_ids FROM created;
    END IF;
    IF cardinality(l_system) > 0 THEN
        -- Sorted, so that two replicas take the key locks in the same order.
        INSERT INTO patient_identifier (system, value, patient_id)
        SELECT l.system, l.value, CASE WHEN l.owner > 0 THEN l.owner ELSE new_ids[-l.owner] END
        FROM unnest(l_system, l_value, l_owner) AS l (system, value, owner)
        ORDER BY l.system, l.value
        ON CONFLICT (system, value) DO NOTHING;
        GET DIAGNOSTICS linked = ROW_COUNT;
    END IF;

    IF linked = cardinality(l_system) THEN
        FOR i IN 1 .. cardinality(g_owner) LOOP
            patient_of[i] := CASE WHEN g_owner[i] > 0 THEN g_owner[i] ELSE new_ids[-g_owner[i]] END;
        END LOOP;
    ELSE
        -- Another replica linked some identifiers meanwhile (a new statement sees what it
        -- committed): the stored links win; a new patient none of them points to goes again.
        SELECT array_agg(coalesce(p.replaced_by, p.id) ORDER BY g.n) INTO patient_of
        FROM unnest(g_system, g_value) WITH ORDINALITY AS g (system, value, n)
        LEFT JOIN patient_identifier pi ON (pi.system, pi.value) = (g.system, g.value)
        LEFT JOIN patient p ON p.id = pi.patient_id;
        IF array_position(patient_of, NULL) IS NOT NULL THEN
            RAISE EXCEPTION 'hl7_write_batch: an identifier of a group is not linked';
        END IF;
        IF cardinality(n_names) > 0 THEN
            DELETE FROM patient p WHERE p.id = ANY (new_ids)
                AND NOT EXISTS (SELECT 1 FROM patient_identifier pi WHERE pi.patient_id = p.id);
        END IF;
    END IF;

    IF true = ANY (d_replace) THEN
        UPDATE patient p SET names = u.names::jsonb, family = NULL, given = NULL,
                             birth_date = u.birth_date, gender = u.gender,
                             demographics_at = u.stamp, updated_at = now()
        FROM (SELECT DISTINCT ON (patient_of[d.g]) patient_of[d.g] AS id, d.names,
                     d.birth_date, d.gender, d.stamp
              FROM unnest(d_group, d_replace, d_names, d_birth_date, d_gender, d_stamp)
                   WITH ORDINALITY AS d (g, authoritative, names, birth_date, gender, stamp, n)
              WHERE d.authoritative AND fresh[g_message[d.g]] IS NOT NULL
              ORDER BY patient_of[d.g], d.stamp DESC, d.n DESC) AS u
        WHERE p.id = u.id AND (p.demographics_at IS NULL OR p.demographics_at <= u.stamp);
    END IF;
    IF false = ANY (d_replace) THEN
        UPDATE patient p SET
            names = CASE WHEN p.names = '[]'::jsonb THEN u.names::jsonb ELSE p.names END,
            birth_date = coalesce(p.birth_date, u.birth_date),
            gender = coalesce(p.gender, u.gender),
            updated_at = now()
        FROM (SELECT DISTINCT ON (patient_of[d.g]) patient_of[d.g] AS id, d.names,
                     d.birth_date, d.gender
              FROM unnest(d_group, d_replace, d_names, d_birth_date, d_gender)
                   WITH ORDINALITY AS d (g, authoritative, names, birth_date, gender, n)
              WHERE NOT d.authoritative AND fresh[g_message[d.g]] IS NOT NULL
                AND (d.names <> '[]' OR d.birth_date IS NOT NULL OR d.gender IS NOT NULL)
              ORDER BY patient_of[d.g], d.n) AS u
        WHERE p.id = u.id
          AND ((p.names = '[]'::jsonb AND u.names <> '[]')
               OR (p.birth_date IS NULL AND u.birth_date IS NOT NULL)
               OR (p.gender IS NULL AND u.gender IS NOT NULL));
    END IF;

    IF cardinality(x_survivor) > 0 THEN
        FOR merge_row IN
            SELECT x.survivor, x.prior, fresh[g_message[x.survivor]] AS message_id
            FROM unnest(x_survivor, x_prior) WITH ORDINALITY AS x (survivor, prior, n)
            WHERE fresh[g_message[x.survivor]] IS NOT NULL
            ORDER BY x.n
        LOOP
            -- Resolved again: an earlier merge of this batch may have moved either side.
            SELECT coalesce(replaced_by, id) INTO v_survivor FROM patient
            WHERE id = patient_of[merge_row.survivor];
            SELECT coalesce(replaced_by, id) INTO v_prior FROM patient
            WHERE id = patient_of[merge_row.prior];
            CONTINUE WHEN v_survivor = v_prior;
            UPDATE patient SET replaced_by = v_survivor, updated_at = now()
            WHERE id = v_prior OR replaced_by = v_prior;
            INSERT INTO patient_merge (prior_id, survivor_id, message_id)
            VALUES (v_prior, v_survivor, merge_row.message_id);
        END LOOP;
    END IF;

    IF cardinality(r_group) > 0 THEN
        WITH ids AS MATERIALIZED (
            SELECT r.n, nextval('lab_report_id_seq') AS id,
                   fresh[g_message[r.g]] AS message_id, patient_of[r.g] AS patient_id,
                   m_received_at[g_message[r.g]] AS received_at
            FROM unnest(r_group) WITH ORDINALITY AS r (g, n)
            WHERE fresh[g_message[r.g]] IS NOT NULL
        ), reports AS (
            INSERT INTO lab_report (id, message_id, patient_id, placer_id, filler_id,
                                    service_system, service_code, service_display, observed_at,
                                    issued_at, status, received_at)
            SELECT ids.id, ids.message_id, ids.patient_id, r.placer, r.filler, r.service_system,
                   r.service_code, r.service_display, r.observed_at, r.issued_at, r.status,
                   ids.received_at
            FROM unnest(r_placer, r_filler, r_service_system, r_service_code, r_service_display,
                        r_observed_at, r_issued_at, r_status)
                 WITH ORDINALITY AS r (placer, filler, service_system, service_code,
                                       service_display, observed_at, issued_at, status, n)
            JOIN ids USING (n)
        )
        INSERT INTO lab_observation (report_id, patient_id, set_id, value_type, code_system,
                                     code, code_display, value_numeric, comparator, value_text,
                                     value_code_system, value_code, value_display, unit,
                                     reference_range, reference_low, reference_high,
                                     abnormal_flags, status, observed_at, received_at)
        SELECT ids.id, ids.patient_id, o.s, o.value_type, o.code_system, o.code,
               o.code_display, o.num, o.comparator, o.txt, o.value_system, o.value_code,
               o.value_display, coalesce(o.unit, ''), coalesce(o.ref_range, ''), o.low, o.high,
               coalesce(o.flags, '{}'), coalesce(o.status, ''), o.observed_at, ids.received_at
        FROM json_to_recordset(o_rows)
             AS o (r int, s int, value_type text, code_system text, code text,
                   code_display text, num float8, comparator text, txt text,
                   value_system text, value_code text, value_display text, unit text,
                   ref_range text, low float8, high float8, flags text[], status text,
                   observed_at timestamptz)
        JOIN ids ON ids.n = o.r;
    END IF;
    RETURN fresh;
END
$fn$;

REVOKE EXECUTE ON FUNCTION hl7_write_batch FROM PUBLIC;
