"""`GET /api/data/summary` end to end: the real server on real PostgreSQL.

Points are written with plain SQL (the rollups are kept by triggers, whatever the writer).
The central check pages through `/api/data` for the same window and caller and buckets the
points in Python: the summary's counts must agree exactly, its min/max too, its mean to
rounding. Tampering with the rollup table (it has no triggers of its own) shows which pieces
of a window are read from the rollups and which from the raw rows.
"""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode, urlsplit

import pytest

from dataproc import store
from dataproc.api.summary import format_time
from dataproc.rfc3339 import parse as parse_time
from support import create_user, login, within_freshness

T0 = datetime(2024, 4, 22, 0, 0, 0, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def insert(pool, rows) -> None:
    """(time, value, valid) rows by plain SQL."""
    with store.connection(pool) as conn, conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO data_points (time, value, valid, tags) VALUES (%s, %s, %s, '{}')", rows
        )


def summary(client, token, **params):
    reply = client.get("/api/data/summary?" + urlencode(params), token=token)
    assert reply.status == 200, reply.body
    return reply.json()


def all_points(client, token, start: str, end: str) -> list[dict]:
    """Every point /api/data shows this caller in the window, following its Link pages."""
    path = "/api/data?" + urlencode({"start": start, "end": end, "limit": 1000})
    points: list[dict] = []
    while path:
        reply = client.get(path, token=token)
        assert reply.status == 200, reply.body
        points += reply.json()
        link = reply.headers.get("Link")
        path = (
            urlsplit(link[1 : link.index(">")])._replace(scheme="", netloc="").geturl()
            if link
            else None
        )
    return points


