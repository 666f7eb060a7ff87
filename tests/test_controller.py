"""controller (service life cycle, process backends, admin API) end to end: real wakegate,
real backend processes that really freeze, stop, crash and wake."""

import hashlib
import json
import os
import random
import signal
import socket
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import BACKEND, Client, free_port

PY = sys.executable


def service(name, port, *, sleep="pause", idle="300ms", wake="10s", extra="", args=()):
    command = json.dumps([PY, str(BACKEND), "--port", str(port), "--name", name, *args])
    return f"""
[services.{name}]
hosts = ["{name}.test"]
upstream = "127.0.0.1:{port}"
command = {command}
sleep = "{sleep}"
idle_timeout = "{idle}"
wake_timeout = "{wake}"
{extra}
"""


def get(host, path="/hello", extra=""):
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def admin(w, method="GET", path="/services", token=None):
    req = urllib.request.Request(f"http://127.0.0.1:{w.admin_port}{path}", method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def state(w, name):
    return next(s for s in admin(w)[1]["services"] if s["name"] == name)


def wait_state(w, name, wanted, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = state(w, name)
        if s["state"] == wanted:
            return s
        time.sleep(0.02)
    raise AssertionError(f"{name} never became {wanted}: {state(w, name)}")


def fetch(port, host, path="/hello", timeout=30):
    c = Client(port, timeout=timeout)
    try:
        return c.request(get(host, path))
    finally:
        c.close()


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"


def frozen(pid):
    """Frozen by the cgroup freezer or stopped by SIGSTOP."""
    status = Path(f"/proc/{pid}/status").read_text()
    state_line = next(line for line in status.splitlines() if line.startswith("State:"))
    if "T (stopped)" in state_line:
        return True
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "freezer":
            return Path(f"/sys/fs/cgroup/freezer{path}/freezer.state").read_text().strip() == "FROZEN"
        if controllers == "":
            events = Path(f"/sys/fs/cgroup/unified{path}/cgroup.events")
            if events.exists() and "frozen 1" in events.read_text():
                return True
    return False


@pytest.fixture
def wg(start_wakegate):
    return start_wakegate


def test_stop_mode_starts_on_demand_and_stops_when_idle(wg):
    port = free_port()
    w = wg(service("cold", port, sleep="stop"))
    assert state(w, "cold")["state"] == "asleep" and state(w, "cold")["pid"] is None
    assert fetch(w.port, "cold.test").body == b"hello"
    first = state(w, "cold")
    assert first["state"] == "ready" and first["wakes"] == 1
    pid = first["pid"]
    assert alive(pid)
    asleep = wait_state(w, "cold", "asleep")
    assert asleep["sleeps"] == 1 and asleep["pid"] is None
    time.sleep(0.1)
    assert not alive(pid)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert fetch(w.port, "cold.test").body == b"hello"
    assert state(w, "cold")["pid"] != pid and state(w, "cold")["wakes"] == 2


def test_pause_mode_freezes_and_thaws_the_same_process(wg):
    w = wg(service("warm", free_port(), sleep="pause"))
    assert fetch(w.port, "warm.test").body == b"hello"
    pid = state(w, "warm")["pid"]
    wait_state(w, "warm", "asleep")
    assert alive(pid) and frozen(pid)
    assert "freezes with" in w.output()
    response = fetch(w.port, "warm.test", "/pid")
    assert response.body == str(pid).encode()
    assert not frozen(pid)
    s = state(w, "warm")
    assert s["wakes"] == 2 and s["last_resume_ms"] is not None and s["last_ready_ms"] is not None


def test_many_concurrent_first_requests_cause_one_wake(wg):
    w = wg(service("crowd", free_port(), sleep="stop", args=("--startup-delay", "0.3"), idle="5s"))
    with ThreadPoolExecutor(64) as pool:
        statuses = list(pool.map(lambda _: fetch(w.port, "crowd.test").status, range(200)))
    assert statuses == [200] * 200
    assert state(w, "crowd")["wakes"] == 1


def test_request_while_going_to_sleep_is_held_and_wakes_it(wg):
    w = wg(service("edge", free_port(), sleep="stop", idle="10s", args=("--term-delay", "0.5")))
    assert fetch(w.port, "edge.test").status == 200
    admin(w, "POST", "/services/edge/sleep")
    wait_state(w, "edge", "sleeping")  # the process takes 0.5 s to exit
    started = time.monotonic()
    assert fetch(w.port, "edge.test").body == b"hello"  # held, not sent to the dying process
    assert time.monotonic() - started > 0.2
    s = state(w, "edge")
    assert s["state"] == "ready" and s["sleeps"] == 1 and s["wakes"] == 2


def test_sleep_waits_for_requests_in_flight(wg):
    w = wg(service("drain", free_port(), sleep="stop", idle="10s"))
    assert fetch(w.port, "drain.test").status == 200
    c = Client(w.port)
    c.send(get("drain.test", "/slow?delay=0.5"))
    time.sleep(0.1)
    admin(w, "POST", "/services/drain/sleep")
    assert c.response().body == b"slow"  # finished before the process was stopped
    wait_state(w, "drain", "asleep")


def test_idle_keepalive_connection_does_not_keep_it_awake(wg):
    w = wg(service("keep", free_port(), sleep="stop", idle="300ms"))
    c = Client(w.port)
    assert c.request(get("keep.test")).body == b"hello"
    wait_state(w, "keep", "asleep")
    assert c.request(get("keep.test")).body == b"hello"  # same connection: woken, not refused
    assert state(w, "keep")["wakes"] == 2
    c.close()


def test_in_flight_request_keeps_it_awake(wg):
    w = wg(service("busy", free_port(), sleep="stop", idle="200ms"))
    assert fetch(w.port, "busy.test", "/slow?delay=0.8").body == b"slow"
    s = state(w, "busy")
    assert s["sleeps"] == 0 and s["state"] == "ready"


def test_open_tunnel_keeps_it_awake(wg):
    w = wg(service("tun", free_port(), sleep="stop", idle="200ms"))
    c = Client(w.port)
    c.send(get("tun.test", "/ws", "Connection: upgrade\r\nUpgrade: websocket\r\n"))
    assert c.recv().startswith(b"HTTP/1.1 101 ")
    time.sleep(0.7)
    s = state(w, "tun")
    assert s["state"] == "ready" and s["tunnels"] == 1
    c.send(b"ping")
    assert c.recv() == b"ping"
    c.close()
    wait_state(w, "tun", "asleep")


def test_backend_crash_gives_502_then_wakes_again(wg):
    w = wg(service("crash", free_port(), sleep="stop", idle="10s"))
    assert fetch(w.port, "crash.test").status == 200
    pid = state(w, "crash")["pid"]
    c = Client(w.port)
    c.send(get("crash.test", "/slow?delay=5"))
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    assert c.response().status == 502
    wait_state(w, "crash", "asleep")
    assert fetch(w.port, "crash.test").body == b"hello"
    assert state(w, "crash")["pid"] != pid


def test_no_wake_rules(wg):
    extra = '[services.mon.no_wake]\npaths = ["/healthz"]\nuser_agents = ["UptimeRobot"]\nstatus = 503\n'
    w = wg(service("mon", free_port(), sleep="stop", idle="10s", extra=extra))
    for path, ua in (("/healthz", "curl"), ("/hello", "Mozilla/5.0 UptimeRobot/2.0")):
        c = Client(w.port)
        response = c.request(get("mon.test", path, f"User-Agent: {ua}\r\n"))
        assert response.status == 503 and response.header(b"retry-after") is not None
        c.close()
    assert state(w, "mon")["state"] == "asleep" and state(w, "mon")["wakes"] == 0
    assert fetch(w.port, "mon.test").status == 200  # an ordinary request wakes it
    c = Client(w.port)
    assert c.request(get("mon.test", "/hello", "User-Agent: UptimeRobot\r\n")).body == b"hello"  # awake: proxied


def test_full_queue_gets_503_with_retry_after(wg):
    w = wg(service("small", free_port(), sleep="stop", args=("--startup-delay", "1"), extra="max_queue = 3"))
    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda _: fetch(w.port, "small.test"), range(10)))
    statuses = sorted(r.status for r in responses)
    assert statuses.count(200) == 3 and statuses.count(503) == 7
    assert all(r.header(b"retry-after") for r in responses if r.status == 503)


