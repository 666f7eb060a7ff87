"""Pure-Python twin of ``proxy._speedups``: HTTP/1.1 head parsing and rewriting.

Same names, same results and same ProtocolError statuses as the C extension; it
runs when the extension is missing or ``WAKEGATE_PUREPYTHON=1`` is set. Bytes in,
objects out: nothing here knows about sockets or asyncio.
"""

import math
import operator
import re

from .errors import ProtocolError

MAX_HEAD_BYTES = 16 * 1024  # h11 and node: 16 KiB; longer heads get 431
MAX_HEADERS = 100  # Apache LimitRequestFields: 100 fields; more get 431
MAX_CHUNK_LINE_BYTES = 4096  # chunk-size line with extensions; Go net/http allows 4 KiB
MAX_TRAILER_BYTES = 16 * 1024  # trailers get the same budget as a head
MAX_LENGTH_DIGITS = 18  # Content-Length fits in int64, as in llhttp
MAX_CONNECTION_OPTIONS = 32  # Connection tokens kept to strip the fields they name

CHUNKED = -1  # body_length: chunked transfer coding (RFC 9112 section 7.1)
UNTIL_CLOSE = -2  # body_length: response body delimited by connection close

IMPLEMENTATION = "python"


def _table(chars: bytes) -> bytes:
    table = bytearray(256)
    for c in chars:
        table[c] = 1
    return bytes(table)


_DIGITS = b"0123456789"
_ALPHA = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# RFC 9110 section 5.6.2: tchar
_TOKEN = _table(b"!#$%&'*+-.^_`|~" + _DIGITS + _ALPHA)
# RFC 9112 section 3.2: request-target is visible ASCII (h11 accepts the same)
_TARGET = _table(bytes(range(0x21, 0x7F)))
# RFC 9110 section 5.5: field-vchar, obs-text, SP and HTAB inside a value
_VALUE = _table(bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100)) + b" \t")
# RFC 3986 reg-name, IPv6 literal and port characters in Host
_HOST = _table(_DIGITS + _ALPHA + b"-._~!$&'()*+,;=%:[]")
_HEX = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}

# Request headers never forwarded upstream (RFC 9110 section 7.6.1), plus the
# X-Forwarded-* fields that wakegate rewrites itself.
_REQUEST_DROP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"upgrade",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    )
)
_RESPONSE_DROP = frozenset((b"connection", b"keep-alive", b"proxy-connection"))
# Connection may name hop-by-hop fields, but never the framing or the Host:
# dropping those would let a client desynchronise us from the upstream.
_NEVER_DROP = frozenset((b"host", b"content-length", b"transfer-encoding"))


def _searchable(buf, start: int):
    """bytes or bytearray as they are; other buffers copied (the twin may copy)."""
    if not isinstance(buf, (bytes, bytearray)):
        buf = bytes(buf)
    if start < 0 or start > len(buf):
        raise ValueError("start is outside the buffer")
    return buf


def _find_head_end(buf, i: int, n: int) -> int:
    """Index just past the empty line that ends the head at ``i``, or -1."""
    j = i
    while True:
        k = buf.find(b"\n", j, n)
        if k < 0 or k + 1 >= n:
            return -1
        c = buf[k + 1]
        if c == 10:
            return k + 2
        if c == 13:
            if k + 2 >= n:
                return -1
            if buf[k + 2] == 10:
                return k + 3
        j = k + 1


def _split_head(buf, start: int, max_head: int):
    """Find one head in buf[start:]; return (head_start, head_end, lines) or None."""
    n = len(buf)
    i = start
    # RFC 9112 section 2.2: ignore empty lines before the start line.
    while i + 1 < n and buf[i] == 13 and buf[i + 1] == 10:
        i += 2
    if i >= n or (buf[i] == 13 and i + 1 == n):
        if n - start > max_head:
            raise ProtocolError("request head too large", 431)
        return None
    end = _find_head_end(buf, i, n)
    if end < 0:
        if n - start > max_head:
            raise ProtocolError("head too large", 431)
        return None
    if end - start > max_head:
        raise ProtocolError("head too large", 431)
    lines = []
    p = i
    while p < end:
        k = buf.find(b"\n", p, end)
        if k == p or buf[k - 1] != 13:
            raise ProtocolError("bare LF where CRLF is required")
        lines.append(bytes(buf[p : k - 1]))
        p = k + 1
    return i, end, lines


