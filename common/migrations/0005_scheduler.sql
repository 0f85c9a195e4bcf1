-- Scheduler: one row per firing of a schedule item. The unique key (zone, item, scheduled local
-- time) is claimed with INSERT … ON CONFLICT DO NOTHING before anything is published, so a
-- restart, a re-run of a tick or a second replica never fires the same time twice.

CREATE TABLE IF NOT EXISTS scheduler_runs (
  id bigserial PRIMARY KEY,
  zone_id bigint NOT NULL REFERENCES zones(id) ON DELETE CASCADE,
  kind varchar(32) NOT NULL,                                  -- irrigation | lighting | water_change
  item varchar(64) NOT NULL,                                  -- irrigation@08:00, lighting:on, water_change
  scheduled_local timestamp(0) without time zone NOT NULL,   -- wall time in the greenhouse timezone
  scheduled_at timestamp(0) without time zone NOT NULL,      -- the same instant in UTC
  status varchar(32) NOT NULL DEFAULT 'running',             -- running | completed | failed | missed
  details jsonb,
  followup_kind varchar(32),                                  -- dry_run_check | finish (durable follow-up)
  followup_at timestamp(3) without time zone,
  started_at timestamp(3) without time zone,
  finished_at timestamp(3) without time zone,
  created_at timestamp(0) without time zone NOT NULL DEFAULT CURRENT_TIMESTAMP,
  updated_at timestamp(0) without time zone NOT NULL DEFAULT CURRENT_TIMESTAMP,
  CONSTRAINT scheduler_runs_firing_key UNIQUE (zone_id, item, scheduled_local)
);
CREATE INDEX IF NOT EXISTS scheduler_runs_followup_idx ON scheduler_runs(followup_at) WHERE followup_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS scheduler_runs_zone_kind_idx ON scheduler_runs(zone_id, kind, scheduled_at DESC);

-- The commands a run issued: their status (sent / ack / failed / timeout) is the commands row's.
CREATE TABLE IF NOT EXISTS scheduler_run_commands (
  run_id bigint NOT NULL REFERENCES scheduler_runs(id) ON DELETE CASCADE,
  cmd_id varchar(255) NOT NULL,
  node_uid varchar(64),
  channel varchar(255),
  cmd varchar(255),
  PRIMARY KEY (run_id, cmd_id)
);
CREATE INDEX IF NOT EXISTS scheduler_run_commands_cmd_idx ON scheduler_run_commands(cmd_id);

CREATE OR REPLACE VIEW scheduler_run_command_status AS
SELECT rc.run_id, r.zone_id, r.kind, r.item, r.scheduled_local, rc.cmd_id, rc.node_uid, rc.channel, rc.cmd,
       coalesce(c.status, 'unsent') AS status, c.sent_at, c.ack_at, c.failed_at, c.error_code
  FROM scheduler_run_commands rc
  JOIN scheduler_runs r ON r.id = rc.run_id
  LEFT JOIN commands c ON c.cmd_id = rc.cmd_id;

-- Water-change cycle (contract §8.6): the current step of each zone's cycle and when it began;
-- zones.water_state carries the state itself.
CREATE TABLE IF NOT EXISTS scheduler_water_cycles (
  zone_id bigint PRIMARY KEY REFERENCES zones(id) ON DELETE CASCADE,
  run_id bigint REFERENCES scheduler_runs(id) ON DELETE SET NULL,
  state varchar(64) NOT NULL,
  state_since timestamp(3) without time zone NOT NULL,
  cycle_started_at timestamp(3) without time zone,
  details jsonb,
  updated_at timestamp(0) without time zone NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- When the schedulers last completed a tick: after a restart, the due times of the downtime beyond
-- the catch-up window are recorded as `missed` instead of silently skipped.
CREATE TABLE IF NOT EXISTS scheduler_ticks (
  name varchar(64) PRIMARY KEY,
  last_tick_at timestamp(3) without time zone NOT NULL,
  updated_at timestamp(0) without time zone NOT NULL DEFAULT CURRENT_TIMESTAMP
);
