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

-- When each account was made. Rows that predate this column (the original's, or ours before
-- sessions) get the moment it was added: now() is stable, so PostgreSQL stores it once as the
-- column's default for every existing row, without rewriting the table.
ALTER TABLE users ADD COLUMN IF NOT EXISTS created_at timestamptz NOT NULL DEFAULT now();

-- Sessions (API.md /auth/refresh): a login starts one; its tokens carry its id as `sid`.
-- `refresh_jti` is the one refresh token of the session that still works: a refresh replaces
-- it in one UPDATE guarded by the old value, so of two simultaneous refreshes exactly one wins.
-- `expires_at` follows the current refresh token's `exp`. An ended session keeps its row (with
-- why) for a day, so that its tokens are told apart from unknown ones; the sweep then deletes it.
CREATE TABLE IF NOT EXISTS sessions (
  id text PRIMARY KEY,
  user_id integer NOT NULL REFERENCES users (id) ON DELETE CASCADE,
  refresh_jti text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  refreshed_at timestamptz,
  expires_at timestamptz NOT NULL,
  ended_at timestamptz,
  end_reason text
);
CREATE INDEX IF NOT EXISTS sessions_user_id_idx ON sessions (user_id) WHERE ended_at IS NULL;
CREATE INDEX IF NOT EXISTS sessions_expires_at_idx ON sessions (expires_at);
CREATE INDEX IF NOT EXISTS sessions_ended_at_idx ON sessions (ended_at) WHERE ended_at IS NOT NULL;

-- Every replica keeps the sessions it has seen live in memory; this NOTIFY is how it hears
-- that one ended, whoever ended it (a replica, the CLI, plain SQL, a user's cascade delete).
-- Rows deleted after they ended or expired were announced already or need no word (every
-- replica checks `expires_at` itself), so the sweep sends nothing.
-- A TRUNCATE sends '' (no session id is empty): every session.
CREATE OR REPLACE FUNCTION dataproc_session_ended() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    PERFORM pg_notify('dataproc_sessions', '');
    RETURN NULL;
  END IF;
  IF TG_OP = 'DELETE' THEN
    IF OLD.ended_at IS NULL AND OLD.expires_at > now() THEN
      PERFORM pg_notify('dataproc_sessions', OLD.id);
    END IF;
    RETURN OLD;
  END IF;
  IF NEW.ended_at IS NOT NULL AND OLD.ended_at IS NULL THEN
    PERFORM pg_notify('dataproc_sessions', NEW.id);
  END IF;
  RETURN NEW;
END $$;
CREATE OR REPLACE TRIGGER dataproc_sessions_ended AFTER UPDATE OF ended_at OR DELETE ON sessions
  FOR EACH ROW EXECUTE FUNCTION dataproc_session_ended();
CREATE OR REPLACE TRIGGER dataproc_sessions_truncated AFTER TRUNCATE ON sessions
  FOR EACH STATEMENT EXECUTE FUNCTION dataproc_session_ended();
