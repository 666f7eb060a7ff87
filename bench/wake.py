"""Wake benchmarks: what the first request to a sleeping service costs, in every sleep mode, and a
10,000-request burst.

``wake``: per mode (WAKE_MODES), the latency of a request to an awake service, then of the first
request after the service was put to sleep, over many cycles; and in the same cycle, while the
service sleeps, the same wake without wakegate (the baseline): a bare thaw of a frozen process, the
process's own start-up, a bare ``criu restore`` of the service's image, a bare QEMU restore of its
snapshot (the new and the old path), a bare ``cont`` of a paused VM.
``burst``: N concurrent connections each send one request to a sleeping service; every answer is
counted, and wakegate's peak RSS read from /proc.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKEND = ROOT / "examples" / "backend.py"  # the plain service: asyncio + h11
DEMO = ROOT / "examples" / "demo_app.py"  # the slow-start service: INIT_SECONDS of start-up, then fast
GUEST_CACHE = ROOT / ".cache" / "guest"  # make test and make run build the demo guest here
SLOW_INIT_SECONDS = 3.0  # the slow app's initialisation (a model, a cache): what a snapshot skips
sys.path.insert(0, str(ROOT))

from .common import free_port, stop_process  # noqa: E402


@dataclass(frozen=True)
class WakeMode:
    """One row of the wake table: how the service runs and sleeps, and its baseline without wakegate."""

    name: str
    kind: str  # "process" (examples/backend.py or the slow app), "criu" or "microvm"
    sleep: str  # pause, stop, snapshot
    baseline: str  # thaw, startup, criu, vm-standby, vm-stream, vm-cont
    policy: str = ""  # snapshots: prepared or stateful
    app: str = "plain"  # "plain" (examples/backend.py) or "slow" (examples/demo_app.py)
    vm_extra: str = ""  # lines for [services.svc.microvm]
    slow_cycles: bool = False  # a cycle takes ~0.5 s: half the cycles

    @property
    def standby(self) -> bool:
        """A standby QEMU waits while the service sleeps (the next wake uses it)."""
        return self.kind == "microvm" and self.sleep == "snapshot" and "standby = false" not in self.vm_extra

    @property
    def path(self) -> str:
        return "/hello" if self.kind in ("process", "criu") and self.app == "plain" else "/"  # busybox httpd: /


WAKE_MODES = (
    WakeMode("pause", "process", "pause", "thaw"),
    WakeMode("stop", "process", "stop", "startup"),
    WakeMode("criu-prepared", "criu", "snapshot", "criu", policy="prepared"),
    WakeMode("criu-stateful", "criu", "snapshot", "criu", policy="stateful"),
    WakeMode("criu-prepared-slow", "criu", "snapshot", "criu", policy="prepared", app="slow"),
    WakeMode("criu-stateful-slow", "criu", "snapshot", "criu", policy="stateful", app="slow"),
    WakeMode("vm-snapshot", "microvm", "snapshot", "vm-standby", policy="prepared", slow_cycles=True),
    WakeMode("vm-stream", "microvm", "snapshot", "vm-stream", policy="prepared",
             vm_extra='snapshot_format = "stream"\nstandby = false\n', slow_cycles=True),
    WakeMode("vm-pause", "microvm", "pause", "vm-cont", slow_cycles=True),
    WakeMode("docker-pause", "docker", "pause", "docker-unpause"),
    WakeMode("docker-stop", "docker", "stop", "docker-start"),
    WakeMode("runc-stop", "oci", "stop", "runc-run"),
)
SLEEP_MODES = tuple(m.name for m in WAKE_MODES)

# What the seeds of this project reported, beside what this run measures for the same thing.
SEED_FIGURES = (
    ("micro-container cold start, against a container's", "50 ms against 300 ms", "stop"),
    ("runsc overhead, against runc's", "+45 ms against +1,445 ms", "stop"),
    ("a snapshotted VM resumed, end to end", "about 10 ms", "vm-snapshot"),
)


def unavailable(mode: WakeMode) -> str | None:
    """Why the mode cannot run here, or None."""
    if mode.kind == "criu":
        from controller.criu import find_criu

        binary, why = find_criu()
        return None if binary else f"CRIU: {why} (make criu builds it)"
    if mode.kind == "docker":
        from .engine import unavailable as engine_unavailable

        return engine_unavailable()
    if mode.kind == "oci":
        from .engine import RUNC

        return None if RUNC else "needs runc (make docker installs it with docker.io)"
    if mode.kind != "microvm":
        return None
    from controller import guest

    if not guest.has_qemu():
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    try:
        guest.build(GUEST_CACHE)
    except guest.GuestBuildError as exc:
        return f"the demo guest cannot be built: {exc}"
    return None


def microvm_unavailable() -> str | None:
    return unavailable(WAKE_MODES[-1])


def _app_command(mode: WakeMode, port: int, tiny: bool) -> list[str]:
    if mode.app == "slow":
        return [sys.executable, str(DEMO), str(port), "svc", str(1.0 if tiny else SLOW_INIT_SECONDS)]
    return [sys.executable, str(BACKEND), "--port", str(port)]


class Gate:
    """A wakegate process with one service, ``svc``, run and put to sleep as the mode says."""

    def __init__(self, tmp: Path, mode: WakeMode | str, idle: str = "1h", extra_proxy: str = "",
                 tiny: bool = False, engine=None, workers: int = 1) -> None:
        if isinstance(mode, str):
            mode = next(m for m in WAKE_MODES if m.name == mode)
        self.mode = mode
        self.port, self.admin_port, self.backend_port = free_port(), free_port(), free_port()
        self.snapshot_dir = tmp / "snapshots"
        self.path = mode.path
        cfg = tmp / f"wake-{mode.name}.toml"
        policy = f'snapshot_policy = "{mode.policy}"\n' if mode.policy else ""
        if mode.kind == "oci":  # a busybox bundle and a private runtime state folder
            from .engine import make_bundle

            bundle = make_bundle(tmp / "bundle", self.backend_port)
            how = (f'[services.svc.oci]\nbundle = "{bundle}"\nroot = "{tmp / "runc-root"}"\n'
                   'stop_timeout = "0s"\n')
        elif mode.kind == "docker":  # container "svc" on the bench's own Engine, created by wake_mode
            how = (f'[services.svc.docker]\nsocket = "{engine.socket}"\ncontainer = "svc"\n'
                   'stop_timeout = "0s"\n')
        elif mode.kind == "microvm":  # the demo guest; a prepared snapshot is made by the first request
            how = (f'{policy}[services.svc.microvm]\nkernel = "{GUEST_CACHE / "vmlinux"}"\n'
                   f'initrd = "{GUEST_CACHE / "initramfs.cpio"}"\nsnapshot_dir = "{self.snapshot_dir}"\n'
                   f"{mode.vm_extra}")
        else:
            how = f"command = {json.dumps(_app_command(mode, self.backend_port, tiny))}\n{policy}"
            if mode.kind == "criu":
                how += f'[services.svc.criu]\nsnapshot_dir = "{self.snapshot_dir}"\n'
        cfg.write_text(
            f"""[proxy]
