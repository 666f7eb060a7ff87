"""Fuzz the C entry points of proxy._speedups under AddressSanitizer, against the twin and h11.

Every input drives one entry point, chosen by its first byte: the request head parser (and the
upstream head rewrite), the response head parser (and the client head rewrite), the chunk
scanner fed in random pieces, and the access log line. For each, the C result must equal the
pure-Python twin's (values, errors and their statuses, rewritten bytes); a request or chunked body
that wakegate accepts must be accepted by h11 with the same meaning (wakegate may be stricter,
never more lenient: the exceptions are listed in H11_DIFFERENCES). Any difference raises, which
atheris reports as a crash with the input saved.

Run it through ``make fuzz`` (long) or ``make fuzz-quick`` (bounded, part of ``make test``); with
``WAKEGATE_FUZZ_ENTRY=request|response|chunked|access`` it fuzzes that one entry point. The targets
build the extension with clang -fsanitize=address,fuzzer-no-link into build/fuzz and preload
atheris's ASan runtime. ``python tests/fuzz/http11_fuzz.py --check`` runs the seeds without atheris.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import h11  # noqa: E402
import orjson  # noqa: E402

from proxy import _native  # noqa: E402
from proxy.errors import ProtocolError  # noqa: E402

# Where wakegate is deliberately not h11's equal, in the direction that matters here (wakegate
# accepts, h11 refuses). Each is an RFC reading h11 does not implement; the head that goes upstream
# is canonical in each case (tests/test_http11.py shows the rewrite).
H11_DIFFERENCES = {
    "transfer-encoding list": "empty list elements (',chunked', 'chunked,') are ignored (RFC 9110 section 5.6.1); "
                              "h11 wants the bare word",
}
MAX_H11_EVENT = 16 * 1024  # h11's default max_incomplete_event_size; longer heads are not compared with it


def load_c_extension():
    """The ASan build of the extension (build/fuzz) when the ASan runtime is preloaded, else the
    normal in-place one."""
    asan = "asan" in os.environ.get("LD_PRELOAD", "")
    for folder in ([ROOT / "build" / "fuzz" / "proxy"] if asan else [ROOT / "proxy"]):
        for path in sorted(folder.glob("_speedups*.so")):
            loader = importlib.machinery.ExtensionFileLoader("proxy._speedups", str(path))
            spec = importlib.util.spec_from_file_location("proxy._speedups", path, loader=loader)
            module = importlib.util.module_from_spec(spec)
            loader.exec_module(module)
            return module
    raise SystemExit("no built proxy/_speedups*.so: run `make build` (or `make fuzz`, which builds it with ASan)")


class Difference(AssertionError):
    """The C extension and its reference disagree."""


# ---- what one call gives: comparable values ----------------------------------------

REQUEST_FIELDS = ("raw", "length", "version", "body_length", "keep_alive", "headers", "method", "target", "path",
                  "host", "upgrade", "expect_continue", "is_head")
RESPONSE_FIELDS = ("raw", "length", "version", "body_length", "keep_alive", "headers", "status", "reason")


def outcome(module, func: str, data, **kw):
    """A parse's result as plain values: ("error", status), None (incomplete), or the head's fields
    followed by the rewritten head."""
    try:
        head = getattr(module, func)(data, **kw)
    except ProtocolError as exc:
        return ("error", exc.status)
    if head is None:
        return None
    if func == "parse_request":
        built = module.build_request(head, b"192.0.2.1")
        return tuple(getattr(head, f) for f in REQUEST_FIELDS) + (built,)
    built = (module.build_response(head, True, 1), module.build_response(head, False, 0))
    return tuple(getattr(head, f) for f in RESPONSE_FIELDS) + built


def scan(module, body: bytes, cuts: list[int]):
    """Feed a chunked body in pieces: (bytes consumed, done) or ("error", status, consumed so far)."""
    scanner = module.ChunkedScanner()
    used = 0
    pieces = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)])]
    try:
        for piece in pieces:
            used += scanner.feed(piece)
            if scanner.done:
                break
    except ProtocolError as exc:
        return ("error", exc.status, used)
    return (used, scanner.done)


def access_line(module, args):
    buffer = bytearray(b"x\n")
    try:
        module.append_access_line(buffer, *args)
    except (TypeError, OverflowError, ValueError) as exc:
        return ("error", type(exc).__name__)
    return bytes(buffer)


# ---- h11 as the reference for what wakegate accepts --------------------------------


def h11_request(data: bytes, ours) -> None:
    """wakegate parsed this request head: h11 must read the same request from it."""
    if ours.length > MAX_H11_EVENT:
        return
    head = data[: ours.length].lstrip(b"\r\n")  # RFC 9112 section 2.2: empty lines before it are ignored
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        codings = [v for n, v in ours.headers if n.lower() == b"transfer-encoding"]
        if codings and [c.strip(b" \t").lower() for c in b",".join(codings).split(b",") if c.strip(b" \t")] == [
                b"chunked"]:
            return  # H11_DIFFERENCES["transfer-encoding list"]
        raise Difference(f"wakegate accepts a request h11 refuses ({exc}): {head!r}")
    if not isinstance(event, h11.Request):
        raise Difference(f"h11 read {event!r} where wakegate read a request: {head!r}")
    if (event.method, event.target) != (ours.method, ours.target):
        raise Difference(f"request line differs: h11 {event.method!r} {event.target!r}: {head!r}")
    # RFC 9110 section 2.5: HTTP/1.2 and up are read as the highest 1.x wakegate speaks, 1.1
    if (event.http_version != b"1.0") != (ours.version == 1):
        raise Difference(f"version differs: h11 {event.http_version!r}, ours 1.{ours.version}: {head!r}")
    framing_fields = (b"content-length", b"transfer-encoding")  # h11 normalises their values; framing is below
    theirs = [(n, v) for n, v in event.headers if n not in framing_fields]
    mine = [(n.lower(), v) for n, v in ours.headers if n.lower() not in framing_fields]
    if theirs != mine:
        raise Difference(f"fields differ: h11 {theirs!r}, ours {mine!r}")
    kind, args = h11._connection._body_framing(event.method, event)
    framing = {"chunked": _native.CHUNKED, "content-length": args[0] if args else 0}[kind]
    if framing != ours.body_length:
        raise Difference(f"body framing differs: h11 {kind} {args}, ours {ours.body_length}: {head!r}")


def h11_chunked(body: bytes) -> None:
    """wakegate's scanner took this whole chunked body: h11 must read it to its end as well."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                raise Difference(f"h11 wants more of a chunked body wakegate found complete: {body!r}")
            if isinstance(event, h11.EndOfMessage):
                return
    except h11.RemoteProtocolError as exc:
        if "too long" in str(exc) or "exceeds" in str(exc):
            return  # h11's own buffer limit, not a grammar difference
        raise Difference(f"wakegate accepts a chunked body h11 refuses ({exc}): {body!r}") from None


