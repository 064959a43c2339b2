"""Conditional requests on `/api/data` (API.md): `ETag`, `Cache-Control: private, no-cache`,
`Vary: Authorization, Accept-Encoding`; `If-None-Match` holding the tag gives 304 with no
body; the tag changes whenever the answer would (a new point, a change of the caller's role).
"""

from __future__ import annotations

import psycopg
import pytest

from support import Client, create_user, login, within_freshness

PAGE = "/api/data?limit=1000"


def get(client: Client, token: str, path: str = PAGE, etag: str | None = None, method="GET"):
    headers = {"If-None-Match": etag} if etag is not None else {}
    return client.request(method, path, token=token, headers=headers)


def insert_point(database_url: str, value: float, valid: bool = True) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO data_points (time, value, valid) VALUES (now(), %s, %s)", (value, valid)
        )


def test_a_200_carries_the_validators(client, admin_token, database_url):
    insert_point(database_url, 1.0)
    reply = within_freshness(lambda: get(client, admin_token), lambda r: r.json() != [])
    assert reply.status == 200
    tag = reply.headers["ETag"]
    assert tag.startswith('"') and tag.endswith('"')  # strong
    assert reply.headers["Cache-Control"] == "private, no-cache"
    assert reply.headers["Vary"] == "Authorization, Accept-Encoding"
    assert get(client, admin_token).headers["ETag"] == tag  # stable while nothing changes


@pytest.mark.parametrize("form", ["{tag}", "W/{tag}", '"other", {tag}', "*"])
def test_if_none_match_with_the_tag_is_a_304_without_a_body(client, admin_token, form):
    tag = get(client, admin_token).headers["ETag"]
    reply = client.get(
        PAGE,
        token=admin_token,
        headers={"If-None-Match": form.format(tag=tag), "X-Request-ID": "abc-123"},
    )
    assert reply.status == 304
    assert reply.body == b""
    assert reply.headers["ETag"] == tag
    assert reply.headers["Cache-Control"] == "private, no-cache"
    assert reply.headers["Vary"] == "Authorization, Accept-Encoding"
    assert reply.headers["X-Request-ID"] == "abc-123"


def test_head_is_conditional_too_and_another_tag_gets_the_page(client, admin_token):
    tag = get(client, admin_token).headers["ETag"]
    assert get(client, admin_token, etag=tag, method="HEAD").status == 304
    other = get(client, admin_token, etag='"not-it"')
    assert other.status == 200 and other.headers["ETag"] == tag


def test_a_new_point_changes_the_tag(client, admin_token, database_url):
    old = get(client, admin_token).headers["ETag"]
    insert_point(database_url, 2.0)
    reply = within_freshness(lambda: get(client, admin_token, etag=old), lambda r: r.status == 200)
    assert reply.status == 200 and 2.0 in [p["value"] for p in reply.json()]
    assert reply.headers["ETag"] != old
    assert get(client, admin_token, etag=reply.headers["ETag"]).status == 304


def test_a_point_stored_through_this_replica_changes_the_tag_at_once(client, admin_token):
    old = get(client, admin_token).headers["ETag"]
    assert get(client, admin_token, etag=old).status == 304
    assert client.get("/api/populate", token=admin_token).status == 200
    reply = get(client, admin_token, etag=old)
    assert reply.status == 200 and reply.headers["ETag"] != old


def test_the_tag_depends_on_the_role_and_the_query(client, clean_db, database_url):
    create_user(clean_db, "root", "root-password", "admin")
    create_user(clean_db, "carol", "carol-password", "user")
    admin = login(client, "root", "root-password")["access_token"]
    user = login(client, "carol", "carol-password")["access_token"]
    insert_point(database_url, 3.0, valid=False)
    admin_reply = within_freshness(lambda: get(client, admin), lambda r: r.json() != [])
    user_reply = get(client, user)
    assert user_reply.json() == [] and admin_reply.headers["ETag"] != user_reply.headers["ETag"]
    assert get(client, user, etag=admin_reply.headers["ETag"]).status == 200
    assert get(client, admin, "/api/data?limit=5").headers["ETag"] != admin_reply.headers["ETag"]