listen = "127.0.0.1:{self.port}"
upstream_timeout = "120s"
workers = {workers}
{extra_proxy}
[admin]
listen = "127.0.0.1:{self.admin_port}"
[log]
server_timing = true
[services.svc]
hosts = ["svc.test"]
upstream = "127.0.0.1:{self.backend_port}"
sleep = "{mode.sleep}"
idle_timeout = "{idle}"
wake_timeout = "60s"
max_queue = 100000
{how}"""
        )
        self.log = open(tmp / f"wake-{mode.name}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "serve", "-c", str(cfg), "--log-level", "warning"],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )
        _wait_http(f"http://127.0.0.1:{self.admin_port}/healthz")

    def admin(self, method="GET", path="/services"):
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def service(self):
        return self.admin()["services"][0]

    def put_to_sleep(self):
        self.admin("POST", "/services/svc/sleep")
        deadline = time.monotonic() + 30
        while True:
            s = self.service()
            if s["state"] == "asleep" and (not self.mode.standby or s["microvm"]["standby_pid"]):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("service did not fall asleep")
            time.sleep(0.005)

    def peak_rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def _wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(url)


def _ms(values):
    values = sorted(values)
    if not values:
        return {}
    return {
        "p50": statistics.median(values) * 1e3,
        "p99": values[min(len(values) - 1, int(len(values) * 0.99))] * 1e3,
        "min": values[0] * 1e3,
        "n": len(values),
    }


class _KeepAlive:
    """One keep-alive client connection; request() returns (status, seconds)."""

    async def open(self, port: int):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        return self

    async def request(self, path: str = "/hello") -> tuple[int, float]:
        """(status, seconds); ``self.exchange`` is the upstream part (connect + head sent to first byte)
        from wakegate's Server-Timing header."""
        started = time.perf_counter()
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: svc.test\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        self.exchange = 0.0
        for line in head.split(b"\r\n"):
            lower = line.lower()
            if lower.startswith(b"content-length:"):
                length = int(line.split(b":")[1])
            elif lower.startswith(b"server-timing:"):
                parts = dict(item.strip().split(b";dur=") for item in line[14:].split(b","))
                self.exchange = (float(parts.get(b"connect", 0)) + float(parts.get(b"upstream", 0))) / 1e3
        await self.reader.readexactly(length)
        return int(head[9:12]), time.perf_counter() - started

    def close(self) -> None:
        self.writer.close()


