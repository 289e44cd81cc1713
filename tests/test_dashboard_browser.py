"""The dashboard in a real browser: headless Chromium (tests/browser.py) on two real sites.

    Chromium ──HTTP── site A's metrics listener: GET /, /?part=live, /api/events, /static/*
    Chromium ──HTTP── site B's metrics listener
    site A: qkdgw run ══ mTLS peer channel ══ site B: qkdgw run     (a rekey every 2 s)
          └────── KME-A ═══ qkdgw kms-sim ═══ KME-B ──────┘         (outages on demand)

What the operator sees must be what `qkdgw status --json` says (epochs, fingerprints), the
plots must grow as the link rekeys, a KMS outage must show as a PQC-only span and an alarm,
nothing may be fetched from off this host, and no response may carry key bytes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.web.dashboard import SECURITY_HEADERS
from tests.browser import Browser, chromium_path
from tests.gateway.sites import Sites
from tests.helpers import qkdgw_command

#: A rekey every 2 s, PQC-only while the KMS cannot deliver (so an outage shows as a span).
POLICY = {"interval": 2.0, "jitter": 0.0, "grace": 0.5, "hard_lifetime": 30.0,
          "mode": "pqc-fallback"}
#: Waits in this module poll; this bounds each (the page updates within about a second).
WAIT = 20.0


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    if chromium_path() is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with Sites(tmp_path_factory.mktemp("dashboard"), POLICY).start() as s:
        s.wait_until("both sites on the same key", s.converged)
        yield s


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with Browser() as b:
        yield b


def dashboard(sites: Sites, site: str) -> str:
    config = yaml.safe_load(sites.config_path(site).read_text())
    return f"http://{config['metrics']['listen']}/"


def status_json(sites: Sites, site: str) -> dict[str, Any]:
    """What the operator's CLI says: `qkdgw status --json`."""
    out = subprocess.run([*qkdgw_command(), "status", "-c", str(sites.config_path(site)),
                          "--json"], capture_output=True, text=True, timeout=30, check=True)
    data: dict[str, Any] = json.loads(out.stdout)
    return data


