"""proxy.server and proxy.upstream end to end: a real wakegate process in front of a
real backend process, driven over raw sockets, one table per behaviour."""

import hashlib
import json
import os
import signal
import socket
import struct
import threading
import time
import urllib.request

import pytest

from .conftest import Client, ScriptedOrigin, Wakegate, free_port


def config_for(backend_port: int, extra_proxy: str = "", extra: str = "") -> str:
    proxy = {"head_timeout": '"1s"', "upstream_timeout": '"1s"', "connect_timeout": '"1s"'}
    for line in extra_proxy.splitlines():
        key, _, value = line.partition("=")
        proxy[key.strip()] = value.strip()
    proxy_lines = "\n".join(f"{k} = {v}" for k, v in proxy.items())
    return f"""
[proxy]
{proxy_lines}

[services.app]
hosts = ["app.test", "*.wild.test"]
upstream = "127.0.0.1:{backend_port}"

[services.api]
hosts = ["app.test"]
paths = ["/api"]
upstream = "127.0.0.1:{backend_port}"

[services.dead]
hosts = ["dead.test"]
upstream = "127.0.0.1:{free_port()}"
{extra}
"""


@pytest.fixture(scope="module")
def wg(backend, tmp_path_factory):
    w = Wakegate(tmp_path_factory.mktemp("wg"), config_for(backend.port))
    yield w
    w.stop()


@pytest.fixture
def client(wg):
    c = Client(wg.port)
    yield c
    c.close()


