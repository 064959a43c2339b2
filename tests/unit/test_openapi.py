"""The OpenAPI document: it describes exactly the routes that exist, it validates against the
OpenAPI 3.1 schema, it is what `/openapi.json` serves, and the running service keeps it: a
seeded fuzz over every documented parameter and body gets only documented statuses, never a
5xx, with bodies that match the documented schemas.

The schema validation uses `openapi-spec-validator` (a test-only tool: `pip install
openapi-spec-validator`); without it that one test is skipped. The rest needs only the stdlib.
"""

from __future__ import annotations

import json
import random
import string
from urllib.parse import quote, urlencode

import pytest

from dataproc import api, openapi, passwords, rules
from dataproc.api.params import DataQuery
from dataproc.config import Config
from dataproc.metrics import Metrics
from support import Client, create_user, make_config

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def documented_operations(doc: dict) -> dict[tuple[str, str], dict]:
    """(METHOD, path) -> operation, for every operation in the document."""
    return {
        (method.upper(), path): op
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in HTTP_METHODS
    }


def resolve(doc: dict, node: dict) -> dict:
    """Follow `$ref`s inside the document (a KeyError means a dangling reference)."""
    while "$ref" in node:
        target = doc
        for key in node["$ref"].removeprefix("#/").split("/"):
            target = target[key]
        node = target
    return node


def test_every_route_is_in_openapi_and_every_documented_operation_is_routed():
    # Routing never touches the pool, so no database is needed to list the routes.
    ctx = api.Context(make_config(None), None, metrics=Metrics("test"))
    routed = {
        (method, path)
        for path, methods in api.build_router(ctx).routes().items()
        for method in methods
    }
    documented = set(documented_operations(openapi.document()))
    assert routed - documented == set(), "routes missing from the OpenAPI document"
    assert documented - routed == set(), "documented operations that no route serves"


def test_every_reference_in_the_document_resolves():
    doc = openapi.document()
    refs: list[dict] = []

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs
    for ref in refs:
        resolve(doc, ref)  # raises KeyError when dangling


def test_operation_ids_are_unique_and_every_response_documents_x_request_id():
    operations = documented_operations(openapi.document())
    ids = [op["operationId"] for op in operations.values()]
    assert len(ids) == len(set(ids))
    for key, op in operations.items():
        for status, response in op["responses"].items():
            assert "X-Request-ID" in response.get("headers", {}), (key, status)


def test_secured_operations_name_the_bearer_and_oauth2_password_schemes():
    doc = openapi.document()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {
        **schemes["bearerAuth"],
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }
    assert schemes["OAuth2PasswordBearer"]["flows"]["password"]["tokenUrl"] == "/auth/login"
    for key in [("GET", "/api/data"), ("GET", "/api/populate"), ("POST", "/api/populate")]:
        op = documented_operations(doc)[key]
        assert {name for requirement in op["security"] for name in requirement} == {
            "bearerAuth",
            "OAuth2PasswordBearer",
        }
        assert "401" in op["responses"]


def test_login_signup_and_refresh_document_both_json_and_form_bodies():
    operations = documented_operations(openapi.document())
    for path in ("/auth/signup", "/auth/login", "/auth/refresh"):
        content = operations[("POST", path)]["requestBody"]["content"]
        assert set(content) == {"application/json", "application/x-www-form-urlencoded"}, path


def test_document_validates_against_the_openapi_3_1_schema():
    validator = pytest.importorskip(
        "openapi_spec_validator", reason="pip install openapi-spec-validator"
    )
    doc = json.loads(openapi.document_bytes())  # what clients get, not the Python objects
    assert doc["openapi"].startswith("3.1")
    validator.validate(doc)  # raises with the first problem found


def test_openapi_json_serves_the_built_document(client):
    reply = client.get("/openapi.json")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.json() == json.loads(openapi.document_bytes())
    head = client.request("HEAD", "/openapi.json")
    assert head.status == 200 and head.body == b""
    assert int(head.headers["Content-Length"]) == len(reply.body)


