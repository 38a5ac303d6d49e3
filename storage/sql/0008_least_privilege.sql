-- Least privilege (docs/operations.md, "Database roles"). The runtime role (`qantara_writer`)
-- owns nothing and may not run DDL, yet the gateway creates the weekly partitions of `vital` and
-- `waveform_segment` and moves rows out of their default partitions. That needs ownership of the
-- parent table, so partition upkeep becomes a SECURITY DEFINER function run with the rights of
-- its owner (the schema owner, `qantara_owner` once `qantara db roles` has run), confined to:
--   * the two time-series tables of this schema, nothing else (whatever `parent` is passed);
--   * a bounded time range (no flood of partitions);
--   * a fixed search_path: this schema, then pg_temp last, so that no temporary object of the
--     caller can stand in for one of ours.
-- Nobody but the roles granted EXECUTE may call it (storage/sql/privileges.sql grants the
-- writer); the same goes for the DICOM index function, which runs with the caller's rights.

CREATE OR REPLACE FUNCTION qantara_ensure_partitions(parent regclass, from_ts timestamptz, to_ts timestamptz)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    week_start   timestamptz := date_trunc('week', from_ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    part_name    text;
    created      integer := 0;
    parent_name  text;
    default_name text;
    time_col     text;
BEGIN
    IF parent NOT IN ('vital'::regclass, 'waveform_segment'::regclass) THEN
        RAISE EXCEPTION 'qantara_ensure_partitions: % is not a time-series table of Qantara', parent
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF to_ts - from_ts > interval '3660 days' THEN
        RAISE EXCEPTION 'qantara_ensure_partitions: range of more than ten years refused'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = parent) THEN
        RETURN 0;   -- a hypertable (TimescaleDB) manages its own chunks
    END IF;
    SELECT c.relname INTO parent_name FROM pg_class c WHERE c.oid = parent;
    default_name := parent_name || '_default';
    SELECT a.attname INTO time_col
      FROM pg_partitioned_table p JOIN pg_attribute a
        ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]
     WHERE p.partrelid = parent;
    WHILE week_start < to_ts LOOP
        part_name := parent_name || '_' || to_char(week_start AT TIME ZONE 'UTC', 'IYYY"w"IW');
        IF to_regclass(quote_ident(part_name)) IS NULL THEN
            -- Rows already sitting in the default partition for this week move into the new one.
            EXECUTE format('CREATE TEMP TABLE qantara_moving ON COMMIT DROP AS '
                           'SELECT * FROM %I WHERE %I >= %L AND %I < %L',
                           default_name, time_col, week_start, time_col, week_start + interval '1 week');
            EXECUTE format('DELETE FROM %I WHERE %I >= %L AND %I < %L',
                           default_name, time_col, week_start, time_col, week_start + interval '1 week');
            EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                           part_name, parent_name, week_start, week_start + interval '1 week');
            EXECUTE format('INSERT INTO %I SELECT * FROM pg_temp.qantara_moving', parent_name);
            DROP TABLE pg_temp.qantara_moving;
            created := created + 1;
        END IF;
        week_start := week_start + interval '1 week';
    END LOOP;
    RETURN created;
END;
$$;

-- The schema the migrations run in (public, unless the database's search_path says otherwise),
-- then pg_temp, searched last.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION qantara_ensure_partitions(regclass, timestamptz, timestamptz) '
                   'SET search_path = %I, pg_temp', current_schema());
END
$$;

REVOKE EXECUTE ON FUNCTION qantara_ensure_partitions(regclass, timestamptz, timestamptz) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION dicom_index_instances(jsonb) FROM PUBLIC;
