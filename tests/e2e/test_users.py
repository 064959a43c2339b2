"""User administration over HTTP (API.md Users): list, change role, reset password, delete,
the last-admin rule (also under concurrent demotions), and 401/403/404/422."""

from __future__ import annotations

import re
import threading

import pytest

from dataproc import store
from support import Client, create_user, login

RFC3339_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


@pytest.fixture
def root(client, clean_db) -> str:
    """An access token of the only admin ('admin' of the schema is removed first)."""
    with store.connection(clean_db) as conn:
        conn.execute("DELETE FROM users WHERE username = 'admin'")
    create_user(clean_db, "root", "root-password", "admin")
    return login(client, "root", "root-password")["access_token"]


def test_list_is_ordered_by_username_with_created_at(client, clean_db, root):
    for name in ("zed", "amy", "bob"):
        create_user(clean_db, name, "password-1")
    reply = client.get("/api/users", token=root)
    assert reply.status == 200
    users = reply.json()
    assert [u["username"] for u in users] == ["amy", "bob", "root", "zed"]
    assert users[2]["role"] == "admin" and users[0]["role"] == "user"
    assert all(set(u) == {"username", "role", "created_at"} for u in users)
    assert all(RFC3339_Z.fullmatch(u["created_at"]) for u in users)


def test_list_pages_with_skip_and_limit(client, clean_db, root):
    for name in ("u1", "u2", "u3", "u4"):
        create_user(clean_db, f"user-{name}", "password-1")
    page = client.get("/api/users?skip=1&limit=2", token=root).json()
    assert [u["username"] for u in page] == ["user-u1", "user-u2"]
    for query, name in (("limit=0", "limit"), ("limit=1001", "limit"), ("skip=-1", "skip")):
        reply = client.get(f"/api/users?{query}", token=root)
        assert reply.status == 422 and reply.json()["detail"][0]["loc"] == ["query", name]


def test_users_endpoints_are_for_admins_only(client, clean_db, root):
    create_user(clean_db, "mallory", "password-1")
    user = login(client, "mallory", "password-1")["access_token"]
    for method, path, body in (
        ("GET", "/api/users", None),
        ("PATCH", "/api/users/root", {"role": "user"}),
        ("DELETE", "/api/users/root", None),
    ):
        assert client.request(method, path, body=body).status == 401
        reply = client.request(method, path, body=body, token=user)
        assert reply.status == 403 and reply.json() == {"detail": "admin role required"}


def test_patch_role_promotes_and_a_demotion_ends_the_sessions(client, clean_db, root):
    create_user(clean_db, "bob", "password-1")
    bob = login(client, "bob", "password-1")
    reply = client.request("PATCH", "/api/users/bob", body={"role": "admin"}, token=root)
    assert reply.status == 200 and reply.json()["role"] == "admin"
    assert client.get("/api/data", token=bob["access_token"]).status == 200  # promotion: kept
    reply = client.request("PATCH", "/api/users/bob", body={"role": "user"}, token=root)
    assert reply.status == 200 and reply.json()["username"] == "bob"
    assert reply.json()["role"] == "user"
    assert client.get("/api/data", token=bob["access_token"]).status == 401
    assert client.post("/auth/refresh", body={"refresh_token": bob["refresh_token"]}).status == 401


def test_patch_password_resets_it_and_ends_the_sessions(client, clean_db, root):
    create_user(clean_db, "bob", "password-1")
    bob = login(client, "bob", "password-1")
    body = {"password": "reset-password"}
    reply = client.request("PATCH", "/api/users/bob", body=body, token=root)
    assert reply.status == 200 and reply.json()["role"] == "user"
    assert client.get("/api/data", token=bob["access_token"]).status == 401
    assert login(client, "bob", "reset-password")["token_type"] == "bearer"
    old = client.post("/auth/login", form={"username": "bob", "password": "password-1"})
    assert old.status == 400


def test_patch_bodies_are_validated(client, clean_db, root):
    create_user(clean_db, "bob", "password-1")
    for body, name in (
        ({}, "role"),
        ({"role": "root"}, "role"),
        ({"password": "short"}, "password"),
        ({"password": 12345678}, "password"),
    ):
        reply = client.request("PATCH", "/api/users/bob", body=body, token=root)
        assert reply.status == 422, body
        assert reply.json()["detail"][0]["loc"] == ["body", name]


