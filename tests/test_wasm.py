"""proxy/wasm.py: WebAssembly services. The CGI response parser fed byte by byte, the CGI environment,
then wasmtime end to end behind a real wakegate with two workers: correctness both ways, every limit,
traps and malformed responses (each a 502 that touches no other request), 100 requests at once, a
slow handler beside fast ones, a module replaced on disk, the compile cache, the example API."""

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from proxy.http11 import parse_request
from proxy.wasm import BodyDecoder, CgiResponse, HandlerError, cgi_environment

from .conftest import ROOT, Client

BUILT = ROOT / "build" / "wasm"


@pytest.fixture(scope="module")
def modules():
    """The handlers, built by deploy/wasm.sh (make wasm) from examples/wasm and tests/wasm."""
    result = subprocess.run(["sh", "deploy/wasm.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PY": str(ROOT / ".venv" / "bin" / "python")})
    assert result.returncode == 0, result.stdout + result.stderr
    return BUILT


# ---- the CGI response, byte by byte --------------------------------------------------------------

CGI = [  # stdout, status, headers, body
    (b"Content-Type: text/plain\r\n\r\nhi", 200, [(b"Content-Type", b"text/plain")], b"hi"),
    (b"Content-Type: text/plain\n\nhi\n", 200, [(b"Content-Type", b"text/plain")], b"hi\n"),
    (b"Status: 404 Not Found\r\nX-A: 1\r\n\r\n", 404, [(b"X-A", b"1")], b""),
    (b"Status: 201\r\n\r\nmade", 201, [], b"made"),
    (b"Location: /there\r\n\r\n", 302, [(b"Location", b"/there")], b""),
    (b"Content-Length: 999\r\nConnection: close\r\nX-B: 2\r\n\r\nxy", 200, [(b"X-B", b"2")], b"xy"),  # framing is ours
]


@pytest.mark.parametrize("stdout, status, headers, body", CGI)
def test_cgi_response_byte_by_byte(stdout, status, headers, body):
    cgi = CgiResponse()
    out = b""
    for i in range(len(stdout)):
        out += cgi.feed(stdout[i:i + 1])
    assert cgi.head_done and cgi.status == status and cgi.headers == headers and out == body


@pytest.mark.parametrize("stdout, problem", [
    (b"no colon here\r\n\r\n", "bad CGI header line"),
    (b"Bad Name: x\r\n\r\n", "bad CGI header line"),
    (b"Status: great\r\n\r\n", "bad Status"),
    (b"Status: 100 Continue\r\n\r\n", "bad Status"),
    (b"X: " + b"a" * 20000, "no end of the CGI header block"),
])
def test_malformed_cgi_responses_are_refused(stdout, problem):
    cgi = CgiResponse()
    with pytest.raises(HandlerError, match=problem) as caught:
        for i in range(0, len(stdout), 7):
            cgi.feed(stdout[i:i + 7])
    assert caught.value.reason == "malformed"


