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

-- The partitioned layout (DATAPROC_PARTITION=day|week|month, handed in by the service as the
-- transaction's setting `dataproc.partition`): made only when there is no data_points yet, so
-- the plain CREATE below is then a no-op. An existing plain table stays plain until
-- `dataproc migrate-partitions` converts it.
-- The partitioned table of points under the name `rel` (data_points, or data_points_new while
-- `migrate-partitions` copies into it): range-partitioned on time, the same columns, column
-- order and types as the plain table (ids from the same sequence, so a migration's copy keeps
-- them). Every time has a partition: besides the periods (data_points_d20261201, ...), "rest"
-- partitions (data_points_rest_min, data_points_rest_20261205, ...) cover the ranges between
-- and around them, down to MINVALUE and up to MAXVALUE, so a backfill never fails. They are
-- range partitions, not a DEFAULT one, because a DEFAULT partition stops PostgreSQL from
-- scanning the partitions in order: a page would open an index scan in every partition and
-- merge them (measured at 117 daily partitions: 15-45 ms a page, against ~1 ms without it).
CREATE OR REPLACE FUNCTION dataproc_create_partitioned(rel text) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
  CREATE SEQUENCE IF NOT EXISTS data_points_id_seq AS integer;
  EXECUTE format(
    'CREATE TABLE %I (
       id integer NOT NULL DEFAULT nextval(''data_points_id_seq''),
       time timestamptz NOT NULL,
       value double precision NOT NULL,
       valid boolean NOT NULL,
       tags varchar[],
       source_document text,
       document_sha256 bytea,
       ingested_at timestamptz NOT NULL DEFAULT now(),
       CONSTRAINT %I PRIMARY KEY (id, time),
       CONSTRAINT %I UNIQUE (document_sha256, time)
     ) PARTITION BY RANGE (time)',
    rel, rel || '_pkey', rel || '_document_sha256_time_key');
  EXECUTE format('CREATE TABLE data_points_rest_min PARTITION OF %I '
                 'FOR VALUES FROM (MINVALUE) TO (MAXVALUE)', rel);
  EXECUTE format('CREATE INDEX %I ON %I (time, id)', rel || '_time_id_idx', rel);
  EXECUTE format('CREATE INDEX %I ON %I (time, id) WHERE valid', rel || '_valid_time_id_idx', rel);
END $fn$;

-- The partitions of `parent`, each with its bounds as timestamps (NULL for MINVALUE and
-- MAXVALUE, and for a DEFAULT partition, which says so) and whether it is a rest partition.
-- The bounds are read back from PostgreSQL's own text of the
-- partition bound, cast in SQL, so the session's time zone cannot shift them.
CREATE OR REPLACE FUNCTION dataproc_partition_bounds(parent regclass)
RETURNS TABLE (part regclass, name text, lower timestamptz, upper timestamptz,
               is_rest boolean, is_default boolean)
