"""controller.admin against a real wakegate: the admin listener guards itself like the proxy.

(The API's answers are covered with the services they act on, in test_controller.py.)"""

import socket
import subprocess
import sys
import time
import urllib.request

from .conftest import ROOT, free_port

SERVICE = '[services.a]\nhosts = ["a.test"]\nupstream = "127.0.0.1:{port}"\n'


def metrics(w) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{w.admin_port}/metrics", timeout=5) as response:
        return response.read().decode()


def counter(text: str, name: str, reason: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'{name}{{reason="{reason}"}} '):
            return float(line.split()[-1])
    return 0.0


def closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


BAD_REQUESTS = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: a\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\n\r\n",
]


def test_malformed_requests_are_counted_not_logged_with_tracebacks(start_wakegate, backend):
    w = start_wakegate(SERVICE.format(port=backend.port))
    sent = 0
    for _ in range(75):
        for raw in BAD_REQUESTS:
            with socket.create_connection(("127.0.0.1", w.admin_port), timeout=5) as s:
                s.sendall(raw)
                assert s.recv(4096).split(b" ")[1] == b"400"
                sent += 1
    assert counter(metrics(w), "wakegate_client_errors_total", "admin_bad_request") == sent
    output = w.output()
    assert "Traceback" not in output
    assert len([line for line in output.splitlines() if "malformed" in line]) <= 2  # 300 requests, one line


def test_connections_that_never_finish_a_request_are_closed(start_wakegate, backend):
    w = start_wakegate(SERVICE.format(port=backend.port), admin_extra='idle_timeout = "500ms"')
    slow = socket.create_connection(("127.0.0.1", w.admin_port))
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHo")
    idle = socket.create_connection(("127.0.0.1", w.admin_port))  # sends nothing at all
    keep = socket.create_connection(("127.0.0.1", w.admin_port))
    keep.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    assert b"200 OK" in keep.recv(4096)
    started = time.monotonic()
    for s in (slow, idle, keep):  # keep-alive idle too
        assert closed_within(s, 3.0)
        s.close()
    assert time.monotonic() - started < 3.0
    assert counter(metrics(w), "wakegate_client_errors_total", "admin_timeout") == 2


def test_admin_connections_are_capped(start_wakegate, backend):
    w = start_wakegate(SERVICE.format(port=backend.port), admin_extra='idle_timeout = "30s"')
    held = [socket.create_connection(("127.0.0.1", w.admin_port)) for _ in range(64)]
    time.sleep(0.2)
    extra = socket.create_connection(("127.0.0.1", w.admin_port))
    assert closed_within(extra, 2.0)
    extra.close()
    assert socket.create_connection(("127.0.0.1", w.port)).close() is None  # the proxy is not affected
    for s in held:
        s.close()
    time.sleep(0.2)
    assert counter(metrics(w), "wakegate_accept_errors_total", "admin_limit") >= 1


def test_admin_on_every_address_without_a_token_warns(backend, tmp_path):
    config = tmp_path / "open.toml"
    config.write_text(f'[proxy]\nlisten = "127.0.0.1:{free_port()}"\n[admin]\nlisten = "0.0.0.0:{free_port()}"\n'
                      + SERVICE.format(port=backend.port))
    proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "serve", "-c", str(config)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "listening on" in line or not line:
                break
        assert any("without a token" in line for line in lines), lines
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()


# ---- the OpenAPI description against the implementation (schemathesis) ----------------------

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from .test_controller import service  # noqa: E402


def test_admin_api_matches_its_openapi_description(start_wakegate):
    """Every operation of /openapi.json, called with generated requests (path names, tokens or none)
    against a wakegate with a service that wakes, one always up and a token: every answer must be
    one the description allows, with the declared body."""
    w = start_wakegate(service("sleepy", free_port(), idle="1h") + SERVICE.format(port=free_port()),
                       admin_extra='token = "secret"')
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{w.admin_port}/openapi.json")
    schema.config.update(base_url=f"http://127.0.0.1:{w.admin_port}", headers={"Authorization": "Bearer secret"})
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}  # schemathesis leaves out the description's own URL
    assert labels >= {"GET /healthz", "GET /services", "POST /services/{name}/wake", "POST /services/{name}/sleep",
                      "POST /reload", "GET /metrics", "GET /", "GET /status.json"}, labels
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(timeout=30)
            if case.path_parameters and "name" in case.path_parameters:  # and with names that exist
                for name in ("sleepy", "a"):
                    case.path_parameters["name"] = name
                    case.call_and_validate(timeout=30)

        check()


# ---- the live status page, in headless Chromium ------------------------------------------------

def test_the_status_page_shows_every_service_live(start_wakegate):
    """The page needs the token; opened with it in headless Chromium it lists every service with its
    state and draws the request rate of one under traffic, updating itself."""
    import asyncio
    import os
    import threading
    import urllib.error

    import pytest

    from . import chromium
    from .conftest import Client
    from .test_controller import get, service as command_service

    why = chromium.available()
    if why:
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)
    w = start_wakegate(command_service("sleepy", free_port(), idle="3s") + SERVICE.format(port=free_port()),
                       admin_extra='token = "secret"')
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{w.admin_port}/", timeout=5)
        raise AssertionError("the status page answered without the token")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401
    stop = threading.Event()

    def traffic():
        c = Client(w.port)
        while not stop.is_set():
            assert c.request(get("sleepy.test")).status == 200
            time.sleep(0.02)
        c.close()

    sender = threading.Thread(target=traffic)
    sender.start()

    async def look():
        async with chromium.Browser() as browser:
            await browser.goto(f"http://127.0.0.1:{w.admin_port}/?token=secret")
            rows = await browser.wait_for("document.querySelectorAll('#rows tr').length === 2 && "
                                          "Array.from(document.querySelectorAll('#rows tr td:first-child'))"
                                          ".map(td => td.textContent).join(',')")
            assert rows == "sleepy,a"
            await browser.wait_for("document.querySelector('#rows tr .state').textContent === 'ready'", 15)
            await browser.wait_for("document.querySelectorAll('#rows tr:first-child polyline.rate').length === 1 "
                                   "&& document.querySelector('#rows tr:first-child polyline.rate')"
                                   ".getAttribute('points').split(' ').length >= 3", 20)
            return await browser.screenshot("status-page")

    try:
        png = asyncio.run(look())
    finally:
        stop.set()
        sender.join()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