def _check_token(s: bytes, what: str) -> None:
    if not s:
        raise ProtocolError("empty " + what)
    for c in s:
        if not _TOKEN[c]:
            raise ProtocolError("invalid character in " + what)


def _parse_fields(lines):
    """Validate field lines; return [(name, lower_name, value)]."""
    if len(lines) - 2 > MAX_HEADERS:
        raise ProtocolError("too many header fields", 431)
    fields = []
    for line in lines[1:-1]:
        if line[0] in (32, 9):
            raise ProtocolError("obsolete line folding")
        k = 0
        n = len(line)
        while k < n and _TOKEN[line[k]]:
            k += 1
        if k == n:
            raise ProtocolError("header line without a colon")
        c = line[k]
        if c != 58:
            if c in (32, 9):
                raise ProtocolError("whitespace before the colon")
            raise ProtocolError("invalid character in header name")
        if k == 0:
            raise ProtocolError("empty header name")
        name = line[:k]
        v = k + 1
        e = n
        while v < e and line[v] in (32, 9):
            v += 1
        while e > v and line[e - 1] in (32, 9):
            e -= 1
        value = line[v:e]
        for c in value:
            if not _VALUE[c]:
                raise ProtocolError("invalid character in header value")
        fields.append((name, name.lower(), value))
    return fields


def _parse_length(value: bytes, seen: bytes | None) -> bytes:
    """Merge a Content-Length field (maybe a list of identical values) into the digits seen so far.
    Repeats must be the same digits, not just the same number ("05" and "5" differ): RFC 9112
    section 6.3 lets a recipient collapse identical values only, and h11 compares them so too."""
    for part in value.split(b","):
        part = part.strip(b" \t")
        if not part or len(part) > MAX_LENGTH_DIGITS:
            raise ProtocolError("invalid Content-Length")
        for c in part:
            if c not in _DIGITS:
                raise ProtocolError("invalid Content-Length")
        if seen is not None and part != seen:
            raise ProtocolError("differing Content-Length values")
        seen = part
    return seen


def _comma_list(value: bytes):
    """Lower-cased, trimmed, non-empty items of a comma-separated field value."""
    return [p for p in (part.strip(b" \t").lower() for part in value.split(b",")) if p]


def _add_options(tokens, value: bytes) -> None:
    tokens += _comma_list(value)
    if len(tokens) > MAX_CONNECTION_OPTIONS:
        raise ProtocolError("too many Connection options")


def _host_key(value: bytes) -> bytes:
    """Lower-case host without the port, as used for routing (RFC 9110 section 7.2)."""
    for c in value:
        if not _HOST[c]:
            raise ProtocolError("invalid Host")
    if value[:1] == b"[":
        k = value.find(b"]")
        if k < 0:
            raise ProtocolError("invalid Host")
        host, rest = value[: k + 1], value[k + 1 :]
    else:
        k = value.find(b":")
        host, rest = (value, b"") if k < 0 else (value[:k], value[k:])
    if rest:
        if rest[:1] != b":" or not all(c in _DIGITS for c in rest[1:]):
            raise ProtocolError("invalid Host")
    if b"[" in host[1:] or b"]" in host[:-1]:
        raise ProtocolError("invalid Host")
    return host.lower()


class RequestHead:
    """One parsed request head; ``raw`` holds its bytes."""

    __slots__ = (
        "raw",
        "length",
        "method",
        "target",
        "path",
        "version",
        "host",
        "body_length",
        "keep_alive",
        "upgrade",
        "expect_continue",
        "is_head",
        "headers",
        "_fields",
        "_drop",
        "_host_value",
        "_content_length",
    )

    def __repr__(self) -> str:
        return "<RequestHead %r %r HTTP/1.%d>" % (self.method, self.target, self.version)


class ResponseHead:
    """One parsed response head; ``raw`` holds its bytes."""

    __slots__ = (
        "raw",
        "length",
        "status",
        "reason",
        "version",
        "body_length",
        "keep_alive",
        "headers",
        "_fields",
        "_drop",
        "_content_length",
    )

    def __repr__(self) -> str:
        return "<ResponseHead %d HTTP/1.%d>" % (self.status, self.version)


