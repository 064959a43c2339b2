"""`/docs` in a real headless Chromium, driven over the DevTools protocol with the stdlib only.

The page must load with no console error and no request leaving the service's host:port; a
person logs in as admin from the page's form and calls populate and then data from the page's
try-it forms, and the page shows the 200s and the stored point. The browser is Debian's
`chromium` (`apt-get install -y chromium`); without it the browser tests are skipped. The
headers and the redirect from `/` are checked without a browser.

The DevTools client below is a minimal WebSocket (RFC 6455) client: handshake, masked text
frames out, fragmented frames in.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import time
from urllib.parse import urlsplit

import pytest

from support import create_user

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    """The browser named by DATAPROC_CHROMIUM, else the first Chromium on PATH."""
    configured = os.environ.get("DATAPROC_CHROMIUM")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    return next((path for name in CHROMIUM_CANDIDATES if (path := shutil.which(name))), None)


# --- the page without a browser -------------------------------------------------------------


def test_root_redirects_to_the_chart_page(client):
    reply = client.get("/")
    assert reply.status == 307
    assert reply.headers["Location"] == "/view"


def test_docs_page_is_html_with_a_strict_content_security_policy(client):
    reply = client.get("/docs")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/html; charset=utf-8"
    assert reply.headers["Cache-Control"] == "no-cache"
    policy = reply.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy
    assert reply.body.startswith(b"<!DOCTYPE html>")


def test_docs_page_names_no_other_host():
    from dataproc import openapi

    page = openapi.docs_html().decode("utf-8")
    assert not re.search(r"(?i)\b(src|href|action)\s*=\s*[\"']?(https?:|//)", page)
    assert not re.search(r"(?i)https?://", page), "the page must not name any URL"
    assert '<link rel="icon" href="data:,">' in page
    assert "@import" not in page and "url(" not in page


# --- a DevTools protocol client -------------------------------------------------------------


class DevTools:
    """One WebSocket to the browser; commands by id, events kept in arrival order."""

    def __init__(self, ws_url: str, timeout_s: float = 20.0):
        parts = urlsplit(ws_url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout_s)
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        self.sock.sendall(
            (
                f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, "DevTools closed during the handshake"
            head += chunk
        head, self._buffer = head.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self._ids = itertools.count(1)
        self.events: list[dict] = []

    def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _receive(self) -> dict:
        message = b""
        while True:
            first, second = self._read(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if second & 0x80 else None
            payload = self._read(length)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            opcode = first & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools sent close")
            if opcode in (0x9, 0xA):  # ping/pong: Chromium does not ping; ignore either way
                continue
            message += payload
            if first & 0x80:  # FIN
                return json.loads(message)

    def _send(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        header = bytes([0x81])  # FIN + text
        if len(data) < 126:
            header += bytes([0x80 | len(data)])
        elif len(data) < 65536:
            header += bytes([0x80 | 126]) + struct.pack(">H", len(data))
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", len(data))
        mask = secrets.token_bytes(4)  # RFC 6455 §5.3: a client masks every frame
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def call(self, method: str, session: str | None = None, **params) -> dict:
        """Send a command and wait for its answer; events that arrive meanwhile are kept."""
        ident = next(self._ids)
        message = {"id": ident, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self._send(message)
        while True:
            received = self._receive()
            if received.get("id") == ident:
                assert "error" not in received, (method, received["error"])
                return received.get("result", {})
            if "method" in received:
                self.events.append(received)

    def close(self) -> None:
        self.sock.close()


class Page:
    """A page target attached in flat mode, with helpers to evaluate and wait."""

    def __init__(self, tools: DevTools):
        self.tools = tools
        target = tools.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = tools.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Runtime", "Log", "Network", "Page"):
            tools.call(f"{domain}.enable", self.session)

    def evaluate(self, expression: str):
        result = self.tools.call(
            "Runtime.evaluate",
            self.session,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 15.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}")

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries seen so far."""
        found = []
        for event in self.tools.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(f"console.{params['type']}: {params.get('args')}")
            elif method == "Runtime.exceptionThrown":
                found.append(f"exception: {params.get('exceptionDetails')}")
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        return found

    def requested_urls(self) -> list[str]:
        return [
            e["params"]["request"]["url"]
            for e in self.tools.events
            if e["method"] == "Network.requestWillBeSent"
        ]


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium with its DevTools endpoint; skipped when none is installed."""
    executable = find_browser()
    if executable is None:
        pytest.skip("no Chromium installed (apt-get install -y chromium, or set DATAPROC_CHROMIUM)")
    args = [
        executable,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-dev-shm-usage",
        "--remote-debugging-port=0",
        "--remote-debugging-address=127.0.0.1",
        f"--user-data-dir={tmp_path / 'profile'}",
        "about:blank",
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        ws_url = None
        while ws_url is None and time.monotonic() < deadline:
            line = process.stderr.readline().decode("utf-8", "replace")
            if not line and process.poll() is not None:
                break
            match = re.search(r"DevTools listening on (ws://\S+)", line)
            ws_url = match[1] if match else None
        if ws_url is None:
            pytest.fail(f"{executable} did not report its DevTools endpoint")
        # Keep draining stderr so a chatty browser never blocks on a full pipe.
        import threading

        threading.Thread(target=lambda: process.stderr.read(), daemon=True).start()
        tools = DevTools(ws_url)
        yield tools
        tools.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_docs_page_loads_offline_logs_in_and_calls_populate_then_data(browser, service, clean_db):
    create_user(clean_db, "root", "root-password", "admin")
    page = Page(browser)
    base = service.url.rstrip("/")
    browser.call("Page.navigate", page.session, url=base + "/docs")
    page.wait_for("document.body && document.body.dataset.ready === 'true'")
    assert page.evaluate("location.pathname") == "/docs"
    operations = page.evaluate("[...document.querySelectorAll('section.op')].map(s => s.id)")
    assert {
        "op-signup",
        "op-login",
        "op-refresh",
        "op-data",
        "op-populate",
        "op-populate_post",
        "op-healthz",
        "op-readyz",
        "op-metrics",
        "op-openapi",
        "op-docs",
        "op-root",
    } <= set(operations)
    assert page.evaluate("document.querySelectorAll('#op-data [data-param]').length") >= 5

    page.evaluate("""(() => {
        document.getElementById('login-username').value = 'root';
        document.getElementById('login-password').value = 'root-password';
        document.getElementById('login-button').click();
    })()""")
    page.wait_for(
        "document.getElementById('login-status').textContent.startsWith('Logged in as root')"
    )
    assert page.evaluate("sessionStorage.getItem('dataproc.access_token')").count(".") == 2

    page.evaluate("document.querySelector('#op-populate button.send').click()")
    page.wait_for("document.querySelector('#op-populate .result').dataset.status")
    assert page.evaluate("document.querySelector('#op-populate .result').dataset.status") == "200"
    stored = json.loads(
        page.evaluate("document.querySelector('#op-populate .response-body').textContent")
    )
    assert isinstance(stored["id"], int)

    page.evaluate("""(() => {
        const form = document.querySelector('#op-data form.try');
        form.querySelector('[data-param=limit]').value = '1000';
        form.querySelector('button.send').click();
    })()""")
    page.wait_for("document.querySelector('#op-data .result').dataset.status")
    assert page.evaluate("document.querySelector('#op-data .result').dataset.status") == "200"
    points = json.loads(
        page.evaluate("document.querySelector('#op-data .response-body').textContent")
    )
    assert stored["id"] in [point["id"] for point in points]
    assert page.evaluate("document.querySelector('#op-data .status').textContent").startswith("200")
    headers_shown = page.evaluate(
        "document.querySelector('#op-data .response-headers').textContent"
    )
    assert "x-request-id:" in headers_shown

    browser.call("Runtime.evaluate", page.session, expression="0")  # collect late events
    assert page.problems() == []
    origin = urlsplit(service.url).netloc
    urls = page.requested_urls()
    assert any(url.endswith("/openapi.json") for url in urls)
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme in ("data", "about"):
            continue  # never leaves the page
        assert (parts.scheme, parts.netloc) == ("http", origin), f"request to {url}"