def test_delete_removes_the_user_and_ends_the_sessions(client, clean_db, root):
    create_user(clean_db, "bob", "password-1")
    bob = login(client, "bob", "password-1")
    assert client.get("/api/data", token=bob["access_token"]).status == 200
    reply = client.request("DELETE", "/api/users/bob", token=root)
    assert reply.status == 204 and reply.body == b""
    assert client.get("/api/data", token=bob["access_token"]).status == 401
    assert client.post("/auth/login", form={"username": "bob", "password": "password-1"}).status
    assert [u["username"] for u in client.get("/api/users", token=root).json()] == ["root"]
    assert client.request("DELETE", "/api/users/bob", token=root).status == 404


def test_unknown_users_are_404_and_bad_names_422(client, root):
    assert client.request("PATCH", "/api/users/nobody", body={"role": "user"}, token=root).status
    for method in ("PATCH", "DELETE"):
        reply = client.request(method, "/api/users/nobody", body={"role": "user"}, token=root)
        assert reply.status == 404 and reply.json() == {"detail": "user not found"}
        for bad in ("ab", "a%20b", "x" * 65, "semi%3Bcolon"):
            reply = client.request(method, f"/api/users/{bad}", body={"role": "user"}, token=root)
            assert reply.status == 422, bad
            assert reply.json()["detail"][0]["loc"] == ["path", "username"]
    assert client.request("GET", "/api/users/root", token=root).status == 405


def test_a_name_with_an_at_sign_works_percent_encoded(client, clean_db, root):
    create_user(clean_db, "ann@example.org", "password-1")
    reply = client.request(
        "PATCH", "/api/users/ann%40example.org", body={"role": "admin"}, token=root
    )
    assert reply.status == 200 and reply.json()["username"] == "ann@example.org"


def test_the_last_admin_cannot_be_demoted_or_deleted(client, root):
    for method, body in (("PATCH", {"role": "user"}), ("DELETE", None)):
        reply = client.request(method, "/api/users/root", body=body, token=root)
        assert reply.status == 409
        assert reply.json() == {"detail": "the last admin cannot be removed"}
    # Its password can still be reset (it stays an admin).
    reply = client.request("PATCH", "/api/users/root", body={"role": "admin"}, token=root)
    assert reply.status == 200


def test_an_admin_may_remove_another_while_one_remains(client, clean_db, root):
    create_user(clean_db, "second", "password-1", "admin")
    assert client.request("DELETE", "/api/users/second", token=root).status == 204
    assert client.request("DELETE", "/api/users/root", token=root).status == 409


def race(url: str, requests: list[tuple[str, str, dict | None, str]]) -> list[int]:
    """Send each (method, path, body, token) at the same moment; the statuses, sorted."""
    barrier, statuses = threading.Barrier(len(requests)), []

    def send(method: str, path: str, body: dict | None, token: str) -> None:
        client = Client(url)
        barrier.wait()
        statuses.append(client.request(method, path, body=body, token=token).status)
        client.close()

    threads = [threading.Thread(target=send, args=r) for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return sorted(statuses)


def test_concurrent_removals_of_the_last_two_admins_leave_one(service, clean_db, root):
    """The last two admins each step down at the same moment (a demotion or a deletion ends
    only the caller's own sessions, so both requests reach the rule): one must fail."""
    client = Client(service.url)
    for round_ in range(8):
        create_user(clean_db, "second", "password-1", "admin")
        tokens = {
            name: login(client, name, password)["access_token"]
            for name, password in (("root", "root-password"), ("second", "password-1"))
        }
        removal = ("DELETE", None) if round_ % 2 else ("PATCH", {"role": "user"})
        statuses = race(
            service.url,
            [
                ("PATCH", "/api/users/root", {"role": "user"}, tokens["root"]),
                (removal[0], "/api/users/second", removal[1], tokens["second"]),
            ],
        )
        assert statuses in ([200, 409], [204, 409]), statuses
        with store.connection(clean_db) as conn:
            admins = conn.execute("SELECT count(*) FROM users WHERE role = 'admin'").fetchone()
            assert admins == (1,)
            conn.execute("DELETE FROM users WHERE username = 'second'")
            conn.execute("UPDATE users SET role = 'admin' WHERE username = 'root'")
