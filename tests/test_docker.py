"""controller.docker against a real Docker Engine that these tests start on a private socket, data
root and exec root (no iptables, no bridge: containers use the host network), with an image built
by `docker import` from a busybox rootfs made here. Nothing is pulled.

Needs Debian's docker.io (`make docker`, run by `make test`); skipped with the reason without it.
"""

import json
import time
import urllib.request

import pytest

from bench.engine import HELLO, IMAGE, PrivateEngine, unavailable

from .conftest import free_port
from .test_controller import admin, fetch, state, wait_state

pytestmark = [pytest.mark.skipif(unavailable() is not None, reason=str(unavailable())),
              pytest.mark.backend]  # end-to-end with a real backend: run once, on the C build


@pytest.fixture(scope="module")
def engine():
    e = PrivateEngine()
    yield e
    e.close()


@pytest.fixture(autouse=True)
def no_containers_left(request):
    yield
    if "engine" in request.fixturenames:
        request.getfixturevalue("engine").remove_all()


def docker_service(name, port, engine, sleep="pause", idle="1h", extra="", selector=None):
    what = selector or f'container = "{name}"'
    return f"""
[services.{name}]
hosts = ["{name}.test"]
upstream = "127.0.0.1:{port}"
sleep = "{sleep}"
idle_timeout = "{idle}"
wake_timeout = "10s"
{extra}
[services.{name}.docker]
socket = "{engine.socket if engine else '/nonexistent/docker.sock'}"
{what}
stop_timeout = "0s"
api_timeout = "2s"
"""


