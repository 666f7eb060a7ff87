"""Process snapshots with CRIU: a command service that sleeps as an image on disk and wakes restored.

The service runs as the init of its own PID namespace (``unshare --pid --fork --kill-child``, then
``setsid``), so a restore recreates its PIDs inside a new namespace and never collides with a
host process that took the old ones, nor with another service. It keeps the host's network: its
listening socket comes back on its own port. ``prepared``: after the first cold start, once it
answers ``ready_path`` and the ``warmup`` requests are done, it is dumped once (``--leave-running``)
and every wake restores that image; sleep just ends the process. ``stateful``: every sleep dumps,
every wake restores the latest image. A restore runs under ``criu restore`` without ``-d``: CRIU
stays the service's parent, and the service's parent-death signal (set by unshare, kept in the
image) ends it when CRIU ends, which ends when wakegate does (``setpriv --pdeathsig``).

An image records what it was made from (command, cwd, environment, and the size and time of the
executable and of every argument that is a file); a changed service is cold-started and
re-snapshotted. A dump that fails (an established connection, a file that went away) or a restore
that fails falls back to a cold start in the same wake, with CRIU's reason in the log.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import orjson

from proxy.metrics import Histogram

from .backends import PDEATHSIG, SharedStop, choose_freezer, process_tree, watch_exit
from .readiness import ATTEMPT_FIRST, probe_until_ready, warm_up
from .service import SnapshotStats, record_start
from .snapfiles import files_under, footprint

log = logging.getLogger("wakegate.criu")

CRIU_MIN_VERSION = (4, 2)  # 3.17 (Debian 12) cannot dump on these kernels; 4.1 fails on TCP sockets on 6.16+
CRIU_CACHE = Path(os.environ.get("WAKEGATE_CACHE", "/var/cache/wakegate"))  # where deploy/criu.sh puts it
CRIU_RUNDIR = Path("/dev/shm/wakegate-criu")  # its kernel-feature cache, on a tmpfs (built in by deploy/criu.sh)
CRIU_TIMEOUT = 60.0  # a dump or a restore that takes longer is killed (a hung wake is worse than a cold one)
SERVICE_PID_WAIT = 2.0  # the service's pid must show up this soon after unshare starts (a restore: CRIU_TIMEOUT)
RESTORE_BASE_SECONDS = 2.0  # a restore's budget: this, plus the image read at RESTORE_BYTES_PER_SECOND
RESTORE_BYTES_PER_SECOND = 100e6  # a slow disk; restores here read 13 MB in well under 20 ms
# A restored tree joins its cgroup this long after it answered, in a worker thread: the move would
# otherwise stall the first requests' thread starts (a cgroup move waits for an RCU grace period).
ENROLL_DELAY = 0.5
IMAGE_FORMAT = 1


def from_config(svc, instance: str = "default") -> "CriuProcessBackend":
    """controller.BACKENDS: a command service with sleep = "snapshot"."""
    return CriuProcessBackend(svc.name, list(svc.command), cwd=svc.cwd, env=svc.env, policy=svc.snapshot_policy,
                              host=svc.upstream.host, port=svc.upstream.port, ready_path=svc.ready_path,
                              ready_timeout=svc.wake_timeout, snapshot_dir=svc.criu.snapshot_dir,
                              warmup=svc.criu.warmup, criu=svc.criu.binary, instance=instance)


class CriuError(RuntimeError):
    """A dump or restore that did not work; the message has CRIU's own last error line."""