async def wait_for(what: str, check: Callable[[], Awaitable[Any]], timeout: float = WAIT
                   ) -> Any:
    """Poll CHECK until what it gives is true; that, or fail after TIMEOUT."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


ROW = """(() => { const r = document.querySelector('tr.link[data-link="ab"]');
  return r && {epoch: +r.dataset.epoch, fingerprint: r.dataset.fingerprint,
               condition: r.dataset.condition}; })()"""
MARKS = "document.querySelectorAll('section.plot svg circle.mark.epoch').length"
SAMPLES = "document.querySelectorAll('section.plot svg circle.point.stored_key_count').length"


async def test_the_page_shows_what_status_says_on_both_sites(sites: Sites, browser: Browser
                                                              ) -> None:
    for site in ("a", "b"):
        await browser.load(dashboard(sites, site))
        assert await browser.evaluate("document.getElementById('live').dataset.site") == site
        # Both sites' status, as the CLI has it, epoch by epoch: the page shows one of them
        # and, within a refresh, the newest the CLI had said.
        said: dict[int, str] = {}
        for _ in range(3):
            link = status_json(sites, site)["links"][0]
            said[link["epoch"]] = link["fingerprint"]
            newest = max(said)

            async def caught_up(newest: int = newest) -> Any:
                row = await browser.evaluate(ROW)
                return row if row and row["epoch"] >= newest else None

            row = await wait_for(f"site {site}'s page at epoch {newest}", caught_up)
            if row["epoch"] not in said:  # a newer one: ask the CLI about it too
                link = status_json(sites, site)["links"][0]
                said[link["epoch"]] = link["fingerprint"]
                row = await browser.evaluate(ROW)
            if row["epoch"] in said:
                assert row["fingerprint"] == said[row["epoch"]], (site, row, said)
            await asyncio.sleep(1.0)
        # The same key on both sites: the fingerprints the pages show match each other's
        # audit trails (keyed fingerprints, never the keys).
        epochs = sites.epochs("a")
        row = await browser.evaluate(ROW)
        if row["epoch"] in epochs:
            assert epochs[row["epoch"]] == row["fingerprint"]
    assert browser.off_loopback() == []
    assert not [c for c in browser.console if c.startswith("exception")], browser.console


async def test_the_plots_grow_and_the_page_goes_live(sites: Sites, browser: Browser) -> None:
    await browser.load(dashboard(sites, "a") + "?seconds=300")
    first_marks = await browser.evaluate(MARKS)
    first_samples = await browser.evaluate(SAMPLES)
    assert first_marks > 0

    async def grown() -> Any:
        marks, samples = await browser.evaluate(MARKS), await browser.evaluate(SAMPLES)
        return (marks, samples) if marks > first_marks and samples > first_samples else None

    await wait_for("more rekey marks and KMS samples on the page, without reloading it",
                   grown)
    # The script took the server's change events (not only its fallback timer).
    await wait_for("the page says it is live", lambda: browser.evaluate(
        "document.getElementById('conn').textContent === 'live'"))
    assert browser.off_loopback() == []


async def test_a_kms_outage_shows_as_a_pqc_only_span_and_an_alarm(sites: Sites,
                                                                  browser: Browser) -> None:
    await browser.load(dashboard(sites, "a") + "?seconds=300")
    assert sites.sim is not None
    sites.sim.admin("POST", "/admin/faults", {"kind": "unavailable", "seconds": 8})

    async def shown() -> Any:
        return await browser.evaluate("""(() => {
          const spans = document.querySelectorAll('section.plot rect.span.pqc').length;
          const alarms = [...document.querySelectorAll('tr.link[data-link="ab"] .alarm')]
                           .map(a => a.textContent);
          return spans > 0 && alarms.length > 0 && {spans, alarms}; })()""")

    seen = await wait_for("a PQC-only span and an alarm on the page", shown)
    assert set(seen["alarms"]) & {"kms-unavailable", "qkd-fallback"}, seen
    # While the KME does not answer, its QBER is unknown (not 0, not its last reading).
    await wait_for("the KMS table saying the QBER is unknown", lambda: browser.evaluate(
        """document.querySelector('table.kms td.qber').textContent === 'unknown' &&
           document.querySelector('tr.link[data-link="ab"] .alarm') !== null"""))

    async def back() -> Any:
        row = await browser.evaluate(ROW)
        return row if row and row["condition"] == "qkd" else None

    await wait_for("QKD back in the key after the outage", back, timeout=WAIT + 8)
    spans = await browser.evaluate("""[...document.querySelectorAll(
        'section.plot rect.span')].map(r => r.dataset.condition)""")
    assert "pqc" in spans, spans
    assert spans[-1] == "qkd", spans
    assert browser.off_loopback() == []


async def test_no_response_carries_key_bytes(sites: Sites) -> None:
    """Every route of the dashboard, read while the link rekeys, against every key the sinks
    were given meanwhile (the PSK files: hex; also looked for raw and in base64)."""
    keys: set[bytes] = set()
    bodies: list[bytes] = []
    base = dashboard(sites, "a")
    routes = ["", "?part=live", "?seconds=86400&sort=name", "api/status",
              "api/status?link=ab", "api/history?link=ab&seconds=86400", "metrics",
              "healthz", "static/dashboard.js", "static/dashboard.css"]
    async with aiohttp.ClientSession() as s:
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            for site in ("a", "b"):
                keys.add(bytes.fromhex(sites.psk(site).decode().strip()))
            for route in routes:
                async with s.get(base + route) as r:
                    assert r.status == 200, route
                    for name, value in SECURITY_HEADERS.items():
                        assert r.headers.get(name) == value, (route, name)
                    bodies.append(await r.read())
            async with s.get(base + "api/events") as r:
                assert r.headers["Content-Type"].startswith("text/event-stream")
                bodies.append(await r.content.readuntil(b"\n\n"))
            await asyncio.sleep(0.5)
    assert len(keys) > 1  # the link rekeyed while we read
    forms = {form for key in keys
             for form in (key, key.hex().encode(), key.hex().upper().encode(),
                          base64.b64encode(key), base64.urlsafe_b64encode(key).rstrip(b"="))}
    for body in bodies:
        for form in forms:
            assert form not in body


async def test_the_api_refuses_bad_queries_with_a_reason(sites: Sites) -> None:
    base = dashboard(sites, "a")
    async with aiohttp.ClientSession() as s:
        for query, status, says in (("api/history", 400, "link"),
                                    ("api/history?link=nope", 404, "nope"),
                                    ("api/history?link=ab&seconds=x", 400, "seconds"),
                                    ("api/history?link=ab&seconds=-1", 400, "seconds"),
                                    ("api/history?link=ab&seconds=1e9", 400, "seconds"),
                                    ("api/status?link=nope", 404, "nope"),
                                    ("static/../site-a.yaml", 404, ""),
                                    ("static/x.js", 404, "")):
            async with s.get(base + query) as r:
                assert r.status == status, query
                assert says in await r.text(), query
                assert r.headers.get("Content-Security-Policy"), query
        # Nonsense in the page's own query falls back to its defaults, never an error.
        async with s.get(base + "?seconds=zzz&sort=<script>&filter=%3Cb%3E") as r:
            text = await r.text()
            assert r.status == 200
            assert "<script>" not in text.replace('<script src="/static/dashboard.js">', "")
            assert "&lt;b&gt;" in text


async def test_api_status_is_the_cli_status(sites: Sites) -> None:
    async with aiohttp.ClientSession() as s, s.get(dashboard(sites, "b") + "api/status") as r:
        api = await r.json()
    cli = status_json(sites, "b")
    moving = {"uptime", "key_age", "next_rekey_in", "epoch", "fingerprint", "rekeys",
              "last_rekey_latency", "last_rekey", "kms", "state", "supply", "audit",
              "summary", "peers", "peer_channel_connects"}

    def still(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: still(v) for k, v in d.items() if k not in moving}
        if isinstance(d, list):
            return [still(v) for v in d]
        return d

    assert set(api) == set(cli)
    assert still(api) == still(cli)
    assert api["links"][0].keys() == cli["links"][0].keys()


def test_history_survives_a_restart(sites: Sites, tmp_path: Path) -> None:
    """The rings are saved on stop and read back: the marks before the restart are still
    served after it."""
    async def marks() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as s, \
                s.get(dashboard(sites, "b") + "api/history?link=ab&seconds=3600") as r:
            data: list[dict[str, Any]] = (await r.json())["marks"]
            return data

    before = asyncio.run(marks())
    assert before
    sites.stop_site("b")
    assert (sites.state_dir("b") / "history.json").stat().st_mode & 0o777 == 0o600
    sites.start_site("b")
    sites.wait_until("site B keyed again", sites.converged)
    after = asyncio.run(marks())
    assert [m["epoch"] for m in after[:len(before)]] == [m["epoch"] for m in before]