LANGUAGE sql STABLE AS $fn$
  SELECT c.oid::regclass, c.relname::text,
    (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \(''([^'']+)''\)'))[1]::timestamptz,
    (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''([^'']+)''\)'))[1]::timestamptz,
    c.relname LIKE 'data\_points\_rest\_%',
    pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT'
  FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
  WHERE i.inhparent = parent
$fn$;

-- A bound as partition DDL takes it: the time quoted, or MINVALUE / MAXVALUE for NULL.
CREATE OR REPLACE FUNCTION dataproc_bound(at timestamptz, open_end text) RETURNS text
LANGUAGE sql IMMUTABLE AS $fn$ SELECT coalesce(quote_literal(at), open_end) $fn$;

-- The name of the rest partition that starts at `lower` (NULL: MINVALUE).
CREATE OR REPLACE FUNCTION dataproc_rest_name(lower timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE AS $fn$
  SELECT 'data_points_rest_' || coalesce(to_char(lower AT TIME ZONE 'UTC', 'YYYYMMDD'), 'min')
$fn$;

-- A new partition `name` of `parent` over [lower, upper), holding `source`'s rows of that range
-- (moved straight between the two tables, neither attached meanwhile: no trigger on
-- data_points fires, since no point changed).
CREATE OR REPLACE FUNCTION dataproc_carve(parent regclass, source regclass, name text,
                                          lower timestamptz, upper timestamptz)
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
  EXECUTE format('CREATE TABLE %I (LIKE %s INCLUDING DEFAULTS)', name, parent);
  EXECUTE format('INSERT INTO %I SELECT * FROM %s WHERE ($1 IS NULL OR time >= $1) '
                 'AND ($2 IS NULL OR time < $2)', name, source) USING lower, upper;
  EXECUTE format('DELETE FROM %s WHERE ($1 IS NULL OR time >= $1) AND ($2 IS NULL OR time < $2)',
                 source) USING lower, upper;
  EXECUTE format('ALTER TABLE %s ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)', parent, name,
                 dataproc_bound(lower, 'MINVALUE'), dataproc_bound(upper, 'MAXVALUE'));
END $fn$;

-- The partition of `parent` holding `at` (step 'day', 'week' (ISO, from Monday) or 'month',
-- in UTC), made when missing; its name when it was made, else NULL. It is carved out of the
-- rest partition that covers its range: that one is detached, gives up its points of the
-- period (and those after it, to a new rest partition, when the period lies inside it), and
-- is attached again over what is left. A rest partition is normally empty (the periods are
-- made ahead), so this takes milliseconds, under a lock on data_points.
CREATE OR REPLACE FUNCTION dataproc_ensure_partition(parent regclass, step text, at timestamptz)
RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
  low timestamptz := date_trunc(step, at, 'UTC');
  -- Whole days and months in UTC, whatever the session's time zone (its DST would move them).
  high timestamptz := ((low AT TIME ZONE 'UTC') + ('1 ' || step)::interval) AT TIME ZONE 'UTC';
  made text := 'data_points_' || left(step, 1)
    || to_char(low AT TIME ZONE 'UTC', CASE step WHEN 'month' THEN 'YYYYMM' ELSE 'YYYYMMDD' END);
  holder record;
BEGIN
  IF step NOT IN ('day', 'week', 'month') THEN
    RAISE EXCEPTION 'partition step must be day, week or month, not %', step;
  END IF;
  IF to_regclass(made) IS NOT NULL THEN
    RETURN NULL;
  END IF;
  SELECT * INTO holder FROM dataproc_partition_bounds(parent) b
  WHERE NOT b.is_default AND (b.lower IS NULL OR b.lower <= low)
    AND (b.upper IS NULL OR b.upper > low);
  IF holder.part IS NULL THEN  -- nothing covers it (an operator dropped a partition): fill it
    EXECUTE format('CREATE TABLE %I PARTITION OF %s FOR VALUES FROM (%L) TO (%L)',
                   made, parent, low, high);
    RETURN made;
  END IF;
  IF NOT holder.is_rest OR (holder.upper IS NOT NULL AND holder.upper < high) THEN
    RAISE EXCEPTION 'the % partition for % would overlap %: is DATAPROC_PARTITION the step '
      'this table was made with?', step, at, holder.name;
  END IF;
  EXECUTE format('ALTER TABLE %s DETACH PARTITION %s', parent, holder.part);
  PERFORM dataproc_carve(parent, holder.part, made, low, high);
  IF holder.lower IS NOT DISTINCT FROM low THEN  -- nothing of it is left before the period
    IF holder.upper IS NOT NULL AND holder.upper = high THEN
      EXECUTE format('DROP TABLE %s', holder.part);
      RETURN made;
    END IF;
    EXECUTE format('ALTER TABLE %s RENAME TO %I', holder.part, dataproc_rest_name(high));
    EXECUTE format('ALTER TABLE %s ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%s)', parent,
                   dataproc_rest_name(high), high, dataproc_bound(holder.upper, 'MAXVALUE'));
    RETURN made;
  END IF;
  IF holder.upper IS NULL OR holder.upper > high THEN
    PERFORM dataproc_carve(parent, holder.part, dataproc_rest_name(high), high, holder.upper);
  END IF;
  EXECUTE format('ALTER TABLE %s ATTACH PARTITION %s FOR VALUES FROM (%s) TO (%L)', parent,
                 holder.part, dataproc_bound(holder.lower, 'MINVALUE'), low);
  RETURN made;
END $fn$;

-- Rest partitions over every range no partition of `parent` covers: below the lowest (down to
-- MINVALUE), between two, above the highest (up to MAXVALUE). A gap just above the one that
-- starts at MINVALUE widens it instead (detached and attached again over both), so pruning
-- old periods again and again leaves one such floor, not a chain of empty ones. Retention calls
-- it after dropping partitions; the upgrade from a DEFAULT partition, once.
CREATE OR REPLACE FUNCTION dataproc_cover_gaps(parent regclass) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
  here record;
  seen boolean := false;
  previous_part regclass;  -- the partition before `here`, and its bounds
  previous_lower timestamptz;
  previous_upper timestamptz;
BEGIN
  FOR here IN SELECT * FROM dataproc_partition_bounds(parent) b WHERE NOT b.is_default
              ORDER BY b.lower NULLS FIRST LOOP
    IF NOT seen AND here.lower IS NOT NULL THEN
      EXECUTE format('CREATE TABLE %I PARTITION OF %s FOR VALUES FROM (MINVALUE) TO (%L)',
                     dataproc_rest_name(NULL), parent, here.lower);
    ELSIF seen AND previous_upper < here.lower THEN
      IF previous_lower IS NULL THEN
        EXECUTE format('ALTER TABLE %s DETACH PARTITION %s', parent, previous_part);
        EXECUTE format('ALTER TABLE %s ATTACH PARTITION %s FOR VALUES FROM (MINVALUE) TO (%L)',
                       parent, previous_part, here.lower);
      ELSE
        EXECUTE format('CREATE TABLE %I PARTITION OF %s FOR VALUES FROM (%L) TO (%L)',
                       dataproc_rest_name(previous_upper), parent, previous_upper, here.lower);
      END IF;
    END IF;
    seen := true;
    previous_part := here.part;
    previous_lower := here.lower;
    previous_upper := here.upper;
  END LOOP;
  IF NOT seen THEN
    EXECUTE format('CREATE TABLE %I PARTITION OF %s FOR VALUES FROM (MINVALUE) TO (MAXVALUE)',
                   dataproc_rest_name(NULL), parent);
  ELSIF previous_upper IS NOT NULL THEN
    EXECUTE format('CREATE TABLE %I PARTITION OF %s FOR VALUES FROM (%L) TO (MAXVALUE)',
                   dataproc_rest_name(previous_upper), parent, previous_upper);
  END IF;
END $fn$;

-- A partitioned data_points made by an earlier dataproc has a DEFAULT partition: it becomes
-- rest partitions (its points moved into them, straight, no trigger fired), once.
CREATE OR REPLACE FUNCTION dataproc_replace_default(parent regclass) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
  fallback regclass;
  rest record;
BEGIN
  SELECT part INTO fallback FROM dataproc_partition_bounds(parent) WHERE is_default;
  IF fallback IS NULL THEN
    RETURN;
  END IF;
  EXECUTE format('ALTER TABLE %s DETACH PARTITION %s', parent, fallback);
  PERFORM dataproc_cover_gaps(parent);
  FOR rest IN SELECT * FROM dataproc_partition_bounds(parent) WHERE is_rest LOOP
    EXECUTE format('INSERT INTO %s SELECT * FROM %s WHERE ($1 IS NULL OR time >= $1) '
                   'AND ($2 IS NULL OR time < $2)', rest.part, fallback)
      USING rest.lower, rest.upper;
  END LOOP;
  EXECUTE format('DROP TABLE %s', fallback);
END $fn$;

-- This period's partition and the next three, from `at` on (the service's upkeep job calls it
-- again every hour, under an advisory lock); the names it made.
CREATE OR REPLACE FUNCTION dataproc_partitions_ahead(parent regclass, step text, at timestamptz)
RETURNS SETOF text LANGUAGE sql AS $fn$
  SELECT made FROM generate_series(0, 3) n,
    LATERAL dataproc_ensure_partition(
      parent, step, ((at AT TIME ZONE 'UTC') + n * ('1 ' || step)::interval) AT TIME ZONE 'UTC') made
  WHERE made IS NOT NULL
$fn$;

DO $$
DECLARE
  step text := coalesce(nullif(current_setting('dataproc.partition', true), ''), 'none');
BEGIN
  IF step <> 'none' AND to_regclass('data_points') IS NULL THEN
    PERFORM dataproc_create_partitioned('data_points');
    ALTER SEQUENCE data_points_id_seq OWNED BY data_points.id;
    PERFORM dataproc_partitions_ahead('data_points', step, now());
  END IF;
  IF (SELECT relkind FROM pg_class WHERE oid = to_regclass('data_points')) = 'p' THEN
    PERFORM dataproc_replace_default('data_points');
  END IF;
END $$;
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

-- The dedupe key is (document_sha256, time), on both layouts: a partitioned table (and every
-- engine beyond one machine: TimescaleDB, Citus) requires the partition column in every unique
-- index, and no weaker key would do, since the hash covers the document's time (so the pair is
-- exactly as unique as the hash). INSERT ... ON CONFLICT names these two columns. A database of
-- an earlier dataproc has UNIQUE (document_sha256): the pair is made first, then the old one
-- goes. Checked by name rather than IF NOT EXISTS: TimescaleDB refuses a re-run of CREATE
-- UNIQUE INDEX IF NOT EXISTS on a hypertable before it looks at IF NOT EXISTS.
DO $$
BEGIN
  IF to_regclass('data_points_document_sha256_time_key') IS NULL THEN
    CREATE UNIQUE INDEX data_points_document_sha256_time_key
      ON data_points (document_sha256, time);
  END IF;
  IF to_regclass('data_points_document_sha256_key') IS NOT NULL THEN
    DROP INDEX data_points_document_sha256_key;
  END IF;
