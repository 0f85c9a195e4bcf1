-- Core schema of contract.md §6. Every statement only creates what is missing, so this also
-- runs against a database whose tables Laravel already created. Timestamps hold UTC.

CREATE TABLE IF NOT EXISTS greenhouses (
  id bigserial PRIMARY KEY,
  uid varchar(64) NOT NULL UNIQUE,
  name varchar(255) NOT NULL,
  timezone varchar(255),
  type varchar(255),
  coordinates jsonb,
  description text,
  created_at timestamp(0) without time zone,
  updated_at timestamp(0) without time zone
);

CREATE TABLE IF NOT EXISTS zones (
  id bigserial PRIMARY KEY,
  greenhouse_id bigint REFERENCES greenhouses(id) ON DELETE CASCADE,
  preset_id bigint,
  name varchar(255) NOT NULL,
  description text,
  hardware_profile jsonb,
  capabilities jsonb,
  status varchar(255) NOT NULL DEFAULT 'offline',
  created_at timestamp(0) without time zone,
  updated_at timestamp(0) without time zone
);
-- Columns the Laravel migration-order caveat (contract §6) can leave out.
ALTER TABLE zones ADD COLUMN IF NOT EXISTS health_score numeric(5,2);
ALTER TABLE zones ADD COLUMN IF NOT EXISTS health_status varchar(16);
ALTER TABLE zones ADD COLUMN IF NOT EXISTS water_state varchar(255) NOT NULL DEFAULT 'NORMAL_RECIRC';
ALTER TABLE zones ADD COLUMN IF NOT EXISTS solution_started_at timestamp(0) without time zone;
ALTER TABLE zones ADD COLUMN IF NOT EXISTS settings jsonb;
CREATE INDEX IF NOT EXISTS zones_status_idx ON zones(status);

CREATE TABLE IF NOT EXISTS nodes (
  id bigserial PRIMARY KEY,
  zone_id bigint REFERENCES zones(id) ON DELETE SET NULL,
  uid varchar(64) NOT NULL UNIQUE,
  hardware_id varchar(128) UNIQUE,
  name varchar(255),
  type varchar(255),
  fw_version varchar(255),
  hardware_revision varchar(64),
  last_seen_at timestamp(0) without time zone,
  first_seen_at timestamp(0) without time zone,
  last_heartbeat_at timestamp(0) without time zone,
  status varchar(255) NOT NULL DEFAULT 'offline',
  lifecycle_state varchar(32) NOT NULL DEFAULT 'UNPROVISIONED',
  validated boolean NOT NULL DEFAULT false,
  uptime_seconds integer,
  free_heap_bytes integer,
  rssi integer,
  config jsonb,
  created_at timestamp(0) without time zone,
  updated_at timestamp(0) without time zone
);
CREATE INDEX IF NOT EXISTS nodes_status_idx ON nodes(status);
CREATE INDEX IF NOT EXISTS nodes_lifecycle_state_idx ON nodes(lifecycle_state);
CREATE INDEX IF NOT EXISTS nodes_zone_id_idx ON nodes(zone_id);

CREATE TABLE IF NOT EXISTS node_channels (
  id bigserial PRIMARY KEY,
  node_id bigint NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
  channel varchar(255) NOT NULL,
  type varchar(255),
  metric varchar(255),
  unit varchar(255),
  config jsonb,
  created_at timestamp(0) without time zone,
  updated_at timestamp(0) without time zone,
  UNIQUE (node_id, channel)
);

-- ts keeps milliseconds (contract §6 allows timestamp(3)): ordering of late samples depends on it.
CREATE TABLE IF NOT EXISTS telemetry_samples (
  id bigserial,
  zone_id bigint REFERENCES zones(id) ON DELETE SET NULL,
  node_id bigint REFERENCES nodes(id) ON DELETE SET NULL,
  channel varchar(255),
  metric_type varchar(255) NOT NULL,
  value double precision,
  raw jsonb,
  ts timestamp(3) without time zone NOT NULL,
  created_at timestamp(0) without time zone NOT NULL DEFAULT CURRENT_TIMESTAMP,
  PRIMARY KEY (id, ts)
);
CREATE INDEX IF NOT EXISTS telemetry_samples_ts_idx ON telemetry_samples(ts);
CREATE INDEX IF NOT EXISTS telemetry_samples_zone_metric_ts_idx ON telemetry_samples(zone_id, metric_type, ts);
CREATE INDEX IF NOT EXISTS telemetry_samples_node_ts_idx ON telemetry_samples(node_id, ts DESC);
CREATE INDEX IF NOT EXISTS telemetry_samples_metric_ts_idx ON telemetry_samples(metric_type, ts DESC);
CREATE INDEX IF NOT EXISTS telemetry_samples_node_channel_ts_idx ON telemetry_samples(node_id, channel, ts DESC)
  WHERE node_id IS NOT NULL AND channel IS NOT NULL;
CREATE INDEX IF NOT EXISTS telemetry_samples_created_at_idx ON telemetry_samples(created_at);

CREATE TABLE IF NOT EXISTS telemetry_last (
  zone_id bigint NOT NULL,
  node_id bigint NOT NULL DEFAULT -1,
  metric_type varchar(255) NOT NULL,
  channel varchar(255),
  value double precision,
  updated_at timestamp(3) without time zone,
  CONSTRAINT telemetry_last_pk PRIMARY KEY (zone_id, node_id, metric_type)
);

