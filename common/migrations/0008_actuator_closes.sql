-- Durable "close this relay at T" follow-ups. The firmware's set_relay reads only `state` (it
-- ignores duration_ms), so a valve opened for a duration stays open until a set_relay
-- {state:false} reaches it. The service that opened it (`owner`) writes the close in the same
-- step as the open and executes it when due, on its tick and after a restart.
CREATE TABLE IF NOT EXISTS actuator_closes (
  id bigserial PRIMARY KEY,
  owner varchar(32) NOT NULL,                                 -- scheduler | automation | bridge
  zone_id bigint NOT NULL REFERENCES zones(id) ON DELETE CASCADE,
  node_uid varchar(64) NOT NULL,
  channel varchar(255) NOT NULL,
  close_at timestamp(3) without time zone NOT NULL,
  reason varchar(64),                                          -- irrigation, water_change:drain, …
  opened_cmd_id varchar(255),                                  -- the set_relay {state:true} it ends
  cmd_id varchar(255) NOT NULL,                                -- the closing command's id (kept across retries)
  attempts integer NOT NULL DEFAULT 0,
  retry_at timestamp(3) without time zone,                     -- taken and not finished: due again then
  done_at timestamp(3) without time zone,
  error text,
  created_at timestamp(0) without time zone NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX IF NOT EXISTS actuator_closes_due_idx ON actuator_closes(owner, close_at) WHERE done_at IS NULL;
-- recent closes are checked against their command's answer (a refused / unanswered close is resent)
CREATE INDEX IF NOT EXISTS actuator_closes_done_idx ON actuator_closes(owner, done_at) WHERE error IS NULL;

-- mqtt-bridge fill / drain / flow-calibration routines: a running routine survives the bridge
-- that ran it, so a restarted bridge stops its actuator and records it as interrupted.
CREATE TABLE IF NOT EXISTS bridge_routines (
  id varchar(64) PRIMARY KEY,                                  -- the task id
  kind varchar(32) NOT NULL,                                   -- fill | drain | calibrate_flow
  zone_id bigint NOT NULL REFERENCES zones(id) ON DELETE CASCADE,
  gh_uid varchar(128) NOT NULL,
  node_uid varchar(64),
  channel varchar(255),
  state varchar(32) NOT NULL DEFAULT 'running',                -- running | succeeded | failed | cancelled | interrupted
  instance varchar(255) NOT NULL,                              -- the bridge running it
  request jsonb,
  result jsonb,
  started_at timestamp(3) without time zone NOT NULL,
  alive_at timestamp(3) without time zone NOT NULL,            -- refreshed while it runs
  finished_at timestamp(3) without time zone
);
-- One running routine per zone, across bridge replicas.
CREATE UNIQUE INDEX IF NOT EXISTS bridge_routines_one_running_idx ON bridge_routines(zone_id) WHERE state = 'running';