# --- a seeded fuzz of the running service against the document ------------------------------

JUNK = [
    "",
    " ",
    "0",
    "-1",
    "1.5",
    "1e3",
    "abc",
    "null",
    "true",
    "%00",
    "\u00e9",
    "\u0663",
    "9" * 25,
    "2024-13-45T99:99:99Z",
    "2024-04-22",
    "2024-04-22T15:07:57Z",
    "2024-04-22T15:07:57+02:00",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z",
    "AAAA",
    "MTIzLjQ",
    "x" * 70,
    "<script>",
    "' OR 1=1 --",
]


def parameter_values(doc: dict, param: dict, rng: random.Random) -> str:
    """A value for one parameter: mostly from its schema (edges included), sometimes junk."""
    schema = resolve(doc, param["schema"])
    if rng.random() < 0.35:
        return rng.choice(JUNK)
    if schema.get("type") == "integer":
        low, high = schema.get("minimum", 0), min(schema.get("maximum", 1000), 1000)
        if param["name"] == "count":
            high = 3  # each count is that many upstream fetches: keep the run short
        return str(rng.choice([low, high, low - 1, high + 1, rng.randint(low, high)]))
    if schema.get("format") == "date-time":
        return rng.choice(
            [
                "2024-04-22T15:07:57Z",
                "2000-01-01T00:00:00+05:30",
                "2100-01-01T00:00:00",
                "2024-04-22T15:07:57.123456Z",
            ]
        )
    if param["name"] == "X-Request-ID":
        return rng.choice(["fuzz-" + str(rng.randint(0, 999)), "bad id", "x" * 200])
    return "".join(rng.choice(string.ascii_letters + "-_") for _ in range(rng.randint(1, 20)))


def body_for(good: dict, rng: random.Random) -> tuple[bytes | None, dict[str, str]]:
    """A request body: `good` fields, or good, missing or wrong ones, in a documented type or not."""
    if rng.random() < 0.3:
        chosen = dict(good)
        kind = rng.choice(["json", "form"])
        return _encode(chosen, kind)
    fields = {
        "username": rng.choice(
            [
                "admin",
                "fuzz" + str(rng.randint(0, 99)),
                "fuzz.user@x",
                "ab",
                "x" * 70,
                "bad name",
                "",
            ]
        ),
        "password": rng.choice(
            ["admin", "long-enough-pw", "long-enough-pw", "short", "p" * 80, ""]
        ),
        "refresh_token": rng.choice(["", "a.b.c", "not-a-token", "x" * 300]),
    }
    chosen = {k: v for k, v in fields.items() if rng.random() < 0.8}
    if rng.random() < 0.15:
        chosen["username"] = rng.choice([1, None, ["x"], {"a": 1}, True])
    kind = rng.choice(["json", "json", "form", "form", "junk", "array", "text", "none", "nan"])
    return _encode(chosen, kind, rng)


def _encode(chosen: dict, kind: str, rng: random.Random | None = None):
    if kind == "json":
        return json.dumps(chosen).encode(), {"Content-Type": "application/json"}
    if kind == "form":
        return urlencode({k: str(v) for k, v in chosen.items()}).encode(), {
            "Content-Type": "application/x-www-form-urlencoded"
        }
    if kind == "junk":
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))), {
            "Content-Type": rng.choice(["application/json", "application/x-www-form-urlencoded"])
        }
    if kind == "array":
        return b"[1, 2, 3]", {"Content-Type": "application/json"}
    if kind == "nan":
        return b'{"username": NaN, "password": "x"}', {"Content-Type": "application/json"}
    if kind == "text":
        return b"username=a", {"Content-Type": "text/plain"}
    return None, {}


