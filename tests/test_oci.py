"""controller.oci against a real runc: an OCI bundle made here (busybox httpd on the host network,
from `runc spec`), woken by a request, paused or stopped, killed from outside, and nothing left
behind (no container in the runtime's state folder, no process).
"""

import json
import shutil
import subprocess

import pytest

from bench.engine import HELLO, make_bundle

from .conftest import free_port
from .test_controller import admin, fetch, state, wait_state

RUNC = shutil.which("runc")
pytestmark = [pytest.mark.skipif(not RUNC, reason="needs runc (make docker installs it with docker.io)"),
              pytest.mark.backend]  # end-to-end with a real backend: run once, on the C build


@pytest.fixture
def runtime_root(tmp_path):
    root = tmp_path / "runc-root"
    yield root
    listed = subprocess.run([RUNC, "--root", str(root), "list", "-q"], capture_output=True, text=True).stdout.split()
    for cid in listed:
        subprocess.run([RUNC, "--root", str(root), "delete", "--force", cid], capture_output=True)
    assert not listed, f"containers left behind: {listed}"


RUNSC = shutil.which("runsc")
# runsc (gVisor) needs the host's network and no cgroup of its own here (README, "OCI bundles").
RUNSC_ARGS = '["--network=host", "--ignore-cgroups"]'


def oci_service(name, port, bundle, root, sleep="stop", idle="1h", runtime="runc"):
    extra = f'runtime = "{runtime}"\nruntime_args = {RUNSC_ARGS}\n' if runtime == "runsc" else ""
    return f"""
[services.{name}]
hosts = ["{name}.test"]
upstream = "127.0.0.1:{port}"
sleep = "{sleep}"
idle_timeout = "{idle}"
wake_timeout = "10s"
[services.{name}.oci]
bundle = "{bundle}"
root = "{root}"
stop_timeout = "1s"
{extra}"""


def runc_state(root, cid, runtime="runc"):
    argv = [RUNC] if runtime == "runc" else [RUNSC, "--network=host", "--ignore-cgroups"]
    out = subprocess.run([*argv, "--root", str(root), "state", cid], capture_output=True, text=True)
    return json.loads(out.stdout)["status"] if out.returncode == 0 else None


@pytest.mark.parametrize("runtime", ["runc", pytest.param("runsc", marks=pytest.mark.skipif(
    not RUNSC, reason="needs runsc (apt-get install runsc)"))])
@pytest.mark.parametrize("sleep,asleep", [("pause", "paused"), ("stop", None)])
def test_a_request_runs_the_bundle_and_a_sleep_pauses_or_ends_it(tmp_path, runtime_root, start_wakegate,
                                                                  sleep, asleep, runtime):
    port = free_port()
    bundle = make_bundle(tmp_path / "bundle", port)
    w = start_wakegate(oci_service("box", port, bundle, runtime_root, sleep=sleep, runtime=runtime))
    r = fetch(w.port, "box.test", "/")
    assert r.status == 200 and r.body == HELLO
    cid = state(w, "box")["oci"]["id"]
    assert runc_state(runtime_root, cid, runtime) == "running"
    admin(w, "POST", "/services/box/sleep")
    wait_state(w, "box", "asleep")
    assert runc_state(runtime_root, cid, runtime) == asleep
    r = fetch(w.port, "box.test", "/")
    assert r.status == 200 and r.body == HELLO and runc_state(runtime_root, cid, runtime) == "running"
    w.stop()  # wakegate's exit ends the container
    assert runc_state(runtime_root, cid, runtime) is None


def test_a_container_killed_from_outside_is_noticed_and_run_again(tmp_path, runtime_root, start_wakegate):
    port = free_port()
    bundle = make_bundle(tmp_path / "bundle", port)
    w = start_wakegate(oci_service("box", port, bundle, runtime_root))
    assert fetch(w.port, "box.test", "/").status == 200
    cid = state(w, "box")["oci"]["id"]
    subprocess.run([RUNC, "--root", str(runtime_root), "kill", cid, "KILL"], check=True)
    wait_state(w, "box", "asleep", timeout=5)
    r = fetch(w.port, "box.test", "/")
    assert r.status == 200 and r.body == HELLO
    assert state(w, "box")["wakes"] == 2


