"""Smoke: the service starts on real PostgreSQL and answers the walkthrough."""


def test_walkthrough(client, admin_token, user_token):
    assert client.post("/auth/signup", body={"username": "alice", "password": "wonderland"}).status == 201
    point = client.get("/api/populate", token=admin_token)
    assert point.status == 200, point.body
    assert set(point.json()) == {"id", "time", "value", "valid", "tags"}
    rows = client.get("/api/data", token=admin_token)
    assert rows.status == 200 and rows.json()[0]["id"] == point.json()["id"]
