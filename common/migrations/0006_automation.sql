-- automation-engine: which engine processes which zone (two replicas never act on one zone at once),
-- and the index the engine's per-cycle read of recent commands uses.
CREATE TABLE IF NOT EXISTS automation_zone_runs (
  zone_id bigint PRIMARY KEY,
  owner varchar(128) NOT NULL,
  held_until timestamp(3) without time zone,
  last_run_at timestamp(3) without time zone NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_zone_created_idx ON commands(zone_id, created_at);
