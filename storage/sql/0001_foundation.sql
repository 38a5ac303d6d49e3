-- Foundation schema: patients and their identifiers, units and devices, the code dictionary,
-- vitals as narrow time-partitioned rows, the MQTT dedup ledger, dead letters and API tokens.
-- Runs on plain PostgreSQL 15+. Where the timescaledb extension is available, `vital` and
-- `waveform_segment` become hypertables with compression; otherwise they are natively range
-- partitioned by week and the gateway creates partitions ahead (qantara_ensure_partitions).

CREATE TABLE patient (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    family       text,
    given        text[],
    names        jsonb NOT NULL DEFAULT '[]'::jsonb,
    birth_date   date,
    gender       text CHECK (gender IN ('male', 'female', 'other', 'unknown')),
    replaced_by  bigint REFERENCES patient (id)
);

-- One row per identifier a patient carries (CIN national id, insurance number, facility MRN);
-- identifiers seen together in one message link to one patient.
CREATE TABLE patient_identifier (
    system      text NOT NULL,
    value       text NOT NULL,
    patient_id  bigint NOT NULL REFERENCES patient (id),
    first_seen  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (system, value)
);
CREATE INDEX patient_identifier_patient_idx ON patient_identifier (patient_id);

CREATE TABLE unit (
    id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    -- Highest seq such that every seq from 1 to it is handled: published as units/{u}/ack.
    ack_seq     bigint NOT NULL DEFAULT 0
);

CREATE TABLE device (
    id       integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    unit_id  integer NOT NULL REFERENCES unit (id),
    ident    text NOT NULL,
    kind     text NOT NULL,
    UNIQUE (unit_id, ident)
);

-- Code dictionary: one row per (system, code, UCUM unit) so that a vital row carries one int.
CREATE TABLE concept (
    id       integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    system   text NOT NULL,
    code     text NOT NULL,
    unit     text NOT NULL DEFAULT '',
    UNIQUE (system, code, unit)
);

-- MQTT dedup ledger: one row per (unit, seq) handled, whatever its outcome.
CREATE TABLE mqtt_message (
    unit_id      integer NOT NULL REFERENCES unit (id),
    seq          bigint NOT NULL,
    received_at  timestamptz NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now(),
    sent_at      timestamptz,
    samples      integer NOT NULL DEFAULT 0,
    outcome      text NOT NULL CHECK (outcome IN ('stored', 'rejected')),
    PRIMARY KEY (unit_id, seq)
);

CREATE SEQUENCE vital_id_seq AS bigint;
CREATE SEQUENCE waveform_id_seq AS bigint;

-- Vitals as narrow rows: 8-byte times, integer keys, one float. Waveforms as segments.
DO $$
DECLARE
    timescale boolean := EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
                         AND current_setting('shared_preload_libraries') LIKE '%timescaledb%';
    suffix text := CASE WHEN timescale THEN '' ELSE ' PARTITION BY RANGE (%s)' END;
BEGIN
    EXECUTE format($t$
        CREATE TABLE vital (
            id           bigint NOT NULL DEFAULT nextval('vital_id_seq'),
            patient_id   bigint NOT NULL,
            time         timestamptz NOT NULL,   -- device time of the sample
            received_at  timestamptz NOT NULL,   -- when the gateway received the message
            concept_id   integer NOT NULL,
            device_id    integer NOT NULL,
            value        double precision NOT NULL
        )$t$ || format(suffix, 'time'));
    EXECUTE format($t$
        CREATE TABLE waveform_segment (
            id           bigint NOT NULL DEFAULT nextval('waveform_id_seq'),
            patient_id   bigint NOT NULL,
            t0           timestamptz NOT NULL,
            received_at  timestamptz NOT NULL,
            concept_id   integer NOT NULL,
            device_id    integer NOT NULL,
            fs           real NOT NULL,
            unit         text NOT NULL,
            samples      real[] NOT NULL
        )$t$ || format(suffix, 't0'));
    IF timescale THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        PERFORM create_hypertable('vital', 'time', chunk_time_interval => interval '1 day');
        PERFORM create_hypertable('waveform_segment', 't0', chunk_time_interval => interval '1 day');
        EXECUTE 'ALTER TABLE vital SET (timescaledb.compress, '
                'timescaledb.compress_segmentby = ''patient_id'', '
                'timescaledb.compress_orderby = ''time, id'')';
        PERFORM add_compression_policy('vital', interval '7 days');
    ELSE
        CREATE TABLE vital_default PARTITION OF vital DEFAULT;
        CREATE TABLE waveform_segment_default PARTITION OF waveform_segment DEFAULT;
    END IF;
END
$$;
-- Keyset paging (patient, time, id) and per-code trends.
CREATE INDEX vital_patient_time_idx ON vital (patient_id, time, id);
CREATE INDEX vital_patient_concept_time_idx ON vital (patient_id, concept_id, time);
CREATE INDEX vital_id_idx ON vital (id);
CREATE INDEX waveform_segment_patient_idx ON waveform_segment (patient_id, t0);

-- Input we refused, with its reason; deduplicated by (protocol, source, digest).
CREATE TABLE dead_letter (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    protocol     text NOT NULL,
    source       text NOT NULL,
    reason       text NOT NULL,
    detail       text NOT NULL DEFAULT '',
    received_at  timestamptz NOT NULL,
    size         integer NOT NULL,
    sha256       bytea NOT NULL,
    raw          bytea NOT NULL,                -- the whole input, or its first 64 KiB
    UNIQUE (protocol, source, sha256)
);
CREATE INDEX dead_letter_received_idx ON dead_letter (received_at);

-- API bearer tokens: only a SHA-256 of the token is stored.
CREATE TABLE api_token (
    id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    token_hash  bytea NOT NULL UNIQUE,
    scopes      text[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- Weekly partitions of the time-series tables, created ahead by the gateway. A partition is
-- never created over a range where rows already sit in the default partition: those rows are
-- moved first, in the same transaction.
CREATE FUNCTION qantara_ensure_partitions(parent regclass, from_ts timestamptz, to_ts timestamptz)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    week_start timestamptz := date_trunc('week', from_ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    part_name  text;
    created    integer := 0;
    parent_name text := parent::text;
    default_name text := parent::text || '_default';
    time_col   text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = parent) THEN
        RETURN 0;   -- a hypertable (TimescaleDB) manages its own chunks
    END IF;
    SELECT a.attname INTO time_col
      FROM pg_partitioned_table p JOIN pg_attribute a
        ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]
     WHERE p.partrelid = parent;
    WHILE week_start < to_ts LOOP
        part_name := parent_name || '_' || to_char(week_start AT TIME ZONE 'UTC', 'IYYY"w"IW');
        IF to_regclass(part_name) IS NULL THEN
            EXECUTE format('CREATE TEMP TABLE qantara_moving ON COMMIT DROP AS '
                           'SELECT * FROM %I WHERE %I >= %L AND %I < %L',
                           default_name, time_col, week_start, time_col, week_start + interval '1 week');
            EXECUTE format('DELETE FROM %I WHERE %I >= %L AND %I < %L',
                           default_name, time_col, week_start, time_col, week_start + interval '1 week');
            EXECUTE format('CREATE TABLE %I PARTITION OF %s FOR VALUES FROM (%L) TO (%L)',
                           part_name, parent_name, week_start, week_start + interval '1 week');
            EXECUTE format('INSERT INTO %s SELECT * FROM qantara_moving', parent_name);
            DROP TABLE qantara_moving;
            created := created + 1;
        END IF;
        week_start := week_start + interval '1 week';
    END LOOP;
    RETURN created;
END;
$$;