def _version(v: bytes) -> int:
    if len(v) != 8 or v[:5] != b"HTTP/" or v[6] != 46 or v[5] not in _DIGITS or v[7] not in _DIGITS:
        raise ProtocolError("malformed HTTP version")
    if v[5] != 49:
        raise ProtocolError("HTTP version not supported", 505)
    return 0 if v[7] == 48 else 1


def parse_request(buf, start: int = 0, max_head: int = MAX_HEAD_BYTES):
    """Parse one request head from buf[start:]; None until it is complete."""
    buf = _searchable(buf, start)
    split = _split_head(buf, start, max_head)
    if split is None:
        return None
    head_start, end, lines = split
    line = lines[0]
    sp1 = line.find(b" ")
    if sp1 < 0:
        raise ProtocolError("malformed request line")
    method = line[:sp1]
    _check_token(method, "method")
    sp2 = line.find(b" ", sp1 + 1)
    if sp2 < 0:
        raise ProtocolError("malformed request line")
    target = line[sp1 + 1 : sp2]
    if not target:
        raise ProtocolError("empty request target")
    for c in target:
        if not _TARGET[c]:
            raise ProtocolError("invalid character in request target")
    version = _version(line[sp2 + 1 :])
    if target == b"*" and method != b"OPTIONS":
        # RFC 9112 section 3.2.4: asterisk-form is only for a server-wide OPTIONS.
        raise ProtocolError("asterisk-form target with a method other than OPTIONS")
    fields = _parse_fields(lines)

    host_value = None
    hosts = 0
    length_digits = None
    codings = []
    tokens = []
    upgrade = None
    expect_continue = False
    has_codings = False
    for _name, lower, value in fields:
        if lower == b"host":
            hosts += 1
            host_value = value
        elif lower == b"content-length":
            length_digits = _parse_length(value, length_digits)
        elif lower == b"transfer-encoding":
            has_codings = True
            codings += _comma_list(value)
        elif lower == b"connection":
            _add_options(tokens, value)
        elif lower == b"upgrade":
            upgrade = value
        elif lower == b"expect":
            if value.lower() == b"100-continue":
                expect_continue = True

    length = -1 if length_digits is None else int(length_digits)
    # RFC 9112 section 6.3: framing of a request body.
    if has_codings:
        if length >= 0:
            raise ProtocolError("both Content-Length and Transfer-Encoding")
        if version == 0:
            raise ProtocolError("Transfer-Encoding in an HTTP/1.0 request")
        if codings != [b"chunked"]:
            if codings and codings[-1] == b"chunked":
                raise ProtocolError("unsupported transfer coding", 501)
            raise ProtocolError("invalid Transfer-Encoding")
        body_length = CHUNKED
    else:
        body_length = length if length >= 0 else 0

    if hosts > 1:
        raise ProtocolError("more than one Host")
    if hosts == 0 and version == 1:
        raise ProtocolError("missing Host")  # RFC 9112 section 3.2
    host = None if host_value is None else _host_key(host_value)
    path = target
    lowered = target[:8].lower()
    if lowered.startswith(b"http://") or lowered.startswith(b"https://"):
        # RFC 9112 section 3.2.2: the authority in an absolute-form target
        # replaces the Host field.
        a = target.find(b"//") + 2
        b = a
        while b < len(target) and target[b] not in b"/?#":
            b += 1
        host = _host_key(target[a:b])
        path = target[b:]
        if not path or path[:1] != b"/":
            path = b"/" + path

    if version == 1:
        keep_alive = b"close" not in tokens
    else:
        keep_alive = b"keep-alive" in tokens and b"close" not in tokens
    if upgrade is not None and (version == 0 or b"upgrade" not in tokens):
        upgrade = None

    head = RequestHead()
    head.raw = bytes(buf[start:end])
    head.length = end - start
    head.method = method
    head.target = target
    head.path = path
    head.version = version
    head.host = host
    head.body_length = body_length
    head.keep_alive = keep_alive
    head.upgrade = upgrade
    head.expect_continue = expect_continue
    head.is_head = method == b"HEAD"
    head.headers = [(name, value) for name, _lower, value in fields]
    head._fields = fields
    head._drop = _REQUEST_DROP.union(t for t in tokens if t not in _NEVER_DROP)
    head._host_value = host_value
    head._content_length = length
    return head


