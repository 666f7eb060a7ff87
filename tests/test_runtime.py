"""controller/runtime.py: reloads (SIGHUP and POST /reload) of a running wakegate, end to end, with
several proxy workers: under steady load nothing fails and no held request is dropped; new services
appear, removed ones are drained and stopped, a service whose backend is unchanged keeps its
process, and a config that does not validate changes nothing."""

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from .conftest import ROOT, Client, free_port
from .test_controller import admin, alive, fetch, get, service, state, wait_state


def variant(i: int, backend_port: int, napper_port: int) -> str:
    """The i-th config of the reload test: limits, a timeout and the set of services change."""
    extra = (f'\n[services.extra]\nhosts = ["extra.test"]\nupstream = "127.0.0.1:{backend_port}"\n'
             if i % 2 else "")
    return (f'[proxy]\nworkers = 2\nupstream_timeout = "{10 + i}s"\n'
            f'[services.steady]\nhosts = ["steady.test"]\nupstream = "127.0.0.1:{backend_port}"\n'
            + service("napper", napper_port, sleep="stop", idle="100ms", extra=f"max_queue = {1000 + i}")
            + extra)


def test_twenty_reloads_under_load_lose_nothing(start_wakegate, backend):
    napper_port = free_port()
    w = start_wakegate(variant(0, backend.port, napper_port))
    stop = threading.Event()
    results, lock = [], threading.Lock()

    def client(host, seed):
        c = Client(w.port, timeout=30)
        n = 0
        while not stop.is_set():
            n += 1
            if n % 4 == 0:  # fresh connections too: they land on either worker
                c.close()
                c = Client(w.port, timeout=30)
            response = c.request(get(host))
            with lock:
                results.append((host, response.status))
            time.sleep((0.005, 0.05, 0.15)[(n + seed) % 3])  # around napper's idle timeout: held requests
        c.close()

    threads = [threading.Thread(target=client, args=(host, seed))
               for seed, host in enumerate(["steady.test", "steady.test", "napper.test", "napper.test"])]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        wakes_before = state(w, "napper")["wakes"]
        for i in range(1, 21):
            w.rewrite(variant(i, backend.port, napper_port))
            if i % 2:
                w.proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 10
                while admin(w)[1]["reloads"] < i:
                    assert time.monotonic() < deadline, "SIGHUP did not reload"
                    time.sleep(0.02)
            else:
                status, body = admin(w, "POST", "/reload")
                assert status == 200 and body["ok"], body
            if i % 2:  # the added service serves at once
                c = Client(w.port)
                assert c.request(get("extra.test")).status == 200
                c.close()
            time.sleep(0.15)
    finally:
        stop.set()
        for t in threads:
            t.join()
    statuses = [s for _, s in results]
    assert len(results) > 100 and statuses == [200] * len(results), {s: statuses.count(s) for s in set(statuses)}
    body = admin(w)[1]
    assert body["reloads"] == 20
    napper = state(w, "napper")
    assert napper["wakes"] >= wakes_before  # the same service (its counts go on), not a new one
    assert napper["wakes"] > 3  # it slept and woke between reloads: requests were held across them
    assert {s["name"] for s in body["services"]} == {"steady", "napper"}
    assert "reload: done" in w.output()


def test_a_bad_config_keeps_the_running_one(start_wakegate, backend):
    w = start_wakegate(f'[proxy]\nworkers = 2\n[services.s]\nhosts = ["s.test"]\nupstream = "127.0.0.1:{backend.port}"\n')
    w.rewrite(f'[services.s]\nhosts = ["s.test"]\nupstream = "127.0.0.1:{backend.port}"\nidle_timeout = "soon"\n')
    status, body = admin(w, "POST", "/reload")
    assert status == 400 and not body["ok"]
    assert str(w.config_path) in body["error"] and "services.s.idle_timeout" in body["error"]
    w.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert "keeping the running config" in w.output()
    assert admin(w)[1]["reloads"] == 0
    c = Client(w.port)
    assert c.request(get("s.test")).status == 200
    c.close()
    assert w.proc.poll() is None