BODIES = [  # length (CHUNKED: -1), bytes on the wire, body, what follows it
    (5, b"hello", b"hello", b""),
    (3, b"abcGET /", b"abc", b"GET /"),
    (-1, b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", b"abcde", b""),
    (-1, b"3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT", b"abc", b"NEXT"),
    (-1, b"A\n0123456789\n0\n\n", b"0123456789", b""),
]


@pytest.mark.parametrize("length, wire, body, rest", BODIES)
def test_request_bodies_byte_by_byte(length, wire, body, rest):
    decoder = BodyDecoder(length)
    out, after = b"", b""
    for i in range(len(wire)):
        if decoder.done:
            after += wire[i:i + 1]
            continue
        out += decoder.feed(wire[i:i + 1])
        after += decoder.rest
    assert decoder.done and out == body and after == rest


def test_a_bad_chunk_size_is_a_400():
    with pytest.raises(HandlerError) as caught:
        BodyDecoder(-1).feed(b"zz\r\n")
    assert caught.value.status == 400


def test_cgi_environment():
    head = parse_request(b"POST /api/items/3?x=1 HTTP/1.1\r\nHost: a.test:8080\r\nContent-Type: text/json\r\n"
                         b"X-Thing: yes\r\nProxy: evil\r\nContent-Length: 4\r\n\r\n")
    env = dict(cgi_environment(head, 4, "/api", "10.0.0.9", (("GREETING", "hi"),)))
    assert env["REQUEST_METHOD"] == "POST" and env["SCRIPT_NAME"] == "/api" and env["PATH_INFO"] == "/items/3"
    assert env["QUERY_STRING"] == "x=1" and env["CONTENT_LENGTH"] == "4" and env["CONTENT_TYPE"] == "text/json"
    assert env["HTTP_X_THING"] == "yes" and "HTTP_PROXY" not in env and env["SERVER_NAME"] == "a.test"
    assert env["REMOTE_ADDR"] == "10.0.0.9" and env["GREETING"] == "hi" and env["SERVER_PROTOCOL"] == "HTTP/1.1"


# ---- end to end ------------------------------------------------------------------------------------

def wasm_config(tmp_path, modules, module="cases.wasm", extra="", workers=2):
    return f"""[proxy]
workers = {workers}
max_body_size = "64MiB"
[services.w]
hosts = ["w.test"]
[services.w.wasm]
module = "{module if module.startswith('/') else modules / module}"
cache_dir = "{tmp_path / 'cache'}"
max_time = "300ms"
max_memory = "32MiB"
max_response = "8MiB"
env = {{ GREETING = "hi" }}
{extra}
"""


def req(method, path, host="w.test", body=b"", extra=""):
    length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}{length}\r\n".encode() + body


def one(port, data, method=b"GET"):
    c = Client(port, timeout=30)
    try:
        return c.request(data, method)
    finally:
        c.close()


def test_requests_and_responses_both_ways(start_wakegate, tmp_path, modules):
    w = start_wakegate(wasm_config(tmp_path, modules))
    body = bytes(range(256)) * 40
    r = one(w.port, req("POST", "/echo?a=1&b=two", body=body, extra="X-Custom: yes\r\n"), b"POST")
    assert r.status == 201 and r.header(b"x-handler") == b"cases"
    lines, _, echoed = r.body.partition(b"body:")
    env = dict(line.split("=", 1) for line in lines.decode().splitlines())
    assert env["REQUEST_METHOD"] == "POST" and env["PATH_INFO"] == "/echo" and env["QUERY_STRING"] == "a=1&b=two"
    assert env["HTTP_X_CUSTOM"] == "yes" and env["GREETING"] == "hi" and env["CONTENT_LENGTH"] == str(len(body))
    assert echoed == body
    chunked = b"POST /echo HTTP/1.1\r\nHost: w.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    assert one(w.port, chunked, b"POST").body.endswith(b"body:abcde")
    large = os.urandom(5_000_000)  # far over a pipe's buffer: the handler reads while the body arrives
    r = one(w.port, req("POST", "/echo", body=large), b"POST")
    assert r.status == 201 and r.body.partition(b"body:")[2] == large
    assert _status_of_upload(w.port, req("POST", "/echo", body=b"y" * 11_000_000)) == 413  # over max_body (10 MiB)
    big = one(w.port, req("GET", "/big?n=3000000"))  # over the held-back part: streamed, chunked
    assert big.status == 200 and big.body == b"x" * 3_000_000
    small = one(w.port, req("GET", "/big?n=10"))
    assert small.header(b"content-length") == b"10" and b"wasm-run" in b" ".join(
        v for n, v in small.headers if n.lower() == b"server-timing")
    head = one(w.port, req("HEAD", "/big?n=10"), b"HEAD")
    assert head.status == 200 and head.body == b""
    assert one(w.port, req("GET", "/nothing")).status == 404