def parse_response(buf, start: int = 0, max_head: int = MAX_HEAD_BYTES, head_request: bool = False):
    """Parse one response head from buf[start:]; None until it is complete."""
    buf = _searchable(buf, start)
    split = _split_head(buf, start, max_head)
    if split is None:
        return None
    head_start, end, lines = split
    line = lines[0]
    version = _version(line[:8])
    if len(line) < 12 or line[8] != 32 or not all(c in _DIGITS for c in line[9:12]):
        raise ProtocolError("malformed status line")
    status = int(line[9:12])
    if len(line) > 12:
        if line[12] != 32:
            raise ProtocolError("malformed status line")
        reason = line[13:]
        for c in reason:
            if not _VALUE[c]:
                raise ProtocolError("invalid character in reason phrase")
    else:
        reason = b""
    if status < 100:
        raise ProtocolError("malformed status line")
    fields = _parse_fields(lines)

    length_digits = None
    has_codings = False
    codings = []
    tokens = []
    for _name, lower, value in fields:
        if lower == b"content-length":
            length_digits = _parse_length(value, length_digits)
        elif lower == b"transfer-encoding":
            has_codings = True
            codings += _comma_list(value)
        elif lower == b"connection":
            _add_options(tokens, value)
    length = -1 if length_digits is None else int(length_digits)
    if version == 1:
        keep_alive = b"close" not in tokens
    else:
        keep_alive = b"keep-alive" in tokens and b"close" not in tokens

    # RFC 9112 section 6.3: framing of a response body.
    if head_request or status < 200 or status == 204 or status == 304:
        body_length = 0
    elif has_codings:
        body_length = CHUNKED if codings and codings[-1] == b"chunked" else UNTIL_CLOSE
        if length >= 0:
            keep_alive = False  # both framings: trust neither connection afterwards
    elif length >= 0:
        body_length = length
    else:
        body_length = UNTIL_CLOSE
    if body_length == UNTIL_CLOSE:
        keep_alive = False

    head = ResponseHead()
    head.raw = bytes(buf[start:end])
    head.length = end - start
    head.status = status
    head.reason = reason
    head.version = version
    head.body_length = body_length
    head.keep_alive = keep_alive
    head.headers = [(name, value) for name, _lower, value in fields]
    head._fields = fields
    # Upgrade stays on a 101 even though its Connection names it.
    head._drop = _RESPONSE_DROP.union(t for t in tokens if t not in _NEVER_DROP and t != b"upgrade")
    # RFC 9112 section 6.3: a response with both framings is framed by the coding; the
    # Content-Length must not reach the client.
    head._content_length = -1 if has_codings else length
    return head


def _framing_value(lower: bytes, value: bytes, head, seen: set):
    """The value a framing field is written with (one clean field: RFC 9112 section 6.3), None to
    leave it out; other fields are written as they came."""
    if lower == b"content-length":
        if lower in seen or head._content_length < 0:
            return None
        seen.add(lower)
        return b"%d" % head._content_length
    if lower == b"transfer-encoding" and isinstance(head, RequestHead):
        if lower in seen:
            return None
        seen.add(lower)
        return b"chunked"  # the only coding a request may carry here
    return value


def build_request(head, client_addr: bytes, proto: bytes = b"http", extra: bytes = b"") -> bytes:
    """The head to send upstream: hop-by-hop fields out, X-Forwarded-* in, framing made canonical."""
    out = [head.method, b" ", head.target, b" HTTP/1.1\r\n" if head.version else b" HTTP/1.0\r\n"]
    drop = head._drop
    forwarded_for = []
    seen: set = set()
    for name, lower, value in head._fields:
        if lower in drop:
            if lower == b"x-forwarded-for" and value:
                forwarded_for.append(value)
            continue
        value = _framing_value(lower, value, head, seen)
        if value is not None:
            out += (name, b": ", value, b"\r\n")
    forwarded_for.append(client_addr)
    out += (b"X-Forwarded-For: ", b", ".join(forwarded_for), b"\r\n")
    out += (b"X-Forwarded-Proto: ", proto, b"\r\n")
    if head._host_value is not None:
        out += (b"X-Forwarded-Host: ", head._host_value, b"\r\n")
    if head.upgrade is not None:
        out += (b"Connection: upgrade\r\nUpgrade: ", head.upgrade, b"\r\n")
    elif not head.version:
        out.append(b"Connection: keep-alive\r\n")
    out += (extra, b"\r\n")
    return b"".join(out)


