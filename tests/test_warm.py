"""proxy/_warm.c and its twins in proxy/_native.py: the types on both implementations, then the warm
path against the Python path on the same exchanges: the same bytes reach the client and the service,
and the same metrics and access log lines are written, whichever path takes an exchange."""

import asyncio
import importlib
import re

import orjson
import pytest

from .conftest import PURE

IMPLEMENTATIONS = ["proxy._native"] + ([] if PURE else ["proxy._speedups"])


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda name: name.rsplit(".", 1)[1].lstrip("_"))
def impl(request):
    return importlib.import_module(request.param)


# ---- Histogram ----

BUCKET_OF = [  # value, the bucket it counts in (bisect_left: a value on a bound counts in that bound's bucket)
    (0.0, 0), (0.00005, 0), (0.0000501, 1), (0.001, 4), (0.0011, 5), (30.0, 17), (30.1, 18), (1e9, 18),
]


@pytest.mark.parametrize("value,bucket", BUCKET_OF)
def test_histogram_buckets(impl, value, bucket):
    h = impl.Histogram()
    h.observe(value)
    assert h.counts == [1 if i == bucket else 0 for i in range(19)] and h.count == 1 and h.sum == value


def test_histogram_absorbs_cumulates_and_hands_out_copies(impl):
    h = impl.Histogram()
    h.observe(0.0002)
    h.absorb([1] * 19, 2.5)
    counts = h.counts
    counts[0] = 99  # a copy: the histogram is not changed through it
    assert h.counts[0] == 1 and h.count == 20 and h.sum == pytest.approx(2.5002)
    cumulative = h.cumulative()
    assert cumulative[0] == ("5e-05", 1) and cumulative[2] == ("0.00025", 4) and cumulative[-1] == ("+Inf", 20)
    with pytest.raises(ValueError):
        h.absorb([1, 2], 0.0)
    assert impl.BUCKETS[0] == 0.00005 and impl.BUCKETS[-1] == 30.0


# ---- WarmLease ----

def test_warm_lease_releases_what_the_board_admitted(impl):
    from proxy.board import READY, PyBoard, local_board

    board = local_board(2, 2, board_type=PyBoard if impl.__name__ == "proxy._native" else None)
    board.publish(1, READY, 0)
    lease = impl.WarmLease(board, 1, 1)
    assert (lease.granted, lease.held, lease.tunnel, lease.refused) == (True, False, False, None)
    assert board.admit(1, 1) and board.admit(1, 1)
    lease.release()
    assert board.column(1, 1)[0] == 1 and board.column(1, 1)[3] > 0  # one left in flight; the last release's time
    with pytest.raises(RuntimeError):
        lease.open_tunnel()
    with pytest.raises(IndexError):
        impl.WarmLease(board, 2, 0)


# ---- the warm path against the Python path ----

HEAD_END = b"\r\n\r\n"
QUIET = 0.15  # seconds without bytes that end an answer (the origin's pieces come 10 ms apart)


class Origin:
    """An origin that answers each request with scripted pieces, written apart so that the proxy reads
    them apart; it records what it received."""

    def __init__(self, pieces) -> None:
        self.pieces = pieces
        self.received = []
        self.tasks = set()

    async def serve(self, reader, writer) -> None:
        self.tasks.add(asyncio.current_task())
        try:
            while True:
                head = await reader.readuntil(HEAD_END)
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                body = await reader.readexactly(int(length.group(1))) if length else b""
                self.received.append(head + body)
                for piece in self.pieces:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