def test_a_container_left_by_an_earlier_wakegate_is_replaced(tmp_path, runtime_root, start_wakegate):
    port = free_port()
    bundle = make_bundle(tmp_path / "bundle", port)
    w = start_wakegate(oci_service("box", port, bundle, runtime_root))
    assert fetch(w.port, "box.test", "/").status == 200
    cid = state(w, "box")["oci"]["id"]
    w.proc.kill()  # the runtime dies with it (parent-death signal); the container stays in the state folder
    w.proc.wait()
    assert runc_state(runtime_root, cid) is not None
    subprocess.run([RUNC, "--root", str(runtime_root), "kill", cid, "KILL"], capture_output=True)  # frees its port
    w.restart()
    r = fetch(w.port, "box.test", "/")
    assert r.status == 200 and r.body == HELLO
    assert "(stopped) left outside wakegate" in w.output() and runc_state(runtime_root, cid) == "running"


def test_a_container_started_by_hand_is_adopted_as_awake(tmp_path, runtime_root, start_wakegate):
    """The runtime has no events: a container of the service's id that someone ran is found at the
    next request and used as it is (no second run), its exit watched; a sleep then acts on it."""
    port = free_port()
    bundle = make_bundle(tmp_path / "bundle", port)
    w = start_wakegate(oci_service("box", port, bundle, runtime_root, sleep="pause"))
    cid = state(w, "box")["oci"]["id"]
    by_hand = subprocess.Popen([RUNC, "--root", str(runtime_root), "run", "--bundle", str(bundle), cid],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        deadline = time.monotonic() + 5
        while runc_state(runtime_root, cid) != "running" and time.monotonic() < deadline:
            time.sleep(0.02)
        pid = json.loads(subprocess.run([RUNC, "--root", str(runtime_root), "state", cid], capture_output=True,
                                        text=True).stdout)["pid"]
        r = fetch(w.port, "box.test", "/")
        assert r.status == 200 and r.body == HELLO
        assert "was started outside wakegate" in w.output() and state(w, "box")["pid"] == pid
        admin(w, "POST", "/services/box/sleep")
        wait_state(w, "box", "asleep")
        assert runc_state(runtime_root, cid) == "paused"
        assert fetch(w.port, "box.test", "/").status == 200
        subprocess.run([RUNC, "--root", str(runtime_root), "kill", cid, "KILL"], check=True)
        wait_state(w, "box", "asleep", timeout=5)  # its exit is noticed through the pidfd
    finally:
        by_hand.wait(10)


@pytest.mark.parametrize("sleep", ["pause", "stop"])
def test_random_arrivals_across_container_cycles_lose_nothing(tmp_path, runtime_root, start_wakegate, sleep):
    """Bounded: 100 sleep/wake cycles or 60 s, two clients at random intervals around the idle
    timeout, keep-alive and fresh connections; every request is answered by the container."""
    import time

    from .conftest import random_arrivals

    port = free_port()
    bundle = make_bundle(tmp_path / "bundle", port)
    w = start_wakegate(oci_service("soak", port, bundle, runtime_root, sleep=sleep, idle="50ms"))
    started = time.monotonic()
    results = random_arrivals(w.port, "soak.test", lambda: state(w, "soak")["wakes"], 60,
                              [0, 0.01, 0.04, 0.06, 0.1, 0.15])
    s = state(w, "soak")
    bad = [r for r in results if r != (200, HELLO)]
    assert results and not bad, bad[:5]
    assert s["wakes"] >= 100 or time.monotonic() >= started + 60, s
    assert s["failures"] == 0
