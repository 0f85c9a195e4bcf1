-- NodeConfig versions and delivery state (contract §5.1 versioning, §5.5 delivery).
-- nodes.config keeps only `version` and `config_hash` from us; everything else lives here.

-- Every config version ever stored for a node; a version is never rewritten.
CREATE TABLE IF NOT EXISTS node_config_versions (
  id bigserial PRIMARY KEY,
  node_id bigint NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
  version integer NOT NULL,
  config_hash varchar(64) NOT NULL,
  config jsonb NOT NULL,
  source varchar(32),
  created_at timestamp(0) without time zone NOT NULL DEFAULT now(),
  UNIQUE (node_id, version)
);

-- One row per node: what was published, what the node applied, the last errors.
CREATE TABLE IF NOT EXISTS node_config_delivery (
  node_id bigint PRIMARY KEY REFERENCES nodes(id) ON DELETE CASCADE,
  published_version integer,
  published_at timestamp(0) without time zone,
  published_topic varchar(255),
  publish_error text,
  publish_error_at timestamp(0) without time zone,
  applied_version integer,
  applied_at timestamp(0) without time zone,
  node_error text,
  node_error_version integer,
  node_error_at timestamp(0) without time zone,
  temp_pending boolean NOT NULL DEFAULT false,  -- retained copies on the gh-temp topics not yet cleared
  updated_at timestamp(0) without time zone
);

-- What the node announced in its node_hello (contract §3.5); informational.
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS capabilities jsonb;
