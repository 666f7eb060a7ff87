"""proxy/pages.py: the waiting page a browser gets while its service wakes, in headless Chromium
(tests/chromium.py): the browser lands on the service's own page after a cold start without anyone
doing anything, while API clients are held as before."""

import asyncio
import os

import pytest

from proxy.http11 import parse_request
from proxy.pages import waiting_page, wants_html

from . import chromium
from .conftest import Client, free_port
from .test_controller import get, service, state, wait_state


@pytest.mark.parametrize("request_bytes, html", [
    (b"GET / HTTP/1.1\r\nHost: a\r\nAccept: text/html,application/xhtml+xml,*/*;q=0.8\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", False),
    (b"HEAD / HTTP/1.1\r\nHost: a\r\nAccept: text/html\r\n\r\n", False),
    (b"POST / HTTP/1.1\r\nHost: a\r\nAccept: text/html\r\nContent-Length: 0\r\n\r\n", False),
])
def test_only_a_browsers_navigation_gets_the_page(request_bytes, html):
    assert wants_html(parse_request(request_bytes)) is html


def test_the_page_is_self_contained_and_escapes_the_name():
    page = waiting_page("<x>&y", keep_alive=True).decode()
    assert page.startswith("HTTP/1.1 503 ") and "Retry-After: 1" in page and "no-store" in page
    assert "&lt;x&gt;&amp;y" in page and "<x>" not in page.split("\r\n\r\n", 1)[1]
    body = page.split("\r\n\r\n", 1)[1]
    assert "src=" not in body and "href=" not in body and "http://" not in body and "https://" not in body


def wait_config(port):
    return service("slowstart", port, sleep="stop", idle="1h", wake="20s", args=("--startup-delay", "3"),
                   extra='wait_page = true\nwait_page_after = "300ms"')


def test_a_browser_lands_on_the_service_after_a_cold_start(start_wakegate):
    why = chromium.available()
    if why:
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)
    w = start_wakegate(wait_config(free_port()))

    async def browse():
        async with chromium.Browser() as browser:
            await browser.goto(f"http://slowstart.test:{w.port}/hello")
            title = await browser.wait_for("document.title")
            assert title == "slowstart is starting", title
            await asyncio.sleep(0.6)  # the bar moves
            shot = await browser.screenshot("waiting-page")
            assert shot[:8] == b"\x89PNG\r\n\x1a\n"
            text = await browser.wait_for("document.body && document.body.innerText === 'hello' && "
                                          "document.body.innerText", timeout=30)
            assert text == "hello"
            assert await browser.evaluate("location.href") == f"http://slowstart.test:{w.port}/hello"
            await browser.screenshot("after-wake")

    asyncio.run(browse())
    assert state(w, "slowstart")["wakes"] == 1


def test_api_clients_are_still_held_and_the_state_is_polled_without_waking(start_wakegate):
    w = start_wakegate(wait_config(free_port()))
    c = Client(w.port, timeout=30)
    polled = c.request(b"GET /.wakegate/state HTTP/1.1\r\nHost: slowstart.test\r\n\r\n")
    assert polled.status == 200 and polled.body == b'{"service": "slowstart", "state": "asleep", "ready": false}'
    assert state(w, "slowstart")["wakes"] == 0  # asking is no reason to wake
    held = c.request(get("slowstart.test", extra="Accept: */*\r\n"))  # an API client: held until it is up
    assert held.status == 200 and held.body == b"hello"
    c.close()
    wait_state(w, "slowstart", "ready")
