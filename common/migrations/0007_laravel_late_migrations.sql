-- What Laravel's `2025_01_27_*` migrations intended and, because they sort before the tables they
-- alter (contract §6 caveat), never did on a fresh Laravel install; 0001 already adds the `zones`
-- columns of 2025_01_27_000004. Every step keeps existing rows and is a no-op where the shape is
-- already right (a database 0001 created, or a Laravel that got it right).

-- telemetry_last: one row per (zone, node, metric), -1 standing for an unknown node
-- (2025_01_27_000001). Laravel's key (zone_id, metric_type) is stricter, so its rows stay unique.
DO $$
DECLARE
  pk_name text;
  pk_cols text[];
BEGIN
  SELECT c.conname, array_agg(a.attname::text ORDER BY a.attname)
    INTO pk_name, pk_cols
    FROM pg_constraint c
    JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
   WHERE c.conrelid = 'telemetry_last'::regclass AND c.contype = 'p'
   GROUP BY c.conname;
  IF pk_cols IS DISTINCT FROM ARRAY['metric_type', 'node_id', 'zone_id'] THEN
    UPDATE telemetry_last SET node_id = -1 WHERE node_id IS NULL;
    ALTER TABLE telemetry_last ALTER COLUMN node_id SET DEFAULT -1, ALTER COLUMN node_id SET NOT NULL;
    IF pk_name IS NOT NULL THEN
      EXECUTE format('ALTER TABLE telemetry_last DROP CONSTRAINT %I', pk_name);
    END IF;
    ALTER TABLE telemetry_last ADD CONSTRAINT telemetry_last_pk PRIMARY KEY (zone_id, node_id, metric_type);
  END IF;
END $$;

-- The indexes of 2025_01_27_000006 that neither Laravel's later files nor 0001 create.
CREATE INDEX IF NOT EXISTS commands_created_at_idx ON commands(created_at);
CREATE INDEX IF NOT EXISTS alerts_created_at_idx ON alerts(created_at);
CREATE INDEX IF NOT EXISTS alerts_resolved_at_idx ON alerts(resolved_at);
CREATE INDEX IF NOT EXISTS alerts_zone_code_status_idx ON alerts(zone_id, code, status);
CREATE INDEX IF NOT EXISTS zone_events_created_at_idx ON zone_events(created_at);
