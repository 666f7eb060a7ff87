"""controller.microvm with a real QEMU microVM (TCG) behind a real wakegate: cold boot, prepared and
stateful snapshots, pause, a dying or hung VMM, a corrupt snapshot, and no QEMU left behind.

Times are generous: these hosts emulate the guest CPU (a cold boot takes about 4 s, a restore
about 0.3 s).
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import orjson
import pytest

from controller.config import MicroVMConfig, from_dict
from controller.controller import make_backend
from controller.microvm import MicroVMBackend

from .conftest import ROOT, Client, free_port
from .test_guest import built_guest  # noqa: F401  (fixture)

pytestmark = pytest.mark.backend  # end-to-end with a real backend: run once, on the C build

WAIT = 90.0  # seconds: a cold boot under emulation on a loaded 2-core host
HELLO = b"hello from the microVM guest\n"


def qemu_pids(name: str = "") -> list[int]:
    """QEMU processes started by wakegate (their -name is wakegate-SERVICE)."""
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*-name wakegate-{name}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.fixture(autouse=True)
def no_qemu_left_behind():
    before = set(qemu_pids())
    yield
    deadline = time.monotonic() + 10
    while set(qemu_pids()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    left = set(qemu_pids()) - before
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"QEMU processes left behind: {left}"


def vm_config(guest, tmp_path, port, name="vm", sleep="snapshot", policy=None, idle="60s", wake="60s",
              extra_vm="", extra_service="", qemu=None) -> str:
    policy_line = f'snapshot_policy = "{policy}"\n' if policy else ""
    qemu_line = f'qemu = "{qemu}"\n' if qemu else ""
    return (
        f'[log]\naccess = "{tmp_path / "access.log"}"\n'
        f'[services.{name}]\nhosts = ["{name}.example"]\nupstream = "127.0.0.1:{port}"\nsleep = "{sleep}"\n'
        f'{policy_line}idle_timeout = "{idle}"\nwake_timeout = "{wake}"\n{extra_service}'
        f'[services.{name}.microvm]\nkernel = "{guest["kernel"]}"\ninitrd = "{guest["initrd"]}"\n'
        f'snapshot_dir = "{tmp_path / "snapshots"}"\n{qemu_line}{extra_vm}'
    )


def get(w, path="/", host="vm.example", timeout=WAIT):
    c = Client(w.port, timeout=timeout)
    try:
        return c.request(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    finally:
        c.close()


def admin(w, path, method="GET"):
    req = urllib.request.Request(f"http://127.0.0.1:{w.admin_port}{path}", method=method)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def service(w, name="vm"):
    return next(s for s in admin(w, "/services")["services"] if s["name"] == name)


def wait_state(w, state, name="vm", timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = service(w, name)
        if s["state"] == state:
            return s
        time.sleep(0.05)
    raise AssertionError(f"service {name} never became {state}: {service(w, name)}\n{w.output()[-3000:]}")


def metrics(w) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{w.admin_port}/metrics", timeout=10) as r:
        return r.read().decode()


def count(w) -> int:
    r = get(w, "/cgi-bin/count")
    assert r.status == 200, (r, w.output()[-2000:])
    return int(r.body)


def md5(path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def wait_standby(w, name="vm", timeout=30) -> int:
    """The pid of the standby QEMU once it waits (it starts in the background after a sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = service(w, name)["microvm"]["standby_pid"]
        if pid:
            return pid
        time.sleep(0.02)
    raise AssertionError(f"no standby QEMU for {name}: {service(w, name)}\n{w.output()[-3000:]}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


# ---- without a VM: arguments, fingerprint, the snapshot record ----

def backend_for(tmp_path, **changes) -> MicroVMBackend:
    vm = MicroVMConfig(kernel=str(tmp_path / "vmlinux"), initrd=str(tmp_path / "initrd"),
                       snapshot_dir=str(tmp_path / "snaps"), qemu="/usr/bin/qemu-system-x86_64")
    for key, value in changes.items():
        vm = vm.__class__(**{**vm.__dict__, key: value})
    return MicroVMBackend("svc", vm, mode="snapshot", policy="stateful", host="127.0.0.1", port=9010,
                          ready_path="/", ready_timeout=10)


def test_machine_arguments_follow_design_pitfalls(tmp_path):
    args = backend_for(tmp_path, memory_mb=96, cmdline="loglevel=3").machine_args()
    joined = " ".join(args)
    assert "-M microvm" in joined and "-accel tcg" in joined and "-m 96" in joined
    assert "hostfwd=tcp:127.0.0.1:9010-:80" in joined
    append = args[args.index("-append") + 1]
    assert re.search(r"tsc_early_khz=\d+", append) and "tsc=reliable" in append and append.endswith(" loglevel=3")


@pytest.mark.parametrize("change", [{"memory_mb": 256}, {"cpus": 2}, {"accel": "kvm"}, {"guest_port": 8080},
                                    {"cmdline": "quiet"}, {"kernel": "/other/vmlinux"}])
def test_fingerprint_changes_with_the_machine(tmp_path, change):
    assert backend_for(tmp_path).fingerprint() != backend_for(tmp_path, **change).fingerprint()
    assert backend_for(tmp_path).fingerprint() == backend_for(tmp_path).fingerprint()


def test_fingerprint_follows_the_kernel_file(tmp_path):
    (tmp_path / "vmlinux").write_bytes(b"one")
    before = backend_for(tmp_path).fingerprint()
    (tmp_path / "vmlinux").write_bytes(b"other kernel")
    assert backend_for(tmp_path).fingerprint() != before


@pytest.mark.parametrize("record", [None, b"not json", b'{"fingerprint": "stale", "argv": []}'])
def test_unusable_snapshot_is_discarded(tmp_path, record):
    b = backend_for(tmp_path)
    b.vmstate.parent.mkdir(parents=True)
    b.vmstate.write_bytes(b"state")
    if record is not None:
        b.meta.write_bytes(record)
    assert b.usable_snapshot() is None
    assert not b.vmstate.exists() and not b.meta.exists()


def test_matching_snapshot_is_used(tmp_path):
    b = backend_for(tmp_path)
    b.vmstate.parent.mkdir(parents=True)
    b.vmstate.write_bytes(b"state")
    b.meta.write_bytes(orjson.dumps({"fingerprint": b.fingerprint(), "argv": b.machine_args()}))
    assert b.usable_snapshot()["argv"] == b.machine_args()


# ---- a real VM behind a real wakegate ----

def test_prepared_snapshot_through_the_proxy(built_guest, tmp_path, start_wakegate):  # noqa: F811
    """Cold boot, prepared snapshot, idle sleep (QEMU exits, the file stays), restore on the next
    request; the guest's memory is the prepared one every time; metrics and access log show it."""
    port = free_port()
    w = start_wakegate(vm_config(built_guest, tmp_path, port, policy="prepared", idle="2s",
                                 extra_vm='warmup = ["/"]\n'))
    r = get(w)
    assert r.status == 200 and r.body == HELLO, w.output()[-3000:]
    first = service(w)
    assert first["microvm"]["boots"]["cold"] == 1 and first["microvm"]["snapshot_bytes"] > 10 << 20
    snapshot = Path(first["microvm"]["snapshot"])
    assert snapshot.exists() and first["pid"] and alive(first["pid"])
    assert count(w) == 1 and count(w) == 2

    folder = tmp_path / "snapshots"
    record = orjson.loads((folder / "vm.json").read_bytes())
    assert record["layout"] == "ram-file" and record["device_state_bytes"] < 1 << 20  # RAM not in the stream
    ram = md5(folder / "vm.ram")

    asleep = wait_state(w, "asleep", timeout=30)
    assert asleep["pid"] is None and not alive(first["pid"])
    standby = wait_standby(w)
    assert qemu_pids("vm") == [standby]  # a QEMU waits with the snapshot mapped, and only that one
    assert snapshot.exists()

    assert count(w) == 1  # restored from the prepared snapshot: the counter was never in it
    restored = service(w)
    assert restored["pid"] == standby and restored["microvm"]["standby_restores"] == 1
    assert restored["microvm"]["boots"] == {"cold": 1, "restore": 1, "cont": 0}
    assert restored["microvm"]["last_wake_kind"] == "restore"
    assert restored["microvm"]["snapshot_resident_bytes"] > 0
    admin(w, "/services/vm/sleep", "POST")
    wait_state(w, "asleep")
    assert count(w) == 1 and md5(folder / "vm.ram") == ram  # copy-on-write: the snapshot never changes
    serial = (tmp_path / "snapshots" / "vm.serial.log").read_text()
    assert "wakegate guest ready" not in serial  # the console of a restore: no second boot

    text = metrics(w)
    assert 'wakegate_wakes_total{service="vm",mode="snapshot",result="ok"} 3.0' in text
    assert 'wakegate_sleeps_total{service="vm",mode="snapshot",reason="idle"} 1.0' in text
    assert 'wakegate_backend_starts_total{service="vm",kind="restore"} 2.0' in text
    assert re.search(r'wakegate_snapshot_bytes\{service="vm"\} [1-9]', text)
    assert re.search(r'wakegate_snapshot_resident_bytes\{service="vm"\} [1-9]', text)
    assert 'wakegate_backend_start_seconds_count{service="vm",kind="restore",phase="resume"} 2.0' in text
    assert 'wakegate_backend_start_seconds_count{service="vm",kind="cold",phase="ready"} 1.0' in text
    assert re.search(r'wakegate_wake_duration_seconds_count\{service="vm",mode="snapshot"\} 3.0', text)
    w.stop()
    lines = [orjson.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]
    woke = [x for x in lines if x["woke"]]
    assert len(woke) == 3 and all(x["ms"]["queue"] > 0 and x["status"] == 200 for x in woke)
    assert woke[1]["path"] == "/cgi-bin/count"


def test_stateful_snapshot_keeps_guest_memory(built_guest, tmp_path, start_wakegate):  # noqa: F811
    """`wakegate snapshot` prepares ahead of time; with the stateful policy every sleep writes the
    current state, so the counter survives the VMM exiting."""
    port = free_port()
    config = vm_config(built_guest, tmp_path, port, policy="stateful")
    path = tmp_path / "wakegate.toml"
    path.write_text(f'[proxy]\nlisten = "127.0.0.1:{free_port()}"\n' + config)
    made = subprocess.run([sys.executable, "-m", "controller.cli", "snapshot", "vm", "-c", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=WAIT + 30)
    assert made.returncode == 0, made.stderr
    assert "vm.vmstate" in made.stdout and (tmp_path / "snapshots" / "vm.vmstate").exists()

    w = start_wakegate(config)
    assert count(w) == 1 and count(w) == 2
    assert service(w)["microvm"]["boots"] == {"cold": 0, "restore": 1, "cont": 0}  # no cold boot at all
    pid = service(w)["pid"]
    admin(w, "/services/vm/sleep", "POST")
    asleep = wait_state(w, "asleep")
    assert not alive(pid) and asleep["microvm"]["last_save_ms"] is not None
    assert count(w) == 3  # the state at sleep came back
    assert service(w)["microvm"]["boots"]["restore"] == 2


def test_stream_snapshot_is_converted_keeping_its_state(built_guest, tmp_path, start_wakegate):  # noqa: F811
    """A snapshot in the stream format (the only one before ram-file) keeps working: with
    snapshot_format = "stream" every sleep writes the whole VM; a wakegate with the default format
    then restores that state, converting it once to a RAM file plus device state."""
    port = free_port()
    w = start_wakegate(vm_config(built_guest, tmp_path, port, policy="stateful",
                                 extra_vm='snapshot_format = "stream"\n'))
    assert count(w) == 1 and count(w) == 2
    admin(w, "/services/vm/sleep", "POST")
    asleep = wait_state(w, "asleep")
    folder = tmp_path / "snapshots"
    record = orjson.loads((folder / "vm.json").read_bytes())
    assert record["layout"] == "stream" and record["device_state_bytes"] > 10 << 20  # the RAM is in it
    assert not (folder / "vm.ram").exists() and asleep["microvm"]["layout"] == "stream"
    assert count(w) == 3  # the stream path still restores
    w.stop()  # shutdown puts the awake VM to sleep: its state is saved
    record = orjson.loads((folder / "vm.json").read_bytes())
    assert record.pop("layout") == "stream"
    (folder / "vm.json").write_bytes(orjson.dumps(record))  # as a wakegate before ram-file wrote it
    w = start_wakegate(vm_config(built_guest, tmp_path, port, policy="stateful"))
    assert count(w) == 4
    assert "converted the stream snapshot" in w.output()
    admin(w, "/services/vm/sleep", "POST")
    wait_state(w, "asleep")
    record = orjson.loads((folder / "vm.json").read_bytes())
    assert record["layout"] == "ram-file" and record["device_state_bytes"] < 1 << 20
    assert count(w) == 5  # the converted snapshot keeps the state across sleeps
    assert service(w)["microvm"]["boots"]["cold"] == 0


def test_without_standby_no_qemu_runs_while_asleep(built_guest, tmp_path, start_wakegate):  # noqa: F811
    port = free_port()
    w = start_wakegate(vm_config(built_guest, tmp_path, port, policy="prepared", extra_vm="standby = false\n"))
    assert get(w).body == HELLO
    admin(w, "/services/vm/sleep", "POST")
    asleep = wait_state(w, "asleep")
    time.sleep(0.5)
    assert not qemu_pids("vm") and asleep["microvm"]["standby_pid"] is None
    assert get(w).body == HELLO
    s = service(w)
    assert s["microvm"]["last_wake_kind"] == "restore" and s["microvm"]["standby_restores"] == 0


@pytest.mark.parametrize("policy", ["prepared", "stateful"])
def test_random_arrivals_across_vm_snapshot_cycles_lose_nothing(built_guest, tmp_path, start_wakegate, policy):  # noqa: F811
    """Bounded: 100 sleep/wake cycles or 120 s, two clients at random intervals around the idle
    timeout, keep-alive and fresh connections; every request is answered by the guest."""
    from .conftest import random_arrivals

    port = free_port()
    w = start_wakegate(vm_config(built_guest, tmp_path, port, policy=policy, idle="100ms"))
    assert get(w).body == HELLO  # the first (cold) boot, outside the clock
    deadline = time.monotonic() + 120
    results = random_arrivals(w.port, "vm.example", lambda: service(w)["wakes"], 120,
                              [0, 0.02, 0.08, 0.12, 0.2, 0.3], timeout=WAIT)
    s = service(w)
    bad = [r for r in results if r != (200, HELLO)]
    assert results and not bad, bad[:5]
    assert s["wakes"] >= 100 or time.monotonic() >= deadline, s
    assert s["microvm"]["boots"]["cold"] == 1 and s["microvm"]["boots"]["restore"] == s["wakes"] - 1
    assert s["failures"] == 0


def test_pause_mode_keeps_the_vmm(built_guest, tmp_path, start_wakegate):  # noqa: F811
    port = free_port()
    w = start_wakegate(vm_config(built_guest, tmp_path, port, sleep="pause"))
    assert count(w) == 1
    pid = service(w)["pid"]
    admin(w, "/services/vm/sleep", "POST")
    wait_state(w, "asleep")
    assert alive(pid)
    assert count(w) == 2  # memory kept: same VM, cont
    s = service(w)
    assert s["pid"] == pid and s["microvm"]["boots"] == {"cold": 1, "restore": 0, "cont": 1}
    assert not (tmp_path / "snapshots" / "vm.vmstate").exists()


def test_vmm_death_and_wakegate_death(built_guest, tmp_path, start_wakegate):  # noqa: F811
    """QEMU killed while READY: the service notices and sleeps; the next request brings it back.
    wakegate killed with SIGKILL: its QEMU dies with it (parent-death signal)."""
    port = free_port()
    w = start_wakegate(vm_config(built_guest, tmp_path, port, policy="prepared"))
    assert get(w).status == 200
    pid = service(w)["pid"]
    os.kill(pid, signal.SIGKILL)
    s = wait_state(w, "asleep")
    assert s["sleeps"] == 1
    assert 'reason="exited"' in metrics(w)
    assert get(w).body == HELLO  # restored from the prepared snapshot
    assert service(w)["microvm"]["last_wake_kind"] == "restore"
    pid = service(w)["pid"]
    w.proc.kill()
    w.proc.wait()
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def test_hung_vmm_on_sleep_is_killed(built_guest, tmp_path, start_wakegate):  # noqa: F811
    """A VMM that stops answering QMP: the sleep's QMP call times out, QEMU is killed, and the
    service is asleep, not stuck; the next request starts a fresh VM."""
    port = free_port()
    w = start_wakegate(vm_config(built_guest, tmp_path, port, policy="stateful"))
    assert count(w) == 1
    pid = service(w)["pid"]
    os.kill(pid, signal.SIGSTOP)
    admin(w, "/services/vm/sleep", "POST")
    wait_state(w, "asleep", timeout=30)
    assert not alive(pid)
    assert "sleep failed" in w.output()
    assert count(w) == 1  # no state was saved: a cold boot
    assert service(w)["microvm"]["boots"]["cold"] == 2


def test_corrupt_snapshot_falls_back_to_a_cold_boot(built_guest, tmp_path, start_wakegate):  # noqa: F811
    port = free_port()
    config = vm_config(built_guest, tmp_path, port, policy="stateful")
    b = make_backend(from_dict(tomllib.loads(config), str(tmp_path / "x.toml")).services["vm"])
    b.vmstate.parent.mkdir(parents=True)
    b.vmstate.write_bytes(b"\0garbage, not a QEMU migration stream" * 1000)
    b.meta.write_bytes(orjson.dumps({"fingerprint": b.fingerprint(), "argv": b.machine_args()}))
    w = start_wakegate(config)
    r = get(w)
    assert r.status == 200 and r.body == HELLO, w.output()[-3000:]
    assert "restore failed" in w.output()
    assert service(w)["microvm"]["boots"] == {"cold": 1, "restore": 0, "cont": 0}
    assert not b.vmstate.exists()  # discarded


FAKE_QEMU = {  # fakes of QEMU failure modes that a real QEMU does not show on demand
    "exits": "#!/bin/sh\necho 'fake-qemu: cannot initialise the machine' >&2\nexit 1\n",
    "silent": "#!/bin/sh\nexec sleep 3600\n",  # never speaks QMP
}


@pytest.mark.parametrize("kind", ["exits", "silent"])
def test_failed_vmm_answers_held_requests(built_guest, tmp_path, start_wakegate, kind):  # noqa: F811
    fake = tmp_path / f"fake-qemu-{kind}"
    fake.write_text(FAKE_QEMU[kind])
    fake.chmod(0o755)
    port = free_port()
    w = start_wakegate(vm_config(built_guest, tmp_path, port, qemu=str(fake)))
    r = get(w, timeout=30)
    assert r.status == 503 and r.header(b"retry-after") is not None
    if kind == "exits":
        assert "cannot initialise the machine" in w.output()
    else:
        assert "did not answer" in w.output()
    assert service(w)["state"] == "failed" and service(w)["queued"] == 0
    deadline = time.monotonic() + 10
    while subprocess.run(["pgrep", "-f", str(fake)], capture_output=True).stdout and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not subprocess.run(["pgrep", "-f", str(fake)], capture_output=True).stdout


def test_vmm_killed_during_a_wake_answers_held_requests(built_guest, tmp_path, start_wakegate):  # noqa: F811
    """A real QEMU dies while the guest boots: the held requests get 503 with Retry-After at once
    (not at wake_timeout), the service is FAILED, and the next request after the backoff boots it."""
    import threading

    port = free_port()
    w = start_wakegate(vm_config(built_guest, tmp_path, port, wake="60s"))
    results = []
    clients = [threading.Thread(target=lambda: results.append(get(w, timeout=30))) for _ in range(3)]
    for c in clients:
        c.start()
    deadline = time.monotonic() + 30
    while not (pid := service(w)["pid"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    for c in clients:
        c.join(30)
    assert time.monotonic() - started < 10
    assert [r.status for r in results] == [503, 503, 503]
    assert all(r.header(b"retry-after") for r in results)
    s = service(w)
    assert s["state"] == "failed" and s["queued"] == 0 and s["failures"] == 1
    assert "QEMU exited" in w.output()
    time.sleep(1.5)  # the first backoff is 1 s
    assert get(w).body == HELLO


def test_a_browser_waits_through_a_cold_boot_on_the_waiting_page(built_guest, tmp_path, start_wakegate):  # noqa: F811
    """The waiting page for a microVM's cold boot: headless Chromium lands on the guest's own page."""
    import asyncio
    import os

    from . import chromium

    why = chromium.available()
    if why:
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)
    w = start_wakegate(vm_config(built_guest, tmp_path, free_port(),
                                 extra_service='wait_page = true\nwait_page_after = "300ms"\n'))

    async def browse():
        async with chromium.Browser() as browser:
            await browser.goto(f"http://vm.example:{w.port}/")
            assert await browser.wait_for("document.title") == "vm is starting"
            await browser.screenshot("waiting-page-microvm")
            await browser.wait_for("document.readyState === 'complete' && !document.title.endsWith('is starting') "
                                   "&& document.body && document.body.innerText.length > 0", timeout=WAIT)
            assert await browser.evaluate("location.href") == f"http://vm.example:{w.port}/"

    asyncio.run(browse())
    assert admin(w, "/services")["services"][0]["wakes"] == 1
