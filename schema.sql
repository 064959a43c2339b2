-- dataproc schema: the original service's tables, plus what the contract needs.
--
-- Idempotent: applies cleanly to an empty database, to one it already set up, and to one made
-- by the original service's init.sql (its rows stay readable). Every column added to an
-- original table has a default or allows NULL, so the original service could keep writing.
-- `dataproc init-db` and every service start run this whole file in one transaction, under
-- an advisory lock so that replicas starting together take turns.

SELECT pg_advisory_xact_lock(7261657271);  -- 'dataproc' schema lock, any constant will do

-- The original's tables, exactly as its init.sql made them.
CREATE TABLE IF NOT EXISTS users (
  id serial PRIMARY KEY,
  username varchar NOT NULL UNIQUE,
  hashed_password varchar NOT NULL,
  role varchar NOT NULL DEFAULT 'user'
);

CREATE TABLE IF NOT EXISTS data_points (
  id serial PRIMARY KEY,
  time timestamptz NOT NULL,
  value double precision NOT NULL,
  valid boolean NOT NULL,
  tags varchar[]
);

-- Roles are 'user' or 'admin'. NOT VALID: enforced for new and updated rows without
-- failing on whatever an old database holds.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'users_role_check') THEN
    ALTER TABLE users ADD CONSTRAINT users_role_check CHECK (role IN ('user', 'admin')) NOT VALID;
  END IF;
END $$;

-- The upstream document each point came from, verbatim, and its identity (sha256 of its
-- canonical JSON): the same document fetched twice is stored once. NULL for rows written by
-- the original service (NULLs never collide in a unique index).
ALTER TABLE data_points ADD COLUMN IF NOT EXISTS source_document text;
ALTER TABLE data_points ADD COLUMN IF NOT EXISTS document_sha256 bytea;
ALTER TABLE data_points ADD COLUMN IF NOT EXISTS ingested_at timestamptz NOT NULL DEFAULT now();
CREATE UNIQUE INDEX IF NOT EXISTS data_points_document_sha256_key ON data_points (document_sha256);

-- Reads are ordered by (time, id) and filtered by time ranges; users read valid rows only.
CREATE INDEX IF NOT EXISTS data_points_time_id_idx ON data_points (time, id);
CREATE INDEX IF NOT EXISTS data_points_valid_time_id_idx ON data_points (time, id) WHERE valid;

-- Upstream answers that were not valid documents: kept verbatim with the reason.
CREATE TABLE IF NOT EXISTS rejects (
  id bigserial PRIMARY KEY,
  received_at timestamptz NOT NULL DEFAULT now(),
  reason text NOT NULL,
  body bytea NOT NULL
);

-- One-time steps this schema has taken on this database, so re-applying never repeats them.
CREATE TABLE IF NOT EXISTS dataproc_state (
  key text PRIMARY KEY,
  done_at timestamptz NOT NULL DEFAULT now()
);

-- The original's default admin (password 'admin'), seeded once per database and only when it
-- has no admin yet (the original's init.sql made one already): an operator who later deletes
-- or renames it does not get it back. The service warns while the password is unchanged.
WITH first_time AS (
  INSERT INTO dataproc_state (key) VALUES ('default_admin') ON CONFLICT DO NOTHING RETURNING key)
INSERT INTO users (id, username, hashed_password, role)
SELECT 0, 'admin', '$2b$12$a/pMatsPyWuHa5KdqatsFOLZgPYjPZU4If4//jeretXqZ.ujoYFJG', 'admin'
WHERE EXISTS (SELECT 1 FROM first_time) AND NOT EXISTS (SELECT 1 FROM users WHERE role = 'admin')
ON CONFLICT DO NOTHING;
