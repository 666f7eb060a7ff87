"""Backends that can sleep and wake: a process tree, frozen in place or stopped.

``ProcessBackend`` starts a command in its own process group and its own cgroup under
``wakegate/<instance>/<service>``, freezes it (cgroup v2 ``cgroup.freeze``, cgroup v1
``freezer.state``, SIGSTOP/SIGCONT as the last resort) or terminates it, and reports when it
exits on its own. Every service process dies with wakegate (a parent-death signal), and
``reap_leftovers`` kills what an earlier wakegate of the same instance left behind (its cgroups
and its pid files), so a restart never meets an orphan on its port or a frozen cgroup.
Waking ends with a readiness probe: a real HTTP answer below 500.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .readiness import ATTEMPT_FIRST, probe_pooled, probe_until_ready

log = logging.getLogger("wakegate.backend")

STOP_GRACE = 5.0  # SIGTERM, then SIGKILL after this; Docker's stop timeout is 10 s, Kubernetes' 30 s
FREEZE_POLL = 0.0005  # cgroup v1 reports FREEZING until every task is stopped; poll this often
FREEZE_TIMEOUT = 2.0  # a freeze that takes longer is given up, and the process is stopped instead
REAP_TIMEOUT = 2.0  # leftovers of an earlier wakegate must be gone within this after SIGKILL
CGROUP_ROOT = Path("/sys/fs/cgroup")
EXIT_POLL = 0.05  # without pidfd_open, how often a child is checked for exit
# Service processes get SIGKILL when wakegate dies, however it dies (util-linux setpriv, on every Debian).
PDEATHSIG = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


def instance_name(host: str, port: int) -> str:
    """This wakegate's name on the host: its proxy listener, which no other live wakegate can share,
    and which the same config gets again after a restart."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{host}-{port}")


def runtime_dir(instance: str) -> Path:
    """Where this instance's pid files live (/run/wakegate when root, else the temp dir)."""
    base = Path("/run/wakegate") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir()) / f"wakegate-{os.getuid()}"
    return base / instance


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): a pid and
    its start time name one process, never a later one that reused the pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants now (from /proc/PID/task/TID/children), parents first."""
    tree, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        tree.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                queue += [int(c) for c in Path(f"/proc/{current}/task/{tid}/children").read_text().split()]
            except (OSError, ValueError):
                pass
    return tree


def _cgroup_roots(cgroup_root: Path = CGROUP_ROOT) -> list[Path]:
    """Where wakegate's cgroups can be: the v2 root, the v1 freezer, the v2 half of a hybrid host."""
    return [cgroup_root, cgroup_root / "freezer", cgroup_root / "unified"]


def reap_leftovers(instance: str, cgroup_root: Path = CGROUP_ROOT) -> int:
    """Kill every process an earlier wakegate of this instance left behind; the number killed.

    Its cgroups are thawed, emptied with SIGKILL and removed; its pid files name process groups
    that are killed if the recorded process is still the same one (pid and start time).
    """
    killed = 0
    for root in _cgroup_roots(cgroup_root):
        base = root / "wakegate" / instance
        if not base.is_dir():
            continue
        for group in sorted(p for p in base.iterdir() if p.is_dir()):
            killed += _empty_cgroup(group)
            try:
                group.rmdir()
            except OSError as exc:
                log.warning("cannot remove %s left by an earlier wakegate: %s", group, exc.strerror)
        try:
            base.rmdir()
        except OSError:
            pass
    pid_dir = runtime_dir(instance)
    if pid_dir.is_dir():
        for pidfile in pid_dir.glob("*.pid"):
            try:
                pid_text, started = pidfile.read_text().split()
                pid = int(pid_text)
            except (OSError, ValueError):
                pid, started = 0, ""
            if pid > 1 and _start_time(pid) == started:
                try:
                    os.killpg(pid, signal.SIGKILL)
                    killed += 1
                except (ProcessLookupError, PermissionError):
                    pass
            pidfile.unlink(missing_ok=True)
    if killed:
        log.warning("killed %d service process(es) left behind by an earlier wakegate (instance %s)", killed, instance)
    return killed