# ---- the baselines: the same wake without wakegate ----------------------------------------


def _answer_time(port: int, path: str, started: float, limit: float = 30.0) -> float:
    """Poll every 0.2 ms (a fresh connection each time) until the port answers HTTP; seconds since started."""
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
                conn.settimeout(5)
                if conn.recv(12).startswith(b"HTTP/1."):
                    return time.monotonic() - started
        except OSError:
            pass
        if time.monotonic() - started > limit:
            raise TimeoutError(f"nothing answered on {port}")
        time.sleep(0.0002)


class _BareQMP:
    """QMP over a socketpair, synchronous: enough for a bare QEMU in a baseline."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(30)
        self.sock = sock
        self.file = sock.makefile("rwb")
        self.file.readline()  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, arguments: dict | None = None) -> dict:
        message = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "event" not in reply:
                if "error" in reply:
                    raise RuntimeError(f"QMP {command}: {reply['error']}")
                return reply.get("return", reply)

    def until_loaded_then_cont(self, started: float) -> None:
        while (status := self.execute("query-status").get("status")) not in ("paused", "running"):
            if time.monotonic() - started > 30:
                raise TimeoutError("bare restore: the snapshot did not load")
            time.sleep(0.0005)
        if status == "paused":
            self.execute("cont")

    def close(self) -> None:
        try:
            self.execute("quit")
        except (OSError, ValueError, RuntimeError):
            pass
        self.sock.close()


def _launch_qemu(argv: list[str], fds: tuple = (), extra: tuple = ()) -> tuple[subprocess.Popen, _BareQMP]:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [*argv, *extra, "-chardev", f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control",
         "-serial", "null"],
        pass_fds=(theirs.fileno(), *fds), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    theirs.close()
    return proc, _BareQMP(ours)


def _with_port(argv: list[str], port: int) -> list[str]:
    """The snapshot's QEMU arguments forwarding another host port: the standby holds the service's."""
    return [re.sub(r"hostfwd=tcp:([^:]*):\d+-", rf"hostfwd=tcp:\1:{port}-", a) for a in argv]


class Baseline:
    """The mode's wake without wakegate, measured while wakegate's service sleeps. ``once()`` returns
    (resume, answer) in seconds: the bare resume or start, then to the first HTTP answer."""

    def __init__(self, mode: WakeMode, gate: Gate, tiny: bool, engine=None) -> None:
        self.mode, self.gate, self.tiny, self.engine = mode, gate, tiny, engine
        self.proc: subprocess.Popen | None = None
        self.qmp: _BareQMP | None = None
        self.group: Path | None = None
        if mode.baseline == "thaw":  # our own copy of the service, in a freezer cgroup of our own
            self.port = free_port()
            self.proc = subprocess.Popen(_app_command(mode, self.port, tiny), stdout=subprocess.DEVNULL)
            _answer_time(self.port, mode.path, time.monotonic())
            self.group = _bench_freezer_group(self.proc.pid)
        elif mode.kind == "docker":  # our own container beside wakegate's, on the same Engine
            self.port = free_port()
            engine.create("bare", self.port)
            engine.api("POST", "/containers/bare/start")
            _answer_time(self.port, "/", time.monotonic())
        elif mode.kind == "oci":  # our own bundle beside wakegate's, on another port
            from .engine import RUNC, make_bundle

            self.port = free_port()
            self.runc = [RUNC, "--root", str(gate.snapshot_dir.parent / "bare-root")]
            self.bundle = make_bundle(gate.snapshot_dir.parent / "bare-bundle", self.port)
        elif mode.baseline == "vm-cont":  # our own VM, booted cold once
            from controller.config import MicroVMConfig
            from controller.microvm import MicroVMBackend

            self.port = free_port()
            vm = MicroVMConfig(kernel=str(GUEST_CACHE / "vmlinux"), initrd=str(GUEST_CACHE / "initramfs.cpio"),
                               snapshot_dir=str(gate.snapshot_dir), qemu="qemu-system-x86_64")
            argv = MicroVMBackend("bare", vm, mode="pause", policy="stateful", host="127.0.0.1", port=self.port,
                                  ready_path="/", ready_timeout=60).machine_args()
            self.proc, self.qmp = _launch_qemu(argv)
            _answer_time(self.port, "/", time.monotonic(), limit=120)

    def once(self) -> tuple[float, float]:
        kind = self.mode.baseline
        if kind == "startup":
            port = free_port()
            started = time.monotonic()
            proc = subprocess.Popen(_app_command(self.mode, port, self.tiny), stdout=subprocess.DEVNULL)
            try:
                return 0.0, _answer_time(port, self.mode.path, started)
            finally:
                proc.kill()
                proc.wait()
        if kind == "thaw":
            _freeze(self.group, True)
            started = time.monotonic()
            _freeze(self.group, False)
            resumed = time.monotonic()
            return resumed - started, _answer_time(self.port, self.mode.path, resumed)
        if kind == "criu":
            return _bare_criu_restore(self.gate.snapshot_dir, self.gate.backend_port, self.mode.path)
        if kind in ("docker-unpause", "docker-start"):
            sleep, wake = ("pause", "unpause") if kind == "docker-unpause" else ("stop?t=0", "start")
            self.engine.api("POST", f"/containers/bare/{sleep}")
            started = time.monotonic()
            self.engine.api("POST", f"/containers/bare/{wake}")
            resumed = time.monotonic()
            return resumed - started, _answer_time(self.port, "/", resumed)
        if kind == "runc-run":  # the runtime's own start, in the foreground as wakegate runs it
            started = time.monotonic()
            proc = subprocess.Popen([*self.runc, "run", "--bundle", str(self.bundle), "bare"],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                return 0.0, _answer_time(self.port, "/", started)
            finally:
                subprocess.run([*self.runc, "kill", "bare", "KILL"], capture_output=True)
                stop_process(proc, 10, sig=None)
                subprocess.run([*self.runc, "delete", "--force", "bare"], capture_output=True)
        if kind == "vm-cont":
            self.qmp.execute("stop")
            started = time.monotonic()
            self.qmp.execute("cont")
            resumed = time.monotonic()
            return resumed - started, _answer_time(self.port, "/", resumed)
        if kind == "vm-standby":
            return _bare_vm_restore(self.gate.snapshot_dir, standby=True)
        return _bare_vm_restore(self.gate.snapshot_dir, standby=False)

    def close(self) -> None:
        if self.group is not None:
            _freeze(self.group, False)
        if self.qmp is not None:
            self.qmp.close()
        if self.proc is not None:
            stop_process(self.proc, 10, sig=None if self.qmp is not None else signal.SIGKILL)
        if self.group is not None:
            try:
                self.group.rmdir()
            except OSError:
                pass


def _bench_freezer_group(pid: int) -> Path:
    """A freezer cgroup for the thaw baseline (cgroup v2 cgroup.freeze or v1 freezer.state)."""
    root = Path("/sys/fs/cgroup")
    parent = root / "freezer" if (root / "freezer" / "freezer.state").exists() or (root / "freezer").is_dir() else root
    group = parent / f"wakegate-bench-{os.getpid()}"
    group.mkdir(exist_ok=True)
    (group / "cgroup.procs").write_text(str(pid))
    return group


def _freeze(group: Path, frozen: bool) -> None:
    if (group / "cgroup.freeze").exists():
        (group / "cgroup.freeze").write_text("1" if frozen else "0")
        want, events = ("frozen 1" if frozen else "frozen 0"), group / "cgroup.events"
        while want not in events.read_text():
            time.sleep(0.0002)
        return
    (group / "freezer.state").write_text("FROZEN" if frozen else "THAWED")
    want = "FROZEN" if frozen else "THAWED"
    while (group / "freezer.state").read_text().strip() != want:
        time.sleep(0.0002)


def _bare_criu_restore(snapshot_dir: Path, port: int, path: str, name: str = "svc") -> tuple[float, float]:
    """``criu restore`` of the service's image by hand (its own PID namespace comes from the image),
    the pid file polled every 0.5 ms, then the first answer; the restored tree is killed after."""
    from controller.criu import find_criu

    criu, _ = find_criu()
    image = snapshot_dir / f"{name}.criu"
    logfile = (snapshot_dir / f"{name}.log").resolve()
    with tempfile.TemporaryDirectory(prefix="wakegate-bare-criu-") as tmp:
        pidfile = Path(tmp) / "pid"
        log_fd = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        started = time.monotonic()
        proc = subprocess.Popen(
            [criu, "restore", "-D", str(image), "--pidfile", str(pidfile), "-o", str(Path(tmp) / "restore.log"),
             "--tcp-close", "--manage-cgroups=ignore", "--inherit-fd", f"fd[{log_fd}]:{str(logfile).lstrip('/')}"],
            pass_fds=(log_fd,), stdout=log_fd, stderr=log_fd, start_new_session=True,
        )
        os.close(log_fd)
        pid = None
        try:
            while pid is None:
                try:
                    pid = int(pidfile.read_text())
                except (OSError, ValueError):
                    if proc.poll() is not None:
                        raise RuntimeError("bare criu restore failed: "
                                           + (Path(tmp) / "restore.log").read_text()[-500:]) from None
                    if time.monotonic() - started > 30:
                        raise TimeoutError("bare criu restore: no pid file") from None
                    time.sleep(0.0005)
            resumed = time.monotonic()
            return resumed - started, _answer_time(port, path, resumed)
        finally:
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)  # init of its PID namespace: everything in it dies
                except ProcessLookupError:
                    pass
            stop_process(proc, 10)


def _bare_vm_restore(snapshot_dir: Path, standby: bool, name: str = "svc") -> tuple[float, float]:
    """QEMU's own restore of the service's snapshot, without wakegate, on another host port.
    ram-file with standby: QEMU started ahead with the RAM file mapped copy-on-write and
    ``-incoming defer`` (not timed), then migrate-incoming + cont. stream: QEMU launched with
    ``-incoming fd:`` on the whole stream (timed from the launch), then cont."""
    meta = json.loads((snapshot_dir / f"{name}.json").read_bytes())
    port = free_port()
    argv = _with_port(meta["argv"], port)
    fd = os.open(snapshot_dir / f"{name}.vmstate", os.O_RDONLY)
    try:
        if meta.get("layout") == "ram-file":
            memory = f"memory-backend-file,id=microvm.ram,size={argv[argv.index('-m') + 1]}M," \
                     f"mem-path={snapshot_dir / (name + '.ram')},share=off"
            proc, qmp = _launch_qemu(argv, (fd,), ("-object", memory, "-incoming", "defer"))
            qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
            started = time.monotonic() if standby else None
            qmp.execute("migrate-incoming", {"uri": f"fd:{fd}"})
        else:
            started = time.monotonic()
            proc, qmp = _launch_qemu(argv, (fd,), ("-incoming", f"fd:{fd}"))
    finally:
        os.close(fd)
    try:
        qmp.until_loaded_then_cont(started)
        resumed = time.monotonic()
        return resumed - started, _answer_time(port, "/", resumed)
    finally:
        qmp.close()
        stop_process(proc, 10, sig=None)


# ---- the cycles -----------------------------------------------------------------------------


async def _wake_cycles(gate: Gate, baseline: Baseline, cycles: int, progress) -> dict:
    loop = asyncio.get_running_loop()
    client = await _KeepAlive().open(gate.port)
    path = gate.path
    await client.request(path)  # first start (a prepared snapshot is made here), not counted
    for _ in range(5 if gate.mode.slow_cycles else 20):  # warm up
        await client.request(path)
    out = {key: [] for key in ("awake", "first", "resume", "ready", "exchange", "bare_resume", "bare_answer")}
    for i in range(cycles):
        out["awake"].append(min([(await client.request(path))[1] for _ in range(3)]))  # just before this cycle
        await loop.run_in_executor(None, gate.put_to_sleep)
        bare_resume, bare_answer = await loop.run_in_executor(None, baseline.once)  # while the service sleeps
        out["bare_resume"].append(bare_resume)
        out["bare_answer"].append(bare_answer)
        status, elapsed = await client.request(path)
        if status != 200:
            raise RuntimeError(f"wake answered {status}")
        s = await loop.run_in_executor(None, gate.service)
        out["first"].append(elapsed)
        out["exchange"].append(client.exchange)
        out["resume"].append(s["last_resume_ms"] / 1e3)
        out["ready"].append(s["last_ready_ms"] / 1e3)
        if (i + 1) % 10 == 0:
            progress(f"  wake {gate.mode.name}: {i + 1}/{cycles}")
    client.close()
    return out


def wake_mode(mode: WakeMode | str, cycles: int, progress=print, tiny: bool = False, workers: int = 1) -> dict:
    if isinstance(mode, str):
        mode = next(m for m in WAKE_MODES if m.name == mode)
    engine = None
    if mode.kind == "docker":
        from .engine import PrivateEngine

        engine = PrivateEngine()
    with tempfile.TemporaryDirectory(prefix="wakegate-wake-") as tmp:
        gate = None
        baseline = None
        try:
            gate = Gate(Path(tmp), mode, tiny=tiny, engine=engine, workers=workers)
            if engine is not None:
                engine.create("svc", gate.backend_port)
            baseline = Baseline(mode, gate, tiny, engine)
            out = asyncio.run(_wake_cycles(gate, baseline, cycles, progress))
            described = gate.service()
        finally:
            if baseline is not None:
                baseline.close()
            if gate is not None:
                gate.stop()
            if engine is not None:
                engine.close()
    first, awake, resume, ready = out["first"], out["awake"], out["resume"], out["ready"]
    result = {"mode": mode.name, "workers": workers, "kind": mode.kind, "sleep": mode.sleep, "policy": mode.policy, "app": mode.app,
              "baseline": mode.baseline, "awake": _ms(awake), "first_request": _ms(first),
              "backend_resume": _ms(resume), "readiness_wait": _ms(ready)}
    # Each cycle against the awake request measured right before it: drift between cycles cancels out.
    result["added_over_awake"] = _ms([f - a for f, a in zip(first, awake)])
    result["wakegate_overhead"] = _ms([f - a - r - q for f, a, r, q in zip(first, awake, resume, ready)])
    # The same without the awake subtraction: the first request less the backend's resume, the readiness
    # wait, and the held request's own exchange with the service (connect + upstream, from Server-Timing).
    result["held_exchange"] = _ms(out["exchange"])
    result["wakegate_own"] = _ms([f - r - q - x for f, r, q, x in zip(first, resume, ready, out["exchange"])])
    bare = [r + a for r, a in zip(out["bare_resume"], out["bare_answer"])]
    result["without_wakegate"] = {"resume": _ms(out["bare_resume"]), "to_answer": _ms(out["bare_answer"]),
                                  "total": _ms(bare)}
    # What wakegate adds over the same wake done by hand, cycle by cycle: the first request through
    # wakegate, less an awake request (the held request still has to be served), less the bare wake.
    result["added_over_baseline"] = _ms([f - a - b for f, a, b in zip(first, awake, bare)])
    snapshot = described.get("snapshot") or described.get("microvm") or {}
    result["snapshot_bytes"] = snapshot.get("image_bytes", snapshot.get("snapshot_bytes"))
    if engine is not None:
        result["containers"] = (described.get("docker") or {}).get("containers")
    return result


async def _burst_requests(port: int, n: int) -> tuple[dict, float]:
    sem_open = asyncio.Semaphore(2000)  # connect in waves: the listen backlog is finite

    async def one():
        async with sem_open:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /hello HTTP/1.1\r\nHost: svc.test\r\nConnection: close\r\n\r\n")
            data = await reader.read()
            return int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else 0
        finally:
            writer.close()

    started = time.monotonic()
    statuses = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    elapsed = time.monotonic() - started
    counts: dict = {}
    for s in statuses:
        key = s if isinstance(s, int) else type(s).__name__
        counts[key] = counts.get(key, 0) + 1
    return counts, elapsed


def burst(n: int) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < n + 100:
        raise SystemExit(f"bench: burst of {n} needs {n + 100} open files, the limit is {hard}")
    with tempfile.TemporaryDirectory(prefix="wakegate-burst-") as tmp:
        gate = Gate(Path(tmp), "stop", extra_proxy='head_timeout = "60s"')
        try:
            counts, elapsed = asyncio.run(_burst_requests(gate.port, n))
            service = gate.service()
            return {
                "requests": n,
                "statuses": {str(k): v for k, v in counts.items()},
                "ok": counts.get(200, 0),
                "errors": n - counts.get(200, 0),
                "wakes": service["wakes"],
                "seconds_until_all_answered": elapsed,
                "peak_rss_mib": gate.peak_rss_kib() / 1024,
            }
        finally:
            gate.stop()
