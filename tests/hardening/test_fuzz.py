"""Hardening: a seeded, table-driven generator of malformed requests against one running service.

Over the routes of `api.ROUTES` and the parameters and bodies of API.md, it mutates the method,
the path, query names and values, headers and bodies (through http.client, on kept-alive
connections), and the framing itself (request lines, header syntax, lengths; over raw
sockets). The service must answer every one (never drop a connection without a response),
never with a 5xx, and still answer normally afterwards. The seed is fixed, so a failure
replays; the status distribution is printed (run with `-s`).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import time
from collections import Counter
from urllib.parse import urlencode

from dataproc import api, jwt
from support import ACCESS_KEY, REFRESH_KEY, Client, create_user, login

SEED = int(os.environ.get("DATAPROC_FUZZ_SEED", "20240422"))  # set it to explore further
SEMANTIC_CASES = 2000
FRAMING_CASES = 500

PARAMETERS = {"/api/data": ["start", "end", "skip", "limit", "after"], "/api/populate": ["count"]}
JUNK_NAMES = ["access_token", "", "limit[]", "%00", "a" * 300, "start ", "LIMIT", "__proto__", "ä"]
VALUES = [
    "",
    "0",
    "-1",
    "1",
    "1000",
    "1001",
    "100",
    "99999999999999999999999",
    "-0",
    "+5",
    "1e3",
    "0x10",
    "1.5",
    "NaN",
    "Infinity",
    "null",
    "true",
    "[]",
    "{}",
    "１",
    "٣",
    "1_0",
    " 1",
    "1 ",
    "2024-01-01",
    "2024-01-01T00:00:00Z",
    "2024-01-01T00:00:00+25:00",
    "2024-13-01T00:00:00Z",
    "2024-02-30",
    "9999-12-31T23:59:59Z",
    "0000-01-01",
    "1713798477",
    "yesterday",
    "2024-01-01'--",
    "' OR 1=1 --",
    '"; DROP TABLE users; --',
    "%",
    "%zz",
    "%00",
    "%ff%fe",
    "\u202e",
    "a" * 5000,
    "MTcxMzc5ODQ3NzAwMDAwMC4x",
    "=",
    "&&",
    "../../etc/passwd",
    "<script>",
]
FIELD_VALUES = [
    "alice",
    "",
    "ab",
    "a" * 65,
    "a" * 10000,
    "admin",
    "x' OR '1'='1",
    "nul\x00l",
    "é" * 40,
    "p" * 73,
    "password-1",
    0,
    -1,
    1.5,
    True,
    None,
    [],
    {},
    ["a"],
    {"$ne": ""},
    1e308,
    "\ud800",
    "\u0000",
    "root",
    "user name",
    "a@b.c",
]
CONTENT_TYPES = [
    "application/json",
    "application/x-www-form-urlencoded",
    "text/plain",
    "",
    "multipart/form-data; boundary=x",
    "application/json; charset=latin-1",
    "application/problem+json",
    "application/json, text/plain",
    "*/*",
    "application/xml",
]
METHODS = [
    "GET",
    "POST",
    "HEAD",
    "PUT",
    "DELETE",
    "PATCH",
    "OPTIONS",
    "TRACE",
    "CONNECT",
    "BREW",
    "get",
    "M-SEARCH",
    "PROPFIND",
]


def _paths() -> list[str]:
    base = sorted({path for _, path, _ in api.ROUTES})
    mutated = []
    for path in base:
        mutated += [
            path,
            path + "/",
            path.upper(),
            "/" + path,
            path + "%00",
            path.replace("/", "%2f"),
            path + "/..",
            path + ";x",
            path + "%20",
            path.replace("a", "%61"),
            path + "#frag",
        ]
    return mutated + [
        "/",
        "/nowhere",
        "/api",
        "/auth",
        "/docs",
        "/openapi.json",
        "/metrics",
        "/%ff",
        "/..%2f..%2fetc/passwd",
        "/" + "a" * 3000,
    ]


class Generator:
    """Semantic mutations: (method, target, headers, body) for http.client."""

    def __init__(self, rng: random.Random, tokens: dict[str, str]):
        self.rng, self.tokens, self.paths = rng, tokens, _paths()

    def request(self) -> tuple[str, str, dict[str, str], bytes | None]:
        rng = self.rng
        if rng.random() < 0.7:  # a real route, mostly with its own method: reach the handlers
            method, path, _ = rng.choice(api.ROUTES)
            method = method if rng.random() < 0.8 else rng.choice(METHODS)
        else:
            method, path = rng.choice(METHODS), rng.choice(self.paths)
        return method, path + self.query(path), self.headers(), self.body()

    def query(self, path: str) -> str:
        rng = self.rng
        if rng.random() < 0.2:
            return ""
        names = PARAMETERS.get(path.rstrip("/"), []) + JUNK_NAMES
        count = rng.choice([1, 1, 1, 2, 2, 3, 5] * 3 + [40])  # 40: past the query-parameter cap
        pairs = [(rng.choice(names), rng.choice(VALUES)) for _ in range(count)]
        if rng.random() < 0.15:  # hand-made, possibly broken, encoding
            return "?" + "&".join(f"{n}={v}" for n, v in pairs).replace(" ", "%20")[:4000]
        return "?" + urlencode(pairs)

    def headers(self) -> dict[str, str]:
        rng = self.rng
        headers: dict[str, str] = {}
        auth = rng.choice(
            list(self.tokens)
            + ["none", "junk", "basic", "empty", "refresh", "huge", "none-alg", "lower"]
        )
        token = self.tokens.get(auth)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif auth == "junk":
            headers["Authorization"] = "Bearer " + "".join(
                rng.choice("ab.-_=+/") for _ in range(40)
            )
        elif auth == "basic":
            headers["Authorization"] = "Basic YWRtaW46YWRtaW4="
        elif auth == "empty":
            headers["Authorization"] = "Bearer "
        elif auth == "refresh":
            headers["Authorization"] = f"Bearer {self.tokens['refresh-token']}"
        elif auth == "huge":
            headers["Authorization"] = "Bearer " + "a.b." + "c" * 9000
        elif auth == "none-alg":
            headers["Authorization"] = "Bearer " + self.tokens["alg-none"]
        elif auth == "lower":
            headers["Authorization"] = "bearer " + self.tokens["admin"]
        if rng.random() < 0.7:
            headers["Content-Type"] = rng.choice(CONTENT_TYPES)
        if rng.random() < 0.2:
            headers["X-Request-ID"] = rng.choice(["ok-1", "a" * 300, "a b", "é", "<x>", ""])
        if rng.random() < 0.1:
            headers[rng.choice(["Accept", "Origin", "Cookie", "Range", "If-None-Match"])] = (
                rng.choice(VALUES)[:100]
            )
        return headers

    def body(self) -> bytes | None:
        rng = self.rng
        kind = rng.random()
        if kind < 0.2:
            return None
        fields = {
            rng.choice(["username", "password", "refresh_token", "role", "x", ""]): rng.choice(
                FIELD_VALUES
            )
            for _ in range(rng.choice([0, 1, 2, 2, 3]))
        }
        if kind < 0.6:
            return json.dumps(fields).encode("utf-8", "surrogatepass")
        if kind < 0.8:
            text = urlencode(
                {k: str(v) for k, v in fields.items()}, errors="surrogatepass"
            ).encode()
            return text if rng.random() < 0.8 else text + b"&%zz=&&==" + bytes([rng.randrange(256)])
        return rng.choice(
            [
                b"{",
                b"[]",
                b"null",
                b'{"username": NaN}',
                b'{"a":1,"a":2}',
                b"\xff\xfe{}",
                b"[" * 40 + b"]" * 40,
                b'{"username": "\\ud800"}',
                b"\x00" * 10,
                b"1e999999",
                b'{"password": "' + b"x" * 60000 + b'"}',
                b"a=1&a=2",
                b"=" * 100,
            ]
        )


def framing_case(rng: random.Random) -> bytes:
    """One request whose framing is broken in some way (or not: a few are fine)."""
    method = rng.choice(["GET", "POST", "G ET", "", "GET\x00", "\x16\x03\x01", "GET" * 3000, "PRI"])
    target = rng.choice(
        [
            "/healthz",
            "/api/data",
            "*",
            "http://x/healthz",
            "healthz",
            "/a b",
            "",
            "/healthz?" + "a=1&" * 50,
            "/" + "x" * 9000,
            "//",
            "/%",
            "/\x7f",
        ]
    )
    version = rng.choice(
        [
            "HTTP/1.1",
            "HTTP/1.0",
            "HTTP/2.0",
            "HTTP/0.9",
            "HTTP/1.1x",
            "",
            "http/1.1",
            "HTTP/1.10",
            "HTTP/1",
        ]
    )
    line = f"{method} {target} {version}".encode("latin-1")
    if rng.random() < 0.1:
        line = rng.choice(
            [b"GET /healthz", b"GET  /healthz  HTTP/1.1", b"\r\n", b"GET\t/healthz\tHTTP/1.1"]
        )
    headers = [b"Host: x"] if rng.random() < 0.8 else []
    for _ in range(rng.choice([0, 1, 2, 3])):
        headers.append(
            rng.choice(
                [
                    b"Host: y",
                    b"NoColon",
                    b": empty-name",
                    b"Bad Name: x",
                    b" folded: x",
                    b"X-A: a\x00b",
                    b"X-A: a\x01b",
                    b"X-Long: " + b"x" * 20000,
                    b"Content-Length: 5",
                    b"Content-Length: abc",
                    b"Content-Length: -1",
                    b"Content-Length: 99999999999999999999",
                    b"Transfer-Encoding: chunked",
                    b"Transfer-Encoding: identity",
                    b"Expect: 100-continue",
                    b"Expect: something",
                    b"Connection: close",
                    b"Connection: keep-alive, upgrade",
                    b"Upgrade: websocket",
                    b"X-Request-ID: a\rb",
                    b"Content-Type: application/json",
                    b"Authorization: Bearer a.b.c",
                    b"Authorization: x",
                    b"\xff\xfe: x",
                    b"X-Utf8: \xc3\xa9",
                ]
            )
        )
    if rng.random() < 0.05:
        headers += [b"X-Many: 1"] * 70  # past the header-count cap
    ending = b"\r\n" if rng.random() < 0.9 else b"\n"
    body = rng.choice([b"", b"", b"hello", b"{}", b"0\r\n\r\n"])
    if body and not any(h.lower().startswith(b"content-length") for h in headers):
        headers.append(b"Content-Length: %d" % len(body))
    return ending.join([line, *headers]) + ending + ending + body


def send_raw(address: tuple[str, int], data: bytes) -> bytes:
    """Send one framing case; return everything answered until the server closes."""
    with socket.create_connection(address, timeout=5) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-send (e.g. an oversized line): the answer is still readable
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if _complete(answer):
                    break
        except ConnectionResetError:
            pass
    return answer


def _complete(answer: bytes) -> bool:
    answer = answer.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")  # interim: read on
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


def test_a_thousand_malformed_requests_get_answers_never_a_5xx_and_the_service_still_works(
    service_factory, clean_db
):
    service = service_factory(socket_timeout_s=0.5, login_max_failures=1000)
    host, port = service.http.server_address[:2]
    create_user(clean_db, "root", "root-password", "admin")
    create_user(clean_db, "reader", "reader-password")
    plain = Client(service.url)
    admin_pair = login(plain, "root", "root-password")
    claims = {"sub": "root", "role": "admin", "type": "access", "exp": 2**40}
    payload = jwt.encode(claims, ACCESS_KEY).split(".")[1]
    tokens = {
        "admin": admin_pair["access_token"],
        "user": login(plain, "reader", "reader-password")["access_token"],
        "refresh-token": admin_pair["refresh_token"],
        "alg-none": "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0." + payload + ".",  # {"alg":"none"}
        "other-key": jwt.encode(claims, REFRESH_KEY),
    }
    rng = random.Random(SEED)
    generator = Generator(rng, tokens)
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    started = time.monotonic()

    conn = http.client.HTTPConnection(host, port, timeout=10)
    sent = 0
    while sent < SEMANTIC_CASES:
        method, target, headers, body = generator.request()
        try:
            conn.request(method, target, body=body, headers=headers)
        except (http.client.InvalidURL, ValueError, UnicodeEncodeError):
            conn.close()  # http.client refused to send it (the raw cases cover such bytes)
            conn = http.client.HTTPConnection(host, port, timeout=10)
            continue
        sent += 1
        try:
            response = conn.getresponse()
            answer = response.read()
        except (http.client.HTTPException, OSError) as error:
            failures.append(f"no answer to {method} {target[:80]} {headers}: {error!r}")
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=10)
            continue
        statuses[response.status] += 1
        if response.status >= 500 or (
            response.status >= 400 and method != "HEAD" and not _is_json(answer)
        ):
            failures.append(
                f"{response.status} for {method} {target[:80]} {str(headers)[:300]}: "
                f"{answer[:200]!r}"
            )
        if response.will_close:
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.close()

    for _ in range(FRAMING_CASES):
        data = framing_case(rng)
        answer = send_raw((host, port), data)
        if not answer.startswith(b"HTTP/1.1 "):
            failures.append(f"no answer to raw {data[:120]!r}: {answer[:80]!r}")
            continue
        status = int(answer.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")[9:12])
        statuses[status] += 1
        if status >= 500 and status != 505:  # 505: an HTTP version we do not speak (RFC 9110)
            failures.append(f"{status} for raw {data[:120]!r}: {answer[:300]!r}")

    elapsed = time.monotonic() - started
    total = sum(statuses.values())
    print(
        f"\nfuzz: {total} malformed requests ({SEMANTIC_CASES} semantic, {FRAMING_CASES} framing) "
        f"in {elapsed:.1f} s, statuses {dict(sorted(statuses.items()))}"
    )
    assert failures == [], "\n".join(failures[:20])
    assert total >= 1000

    after = Client(service.url)
    assert after.get("/healthz").status == 200
    assert after.get("/readyz").status == 200
    # A fresh login: the fuzz may have logged the reader's session out (or changed nothing).
    reader = login(after, "reader", "reader-password")["access_token"]
    assert after.get("/api/data", token=reader).status == 200
    assert (
        after.post("/auth/signup", body={"username": "after-fuzz", "password": "password-1"}).status
        == 201
    )
    assert login(after, "after-fuzz", "password-1")["token_type"] == "bearer"


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True
