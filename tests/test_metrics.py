"""proxy.metrics and controller.metrics: buckets, the /metrics exposition, the access log,
Server-Timing, and a real Prometheus server scraping wakegate."""

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import BUCKETS, Histogram

from .conftest import Client, free_port, wait_for_port
from .test_controller import service

# ---- histograms -------------------------------------------------------------------

OBSERVATIONS = [
    # value, the first "le" bound that must count it
    (0.00001, "5e-05"),
    (0.00005, "5e-05"),  # le is inclusive
    (0.00006, "0.0001"),
    (0.2, "0.25"),
    (30.0, "30.0"),
    (31.0, "+Inf"),
]


@pytest.mark.parametrize("value,first_le", OBSERVATIONS)
def test_histogram_buckets(value, first_le):
    h = Histogram()
    h.observe(value)
    cumulative = h.cumulative()
    counted = [le for le, n in cumulative if n == 1]
    assert counted[0] == first_le
    assert cumulative[-1] == ("+Inf", 1) and h.sum == value and h.count == 1


def test_buckets_resolve_50us_to_30s():
    assert BUCKETS[0] == 0.00005 and BUCKETS[-1] == 30.0 and list(BUCKETS) == sorted(BUCKETS)


# ---- the fast exposition against prometheus-client's own ------------------------------


def _parsed(text: str):
    return sorted(
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    )


def test_fast_exposition_matches_prometheus_client():
    import asyncio

    from controller.cli import build_router
    from controller.config import from_dict
    from controller.controller import Controller
    from controller.metrics import FastExposition, WakegateCollector, make_registry, render
    from proxy.server import ProxyServer

    services = {f"s{i}": {"hosts": [f"s{i}.test"], "upstream": "127.0.0.1:2"} for i in range(20)}
    services["w"] = {"hosts": ["w.test"], "upstream": "127.0.0.1:3", "command": ["sh"], "sleep": "pause"}
    config = from_dict({"proxy": {"listen": "127.0.0.1:1"}, "services": services})
    router, routes = build_router(config)
    controller = Controller(config)
    loop = asyncio.new_event_loop()  # the server is only built, never run: its loop is closed here
    try:
        stats = ProxyServer(config.proxy, router, loop).stats
    finally:
        loop.close()
    fast = FastExposition(controller, routes, stats)
    reference = make_registry(WakegateCollector(controller, routes, stats))
    assert _parsed(fast.render().decode()) == _parsed(render(reference).decode())
    # traffic, errors, wakes and sleeps: cached service lines must notice every change
    for i, (name, route) in enumerate(routes.items()):
        if i % 3 == 0:
            route.stats.codes[200] = i + 1
            route.stats.duration.observe(0.001 * i)
            route.stats.upstream.observe(0.0004)
            route.stats.upstream_errors["reset"] = 1
    w = controller.services["w"]
    w.wake_results["ok"] = 2
    w.wake_seconds.observe(0.002)
    w.resume_seconds.observe(0.0005)
    w.ready_seconds.observe(0.0015)
    w.sleep_reasons["idle"] = 1
    w.wakes, w.sleeps = 2, 1
    stats.client_errors["bad_request"] = 3
    assert _parsed(fast.render().decode()) == _parsed(render(reference).decode())
    routes["s3"].stats.codes[200] += 1
    routes["s3"].stats.duration.observe(0.5)
    assert _parsed(fast.render().decode()) == _parsed(render(reference).decode())
    from proxy.metrics import WasmStats

    routes["s4"].stats.wasm = wasm = WasmStats()
    routes["s4"].stats.codes[200] = 1
    wasm.instantiate.observe(0.0001)
    wasm.run.observe(0.0004)
    wasm.write.observe(0.00002)
    wasm.errors["trap"] = 2
    assert _parsed(fast.render().decode()) == _parsed(render(reference).decode())
    assert 'wakegate_wasm_errors_total{service="s4",reason="trap"} 2.0' in fast.render().decode()


# ---- /metrics, access log and Server-Timing against a real wakegate -----------------