def get(path: str, host: str = "app.test", extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: {host}\r\n{extra}\r\n".encode()


# ---- requests that get answered -------------------------------------------------

ANSWERED = [
    # request bytes, method, status, body (None: any)
    (get("/hello"), b"GET", 200, b"hello"),
    (get("/hello", host="APP.test:80"), b"GET", 200, b"hello"),
    (get("/hello", host="x.wild.test"), b"GET", 200, b"hello"),
    (get("/hello", host="a.b.wild.test"), b"GET", 200, b"hello"),
    (b"GET http://app.test/hello HTTP/1.1\r\nHost: other\r\n\r\n", b"GET", 200, b"hello"),
    (b"HEAD /hello HTTP/1.1\r\nHost: app.test\r\n\r\n", b"HEAD", 200, b""),
    (get("/status?code=204"), b"GET", 204, b""),
    (get("/status?code=304"), b"GET", 304, b""),
    (get("/status?code=500"), b"GET", 500, b""),
    (get("/chunked?n=4&size=3"), b"GET", 200, b"aaabbbcccddd"),
    (get("/chunked?n=0"), b"GET", 200, b""),
    (b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\r\nhello", b"POST", 200, b"hello"),
    (b"POST /echo HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n", b"POST", 200, b"abcde"),
    (get("/nothing", host="unknown.test"), b"GET", 404, None),
    (get("/hello", host="dead.test"), b"GET", 502, None),
    (get("/reset"), b"GET", 502, None),
    (get("/garbage"), b"GET", 502, None),
    (get("/slow?delay=3"), b"GET", 504, None),
]


@pytest.mark.parametrize("raw,method,status,body", ANSWERED)
def test_answered(client, raw, method, status, body):
    response = client.request(raw, method)
    assert response.status == status
    if body is not None:
        assert response.body == body
    # The connection stays usable when framing allowed it, or is closed cleanly.
    if response.header(b"connection") != b"close":
        assert client.request(get("/hello")).body == b"hello"
    else:
        assert client.is_closed()


def test_chunked_response_keeps_trailers(client):
    response = client.request(get("/chunked?n=2&size=2"))
    assert response.header(b"transfer-encoding") == b"chunked"
    assert response.trailers == [(b"x-trailer", b"done")]


def test_forwarded_head(client):
    response = client.request(
        get(
            "/headers",
            extra="Connection: X-Hop\r\nX-Hop: secret\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
            "X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\nX-Keep: yes\r\n",
        )
    )
    seen = json.loads(response.body)
    names = {n.lower(): v for n, v in seen["headers"]}
    assert names["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert names["x-forwarded-proto"] == "http"
    assert names["x-forwarded-host"] == "app.test"
    assert names["x-keep"] == "yes"
    for hop in ("x-hop", "keep-alive", "te", "connection"):
        assert hop not in names
    assert seen["version"] == "1.1"


def test_response_hop_by_hop_removed(client):
    response = client.request(get("/close"))
    assert response.body == b"bye"
    # The service closed its side, but the client connection stays alive.
    assert response.header(b"connection") is None
    assert client.request(get("/hello")).body == b"hello"


def test_path_prefix_routes_to_the_longer_match(client):
    assert client.request(get("/api/x")).status == 404  # the api service's backend has no /api/x
    assert client.request(get("/apix")).status == 404
    assert client.request(get("/hello")).body == b"hello"


def test_pipelined_requests_answered_in_order(client):
    client.send(get("/chunked?n=1&size=1") + get("/hello") + b"POST /echo HTTP/1.1\r\nHost: app.test\r\n"
                b"Content-Length: 3\r\n\r\nxyz" + get("/slow?delay=0.1") + get("/status?code=204"))
    bodies = [client.response().body for _ in range(4)]
    assert bodies == [b"a", b"hello", b"xyz", b"slow"]
    assert client.response().status == 204


def test_pipelined_byte_by_byte(client):
    data = get("/hello") + b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 2\r\n\r\nok" + get("/hello")
    for i in range(len(data)):
        client.send(data[i : i + 1])
    assert [client.response().body for _ in range(3)] == [b"hello", b"ok", b"hello"]


def test_upstream_connections_are_reused(client):
    ports = {client.request(get("/conn")).body for _ in range(20)}
    assert len(ports) == 1


def test_http10_client(wg):
    c = Client(wg.port)
    response = c.request(get("/hello", version="1.0"))
    assert response.body == b"hello"
    assert c.is_closed()
    c = Client(wg.port)
    response = c.request(get("/hello", version="1.0", extra="Connection: keep-alive\r\n"))
    assert response.header(b"connection") == b"keep-alive"
    assert c.request(get("/hello", version="1.0", extra="Connection: keep-alive\r\n")).body == b"hello"
    c.close()


def test_upstream_http10_until_close(client):
    response = client.request(get("/http10"))
    assert response.body == b"until close"
    assert response.header(b"connection") == b"close"
    assert client.is_closed()


def test_connection_close(client):
    response = client.request(get("/hello", extra="Connection: close\r\n"))
    assert response.body == b"hello" and response.header(b"connection") == b"close"
    assert client.is_closed()


def test_expect_continue(client):
    client.send(b"POST /continue HTTP/1.1\r\nHost: app.test\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    assert client.sock.recv(100).startswith(b"HTTP/1.1 100 ")
    client.send(b"body")
    response = client.response(b"POST")
    assert response.body.startswith(b"4 ")


def test_websocket_upgrade_tunnel(client):
    client.send(get("/ws", extra="Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n") + b"early")
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < 5:
        data += client.recv()
    head, _, received = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"\r\nUpgrade: websocket" in head and b"\r\nConnection: upgrade" in head
    assert received == b"early"
    for payload in (b"\x81\x05hello", bytes(range(256)) * 40):
        client.send(payload)
        got = b""
        while len(got) < len(payload):
            got += client.recv()
        assert got == payload


# ---- requests that get refused ---------------------------------------------------

REFUSED = [
    # request bytes, status
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\nHost: app.test\n\n", 400),
    (b"GET / HTTP/1.1\r\nHost : app.test\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: app.test\r\nX: 1\r\n folded\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"GET /\x01 HTTP/1.1\r\nHost: app.test\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: app.test\r\nBad\x7fName: 1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: app.test\r\nX: " + b"a" * 17000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/2.0\r\nHost: app.test\r\n\r\n", 505),
    (b"CONNECT app.test:443 HTTP/1.1\r\nHost: app.test\r\n\r\n", 501),
    (b"GET app.test HTTP/1.1\r\nHost: app.test\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
]


@pytest.mark.parametrize("raw,status", REFUSED)
def test_refused(client, raw, status):
    response = client.request(raw)
    assert response.status == status
    assert response.header(b"connection") == b"close"
    assert client.is_closed()


def test_slow_head_gets_408(client):
    client.send(b"GET /hello HTTP/1.1\r\nHo")
    time.sleep(0.4)
    client.send(b"st: app")  # trickling bytes does not extend the deadline
    response = client.response()
    assert response.status == 408
    assert client.is_closed()


def test_idle_connection_closed_silently(wg, backend, start_wakegate):
    w = start_wakegate(config_for(backend.port, 'keepalive_timeout = "300ms"'))
    c = Client(w.port)
    assert c.request(get("/hello")).body == b"hello"
    assert c.recv() == b""  # closed after the keep-alive timeout, no response bytes


def test_bad_connections_do_not_disturb_others(wg):
    stalled = [Client(wg.port) for _ in range(5)]
    for s in stalled:
        s.send(b"GET /hello HTTP/1.1\r\n")
    broken = Client(wg.port)
    broken.send(b"\x00\x01\x02 garbage\r\n\r\n")
    c = Client(wg.port)
    for _ in range(20):
        assert c.request(get("/hello")).body == b"hello"
    assert broken.response().status == 400
    for s in stalled + [broken, c]:
        s.close()


def test_body_too_large(backend, start_wakegate):
    w = start_wakegate(config_for(backend.port, 'max_body_size = "1KiB"'))
    c = Client(w.port)
    assert c.request(b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 2000\r\n\r\n").status == 413
    c = Client(w.port)
    c.send(b"POST /count HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n")
    c.send(b"400\r\n" + b"x" * 1024 + b"\r\n" + b"10\r\n" + b"y" * 16 + b"\r\n0\r\n\r\n")
    assert c.response().status == 413
    c = Client(w.port)
    assert c.request(b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1000\r\n\r\n" + b"z" * 1000).status == 200


def test_default_service_and_421(backend, start_wakegate):
    w = start_wakegate(config_for(backend.port, 'default_service = "app"'))
    assert Client(w.port).request(get("/hello", host="elsewhere.test")).body == b"hello"
    w = start_wakegate(config_for(backend.port, "unknown_host_status = 421"))
    assert Client(w.port).request(get("/hello", host="elsewhere.test")).status == 421


def test_connect_timeout_504(backend, start_wakegate):
    # A listener whose accept queue is full: SYNs go unanswered, so the connect hangs.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(blackhole.getsockname())
        fillers.append(s)
    port = blackhole.getsockname()[1]
    w = start_wakegate(
        config_for(backend.port, 'connect_timeout = "300ms"', f'\n[services.hole]\nhosts = ["hole.test"]\nupstream = "127.0.0.1:{port}"\n')
    )
    started = time.monotonic()
    response = Client(w.port).request(get("/", host="hole.test"))
    assert response.status == 504
    assert time.monotonic() - started < 3
    for s in fillers + [blackhole]:
        s.close()


# ---- big bodies and backpressure -------------------------------------------------

GIB = 1 << 30


def test_one_gib_request_body_streams_with_bounded_memory(wg):
    size = GIB if os.environ.get("WAKEGATE_BIG_BODY", "1") == "1" else 64 << 20
    c = Client(wg.port, timeout=120)
    c.send(f"POST /count HTTP/1.1\r\nHost: app.test\r\nContent-Length: {size}\r\n\r\n".encode())
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    before = wg.rss_kib()
    peak = before
    for i in range(size // len(block)):
        c.send(block)
        digest.update(block)
        if i % 64 == 0:
            peak = max(peak, wg.rss_kib())
    response = c.response(b"POST")
    assert response.body == f"{size} {digest.hexdigest()}".encode()
    assert peak - before < 64 * 1024, f"wakegate grew by {peak - before} KiB while streaming"


def test_slow_client_does_not_make_wakegate_buffer(wg):
    size = 256 << 20
    c = Client(wg.port, timeout=60)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    before = wg.rss_kib()
    c.send(get(f"/bytes?n={size}"))
    time.sleep(1.5)  # read nothing: the backend must be stopped by backpressure
    grown = wg.rss_kib() - before
    assert grown < 32 * 1024, f"wakegate buffered {grown} KiB for a client that reads nothing"
    got = 0
    while True:
        data = c.sock.recv(1 << 20)
        if not data:
            break
        got += len(data)
        if got >= size:
            break
    assert got >= size  # head + body all arrived in the end
    c.close()


# ---- drain on SIGTERM -----------------------------------------------------------


def test_sigterm_drains_in_flight_requests(backend, start_wakegate):
    w = start_wakegate(config_for(backend.port, 'drain_timeout = "5s"'))
    idle = Client(w.port)
    assert idle.request(get("/hello")).body == b"hello"
    busy = Client(w.port)
    busy.send(get("/slow?delay=0.8"))
    time.sleep(0.2)
    w.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", w.port), timeout=1).close()
    response = busy.response()
    assert response.body == b"slow"
    assert response.header(b"connection") == b"close"
    assert idle.is_closed()
    assert w.proc.wait(10) == 0


def test_sigterm_cuts_off_after_the_grace_period(backend, start_wakegate):
    w = start_wakegate(config_for(backend.port, 'drain_timeout = "300ms"\nupstream_timeout = "10s"'))
    busy = Client(w.port)
    busy.send(get("/slow?delay=5"))
    time.sleep(0.2)
    started = time.monotonic()
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(10) == 0
    assert time.monotonic() - started < 3
    assert busy.is_closed()


def test_upstream_connection_limit_queues_requests(backend, start_wakegate):
    w = start_wakegate(config_for(backend.port, "upstream_max_connections = 2\nupstream_timeout = \"10s\""))
    results = []

    def one():
        c = Client(w.port)
        results.append((c.request(get("/slow?delay=0.2")).status, c.request(get("/conn")).body))
        c.close()

    threads = [threading.Thread(target=one) for _ in range(12)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [status for status, _ in results] == [200] * 12
    assert len({port for _, port in results}) <= 2  # never more than two upstream connections
    assert time.monotonic() - started >= 1.0  # 12 slow requests, two at a time


# ---- issue 10: nothing lost, nothing duplicated ----------------------------------

def _ok(body=b"ok"):
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def _gone_after_first(method, path, nth):
    """Answer the first request on a connection, then take the next one in and close silently:
    a pooled connection that the service closed just as wakegate reused it."""
    return _ok() if nth == 0 else None


RETRIES = [
    # method, status the client gets, times the request reached the origin
    ("GET", 200, 2),
    ("HEAD", 200, 2),
    ("OPTIONS", 200, 2),
    ("POST", 502, 1),
    ("PATCH", 502, 1),
    ("DELETE", 502, 1),
    ("PUT", 502, 1),
]


@pytest.mark.parametrize("method,status,times", RETRIES)
def test_only_safe_requests_are_retried_on_a_fresh_connection(start_wakegate, method, status, times):
    origin = ScriptedOrigin(_gone_after_first)
    try:
        w = start_wakegate(f'[services.o]\nhosts = ["o.test"]\nupstream = "127.0.0.1:{origin.port}"\n')
        c = Client(w.port)  # one keep-alive connection: one worker, whose pool the first request warms
        assert c.request(get("/warm", host="o.test")).status == 200  # one pooled connection now
        extra = "Content-Length: 0\r\n" if method in ("POST", "PUT", "PATCH") else ""
        response = c.request(
            f"{method} /once HTTP/1.1\r\nHost: o.test\r\n{extra}\r\n".encode(), method.encode())
        c.close()
        assert response.status == status
        assert [m for m, p, _ in origin.seen if p == "/once"] == [method] * times
    finally:
        origin.stop()


def test_response_with_both_framings_is_framed_by_chunked(start_wakegate):
    both = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    origin = ScriptedOrigin(lambda m, p, nth: both if p == "/both" else _ok(b"next"))
    try:
        w = start_wakegate(f'[services.o]\nhosts = ["o.test"]\nupstream = "127.0.0.1:{origin.port}"\n')
        c = Client(w.port)
        response = c.request(get("/both", host="o.test"))
        assert response.body == b"abc"
        assert response.header(b"content-length") is None
        assert response.header(b"transfer-encoding") == b"chunked"
        assert c.request(get("/after", host="o.test")).body == b"next"  # the client connection lives on
    finally:
        origin.stop()


def test_interim_responses_are_bounded(start_wakegate):
    flood = b"HTTP/1.1 100 Continue\r\n\r\n" * 10_000 + _ok()
    origin = ScriptedOrigin(lambda m, p, nth: flood)
    try:
        w = start_wakegate(f'[services.o]\nhosts = ["o.test"]\nupstream = "127.0.0.1:{origin.port}"\n')
        response = Client(w.port).request(get("/", host="o.test"))
        assert response.status == 502
        assert len(response.informational) <= 5
    finally:
        origin.stop()


def test_client_that_reads_no_local_answers_is_not_buffered(backend, start_wakegate):
    w = start_wakegate(config_for(backend.port))
    c = Client(w.port, timeout=2)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    before = w.rss_kib()
    burst = get("/", host="unknown.test") * 2000  # ~80 KB of requests, each answered 404 by wakegate
    sent = 0
    try:
        while sent < 300 << 20:
            c.sock.sendall(burst)
            sent += len(burst)
    except socket.timeout:
        pass  # wakegate stopped reading: what the kernel buffers is all it takes
    grown = w.rss_kib() - before
    assert sent < 64 << 20, f"wakegate read {sent >> 20} MiB of requests it could not answer"
    assert grown < 32 * 1024, f"wakegate grew by {grown} KiB"
    other = Client(w.port)
    assert other.request(get("/hello")).body == b"hello"  # and it serves others meanwhile
    c.close()


def _access_lines(path, count, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_every_routed_request_is_recorded_with_its_status(backend, start_wakegate, tmp_path):
    access = tmp_path / "access.log"
    w = start_wakegate(config_for(backend.port, 'body_timeout = "300ms"\nmax_body_size = "1KiB"',
                                  f'\n[log]\naccess = "{access}"\n'))
    # a client reset in the middle of an exchange
    reset = Client(w.port)
    reset.send(get("/slow?delay=1"))
    time.sleep(0.2)
    reset.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reset.close()
    # a body that stops coming: 408 after routing
    slow = Client(w.port)
    assert slow.request(b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 10\r\n\r\nabc").status == 408
    # a chunked body that grows too large: 413 after routing
    big = Client(w.port)
    big.send(b"POST /count HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert big.request(b"800\r\n" + b"x" * 2048 + b"\r\n").status == 413
    lines = _access_lines(access, 3)
    assert sorted((line["path"], line["status"]) for line in lines) == [
        ("/count", 413), ("/echo", 408), ("/slow?delay=1", 499)]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{w.admin_port}/metrics", timeout=5).read().decode()
    for code in (408, 413, 499):
        assert f'wakegate_requests_total{{code="{code}",service="app"}} 1.0' in metrics or \
            f'wakegate_requests_total{{service="app",code="{code}"}} 1.0' in metrics, code


# ---- issue 10: slow uploads cannot lock a service out ------------------------------

def test_trickling_small_bodies_hold_no_upstream_connection(backend, start_wakegate):
    w = start_wakegate(config_for(backend.port, 'upstream_max_connections = 2\nbody_timeout = "3s"\n'
                                                'upstream_timeout = "2s"'))
    tricklers = []
    for _ in range(6):  # three times the service's connection limit
        t = Client(w.port)
        t.send(b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 100\r\n\r\nab")
        tricklers.append(t)
    time.sleep(0.3)
    started = time.monotonic()
    assert Client(w.port).request(get("/hello")).body == b"hello"
    assert time.monotonic() - started < 1.0
    for t in tricklers:  # and they are served once their bodies are in
        t.send(b"c" * 98)
        assert t.response(b"POST").body == b"ab" + b"c" * 98
        t.close()


def test_trickling_large_body_is_cut_off_at_the_minimum_rate(backend, start_wakegate):
    w = start_wakegate(config_for(backend.port, 'upstream_max_connections = 1\nbody_timeout = "500ms"\n'
                                                'upstream_timeout = "5s"'))
    t = Client(w.port)
    t.send(b"POST /count HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1000000\r\n\r\n" + b"x" * (70 * 1024))
    started = time.monotonic()
    cut = None
    for _ in range(100):  # a byte every 200 ms: within body_timeout each time, far under 500 B/s
        try:
            t.send(b"y")
        except OSError:
            cut = time.monotonic() - started
            break
        if t.is_closed(0.2):
            cut = time.monotonic() - started
            break
    assert cut is not None and cut < 3.0, cut
    started = time.monotonic()
    assert Client(w.port).request(get("/hello")).body == b"hello"  # the connection is free again
    assert time.monotonic() - started < 1.0


def test_running_out_of_file_descriptors_is_counted_and_said(backend, start_wakegate):
    """issue 10, defect 12: libuv drops connections it cannot accept (EMFILE) and tells nobody."""
    w = start_wakegate(config_for(backend.port), launcher=("prlimit", "--nofile=64:64", "--"))
    flood = []
    for _ in range(100):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", w.port))
        flood.append(s)
    time.sleep(2.5)  # the check runs every second
    for s in flood:
        s.close()
    time.sleep(0.5)
    text = urllib.request.urlopen(f"http://127.0.0.1:{w.admin_port}/metrics", timeout=5).read().decode()
    count = [float(line.split()[-1]) for line in text.splitlines()
             if line.startswith('wakegate_accept_errors_total{reason="fd_limit"}')]
    assert count and count[0] >= 1, text[-500:]
    assert "out of file descriptors (limit 64" in w.output()
    assert Client(w.port).request(get("/hello")).body == b"hello"  # and it serves again


@pytest.mark.parametrize("second, status", [
    (b"GET / HTTP/1.1\r\nHost: svc.test\r\nX-Big: " + b"x" * 400 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: svc.test\r\nBad Name: x\r\n\r\n", 400),
])
def test_a_bad_second_request_on_a_keepalive_connection_is_answered(backend, start_wakegate, second, status):
    """The error answer must not depend on what the connection's earlier exchange sent."""
    w = start_wakegate(config_for(backend.port, "max_head_size = 256"))
    c = Client(w.port)
    assert c.request(get("/hello")).status == 200
    assert c.request(second).status == status
    assert c.is_closed()
    c.close()