CREATE TABLE IF NOT EXISTS recipes (
  id bigserial PRIMARY KEY,
  name varchar(255) NOT NULL,
  description text,
  created_at timestamp(0) without time zone,
  updated_at timestamp(0) without time zone
);

CREATE TABLE IF NOT EXISTS recipe_phases (
  id bigserial PRIMARY KEY,
  recipe_id bigint NOT NULL REFERENCES recipes(id) ON DELETE CASCADE,
  phase_index integer NOT NULL,
  name varchar(255) NOT NULL,
  duration_hours integer,
  targets jsonb,
  created_at timestamp(0) without time zone,
  updated_at timestamp(0) without time zone
);
CREATE INDEX IF NOT EXISTS recipe_phases_recipe_idx ON recipe_phases(recipe_id, phase_index);

CREATE TABLE IF NOT EXISTS zone_recipe_instances (
  id bigserial PRIMARY KEY,
  zone_id bigint NOT NULL REFERENCES zones(id) ON DELETE CASCADE,
  recipe_id bigint NOT NULL REFERENCES recipes(id) ON DELETE CASCADE,
  current_phase_index integer NOT NULL DEFAULT 0,
  started_at timestamp(0) without time zone,
  created_at timestamp(0) without time zone,
  updated_at timestamp(0) without time zone
);
CREATE INDEX IF NOT EXISTS zone_recipe_instances_zone_idx ON zone_recipe_instances(zone_id);

CREATE TABLE IF NOT EXISTS commands (
  id bigserial PRIMARY KEY,
  zone_id bigint REFERENCES zones(id) ON DELETE SET NULL,
  node_id bigint REFERENCES nodes(id) ON DELETE SET NULL,
  channel varchar(255),
  cmd varchar(255) NOT NULL,
  params jsonb,
  status varchar(255) NOT NULL DEFAULT 'pending',
  cmd_id varchar(255) NOT NULL UNIQUE,
  created_at timestamp(0) without time zone,
  updated_at timestamp(0) without time zone,
  sent_at timestamp(0) without time zone,
  ack_at timestamp(0) without time zone,
  failed_at timestamp(0) without time zone
);
-- Ours: who issued the command and what the node answered (kept for the status endpoint).
ALTER TABLE commands ADD COLUMN IF NOT EXISTS source varchar(32);
ALTER TABLE commands ADD COLUMN IF NOT EXISTS error_code varchar(255);
ALTER TABLE commands ADD COLUMN IF NOT EXISTS error_message text;
ALTER TABLE commands ADD COLUMN IF NOT EXISTS response jsonb;
CREATE INDEX IF NOT EXISTS commands_status_idx ON commands(status);
CREATE INDEX IF NOT EXISTS commands_status_created_idx ON commands(status, created_at);
CREATE INDEX IF NOT EXISTS commands_zone_status_idx ON commands(zone_id, status);
CREATE INDEX IF NOT EXISTS commands_node_status_idx ON commands(node_id, status);
CREATE INDEX IF NOT EXISTS commands_sent_at_idx ON commands(sent_at);

CREATE TABLE IF NOT EXISTS alerts (
  id bigserial PRIMARY KEY,
  zone_id bigint REFERENCES zones(id) ON DELETE SET NULL,
  source varchar(255) NOT NULL DEFAULT 'biz',
  code varchar(255),
  type varchar(255) NOT NULL,
  details jsonb,
  status varchar(255) NOT NULL DEFAULT 'ACTIVE',
  created_at timestamp(0) without time zone NOT NULL DEFAULT CURRENT_TIMESTAMP,
  resolved_at timestamp(0) without time zone
);
CREATE INDEX IF NOT EXISTS alerts_zone_status_idx ON alerts(zone_id, status);
CREATE INDEX IF NOT EXISTS alerts_zone_type_status_idx ON alerts(zone_id, type, status);
CREATE INDEX IF NOT EXISTS alerts_type_idx ON alerts(type);
CREATE INDEX IF NOT EXISTS alerts_source_code_idx ON alerts(source, code);

CREATE TABLE IF NOT EXISTS zone_events (
  id bigserial PRIMARY KEY,
  zone_id bigint NOT NULL REFERENCES zones(id) ON DELETE CASCADE,
  type varchar(255) NOT NULL,
  details jsonb,
  created_at timestamp(0) without time zone NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX IF NOT EXISTS zone_events_zone_id_created_at_idx ON zone_events(zone_id, created_at);
CREATE INDEX IF NOT EXISTS zone_events_type_idx ON zone_events(type);
CREATE INDEX IF NOT EXISTS zone_events_zone_type_created_idx ON zone_events(zone_id, type, created_at);

CREATE TABLE IF NOT EXISTS ai_logs (
  id bigserial PRIMARY KEY,
  zone_id bigint REFERENCES zones(id) ON DELETE SET NULL,
  action varchar(255) NOT NULL,
  details jsonb,
  created_at timestamp(0) without time zone NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS scheduler_logs (
  id bigserial PRIMARY KEY,
  task_name varchar(255) NOT NULL,
  status varchar(255) NOT NULL,
  details jsonb,
  created_at timestamp(0) without time zone NOT NULL DEFAULT CURRENT_TIMESTAMP
);
