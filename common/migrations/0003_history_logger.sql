-- history-logger: stream entries already committed to PostgreSQL (exactly-once ingest).
-- A writer records its batch's Redis stream entry ids in the same transaction as the rows;
-- an entry redelivered after a crash between COMMIT and XACK is found here and skipped.
CREATE TABLE IF NOT EXISTS history_logger_ingested (
  stream varchar(255) NOT NULL,
  entry_ms bigint NOT NULL,
  entry_seq bigint NOT NULL,
  committed_at timestamp(0) without time zone NOT NULL DEFAULT now(),
  PRIMARY KEY (stream, entry_ms, entry_seq)
);