# name: (what the client sends, read as one write; the origin's answer, in pieces; requests on the connection)
EXCHANGES = {
    "content-length, one read": (b"GET /a HTTP/1.1\r\nHost: s.test\r\n\r\n",
                                 [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], 3),
    "head and body apart": (b"GET /b HTTP/1.1\r\nHost: s.test\r\n\r\n",
                            [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"he", b"llo"], 3),
    "chunked, one read": (b"GET /c HTTP/1.1\r\nHost: s.test\r\n\r\n",
                          [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\r\n\r\n"], 3),
    "chunked, in pieces": (b"GET /d HTTP/1.1\r\nHost: s.test\r\n\r\n",
                           [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n", b"0\r\n\r\n"], 3),
    "HEAD": (b"HEAD /e HTTP/1.1\r\nHost: s.test\r\n\r\n", [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"], 3),
    "204": (b"DELETE /f HTTP/1.1\r\nHost: s.test\r\n\r\n", [b"HTTP/1.1 204 No Content\r\n\r\n"], 3),
    "304": (b"GET /g HTTP/1.1\r\nHost: s.test\r\nIf-None-Match: x\r\n\r\n",
            [b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n"], 3),
    "a small body": (b"POST /h HTTP/1.1\r\nHost: s.test\r\nContent-Length: 3\r\n\r\nabc",
                     [b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"], 3),
    "client closes": (b"GET /i HTTP/1.1\r\nHost: s.test\r\nConnection: close\r\n\r\n",
                      [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"], 1),
    "HTTP/1.0 client": (b"GET /j HTTP/1.0\r\nHost: s.test\r\nConnection: keep-alive\r\n\r\n",
                        [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"], 3),
    "service closes": (b"GET /k HTTP/1.1\r\nHost: s.test\r\n\r\n",
                       [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"], 3),
    "1xx first": (b"GET /l HTTP/1.1\r\nHost: s.test\r\n\r\n",
                  [b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"], 3),
    "until close": (b"GET /m HTTP/1.1\r\nHost: s.test\r\n\r\n", [b"HTTP/1.1 200 OK\r\n\r\nstream"], 1),
    "unknown host": (b"GET /n HTTP/1.1\r\nHost: other.test\r\n\r\n", [], 3),
    "a wildcard host": (b"GET /q HTTP/1.1\r\nHost: a.wild.test\r\n\r\n",
                        [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"], 3),
    "a path prefix": (b"GET /api/r?x=1 HTTP/1.1\r\nHost: p.test\r\n\r\n",
                      [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"], 3),
    "outside every prefix": (b"GET /apix HTTP/1.1\r\nHost: p.test\r\n\r\n", [], 3),
    "pipelined": (b"GET /o HTTP/1.1\r\nHost: s.test\r\n\r\nGET /p HTTP/1.1\r\nHost: s.test\r\n\r\n",
                  [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"], 2),
}
# Exchanges whose response the Python path must take (a body framed by the close, a chunked body that
# does not come whole in one read, no route); every other response is the warm path's (after a 1xx,
# which the Python path relays, the final response too).
PYTHON_ONLY = {"chunked, in pieces", "until close", "unknown host", "outside every prefix"}


async def _run(exchange: str, warm: bool, tmp_path) -> dict:
    from controller.config import from_dict
    from proxy.board import READY, local_board
    from proxy.warm import warm_counts
    from proxy.worker import DataPath

    request, pieces, repeat = EXCHANGES[exchange]
    origin = Origin(pieces)
    server = await asyncio.start_server(origin.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    log = tmp_path / f"access-{warm}.log"
    config = from_dict({"proxy": {"listen": "127.0.0.1:0", "workers": 1}, "log": {"access": str(log)},
                        "services": {"s": {"hosts": ["s.test", "*.wild.test"], "upstream": f"127.0.0.1:{port}"},
                                     "p": {"hosts": ["p.test"], "paths": ["/api"], "upstream": f"127.0.0.1:{port}"}}})
    board = local_board(2)
    board.publish(0, READY, 0)
    board.publish(1, READY, 0)
    path = DataPath(config, board, 0, {"s": 0, "p": 1}, lambda slot: None)
    path.server.warm = warm
    await path.start()
    before = warm_counts()
    received = b""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", path.server.sockets[0].getsockname()[1])
        closed = False
        for _ in range(repeat if exchange != "pipelined" else 1):
            writer.write(request)
            await writer.drain()
            while True:  # everything that comes, until nothing has come for QUIET seconds
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), QUIET)
                except asyncio.TimeoutError:
                    break
                if not chunk:
                    closed = True
                    break
                received += chunk
            if closed:
                break
        writer.close()
        await writer.wait_closed()
    finally:
        await path.drain(1)
        server.close()
        await server.wait_closed()
        for task in origin.tasks:
            task.cancel()
        await asyncio.gather(*origin.tasks, return_exceptions=True)
    after = warm_counts()
    stats = {name: route.stats.export() for name, route in path.routes.items()}
    lines = [orjson.loads(line) for line in log.read_bytes().splitlines()] if log.exists() else []
    for line in lines:
        line.pop("time")
        line.pop("ms")
        line.pop("client")
    return {"client": received, "origin": origin.received, "codes": {name: s["codes"] for name, s in stats.items()},
            "counts": {name: [sum(s[h][0]) for h in ("duration", "upstream", "queue", "connect")]
                       for name, s in stats.items()}, "log": lines,
            "warm": (after[0] - before[0], after[1] - before[1])}


@pytest.mark.skipif(PURE, reason="the warm path is the C extension's")
@pytest.mark.parametrize("exchange", list(EXCHANGES))
def test_the_warm_path_does_what_the_python_path_does(exchange, tmp_path):
    import uvloop

    python = uvloop.run(_run(exchange, False, tmp_path))
    warm = uvloop.run(_run(exchange, True, tmp_path))
    assert python["warm"] == (0, 0)
    for key in ("client", "origin", "codes", "counts", "log"):
        assert warm[key] == python[key], key
    requests, responses = warm["warm"]
    if exchange in PYTHON_ONLY:
        assert responses == 0, warm["warm"]
    else:  # a first request opens the connection (Python); requests on a pooled one go through in C
        assert responses >= 1, warm["warm"]
        if EXCHANGES[exchange][2] > 1 and exchange not in ("service closes", "pipelined"):
            assert requests >= 1, warm["warm"]


# ---- StatusCounts ----

def test_status_counts_behave_as_a_dict_of_counts(impl):
    counts = impl.StatusCounts()
    assert not counts and len(counts) == 0 and counts.get(200) is None and counts.get(200, 0) == 0
    counts[200] = counts.get(200, 0) + 1
    counts[503] = 2
    counts[200] += 1
    assert counts == {200: 2, 503: 2} and sorted(counts.items()) == [(200, 2), (503, 2)]
    assert 200 in counts and 404 not in counts and sum(counts.values()) == 4 and sorted(counts) == [200, 503]
    with pytest.raises(KeyError):
        counts[404]


def test_status_counts_keep_many_codes_in_order(impl):
    """More codes than the C table keeps inline, counted and deleted in any order."""
    counts, expected = impl.StatusCounts(), {}
    codes = [503, 200, 404, 100, 599, 301, 200, 302, 500, 204, 200, 418, 101, 503]
    for code in codes * 3:
        counts[code] = counts.get(code, 0) + 1
        expected[code] = expected.get(code, 0) + 1
    assert counts == expected and sorted(counts) == sorted(expected) and len(counts) == len(expected)
    for code in (100, 599, 200, 301):
        del counts[code]
        del expected[code]
    assert counts == expected and sorted(counts.items()) == sorted(expected.items())
    assert 200 not in counts and counts.get(200) is None
    for code in sorted(expected, reverse=True):
        del counts[code]
    assert len(counts) == 0 and counts == {}