def criu_version(binary: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"Version:\s*([0-9]+)\.([0-9]+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def find_criu(configured: str = "") -> tuple[str | None, str]:
    """A CRIU new enough, and if there is none, why: (path, "") or (None, the reason)."""
    candidates = [configured] if configured else (
        sorted((str(p) for p in CRIU_CACHE.glob("criu-*/criu")), reverse=True) + [shutil.which("criu") or ""])
    why = "no criu found (`make criu` builds one into " + str(CRIU_CACHE) + ")"
    for candidate in filter(None, candidates):
        version = criu_version(candidate)
        if version is None:
            why = f"{candidate} does not run (`make criu` builds one into {CRIU_CACHE})"
            continue
        if version < CRIU_MIN_VERSION:
            why = (f"{candidate} is CRIU {'.'.join(map(str, version))}, older than "
                   f"{'.'.join(map(str, CRIU_MIN_VERSION))}, which these kernels need (`make criu` builds one)")
            continue
        return candidate, ""
    return None, why


def _last_error(logfile: Path) -> str:
    try:
        lines = logfile.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    errors = [line for line in lines if "Error" in line and "RLIMIT_NOFILE" not in line]
    return (errors[-1] if errors else (lines[-1] if lines else "no log")).strip()


class CriuProcessBackend:
    """A command service that sleeps as a CRIU image (the Backend protocol of controller/service.py)."""

    started_elsewhere = None  # Service sets it; this backend never calls it

    mode = "snapshot"
    keeps_connections = False  # the process ends at every sleep

    def __init__(self, name: str, command: list[str], *, cwd: str | None, env: dict[str, str] | None,
                 policy: str, host: str, port: int, ready_path: str, ready_timeout: float, snapshot_dir: str,
                 warmup: tuple[str, ...] = (), criu: str = "", instance: str = "default") -> None:
        self.name = name
        self.command = command
        self.cwd = cwd
        self.env = env
        self.policy = policy  # "prepared" or "stateful"
        self.host = host
        self.port = port
        self.ready_path = ready_path
        self.ready_timeout = ready_timeout
        self.warmup = warmup
        self.criu, why = find_criu(criu)
        if self.criu is None:
            raise CriuError(why)
        folder = Path(snapshot_dir)
        self.image = folder / f"{name}.criu"  # the image directory
        self.meta = folder / f"{name}.criu.json"  # what made it
        # The service's stdout and stderr. Not wakegate's: CRIU checks the size of every regular file
        # an image has open, and a shared log grows; a restore is handed this file anew (--inherit-fd).
        self.logfile = folder / f"{name}.log"
        self.pools: list = []
        # Everything the service runs, CRIU's restorer included, lives in a cgroup of its own when the
        # host has one: a restore that hangs or fails half-way is then killed whole, and a later
        # wakegate of this instance finds whatever is left (backends.reap_leftovers).
        self.group = choose_freezer(name, instance=instance)
        self.proc: subprocess.Popen | None = None  # our child: unshare (cold) or criu restore
        self.pid: int | None = None  # the service itself (init of its PID namespace), host pid
        self._enroll_timer: asyncio.TimerHandle | None = None
        self._enrolling: asyncio.Future | None = None  # a restored tree moving into the group
        self._exited: asyncio.Future | None = None
        self._stop = SharedStop()
        self.last_resume_seconds: float | None = None
        self.last_ready_seconds: float | None = None
        self.last_wake_kind: str | None = None
        self.boots = {"cold": 0, "restore": 0}
        self.phases: dict = {}  # (kind, phase) -> Histogram: SnapshotStats.phases
        self.saves = 0
        self.save_seconds = Histogram()
        self.last_dump_seconds: float | None = None
        self.snapshot_bytes = self._image_bytes()

    # ---- what the image depends on ----

    def fingerprint(self) -> str:
        """The command, its cwd and environment, and the size and time of the executable and of every
        argument that is a file: a changed service never restores stale code."""
        files = []
        for arg in [self._program(), *self.command[1:]]:
            path = arg if os.path.isabs(arg) or self.cwd is None else os.path.join(self.cwd, arg)
            try:
                st = os.stat(path)
                files.append([arg, st.st_size, st.st_mtime_ns])
            except OSError:
                continue
        parts = {"format": IMAGE_FORMAT, "command": self.command, "cwd": self.cwd, "env": self.env or {},
                 "files": files, "port": self.port}
        return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def _image_bytes(self) -> int:
        if not self.image.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.image.iterdir() if p.is_file())

    def usable_image(self) -> bool:
        if not self.image.is_dir():
            return False
        try:
            meta = orjson.loads(self.meta.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            self.discard_image("its record is missing or unreadable")
            return False
        if meta.get("fingerprint") != self.fingerprint():
            self.discard_image("the command, its environment or its files changed since it was made")
            return False
        return True

    def discard_image(self, why: str) -> None:
        if self.image.exists():
            log.warning("service %s: discarding snapshot %s: %s", self.name, self.image, why)
        shutil.rmtree(self.image, ignore_errors=True)
        self.meta.unlink(missing_ok=True)
        self.snapshot_bytes = 0

    # ---- the process ----

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and not self._stop.under_way

    def exited(self) -> asyncio.Future:
        if self._exited is None:
            self._exited = asyncio.get_running_loop().create_future()
            if self.proc is None:
                self._exited.set_result(None)
        return self._exited

    def snapshot_stats(self) -> SnapshotStats:
        _, resident = footprint(files_under(self.image))
        return SnapshotStats(self.boots, self.snapshot_bytes, self.saves, self.save_seconds, resident, self.phases)

    async def close(self) -> None:
        """Nothing outlives the service."""

    def prepare_next_wake(self) -> None:
        """Nothing to start ahead: a restore is one CRIU run."""

    def describe(self) -> dict:
        return {
            "pid": self.pid if self.running else None,
            "snapshot": {
                "policy": self.policy,
                "boots": dict(self.boots),
                "last_wake_kind": self.last_wake_kind,
                "image": str(self.image) if self.snapshot_bytes else None,
                "image_bytes": self.snapshot_bytes,
                "image_resident_bytes": footprint(files_under(self.image)).resident_bytes,
                "last_dump_ms": None if self.last_dump_seconds is None else round(self.last_dump_seconds * 1e3, 3),
            },
        }

    def _spawn(self, argv: list[str], restore: bool = False) -> None:
        """Start argv (unshare, or criu restore) with the service's log as stdout and stderr."""
        env = {**os.environ, **self.env} if self.env is not None else None
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(self.logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if restore:  # the image's open log is this descriptor, whatever size the file has now
                argv = argv + ["--inherit-fd", f"fd[{log_fd}]:{str(self.logfile.resolve()).lstrip('/')}"]
            if not restore:
                argv = self.group.launcher(argv)  # in the service's group before anything is forked
            # A restore starts outside the group: CRIU run by a process that has just joined a cgroup
            # restores ~13 ms slower here (bench wake: 29 ms against 16 ms by hand). The restored tree
            # joins it once it answers (_enroll_later); until then killing CRIU's children ends it.
            self.proc = proc = subprocess.Popen(PDEATHSIG + argv, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL,
                                                stdout=log_fd, stderr=log_fd, pass_fds=(log_fd,),
                                                start_new_session=True)
        finally:
            os.close(log_fd)
        loop = asyncio.get_running_loop()
        self._exited = exited = loop.create_future()
        watch_exit(proc, exited, loop, lambda code: self.group.remove() if self.proc is proc else None)

    async def _service_pid(self, pidfile: Path | None, wait: float = SERVICE_PID_WAIT) -> int:
        """The service's host pid: the child of unshare, or what criu restore wrote."""
        proc = self.proc
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if pidfile is not None:
                    text = pidfile.read_text().strip()
                else:
                    text = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0]
                if text:
                    return int(text)
            except (OSError, IndexError, ValueError):
                pass
            await asyncio.sleep(0.0005)
        code = proc.poll()
        raise CriuError(f"the service's process did not start within {wait:g}s" if code is None
                        else f"the service's process did not start (exit status {code})")

    def _program(self) -> str:
        """The command's executable, as PATH (the service's own, if its env sets one) finds it."""
        return shutil.which(self.command[0], path=(self.env or os.environ).get("PATH")) or self.command[0]

    async def _cold_start(self) -> None:
        # init of its own PID namespace, and a session leader inside it (CRIU dumps whole sessions)
        self._spawn(["unshare", "--pid", "--fork", "--kill-child", "--", "setsid", self._program(),
                     *self.command[1:]])
        self.pid = await self._service_pid(None)
        log.info("service %s: cold start, pid %d: %s", self.name, self.pid, " ".join(self.command))

    async def _restore(self, deadline: float) -> None:
        CRIU_RUNDIR.mkdir(parents=True, exist_ok=True)
        pidfile = self.image / "restored.pid"
        pidfile.unlink(missing_ok=True)
        # --manage-cgroups=ignore: the restored tree stays in the cgroup CRIU was started in (the
        # service's own), and CRIU mounts no cgroup yard of its own that a killed restore would leave.
        self._spawn([self.criu, "restore", "-D", str(self.image), "--pidfile", str(pidfile), "-o", "restore.log",
                     "--tcp-close", "--manage-cgroups=ignore"], restore=True)
        self.pid = None
        # A restore that hangs (a damaged image can) gets a budget that grows with the image and
        # leaves half of the wake's time for the cold start that follows a failure.
        budget = min(RESTORE_BASE_SECONDS + self.snapshot_bytes / RESTORE_BYTES_PER_SECOND,
                     (deadline - time.monotonic()) / 2, CRIU_TIMEOUT)
        try:
            self.pid = await self._service_pid(pidfile, max(0.1, budget))
        except CriuError as exc:
            await self._stop.run(lambda: self._kill(self.proc))  # a restore stuck half-way: all of it
            why = _last_error(self.image / "restore.log")
            try:  # kept beside the service's log: the image goes, CRIU's account of it stays
                shutil.copyfile(self.image / "restore.log", self.logfile.with_suffix(".restore.log"))
            except OSError:
                pass
            raise CriuError(f"restore failed: {why if 'RLIMIT' not in why else exc}") from None

    async def dump(self, leave_running: bool) -> None:
        """Write the image (to a new directory, renamed into place only when complete)."""
        if self.pid is None or not self.running:
            raise CriuError("nothing to dump: the service is not running")
        CRIU_RUNDIR.mkdir(parents=True, exist_ok=True)
        partial = self.image.with_name(self.image.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        # --tcp-close: established connections (wakegate's own pooled ones, on a threaded server that
        # has not noticed their close yet) are not kept; the restored service sees them closed.
        argv = [self.criu, "dump", "-t", str(self.pid), "-D", str(partial), "-o", "dump.log", "--tcp-close",
                "--manage-cgroups=ignore"]
        if leave_running:
            argv.append("--leave-running")
        started = time.monotonic()
        dumper = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                      stderr=subprocess.DEVNULL)
        try:
            code = await asyncio.wait_for(dumper.wait(), CRIU_TIMEOUT)
        except asyncio.TimeoutError:
            dumper.kill()
            await dumper.wait()
            code = -1
        if code != 0:
            why = _last_error(partial / "dump.log")
            shutil.rmtree(partial, ignore_errors=True)
            raise CriuError(f"dump failed: {why}")
        self.last_dump_seconds = time.monotonic() - started
        self.save_seconds.observe(self.last_dump_seconds)
        self.saves += 1
        shutil.rmtree(self.image, ignore_errors=True)
        partial.rename(self.image)
        self.meta.write_bytes(orjson.dumps({"fingerprint": self.fingerprint(), "command": self.command,
                                            "created": time.time(), "policy": self.policy}))
        self.snapshot_bytes = self._image_bytes()
        log.info("service %s: snapshot %s, %.1f MB in %.1f ms", self.name, self.image, self.snapshot_bytes / 1e6,
                 self.last_dump_seconds * 1e3)

    # ---- what Service asks ----

    async def wake(self, deadline: float) -> None:
        await self._stop.wait()  # the last process must be gone: it holds the port
        started = time.monotonic()
        kind = "cold"
        if self.usable_image():
            try:
                await self._restore(deadline)
                kind = "restore"
            except CriuError as exc:
                log.warning("service %s: %s; cold start instead", self.name, exc)
                self.discard_image("CRIU could not restore it")
        if kind == "cold":
            await self._cold_start()
        resumed = time.monotonic()
        self.last_resume_seconds = resumed - started
        try:
            await probe_until_ready(self.host, self.port, self.ready_path, deadline, self.exited(), ATTEMPT_FIRST)
        except Exception:
            if kind == "restore":  # it came back, but does not answer: never trust that image again
                self.discard_image("the restored service did not answer")
            raise
        if kind == "restore":
            self._enroll_later()
        if kind == "cold" and self.policy == "prepared":
            await warm_up(self.name, self.host, self.port, self.warmup)
            try:
                await self.dump(leave_running=True)
            except CriuError as exc:
                log.warning("service %s: prepared snapshot not taken (%s); it will cold-start", self.name, exc)
        self.last_ready_seconds = time.monotonic() - resumed
        self.last_wake_kind = kind
        self.boots[kind] += 1
        record_start(self.phases, kind, self.last_resume_seconds, self.last_ready_seconds)

    async def sleep(self) -> None:
        if not self.running:
            return
        if self.policy == "prepared" and self.usable_image():
            await self.stop()  # the prepared image serves every wake: nothing to keep
            return
        for pool in self.pools:  # pooled connections would be established sockets CRIU cannot dump
            await pool.drop_idle()
        try:
            await self.dump(leave_running=False)
        except CriuError as exc:
            log.warning("service %s: %s; stopping it, the next wake is a cold start", self.name, exc)
            self.discard_image("the last dump failed: it would restore older state")
        await self.stop()

    async def prepare(self, deadline: float) -> dict:
        """``wakegate snapshot NAME``: cold start, wait until ready, warm up, dump, end the process."""
        await self._cold_start()
        await probe_until_ready(self.host, self.port, self.ready_path, deadline, self.exited(), ATTEMPT_FIRST)
        await warm_up(self.name, self.host, self.port, self.warmup)
        await self.dump(leave_running=False)
        return {"path": str(self.image), "bytes": self.snapshot_bytes, "save_seconds": self.last_dump_seconds}

    def _kill(self, proc: subprocess.Popen | None):
        if proc is None or proc.poll() is not None:
            return None

        async def kill() -> None:
            # The service is the init of its PID namespace: SIGTERM without a handler never reaches
            # it, so it gets SIGKILL, and everything in its namespace dies with it; its cgroup (or
            # process group) is emptied too, and CRIU's children are killed, which catches a restore
            # stuck half-way or one not yet in the group.
            await self._settle_enroll()
            for pid in [self.pid, *process_tree(proc.pid)[1:], proc.pid]:
                try:
                    if pid:
                        os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.group.kill_rest(proc.pid)
            await asyncio.shield(self.exited())
            self.group.remove()

        return kill()

    def _enroll_later(self) -> None:
        """Put the restored tree (and CRIU, its parent) into the service's group, off the loop and
        after the first answers: a cgroup move stalls the tree's forks while it waits."""
        proc, pid = self.proc, self.pid

        def enroll() -> None:
            if self.proc is proc and proc.poll() is None:
                self._enrolling = asyncio.get_running_loop().run_in_executor(
                    None, self.group.enroll, [proc.pid, *process_tree(pid)])

        self._enroll_timer = asyncio.get_running_loop().call_later(ENROLL_DELAY, enroll)

    async def _settle_enroll(self) -> None:
        if self._enroll_timer is not None:
            self._enroll_timer.cancel()
            self._enroll_timer = None
        if self._enrolling is not None:
            enrolling, self._enrolling = self._enrolling, None
            await asyncio.shield(enrolling)

    async def stop(self) -> None:
        proc = self.proc
        await self._stop.run(lambda: self._kill(proc))
