"""controller/workers.py and proxy/worker.py: wakegate with several proxy worker processes, end to end.

The race between a worker's admission and the controller's sleep, one wake for every worker's held
requests, max_queue across workers, one scrape target, one access log, and the faults: a worker
that dies, a controller that dies.
"""

import json
import os
import random
import signal
import threading
import time
import urllib.request

import pytest

from .conftest import Client, free_port
from .test_controller import admin, alive, get, service, state, wait_state


def workers_of(w):
    return admin(w)[1]["workers"]


def scrape(w) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{w.admin_port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def sample(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def upstream_ms(response) -> float:
    timing = response.header(b"server-timing").decode()
    return float(timing.split("upstream;dur=")[1].split(",")[0])


# ---- the race: admission against sleep, across processes -------------------------------------

RACES = [  # workers, sleep mode, idle timeout
    (2, "pause", "50ms"),
    (2, "stop", "150ms"),
    (4, "pause", "100ms"),
    (4, "stop", "50ms"),
    (4, "pause", "150ms"),
]


@pytest.mark.parametrize("workers, sleep, idle", RACES, ids=[f"{w}-{s}-{i}" for w, s, i in RACES])
def test_random_arrivals_across_workers_lose_nothing(start_wakegate, workers, sleep, idle):
    """Three clients at random intervals around the idle timeout, on keep-alive connections now and
    then replaced: every request gets its 200, and none waited in a frozen process (its upstream
    phase would last until the next wake; in stop mode it would get a 502)."""
    w = start_wakegate(f"[proxy]\nworkers = {workers}\nupstream_timeout = \"5s\"\n[log]\nserver_timing = true\n"
                       + service("race", free_port(), sleep=sleep, idle=idle, wake="20s"))
    deadline = time.monotonic() + 20
    results, lock = [], threading.Lock()
    idle_s = float(idle.removesuffix("ms")) / 1e3
    pauses = [0, 0.01] + [idle_s * k for k in (0.3, 0.7, 1.2, 2.0, 3.0)]
    wakes = [0]

    def client(seed):
        r = random.Random(seed)
        c = Client(w.port, timeout=30)
        while time.monotonic() < deadline and wakes[0] < 40:
            if r.random() < 0.3:
                c.close()
                c = Client(w.port, timeout=30)
            response = c.request(get("race.test"))
            with lock:
                results.append((response.status, upstream_ms(response) if response.status == 200 else None))
                if len(results) % 20 == 0:
                    wakes[0] = state(w, "race")["wakes"]
            time.sleep(r.choice(pauses))
        c.close()

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [status for status, _ in results]
    assert results and statuses == [200] * len(results), {c: statuses.count(c) for c in set(statuses)}
    slowest = max(ms for _, ms in results)
    assert slowest < 500, f"a request waited {slowest:.0f} ms upstream: it was sent to a sleeping process"
    s = state(w, "race")
    assert s["wakes"] >= 8 and s["sleeps"] >= 7, s
    scrape(w)  # refreshes the per-worker counts
    served = [x["requests"] for x in workers_of(w)]
    assert len(served) == workers and sum(served) == len(results)
    assert sum(1 for n in served if n) >= 2, served  # the traffic really went through several workers


# ---- waking across processes ------------------------------------------------------------------

def _concurrent(port, host, n, path="/hello"):
    """n requests at once, each on its own connection: [(status, retry_after)]."""
    out, lock = [], threading.Lock()

    def one():
        c = Client(port, timeout=30)
        try:
            r = c.request(get(host, path))
            with lock:
                out.append((r.status, r.header(b"retry-after")))
        finally:
            c.close()

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_first_requests_on_every_worker_cause_one_wake(start_wakegate):
    w = start_wakegate("[proxy]\nworkers = 4\n" + service("one", free_port(), sleep="stop", idle="1h",
                                                             args=("--startup-delay", "0.5")))
    results = _concurrent(w.port, "one.test", 40)
    assert [s for s, _ in results] == [200] * 40
    s = state(w, "one")
    assert s["wakes"] == 1 and s["queued"] == 0 and all(x["queued"] == 0 for x in s["workers"])


def test_max_queue_counts_every_workers_held_requests(start_wakegate):
    w = start_wakegate("[proxy]\nworkers = 4\n" + service("q", free_port(), sleep="stop", idle="1h",
                                                             extra="max_queue = 5", args=("--startup-delay", "1.5")))
    results = _concurrent(w.port, "q.test", 20)
    statuses = sorted(s for s, _ in results)
    assert statuses == [200] * 5 + [503] * 15, statuses
    assert all(retry for status, retry in results if status == 503)


def test_a_failed_wake_is_answered_on_every_worker(start_wakegate, tmp_path):
    w = start_wakegate(f"""[proxy]
workers = 3
[services.broken]
hosts = ["broken.test"]
upstream = "127.0.0.1:{free_port()}"
command = ["/bin/false"]
wake_timeout = "10s"
""")
    results = _concurrent(w.port, "broken.test", 12)
    assert [s for s, _ in results] == [503] * 12
    assert all(retry for _, retry in results)
    assert state(w, "broken")["state"] == "failed"


# ---- one scrape target, one access log ----------------------------------------------------------

def test_metrics_and_access_log_cover_every_worker(start_wakegate, backend, tmp_path):
    log_path = tmp_path / "access.log"
    w = start_wakegate(f"""[proxy]
workers = 3
[log]
access = "{log_path}"
[services.m]
hosts = ["m.test"]
upstream = "127.0.0.1:{backend.port}"
""")
    for _ in range(300):  # fresh connections: the kernel spreads them over the workers
        c = Client(w.port)
        assert c.request(get("m.test")).status == 200
        c.close()
    for _ in range(7):
        c = Client(w.port)
        assert c.request(b"BAD\r\n\r\n").status == 400
        c.close()
    text = scrape(w)
    assert sample(text, 'wakegate_requests_total{service="m",code="200"}') == 300
    assert sample(text, 'wakegate_request_duration_seconds_count{service="m"}') == 300
    assert sample(text, 'wakegate_request_duration_seconds_bucket{service="m",le="+Inf"}') == 300
    assert sample(text, 'wakegate_client_errors_total{reason="bad_request"}') == 7
    served = [x["requests"] for x in workers_of(w)]
    assert sum(served) == 300 and sum(1 for n in served if n) >= 2, served
    assert scrape(w).count("wakegate_requests_total{") == text.count("wakegate_requests_total{")  # stable
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and log_path.read_bytes().count(b"\n") < 300:
        time.sleep(0.05)
    lines = log_path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    records = [json.loads(line) for line in lines[:-1]]  # whole lines only: each one parses
    assert sum(1 for r in records if r["service"] == "m" and r["status"] == 200) == 300


# ---- faults ---------------------------------------------------------------------------------------

def test_a_dead_worker_is_restarted_and_its_requests_reclaimed(start_wakegate):
    w = start_wakegate("[proxy]\nworkers = 2\n" + service("dw", free_port(), sleep="pause", idle="300ms"))
    c = Client(w.port, timeout=30)
    c.send(get("dw.test", "/slow?delay=30"))
    deadline = time.monotonic() + 10
    while state(w, "dw")["in_flight"] != 1:
        assert time.monotonic() < deadline, state(w, "dw")
        time.sleep(0.02)
    (busy,) = [x for x in state(w, "dw")["workers"] if x["in_flight"]]
    old_pid, busy = busy["pid"], busy["worker"]
    assert workers_of(w)[busy]["pid"] == old_pid
    os.kill(old_pid, signal.SIGKILL)
    assert c.is_closed()
    c.close()
    deadline = time.monotonic() + 10
    while True:
        now = workers_of(w)[busy]
        if now["alive"] and now["pid"] != old_pid:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
    assert now["restarts"] == 1
    assert state(w, "dw")["in_flight"] == 0  # reclaimed: the service can sleep again
    wait_state(w, "dw", "asleep", timeout=10)
    for _ in range(10):  # both workers serve again
        c = Client(w.port)
        assert c.request(get("dw.test")).status == 200
        c.close()


def test_when_the_controller_dies_its_workers_and_services_go_too(start_wakegate):
    w = start_wakegate("[proxy]\nworkers = 2\n" + service("orphan", free_port(), sleep="pause", idle="1h"))
    c = Client(w.port)
    assert c.request(get("orphan.test")).status == 200
    c.close()
    pids = [x["pid"] for x in workers_of(w)] + [state(w, "orphan")["pid"]]
    assert all(alive(pid) for pid in pids)
    w.proc.send_signal(signal.SIGKILL)
    w.proc.wait(10)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, [pid for pid in pids if alive(pid)]
        time.sleep(0.05)
    w.restart()  # the next wakegate on this listener removes the empty freezer group left behind
    assert w.stop() == 0


def test_sigterm_drains_requests_on_every_worker(start_wakegate, backend):
    w = start_wakegate(f'[proxy]\nworkers = 3\ndrain_timeout = "5s"\n[services.d]\nhosts = ["d.test"]\n'
                       f'upstream = "127.0.0.1:{backend.port}"\n')
    clients = [Client(w.port, timeout=30) for _ in range(9)]
    for c in clients:
        c.send(get("d.test", "/slow?delay=0.8"))
    time.sleep(0.3)
    w.proc.send_signal(signal.SIGTERM)
    for c in clients:
        response = c.response()
        assert response.status == 200 and response.body == b"slow"
        c.close()
    assert w.proc.wait(15) == 0
