"""A service that runs in a QEMU microVM, driven over QMP (controller/qmp.py).

``MicroVMBackend`` sleeps by pausing the vCPUs (``pause``: QMP stop, memory kept) or as a snapshot
(``snapshot``: no QEMU while asleep, or only a standby one). By default the guest RAM is a file: a
snapshot is that file plus the device state saved with ``x-ignore-shared`` (tens of KB), and a
restore maps the file copy-on-write, so nothing is copied and a prepared snapshot is never changed
(docs/snapshots.md). A wake restores into a QEMU that was started ahead of time and waits with
``-incoming defer`` (the standby), or into a new one; without a usable snapshot it boots cold.
Every QMP call is bounded in time, and every QEMU is started so that it dies with wakegate.
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
from dataclasses import dataclass
from pathlib import Path

import orjson

from proxy.metrics import Histogram

from .backends import SharedStop, watch_exit
from .guest import host_khz
from .qmp import QMP, QMPError
from .readiness import ATTEMPT_FIRST, ATTEMPT_MAX, NotReady, probe_until_ready, warm_up
from .service import SnapshotStats, record_start
from .snapfiles import footprint

log = logging.getLogger("wakegate.microvm")

# Kernel command line: DESIGN.md's pitfalls. Without tsc_early_khz about 1 boot in 5 hangs under TCG
# calibrating the TSC; init_on_free zeroes freed pages so that snapshots of them are small.
KERNEL_ARGS = "console=ttyS0 panic=-1 quiet tsc_early_khz={khz} tsc=reliable init_on_free=1"
MIGRATE_BANDWIDTH = 10 * 1024**3  # bytes/s; QEMU's default (32 MiB/s) makes saving 128 MB take seconds
LOAD_POLL = 0.0005  # query-status while a snapshot loads: the device state loads in ~2 ms
SAVE_POLL = 0.002  # query-migrate while a snapshot is written
SAVE_TIMEOUT = 60.0  # writing a snapshot; DESIGN.md saw 0.1 s for a 128 MB guest
QUIT_TIMEOUT = 1.0  # QMP quit gets this long to be answered; then signals
QUIT_GRACE = 5.0  # after quit or SIGTERM, QEMU gets this long before SIGKILL (ProcessBackend's STOP_GRACE)
# A restored guest may take ~100-200 ms to answer its first connection under TCG (translating the
# guest's network path afresh); a shorter attempt would only be abandoned and start that wait again.
RESTORE_FIRST_ATTEMPT = ATTEMPT_MAX
SNAPSHOT_FORMAT = 1  # bump when the machine a snapshot needs changes incompatibly (not the file layout)
LAYOUT_RAM_FILE = "ram-file"  # <name>.ram (guest RAM) + <name>.vmstate (device state only)
LAYOUT_STREAM = "stream"  # <name>.vmstate is one full migration stream; records without "layout" are this
# The id QEMU gives the microvm machine's own RAM backend. Naming our file backend the same keeps
# the RAM block's name, so a stream saved from anonymous RAM loads into a file (conversion).
RAM_ID = "microvm.ram"
EXIT_WAIT = 1.0  # after QEMU closes QMP at start-up, how long to wait for its exit status
STDERR_TAIL = 400  # characters of QEMU's stderr quoted when it fails


@dataclass
class _Qemu:
    """One QEMU process and its QMP channel."""

    proc: subprocess.Popen
    qmp: QMP
    exited: asyncio.Future
    argv: list[str]  # the machine arguments (what a snapshot records)
    ram_file: Path | None  # the file its RAM is shared with (None: anonymous or copy-on-write)
    incoming_fd: int | None = None  # the snapshot's descriptor number inside QEMU (-incoming defer)
    snapshot_id: float | None = None  # a standby's snapshot ("created" of its record)


def from_config(svc, instance: str = "default") -> "MicroVMBackend":
    """controller.BACKENDS: a service with a [services.NAME.microvm] table."""
    return MicroVMBackend(svc.name, svc.microvm, mode=svc.sleep, policy=svc.snapshot_policy,
                          host=svc.upstream.host, port=svc.upstream.port, ready_path=svc.ready_path,
                          ready_timeout=svc.wake_timeout)


class RestoreFailed(Exception):
    """QEMU could not load the snapshot (it exited or refused); a cold boot can still serve."""


class MicroVMBackend:
    """One service's QEMU microVM: boot, pause, snapshot and restore, as ``Service`` asks."""

    started_elsewhere = None  # Service sets it; this backend never calls it

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
        # A paused VM keeps its memory anyway: only snapshots put the RAM in a file.
        self.layout = vm.snapshot_format if mode == "snapshot" else LAYOUT_STREAM
        self.use_standby = vm.standby and mode == "snapshot"
        self.pools: list = []
        folder = Path(vm.snapshot_dir)
        self.vmstate = folder / f"{name}.vmstate"  # device state (ram-file) or the whole VM (stream)
        self.ram = folder / f"{name}.ram"  # ram-file: the snapshot's guest RAM, mapped by restores
        self.live_ram = folder / f"{name}.ram.live"  # the RAM of a VM that owns its file (cold boot, stateful)
        self.meta = folder / f"{name}.json"  # what made it: fingerprint, QEMU arguments, layout, size
        self.serial_log = folder / f"{name}.serial.log"  # the guest console of the last launch
        self.stderr_log = folder / f"{name}.qemu.log"  # QEMU's own messages of the last launch
        self.vmm: _Qemu | None = None  # the QEMU running the service
        self.standby: _Qemu | None = None  # a QEMU waiting with the snapshot mapped (-incoming defer)
        self._standby_task: asyncio.Task | None = None
        self._no_vmm: asyncio.Future | None = None
        self.paused = False
        self._stop = SharedStop()
        self.last_resume_seconds: float | None = None  # wake decision to the vCPUs running
        self.last_ready_seconds: float | None = None  # then to the guest answering
        self.last_save_seconds: float | None = None
        self.last_wake_kind: str | None = None
        self.boots = {"cold": 0, "restore": 0, "cont": 0}
        self.standby_restores = 0  # restores that found a standby QEMU waiting
        self.phases: dict = {}  # (kind, phase) -> Histogram: SnapshotStats.phases
        self.saves = 0
        self.save_seconds = Histogram()
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

    def machine_args(self, layout: str | None = None) -> list[str]:
        """QEMU's arguments that define the machine; a snapshot records them and reuses them exactly.
        The RAM file itself is added per launch (_memory_args): shared or copy-on-write."""
        vm = self.vm
        append = KERNEL_ARGS.format(khz=host_khz()) + (" " + vm.cmdline if vm.cmdline else "")
        machine = f"microvm,memory-backend={RAM_ID}" if (layout or self.layout) == LAYOUT_RAM_FILE else "microvm"
        args = [vm.qemu, "-name", f"wakegate-{self.name}", "-M", machine, "-accel", vm.accel,
                "-m", str(vm.memory_mb), "-smp", str(vm.cpus), "-nodefaults", "-no-user-config",
                "-display", "none", "-no-reboot",
                "-netdev", f"user,id=n0,hostfwd=tcp:{self.host}:{self.port}-:{vm.guest_port}",
                "-device", "virtio-net-device,netdev=n0", "-kernel", vm.kernel]
        if vm.initrd:
            args += ["-initrd", vm.initrd]
        return args + ["-append", append]

    def _memory_args(self, path: Path, shared: bool) -> list[str]:
        """The guest RAM as a file: shared (writes reach the file) or private (copy-on-write)."""
        mem_path = str(path).replace(",", ",,")  # QEMU's option syntax doubles a literal comma
        return ["-object", f"memory-backend-file,id={RAM_ID},size={self.vm.memory_mb}M,mem-path={mem_path},"
                f"share={'on' if shared else 'off'}"]

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
        layout = meta.setdefault("layout", LAYOUT_STREAM)  # records before ram-file snapshots have none
        if layout not in (LAYOUT_RAM_FILE, LAYOUT_STREAM):
            self.discard_snapshot(f"its layout {layout!r} is unknown to this wakegate")
            return None
        if layout == LAYOUT_RAM_FILE and not self.ram.exists():
            self.discard_snapshot(f"its RAM file {self.ram} is missing")
            return None
        return meta

    def discard_snapshot(self, why: str) -> None:
        if self.vmstate.exists():
            log.warning("service %s: discarding snapshot %s: %s", self.name, self.vmstate, why)
        for path in (self.meta, self.vmstate, self.ram):
            path.unlink(missing_ok=True)

    def footprint(self):
        """The snapshot's size on disk and in memory (0, 0 without a usable record)."""
        if not self.meta.exists():
            return footprint(())
        return footprint((self.vmstate, self.ram))

    # ---- the process ----

    @property
    def running(self) -> bool:
        return self.vmm is not None and self.vmm.proc.poll() is None

    def snapshot_stats(self) -> SnapshotStats:
        disk, resident = self.footprint()
        return SnapshotStats(self.boots, disk, self.saves, self.save_seconds, resident, self.phases)

    def describe(self) -> dict:
        """The admin API's view: the QEMU pid, the standby's, and the snapshot's state."""
        disk, resident = self.footprint()
        standby = self.standby
        return {
            "pid": self.vmm.proc.pid if self.running else None,
            "microvm": {
                "policy": self.policy,
                "layout": self.layout,
                "boots": dict(self.boots),
                "standby_restores": self.standby_restores,
                "standby_pid": standby.proc.pid if standby is not None and standby.proc.poll() is None else None,
                "last_wake_kind": self.last_wake_kind,
                "snapshot": str(self.vmstate) if disk else None,
                "snapshot_bytes": disk,
                "snapshot_resident_bytes": resident,
                "last_save_ms": None if self.last_save_seconds is None else round(self.last_save_seconds * 1e3, 3),
            },
        }

    def exited(self) -> asyncio.Future:
        """Resolves when the current QEMU exits (at once when there is none)."""
        if self.vmm is not None:
            return self.vmm.exited
        if self._no_vmm is None:
            self._no_vmm = asyncio.get_running_loop().create_future()
            self._no_vmm.set_result(None)
        return self._no_vmm

    def _qemu_said(self) -> str:
        try:
            text = self.stderr_log.read_text(errors="replace").strip()
        except OSError:
            return ""
        return text[-STDERR_TAIL:].replace("\n", " | ")

    def _exit_reason(self, vmm: _Qemu | None = None) -> str:
        vmm = vmm or self.vmm
        code = vmm.proc.poll() if vmm is not None else None
        said = self._qemu_said()
        return f"QEMU exited with status {code}" + (f": {said}" if said else "")

    async def _launch(self, argv: list[str], *, ram: Path | None = None, shared: bool = False,
                      incoming_fd: int | None = None, defer: bool = False) -> _Qemu:
        """Start QEMU with argv, its RAM file if any, a QMP channel, and -incoming (fd:N, or defer:
        the snapshot's descriptor waits open in QEMU for migrate-incoming); connect QMP. A QEMU that
        fails to speak QMP is killed here."""
        Path(self.vm.snapshot_dir).mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.fileno()]
        extra = ["-chardev", f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control",
                 "-serial", f"file:{self.serial_log}"]
        if ram is not None:
            extra += self._memory_args(ram, shared)
        if incoming_fd is not None:
            fds.append(incoming_fd)
            extra += ["-incoming", "defer" if defer else f"fd:{incoming_fd}"]
        try:
            with open(self.stderr_log, "wb") as stderr:
                proc = subprocess.Popen(
                    [*self._launcher, *argv, *extra], pass_fds=fds, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                )
        except OSError as exc:
            ours.close()
            raise RuntimeError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
        finally:
            theirs.close()
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        watch_exit(proc, exited, loop)
        log.info("service %s: QEMU pid %d started%s", self.name, proc.pid,
                 "" if incoming_fd is None else " (waiting for a snapshot)" if defer else " (loading a snapshot)")
        try:
            qmp = await QMP.from_socket(ours)
        except QMPError as exc:
            ours.close()
            try:  # QEMU closing the channel usually means it is exiting: say why it did
                await asyncio.wait_for(asyncio.shield(exited), EXIT_WAIT)
            except asyncio.TimeoutError:
                _kill(proc)
                await exited
                raise RuntimeError(f"QEMU {exc}") from None
            raise RuntimeError(self._exit_reason(_Qemu(proc, None, exited, argv, None))) from None
        return _Qemu(proc, qmp, exited, argv, ram if shared else None, incoming_fd if defer else None)

    async def _boot(self) -> None:
        """A cold boot; a snapshot-mode VM with the ram-file layout gets a fresh RAM file it shares."""
        if self.layout == LAYOUT_RAM_FILE:
            self.live_ram.unlink(missing_ok=True)
            self.vmm = await self._launch(self.machine_args(), ram=self.live_ram, shared=True)
        else:
            self.vmm = await self._launch(self.machine_args())
        self.paused = False

    async def _launch_incoming(self, meta: dict) -> _Qemu:
        """A QEMU for this snapshot, waiting for migrate-incoming: its RAM file mapped (copy-on-write
        for a prepared snapshot, shared for a stateful one, which the VM then owns)."""
        ram_file = meta["layout"] == LAYOUT_RAM_FILE
        fd = os.open(self.vmstate, os.O_RDONLY | os.O_CLOEXEC)
        try:
            vmm = await self._launch(meta["argv"], ram=self.ram if ram_file else None,
                                     shared=self.policy == "stateful", incoming_fd=fd, defer=True)
        except RuntimeError as exc:
            raise RestoreFailed(str(exc)) from None
        finally:
            os.close(fd)  # QEMU has its own copy, under the same number
        vmm.snapshot_id = meta.get("created")
        try:
            # In QEMU 7.2 -global refuses this capability; QMP sets it (both ends must agree).
            await vmm.qmp.execute("migrate-set-capabilities",
                                  {"capabilities": [{"capability": "x-ignore-shared", "state": ram_file}]})
        except QMPError as exc:
            await self._quit(vmm)
            raise RestoreFailed(f"QEMU refused x-ignore-shared: {exc}") from None
        return vmm

    async def _restore(self, meta: dict, deadline: float, vmm: _Qemu | None) -> None:
        """Load the snapshot into vmm (a standby) or a new QEMU, then run it."""
        if vmm is None:
            vmm = await self._launch_incoming(meta)
        self.vmm = vmm
        self.paused = False
        if meta["layout"] == LAYOUT_RAM_FILE and vmm.ram_file is not None:
            # Stateful: this VM now owns the RAM file and will change it, so the snapshot is
            # consumed; a crash from here boots cold rather than restore a half-changed file.
            self.meta.unlink(missing_ok=True)
            self.ram.replace(self.live_ram)
            vmm.ram_file = self.live_ram
        try:
            await vmm.qmp.execute("migrate-incoming", {"uri": f"fd:{vmm.incoming_fd}"})
            await self._until_loaded(vmm, deadline, run=True)
        except QMPError:
            if vmm.proc.poll() is None:
                raise
            raise RestoreFailed(self._exit_reason(vmm)) from None

    async def _until_loaded(self, vmm: _Qemu, deadline: float, run: bool) -> None:
        """Poll until the incoming snapshot is in (QEMU 7.2 sends no event without the events
        capability and its plumbing); then run the VM, or leave it paused."""
        qmp = vmm.qmp
        while True:
            status = (await qmp.execute("query-status"))["status"]
            if status in ("paused", "running"):
                break
            if status != "inmigrate":
                raise RestoreFailed(f"QEMU is {status!r} after loading the snapshot")
            if vmm.proc.poll() is not None:
                raise RestoreFailed(self._exit_reason(vmm))
            if time.monotonic() > deadline:
                raise TimeoutError("the snapshot did not load before the wake deadline")
            await asyncio.sleep(LOAD_POLL)
        if run and status == "paused":
            await qmp.execute("cont")
        elif not run and status == "running":
            await qmp.execute("stop")

    async def _restorable(self, deadline: float) -> dict | None:
        """The usable snapshot, in the configured layout: a stream snapshot (the format before) is
        converted once when the ram-file layout is wanted."""
        meta = self.usable_snapshot()
        if meta is None or meta["layout"] == self.layout or self.layout == LAYOUT_STREAM:
            return meta
        return await self._convert(meta, deadline)

    async def _convert(self, meta: dict, deadline: float) -> dict:
        """Load a stream snapshot into a QEMU whose RAM is a shared file, then save it as ram-file."""
        argv = list(meta["argv"])
        try:
            argv[argv.index("-M") + 1] = f"microvm,memory-backend={RAM_ID}"
        except (ValueError, IndexError):
            raise RestoreFailed("its record names no machine (-M)") from None
        self.live_ram.unlink(missing_ok=True)
        fd = os.open(self.vmstate, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.vmm = await self._launch(argv, ram=self.live_ram, shared=True, incoming_fd=fd)
        except RuntimeError as exc:
            raise RestoreFailed(f"cannot convert the stream snapshot: {exc}") from None
        finally:
            os.close(fd)
        try:
            await self._until_loaded(self.vmm, deadline, run=False)
        except QMPError:
            raise RestoreFailed(f"cannot convert the stream snapshot: {self._exit_reason()}") from None
        meta = await self._save()
        log.info("service %s: converted the stream snapshot to the ram-file layout", self.name)
        return meta

    async def _save(self) -> dict:
        """Stop the VM, write its snapshot, and end QEMU. A VM whose RAM is a shared file writes only
        its device state (x-ignore-shared) and its RAM file becomes the snapshot's; otherwise the
        stream holds everything. The record is written last, so a half-written snapshot is never
        used. On failure the VM runs on (when QMP still answers) and the error is raised."""
        vmm = self.vmm
        qmp = vmm.qmp
        ram_file = vmm.ram_file
        started = time.monotonic()
        partial = self.vmstate.with_name(self.vmstate.name + ".partial")
        await qmp.execute("stop")
        try:
            await qmp.execute("migrate-set-capabilities",
                              {"capabilities": [{"capability": "x-ignore-shared", "state": ram_file is not None}]})
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
        except BaseException as exc:
            partial.unlink(missing_ok=True)
            if self.running and not isinstance(exc, QMPError):
                try:
                    await qmp.execute("cont")
                except QMPError:
                    pass
            raise
        seconds = time.monotonic() - started
        argv = vmm.argv
        await self._quit()  # nothing writes the RAM file any more
        self.meta.unlink(missing_ok=True)
        if ram_file is not None:
            ram_file.replace(self.ram)
        else:
            self.ram.unlink(missing_ok=True)  # a stream replaces a ram-file snapshot whole
        partial.replace(self.vmstate)
        disk, _ = footprint((self.vmstate, self.ram))
        meta = {"fingerprint": self.fingerprint(), "argv": argv,
                "layout": LAYOUT_RAM_FILE if ram_file is not None else LAYOUT_STREAM,
                "created": time.time(), "policy": self.policy, "bytes": disk,
                "device_state_bytes": self.vmstate.stat().st_size, "save_seconds": round(seconds, 4)}
        tmp_meta = self.meta.with_name(self.meta.name + ".partial")
        tmp_meta.write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
        tmp_meta.replace(self.meta)
        self.last_save_seconds = seconds
        self.save_seconds.observe(seconds)
        self.saves += 1
        log.info("service %s: snapshot written (%s): %s, %.1f MB in %.3fs", self.name, meta["layout"],
                 self.vmstate, disk / 1e6, seconds)
        return meta

    async def _quit(self, vmm: _Qemu | None = None) -> None:
        """Ask a QEMU (the service's, by default) to exit over QMP; if it does not answer (hung), or
        does not exit, signal it."""
        if vmm is None:
            vmm, self.vmm = self.vmm, None
            self.paused = False
        if vmm is None:
            return
        proc = vmm.proc
        answered = False
        if vmm.qmp is not None and proc.poll() is None:
            try:
                await vmm.qmp.quit(timeout=QUIT_TIMEOUT)
                answered = True
            except QMPError:
                pass
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
                await asyncio.wait_for(asyncio.shield(vmm.exited), wait)
                break
            except asyncio.TimeoutError:
                pass
        if vmm.qmp is not None:
            await vmm.qmp.close()

    # ---- the standby QEMU ----

    async def close(self) -> None:
        """Nothing outlives the service."""

    def prepare_next_wake(self) -> None:
        """While asleep (the supervisor calls it after each sleep, the controller at start): start a
        standby QEMU in the background, so the next wake only loads the device state (about 3 ms)
        instead of launching QEMU first (about 25 ms)."""
        if not self.use_standby or self.running or self._standby_task is not None:
            return
        self._standby_task = asyncio.get_running_loop().create_task(self._start_standby(),
                                                                      name=f"standby-{self.name}")

    async def _start_standby(self) -> None:
        try:
            meta = await self._restorable(time.monotonic() + SAVE_TIMEOUT)
            standby = self.standby
            if standby is not None and (meta is None or standby.snapshot_id != meta.get("created")
                                        or standby.proc.poll() is not None):
                self.standby = None
                await self._quit(standby)
            if meta is not None and self.standby is None:
                self.standby = await self._launch_incoming(meta)
                log.info("service %s: standby QEMU pid %d waits with the snapshot", self.name,
                         self.standby.proc.pid)
        except Exception as exc:  # a standby is an optimisation: the next wake starts QEMU itself
            await self._quit()  # a conversion cut short
            log.warning("service %s: no standby QEMU: %s", self.name, exc)
        finally:
            self._standby_task = None

    async def _take_standby(self, meta: dict | None) -> _Qemu | None:
        """The standby QEMU if it waits for this very snapshot; any other is ended."""
        if self._standby_task is not None:
            await asyncio.shield(self._standby_task)  # a wake cancelled here leaves it to stop()
        standby, self.standby = self.standby, None
        if standby is None:
            return None
        if meta is None or standby.snapshot_id != meta.get("created") or standby.proc.poll() is not None:
            await self._quit(standby)
            return None
        return standby

    # ---- what Service asks ----

    async def wake(self, deadline: float) -> None:
        await self._stop.wait()  # the last QEMU still holds the forwarded port
        started = time.monotonic()
        first_attempt = ATTEMPT_FIRST
        if self.running:
            kind = "cont"
            if self.paused:
                await self.vmm.qmp.execute("cont")
                self.paused = False
        else:
            kind = "cold"
            if self._standby_task is not None:
                await asyncio.shield(self._standby_task)
            try:
                meta = await self._restorable(deadline)
                standby = await self._take_standby(meta)
                if meta is not None:
                    await self._restore(meta, deadline, standby)
                    kind = "restore"
                    first_attempt = RESTORE_FIRST_ATTEMPT
                    if standby is not None:
                        self.standby_restores += 1
            except RestoreFailed as exc:
                log.warning("service %s: restore failed (%s); booting instead", self.name, exc)
                await self._quit()
                self.discard_snapshot("QEMU could not restore it")
            if kind == "cold":
                await self._boot()
        resumed = time.monotonic()
        self.last_resume_seconds = resumed - started
        await self._until_ready(deadline, first_attempt)
        if kind == "cold" and self.mode == "snapshot" and self.policy == "prepared":
            await self._prepare_after_boot(deadline)
        self.last_ready_seconds = time.monotonic() - resumed
        self.last_wake_kind = kind
        self.boots[kind] += 1
        record_start(self.phases, kind, self.last_resume_seconds, self.last_ready_seconds)

    async def _prepare_after_boot(self, deadline: float) -> None:
        """First boot of a prepared service: warm up, snapshot, and serve from the snapshot, like
        every later wake (the booted VM owns its RAM file, which becomes the snapshot's)."""
        await warm_up(self.name, self.host, self.port, self.vm.warmup)
        try:
            meta = await self._save()
        except RuntimeError as exc:
            log.warning("service %s: prepared snapshot not taken: %s", self.name, exc)
            return  # the booted VM runs on
        try:
            await self._restore(meta, deadline, None)
        except RestoreFailed as exc:
            await self._quit()
            self.discard_snapshot("QEMU could not restore it")
            raise RuntimeError(f"the snapshot just taken does not restore: {exc}") from None
        await self._until_ready(deadline, RESTORE_FIRST_ATTEMPT)

    async def _until_ready(self, deadline: float, first_attempt: float) -> None:
        """Probe the guest until it answers; if QEMU exits meanwhile, say why it did."""
        try:
            await probe_until_ready(self.host, self.port, self.ready_path, deadline, self.exited(), first_attempt)
        except NotReady as exc:
            if self.vmm is not None and self.vmm.proc.poll() is not None:
                raise NotReady(f"{self._exit_reason()} before the guest answered", exc.timed_out) from None
            raise

    async def sleep(self) -> None:
        if not self.running:
            return
        if self.mode == "pause":
            await self.vmm.qmp.execute("stop")
            self.paused = True
            return
        if self.policy == "prepared" and self.usable_snapshot() is not None:
            await self._quit()  # stateless: every wake restores the prepared snapshot
        else:
            await self._save()

    async def prepare(self, deadline: float) -> dict:
        """``wakegate snapshot NAME``: cold boot, wait until ready, warm up, snapshot, quit."""
        await self._boot()
        await self._until_ready(deadline, ATTEMPT_FIRST)
        await warm_up(self.name, self.host, self.port, self.vm.warmup)
        return {**await self._save(), "path": str(self.vmstate)}

    async def stop(self) -> None:
        """QEMU exits (quit, then signals), and the standby too; concurrent callers wait for the same stop."""
        await self._stop.run(self._stop_all)

    async def _stop_all(self) -> None:
        if self._standby_task is not None:
            await asyncio.shield(self._standby_task)
        standby, self.standby = self.standby, None
        if standby is not None:
            await self._quit(standby)
        await self._quit()


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