END $$;

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

-- Retention (`dataproc prune`) removes rejects by their age, in batches.
CREATE INDEX IF NOT EXISTS rejects_received_at_idx ON rejects (received_at);

-- After retention dropped a whole partition of points [lower, upper): no trigger fired, so
-- what follows data_points by trigger is told here (when that part of the schema exists):
-- the summary rollups of that range go, and the data version moves on (so cached answers and
-- ETags of every replica change). The range is whole days in UTC, so every rollup interval
-- (a minute or an hour) lies wholly inside or outside it.
CREATE OR REPLACE FUNCTION dataproc_points_dropped(lower timestamptz, upper timestamptz)
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
  IF to_regclass('data_rollups') IS NOT NULL THEN
    EXECUTE 'DELETE FROM data_rollups WHERE bucket_start >= $1 AND bucket_start < $2'
      USING lower, upper;
  END IF;
  IF to_regprocedure('dataproc_bump_data_version()') IS NOT NULL THEN
    EXECUTE $q$UPDATE dataproc_data_version
      SET version = greatest(version + 1, (extract(epoch FROM clock_timestamp()) * 1000)::bigint)
      WHERE name = 'data_points'$q$;
    PERFORM pg_notify('dataproc_points', (SELECT version::text FROM dataproc_data_version
                                           WHERE name = 'data_points'));
  END IF;