def _empty_cgroup(group: Path) -> int:
    """Thaw a cgroup and SIGKILL everything in it until it is empty; how many were killed."""
    for name, value in (("cgroup.freeze", "0"), ("freezer.state", "THAWED")):
        try:
            (group / name).write_text(value)  # a v1-frozen task acts on SIGKILL only once thawed
        except OSError:
            pass
    killed = 0
    deadline = time.monotonic() + REAP_TIMEOUT
    while True:
        try:
            pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
        except OSError:
            return killed
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            log.warning("%s still has processes %s after SIGKILL", group, pids)
            return killed
        time.sleep(0.01)


class Freezer:
    """Freezes and thaws one process tree, and tracks it (``adopt``, ``remove``)."""

    name = "none"

    def adopt(self, pid: int) -> None:
        """Put a freshly started process (and so its future children) under this freezer."""

    async def freeze(self) -> None:
        raise NotImplementedError

    async def thaw(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        """Forget the process tree (it has exited)."""

    def launcher(self, argv: list[str]) -> list[str]:
        """argv, so that the process is in this freezer's group from its first instruction (nothing
        to do for a process group: the new session is it)."""
        return argv

    def enroll(self, pids: list[int]) -> None:
        """Add processes that already run (a tree restored outside the group) to it; gone ones are
        skipped. Blocking (a cgroup move can wait for an RCU grace period): call it off the loop."""

    def kill_rest(self, pgid: int) -> None:
        """SIGKILL whatever of the tree is left after its leader exited."""
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class _CgroupFreezer(Freezer):
    """A cgroup of its own for one service of one wakegate instance."""

    def __init__(self, root: Path, service: str, instance: str) -> None:
        self.path = root / "wakegate" / instance / service

    def adopt(self, pid: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _empty_cgroup(self.path)  # never put a new process into a frozen or occupied group
        (self.path / "cgroup.procs").write_text(str(pid))

    def launcher(self, argv: list[str]) -> list[str]:
        """Join the cgroup in a shell that then becomes argv: nothing argv forks escapes it."""
        self.path.mkdir(parents=True, exist_ok=True)
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *argv]

    def enroll(self, pids: list[int]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for pid in pids:
            try:
                (self.path / "cgroup.procs").write_text(str(pid))
            except OSError:  # it exited meanwhile
                pass

    def kill_rest(self, pgid: int) -> None:
        super().kill_rest(pgid)
        if self.path.is_dir():
            _empty_cgroup(self.path)  # also what left the process group (setsid) but not the cgroup

    def remove(self) -> None:
        for path in (self.path, self.path.parent):  # the instance's directory goes when it is empty
            try:
                path.rmdir()
            except OSError:
                return


class CgroupV2Freezer(_CgroupFreezer):
    """cgroup v2: write 1 or 0 to cgroup.freeze; cgroup.events says when it is done."""

    name = "cgroup v2 cgroup.freeze"

    @staticmethod
    def available(root: Path) -> bool:
        return (root / "cgroup.controllers").exists() and os.access(root, os.W_OK)

    async def _set(self, value: str, frozen: str) -> None:
        (self.path / "cgroup.freeze").write_text(value)
        deadline = time.monotonic() + FREEZE_TIMEOUT
        while f"frozen {frozen}" not in (self.path / "cgroup.events").read_text():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.path}: cgroup.freeze={value} not done in {FREEZE_TIMEOUT}s")
            await asyncio.sleep(FREEZE_POLL)

    async def freeze(self) -> None:
        await self._set("1", "1")

    async def thaw(self) -> None:
        await self._set("0", "0")


class CgroupV1Freezer(_CgroupFreezer):
    """cgroup v1: FROZEN or THAWED in freezer.state; FREEZING until every task has stopped."""

    name = "cgroup v1 freezer.state"

    @staticmethod
    def available(root: Path) -> bool:
        return (root / "freezer.state").exists() or ((root / "cgroup.procs").exists() and os.access(root, os.W_OK))

    async def freeze(self) -> None:
        state = self.path / "freezer.state"
        state.write_text("FROZEN")
        deadline = time.monotonic() + FREEZE_TIMEOUT
        while state.read_text().strip() != "FROZEN":
            if time.monotonic() > deadline:
                state.write_text("THAWED")
                raise TimeoutError(f"{state}: still FREEZING after {FREEZE_TIMEOUT}s")
            await asyncio.sleep(FREEZE_POLL)

    async def thaw(self) -> None:
        (self.path / "freezer.state").write_text("THAWED")


class SignalFreezer(Freezer):
    """The last resort: SIGSTOP and SIGCONT to the process group."""

    name = "SIGSTOP/SIGCONT"

    def __init__(self) -> None:
        self.pgid: int | None = None

    def adopt(self, pid: int) -> None:
        self.pgid = pid

    async def freeze(self) -> None:
        os.killpg(self.pgid, signal.SIGSTOP)

    async def thaw(self) -> None:
        os.killpg(self.pgid, signal.SIGCONT)


def choose_freezer(service: str, cgroup_root: Path = CGROUP_ROOT, instance: str = "default") -> Freezer:
    """The best freezer this host offers: cgroup v2, then v1, then signals."""
    candidates = []
    if (cgroup_root / "cgroup.controllers").exists():
        candidates.append((CgroupV2Freezer, cgroup_root))  # a pure cgroup v2 host
    candidates.append((CgroupV1Freezer, cgroup_root / "freezer"))
    if (cgroup_root / "unified" / "cgroup.controllers").exists():
        candidates.append((CgroupV2Freezer, cgroup_root / "unified"))  # the v2 half of a hybrid host
    for cls, root in candidates:
        if not cls.available(root):
            continue
        freezer = cls(root, service, instance)
        probe = root / ("cgroup.freeze" if cls is CgroupV2Freezer else "freezer.state")
        try:  # prove it: the group can be made (adopt makes it again) and frozen
            freezer.path.mkdir(parents=True, exist_ok=True)
            usable = (freezer.path / probe.name).exists() and os.access(freezer.path / probe.name, os.W_OK)
            freezer.remove()
        except OSError:
            continue
        if usable:
            return freezer
    return SignalFreezer()


class SharedStop:
    """One stop at a time: concurrent callers wait for the stop already under way, and a wake waits
    for it too (the old process still holds the port)."""

    def __init__(self) -> None:
        self.task: asyncio.Future | None = None

    @property
    def under_way(self) -> bool:
        return self.task is not None

    async def wait(self) -> None:
        if self.task is not None:
            await asyncio.shield(self.task)

    async def run(self, make) -> None:
        """Stop with make() (a coroutine, or None when there is nothing to stop), or join the stop
        already under way."""
        if self.task is None:
            coro = make()
            if coro is None:
                return
            self.task = asyncio.ensure_future(coro)
        task = self.task
        try:
            await asyncio.shield(task)
        finally:
            if self.task is task and task.done():
                self.task = None


def watch_exit(proc: subprocess.Popen, exited: asyncio.Future, loop, on_exit=None) -> None:
    """Resolve ``exited`` with proc's status when it exits (then call ``on_exit(status)``).

    A pidfd becomes readable when the process exits (Linux 5.3+); without one, poll.
    """

    def reap() -> bool:
        if proc.poll() is None:
            return False
        if not exited.done():
            exited.set_result(proc.returncode)
        if on_exit is not None:
            on_exit(proc.returncode)
        return True

    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        async def poll() -> None:
            while not reap():
                await asyncio.sleep(EXIT_POLL)

        loop.create_task(poll())
        return

    def readable() -> None:
        if reap():
            loop.remove_reader(pidfd)
            os.close(pidfd)

    loop.add_reader(pidfd, readable)


def from_config(svc, instance: str = "default") -> "ProcessBackend":
    """controller.BACKENDS: a service with a command that pauses or stops."""
    return ProcessBackend(svc.name, list(svc.command), cwd=svc.cwd, env=svc.env, mode=svc.sleep,
                          host=svc.upstream.host, port=svc.upstream.port, ready_path=svc.ready_path,
                          ready_timeout=svc.wake_timeout, instance=instance)


class ProcessBackend:
    """A command that serves HTTP on ``address``; sleeps by pausing or stopping it."""

    started_elsewhere = None  # Service sets it; this backend never calls it

    keeps_connections = True  # overwritten per mode below

    def __init__(self, name: str, command: list[str], *, cwd: str | None, env: dict[str, str] | None,
                 mode: str, host: str, port: int, ready_path: str, ready_timeout: float,
                 freezer: Freezer | None = None, instance: str = "default") -> None:
        self.name = name
        self.command = command
        self.cwd = cwd
        self.env = env
        self.mode = mode  # "pause" or "stop"
        self.host = host
        self.port = port
        self.ready_path = ready_path
        self.ready_timeout = ready_timeout
        self.instance = instance
        self.keeps_connections = mode == "pause"
        # A cgroup of its own in both modes when the host has one: pause freezes it, and either way a
        # later wakegate finds whatever this one leaves behind.
        self.freezer = freezer if freezer is not None else choose_freezer(name, instance=instance)
        self.pidfile = runtime_dir(instance) / f"{name}.pid"
        self.proc: subprocess.Popen | None = None
        self.pools: list = []  # the proxy's pools for this address: a thawed process is probed over one
        self.frozen = False
        self._exited: asyncio.Future | None = None
        self._stop = SharedStop()
        self.last_resume_seconds: float | None = None  # backend's own part of the last wake
        self.last_ready_seconds: float | None = None  # readiness wait of the last wake
        if mode == "pause":
            log.info("service %s: pause mode freezes with %s", name, self.freezer.name)

    def exited(self) -> asyncio.Future:
        """Resolves when the process exits (on its own or not)."""
        if self._exited is None:
            self._exited = asyncio.get_running_loop().create_future()
            if self.proc is None:
                self._exited.set_result(None)
        return self._exited

    @property
    def running(self) -> bool:
        """A process that is up and not being stopped (a stop under way never counts as up)."""
        return self.proc is not None and self.proc.poll() is None and not self._stop.under_way

    def describe(self) -> dict:
        return {"pid": self.proc.pid if self.running else None}

    def snapshot_stats(self) -> None:
        return None  # frozen or stopped: no snapshot

    async def close(self) -> None:
        """Nothing outlives the service."""

    def prepare_next_wake(self) -> None:
        """Nothing to start ahead: a thaw or a start is all a wake does."""

    async def wake(self, deadline: float) -> None:
        await self._stop.wait()  # the last process must be gone: it holds the port
        started = time.monotonic()
        thawed = False
        if self.running and self.frozen:
            await self.freezer.thaw()
            self.frozen = False
            thawed = True
        elif not self.running:
            await self._start()
        resumed = time.monotonic()
        self.last_resume_seconds = resumed - started
        if not (thawed and await self._probe_pooled()):
            await probe_until_ready(self.host, self.port, self.ready_path, deadline, self.exited())
        self.last_ready_seconds = time.monotonic() - resumed

    async def _probe_pooled(self) -> bool:
        """A thawed process still holds our keep-alive connections: probe over one of them."""
        for pool in self.pools:
            try:
                status = await probe_pooled(pool, f"{self.host}:{self.port}", self.ready_path, ATTEMPT_FIRST)
            except Exception:
                return False
            if status is not None:
                return status < 500
        return False

    def _resolve(self, env: dict | None) -> str:
        """The command's executable, checked before anything is spawned."""
        program = self.command[0]
        if os.sep in program:
            path = program if os.path.isabs(program) or self.cwd is None else os.path.join(self.cwd, program)
            if not os.path.isfile(path):
                raise RuntimeError(f"cannot start {program!r}: no such file")
            if not os.access(path, os.X_OK):
                raise RuntimeError(f"cannot start {program!r}: not executable")
            return path
        found = shutil.which(program, path=(env or os.environ).get("PATH"))
        if found is None:
            raise RuntimeError(f"cannot start {program!r}: not found on PATH")
        return found

    async def _start(self) -> None:
        env = None
        if self.env is not None:
            env = {**os.environ, **self.env}
        program = self._resolve(env)
        # subprocess.Popen spawns with vfork: a few milliseconds less than forking all of wakegate,
        # which is what a cold start's first request waits for. setpriv sets the parent-death signal.
        try:
            self.proc = proc = subprocess.Popen(
                PDEATHSIG + [program, *self.command[1:]], cwd=self.cwd, env=env, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise RuntimeError(f"cannot start {self.command[0]!r}: {exc.strerror or exc}") from None
        self.frozen = False
        loop = asyncio.get_running_loop()
        self._exited = exited = loop.create_future()
        try:
            self.freezer.adopt(proc.pid)
        except OSError as exc:
            log.warning("service %s: cannot put pid %d in its cgroup: %s", self.name, proc.pid, exc)
        self._record_pid(proc.pid)
        self._watch(proc, exited, loop)
        log.info("service %s: started pid %d: %s", self.name, proc.pid, " ".join(self.command))

    def _record_pid(self, pid: int) -> None:
        started = _start_time(pid)
        if started is None:
            return
        try:
            self.pidfile.parent.mkdir(parents=True, exist_ok=True)
            self.pidfile.write_text(f"{pid} {started}\n")
        except OSError as exc:
            log.warning("service %s: cannot write %s: %s", self.name, self.pidfile, exc.strerror)

    def _watch(self, proc: subprocess.Popen, exited: asyncio.Future, loop) -> None:
        def gone(returncode: int) -> None:
            if self.proc is proc:
                self.frozen = False
                self.freezer.remove()
                self.pidfile.unlink(missing_ok=True)

        watch_exit(proc, exited, loop, gone)

    async def sleep(self) -> None:
        if not self.running:
            return
        if self.mode == "pause":
            await self.freezer.freeze()
            self.frozen = True
        else:
            await self.stop()

    async def stop(self) -> None:
        """Terminate the process group: SIGTERM, then SIGKILL after STOP_GRACE. Concurrent callers
        wait for the same stop, and a wake waits for it too."""
        proc = self.proc
        await self._stop.run(lambda: self._terminate(proc) if proc is not None and proc.poll() is None else None)

    async def _terminate(self, proc: subprocess.Popen) -> None:
        pgid = proc.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        # Thaw whatever the flag says: a freeze cut short (wakegate stopping in the middle of a
        # sleep) leaves the group frozen with `frozen` still false, and a cgroup-v1-frozen process
        # acts on no signal, SIGKILL included, until it is thawed.
        try:
            await self.freezer.thaw()
        except (OSError, TimeoutError) as exc:
            log.warning("service %s: thawing before the stop: %s", self.name, exc)
        self.frozen = False
        exited = self.exited()
        try:
            await asyncio.wait_for(asyncio.shield(exited), STOP_GRACE)
        except asyncio.TimeoutError:
            log.warning("service %s: pid %d ignored SIGTERM for %.0fs; killing", self.name, pgid, STOP_GRACE)
            self.freezer.kill_rest(pgid)  # SIGKILL to the group, and its cgroup thawed and emptied
            try:
                await asyncio.wait_for(asyncio.shield(exited), STOP_GRACE)
            except asyncio.TimeoutError:
                log.error("service %s: pid %d survived SIGKILL for %.0fs", self.name, pgid, STOP_GRACE)
                return
        self.freezer.kill_rest(pgid)  # stragglers left in the group
