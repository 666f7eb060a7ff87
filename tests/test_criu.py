"""controller.criu against real CRIU: command services that sleep as process snapshots.

Needs CRIU >= 4.2 (`make criu`, run by `make test`); skipped with the reason where there is none."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from controller.criu import find_criu

from .conftest import ROOT, free_port, random_arrivals
from .test_controller import admin, alive, fetch, state, wait_state

CRIU, WHY = find_criu()
pytestmark = [pytest.mark.skipif(CRIU is None, reason=f"process snapshots need CRIU: {WHY}"),
              pytest.mark.backend]  # end-to-end with a real backend: run once, on the C build
DEMO = ROOT / "examples" / "demo_app.py"


def snapshot_service(name, port, folder, policy, idle="300ms", command=None, extra=""):
    command = command or [sys.executable, str(DEMO), str(port), name]
    return f"""
[services.{name}]
hosts = ["{name}.test"]
upstream = "127.0.0.1:{port}"
command = {json.dumps(command)}
sleep = "snapshot"
snapshot_policy = "{policy}"
idle_timeout = "{idle}"
wake_timeout = "20s"
{extra}
[services.{name}.criu]
snapshot_dir = "{folder}"
"""


def count(body: bytes) -> int:
    """demo_app's "request N since start"."""
    return int(body.split(b"request ")[1].split()[0])


def snap(w, name):
    return state(w, name)["snapshot"]


def cycle(w, name, path="/"):
    """One request, then wait for the idle sleep; the response."""
    response = fetch(w.port, f"{name}.test", path)
    assert response.status == 200, response
    wait_state(w, name, "asleep")
    return response


def test_prepared_snapshot_restores_the_same_state_every_wake(start_wakegate, tmp_path):
    w = start_wakegate(snapshot_service("prep", free_port(), tmp_path, "prepared"))
    first = cycle(w, "prep")  # a cold start, then the prepared dump, then an idle sleep
    s = snap(w, "prep")
    assert s["boots"] == {"cold": 1, "restore": 0} and s["image_bytes"] > 1_000_000
    assert state(w, "prep")["pid"] is None  # asleep: no process
    counts = [count(cycle(w, "prep").body) for _ in range(3)]
    assert snap(w, "prep")["boots"] == {"cold": 1, "restore": 3}
    # the prepared state every time: what the first run had after its readiness probe, plus the
    # restored run's own probe and this request
    assert counts == [count(first.body) + 1] * 3
    assert b"pid 1," in first.body  # the init of its own PID namespace
    with urllib.request.urlopen(f"http://127.0.0.1:{w.admin_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'wakegate_backend_starts_total{service="prep",kind="restore"} 3.0' in text
    assert 'wakegate_backend_starts_total{service="prep",kind="cold"} 1.0' in text
    assert re.search(r'wakegate_snapshot_bytes\{service="prep"\} [1-9]', text)
    assert 'wakegate_snapshot_save_seconds_count{service="prep"} 1.0' in text


def test_stateful_snapshot_keeps_the_state_across_sleeps(start_wakegate, tmp_path):
    w = start_wakegate(snapshot_service("full", free_port(), tmp_path, "stateful"))
    counts = [count(cycle(w, "full").body) for _ in range(3)]
    assert snap(w, "full")["boots"] == {"cold": 1, "restore": 2}
    assert counts[1] > counts[0] and counts[2] > counts[1]  # memory survives each sleep


def test_a_taken_pid_and_a_twin_service_do_not_stop_a_restore(start_wakegate, tmp_path):
    a, b = free_port(), free_port()
    w = start_wakegate(snapshot_service("one", a, tmp_path, "prepared")
                       + snapshot_service("two", b, tmp_path, "prepared"))
    cycle(w, "one")
    cycle(w, "two")
    pid = state(w, "one")["last_pid"] if "last_pid" in state(w, "one") else None
    # Take host pids near the ones the services had: a restore recreates its PIDs inside a new
    # namespace, so whatever holds them outside does not matter.
    squatters = []
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(max(300, int(Path("/proc/sys/kernel/ns_last_pid").read_text()) - 200)))
    for _ in range(20):
        squatters.append(os.fork() or os._exit(0) or 0)
    for child in squatters:
        os.waitpid(child, 0)
    for name in ("one", "two"):
        response = cycle(w, name)
        assert b"pid 1," in response.body
    assert snap(w, "one")["boots"]["restore"] == 1 and snap(w, "two")["boots"]["restore"] == 1
    del pid