def build_response(head, keep_alive: bool, client_version: int = 1, extra: bytes = b"") -> bytes:
    """The head to send the client: hop-by-hop fields out, our Connection in."""
    out = [b"HTTP/1.1 %d " % head.status, head.reason, b"\r\n"]
    drop = head._drop
    upgrading = head.status == 101
    seen: set = set()
    for name, lower, value in head._fields:
        if lower in drop or (lower == b"upgrade" and not upgrading):
            continue
        value = _framing_value(lower, value, head, seen)
        if value is not None:
            out += (name, b": ", value, b"\r\n")
    if upgrading:
        out.append(b"Connection: upgrade\r\n")
    elif not keep_alive:
        out.append(b"Connection: close\r\n")
    elif not client_version:
        out.append(b"Connection: keep-alive\r\n")
    out += (extra, b"\r\n")
    return b"".join(out)


# ChunkedScanner states
(_SIZE, _EXT, _SIZE_LF, _DATA, _DATA_CR, _DATA_LF,
 _TRAILER, _TRAILER_NAME, _TRAILER_VALUE, _TRAILER_LF, _END_LF, _DONE) = range(12)


class ChunkedScanner:
    """Finds where a chunked body ends (RFC 9112 section 7.1) without copying it.

    ``feed(buf, start)`` returns how many bytes from ``start`` belong to the
    body; ``done`` turns true once the last chunk and trailers are through.
    A chunk size is hex digits and nothing else (then ``;`` extensions), and a
    trailer line is ``name: value``: "5 6", "a " or a trailer without a colon
    raise ProtocolError, so only clean framing is ever relayed.
    """

    __slots__ = ("_state", "_remaining", "_digits", "_line", "_trailer", "_name")

    def __init__(self) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._digits = 0
        self._line = 0
        self._trailer = 0
        self._name = bytearray()  # the trailer field name so far

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, buf, start: int = 0) -> int:
        n = len(buf)
        i = start
        state = self._state
        while i < n and state != _DONE:
            if state == _DATA:
                take = min(self._remaining, n - i)
                i += take
                self._remaining -= take
                if self._remaining == 0:
                    state = _DATA_CR
                continue
            c = buf[i]
            i += 1
            if state >= _TRAILER:
                self._trailer += 1
                if self._trailer > MAX_TRAILER_BYTES:
                    self._state = state
                    raise ProtocolError("trailer section too large", 431)
            if state == _SIZE:
                if c in _HEX:
                    if self._digits == 16:
                        raise ProtocolError("chunk size too large")
                    self._remaining = self._remaining * 16 + _HEX[c]
                    self._digits += 1
                    continue
                if not self._digits:
                    raise ProtocolError("invalid chunk size")
                if c == 13:
                    state = _SIZE_LF
                elif c == 59:  # ';'
                    self._line = self._digits + 1
                    state = _EXT
                else:
                    raise ProtocolError("invalid chunk size")
            elif state == _EXT:
                self._line += 1
                if self._line > MAX_CHUNK_LINE_BYTES:
                    raise ProtocolError("chunk extension too long")
                if c == 13:
                    state = _SIZE_LF
                elif not _VALUE[c]:
                    raise ProtocolError("invalid chunk extension")
            elif state == _SIZE_LF:
                if c != 10:
                    raise ProtocolError("bare CR in chunk size line")
                self._digits = 0
                self._line = 0
                state = _DATA if self._remaining else _TRAILER
            elif state == _DATA_CR:
                if c != 13:
                    raise ProtocolError("chunk data not followed by CRLF")
                state = _DATA_LF
            elif state == _DATA_LF:
                if c != 10:
                    raise ProtocolError("chunk data not followed by CRLF")
                state = _SIZE
            elif state == _TRAILER:  # a trailer line starts, or the empty line ends the body
                if c == 13:
                    state = _END_LF
                elif _TOKEN[c]:
                    self._name[:] = bytes((c,))
                    state = _TRAILER_NAME
                else:
                    raise ProtocolError("invalid trailer field")
            elif state == _TRAILER_NAME:
                if c == 58:  # ':'
                    # RFC 9110 section 6.5.1: framing cannot come after the content; a trailer
                    # that names it is refused, never relayed to a parser that might merge it.
                    if self._name.lower() in (b"content-length", b"transfer-encoding"):
                        raise ProtocolError("framing field in a trailer")
                    state = _TRAILER_VALUE
                elif not _TOKEN[c]:
                    raise ProtocolError("trailer field without a colon")
                elif len(self._name) <= 17:
                    self._name.append(c)
            elif state == _TRAILER_VALUE:
                if c == 13:
                    state = _TRAILER_LF
                elif not _VALUE[c]:
                    raise ProtocolError("invalid character in trailer")
            elif state == _TRAILER_LF:
                if c != 10:
                    raise ProtocolError("bare CR in trailer")
                state = _TRAILER
            else:  # _END_LF
                if c != 10:
                    raise ProtocolError("bare CR in trailer")
                state = _DONE
        self._state = state
        return i - start