def get(host, path="/hello"):
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def scrape(w) -> dict:
    """{(name, frozenset(labels.items())): value} from GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{w.admin_port}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def measured(start_wakegate, tmp_path):
    """wakegate with a paused service, an access log file and Server-Timing on."""
    access = tmp_path / "access.log"
    w = start_wakegate(service("m", free_port(), sleep="pause", idle="1h")
                       + f'\n[log]\naccess = "{access}"\nserver_timing = true\n')
    w.access = access
    return w


def test_metrics_count_what_was_sent(measured):
    c = Client(measured.port)
    first = c.request(get("m.test"))  # wakes the service
    for _ in range(9):
        assert c.request(get("m.test")).status == 200
    assert c.request(get("m.test", "/status?code=503")).status == 503
    assert Client(measured.port).request(get("nobody.test")).status == 404
    samples = scrape(measured)
    assert first.status == 200
    assert value(samples, "wakegate_requests_total", service="m", code="200") == 10
    assert value(samples, "wakegate_requests_total", service="m", code="503") == 1
    assert value(samples, "wakegate_request_duration_seconds_count", service="m") == 11
    assert value(samples, "wakegate_request_queue_seconds_count", service="m") == 1
    assert value(samples, "wakegate_upstream_response_seconds_count", service="m") == 11
    assert value(samples, "wakegate_wakes_total", service="m", mode="pause", result="ok") == 1
    assert value(samples, "wakegate_wake_duration_seconds_count", service="m", mode="pause") == 1
    assert value(samples, "wakegate_wake_resume_seconds_count", service="m", mode="pause") == 1
    assert value(samples, "wakegate_wake_ready_seconds_count", service="m", mode="pause") == 1
    wake_sum = value(samples, "wakegate_wake_duration_seconds_sum", service="m", mode="pause")
    assert 0 < wake_sum < 30
    assert value(samples, "wakegate_service_state", service="m", state="ready") == 1
    assert value(samples, "wakegate_service_state", service="m", state="asleep") == 0
    assert value(samples, "wakegate_requests_in_flight", service="m") == 0
    assert value(samples, "wakegate_requests_queued", service="m") == 0
    assert value(samples, "wakegate_client_errors_total", reason="unknown_host") == 1
    inf = value(samples, "wakegate_request_duration_seconds_bucket", service="m", le="+Inf")
    assert inf == 11
    # sleeping is counted by reason
    req = urllib.request.Request(f"http://127.0.0.1:{measured.admin_port}/services/m/sleep", method="POST")
    urllib.request.urlopen(req, timeout=5).read()
    deadline = time.monotonic() + 10
    while value(scrape(measured), "wakegate_sleeps_total", service="m", mode="pause", reason="admin") != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_server_timing_header(measured):
    c = Client(measured.port)
    response = c.request(get("m.test"))
    timing = response.header(b"server-timing").decode()
    parts = dict(p.strip().split(";dur=") for p in timing.split(","))
    assert set(parts) == {"queue", "connect", "upstream"}
    assert float(parts["queue"]) > 0  # this one waited for the wake
    assert float(c.request(get("m.test")).header(b"server-timing").split(b"queue;dur=")[1].split(b",")[0]) == 0


def test_access_log_lines(measured):
    c = Client(measured.port)
    c.request(get("m.test"))
    c.request(get("m.test", "/echo"))
    deadline = time.monotonic() + 5
    while len(measured.access.read_text().splitlines()) < 2:
        assert time.monotonic() < deadline, "access log lines did not arrive"
        time.sleep(0.05)
    first, second = [json.loads(line) for line in measured.access.read_text().splitlines()[:2]]
    assert first["service"] == "m" and first["method"] == "GET" and first["path"] == "/hello"
    assert first["status"] == 200 and first["woke"] is True and second["woke"] is False
    assert first["bytes_out"] > 5 and first["bytes_in"] > 20
    assert set(first["ms"]) == {"total", "queue", "connect", "upstream"}
    assert first["ms"]["queue"] > 0 and first["ms"]["total"] >= first["ms"]["queue"]
    assert first["client"] == "127.0.0.1" and abs(first["time"] - time.time()) < 60


def test_metrics_can_be_turned_off(start_wakegate, backend):
    w = start_wakegate(f'[metrics]\nenabled = false\n[services.a]\nhosts = ["a.test"]\nupstream = "127.0.0.1:{backend.port}"\n')
    assert Client(w.port).request(get("a.test")).status == 200
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{w.admin_port}/metrics", timeout=5)
    assert info.value.code == 404
    info.value.close()


def test_metrics_with_a_thousand_services(start_wakegate, backend):
    services = "".join(
        f'[services.s{i}]\nhosts = ["s{i}.test"]\nupstream = "127.0.0.1:{backend.port}"\n' for i in range(1000)
    )
    w = start_wakegate(services)
    for i in range(0, 1000, 100):
        assert Client(w.port).request(get(f"s{i}.test")).status == 200
    samples = scrape(w)
    assert value(samples, "wakegate_requests_total", service="s900", code="200") == 1
    assert value(samples, "wakegate_service_state", service="s999", state="ready") == 1


# ---- a real Prometheus server ------------------------------------------------------------


def _prometheus_query(port, query):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "wakegate.json"


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def _every_dashboard_query_returns_data(prom_port, w):
    """Every panel's PromQL from the Grafana dashboard, with its variables as Grafana would fill them,
    parses and returns data for a wakegate that has served, failed, slept and woken."""
    c = Client(w.port)
    assert c.request(get("p.test", "/status?code=503")).status == 503  # an error for the error panel
    c.close()
    deadline = time.monotonic() + 30
    for expr in _dashboard_queries():
        query = expr.replace("$service", ".*").replace("$__rate_interval", "1m")
        while True:
            result = _prometheus_query(prom_port, query)  # a query that does not parse fails here
            if result:
                break
            assert time.monotonic() < deadline, f"no data for {query}"
            time.sleep(0.5)


def test_the_dashboard_covers_what_operators_watch():
    text = " ".join(_dashboard_queries())
    for metric in ("wakegate_requests_total", "wakegate_request_duration_seconds_bucket", "wakegate_wakes_total",
                   "wakegate_wake_resume_seconds_bucket", "wakegate_wake_ready_seconds_bucket",
                   "wakegate_service_state", "wakegate_requests_queued", "wakegate_request_queue_seconds_bucket",
                   "wakegate_upstream_response_seconds_bucket"):
        assert metric in text, metric


def test_real_prometheus_scrapes_wakegate(start_wakegate, tmp_path):
    if shutil.which("prometheus") is None:
        message = "Debian's prometheus is not installed (make test installs it)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    w = start_wakegate(service("p", free_port(), sleep="pause", idle="200ms"))
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: wakegate
    static_configs:
      - targets: ["127.0.0.1:{w.admin_port}"]
"""
    )
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(prom_port, prom, timeout=30)
        sent, wakes = 0, 0
        for _ in range(3):  # three wakes: sleep after 200 ms idle, then wake again
            c = Client(w.port)
            for _ in range(5):
                assert c.request(get("p.test")).status == 200
                sent += 1
            wakes += 1
            c.close()
            deadline = time.monotonic() + 10
            while json.loads(urllib.request.urlopen(f"http://127.0.0.1:{w.admin_port}/services").read())[
                    "services"][0]["state"] != "asleep":
                assert time.monotonic() < deadline
                time.sleep(0.05)
        deadline = time.monotonic() + 30
        while True:
            result = _prometheus_query(prom_port, 'sum(wakegate_requests_total{service="p"})')
            if result and float(result[0]["value"][1]) == sent:
                break
            assert time.monotonic() < deadline, f"Prometheus never saw {sent} requests: {result}"
            time.sleep(0.5)
        result = _prometheus_query(prom_port, 'sum(wakegate_wakes_total{service="p",result="ok"})')
        assert float(result[0]["value"][1]) == wakes
        result = _prometheus_query(prom_port, "histogram_quantile(0.5, sum by (le) (wakegate_wake_duration_seconds_bucket))")
        median_wake = float(result[0]["value"][1])
        assert 0 < median_wake < 10, median_wake  # a paused backend wakes in milliseconds
        result = _prometheus_query(prom_port, 'up{job="wakegate"}')
        assert float(result[0]["value"][1]) == 1
        _every_dashboard_query_returns_data(prom_port, w)
    finally:
        prom.terminate()
        prom.wait(20)