def expected_buckets(points: list[dict], bucket_s: int) -> list[dict]:
    """The buckets as the contract defines them, from the points."""
    buckets: dict[int, list[dict]] = {}
    for point in points:
        micros = (parse_time(point["time"]) - EPOCH) // timedelta(microseconds=1)
        buckets.setdefault(micros // (bucket_s * 1_000_000), []).append(point)
    result = []
    for index in sorted(buckets):
        members = buckets[index]
        finite = [p["value"] for p in members if p["value"] is not None]
        result.append(
            {
                "time": format_time(EPOCH + timedelta(seconds=index * bucket_s)),
                "count": len(members),
                "valid": sum(p["valid"] for p in members),
                "min": min(finite) if finite else None,
                "max": max(finite) if finite else None,
                "mean": sum(finite) / len(finite) if finite else None,
            }
        )
    return result


def assert_agrees(got: list[dict], want: list[dict]) -> None:
    assert [(b["time"], b["count"], b["valid"]) for b in got] == [
        (b["time"], b["count"], b["valid"]) for b in want
    ]
    for g, w in zip(got, want, strict=True):
        assert (g["min"], g["max"]) == (w["min"], w["max"])
        if w["mean"] is None:
            assert g["mean"] is None
        else:
            assert math.isclose(g["mean"], w["mean"], rel_tol=1e-9, abs_tol=1e-12)


@pytest.fixture
def series(clean_db):
    """About 4000 points over two days at random times: a fifth invalid, a few non-finite."""
    rng = random.Random(11)
    rows = []
    for _ in range(4000):
        when = T0 + timedelta(microseconds=rng.randrange(2 * 86400 * 1_000_000))
        value = rng.choice([math.nan, math.inf]) if rng.random() < 0.02 else rng.uniform(-5, 5)
        rows.append((when, value, rng.random() > 0.2))
    insert(clean_db, rows)
    return clean_db


# --- exact agreement with /api/data ---------------------------------------------------------

SIZES = ["1s", "7s", "30s", "1m", "90s", "5m", "10m", "1h", "3h", "1d", "7d"]


def random_window(rng: random.Random) -> tuple[str, str]:
    start = T0 + timedelta(microseconds=rng.randrange(-3600 * 10**6, 2 * 86400 * 10**6))
    if rng.random() < 0.3:  # on a whole minute or hour: no partial edge
        start = start.replace(
            second=0, microsecond=0, minute=0 if rng.random() < 0.5 else start.minute
        )
    length = timedelta(
        seconds=rng.choice([5, 59, 61, 600, 3600, 7300, 86400, 200000]) * rng.random()
    )
    return format_time(start), format_time(start + length)


@pytest.mark.parametrize("role", ["admin", "user"])
def test_counts_agree_exactly_with_api_data_for_random_windows(
    series, client, admin_token, user_token, role
):
    token = admin_token if role == "admin" else user_token
    rng = random.Random(2024 if role == "admin" else 4202)
    checked = 0
    while checked < 25:
        start, end = random_window(rng)
        bucket = rng.choice(SIZES)
        reply = client.get(
            "/api/data/summary?" + urlencode({"start": start, "end": end, "bucket": bucket}),
            token=token,
        )
        if reply.status == 422:  # too many buckets for this size: the rule, tested below
            assert reply.json()["detail"][0]["loc"] == ["query", "bucket"]
            continue
        body = reply.json()
        assert (body["start"], body["end"]) == (start, end)
        points = all_points(client, token, start, end)
        assert_agrees(body["buckets"], expected_buckets(points, body["bucket_s"]))
        checked += 1


def test_the_whole_series_agrees_for_both_roles_with_default_window_and_bucket(
    series, client, admin_token, user_token
):
    for token in (admin_token, user_token):
        body = summary(client, token)
        points = all_points(client, token, body["start"], body["end"])
        assert (body["start"], body["end"]) == (points[0]["time"], points[-1]["time"])
        assert_agrees(body["buckets"], expected_buckets(points, body["bucket_s"]))
        assert sum(b["count"] for b in body["buckets"]) == len(points)


def test_missing_rollups_fall_back_to_raw_rows_and_still_agree(series, client, admin_token):
    with store.connection(series) as conn:
        conn.execute("DELETE FROM dataproc_state WHERE key = 'rollups_complete'")
        conn.execute("TRUNCATE data_rollups")  # as a database made before the triggers
    start, end = format_time(T0), format_time(T0 + timedelta(days=2))
    body = summary(client, admin_token, start=start, end=end, bucket="1h")
    assert_agrees(
        body["buckets"], expected_buckets(all_points(client, admin_token, start, end), 3600)
    )


# --- which source serves which piece --------------------------------------------------------


@pytest.fixture
def tampered(clean_db):
    """One point a second for an hour from 10:00, then every rollup row inflated by 1000:
    a bucket read from the rollups shows it, one read from the raw rows does not."""
    insert(clean_db, [(T0 + timedelta(hours=10, seconds=i), 1.0, True) for i in range(3600)])
    with store.connection(clean_db) as conn:
        conn.execute("UPDATE data_rollups SET count = count + 1000, valid = valid + 1000")
    return clean_db


def test_whole_minute_buckets_read_the_rollups(tampered, client, admin_token):
    body = summary(
        client,
        admin_token,
        start="2024-04-22T10:00:00Z",
        end="2024-04-22T10:04:59.999999Z",
        bucket="1m",
    )
    assert [b["count"] for b in body["buckets"]] == [1060] * 5


def test_buckets_under_a_minute_read_the_raw_rows(tampered, client, admin_token):
    body = summary(
        client, admin_token, start="2024-04-22T10:00:00Z", end="2024-04-22T10:04:59Z", bucket="30s"
    )
    assert [b["count"] for b in body["buckets"]] == [30] * 10


def test_partial_edges_read_the_raw_rows_and_whole_minutes_the_rollups(
    tampered, client, admin_token
):
    body = summary(
        client, admin_token, start="2024-04-22T10:00:30Z", end="2024-04-22T10:03:10Z", bucket="1m"
    )
    assert [(b["time"][11:19], b["count"]) for b in body["buckets"]] == [
        ("10:00:00", 30),  # 10:00:30 .. 10:00:59 from raw rows
        ("10:01:00", 1060),
        ("10:02:00", 1060),
        ("10:03:00", 11),  # 10:03:00 .. 10:03:10, both ends inclusive
    ]


def test_hour_buckets_read_hour_rollups_and_minute_rollups_at_the_edges(
    tampered, client, admin_token
):
    body = summary(
        client, admin_token, start="2024-04-22T09:00:00Z", end="2024-04-22T11:59:59Z", bucket="1h"
    )
    assert [b["count"] for b in body["buckets"]] == [4600]  # the hour row: 3600 + 1000
    body = summary(
        client, admin_token, start="2024-04-22T10:00:30Z", end="2024-04-22T11:00:00Z", bucket="1h"
    )
    assert body["buckets"][0]["count"] == 30 + 59 * 1060  # raw edge, then 59 minute rows


def test_day_buckets_read_day_rollups_for_whole_days_only(tampered, client, admin_token):
    with store.connection(tampered) as conn:  # the day rows alone inflated further
        conn.execute("UPDATE data_rollups SET count = count + 500000 WHERE width_s = 86400")
    body = summary(
        client, admin_token, start="2024-04-21T00:00:00Z", end="2024-04-23T23:59:59Z", bucket="1d"
    )
    assert [b["count"] for b in body["buckets"]] == [3600 + 1000 + 500000]  # the day row
    body = summary(
        client, admin_token, start="2024-04-22T10:30:00Z", end="2024-04-23T23:59:59Z", bucket="1d"
    )
    assert [b["count"] for b in body["buckets"]] == [30 * 1060]  # minute rows, hour rows


# --- alignment, defaults, values ------------------------------------------------------------


def test_buckets_are_aligned_to_the_epoch_and_only_non_empty_ones_are_listed(
    clean_db, client, admin_token
):
    insert(
        clean_db,
        [
            (T0 + timedelta(minutes=3), 1.0, True),
            (T0 + timedelta(minutes=17, seconds=5), 2.0, True),
        ],
    )
    body = summary(
        client, admin_token, start="2024-04-21T23:58:00Z", end="2024-04-22T01:00:00Z", bucket="7m"
    )
    # 7-minute buckets since 1970: 2024-04-22T00:00 is minute 28,562,400 = 7 * 4,080,342 + 6,
    # so buckets start at 23:54, 00:01, 00:08, 00:15 ...
    assert [b["time"] for b in body["buckets"]] == ["2024-04-22T00:01:00Z", "2024-04-22T00:15:00Z"]
    assert body["bucket"] == "7m" and body["bucket_s"] == 420


@pytest.mark.parametrize(
    ("length", "bucket"),
    [
        (timedelta(hours=1), "10s"),
        (timedelta(days=1), "5m"),
        (timedelta(days=7), "30m"),
        (timedelta(seconds=100), "1s"),
    ],
)
def test_the_default_bucket_is_the_smallest_listed_size_giving_500_buckets_or_fewer(
    clean_db, client, admin_token, length, bucket
):
    insert(clean_db, [(T0, 1.0, True), (T0 + length, 2.0, True)])
    body = summary(client, admin_token)
    assert body["bucket"] == bucket
    assert (body["start"], body["end"]) == (format_time(T0), format_time(T0 + length))


def test_bucket_sizes_are_read_in_every_documented_form(clean_db, client, admin_token):
    insert(clean_db, [(T0, 1.0, True)])
    for given, seconds, shown in [
        ("30s", 30, "30s"),
        ("5m", 300, "5m"),
        ("1h", 3600, "1h"),
        ("1d", 86400, "1d"),
        ("120", 120, "2m"),
        ("90", 90, "90s"),
        ("31d", 2678400, "31d"),
    ]:
        body = summary(
            client,
            admin_token,
            start="2024-04-22T00:00:00Z",
            end="2024-04-22T00:00:00Z",
            bucket=given,
        )
        assert (body["bucket_s"], body["bucket"]) == (seconds, shown)


def test_defaults_follow_the_visible_points_of_each_role(clean_db, client, admin_token, user_token):
    insert(
        clean_db,
        [
            (T0, 1.0, False),
            (T0 + timedelta(minutes=1), 2.0, True),
            (T0 + timedelta(minutes=2), 3.0, True),
            (T0 + timedelta(minutes=3), 4.0, False),
        ],
    )
    admin = summary(client, admin_token, bucket="1m")
    user = summary(client, user_token, bucket="1m")
    assert (admin["start"], admin["end"]) == ("2024-04-22T00:00:00Z", "2024-04-22T00:03:00Z")
    assert (user["start"], user["end"]) == ("2024-04-22T00:01:00Z", "2024-04-22T00:02:00Z")
    assert [(b["count"], b["valid"]) for b in admin["buckets"]] == [(1, 0), (1, 1), (1, 1), (1, 0)]
    assert [(b["count"], b["valid"]) for b in user["buckets"]] == [(1, 1), (1, 1)]
    # One bound given: the other is the first / last visible point inside it.
    assert (
        summary(client, admin_token, start="2024-04-22T00:01:30Z")["end"] == "2024-04-22T00:03:00Z"
    )
    assert (
        summary(client, user_token, end="2024-04-22T00:01:30Z")["start"] == "2024-04-22T00:01:00Z"
    )


def test_no_visible_point_gives_no_bucket(clean_db, client, admin_token, user_token):
    insert(clean_db, [(T0, 1.0, False)])
    assert summary(client, user_token) == {
        "start": None,
        "end": None,
        "bucket": "1s",
        "bucket_s": 1,
        "buckets": [],
    }
    body = summary(client, user_token, start="2024-04-22T00:00:00Z")
    assert (body["start"], body["end"], body["buckets"]) == (
        "2024-04-22T00:00:00Z",
        "2024-04-22T00:00:00Z",
        [],
    )


def test_non_finite_values_count_but_stay_out_of_min_max_and_mean(clean_db, client, admin_token):
    insert(
        clean_db,
        [
            (T0, math.nan, False),
            (T0 + timedelta(seconds=1), math.inf, False),
            (T0 + timedelta(seconds=2), -1.5, True),
            (T0 + timedelta(seconds=3), 2.5, True),
            (T0 + timedelta(minutes=5), -math.inf, False),
        ],
    )
    for bucket in ("1m", "30s"):  # rollups and raw rows
        body = summary(
            client,
            admin_token,
            start="2024-04-22T00:00:00Z",
            end="2024-04-22T00:05:00Z",
            bucket=bucket,
        )
        assert body["buckets"] == [
            {
                "time": "2024-04-22T00:00:00Z",
                "count": 4,
                "valid": 2,
                "min": -1.5,
                "max": 2.5,
                "mean": 0.5,
            },
            {
                "time": "2024-04-22T00:05:00Z",
                "count": 1,
                "valid": 0,
                "min": None,
                "max": None,
                "mean": None,
            },
        ]


def test_a_new_point_is_in_the_next_summary(clean_db, client, admin_token):
    insert(clean_db, [(T0, 1.0, True)])
    params = {"start": "2024-04-22T00:00:00Z", "end": "2024-04-22T23:59:59Z", "bucket": "1h"}
    assert summary(client, admin_token, **params)["buckets"][0]["count"] == 1
    insert(clean_db, [(T0 + timedelta(minutes=30), 3.0, True)])
    # Another connection's commit: in the next read within the contract's 100 ms (the read
    # cache hears it through NOTIFY), not necessarily in the one right after.
    body = within_freshness(
        lambda: summary(client, admin_token, **params),
        lambda b: b["buckets"][0]["count"] == 2,
    )
    assert body["buckets"][0] == {
        "time": "2024-04-22T00:00:00Z",
        "count": 2,
        "valid": 2,
        "min": 1.0,
        "max": 3.0,
        "mean": 2.0,
    }


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bucket", ["0", "0s", "32d", "2678401", "1.5m", "1w", "abc", "", "-5", "1 h", "\u0661s", "1H"]
)
def test_a_bad_bucket_is_a_422_naming_it(clean_db, client, admin_token, bucket):
    reply = client.get("/api/data/summary?" + urlencode({"bucket": bucket}), token=admin_token)
    assert reply.status == 422
    assert [p["loc"] for p in reply.json()["detail"]] == [["query", "bucket"]]


