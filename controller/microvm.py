"""A service that runs in a QEMU microVM, driven over QMP (controller/qmp.py).

``MicroVMBackend`` sleeps by pausing the vCPUs (``pause``: QMP stop, memory kept) or by writing
the VM's memory and devices to a snapshot file and exiting (``snapshot``: no memory while
asleep). It wakes with ``cont``, by restoring the snapshot into a new QEMU (``-incoming``), or
with a cold boot when there is no usable snapshot. Every QMP call is bounded in time, and QEMU
is started so that it dies with wakegate.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import orjson

from proxy.metrics import Histogram

from .backends import SharedStop, watch_exit
from .guest import host_khz
from .qmp import QMP, QMPError
from .readiness import ATTEMPT_FIRST, ATTEMPT_MAX, NotReady, probe_until_ready, warm_up
from .service import SnapshotStats

log = logging.getLogger("wakegate.microvm")

# Kernel command line: DESIGN.md's pitfalls. Without tsc_early_khz about 1 boot in 5 hangs under TCG
# calibrating the TSC; init_on_free zeroes freed pages so that snapshots of them are small.
KERNEL_ARGS = "console=ttyS0 panic=-1 quiet tsc_early_khz={khz} tsc=reliable init_on_free=1"
MIGRATE_BANDWIDTH = 10 * 1024**3  # bytes/s; QEMU's default (32 MiB/s) makes saving 128 MB take seconds
LOAD_POLL = 0.001  # query-status while a snapshot loads; QEMU 7.2 has no event for it without -incoming defer
SAVE_POLL = 0.002  # query-migrate while a snapshot is written
SAVE_TIMEOUT = 60.0  # writing a snapshot; DESIGN.md saw 0.1 s for a 128 MB guest
QUIT_TIMEOUT = 1.0  # QMP quit gets this long to be answered; then signals
QUIT_GRACE = 5.0  # after quit or SIGTERM, QEMU gets this long before SIGKILL (ProcessBackend's STOP_GRACE)
# A restored guest answers its first connection after ~200 ms here (the guest's network stack
# catching up); a shorter attempt would only be abandoned and start that wait again.
RESTORE_FIRST_ATTEMPT = ATTEMPT_MAX
SNAPSHOT_FORMAT = 1  # bump when the files' layout or the QEMU arguments change incompatibly
EXIT_WAIT = 1.0  # after QEMU closes QMP at start-up, how long to wait for its exit status
STDERR_TAIL = 400  # characters of QEMU's stderr quoted when it fails


class RestoreFailed(Exception):
    """QEMU could not load the snapshot (it exited or refused); a cold boot can still serve."""


class MicroVMBackend:
    """One service's QEMU microVM: boot, pause, snapshot and restore, as ``Service`` asks."""

    def __init__(self, name: str, vm, *, mode: str, policy: str, host: str, port: int, ready_path: str,
                 ready_timeout: float) -> None:
        self.name = name
        self.vm = vm  # config.MicroVMConfig
        self.mode = mode  # "snapshot" or "pause"
        self.policy = policy  # "stateful" or "prepared"
        self.host = host
        self.port = port
        self.ready_path = ready_path
        self.ready_timeout = ready_timeout
        self.keeps_connections = mode == "pause"  # slirp keeps its sockets while the VM is stopped
        self.pools: list = []
        folder = Path(vm.snapshot_dir)
        self.vmstate = folder / f"{name}.vmstate"  # the snapshot: memory and device state
        self.meta = folder / f"{name}.json"  # what made it: fingerprint, QEMU arguments, size
        self.serial_log = folder / f"{name}.serial.log"  # the guest console of the last launch
        self.stderr_log = folder / f"{name}.qemu.log"  # QEMU's own messages of the last launch
        self.proc: subprocess.Popen | None = None
        self.argv: list[str] = []  # the machine arguments of the running QEMU (a restore reuses its snapshot's)
        self.qmp: QMP | None = None
        self.paused = False
        self._exited: asyncio.Future | None = None
        self._stop = SharedStop()
        self.last_resume_seconds: float | None = None  # launch (or cont) to the vCPUs running
        self.last_ready_seconds: float | None = None  # then to the guest answering
        self.last_save_seconds: float | None = None
        self.last_wake_kind: str | None = None
        self.boots = {"cold": 0, "restore": 0, "cont": 0}
        self.saves = 0
        self.save_seconds = Histogram()
        self.snapshot_bytes = self.vmstate.stat().st_size if self.vmstate.exists() else 0
        self._launcher = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []

    # ---- what a launch looks like ----

    def fingerprint(self) -> str:
        """Everything a snapshot depends on: restoring needs the same QEMU, guest and machine."""
        vm = self.vm
        parts = {"format": SNAPSHOT_FORMAT, "memory_mb": vm.memory_mb, "cpus": vm.cpus, "accel": vm.accel,
                 "forward": [self.host, self.port, vm.guest_port], "cmdline": vm.cmdline}
        for key, path in (("qemu", vm.qemu), ("kernel", vm.kernel), ("initrd", vm.initrd)):
            try:
                st = os.stat(path) if path else None
            except OSError:
                st = None
            parts[key] = [path, st.st_size, st.st_mtime_ns] if st else [path]
        return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def machine_args(self) -> list[str]:
        """QEMU's arguments that define the machine; a snapshot records them and reuses them exactly."""
        vm = self.vm
        append = KERNEL_ARGS.format(khz=host_khz()) + (" " + vm.cmdline if vm.cmdline else "")
        args = [vm.qemu, "-name", f"wakegate-{self.name}", "-M", "microvm", "-accel", vm.accel,
                "-m", str(vm.memory_mb), "-smp", str(vm.cpus), "-nodefaults", "-no-user-config",
                "-display", "none", "-no-reboot",
                "-netdev", f"user,id=n0,hostfwd=tcp:{self.host}:{self.port}-:{vm.guest_port}",
                "-device", "virtio-net-device,netdev=n0", "-kernel", vm.kernel]
        if vm.initrd:
            args += ["-initrd", vm.initrd]
        return args + ["-append", append]

    # ---- the snapshot on disk ----

    def usable_snapshot(self) -> dict | None:
        """The snapshot's record if it exists and was made by this machine; else None (and why, logged)."""
        if not self.vmstate.exists():
            return None
        try:
            meta = orjson.loads(self.meta.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            self.discard_snapshot("its record is missing or unreadable")
            return None
        if meta.get("fingerprint") != self.fingerprint() or not isinstance(meta.get("argv"), list):
            self.discard_snapshot("it was made with another QEMU, guest or machine configuration")
            return None
        return meta

    def discard_snapshot(self, why: str) -> None:
        if self.vmstate.exists():
            log.warning("service %s: discarding snapshot %s: %s", self.name, self.vmstate, why)
        for path in (self.meta, self.vmstate):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        self.snapshot_bytes = 0

    # ---- the process ----

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def snapshot_stats(self) -> SnapshotStats:
        return SnapshotStats(self.boots, self.snapshot_bytes, self.saves, self.save_seconds)

    def describe(self) -> dict:
        """The admin API's view: the QEMU pid and the snapshot's state."""
        return {
            "pid": self.proc.pid if self.running else None,
            "microvm": {
                "policy": self.policy,
                "boots": dict(self.boots),
                "last_wake_kind": self.last_wake_kind,
                "snapshot": str(self.vmstate) if self.snapshot_bytes else None,
                "snapshot_bytes": self.snapshot_bytes,
                "last_save_ms": None if self.last_save_seconds is None else round(self.last_save_seconds * 1e3, 3),
            },
        }

    def exited(self) -> asyncio.Future:
        """Resolves when the current QEMU exits (at once when there is none)."""
        if self._exited is None:
            self._exited = asyncio.get_running_loop().create_future()
            if self.proc is None:
                self._exited.set_result(None)
        return self._exited

    def _qemu_said(self) -> str:
        try:
            text = self.stderr_log.read_text(errors="replace").strip()
        except OSError:
            return ""
        return text[-STDERR_TAIL:].replace("\n", " | ")

    def _exit_reason(self) -> str:
        code = self.proc.poll() if self.proc is not None else None
        said = self._qemu_said()
        return f"QEMU exited with status {code}" + (f": {said}" if said else "")

    async def _launch(self, argv: list[str], incoming_fd: int | None = None) -> None:
        """Start QEMU with argv plus a QMP channel (and -incoming); connect QMP."""
        Path(self.vm.snapshot_dir).mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.fileno()]
        extra = ["-chardev", f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control",
                 "-serial", f"file:{self.serial_log}"]
        if incoming_fd is not None:
            fds.append(incoming_fd)
            extra += ["-incoming", f"fd:{incoming_fd}"]
        try:
            with open(self.stderr_log, "wb") as stderr:
                self.proc = proc = subprocess.Popen(
                    [*self._launcher, *argv, *extra], pass_fds=fds, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                )
        except OSError as exc:
            ours.close()
            raise RuntimeError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
        finally:
            theirs.close()
        self.paused = False
        self.argv = argv
        loop = asyncio.get_running_loop()
        self._exited = exited = loop.create_future()
        watch_exit(proc, exited, loop)
        log.info("service %s: QEMU pid %d started%s", self.name, proc.pid,
                 " (restoring a snapshot)" if incoming_fd is not None else "")
        try:
            self.qmp = await QMP.from_socket(ours)
        except QMPError as exc:
            ours.close()
            try:  # QEMU closing the channel usually means it is exiting: say why it did
                await asyncio.wait_for(asyncio.shield(exited), EXIT_WAIT)
            except asyncio.TimeoutError:
                raise exc from None
            raise RuntimeError(self._exit_reason()) from None

    async def _restore(self, meta: dict, deadline: float) -> None:
        """A new QEMU loads the snapshot (-incoming fd: no shell, no pipe copy), then cont."""
        fd = os.open(self.vmstate, os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                await self._launch(meta["argv"], incoming_fd=fd)
            except RuntimeError as exc:
                raise RestoreFailed(str(exc)) from None
        finally:
            os.close(fd)
        qmp = self.qmp
        try:
            while True:
                status = (await qmp.execute("query-status"))["status"]
                if status in ("paused", "running"):
                    break
                if status != "inmigrate":
                    raise RestoreFailed(f"QEMU is {status!r} after loading the snapshot")
                if time.monotonic() > deadline:
                    raise TimeoutError("the snapshot did not load before the wake deadline")
                await asyncio.sleep(LOAD_POLL)
            if status == "paused":
                await qmp.execute("cont")
        except QMPError:
            if self.running:
                raise
            raise RestoreFailed(self._exit_reason()) from None

    async def _save(self, keep_running: bool) -> dict:
        """Stop the VM, write its state to the snapshot file, then cont or quit. The record is written
        last, so a half-written snapshot is never used."""
        qmp = self.qmp
        started = time.monotonic()
        partial = self.vmstate.with_name(self.vmstate.name + ".partial")
        await qmp.execute("stop")
        try:
            await qmp.execute("migrate-set-parameters", {"max-bandwidth": MIGRATE_BANDWIDTH})
            # QEMU 7.2 has no file: migration (DESIGN.md): exec: hands the stream to cat.
            await qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(partial))}"})
            while True:
                info = await qmp.execute("query-migrate")
                status = info.get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    raise RuntimeError(f"snapshot failed: {info.get('error-desc', status)}")
                if time.monotonic() - started > SAVE_TIMEOUT:
                    await qmp.execute("migrate_cancel")
                    raise RuntimeError(f"snapshot not written after {SAVE_TIMEOUT:.0f}s")
                await asyncio.sleep(SAVE_POLL)
        except BaseException:
            try:
                partial.unlink()
            except FileNotFoundError:
                pass
            if keep_running and self.running:
                await qmp.execute("cont")
            raise
        seconds = time.monotonic() - started
        size = partial.stat().st_size
        meta = {"fingerprint": self.fingerprint(), "argv": self.argv,
                "created": time.time(), "policy": self.policy, "bytes": size, "save_seconds": round(seconds, 4)}
        try:
            self.meta.unlink()
        except FileNotFoundError:
            pass
        partial.replace(self.vmstate)
        tmp_meta = self.meta.with_name(self.meta.name + ".partial")
        tmp_meta.write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
        tmp_meta.replace(self.meta)
        self.snapshot_bytes = size
        self.last_save_seconds = seconds
        self.save_seconds.observe(seconds)
        self.saves += 1
        log.info("service %s: snapshot written: %s, %.1f MB in %.3fs", self.name, self.vmstate, size / 1e6, seconds)
        if keep_running:
            await qmp.execute("cont")  # QEMU allows cont after a completed migration (postmigrate)
        else:
            await self._quit()
        return {**meta, "path": str(self.vmstate)}

    async def _quit(self) -> None:
        """Ask QEMU to exit over QMP; if it does not answer (hung), or does not exit, signal it."""
        proc = self.proc
        if proc is None:
            return
        answered = False
        if self.qmp is not None and proc.poll() is None:
            try:
                await self.qmp.quit(timeout=QUIT_TIMEOUT)
                answered = True
            except QMPError:
                pass
        exited = self.exited()
        steps = ((None, QUIT_GRACE),) if answered else ()
        for sig, wait in steps + ((signal.SIGTERM, 1.0), (signal.SIGKILL, None)):
            if proc.poll() is not None:
                break
            if sig is not None:
                if sig == signal.SIGKILL or answered:
                    log.warning("service %s: QEMU pid %d did not exit; sending %s", self.name, proc.pid, sig.name)
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
            try:
                await asyncio.wait_for(asyncio.shield(exited), wait)
                break
            except asyncio.TimeoutError:
                pass
        if self.qmp is not None:
            await self.qmp.close()
            self.qmp = None
        self.paused = False

    # ---- what Service asks ----

    async def wake(self, deadline: float) -> None:
        await self._stop.wait()  # the last QEMU still holds the forwarded port
        started = time.monotonic()
        first_attempt = ATTEMPT_FIRST
        if self.running:
            kind = "cont"
            if self.paused:
                await self.qmp.execute("cont")
                self.paused = False
        else:
            kind = "cold"
            meta = self.usable_snapshot()
            if meta is not None:
                try:
                    await self._restore(meta, deadline)
                    kind = "restore"
                    first_attempt = RESTORE_FIRST_ATTEMPT
                except RestoreFailed as exc:
                    log.warning("service %s: restore failed (%s); booting instead", self.name, exc)
                    await self.stop()
                    self.discard_snapshot("QEMU could not restore it")
            if kind == "cold":
                await self._launch(self.machine_args())
        resumed = time.monotonic()
        self.last_resume_seconds = resumed - started
        await self._until_ready(deadline, first_attempt)
        if kind == "cold" and self.mode == "snapshot" and self.policy == "prepared":
            await warm_up(self.name, self.host, self.port, self.vm.warmup)
            try:
                await self._save(keep_running=True)
            except RuntimeError as exc:
                log.warning("service %s: prepared snapshot not taken: %s", self.name, exc)
        self.last_ready_seconds = time.monotonic() - resumed
        self.last_wake_kind = kind
        self.boots[kind] += 1

    async def _until_ready(self, deadline: float, first_attempt: float) -> None:
        """Probe the guest until it answers; if QEMU exits meanwhile, say why it did."""
        try:
            await probe_until_ready(self.host, self.port, self.ready_path, deadline, self.exited(), first_attempt)
        except NotReady as exc:
            if self.proc is not None and self.proc.poll() is not None:
                raise NotReady(f"{self._exit_reason()} before the guest answered", exc.timed_out) from None
            raise

    async def sleep(self) -> None:
        if not self.running:
            return
        if self.mode == "pause":
            await self.qmp.execute("stop")
            self.paused = True
        elif self.policy == "prepared" and self.usable_snapshot() is not None:
            await self._quit()  # stateless: every wake restores the prepared snapshot
        else:
            await self._save(keep_running=False)

    async def prepare(self, deadline: float) -> dict:
        """``wakegate snapshot NAME``: cold boot, wait until ready, warm up, snapshot, quit."""
        await self._launch(self.machine_args())
        await self._until_ready(deadline, ATTEMPT_FIRST)
        await warm_up(self.name, self.host, self.port, self.vm.warmup)
        return await self._save(keep_running=False)

    async def stop(self) -> None:
        """QEMU exits (quit, then signals); concurrent callers wait for the same stop."""
        await self._stop.run(self._quit)