# ---- the access log's writer (proxy/_access.c and its twin) --------------------------------

ACCESS_IMPLEMENTATIONS = ["proxy._native"] + ([] if os.environ.get("WAKEGATE_PUREPYTHON") else ["proxy._speedups"])


@pytest.fixture(params=ACCESS_IMPLEMENTATIONS, ids=lambda name: name.rsplit(".", 1)[1].lstrip("_"))
def access_base(request):
    import importlib

    return importlib.import_module(request.param).AccessLogBase


def _line(log, i: int) -> None:
    log.append(1700000000.0 + i, b"svc", b"GET", f"/item/{i}".encode(), 200, 10, 20, 0.001, 0.0, 0.0, 0.0005,
               False, b"127.0.0.1")


def test_access_lines_reach_the_file_in_order(access_base, tmp_path):
    fd = os.open(tmp_path / "access.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    log = access_base()
    log._open(fd, 0, 0.0, 1000)
    for i in range(500):  # several batches of 16 KiB
        _line(log, i)
    log.close()
    os.close(fd)
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert [json.loads(line)["path"] for line in lines] == [f"/item/{i}" for i in range(500)]
    assert json.loads(lines[0])["ms"] == {"total": 1.0, "queue": 0.0, "connect": 0.0, "upstream": 0.5}


def test_a_writer_far_behind_drops_lines_and_counts_them(access_base):
    import select
    import threading

    read_end, write_end = os.pipe()  # nobody reads until the end: the writer blocks when the pipe is full
    log = access_base()
    log._open(write_end, select.PIPE_BUF, 0.0, 200)
    for i in range(3000):
        _line(log, i)
        if i % 50 == 49:
            log.flush()
    dropped = log.take_dropped()
    assert dropped > 0 and log.queued_lines <= 200 + 100
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_end, 65536), b"")))
    reader.start()
    log.close()
    os.close(write_end)
    reader.join()
    os.close(read_end)
    lines = b"".join(chunks).splitlines()
    assert len(lines) + dropped == 3000 and all(json.loads(line)["service"] == "svc" for line in lines)
    assert log.take_dropped() == 0


