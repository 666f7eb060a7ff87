"""Head parsing micro-benchmarks (pytest-benchmark): C, pure Python, h11 and httptools.

Each parses the same typical browser request head and yields what a proxy needs
from it (method, target, headers, framing). Run: ``make bench-parse``.
"""

import h11
import httptools
import pytest

from proxy import _native

try:
    from proxy import _speedups
except ImportError:  # pragma: no cover - make build guarantees it
    _speedups = None

BROWSER_HEAD = (
    b"GET /articles/2026/11/scale-to-zero.html?ref=home HTTP/1.1\r\n"
    b"Host: www.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Connection: keep-alive\r\n"
    b"Cookie: session=8f14e45fceea167a5a36dedd4bea2543\r\n"
    b"Upgrade-Insecure-Requests: 1\r\n"
    b"Priority: u=0, i\r\n"
    b"\r\n"
)


def test_head_is_typical():
    assert 380 <= len(BROWSER_HEAD) <= 460


@pytest.mark.skipif(_speedups is None, reason="C extension not built")
def test_parse_c(benchmark):
    parse = _speedups.parse_request
    head = benchmark(parse, BROWSER_HEAD)
    assert head.host == b"www.example.com" and head.body_length == 0


def test_parse_python(benchmark):
    head = benchmark(_native.parse_request, BROWSER_HEAD)
    assert head.host == b"www.example.com" and head.body_length == 0


def test_parse_h11(benchmark):
    def parse(data):
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(data)
        return conn.next_event()

    event = benchmark(parse, BROWSER_HEAD)
    assert event.target.startswith(b"/articles")


class _Collector:
    """What a server built on httptools collects: URL and headers (as uvicorn does)."""

    __slots__ = ("url", "headers", "done")

    def __init__(self):
        self.url = b""
        self.headers = []
        self.done = False

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append((name, value))

    def on_headers_complete(self):
        self.done = True


def test_parse_httptools(benchmark):
    def parse(data):
        collector = _Collector()
        parser = httptools.HttpRequestParser(collector)
        parser.feed_data(data)
        return collector, parser.get_method(), parser.should_keep_alive()

    collector, method, keep_alive = benchmark(parse, BROWSER_HEAD)
    assert collector.done and method == b"GET" and keep_alive


@pytest.mark.skipif(_speedups is None, reason="C extension not built")
def test_parse_and_rewrite_c(benchmark):
    """What wakegate does per request: parse, then build the upstream head."""

    def run(data):
        return _speedups.build_request(_speedups.parse_request(data), b"127.0.0.1")

    assert benchmark(run, BROWSER_HEAD).startswith(b"GET /articles")