def conforms(doc: dict, value, schema: dict) -> bool:
    """A small JSON Schema check (type, enum, required, properties, items, oneOf, anyOf)."""
    schema = resolve(doc, schema)
    if "oneOf" in schema:
        return sum(conforms(doc, value, s) for s in schema["oneOf"]) == 1
    if "anyOf" in schema:
        return any(conforms(doc, value, s) for s in schema["anyOf"])
    types = schema.get("type")
    if types is not None:
        types = types if isinstance(types, list) else [types]
        checks = {
            "object": lambda v: isinstance(v, dict),
            "array": lambda v: isinstance(v, list),
            "string": lambda v: isinstance(v, str),
            "boolean": lambda v: isinstance(v, bool),
            "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "null": lambda v: v is None,
        }
        if not any(checks[t](value) for t in types):
            return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, dict):
        if any(name not in value for name in schema.get("required", ())):
            return False
        for name, sub in schema.get("properties", {}).items():
            if name in value and not conforms(doc, value[name], sub):
                return False
    if isinstance(value, list) and "items" in schema:
        return all(conforms(doc, item, schema["items"]) for item in value)
    return True


def check_reply(doc: dict, key: tuple[str, str], op: dict, reply) -> None:
    status = str(reply.status)
    assert reply.status < 500, (key, reply.status, reply.body[:300])  # a healthy upstream: no 5xx
    assert status in op["responses"], (key, reply.status, reply.body[:300])
    assert reply.headers.get("X-Request-ID")
    response = resolve(doc, op["responses"][status])
    media = response.get("content", {}).get("application/json")
    if media is not None and reply.body:
        assert reply.headers["Content-Type"] == "application/json", key
        assert conforms(doc, json.loads(reply.body), media["schema"]), (
            key,
            status,
            reply.body[:300],
        )


def test_seeded_fuzz_of_every_operation_gets_only_documented_statuses(
    service, admin_token, user_token, clean_db
):
    doc = openapi.document()
    rng = random.Random(20240422)
    operations = sorted(documented_operations(doc).items())
    tokens = [admin_token, admin_token, user_token, None, "not.a.token", admin_token[:-2] + "xx"]
    client = Client(service.url, timeout=15)
    refresh_token = client.post(
        "/auth/login", form={"username": "root", "password": "root-password"}
    ).json()["refresh_token"]
    names = iter(range(10_000))
    # Logout and password change end sessions: they get tokens of a session of their own, and
    # the user endpoints change "victim", so the fuzz keeps the tokens it shares.
    create_user(clean_db, "fuzzer", "fuzzer-password")
    create_user(clean_db, "victim", "victim-password")

    # Made before the fuzz: its failed logins soon throttle logins from this address.
    own = [
        client.post("/auth/login", form={"username": "fuzzer", "password": "fuzzer-password"})
        for _ in range(40)
    ]

    def own_session() -> dict:
        return (own.pop() if len(own) > 1 else own[0]).json()

    good_bodies = {
        "/auth/signup": lambda: {"username": f"fuzz-{next(names)}", "password": "long-enough-pw"},
        "/auth/login": lambda: {"username": "root", "password": "root-password"},
        "/auth/refresh": lambda: {"refresh_token": refresh_token},
        "/auth/logout": lambda: {"refresh_token": own_session()["refresh_token"]},
        "/auth/password": lambda: {
            "current_password": "fuzzer-password",
            "new_password": "fuzzer-password",
        },
        "/api/users/{username}": lambda: rng.choice([{"role": "user"}, {"password": "pw-12345"}]),
    }
    seen: dict[tuple[str, str], set[int]] = {}
    try:
        # About forty tries per operation, however many the document has: each must reach
        # its handler's success and refusal paths, not only the front door.
        for _ in range(40 * len(operations)):
            key, op = rng.choice(operations)
            method, path = key
            params = [resolve(doc, p) for p in op.get("parameters", [])]
            query, headers = [], {}
            for param in params:
                if param["in"] == "path":
                    name = rng.choice(["victim", parameter_values(doc, param, rng)])
                    path = path.replace("{" + param["name"] + "}", quote(name, safe=""))
                elif rng.random() < 0.6:
                    value = parameter_values(doc, param, rng)
                    if param["in"] == "query":
                        query.append((param["name"], value))
                        if rng.random() < 0.05:
                            query.append((param["name"], value))  # given twice: a 422
                    else:  # as UTF-8 bytes: http.client would refuse non-latin-1 text
                        headers[param["name"]] = value.encode()
            body = None
            if "requestBody" in op:
                body, body_headers = body_for(good_bodies[key[1]](), rng)
                headers.update(body_headers)
            target = path + ("?" + urlencode(query) if query else "")
            token = rng.choice(tokens) if op.get("security") else None
            if path in ("/auth/logout", "/auth/password"):
                token = rng.choice([own_session()["access_token"], None, "not.a.token"])
            reply = client.request(method, target, body=body, headers=headers, token=token)
            check_reply(doc, key, op, reply)
            seen.setdefault(key, set()).add(reply.status)
    finally:
        client.close()
    assert set(seen) == {key for key, _ in operations}, "the fuzz missed an operation"
    # The fuzz reached the handlers' success and refusal paths, not only the front door.
    assert {200, 422} <= seen[("GET", "/api/data")]
    assert {201, 422} <= seen[("POST", "/auth/signup")]
    assert {200, 401} <= seen[("POST", "/auth/refresh")]
    assert {200, 403} <= seen[("GET", "/api/populate")]


