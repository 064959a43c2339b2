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

-- Freshness (the read cache and the sessions of every replica): triggers NOTIFY each change,
-- so no writer — a replica, the CLI, plain SQL, a COPY — can forget to; PostgreSQL delivers a
-- NOTIFY at commit, so a listener hears of a change only once it is visible.
--
-- The data version: one row, bumped once per statement that changed data_points, in that
-- statement's transaction (the row lock orders the bumps as the commits are ordered). It never
-- goes back, even if this table is dropped and made again: it is at least the time in ms, so a
-- tag a client kept from before cannot match a new state by accident.
CREATE TABLE IF NOT EXISTS dataproc_data_version (
  name text PRIMARY KEY,
  version bigint NOT NULL
);
INSERT INTO dataproc_data_version (name, version)
VALUES ('data_points', (extract(epoch FROM clock_timestamp()) * 1000)::bigint)
ON CONFLICT DO NOTHING;

CREATE OR REPLACE FUNCTION dataproc_bump_data_version() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  changed boolean := true;
  new_version bigint;
BEGIN
  -- A statement that changed no row (an INSERT whose documents were all duplicates) leaves
  -- every cached answer valid: no bump.
  IF TG_OP = 'INSERT' THEN
    changed := EXISTS (SELECT FROM new_rows);
  ELSIF TG_OP IN ('UPDATE', 'DELETE') THEN
    changed := EXISTS (SELECT FROM old_rows);
  END IF;
  IF changed THEN
    UPDATE dataproc_data_version
    SET version = greatest(version + 1, (extract(epoch FROM clock_timestamp()) * 1000)::bigint)
    WHERE name = 'data_points'
    RETURNING version INTO new_version;
    PERFORM pg_notify('dataproc_points', new_version::text);
  END IF;
  RETURN NULL;
END $$;

-- Transition tables allow one event per trigger: one trigger each.
CREATE OR REPLACE TRIGGER dataproc_points_inserted AFTER INSERT ON data_points
  REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION dataproc_bump_data_version();
CREATE OR REPLACE TRIGGER dataproc_points_updated AFTER UPDATE ON data_points
  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION dataproc_bump_data_version();
CREATE OR REPLACE TRIGGER dataproc_points_deleted AFTER DELETE ON data_points
  REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION dataproc_bump_data_version();
CREATE OR REPLACE TRIGGER dataproc_points_truncated AFTER TRUNCATE ON data_points
  FOR EACH STATEMENT EXECUTE FUNCTION dataproc_bump_data_version();

-- A user's row changed (role, password, name) or went: its username on dataproc_users, so
-- every replica drops what it knows of that user's role. A TRUNCATE sends '' (no username
-- can be empty): everyone.
CREATE OR REPLACE FUNCTION dataproc_notify_user() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    PERFORM pg_notify('dataproc_users', '');
    RETURN NULL;
  END IF;
  PERFORM pg_notify('dataproc_users', OLD.username);
  IF TG_OP = 'UPDATE' AND NEW.username IS DISTINCT FROM OLD.username THEN
    PERFORM pg_notify('dataproc_users', NEW.username);
  END IF;
  RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER dataproc_users_changed AFTER UPDATE OR DELETE ON users
  FOR EACH ROW EXECUTE FUNCTION dataproc_notify_user();
CREATE OR REPLACE TRIGGER dataproc_users_truncated AFTER TRUNCATE ON users
  FOR EACH STATEMENT EXECUTE FUNCTION dataproc_notify_user();
