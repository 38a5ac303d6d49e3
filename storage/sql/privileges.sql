-- What the runtime roles may do, table by table: the one list of grants (docs/operations.md,
-- "Database roles"). Not a numbered migration: `qantara migrate` and `qantara db roles` run it
-- again, as the owner role, after the migrations (serve does when it applied one), so it always
-- describes the whole schema of this release. Each run first revokes everything the owner had
-- granted to the two roles, then grants exactly this; in one transaction, so sessions never see
-- a half-applied state. A table missing here is out of reach of both roles
-- (tests/test_db_roles.py checks that every table is listed).
--
-- The role names come from the settings `qantara.owner_role`, `qantara.writer_role` and
-- `qantara.reader_role` (storage/roles.py sets them for the transaction; by hand in psql:
-- SET qantara.writer_role = 'qantara_writer'; ... then \i storage/sql/privileges.sql).
--
-- writer (`qantara_writer`): the ingest pipeline (MQTT ledger, watermarks, vitals, HL7, DICOM
--   index, dead letters), partition upkeep (through qantara_ensure_partitions only), the DICOM
--   C-FIND, C-GET and C-MOVE (with their audit rows), the Storage Commitment reports waiting for
--   a modality's port, the pending-migration check at start and
--   the `qantara token` commands.
-- reader (`qantara_reader`): the HTTP API: FHIR and DICOMweb searches, token lookup, the audit
--   trail (written before each response, read as AuditEvent).
-- Neither may TRUNCATE, REFERENCE, TRIGGER or run DDL; neither reads what it does not need
-- (dead letters and raw HL7 keep patient data; the reader never sees them).
DO $privileges$
DECLARE
    writer text := current_setting('qantara.writer_role');
    reader text := current_setting('qantara.reader_role');
    item record;
BEGIN
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM %I, %I', current_schema(), writer, reader);
    EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM %I, %I', current_schema(), writer, reader);
    EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA %I FROM %I, %I', current_schema(), writer, reader);

    FOR item IN
        SELECT * FROM (VALUES
            -- table                 writer                              reader
            ('schema_migration',   'SELECT',                             NULL),
            ('patient',            'SELECT, INSERT, UPDATE, DELETE',     'SELECT'),
            ('patient_identifier', 'SELECT, INSERT',                     'SELECT'),
            ('patient_name_part',  'SELECT, INSERT, DELETE',             'SELECT'),
            ('patient_merge',      'INSERT',                             NULL),
            ('unit',               'SELECT, INSERT, UPDATE',             'SELECT'),
            ('device',             'SELECT, INSERT',                     'SELECT'),
            ('concept',            'SELECT, INSERT',                     'SELECT'),
            ('mqtt_message',       'SELECT, INSERT, DELETE',             NULL),
            ('vital',              'INSERT',                             'SELECT'),
            ('waveform_segment',   'INSERT',                             NULL),
            -- ON CONFLICT (protocol, source, sha256) reads the key, never `raw`
            ('dead_letter',        'INSERT, SELECT (protocol, source, sha256)', NULL),
            -- the ledger's RETURNING reads the key and id, never `raw`
            ('hl7_message',        'INSERT, SELECT (id, sending_application, sending_facility, control_id)', NULL),
            ('lab_report',         'INSERT',                             'SELECT'),
            ('lab_observation',    'INSERT',                             'SELECT'),
            ('dicom_study',        'SELECT, INSERT',                     'SELECT'),
            ('dicom_series',       'SELECT, INSERT',                     'SELECT'),
            ('dicom_instance',     'SELECT, INSERT',                     'SELECT'),
            ('dicom_conflict',     'INSERT',                             NULL),
            -- Storage Commitment reports waiting for a modality's own port
            ('dicom_commitment_report', 'SELECT, INSERT, UPDATE, DELETE', NULL),
            -- `qantara token` create/list/revoke: never the hashes, only `revoked_at` changes
            ('api_token',          'INSERT, SELECT (id, name, scopes, created_at, revoked_at), UPDATE (revoked_at)', 'SELECT'),
            -- the DICOM listener's C-FIND, C-GET, C-MOVE audit rows; RETURNING reads the id
            ('api_audit',          'INSERT, SELECT (id)',                'SELECT, INSERT')
        ) AS t (name, writer_privileges, reader_privileges)
    LOOP
        CONTINUE WHEN to_regclass(quote_ident(item.name)) IS NULL;  -- not created yet
        IF item.writer_privileges IS NOT NULL THEN
            EXECUTE format('GRANT %s ON TABLE %I TO %I', item.writer_privileges, item.name, writer);
        END IF;
        IF item.reader_privileges IS NOT NULL THEN
            EXECUTE format('GRANT %s ON TABLE %I TO %I', item.reader_privileges, item.name, reader);
        END IF;
    END LOOP;

    -- Sequences the writer draws from explicitly (column defaults, the HL7 report ids); identity
    -- columns need no grant.
    FOR item IN
        SELECT * FROM (VALUES ('vital_id_seq'), ('waveform_id_seq'), ('lab_report_id_seq')) AS t (name)
    LOOP
        CONTINUE WHEN to_regclass(quote_ident(item.name)) IS NULL;
        EXECUTE format('GRANT USAGE ON SEQUENCE %I TO %I', item.name, writer);
    END LOOP;

    -- Functions that write: the writer's alone (PUBLIC's EXECUTE is revoked by the migrations
    -- that create them). Named without their argument lists: each name is one function.
    FOR item IN
        SELECT * FROM (VALUES
            ('qantara_ensure_partitions'),
            ('dicom_index_instances'),
            ('dicom_link_patient'),
            ('hl7_write_batch')
        ) AS t (name)
    LOOP
        CONTINUE WHEN to_regproc(quote_ident(item.name)) IS NULL;
        EXECUTE format('GRANT EXECUTE ON FUNCTION %I TO %I', item.name, writer);
    END LOOP;
END
$privileges$;