# --- the numbers are the rules the handlers enforce -------------------------------------------


def test_the_documented_numbers_and_patterns_are_the_rules():
    components = openapi.document()["components"]
    credentials = components["schemas"]["Credentials"]["properties"]
    username = credentials["username"]
    assert (username["minLength"], username["maxLength"]) == (
        rules.USERNAME_MIN,
        rules.USERNAME_MAX,
    )
    assert username["pattern"] == f"^{rules.USERNAME_PATTERN}$"
    assert (
        f"{rules.DEFAULT_PASSWORD_MIN_BYTES} to {rules.MAX_PASSWORD_BYTES} bytes"
        in (credentials["password"]["description"])
    )
    parameters = components["parameters"]
    ranges = (
        ("limit", rules.LIMIT, rules.DEFAULT_LIMIT),
        ("skip", rules.SKIP, rules.DEFAULT_SKIP),
        ("count", rules.COUNT, None),  # absent: one point, not a batch of a default size
    )
    for name, bounds, default in ranges:
        schema = parameters[name]["schema"]
        assert (schema["minimum"], schema["maximum"]) == (bounds.low, bounds.high), name
        assert schema.get("default") == default, name
    assert parameters["after"]["schema"]["pattern"] == f"^{rules.CURSOR_PATTERN}$"


def test_the_rules_agree_with_the_defaults_and_the_password_module():
    assert Config().password_min_bytes == rules.DEFAULT_PASSWORD_MIN_BYTES
    assert passwords.MAX_PASSWORD_BYTES == rules.MAX_PASSWORD_BYTES == 72
    assert DataQuery() == DataQuery(skip=rules.DEFAULT_SKIP, limit=rules.DEFAULT_LIMIT)
    assert rules.USERNAME.fullmatch("a" * rules.USERNAME_MAX)
    assert not rules.USERNAME.fullmatch("a" * (rules.USERNAME_MAX + 1))
    assert not rules.USERNAME.fullmatch("a" * (rules.USERNAME_MIN - 1))


def test_the_handlers_enforce_the_documented_ranges(client, admin_token):
    for name, bounds in (("limit", rules.LIMIT), ("skip", rules.SKIP)):
        for value, status in (
            (bounds.low, 200),
            (bounds.high, 200),
            (bounds.low - 1, 422),
            (bounds.high + 1, 422),
        ):
            reply = client.get(f"/api/data?{name}={value}", token=admin_token)
            assert reply.status == status, (name, value, reply.body)
    for value in (rules.COUNT.low - 1, rules.COUNT.high + 1):
        assert client.get(f"/api/populate?count={value}", token=admin_token).status == 422
