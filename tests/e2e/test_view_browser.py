"""`/view` in a real headless Chromium, driven over the DevTools protocol (the client and the
browser fixture of `test_docs_browser.py`).

A person logs in from the page's form and sees the chart drawn from the summary (as many
buckets as the summary has for that window, a mark per bucket with invalid points), drags
across it to zoom (the raw points appear once the window holds 2,000 or fewer), pans with the
keyboard, reads the latest points in the table and downloads the window as CSV; no console
error, no request off the host. The run saves `docs/view.png`, the README's screenshot. The page's headers are checked
without a browser.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import random
import re
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode, urlsplit

from e2e.test_docs_browser import Page, browser  # noqa: F401 - `browser` is a fixture

from dataproc import store
from dataproc.api import service as service_handlers
from support import REPO, Client, create_user, login

SCREENSHOT = REPO / "docs" / "view.png"


def test_view_page_is_html_with_the_docs_pages_strict_policy(client):
    reply = client.get("/view")
    docs = client.get("/docs")
    assert reply.status == 200 and reply.body.startswith(b"<!DOCTYPE html>")
    for name in ("Content-Type", "Content-Security-Policy", "X-Frame-Options", "Referrer-Policy"):
        assert reply.headers[name] == docs.headers[name], name


def test_view_page_names_no_other_host():
    page = service_handlers.view_html().decode("utf-8")
    assert not re.search(r"(?i)\b(src|href|action)\s*=\s*[\"']?(https?:|//)", page)
    # The one URL is SVG's namespace name, an identifier the browser never fetches.
    assert re.findall(r"(?i)https?://[^\s\"']+", page) == ["http://www.w3.org/2000/svg"]
    assert '<link rel="icon" href="data:,">' in page
    assert "@import" not in page and "url(" not in page


def seed(pool) -> None:
    """3000 points over the last day: a noisy sine, one in twenty invalid, a few non-finite."""
    rng = random.Random(7)
    now = datetime.now(UTC)
    rows = []
    for i in range(3000):
        when = now - timedelta(seconds=86400 * (1 - i / 3000) - rng.random())
        value = math.sin(i / 240) * 2 + rng.gauss(0, 0.35)
        valid = rng.random() > 0.05
        if rng.random() < 0.003:
            value, valid = math.nan, False
        rows.append((when, value, valid))
    with store.connection(pool) as conn, conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO data_points (time, value, valid, tags) VALUES (%s, %s, %s, %s)",
            [(t, v, ok, [] if ok else ["suspect"]) for t, v, ok in rows],
        )


def chart_state(page: Page) -> dict:
    return page.evaluate("""(() => {
        const chart = document.getElementById('chart');
        return {start: chart.dataset.start, end: chart.dataset.end,
                buckets: Number(chart.dataset.buckets), bucketS: Number(chart.dataset.bucketS),
                raw: Number(chart.dataset.raw),
                vertices: Number(chart.querySelector('path.mean').dataset.vertices),
                circles: chart.querySelectorAll('circle.raw').length,
                invalid: chart.querySelectorAll('.invalid-mark').length,
                rows: document.querySelectorAll('#latest tbody tr').length,
                firstRow: (document.querySelector('#latest tbody tr td') || {}).textContent};
    })()""")


def summary_of(client: Client, token: str, state: dict) -> dict:
    params = {"start": state["start"], "end": state["end"], "bucket": str(state["bucketS"])}
    reply = client.get("/api/data/summary?" + urlencode(params), token=token)
    assert reply.status == 200, reply.body
    return reply.json()


def points_of(client: Client, token: str, start: str, end: str) -> list[dict]:
    found, path = [], "/api/data?" + urlencode({"start": start, "end": end, "limit": 1000})
    while path:
        reply = client.get(path, token=token)
        found += reply.json()
        link = reply.headers.get("Link")
        path = link[1 : link.index(">")] if link else None
    return found


def assert_drawn_as_summarised(state: dict, summary: dict) -> None:
    buckets = summary["buckets"]
    assert state["buckets"] == len(buckets) > 0
    assert state["vertices"] == sum(b["mean"] is not None for b in buckets)
    assert state["invalid"] == sum(b["valid"] < b["count"] for b in buckets)  # an admin


def drag(tools, page: Page, from_fraction: float, to_fraction: float) -> None:
    box = page.evaluate(
        "(() => { const r = document.getElementById('chart').getBoundingClientRect();"
        " return [r.left, r.top, r.width, r.height]; })()"
    )
    left, top, width, height = box
    plot_left, plot_width = left + width * 62 / 960, width * (960 - 62 - 14) / 960
    y = top + height / 2
    x0, x1 = plot_left + plot_width * from_fraction, plot_left + plot_width * to_fraction
    events = [
        ("mousePressed", x0),
        ("mouseMoved", (x0 + x1) / 2),
        ("mouseMoved", x1),
        ("mouseReleased", x1),
    ]
    for kind, x in events:
        tools.call(
            "Input.dispatchMouseEvent",
            page.session,
            type=kind,
            x=x,
            y=y,
            button="left",
            buttons=0 if kind == "mouseReleased" else 1,
            clickCount=1,
        )


def test_view_logs_in_draws_zooms_pans_lists_and_downloads(browser, service, clean_db, tmp_path):  # noqa: F811 - the imported fixture
    create_user(clean_db, "root", "root-password", "admin")
    seed(clean_db)
    client = Client(service.url)
    token = login(client, "root", "root-password")["access_token"]
    page = Page(browser)
    browser.call(
        "Emulation.setDeviceMetricsOverride",
        page.session,
        width=1280,
        height=900,
        deviceScaleFactor=1,
        mobile=False,
    )
    base = service.url.rstrip("/")
    browser.call("Page.navigate", page.session, url=base + "/")  # via the redirect to /view
    page.wait_for("document.body && document.body.dataset.ready === 'true'")
    assert page.evaluate("location.pathname") == "/view"

    page.evaluate("""(() => {
        document.getElementById('login-username').value = 'root';
        document.getElementById('login-password').value = 'root-password';
        document.getElementById('login-button').click();
    })()""")
    page.wait_for(
        "document.getElementById('login-status').textContent.startsWith('Logged in as root')"
    )
    page.wait_for("document.querySelectorAll('#latest tbody tr').length > 0")
    # The token lives in the page's memory only.
    assert (
        page.evaluate("sessionStorage.length + localStorage.length + document.cookie.length") == 0
    )

    whole = chart_state(page)
    assert whole["bucketS"] == 300  # a day of points: 5-minute buckets (288 or 289 of them)
    assert_drawn_as_summarised(whole, summary_of(client, token, whole))
    assert whole["raw"] == 0 and whole["circles"] == 0  # 3000 points: the summary only
    every = points_of(client, token, whole["start"], whole["end"])
    assert whole["rows"] == 20 and whole["firstRow"] == every[-1]["time"]
    SCREENSHOT.parent.mkdir(exist_ok=True)
    shot = browser.call("Page.captureScreenshot", page.session, format="png")
    SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))

    drag(browser, page, 0.40, 0.70)  # 30% of a day: about 900 points, so the raw ones show
    page.wait_for(
        f"document.getElementById('chart').dataset.start !== {json.dumps(whole['start'])}"
    )
    page.wait_for("document.getElementById('chart').dataset.raw !== '0'")
    zoomed = chart_state(page)
    assert whole["start"] < zoomed["start"] < zoomed["end"] < whole["end"]
    assert_drawn_as_summarised(zoomed, summary_of(client, token, zoomed))
    shown = points_of(client, token, zoomed["start"], zoomed["end"])
    assert zoomed["raw"] == len(shown) <= 2000
    assert zoomed["circles"] == sum(p["value"] is not None for p in shown)
    assert zoomed["firstRow"] == shown[-1]["time"]

    page.evaluate("document.getElementById('chart').focus()")
    assert page.evaluate("document.activeElement.id") == "chart"
    for kind in ("keyDown", "keyUp"):
        browser.call(
            "Input.dispatchKeyEvent",
            page.session,
            type=kind,
            key="ArrowLeft",
            code="ArrowLeft",
            windowsVirtualKeyCode=37,
        )
    page.wait_for(
        f"document.getElementById('chart').dataset.start !== {json.dumps(zoomed['start'])}"
    )
    page.wait_for("!document.getElementById('status').textContent.startsWith('Loading')")
    panned = chart_state(page)
    assert panned["start"] < zoomed["start"] and panned["end"] < zoomed["end"]
    assert_drawn_as_summarised(panned, summary_of(client, token, panned))

    # Download the (panned) window as CSV: the file holds the window's points, as /api/data.
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))
    page.evaluate("document.getElementById('download-csv').click()")
    page.wait_for("document.getElementById('status').textContent.startsWith('Downloaded')")
    deadline = time.monotonic() + 15
    while not (downloads / "data_points.csv").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    rows = list(csv.reader(io.StringIO((downloads / "data_points.csv").read_text(), newline="")))
    in_window = points_of(client, token, panned["start"], panned["end"])
    assert rows[0] == ["id", "time", "value", "valid", "tags"]
    assert [int(row[0]) for row in rows[1:]] == [p["id"] for p in in_window]

    browser.call("Runtime.evaluate", page.session, expression="0")  # collect late events
    assert page.problems() == []
    origin = urlsplit(service.url).netloc
    urls = page.requested_urls()
    assert any("/api/data/summary" in url for url in urls)
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme in ("data", "about", "blob"):
            continue  # never leaves the page
        assert (parts.scheme, parts.netloc) == ("http", origin), f"request to {url}"
    client.close()
