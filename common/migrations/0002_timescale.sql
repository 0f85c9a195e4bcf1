-- telemetry_samples becomes a TimescaleDB hypertable where the extension can be loaded
-- (the compose files use a TimescaleDB image); a plain PostgreSQL keeps the plain table.
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
    BEGIN
      CREATE EXTENSION IF NOT EXISTS timescaledb;
      PERFORM create_hypertable('telemetry_samples', 'ts', chunk_time_interval => interval '1 day',
                                if_not_exists => true, migrate_data => true);
    EXCEPTION WHEN OTHERS THEN
      RAISE NOTICE 'timescaledb not enabled: %', SQLERRM;
    END;
  END IF;
END $$;