def test_failed_wake_answers_held_requests_and_backs_off(wg, tmp_path):
    config = f"""
[services.broken]
hosts = ["broken.test"]
upstream = "127.0.0.1:{free_port()}"
command = ["{PY}", "-c", "raise SystemExit(3)"]
wake_timeout = "5s"
"""
    w = wg(config)
    response = fetch(w.port, "broken.test")
    assert response.status == 503 and response.header(b"retry-after") is not None
    s = state(w, "broken")
    assert s["state"] == "failed" and s["failures"] == 1
    again = fetch(w.port, "broken.test")  # within the backoff: refused at once
    assert again.status == 503 and state(w, "broken")["failures"] == 1


def test_wake_timeout_gives_504(wg):
    config = f"""
[services.mute]
hosts = ["mute.test"]
upstream = "127.0.0.1:{free_port()}"
command = ["{PY}", "-c", "import time; time.sleep(60)"]
wake_timeout = "500ms"
"""
    w = wg(config)
    started = time.monotonic()
    response = fetch(w.port, "mute.test")
    assert response.status == 504 and response.header(b"retry-after") is not None
    assert time.monotonic() - started < 3
    # The held request's own expiry (in its worker) and the controller's wake deadline are the same
    # wake_timeout, on two processes' clocks: the service turns FAILED at about the same moment.
    wait_state(w, "mute", "failed", timeout=5)