def test_a_changed_service_is_cold_started_and_snapshotted_again(start_wakegate, tmp_path):
    app = tmp_path / "app.py"
    app.write_text(DEMO.read_text())
    port = free_port()
    w = start_wakegate(snapshot_service("chg", port, tmp_path / "snaps", "prepared",
                                        command=[sys.executable, str(app), str(port), "chg"]))
    cycle(w, "chg")
    cycle(w, "chg")
    assert snap(w, "chg")["boots"] == {"cold": 1, "restore": 1}
    app.write_text(DEMO.read_text().replace("hello from", "hello again from"))
    assert b"hello again from" in cycle(w, "chg").body  # never the stale code
    assert snap(w, "chg")["boots"] == {"cold": 2, "restore": 1}
    assert b"hello again from" in cycle(w, "chg").body
    assert snap(w, "chg")["boots"] == {"cold": 2, "restore": 2}
    assert "discarding snapshot" in w.output()


def test_a_service_that_cannot_be_dumped_falls_back_to_cold_starts(start_wakegate, tmp_path):
    """A Unix socket connected to a process outside the service: CRIU refuses to dump it."""
    outside = tmp_path / "outside.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(outside))
    listener.listen()
    port = free_port()
    code = (f"import socket, runpy, sys; s = socket.socket(socket.AF_UNIX); s.connect({str(outside)!r}); "
            f"sys.argv = ['demo', '{port}', 'odd']; runpy.run_path({str(DEMO)!r}, run_name='__main__')")
    w = start_wakegate(snapshot_service("odd", port, tmp_path / "snaps", "prepared",
                                        command=[sys.executable, "-c", code]))
    try:
        started = time.monotonic()
        cycle(w, "odd")
        cycle(w, "odd")
        assert time.monotonic() - started < 20
        assert snap(w, "odd")["boots"] == {"cold": 2, "restore": 0}
        output = w.output()  # CRIU 4.2 dumps the socket but cannot restore it; earlier ones refused the dump
        assert "prepared snapshot not taken (dump failed:" in output or "restore failed:" in output
    finally:
        listener.close()


def test_a_broken_image_falls_back_to_a_cold_start(start_wakegate, tmp_path):
    w = start_wakegate(snapshot_service("brk", free_port(), tmp_path, "prepared"))
    cycle(w, "brk")
    for page in (tmp_path / "brk.criu").glob("pages-*.img"):
        page.write_bytes(b"")
    assert cycle(w, "brk").status == 200
    assert snap(w, "brk")["boots"] == {"cold": 2, "restore": 0}
    assert "restore failed" in w.output()


def test_restored_service_dies_with_wakegate(start_wakegate, tmp_path):
    w = start_wakegate(snapshot_service("die", free_port(), tmp_path, "prepared", idle="1h"))
    fetch(w.port, "die.test")
    admin(w, "POST", "/services/die/sleep")
    wait_state(w, "die", "asleep")
    fetch(w.port, "die.test")  # restored
    pid = state(w, "die")["pid"]
    assert pid and alive(pid)
    # Restored outside the service's cgroup (faster), it joins it once it has answered.
    group = f"/wakegate/127.0.0.1-{w.port}/die"
    deadline = time.monotonic() + 5
    while group not in Path(f"/proc/{pid}/cgroup").read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert group in Path(f"/proc/{pid}/cgroup").read_text()
    w.proc.kill()
    w.proc.wait()
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(pid)
    w.restart()  # and the next wakegate clears what the killed one left (its cgroups)
    assert fetch(w.port, "die.test").status == 200


def test_wakegate_snapshot_prepares_the_image_ahead(start_wakegate, tmp_path):
    port = free_port()
    w = start_wakegate(snapshot_service("ahead", port, tmp_path, "prepared"))
    w.stop()  # the same config, prepared from the command line while nothing runs
    result = subprocess.run([sys.executable, "-m", "controller.cli", "snapshot", "ahead", "-c", str(w.config_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(tmp_path / "ahead.criu")) and " MB, saved in " in result.stdout
    w.restart()
    assert fetch(w.port, "ahead.test").status == 200
    assert snap(w, "ahead")["boots"] == {"cold": 0, "restore": 1}  # the very first wake is a restore


@pytest.mark.parametrize("policy", ["prepared", "stateful"])
def test_random_arrivals_across_snapshot_cycles_lose_nothing(start_wakegate, tmp_path, policy):
    """Bounded: 100 sleep/wake cycles or 60 s, two clients at random intervals around the idle timeout."""
    w = start_wakegate(snapshot_service("soak", free_port(), tmp_path, policy, idle="50ms"))
    deadline = time.monotonic() + 60
    results = [status for status, _ in random_arrivals(w.port, "soak.test", lambda: state(w, "soak")["wakes"], 60,
                                                       [0, 0.01, 0.05, 0.08, 0.12, 0.15])]
    s = state(w, "soak")
    assert results and all(code == 200 for code in results), {c: results.count(c) for c in set(results)}
    assert s["wakes"] >= 100 or time.monotonic() >= deadline, s
    assert s["snapshot"]["boots"]["restore"] >= s["wakes"] - 2  # a cold start or two, restores after