END $fn$;

-- One-time steps this schema has taken on this database, so re-applying never repeats them.
CREATE TABLE IF NOT EXISTS dataproc_state (
  key text PRIMARY KEY,
  done_at timestamptz NOT NULL DEFAULT now()
);

-- The original's default admin (password 'admin'), seeded once per database and only when it
-- has no admin yet (the original's init.sql made one already): an operator who later deletes
-- or renames it does not get it back. The service warns while the password is unchanged.
-- Two plain statements rather than one writable CTE (Citus refuses those in a schema): both
-- run in this one transaction, under the schema lock, so the pair is still done exactly once.
INSERT INTO users (id, username, hashed_password, role)
SELECT 0, 'admin', '$2b$12$a/pMatsPyWuHa5KdqatsFOLZgPYjPZU4If4//jeretXqZ.ujoYFJG', 'admin'
WHERE NOT EXISTS (SELECT 1 FROM dataproc_state WHERE key = 'default_admin')
  AND NOT EXISTS (SELECT 1 FROM users WHERE role = 'admin')
ON CONFLICT DO NOTHING;
INSERT INTO dataproc_state (key) VALUES ('default_admin') ON CONFLICT DO NOTHING;

-- Rollups: per-interval aggregates of data_points that make `/api/data/summary` cost follow
-- its buckets, not its points. Three widths: 60 s, 3600 s and 86400 s (whole UTC days) rows,
-- epoch-aligned (as date_bin with origin 1970-01-01). Each row holds, over all points and over valid points only (a user
-- sees valid points only): how many, how many are finite, and the sum, min and max of the
-- finite values (NULL when none). A row exists only while its interval holds a point.
--
-- Kept in the SAME transaction as every write, whatever the writer (the service, the CLI, the
-- original service, plain SQL, COPY): statement-level AFTER triggers with transition tables.
-- Inserts add their aggregated deltas (INSERT ... ON CONFLICT DO UPDATE: two writers into
-- one interval queue on its row and neither count is lost). An interval may have up to 8
-- rows (`shard`, from the writer's backend): concurrent writers of the current minute would
-- otherwise all queue on one row lock until their commits (measured: 8 writers, 2,200 -> 550
-- inserts/s); readers add the shards up. Deletes and updates that change
-- time, value or valid recompute the intervals they touched from the raw rows (exact, and
-- min/max cannot be un-done by subtraction). Every path takes row locks in one order
-- (minutes, then hours, then days, each by time), so two single-statement writers never
-- deadlock. TRUNCATE empties the rollups too.
CREATE TABLE IF NOT EXISTS data_rollups (
  width_s integer NOT NULL CONSTRAINT data_rollups_width_s_check CHECK (width_s IN (60, 3600, 86400)),
  bucket_start timestamptz NOT NULL,
  shard smallint NOT NULL DEFAULT 0,
  count bigint NOT NULL,
  valid bigint NOT NULL,
  finite_count bigint NOT NULL,
  sum double precision,
  min double precision,
  max double precision,
  valid_finite_count bigint NOT NULL,
  valid_sum double precision,
  valid_min double precision,
  valid_max double precision,
  PRIMARY KEY (width_s, bucket_start, shard)
);

-- Every day row made again from the hour rows (a database made before day rows existed, and
-- the end of `init-db`'s rebuild), with writers waiting meanwhile: each later statement then
-- sees them all, and a writer still to come adds its delta to the day rows made here.
CREATE OR REPLACE FUNCTION dataproc_rollups_days_from_hours() RETURNS void
LANGUAGE sql AS $fn$
  LOCK TABLE data_rollups IN EXCLUSIVE MODE;
  DELETE FROM data_rollups WHERE width_s = 86400;
  INSERT INTO data_rollups
  SELECT 86400, date_bin('86400 seconds', bucket_start, timestamptz '1970-01-01 00:00:00+00'),
         0, sum(count), sum(valid), sum(finite_count), sum(sum), min(min), max(max),
         sum(valid_finite_count), sum(valid_sum), min(valid_min), max(valid_max)
  FROM data_rollups WHERE width_s = 3600 GROUP BY 2 ORDER BY 2;
$fn$;

-- Day rows came after minutes and hours: a summary over years reads about 1,200 day rows, not
-- 28,000 hour rows (measured at 100M points over 3.2 years). A database made before them gets
-- them once (a writer still on the old trigger would add to its hour and not to its day, so
-- they are made under the lock above).
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM dataproc_state WHERE key = 'rollups_days') THEN
    LOCK TABLE data_rollups IN EXCLUSIVE MODE;
    ALTER TABLE data_rollups DROP CONSTRAINT IF EXISTS data_rollups_width_s_check;
    ALTER TABLE data_rollups ADD CONSTRAINT data_rollups_width_s_check
      CHECK (width_s IN (60, 3600, 86400));
    PERFORM dataproc_rollups_days_from_hours();
    INSERT INTO dataproc_state (key) VALUES ('rollups_days');
  END IF;
END $$;

-- Inserted rows: add each interval's aggregate to its row (minutes, then hours, then days),
-- in one statement.
CREATE OR REPLACE FUNCTION dataproc_rollups_after_insert() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
  INSERT INTO data_rollups AS r
  SELECT w.width, date_bin(make_interval(secs => w.width), time,
                           timestamptz '1970-01-01 00:00:00+00'),
         (pg_backend_pid() % 8)::smallint, count(*), count(*) FILTER (WHERE valid),
         count(*) FILTER (WHERE fin), sum(value) FILTER (WHERE fin),
         min(value) FILTER (WHERE fin), max(value) FILTER (WHERE fin),
         count(*) FILTER (WHERE fin AND valid), sum(value) FILTER (WHERE fin AND valid),
         min(value) FILTER (WHERE fin AND valid), max(value) FILTER (WHERE fin AND valid)
  FROM (SELECT time, value, valid, value NOT IN ('NaN', 'Infinity', '-Infinity') AS fin
        FROM new_rows WHERE isfinite(time)) n,
       (VALUES (60), (3600), (86400)) AS w(width)
  GROUP BY 1, 2 ORDER BY 1, 2
  ON CONFLICT (width_s, bucket_start, shard) DO UPDATE SET
    count = r.count + EXCLUDED.count, valid = r.valid + EXCLUDED.valid,
    finite_count = r.finite_count + EXCLUDED.finite_count,
    sum = coalesce(r.sum + EXCLUDED.sum, r.sum, EXCLUDED.sum),
    min = least(r.min, EXCLUDED.min), max = greatest(r.max, EXCLUDED.max),
    valid_finite_count = r.valid_finite_count + EXCLUDED.valid_finite_count,
    valid_sum = coalesce(r.valid_sum + EXCLUDED.valid_sum, r.valid_sum, EXCLUDED.valid_sum),
    valid_min = least(r.valid_min, EXCLUDED.valid_min),
    valid_max = greatest(r.valid_max, EXCLUDED.valid_max);
  RETURN NULL;
END $fn$;

-- The shard-0 rows of width `wide` at `starts` set to the sum of the rows of width `narrow`
-- inside them (hours from minutes, days from hours).
CREATE OR REPLACE FUNCTION dataproc_rollups_sum_up(narrow integer, wide integer,
                                                   starts timestamptz[]) RETURNS void
LANGUAGE sql AS $fn$
  UPDATE data_rollups r SET
    count = a.count, valid = a.valid, finite_count = a.finite_count, sum = a.sum,
    min = a.min, max = a.max, valid_finite_count = a.valid_finite_count,
    valid_sum = a.valid_sum, valid_min = a.valid_min, valid_max = a.valid_max
  FROM (SELECT w.b, coalesce(sum(n.count), 0) AS count, coalesce(sum(n.valid), 0) AS valid,
               coalesce(sum(n.finite_count), 0) AS finite_count, sum(n.sum) AS sum,
               min(n.min) AS min, max(n.max) AS max,
               coalesce(sum(n.valid_finite_count), 0) AS valid_finite_count,
               sum(n.valid_sum) AS valid_sum, min(n.valid_min) AS valid_min,
               max(n.valid_max) AS valid_max
        FROM unnest(starts) AS w(b)
        LEFT JOIN data_rollups n ON n.width_s = narrow AND n.bucket_start >= w.b
                                AND n.bucket_start < w.b + make_interval(secs => wide)
        GROUP BY w.b) a
  WHERE r.width_s = wide AND r.bucket_start = a.b AND r.shard = 0
$fn$;

-- Recompute the given minutes (and their hours and days) from the raw rows. First every row
-- (each shard) is made to exist and is locked, in the one order (minutes, then hours, then
-- days, by time); each later statement takes a fresh snapshot (READ COMMITTED), so it sees
-- every writer that held one of those locks before us, and a writer still to come adds its
-- own delta after our commit. The result goes to shard 0.
CREATE OR REPLACE FUNCTION dataproc_rollups_recompute(minutes timestamptz[]) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
  hours timestamptz[] := ARRAY(
    SELECT DISTINCT date_bin('3600 seconds', m, timestamptz '1970-01-01 00:00:00+00')
    FROM unnest(minutes) m ORDER BY 1);
  days timestamptz[] := ARRAY(
    SELECT DISTINCT date_bin('86400 seconds', m, timestamptz '1970-01-01 00:00:00+00')
    FROM unnest(minutes) m ORDER BY 1);
  run_start timestamptz;
  run_end timestamptz;
BEGIN
  minutes := ARRAY(SELECT DISTINCT m FROM unnest(minutes) m ORDER BY 1);
  -- An upsert that changes nothing locks each row, existing or new, one by one in this
  -- order (a separate INSERT ... DO NOTHING, then SELECT ... FOR UPDATE, would hold new hour
  -- rows while waiting for a minute row: a deadlock with an inserter).
  INSERT INTO data_rollups AS r
    (width_s, bucket_start, shard, count, valid, finite_count, valid_finite_count)
  SELECT w, b, s, 0, 0, 0, 0
  FROM (SELECT 60, m FROM unnest(minutes) m UNION ALL SELECT 3600, h FROM unnest(hours) h
        UNION ALL SELECT 86400, d FROM unnest(days) d) AS t(w, b), generate_series(0, 7) s
  ORDER BY w, b, s ON CONFLICT (width_s, bucket_start, shard) DO UPDATE SET count = r.count;
  DELETE FROM data_rollups
  WHERE shard <> 0 AND ((width_s = 60 AND bucket_start = ANY (minutes))
                     OR (width_s = 3600 AND bucket_start = ANY (hours))
                     OR (width_s = 86400 AND bucket_start = ANY (days)));
  -- Shard 0 of each minute zeroed, then what its points add up to now set, one run of
  -- consecutive minutes at a time, by EXECUTE: planned with the run's bounds, PostgreSQL
  -- estimates the points it reads and scans the index. (One statement joining every minute
  -- to its points was estimated at a ninth of the table per minute, and at 100M points it
  -- read the whole table through a materialized scan: minutes for a batch of 10,000 deletes.)
  UPDATE data_rollups SET count = 0, valid = 0, finite_count = 0, sum = NULL, min = NULL,
    max = NULL, valid_finite_count = 0, valid_sum = NULL, valid_min = NULL, valid_max = NULL
  WHERE width_s = 60 AND shard = 0 AND bucket_start = ANY (minutes);
  FOR run_start, run_end IN
    SELECT min(m), max(m) + interval '60 seconds'
    FROM (SELECT m, m - row_number() OVER (ORDER BY m) * interval '60 seconds' AS run
          FROM unnest(minutes) m) t
    GROUP BY run ORDER BY 1
  LOOP
    EXECUTE $q$
      UPDATE data_rollups r SET
        count = a.count, valid = a.valid, finite_count = a.finite_count, sum = a.sum,
        min = a.min, max = a.max, valid_finite_count = a.valid_finite_count,
        valid_sum = a.valid_sum, valid_min = a.valid_min, valid_max = a.valid_max
      FROM (SELECT date_bin('60 seconds', time, timestamptz '1970-01-01 00:00:00+00') AS b,
                   count(*) AS count, count(*) FILTER (WHERE valid) AS valid,
                   count(*) FILTER (WHERE fin) AS finite_count,
                   sum(value) FILTER (WHERE fin) AS sum, min(value) FILTER (WHERE fin) AS min,
                   max(value) FILTER (WHERE fin) AS max,
                   count(*) FILTER (WHERE fin AND valid) AS valid_finite_count,
                   sum(value) FILTER (WHERE fin AND valid) AS valid_sum,
                   min(value) FILTER (WHERE fin AND valid) AS valid_min,
                   max(value) FILTER (WHERE fin AND valid) AS valid_max
            FROM (SELECT time, value, valid, value NOT IN ('NaN', 'Infinity', '-Infinity') AS fin
                  FROM data_points WHERE time >= $1 AND time < $2) p
            GROUP BY 1) a
      WHERE r.width_s = 60 AND r.bucket_start = a.b AND r.shard = 0$q$
    USING run_start, run_end;
  END LOOP;
  PERFORM dataproc_rollups_sum_up(60, 3600, hours);
  PERFORM dataproc_rollups_sum_up(3600, 86400, days);
  DELETE FROM data_rollups
  WHERE count = 0 AND ((width_s = 60 AND bucket_start = ANY (minutes))
                    OR (width_s = 3600 AND bucket_start = ANY (hours))
                    OR (width_s = 86400 AND bucket_start = ANY (days)));
END $fn$;

CREATE OR REPLACE FUNCTION dataproc_rollups_after_delete() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
  PERFORM dataproc_rollups_recompute(ARRAY(
    SELECT DISTINCT date_bin('60 seconds', time, timestamptz '1970-01-01 00:00:00+00')
    FROM old_rows WHERE isfinite(time)));
  RETURN NULL;
END $fn$;

-- Only rows whose time, value or validity changed touch the rollups (a tags-only update
-- costs nothing); both the old and the new interval of a moved row are recomputed.
CREATE OR REPLACE FUNCTION dataproc_rollups_after_update() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
  PERFORM dataproc_rollups_recompute(ARRAY(
    SELECT DISTINCT date_bin('60 seconds', time, timestamptz '1970-01-01 00:00:00+00')
    FROM ((SELECT id, time, value, valid FROM old_rows
           EXCEPT ALL SELECT id, time, value, valid FROM new_rows)
          UNION ALL
          (SELECT id, time, value, valid FROM new_rows
           EXCEPT ALL SELECT id, time, value, valid FROM old_rows)) changed
    WHERE isfinite(time)));
  RETURN NULL;
END $fn$;

CREATE OR REPLACE FUNCTION dataproc_rollups_after_truncate() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
  TRUNCATE data_rollups;
  RETURN NULL;
END $fn$;

-- Created once (CREATE TRIGGER takes a lock that blocks writers; replacing the functions
-- above is enough to change what they do). PostgreSQL allows one event per trigger with
-- transition tables, hence four.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'data_points_rollups_insert'
                 AND tgrelid = 'data_points'::regclass) THEN
    CREATE TRIGGER data_points_rollups_insert AFTER INSERT ON data_points
      REFERENCING NEW TABLE AS new_rows
      FOR EACH STATEMENT EXECUTE FUNCTION dataproc_rollups_after_insert();
    CREATE TRIGGER data_points_rollups_delete AFTER DELETE ON data_points
      REFERENCING OLD TABLE AS old_rows
      FOR EACH STATEMENT EXECUTE FUNCTION dataproc_rollups_after_delete();
    CREATE TRIGGER data_points_rollups_update AFTER UPDATE ON data_points
      REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
      FOR EACH STATEMENT EXECUTE FUNCTION dataproc_rollups_after_update();
    CREATE TRIGGER data_points_rollups_truncate AFTER TRUNCATE ON data_points
      FOR EACH STATEMENT EXECUTE FUNCTION dataproc_rollups_after_truncate();
  END IF;
END $$;

-- Whether the rollups cover every row. A database that had points before the triggers
-- existed (made by the original service, or by an earlier dataproc) is not covered until
-- `init-db` rebuilds them; until then summaries read the raw rows (correct, slower).
-- With no point at all there is nothing to rebuild. Checked after the triggers exist:
-- creating them waited for every writer that started before, and any later writer fires them.
INSERT INTO dataproc_state (key)
SELECT 'rollups_complete' WHERE NOT EXISTS (SELECT 1 FROM data_points)
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