def test_failed_writes_are_counted_not_raised(access_base):
    import errno

    fd = os.open("/dev/full", os.O_WRONLY)
    log = access_base()
    log._open(fd, 0, 0.0, 1000)
    _line(log, 0)
    log.close()
    os.close(fd)
    assert log.take_errors() == (1, errno.ENOSPC)
    assert log.take_errors()[0] == 0


def test_close_lets_a_writer_stuck_on_a_reader_go(access_base):
    """A pipe nobody reads (a stalled journald): close(wait) returns after about `wait` seconds, and
    every line it could not write is counted as dropped."""
    import select
    import time

    read_end, write_end = os.pipe()
    log = access_base()
    log._open(write_end, select.PIPE_BUF, 0.0, 100_000)
    for i in range(2000):  # ~300 KB: far more than the pipe holds
        _line(log, i)
    started = time.monotonic()
    log.close(0.3)  # returns once the writer has stopped (it is joined)
    waited = time.monotonic() - started
    assert 0.3 <= waited < 3.0, waited
    written = b""
    os.set_blocking(read_end, False)
    try:
        while chunk := os.read(read_end, 1 << 16):
            written += chunk
    except BlockingIOError:
        pass
    os.close(write_end)
    os.close(read_end)
    lines = written.count(b"\n")
    assert 0 < lines < 2000 and written.endswith(b"\n")  # whole lines only
    assert log.take_dropped() == 2000 - lines and log.queued_lines == 0


@pytest.mark.parametrize("wait", [-1, float("nan"), "soon"])
def test_close_refuses_a_wait_that_is_not_seconds(access_base, wait):
    log = access_base()
    with pytest.raises((ValueError, TypeError)):
        log.close(wait)
    log.close()