def test_a_role_change_changes_the_tag(client, clean_db, database_url):
    create_user(clean_db, "root", "root-password", "admin")
    create_user(clean_db, "boss", "boss-password", "admin")
    token = login(client, "root", "root-password")["access_token"]
    insert_point(database_url, 4.0, valid=False)
    as_admin = within_freshness(lambda: get(client, token), lambda r: r.json() != [])
    tag = as_admin.headers["ETag"]
    assert get(client, token, etag=tag).status == 304
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE users SET role = 'user' WHERE username = 'root'")
    reply = within_freshness(lambda: get(client, token, etag=tag), lambda r: r.status == 200)
    assert reply.status == 200 and reply.json() == [] and reply.headers["ETag"] != tag


def test_no_304_without_a_valid_token_or_for_a_deleted_user(client, clean_db, database_url):
    create_user(clean_db, "carol", "carol-password")
    token = login(client, "carol", "carol-password")["access_token"]
    tag = get(client, token).headers["ETag"]
    assert client.get(PAGE, headers={"If-None-Match": tag}).status == 401
    assert get(client, token + "x", etag=tag).status == 401
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM users WHERE username = 'carol'")
    reply = within_freshness(lambda: get(client, token, etag=tag), lambda r: r.status == 401)
    assert reply.status == 401


def test_the_same_validators_with_the_cache_off(service_factory, clean_db, database_url):
    service = service_factory(cache_enabled=False)
    client = Client(service.url)
    create_user(clean_db, "root", "root-password", "admin")
    token = login(client, "root", "root-password")["access_token"]
    first = get(client, token)
    tag = first.headers["ETag"]
    assert first.headers["Cache-Control"] == "private, no-cache"
    assert get(client, token, etag=tag).status == 304
    insert_point(database_url, 5.0)
    reply = get(client, token, etag=tag)  # no cache: the database, at once
    assert reply.status == 200 and reply.headers["ETag"] != tag
    client.close()


# --- the summary: the same bookkeeping --------------------------------------------------------

SUMMARY = "/api/data/summary?bucket=1h"


def test_the_summary_carries_the_validators_and_answers_304(client, admin_token, database_url):
    insert_point(database_url, 1.0)
    reply = within_freshness(
        lambda: get(client, admin_token, SUMMARY), lambda r: r.json()["buckets"] != []
    )
    tag = reply.headers["ETag"]
    assert reply.headers["Cache-Control"] == "private, no-cache"
    assert reply.headers["Vary"] == "Authorization, Accept-Encoding"
    again = get(client, admin_token, SUMMARY, etag=tag)
    assert again.status == 304 and again.body == b"" and again.headers["ETag"] == tag


def test_a_new_point_changes_the_summary_and_its_tag(client, admin_token, database_url):
    insert_point(database_url, 1.0)
    first = within_freshness(
        lambda: get(client, admin_token, SUMMARY), lambda r: r.json()["buckets"] != []
    )
    count = sum(bucket["count"] for bucket in first.json()["buckets"])
    insert_point(database_url, 2.0)
    reply = within_freshness(
        lambda: get(client, admin_token, SUMMARY, etag=first.headers["ETag"]),
        lambda r: r.status == 200,
    )
    assert sum(bucket["count"] for bucket in reply.json()["buckets"]) == count + 1
    assert reply.headers["ETag"] != first.headers["ETag"]


def test_the_summary_tag_differs_between_an_admin_and_a_user(client, clean_db, database_url):
    create_user(clean_db, "root", "root-password", "admin")
    create_user(clean_db, "alice", "alice-password")
    admin = login(client, "root", "root-password")["access_token"]
    user = login(client, "alice", "alice-password")["access_token"]
    insert_point(database_url, 1.0, valid=False)
    seen = within_freshness(
        lambda: get(client, admin, SUMMARY), lambda r: r.json()["buckets"] != []
    )
    as_user = get(client, user, SUMMARY)
    assert as_user.json()["buckets"] == []
    assert as_user.headers["ETag"] != seen.headers["ETag"]
    assert get(client, user, SUMMARY, etag=seen.headers["ETag"]).status == 200