# ---- access log lines ----------------------------------------------------------------

# Bytes a JSON string cannot hold as they are: quote, backslash, control bytes, and from 0x7f up
# (written as \u00XX, as the extension does).
_JSON_UNSAFE = re.compile(rb'["\\\x00-\x1f\x7f-\xff]')
ACCESS_NUMBER_MAX = 1e12  # numbers outside [0, this) are written as 0 (the extension's rule)
_ACCESS_LINE = (
    b'{"time":%d.%06d,"service":"%s","method":"%s","path":"%s","status":%d,"bytes_in":%d,"bytes_out":%d,'
    b'"ms":{"total":%d.%03d,"queue":%d.%03d,"connect":%d.%03d,"upstream":%d.%03d},"woke":%s,"client":"%s"}\n'
)


def _json_escape(s: bytes) -> bytes:
    if not _JSON_UNSAFE.search(s):
        return s
    return _JSON_UNSAFE.sub(
        lambda m: b"\\" + m.group() if m.group() in (b'"', b"\\") else b"\\u00%02x" % m.group()[0], s
    )


def _micros(value) -> int:
    """Whole microseconds of a number of seconds, rounded half up; 0 outside [0, ACCESS_NUMBER_MAX)."""
    if not isinstance(value, (int, float)):
        raise TypeError(f"append_access_line(): a number is needed, not {type(value).__name__}")
    value = float(value)
    return math.floor(value * 1e6 + 0.5) if 0.0 <= value < ACCESS_NUMBER_MAX else 0


def _index(value) -> int:
    """An integer argument: int or anything with __index__, as the extension's PyLong_AsLongLong takes."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"append_access_line(): an integer is needed, not {type(value).__name__}") from None


def append_access_line(buffer, time, service, method, target, status, bytes_in, bytes_out, total, queue, connect,
                       upstream, woke, client) -> int:
    """Append one access log line (JSON) to buffer; the buffer's new length."""
    if not isinstance(buffer, bytearray):
        raise TypeError("append_access_line(): buffer must be a bytearray")
    if not all(isinstance(s, bytes) for s in (service, method, target, client)):
        raise TypeError("append_access_line(): service, method, target and client are bytes")
    buffer += _ACCESS_LINE % (
        *divmod(_micros(time), 1_000_000), _json_escape(service), _json_escape(method), _json_escape(target),
        _index(status), _index(bytes_in), _index(bytes_out), *divmod(_micros(total), 1000), *divmod(_micros(queue), 1000),
        *divmod(_micros(connect), 1000), *divmod(_micros(upstream), 1000), b"true" if woke else b"false",
        _json_escape(client),
    )
    return len(buffer)


# ---- the warm path's types (proxy/_warm.c) --------------------------------------------------
# Their twins carry the same fields and methods; the warm path itself has no twin: with these,
# every request takes proxy/server.py's Python path, which behaves the same.

import asyncio as _asyncio
import os as _os
import queue as _queue
import select as _select
import threading as _threading
from bisect import bisect_left as _bisect_left

WARM_PATH = "python"
# 50 microseconds to 30 seconds (DESIGN.md): fine steps where a proxy and a pause-mode wake live,
# coarse ones for cold starts and slow upstreams.
BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
ACCESS_FLUSH_BYTES = 16 * 1024  # access log lines are handed to the writer at this size (or every 100 ms)
ACCESS_POLL_SECONDS = 0.1  # a writer waiting on a pipe looks this often whether close() let it go
CLIENT_STATES = tuple(range(7))  # HEAD, BODY, HELD, CONNECTING, EXCHANGE, TUNNEL, CLOSED


def warm_counts() -> tuple[int, int]:
    """(requests, responses) the warm path handled in this process: none without the extension."""
    return (0, 0)


