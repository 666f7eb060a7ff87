"""controller.docker against a real Docker Engine that these tests start on a private socket, data
root and exec root (no iptables, no bridge: containers use the host network), with an image built
by `docker import` from a busybox rootfs made here. Nothing is pulled.

Needs Debian's docker.io (`make docker`, run by `make test`); skipped with the reason without it.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import free_port
from .test_controller import admin, fetch, state, wait_state

DOCKERD = shutil.which("dockerd")
DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else shutil.which("docker")
BUSYBOX = "/bin/busybox"
pytestmark = [pytest.mark.skipif(not (DOCKERD and DOCKER and os.path.exists(BUSYBOX)),
                                 reason="needs docker.io and busybox-static (make docker, make test-deps)"),
              pytest.mark.backend]  # end-to-end with a real backend: run once, on the C build
IMAGE = "wakegate-test/httpd:1"
HELLO = b"hello from a container\n"


class Engine:
    """dockerd on its own socket and folders, and the docker CLI pointed at it."""

    def __init__(self) -> None:
        # Short paths: containerd's sockets live under the exec root, and a Unix socket path has 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="wgd-", dir="/tmp"))
        self.socket = self.root / "docker.sock"
        self.log = open(self.root / "dockerd.log", "wb")
        self.proc = subprocess.Popen(
            [DOCKERD, "-H", f"unix://{self.socket}", "--data-root", str(self.root / "data"),
             "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"),
             "--iptables=false", "--ip6tables=false", "--bridge=none", "--ip-forward=false", "--ip-masq=false",
             "--log-level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while self.run("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dockerd did not start: " + (self.root / "dockerd.log").read_text()[-2000:])
            time.sleep(0.05)
        self.build_image()

    def run(self, *args, check=True, input=None) -> subprocess.CompletedProcess:
        result = subprocess.run([DOCKER, "-H", f"unix://{self.socket}", *args], capture_output=True, input=input,
                                timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {result.stderr.decode()[-1000:]}")
        return result

    def build_image(self) -> None:
        rootfs = self.root / "rootfs"
        (rootfs / "bin").mkdir(parents=True)
        (rootfs / "www").mkdir()
        shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
        (rootfs / "bin" / "sh").symlink_to("busybox")
        (rootfs / "www" / "index.html").write_bytes(HELLO)
        tarball = subprocess.run(["tar", "-C", str(rootfs), "-cf", "-", "."], capture_output=True, check=True).stdout
        self.run("import", "-", IMAGE, input=tarball)

    def create(self, name: str, port: int, labels: dict | None = None) -> None:
        """A stopped container serving HELLO on 127.0.0.1:port (host network)."""
        label_args = [a for k, v in (labels or {}).items() for a in ("--label", f"{k}={v}")]
        self.run("create", "--name", name, "--network", "host", *label_args, IMAGE,
                 "/bin/busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www")

    def status(self, name: str) -> str:
        return json.loads(self.run("inspect", name).stdout)[0]["State"]["Status"]

    def remove_all(self) -> None:
        ids = self.run("ps", "-aq").stdout.split()
        if ids:
            self.run("rm", "-f", *[i.decode() for i in ids])

    def close(self) -> None:
        self.remove_all()
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        left = subprocess.run(["pgrep", "-f", str(self.root)], capture_output=True, text=True).stdout.split()
        for pid in left:
            os.kill(int(pid), signal.SIGKILL)
        mounts = self.mounts()  # dockerd leaves its network namespace file mounted (exec/netns/default)
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", mount], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        assert not left, f"processes of the test Engine left behind: {left}"
        assert not self.mounts() and not self.root.exists(), f"mounts left behind: {self.mounts()}"

    def mounts(self) -> list[str]:
        with open("/proc/self/mounts") as f:
            return [line.split()[1] for line in f if line.split()[1].startswith(str(self.root))]


@pytest.fixture(scope="module")
def engine():
    e = Engine()
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
    assert wait_for(lambda: state(w, "killed")["state"] == "asleep", timeout=5)
    noticed = time.monotonic() - killed
    assert noticed < 2.0, noticed  # the events stream says it in ~20 ms; the admin polling adds a little
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