def _status_of_upload(port, data) -> int:
    """The status of a request whose upload the server may cut short once it has answered."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        while b"\r\n" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
        return int(answer.split(b" ")[1])
    finally:
        s.close()


LIMITS = [  # path, reason counted
    ("/spin", "time"),
    ("/hog", "memory"),
    ("/flood", "response_size"),
    ("/trap", "trap"),
    ("/malformed", "malformed"),
    ("/badstatus", "malformed"),
    ("/exit", "exit"),
]


def test_every_limit_and_fault_is_a_502_that_touches_nothing_else(start_wakegate, tmp_path, modules):
    # max_response within the part held back before the head goes out: a flood is a clean 502 (past it,
    # the response is streaming and only a cut connection can tell the client)
    w = start_wakegate(wasm_config(tmp_path, modules).replace('max_response = "8MiB"', 'max_response = "512KiB"'))
    for path, _reason in LIMITS:
        started = time.monotonic()
        results = {}

        def fast(i):
            results[i] = one(w.port, req("GET", f"/big?n={i}")).body

        side = [threading.Thread(target=fast, args=(i,)) for i in range(1, 6)]  # beside the bad one
        for t in side:
            t.start()
        bad = one(w.port, req("GET", path))
        for t in side:
            t.join()
        assert bad.status == 502, (path, bad.status, bad.body[:80])
        assert time.monotonic() - started < 5, path
        assert results == {i: b"x" * i for i in range(1, 6)}, path
    with urllib.request.urlopen(f"http://127.0.0.1:{w.admin_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for reason in {r for _, r in LIMITS}:
        assert f'wakegate_wasm_errors_total{{service="w",reason="{reason}"}}' in text, reason
    assert 'wakegate_wasm_seconds_bucket{service="w",phase="instantiate"' in text
    log = w.output()
    assert "ran longer than max_time" in log and "wrote more than max_response" in log and "exited with status 3" in log
    assert "Traceback" not in log


def test_a_hundred_at_once_and_a_slow_handler_holds_up_nobody(start_wakegate, tmp_path, modules):
    w = start_wakegate(wasm_config(tmp_path, modules, extra="instances = 4").replace('max_time = "300ms"',
                                                                                    'max_time = "5s"'))
    slow_done = []
    slow = threading.Thread(target=lambda: slow_done.append((one(w.port, req("GET", "/sleep?ms=1500")), time.monotonic())))
    slow.start()
    time.sleep(0.2)
    statuses, lock = [], threading.Lock()

    def fast():
        r = one(w.port, req("GET", "/big?n=2"))
        with lock:
            statuses.append((r.status, r.body, time.monotonic()))

    threads = [threading.Thread(target=fast) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    slow.join()
    assert [(s, b) for s, b, _ in statuses] == [(200, b"xx")] * 100
    (response, slow_end), = slow_done
    assert response.status == 200 and response.body == b"slept 1500\n"
    assert max(t for _, _, t in statuses) < slow_end  # all hundred were answered while it slept


def test_a_module_replaced_on_disk_is_used_and_compiles_are_cached(start_wakegate, tmp_path, modules):
    module = tmp_path / "live.wasm"
    shutil.copy(modules / "hello.wasm", module)
    w = start_wakegate(wasm_config(tmp_path, modules, module=str(module), workers=1))
    assert one(w.port, req("GET", "/x")).body == b"hello from wasm: /x\n"
    replacement = tmp_path / "next.wasm"
    shutil.copy(modules / "hello-wat.wasm", replacement)
    os.replace(replacement, module)
    assert one(w.port, req("GET", "/x")).body == b"hello from wat\n"
    assert w.output().count("compiled") == 2
    w.stop()
    w.restart()  # the compiled module is on disk: no compile this time
    assert one(w.port, req("GET", "/x")).body == b"hello from wat\n"
    assert w.output().count("compiled") == 2 and "loaded" in w.output()


def test_the_example_api(start_wakegate, tmp_path, modules):
    w = start_wakegate(wasm_config(tmp_path, modules, module="api.wasm"))
    items = one(w.port, req("GET", "/items"))
    assert items.status == 200 and items.header(b"content-type") == b"application/json"
    assert json.loads(items.body) == [{"id": 1, "name": "apple"}, {"id": 2, "name": "pear"}, {"id": 3, "name": "plum"}]
    assert json.loads(one(w.port, req("GET", "/items/2")).body) == {"id": 2, "name": "pear"}
    missing = one(w.port, req("GET", "/items/9"))
    assert missing.status == 404 and json.loads(missing.body) == {"error": "no item 9"}
    total = one(w.port, req("POST", "/sum", body=b"1 2 3 40"), b"POST")
    assert json.loads(total.body) == {"sum": 46, "count": 4}
    assert one(w.port, req("GET", "/sum")).status == 405