class Histogram:
    """Counts per bucket (the last one is +Inf) and the sum; cumulated only when exported."""

    __slots__ = ("_counts", "sum")

    def __init__(self) -> None:
        self._counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[_bisect_left(BUCKETS, value)] += 1
        self.sum += value

    @property
    def counts(self) -> list[int]:
        """Counts per bucket (a copy), +Inf last."""
        return list(self._counts)

    @property
    def count(self) -> int:
        return sum(self._counts)

    def absorb(self, counts, total: float) -> None:
        """Add another process's histogram (same buckets) to this one."""
        if len(counts) != len(BUCKETS) + 1:
            raise ValueError(f"absorb(): {len(BUCKETS) + 1} counts expected")
        mine = self._counts
        for i, n in enumerate(counts):
            mine[i] += n
        self.sum += total

    def cumulative(self) -> list[tuple[str, int]]:
        out = []
        total = 0
        for bound, n in zip(BUCKETS, self._counts):
            total += n
            out.append((repr(bound), total))
        out.append(("+Inf", total + self._counts[-1]))
        return out


StatusCounts = dict  # requests per status code: a dict of counts (the C one keeps them in an array)


class WarmLease:
    """The lease of every request admitted at once to a READY service: granted, one per gate.
    release() once per request; never a tunnel's."""

    __slots__ = ("board", "slot", "worker")
    granted, held, tunnel, refused = True, False, False, None

    def __init__(self, board, slot: int, worker: int) -> None:
        if not (0 <= slot < board.slots and 0 <= worker < board.workers):
            raise IndexError(f"board slot {slot} or worker {worker} out of range")
        self.board, self.slot, self.worker = board, slot, worker

    def release(self) -> None:
        self.board.leave(self.slot, self.worker, False)

    def open_tunnel(self) -> None:
        raise RuntimeError("a warm lease is never a tunnel's: an Upgrade takes the Python path")


class AccessLogBase:
    """JSON access lines batched in memory (append_access_line) and written by a writer thread, so
    the event loop never waits on the disk (proxy/_access.c's twin)."""

    def __init__(self, *args, **kwargs) -> None:
        self._buffer = bytearray()
        self.lines = 0
        self.wall_offset = 0.0
        self._queue: _queue.SimpleQueue = _queue.SimpleQueue()
        self._pending = 0
        self._dropped = 0
        self._errors = (0, 0)
        self._lock = _threading.Lock()
        self._thread = None
        self._abandon = False  # close() waited long enough: what is still queued is dropped (and counted)

    def _open(self, fd: int, piece: int, wall_offset: float, max_pending: int) -> None:
        """Start the writer on fd (piece: 0 for a file, PIPE_BUF for a pipe: writes end at a line's end
        within it, which a pipe keeps whole)."""
        self._fd, self._piece, self.wall_offset, self._max_pending = fd, piece, wall_offset, max_pending
        self._thread = _threading.Thread(target=self._write, name="wakegate-access-log", daemon=True)
        self._thread.start()

    def append(self, when, service, method, target, status, bytes_in, bytes_out, total, queue, connect, upstream,
               woke, client) -> None:
        """One line; the batch goes to the writer past ACCESS_FLUSH_BYTES."""
        self.lines += 1
        if append_access_line(self._buffer, when, service, method, target, status, bytes_in, bytes_out, total,
                              queue, connect, upstream, woke, client) > ACCESS_FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Hand the lines so far to the writer (or drop them if it is far behind)."""
        if not self.lines:
            return
        data, n = bytes(self._buffer), self.lines
        self._buffer.clear()
        self.lines = 0
        with self._lock:
            if self._thread is None or self._pending > self._max_pending:
                self._dropped += n
                return
            self._pending += n
        self._queue.put((n, data))

    @property
    def queued_lines(self) -> int:
        with self._lock:
            return self._pending

    @property
    def trouble(self) -> bool:
        """Lines were dropped or writes failed since the last take_*()."""
        return bool(self._dropped or self._errors[0])

    def take_dropped(self) -> int:
        with self._lock:
            n, self._dropped = self._dropped, 0
        return n

    def take_errors(self) -> tuple[int, int]:
        with self._lock:
            errors, self._errors = self._errors, (0, self._errors[1])
        return errors

    def close(self, wait: float | None = None) -> None:
        """Flush, then wait for the writer to write everything and stop; after `wait` seconds, what is
        not written yet is dropped (and counted), and a wait on a reader that stopped reading ends
        within ACCESS_POLL_SECONDS."""
        if wait is not None and not 0 <= wait < 1e9:
            raise ValueError("close(wait): seconds, at least 0")
        self.flush()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(wait)
            if self._thread.is_alive():
                self._abandon = True
                self._thread.join()
            self._thread = None

    def _write(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            n, data = item
            if self._abandon:
                with self._lock:
                    self._dropped += n
                    self._pending -= n
                continue
            try:
                self._write_lines(data)
            except OSError as exc:  # a full disk must not take the proxy down: counted, reported by the owner
                with self._lock:
                    self._errors = (self._errors[0] + 1, exc.errno or 0)
            with self._lock:
                self._pending -= n

    def _wait_writable(self) -> bool:
        """Whether the pipe takes a write now, waiting until it does or close() lets the writer go."""
        poller = _select.poll()
        poller.register(self._fd, _select.POLLOUT)
        while not poller.poll(ACCESS_POLL_SECONDS * 1000):
            if self._abandon:
                return False
        return True

    def _write_lines(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            end = len(view)
            if self._piece and end > self._piece:
                cut = bytes(view[:self._piece]).rfind(b"\n")
                end = cut + 1 if cut >= 0 else len(view)  # a line longer than a pipe's atom goes alone
            if self._piece and not self._wait_writable():
                with self._lock:
                    self._dropped += bytes(view).count(b"\n")
                return
            written = _os.write(self._fd, view[:end])
            if written < end:  # a short write (full disk): finish the line, so the next starts clean
                rest = view[written:end]
                while rest:
                    rest = rest[_os.write(self._fd, rest):]
            view = view[end:]


def prefix_matches(prefix: bytes, path: bytes) -> bool:
    """"/api" matches "/api", "/api/x" and "/api?q", but not "/apix"."""
    if not path.startswith(prefix):
        return False
    return len(path) == len(prefix) or prefix.endswith(b"/") or path[len(prefix)] in b"/?#"


class PathsBase:
    """One host's services by path prefix: (prefix, target) pairs, longest first, and a fallback."""

    __slots__ = ("prefixes", "fallback")

    def __init__(self) -> None:
        self.prefixes: list = []
        self.fallback = None

    def match(self, path: bytes):
        for prefix, target in self.prefixes:
            if prefix_matches(prefix, path):
                return target
        return self.fallback