def test_more_than_10000_buckets_is_a_422_naming_bucket(clean_db, client, admin_token):
    ok = client.get(
        "/api/data/summary?start=2024-04-22T00:00:00Z&end=2024-04-22T02:46:39Z&bucket=1s",
        token=admin_token,
    )
    assert ok.status == 200  # exactly 10,000 buckets
    reply = client.get(
        "/api/data/summary?start=2024-04-22T00:00:00Z&end=2024-04-22T02:46:40Z&bucket=1s",
        token=admin_token,
    )
    assert reply.status == 422
    assert reply.json()["detail"][0]["loc"] == ["query", "bucket"]
    assert "10000" in reply.json()["detail"][0]["msg"]


def test_start_after_end_and_bad_datetimes_are_422s(clean_db, client, admin_token):
    reply = client.get(
        "/api/data/summary?start=2024-04-23T00:00:00Z&end=2024-04-22T00:00:00Z", token=admin_token
    )
    assert reply.status == 422 and reply.json()["detail"][0]["loc"] == ["query", "start"]
    reply = client.get(
        "/api/data/summary?start=yesterday&end=2024-13-01T00:00:00Z&bucket=1h&bucket=1d",
        token=admin_token,
    )
    assert reply.status == 422
    assert sorted(p["loc"][1] for p in reply.json()["detail"]) == ["bucket", "end", "start"]


