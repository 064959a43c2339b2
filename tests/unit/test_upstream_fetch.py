"""Tests for dataproc.upstream.fetch: the bounded GET, over real sockets to a real server."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dataproc.upstream.fetch import UpstreamError, UpstreamTimeout
from dataproc.upstream.fetch import get as _get

GOOD = {"time": 1713798477, "value": [157, 42, 76, 190], "tags": []}
MAX_BYTES = 65536  # the service's default (Config.upstream_max_bytes)


def fetch(url: str, *, timeout_s: float, max_bytes: int = MAX_BYTES) -> bytes:
    """fetch.get with the service's default size cap, as ingest calls it."""
    return _get(url, timeout_s=timeout_s, max_bytes=max_bytes)


# --------------------------------------------------------------------------- fetch: a real upstream

GOOD_BODY = json.dumps(GOOD).encode()
SHORT_TIMEOUT_S = 0.3


class _Upstream(BaseHTTPRequestHandler):
    """A misbehaving upstream; each path is one way to answer."""

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def do_GET(self):
        route = getattr(self, "route_" + self.path.strip("/").replace("-", "_"), None)
        try:
            (route or self.route_missing)()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as the timeout tests intend

    def _answer(self, status, body, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def route_missing(self):
        self._answer(404, b'{"detail":"Not Found"}')

    def route_good(self):
        self._answer(200, GOOD_BODY)

    def route_headers(self):
        seen = {"user-agent": self.headers.get("User-Agent"), "accept": self.headers.get("Accept")}
        self._answer(200, json.dumps(seen).encode())

    def route_error(self):
        self._answer(500, b'{"detail":"boom"}')

    def route_big_error(self):
        self._answer(503, b"e" * 70000)

    def route_big(self):
        self._answer(200, b"x" * 70000)

    def route_exact(self):
        self._answer(200, b"y" * 100)

    def route_slow(self):
        time.sleep(2)
        self._answer(200, GOOD_BODY)

    def route_trickle(self):
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        for _ in range(100):
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(0.1)

    def route_trickle_headers(self):
        self.wfile.write(b"HTTP/1.0 200 OK\r\n")
        for _ in range(100):
            self.wfile.write(b"X-Slow: 1\r\n")
            self.wfile.flush()
            time.sleep(0.1)

    def route_drop(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b'{"time": 17')
        self.wfile.flush()
        self.close_connection = True

    def route_hang_up(self):
        self.close_connection = True  # close without a single byte of answer

    def route_garbage(self):
        self.wfile.write(b"this is not HTTP\r\n\r\n")
        self.close_connection = True

    def route_chunked(self):
        self.protocol_version = "HTTP/1.1"
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(GOOD_BODY), GOOD_BODY))
        self.close_connection = True

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_to_good(self):
        self._redirect("/good")

    def route_to_file(self):
        self._redirect("file:///etc/passwd")

    def route_to_ftp(self):
        self._redirect("ftp://127.0.0.1/etc/passwd")

    def route_loop(self):
        self._redirect("/loop")


@pytest.fixture(scope="module")
def upstream():
    """Base URL of a real HTTP server on a loopback port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True  # sleeping handlers must not hold up teardown
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def dead_port():
    """A loopback port nothing listens on: bound to learn it, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def upstream_error(url: str, timeout_s: float = 5, **kwargs) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        fetch(url, timeout_s=timeout_s, **kwargs)
    return caught.value


def test_fetch_returns_the_body(upstream):
    assert fetch(upstream + "/good", timeout_s=5) == GOOD_BODY


def test_fetch_sends_user_agent_and_accept(upstream):
    seen = json.loads(fetch(upstream + "/headers", timeout_s=5))
    assert seen == {"user-agent": "dataproc", "accept": "application/json"}


def test_fetch_reads_a_chunked_body(upstream):
    assert fetch(upstream + "/chunked", timeout_s=5) == GOOD_BODY


def test_fetch_follows_a_redirect_to_http(upstream):
    assert fetch(upstream + "/to-good", timeout_s=5) == GOOD_BODY


def test_fetch_accepts_a_body_of_exactly_max_bytes(upstream):
    assert fetch(upstream + "/exact", timeout_s=5, max_bytes=100) == b"y" * 100


def test_fetch_http_500_is_upstream_error_with_body(upstream):
    error = upstream_error(upstream + "/error")
    assert type(error) is UpstreamError
    assert error.reason == "upstream answered HTTP 500"
    assert error.body == b'{"detail":"boom"}'


def test_fetch_http_404_is_upstream_error(upstream):
    assert upstream_error(upstream + "/nothing-here").reason == "upstream answered HTTP 404"