def wait_for(predicate, timeout=10.0, step=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


@pytest.mark.parametrize("sleep,asleep", [("pause", "paused"), ("stop", "exited")])
def test_a_request_wakes_the_container_and_a_sleep_pauses_or_stops_it(engine, start_wakegate, sleep, asleep):
    port = free_port()
    engine.create("web", port)
    w = start_wakegate(docker_service("web", port, engine, sleep=sleep))
    assert engine.status("web") == "created"
    r = fetch(w.port, "web.test", "/")
    assert r.status == 200 and r.body == HELLO
    assert engine.status("web") == "running"
    s = state(w, "web")
    assert s["state"] == "ready" and s["docker"]["containers"] == ["web"] and s["docker"]["events"]
    admin(w, "POST", "/services/web/sleep")
    wait_state(w, "web", "asleep")
    assert engine.status("web") == asleep
    r = fetch(w.port, "web.test", "/")
    assert r.status == 200 and r.body == HELLO and engine.status("web") == "running"
    assert state(w, "web")["wakes"] == 2
    with urllib.request.urlopen(f"http://127.0.0.1:{w.admin_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert f'wakegate_wakes_total{{service="web",mode="{sleep}",result="ok"}} 2.0' in text


def test_a_container_killed_from_outside_is_noticed_and_started_again(engine, start_wakegate):
    port = free_port()
    engine.create("killed", port)
    w = start_wakegate(docker_service("killed", port, engine))
    assert fetch(w.port, "killed.test", "/").status == 200
    engine.run("kill", "killed")
    killed = time.monotonic()
    assert wait_for(lambda: state(w, "killed")["state"] != "ready", timeout=5, step=0.002)
    noticed = time.monotonic() - killed
    print(f"container killed from outside: noticed after {noticed * 1e3:.1f} ms")
    assert noticed < 1.0, noticed  # the events stream says it in ~20 ms; the admin polling adds a little
    assert 'reason="exited"' in urllib.request.urlopen(f"http://127.0.0.1:{w.admin_port}/metrics").read().decode()
    r = fetch(w.port, "killed.test", "/")  # the next request starts it again
    assert r.status == 200 and r.body == HELLO and engine.status("killed") == "running"


def test_a_container_started_by_hand_counts_as_awake(engine, start_wakegate):
    port = free_port()
    engine.create("byhand", port)
    w = start_wakegate(docker_service("byhand", port, engine, sleep="stop"))
    assert wait_for(lambda: state(w, "byhand")["docker"]["events"], timeout=5)  # following the Engine
    engine.run("start", "byhand")
    s = wait_state(w, "byhand", "ready", timeout=10)
    assert s["wakes"] == 1 and s["docker"]["containers"] == ["byhand"]
    r = fetch(w.port, "byhand.test", "/")
    assert r.status == 200 and r.body == HELLO


def test_a_label_selector_wakes_and_sleeps_every_replica(engine, start_wakegate):
    ports = [free_port(), free_port()]
    labels = {"com.docker.compose.project": "shop", "com.docker.compose.service": "api"}
    for i, port in enumerate(ports):
        engine.create(f"shop-api-{i + 1}", port, labels)
    engine.create("shop-db-1", free_port(), {"com.docker.compose.project": "shop", "com.docker.compose.service": "db"})
    selector = 'labels = { "com.docker.compose.project" = "shop", "com.docker.compose.service" = "api" }'
    w = start_wakegate(docker_service("api", ports[0], engine, selector=selector))
    assert fetch(w.port, "api.test", "/").status == 200
    assert [engine.status(f"shop-api-{i}") for i in (1, 2)] == ["running", "running"]
    assert engine.status("shop-db-1") == "created"  # not selected
    assert state(w, "api")["docker"]["containers"] == ["shop-api-1", "shop-api-2"]
    admin(w, "POST", "/services/api/sleep")
    wait_state(w, "api", "asleep")
    assert [engine.status(f"shop-api-{i}") for i in (1, 2)] == ["paused", "paused"]


def test_an_unknown_container_fails_the_wake_with_its_reason(engine, start_wakegate):
    w = start_wakegate(docker_service("ghost", free_port(), engine))
    started = time.monotonic()
    r = fetch(w.port, "ghost.test", "/")
    assert r.status == 503 and time.monotonic() - started < 5
    assert "No such container: ghost" in w.output()


def test_an_unreachable_engine_answers_503_at_once(start_wakegate):
    w = start_wakegate(docker_service("away", free_port(), None))
    started = time.monotonic()
    r = fetch(w.port, "away.test", "/")
    assert r.status == 503 and r.header(b"retry-after") is not None
    assert time.monotonic() - started < 5
    assert "cannot reach the Docker Engine at /nonexistent/docker.sock" in w.output()
    assert state(w, "away")["state"] == "failed"


@pytest.mark.parametrize("sleep", ["pause", "stop"])
def test_random_arrivals_across_container_cycles_lose_nothing(engine, start_wakegate, sleep):
    """Bounded: 100 sleep/wake cycles or 60 s, two clients at random intervals around the idle
    timeout, keep-alive and fresh connections; every request is answered by the container."""
    from .conftest import random_arrivals

    port = free_port()
    engine.create("soak", port)
    w = start_wakegate(docker_service("soak", port, engine, sleep=sleep, idle="50ms"))
    deadline = time.monotonic() + 60
    results = random_arrivals(w.port, "soak.test", lambda: state(w, "soak")["wakes"], 60,
                              [0, 0.01, 0.04, 0.06, 0.1, 0.15])
    s = state(w, "soak")
    bad = [r for r in results if r != (200, HELLO)]
    assert results and not bad, bad[:5]
    assert s["wakes"] >= 100 or time.monotonic() >= deadline, s
    assert s["failures"] == 0


def discovering(engine):
    return f'[docker]\ndiscover = true\nsocket = "{engine.socket}"\n'


def test_labelled_containers_become_services_live_and_go_with_them(engine, start_wakegate):
    """No service in the TOML: a container labelled wakegate.enable=true appears as a service
    (replicas sharing wakegate.service are one), wakes on its host, and goes when removed."""
    port = free_port()
    w = start_wakegate(discovering(engine))
    assert admin(w)[1]["services"] == []
    labels = {"wakegate.enable": "true", "wakegate.service": "shop", "wakegate.hosts": "shop.test,www.shop.test",
              "wakegate.port": str(port), "wakegate.sleep": "stop", "wakegate.idle_timeout": "1h"}
    engine.create("shop-1", port, labels)
    engine.create("shop-2", free_port(), labels)  # a replica: the same service
    assert wait_for(lambda: [s["name"] for s in admin(w)[1]["services"]] == ["shop"], timeout=5)
    r = fetch(w.port, "www.shop.test", "/")
    assert r.status == 200 and r.body == HELLO
    assert sorted(state(w, "shop")["docker"]["containers"]) == ["shop-1", "shop-2"]
    assert engine.status("shop-1") == engine.status("shop-2") == "running"
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{w.admin_port}/metrics").read().decode()
    assert 'wakegate_wakes_total{service="shop",mode="stop",result="ok"} 1.0' in metrics
    engine.run("rm", "-f", "shop-1")
    time.sleep(0.3)
    assert [s["name"] for s in admin(w)[1]["services"]] == ["shop"]  # one replica is left
    engine.run("rm", "-f", "shop-2")
    assert wait_for(lambda: admin(w)[1]["services"] == [], timeout=5)
    assert fetch(w.port, "shop.test", "/").status == 404
    assert "service shop: its containers are gone; removed" in w.output()


def test_bad_labels_and_taken_hosts_are_left_out_with_the_container_named(engine, start_wakegate):
    port = free_port()
    w = start_wakegate(discovering(engine) + docker_service("web", port, engine))
    engine.create("typo", free_port(), {"wakegate.enable": "true", "wakegate.hosts": "typo.test",
                                        "wakegate.port": "1", "wakegate.idle": "5m"})
    engine.create("thief", free_port(), {"wakegate.enable": "true", "wakegate.hosts": "web.test", "wakegate.port": "2"})
    assert wait_for(lambda: "container thief: web.test (service web) already routed" in w.output(), timeout=5)
    assert "container typo: label wakegate.idle: unknown" in w.output()
    assert [s["name"] for s in admin(w)[1]["services"]] == ["web"]


def test_check_names_discovered_containers_and_their_conflicts(engine, tmp_path):
    import subprocess
    import sys

    from .conftest import ROOT

    engine.create("ok-app", free_port(), {"wakegate.enable": "true", "wakegate.hosts": "ok.test", "wakegate.port": "1"})
    config = tmp_path / "wakegate.toml"
    config.write_text(discovering(engine))
    result = subprocess.run([sys.executable, "-m", "controller.cli", "check", "-c", str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "discovered container ok-app: service ok-app, hosts ok.test" in result.stdout
    engine.create("dup-app", free_port(), {"wakegate.enable": "true", "wakegate.hosts": "ok.test", "wakegate.port": "2"})
    result = subprocess.run([sys.executable, "-m", "controller.cli", "check", "-c", str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    # containers are taken in name order: dup-app first, so ok-app is the one named as clashing
    assert "container ok-app: claims ok.test (service dup-app, container dup-app)" in result.stderr, result.stderr


def test_the_upstream_can_come_from_the_container(engine, start_wakegate):
    """No upstream in the config, the container's port instead: on the host network the service
    is reached on that port of 127.0.0.1 (a published port would be read from the Engine)."""
    port = free_port()
    engine.create("found", port)
    w = start_wakegate(f"""
[services.found]
hosts = ["found.test"]
[services.found.docker]
socket = "{engine.socket}"
container = "found"
port = {port}
stop_timeout = "0s"
""")
    r = fetch(w.port, "found.test", "/")
    assert r.status == 200 and r.body == HELLO
    assert state(w, "found")["docker"]["upstream"] == f"127.0.0.1:{port}"


def test_the_upstream_can_come_from_a_published_port(engine, start_wakegate):
    """A container on a bridge network of its own, its port published on an ephemeral host port
    (docker-proxy; no iptables): wakegate reads the binding after each start."""
    engine.bridge_network("wg-published")
    try:
        engine.run("create", "--name", "published", "--network", "wg-published", "-p", "127.0.0.1::8080", IMAGE,
                   "/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www")
        w = start_wakegate(f"""
[services.published]
hosts = ["published.test"]
sleep = "stop"
[services.published.docker]
socket = "{engine.socket}"
container = "published"
port = 8080
stop_timeout = "0s"
""")
        r = fetch(w.port, "published.test", "/")
        assert r.status == 200 and r.body == HELLO
        ports = json.loads(engine.run("inspect", "published").stdout)[0]["NetworkSettings"]["Ports"]
        host_port = ports["8080/tcp"][0]["HostPort"]
        assert state(w, "published")["docker"]["upstream"] == f"127.0.0.1:{host_port}"
        w.stop()
        engine.remove_all()
    finally:
        engine.run("network", "rm", "wg-published", check=False)