def test_admin_api(wg):
    w = wg(service("adm", free_port(), sleep="pause", idle="1h"))
    status, body = admin(w)
    assert status == 200
    (s,) = body["services"]
    assert {"name", "state", "in_flight", "queued", "last_wake_ms", "wakes", "sleeps"} <= set(s)
    assert admin(w, "POST", "/services/adm/wake")[0] == 202
    wait_state(w, "adm", "ready")
    assert admin(w, "POST", "/services/adm/sleep")[0] == 202
    wait_state(w, "adm", "asleep")
    assert admin(w, "POST", "/services/nope/wake")[0] == 404


def test_admin_token(wg):
    w = wg(service("tok", free_port()), admin_extra='token = "s3cret"')
    assert admin(w)[0] == 401
    assert admin(w, token="wrong")[0] == 401
    status, body = admin(w, token="s3cret")
    assert status == 200 and body["services"][0]["name"] == "tok"
    with urllib.request.urlopen(f"http://127.0.0.1:{w.admin_port}/healthz", timeout=5) as resp:
        assert resp.status == 200  # health needs no token


def test_processes_are_gone_after_wakegate_exits(wg):
    w = wg(service("gone", free_port(), sleep="pause", idle="1h") + service("gone2", free_port(), sleep="stop", idle="1h"))
    assert fetch(w.port, "gone.test").status == 200
    assert fetch(w.port, "gone2.test").status == 200
    pids = [state(w, n)["pid"] for n in ("gone", "gone2")]
    admin(w, "POST", "/services/gone/sleep")
    wait_state(w, "gone", "asleep")  # frozen: must still be stopped on exit
    assert w.stop() == 0
    time.sleep(0.2)
    assert not any(alive(pid) for pid in pids)