def test_fetch_error_body_is_capped_at_max_bytes(upstream):
    error = upstream_error(upstream + "/big-error")
    assert error.reason == "upstream answered HTTP 503"
    assert error.body == b"e" * 65536


def test_fetch_oversized_answer_is_upstream_error_with_first_bytes(upstream):
    error = upstream_error(upstream + "/big")
    assert type(error) is UpstreamError
    assert error.reason == "upstream answer over 65536 bytes"
    assert error.body == b"x" * 65537


def test_fetch_oversize_follows_max_bytes(upstream):
    error = upstream_error(upstream + "/exact", max_bytes=99)
    assert error.reason == "upstream answer over 99 bytes"
    assert error.body == b"y" * 100


def test_fetch_slow_answer_is_upstream_timeout(upstream):
    started = time.monotonic()
    error = upstream_error(upstream + "/slow", timeout_s=SHORT_TIMEOUT_S)
    assert isinstance(error, UpstreamTimeout)
    assert error.reason == "upstream did not answer within 0.3 s"
    assert time.monotonic() - started < 1.5


def test_fetch_trickling_body_times_out_at_the_total_deadline(upstream):
    # Every byte comes within the per-operation timeout; only a total deadline stops it.
    started = time.monotonic()
    error = upstream_error(upstream + "/trickle", timeout_s=0.5)
    assert isinstance(error, UpstreamTimeout)
    assert time.monotonic() - started < 1.5


def test_fetch_trickling_headers_time_out_at_the_total_deadline(upstream):
    started = time.monotonic()
    error = upstream_error(upstream + "/trickle-headers", timeout_s=0.5)
    assert isinstance(error, UpstreamTimeout)
    assert time.monotonic() - started < 1.5


def test_fetch_dropped_mid_body_is_upstream_error(upstream):
    error = upstream_error(upstream + "/drop")
    assert type(error) is UpstreamError
    assert error.reason == "upstream closed the connection mid-answer"


def test_fetch_hang_up_before_answering_is_upstream_error(upstream):
    error = upstream_error(upstream + "/hang-up")
    assert error.reason == "upstream closed the connection mid-answer"


def test_fetch_non_http_answer_is_upstream_error(upstream):
    assert upstream_error(upstream + "/garbage").reason.startswith("upstream sent a malformed")


def test_fetch_refuses_a_redirect_to_file(upstream):
    error = upstream_error(upstream + "/to-file")
    assert "file" in error.reason
    assert error.body is None


def test_fetch_refuses_a_redirect_to_ftp(upstream):
    assert "ftp" in upstream_error(upstream + "/to-ftp").reason


def test_fetch_redirect_loop_is_upstream_error(upstream):
    assert upstream_error(upstream + "/loop").reason == "upstream answered HTTP 302"


def test_fetch_https_to_a_plain_http_server_is_upstream_error(upstream):
    error = upstream_error(upstream.replace("http://", "https://") + "/good")
    assert type(error) is UpstreamError
    assert error.reason.startswith("upstream unreachable:")


def test_fetch_refused_port_is_upstream_unreachable(dead_port):
    error = upstream_error(f"http://127.0.0.1:{dead_port}/")
    assert type(error) is UpstreamError
    assert error.reason.startswith("upstream unreachable:")
    assert error.body is None


def test_fetch_unknown_host_is_upstream_unreachable():
    assert upstream_error("http://nonexistent.invalid/").reason.startswith("upstream unreachable:")


def test_fetch_refuses_a_file_url():
    error = upstream_error("file:///etc/passwd")
    assert type(error) is UpstreamError
    assert "file" in error.reason


def test_fetch_refuses_an_ftp_url():
    assert "ftp" in upstream_error("ftp://127.0.0.1/etc/passwd").reason


def test_fetch_refuses_a_url_without_host():
    assert upstream_error("http:///good").reason.startswith("invalid upstream URL")


def test_fetch_refuses_a_url_with_a_bad_port():
    assert upstream_error("http://127.0.0.1:notaport/").reason.startswith("invalid upstream URL")


def test_fetch_ignores_http_proxy_from_the_environment(upstream, dead_port, monkeypatch):
    dead_proxy = f"http://127.0.0.1:{dead_port}"
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert urllib.request.getproxies()["http"] == dead_proxy  # a default opener would use it
    assert fetch(upstream + "/good", timeout_s=5) == GOOD_BODY


def test_fetch_refuses_a_non_positive_timeout(upstream):
    with pytest.raises(ValueError):
        fetch(upstream + "/good", timeout_s=0)