def test_without_a_valid_token_it_is_a_401(clean_db, client):
    reply = client.get("/api/data/summary")
    assert reply.status == 401 and reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/api/data/summary", token="not.a.token").status == 401


def test_a_deleted_users_token_is_a_401(clean_db, client):
    create_user(clean_db, "leaving", "leaving-password")
    token = login(client, "leaving", "leaving-password")["access_token"]
    assert client.get("/api/data/summary", token=token).status == 200
    with store.connection(clean_db) as conn:
        conn.execute("DELETE FROM users WHERE username = 'leaving'")
    for query in ("", "?start=2024-04-22T00:00:00Z&end=2024-04-22T01:00:00Z"):
        # API.md: a deleted user's tokens lose access within 100 ms of the commit (the role
        # and the session are cached per process, dropped by the NOTIFY of the delete).
        reply = within_freshness(
            lambda q=query: client.get("/api/data/summary" + q, token=token),
            lambda r: r.status == 401,
        )
        assert reply.status == 401


def test_head_gives_the_headers_without_a_body(clean_db, client, admin_token):
    get = client.get("/api/data/summary", token=admin_token)
    head = client.request("HEAD", "/api/data/summary", token=admin_token)
    assert head.status == 200 and head.body == b""
    assert head.headers["Content-Length"] == get.headers["Content-Length"]