def test_reload_adds_removes_and_replaces_services(start_wakegate):
    a_port, b_port, c_port = free_port(), free_port(), free_port()
    w = start_wakegate("[proxy]\nworkers = 2\n" + service("a", a_port, idle="1h") + service("b", b_port, idle="1h"))
    for name in ("a", "b"):
        c = Client(w.port)
        assert c.request(get(f"{name}.test")).status == 200
        c.close()
    a_pid, b_pid = state(w, "a")["pid"], state(w, "b")["pid"]
    kept = Client(w.port)  # a keep-alive connection from before the reload is routed by the new table
    assert kept.request(get("b.test")).status == 200 and kept.request(get("a.test")).status == 200
    busy = Client(w.port, timeout=30)
    busy.send(get("b.test", "/slow?delay=1"))  # in flight while b is removed: it finishes first
    time.sleep(0.2)
    # a: only its idle timeout changes (keeps its process); b: removed; c: new
    w.rewrite("[proxy]\nworkers = 2\n" + service("a", a_port, idle="2h") + service("c", c_port, idle="1h"))
    status, body = admin(w, "POST", "/reload")
    assert status == 200, body
    assert "a: routes or limits changed" in body["changes"] and "b: removed; drained, then stopped" in body["changes"]
    response = busy.response()
    assert response.status == 200 and response.body == b"slow"
    busy.close()
    deadline = time.monotonic() + 10
    while alive(b_pid):
        assert time.monotonic() < deadline, "the removed service's process is still running"
        time.sleep(0.05)
    assert state(w, "a")["pid"] == a_pid and alive(a_pid)
    for c in (Client(w.port), kept):
        assert c.request(get("b.test")).status == 404
        assert c.request(get("c.test")).status == 200
        assert c.request(get("a.test")).status == 200
        c.close()
    # a's command changes: a new process, started once the old one has stopped
    w.rewrite("[proxy]\nworkers = 2\n" + service("a", a_port, idle="2h", args=("--name", "a2"))
              + service("c", c_port, idle="1h"))
    status, body = admin(w, "POST", "/reload")
    assert status == 200 and any(line.startswith("a: backend changed") for line in body["changes"]), body
    c = Client(w.port)
    new_pid = int(c.request(get("a.test", "/pid")).body)
    c.close()
    assert new_pid != a_pid and not alive(a_pid)
    assert wait_state(w, "a", "ready")["pid"] == new_pid


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_changes_limits_for_new_requests(start_wakegate, backend, workers):
    w = start_wakegate(f'[proxy]\nworkers = {workers}\n[services.s]\nhosts = ["s.test"]\n'
                       f'upstream = "127.0.0.1:{backend.port}"\n')
    w.rewrite(f'[proxy]\nworkers = {workers}\nmax_head_size = 256\n[services.s]\nhosts = ["s.test", "t.test"]\n'
              f'upstream = "127.0.0.1:{backend.port}"\n')
    status, body = admin(w, "POST", "/reload")
    assert status == 200, body
    for _ in range(4):  # every worker has the new routes and limits
        c = Client(w.port)
        assert c.request(get("t.test")).status == 200
        assert c.request(get("t.test", extra="X-Big: " + "x" * 400 + "\r\n")).status == 431
        c.close()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate")
def test_listeners_from_systemd_socket_activation(tmp_path, backend):
    """systemd-socket-activate binds both sockets and hands them over, named, as a socket unit does;
    the config's listen addresses are not used."""
    proxy_port, admin_port, unused = free_port(), free_port(), free_port()
    config = tmp_path / "activated.toml"
    config.write_text(f'[proxy]\nlisten = "127.0.0.1:{unused}"\nworkers = 2\n[admin]\nlisten = "127.0.0.1:{unused}"\n'
                      f'[services.s]\nhosts = ["s.test"]\nupstream = "127.0.0.1:{backend.port}"\n')
    log = open(tmp_path / "activated.log", "wb")
    proc = subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{proxy_port}", "-l",
                             f"127.0.0.1:{admin_port}", "--fdname=proxy:admin", sys.executable, "-m",
                             "controller.cli", "serve", "-c", str(config)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:  # until systemd-socket-activate has bound; then the kernel accepts for wakegate
            try:
                c = Client(proxy_port, timeout=20)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.02)
        assert c.request(get("s.test")).status == 200
        c.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=10) as resp:
            assert resp.read() == b"ok\n"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", unused), timeout=1).close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "activated.log").read_text()
    assert "handed over by systemd" in text and f"listening on 127.0.0.1:{proxy_port}" in text


def _connect_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except ConnectionRefusedError:
        return True


@pytest.mark.parametrize("workers", [1, 2])
def test_a_service_has_listeners_of_its_own_across_reloads(start_wakegate, backend, workers):
    """``listen``: every request on a service's own listener goes to it whatever the Host; a reload adds
    and removes such listeners (every worker serves them: fresh connections land on either), a
    listener that cannot be had keeps the running config, and nothing is left listening at exit."""
    own, other, taken = free_port(), free_port(), socket.create_server(("127.0.0.1", 0))
    napper = free_port()

    def config(listen: list[int], extra: str = "") -> str:
        ports = ", ".join(f'"127.0.0.1:{p}"' for p in listen)
        return (f'[proxy]\nworkers = {workers}\n[services.steady]\nhosts = ["steady.test"]\n'
                f'upstream = "127.0.0.1:{backend.port}"\nlisten = [{ports}]\n'
                + service("napper", napper, sleep="stop", idle="200ms", extra=f'listen = ["127.0.0.1:{other}"]')
                + extra)

    w = start_wakegate(config([own]))
    for _ in range(4):
        response = fetch(own, "anything.example")
        assert response.status == 200 and response.header(b"x-backend") == b"backend", response
    assert fetch(w.port, "anything.example").status == 404  # the main listener still routes by Host
    assert fetch(other, "whatever").header(b"x-backend") == b"napper"  # held, woken, answered
    wait_state(w, "napper", "asleep")
    # a second listener for steady; napper's goes
    second = free_port()
    w.rewrite(config([own, second]).replace(f'listen = ["127.0.0.1:{other}"]\n', ""))
    status, body = admin(w, "POST", "/reload")
    assert status == 200, body
    for _ in range(4):
        assert fetch(second, "x").header(b"x-backend") == b"backend"
        assert fetch(own, "x").header(b"x-backend") == b"backend"
    assert _connect_refused(other)
    # an address in use elsewhere: the reload is refused and everything keeps working
    w.rewrite(config([own, taken.getsockname()[1]]))
    status, body = admin(w, "POST", "/reload")
    assert status == 400 and "services.steady.listen: cannot listen on" in body["error"], body
    assert fetch(own, "x").status == 200 and fetch(second, "x").status == 200
    taken.close()
    assert w.stop() == 0
    for port in (own, second, other):
        assert _connect_refused(port)