class RouterBase:
    """The host and path table: exact hosts and `*.suffix` wildcards, each to a target or a PathsBase,
    and the default."""

    __slots__ = ("exact", "wildcard", "default")

    def __init__(self) -> None:
        self.exact: dict = {}
        self.wildcard: dict = {}
        self.default = None

    def route(self, host: bytes | None, path: bytes):
        """The target for this request, the default, or None."""
        if (host is not None and not isinstance(host, bytes)) or not isinstance(path, bytes):
            raise TypeError("route(host, path): host is bytes or None, path is bytes")
        if host is not None:
            entry = self.exact.get(host)
            if entry is not None:
                found = entry.match(path) if isinstance(entry, PathsBase) else entry
                if found is not None:
                    return found
            if self.wildcard and host:
                dot = host.find(b".")
                while dot >= 0:
                    entry = self.wildcard.get(host[dot + 1:])
                    if entry is not None:
                        found = entry.match(path) if isinstance(entry, PathsBase) else entry
                        if found is not None:
                            return found
                    dot = host.find(b".", dot + 1)
        return self.default


class ServerBase:
    """The proxy server's fields (proxy/server.py's ProxyServer keeps them in its instance dict)."""


class PoolBase:
    """An upstream pool's fields (proxy/upstream.py's UpstreamPool keeps them in its instance dict)."""


class RouteBase:
    """A route's fields (proxy/server.py's ServiceRoute)."""

    __slots__ = ("name", "name_bytes", "pool", "pool_key", "service", "no_wake", "stats", "wait_page_after")


class UpstreamBase(_asyncio.Protocol):
    """An upstream connection's fields; data_received is UpstreamConnection's own."""

    __slots__ = ("pool", "transport", "owner", "reused", "closed", "reading_paused")


class ClientBase(_asyncio.Protocol):
    """A client connection's fields live in its instance dict; data_received is ClientConnection's own."""

    warm = False

    def _warm_limits(self, warm: bool) -> None:
        """Nothing to copy: there is no warm path here."""
