"""The metrics listener with `metrics.tls`: the dashboard and /metrics over HTTPS to clients
holding a certificate from the site CA, and to nobody else.

    client (cert from the site CA) ──HTTPS, mutual TLS── site A's metrics listener   200
    client (no cert, another CA's cert, plain HTTP) ──────────────────────────────── refused
"""

from __future__ import annotations

import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.initdemo import init_demo
from tests.gateway.sites import Sites
from tests.helpers import free_base_port


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sites, str]]:
    s = Sites(tmp_path_factory.mktemp("tls"), {"interval": 5.0, "hard_lifetime": 60.0})
    path = s.config_path("a")
    config = yaml.safe_load(path.read_text())
    config["metrics"]["tls"] = {"ca": "pki/ca.pem", "cert": "pki/gw-a.pem",
                                "key": "pki/gw-a.key"}
    path.write_text(yaml.safe_dump(config))
    with s.start():
        s.wait_until("both sites on the same key", s.converged)
        yield s, config["metrics"]["listen"]


def _get(url: str, context: ssl.SSLContext | None) -> tuple[int, str]:
    with urllib.request.urlopen(url, context=context, timeout=10) as r:  # noqa: S310
        return r.status, r.read().decode()


def _client(pki: Path, name: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if name is not None:
        ctx.load_cert_chain(str(pki / f"{name}.pem"), str(pki / f"{name}.key"))
    return ctx


def test_a_client_with_a_site_certificate_gets_the_dashboard(site: tuple[Sites, str]) -> None:
    sites, listen = site
    pki = sites.layout.root / "pki"
    status, page = _get(f"https://{listen}/", _client(pki, "gw-b"))
    assert status == 200
    assert 'data-link="ab"' in page
    status, metrics = _get(f"https://{listen}/metrics", _client(pki, "gw-b"))
    assert "qkdgw_epoch" in metrics


def test_anyone_else_is_refused(site: tuple[Sites, str], tmp_path: Path) -> None:
    sites, listen = site
    pki = sites.layout.root / "pki"
    other = init_demo(tmp_path, base_port=free_base_port(24)).root / "pki"
    no_cert = _client(pki, None)
    foreign = _client(pki, None)
    foreign.load_cert_chain(str(other / "gw-b.pem"), str(other / "gw-b.key"))
    for context in (no_cert, foreign):
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            _get(f"https://{listen}/", context)
    # Plain HTTP gets no page either.
    host, port = listen.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        conn.settimeout(5)
        reply = b""
        try:
            while chunk := conn.recv(4096):
                reply += chunk
        except (ConnectionError, TimeoutError):
            pass
    assert b"data-link" not in reply
    assert not reply.startswith(b"HTTP/1.1 200")
