"""Offline ``fintensor download``: an unreachable host is detected on the first failure (no backoff for a DNS
failure or a refused connection), said once as ``cannot reach Yahoo (no network?)``, exit 1, in bounded
time, with yfinance's own log lines silenced.

The network is blocked at the HTTP session under yfinance (``curl_cffi``'s ``Session.request``), so
yfinance's real cookie/crumb code runs and logs as it would offline. The 5 s bound is a correctness bound
on retries (a real backoff sleeps 1 + 2 + 4 ... s), not a benchmark.
"""
from __future__ import annotations

import time

import pytest
from yahoo_stub import isolate_yfinance

from fintensor.cli import main
from fintensor.sources import yahoo

BLOCKED = {
    "dns": "Failed to perform, curl: (6) Could not resolve host: query2.finance.yahoo.com.",
    "refused": "Failed to perform, curl: (7) Failed to connect to query2.finance.yahoo.com port 443: "
               "Couldn't connect to server",
    # newer curl, through a proxy that is down (what a blocked machine with HTTPS_PROXY set sees)
    "proxy": "Failed to perform, curl: (7) Failed to connect to query2.finance.yahoo.com:443 over proxy "
             "127.0.0.1 after 0 ms: Could not connect to server. See https://curl.se/libcurl/c/libcurl-errors.html "
             "first for more details.",
}


@pytest.fixture(params=sorted(BLOCKED))
def offline(request, monkeypatch):
    """Every HTTP request yfinance makes fails as it does with no network; returns the requests tried."""
    from curl_cffi import requests as curl
    from curl_cffi.requests import exceptions as curl_errors

    isolate_yfinance(monkeypatch)
    error = curl_errors.DNSError if request.param == "dns" else curl_errors.ConnectionError
    tried = []

    def refuse(self, method, url, *args, **kwargs):
        tried.append(url)
        raise error(BLOCKED[request.param])

    monkeypatch.setattr(curl.Session, "request", refuse)
    return tried


def test_offline_download_fails_fast_once_and_quietly(offline, tmp_path, capfd):
    began = time.monotonic()
    code = main(["download", "AAPL", "MSFT", "600519.SS", "--store", str(tmp_path / "store")])
    took = time.monotonic() - began
    out, err = capfd.readouterr()
    text = out + err
    assert code == 1
    assert took < 5, f"gave up after {took:.1f} s"
    assert offline, "the test did not block anything"
    assert text.count("cannot reach") == 1, text
    assert "Cookie" not in text and "crumb" not in text, text  # yfinance's own logging is silenced
    assert "1927" not in text, text                             # no absurd full-history range
    assert "Traceback" not in text
    lines = out.strip().splitlines()
    assert len(lines) == 4 and all(len(line) <= 100 for line in lines), out  # header + one short row each
    assert {line.split()[1] for line in lines[1:]} == {"unreachable"}
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.parquet"))


def test_unreachable_is_never_retried(offline, tmp_path):
    slept = []
    report = yahoo.download("AAPL", store=str(tmp_path / "store"), sleep=slept.append, quiet=True)
    assert slept == []  # a DNS failure or refused connection is not a rate limit: no backoff
    assert report["AAPL"].status == yahoo.UNREACHABLE
    with pytest.raises(Exception, match=r"cannot reach Yahoo \(no network\?\)"):
        report.raise_for_status()


def test_a_timeout_is_still_retried():
    """Only a failed lookup or a refused connection counts as 'no network'; a read timeout stays transient."""
    from curl_cffi.requests import exceptions as curl_errors

    timeout = yahoo._classify(curl_errors.Timeout("Operation timed out after 10001 milliseconds"))
    assert timeout.status == yahoo.FAILED and timeout.retry
    dns = yahoo._classify(curl_errors.DNSError(BLOCKED["dns"]))
    assert dns.status == yahoo.UNREACHABLE and not dns.retry