# ---- one input ---------------------------------------------------------------------


class Input:
    """A FuzzedDataProvider stand-in that works without atheris (for --check and the tests)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def integer(self, low: int, high: int) -> int:
        value = int.from_bytes(bytes(self.byte() for _ in range(4)), "little")
        return low + value % (high - low + 1)

    def rest(self) -> bytes:
        out, self.pos = self.data[self.pos :], len(self.data)
        return out


ENTRY_POINTS = ("request", "response", "chunked", "access")
# WAKEGATE_FUZZ_ENTRY=chunked (say) makes this the harness of that one entry point.
PINNED = ENTRY_POINTS.index(os.environ["WAKEGATE_FUZZ_ENTRY"]) if os.environ.get("WAKEGATE_FUZZ_ENTRY") else None


def one_input(c, data: bytes) -> None:
    inp = Input(data)
    entry = inp.byte() % 4 if PINNED is None else PINNED
    if entry == 0:
        start = inp.byte() % 4
        max_head = (64, 512, 16 * 1024, 16 * 1024)[inp.byte() % 4]
        buf = inp.rest()
        if start > len(buf):
            start = 0
        mine, twin = outcome(c, "parse_request", buf, start=start, max_head=max_head), \
            outcome(_native, "parse_request", buf, start=start, max_head=max_head)
        if mine != twin:
            raise Difference(f"parse_request: C {mine!r} != twin {twin!r} for {buf!r}")
        if mine is not None and mine[0] != "error":
            h11_request(buf[start:], c.parse_request(buf, start, max_head))
    elif entry == 1:
        head_request = bool(inp.byte() & 1)
        buf = inp.rest()
        mine = outcome(c, "parse_response", buf, head_request=head_request)
        twin = outcome(_native, "parse_response", buf, head_request=head_request)
        if mine != twin:
            raise Difference(f"parse_response: C {mine!r} != twin {twin!r} for {buf!r}")
    elif entry == 2:
        count = inp.byte() % 8
        body = inp.rest()
        cuts = sorted({inp_cut % (len(body) + 1) for inp_cut in body[:count]}) if body else []
        mine, twin = scan(c, body, cuts), scan(_native, body, cuts)
        if mine != twin:
            raise Difference(f"ChunkedScanner: C {mine!r} != twin {twin!r} for {body!r} cut at {cuts}")
        if mine[0] != "error" and mine[1]:
            h11_chunked(body[: mine[0]])
    else:
        numbers = []
        for _ in range(5):
            kind = inp.byte() % 4
            raw = inp.integer(0, 2**32 - 1)
            numbers.append((raw / 1000.0, -raw / 7.0, float("nan") if raw & 1 else math.inf, raw * 1e9)[kind])
        ints = [inp.integer(0, 2**32 - 1) - 2**31 for _ in range(3)]
        blob = inp.rest()
        parts = [blob[i::4] for i in range(4)]
        args = (numbers[0], parts[0], parts[1], parts[2], ints[0], ints[1], ints[2], numbers[1], numbers[2],
                numbers[3], numbers[4], bool(ints[0] & 1), parts[3])
        mine, twin = access_line(c, args), access_line(_native, args)
        if mine != twin:
            raise Difference(f"append_access_line: C {mine!r} != twin {twin!r} for {args!r}")
        if isinstance(mine, bytes):
            orjson.loads(mine[2:])  # the line is JSON whatever bytes it was given


# ---- seeds and the command line ----------------------------------------------------

SEEDS = [
    b"\x00\x00\x02GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\x00\x01\x02POST /p?q=1 HTTP/1.1\r\nHost: a.example:80\r\nContent-Length: 5\r\nConnection: keep-alive, X\r\n"
    b"X: 1\r\nX-Forwarded-For: 10.0.0.1\r\n\r\nhello",
    b"\x00\x00\x03PUT /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
    b"\x00\x00\x02GET http://a.example/x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"\x00\x00\x02GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"\x01\x00HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n\r\nok",
    b"\x01\x01HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
    b"\x01\x00HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    b"\x01\x00HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    b"\x02\x02" + b"5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n",
    b"\x02\x00" + b"1a\r\n" + b"z" * 26 + b"\r\n0\r\n\r\n",
    b"\x03" + bytes(range(64)) + b"/path\"\\\x00\xff",
]


def check_seeds(c) -> int:
    for seed in SEEDS:
        one_input(c, seed)
    return len(SEEDS)


def main() -> None:
    c = load_c_extension()
    if "--check" in sys.argv:
        print(f"{check_seeds(c)} seeds: C, twin and h11 agree")
        return
    import atheris

    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    for folder in corpus:  # seeds go into the (scratch) corpus folder, never into the repository
        Path(folder).mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(SEEDS):
            (Path(folder) / f"seed-{i:02d}").write_bytes(seed)
    atheris.Setup(sys.argv, lambda data: one_input(c, data))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