def test_soak_sleep_wake_cycles(wg):
    """Hundreds of sleep/wake cycles under random arrivals: every request gets its 200."""
    w = wg(service("soak", free_port(), sleep="pause", idle="10ms", wake="10s"))
    rng = random.Random(7)
    deadline = time.monotonic() + 40
    results = []
    lock = threading.Lock()

    def worker(seed):
        r = random.Random(seed)
        c = Client(w.port, timeout=30)
        while time.monotonic() < deadline and len(results) < 1200:
            if r.random() < 0.3:
                c.close()
                c = Client(w.port, timeout=30)
            response = c.request(get("soak.test"))
            with lock:
                results.append(response.status)
            time.sleep(r.choice([0, 0.002, 0.02, 0.03, 0.05]))
        c.close()

    threads = [threading.Thread(target=worker, args=(rng.random(),)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = state(w, "soak")
    assert results and all(code == 200 for code in results), {c: results.count(c) for c in set(results)}
    assert s["wakes"] >= 300, s  # several hundred sleep/wake cycles


# ---- issue 10, defect 1: a held request whose body is in waits for the wake, not body_timeout ----

@pytest.mark.parametrize("size", [10, 200 * 1024])  # within and over the 64 KiB held-body buffer
def test_held_request_with_its_body_in_outlasts_body_timeout(wg, size):
    port = free_port()
    w = wg('[proxy]\nbody_timeout = "300ms"\n'
           + service("held", port, sleep="stop", wake="20s", args=("--startup-delay", "1.2")))
    body = os.urandom(size)
    c = Client(w.port, timeout=20)
    c.send(f"POST /count HTTP/1.1\r\nHost: held.test\r\nContent-Length: {size}\r\n\r\n".encode() + body[:5])
    time.sleep(0.05)
    c.send(body[5:])  # the body is complete here, long before the wake is
    response = c.response(b"POST")
    assert response.status == 200, response
    assert response.body == f"{size} {hashlib.sha256(body).hexdigest()}".encode()
    c.close()


# ---- issue 10, defects 13 and 14: service processes die with wakegate; instances never mix ----


def _wait_gone(pid, timeout=5.0):
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_sigkilled_wakegate_leaves_nothing_a_restart_trips_over(wg):
    cold_port, warm_port = free_port(), free_port()
    w = wg(service("cold", cold_port, sleep="stop", idle="1h") + service("warm", warm_port, sleep="pause", idle="1h"))
    cold_pid = int(fetch(w.port, "cold.test", "/pid").body)
    warm_pid = int(fetch(w.port, "warm.test", "/pid").body)
    admin(w, "POST", "/services/warm/sleep")
    wait_state(w, "warm", "asleep")
    assert frozen(warm_pid)
    w.proc.kill()  # no chance to clean up
    w.proc.wait()
    assert _wait_gone(cold_pid), "the stop-mode process outlived a SIGKILLed wakegate"
    w.restart()  # the same config: it must find and clean up the frozen leftover
    assert _wait_gone(warm_pid), "the frozen process of the earlier wakegate is still there"
    for host, port, old in (("cold.test", cold_port, cold_pid), ("warm.test", warm_port, warm_pid)):
        response = fetch(w.port, host, "/pid", timeout=15)
        assert response.status == 200 and int(response.body) != old, host
    started = time.monotonic()
    assert w.stop() == 0 and time.monotonic() - started < 10  # and SIGTERM does not hang


def test_two_instances_never_freeze_each_others_processes(wg):
    a = wg(service("app", free_port(), sleep="pause", idle="1h"))
    b = wg(service("app", free_port(), sleep="pause", idle="1h"))
    pid_a = int(fetch(a.port, "app.test", "/pid").body)
    pid_b = int(fetch(b.port, "app.test", "/pid").body)
    admin(a, "POST", "/services/app/sleep")
    wait_state(a, "app", "asleep")
    assert frozen(pid_a) and not frozen(pid_b)
    started = time.monotonic()
    assert fetch(b.port, "app.test", "/pid", timeout=5).body == str(pid_b).encode()
    assert time.monotonic() - started < 1.0
