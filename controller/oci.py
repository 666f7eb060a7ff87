"""A service that is an OCI bundle run by an OCI runtime (runc by default), for hosts without Docker.

``stop`` runs the container in the foreground of the runtime (``runc run``: the runtime is our child,
so its exit is the container's) and ends it with ``kill`` TERM, KILL after ``stop_timeout``, then
``delete``; ``pause`` uses the runtime's own ``pause``/``resume`` (its cgroup freezer). The runtime
runs under a parent-death signal; a container an earlier wakegate left behind (same id) is deleted
before the first start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import orjson

from .backends import PDEATHSIG, SharedStop, watch_exit
from .readiness import ATTEMPT_FIRST, probe_until_ready

log = logging.getLogger("wakegate.oci")

RUNTIME_CALL_TIMEOUT = 10.0  # pause, resume, kill, delete, state: milliseconds here (runc 1.1)
EXIT_WAIT_AFTER_KILL = 5.0  # after SIGKILL the runtime must report the container gone within this


class OCIRuntimeError(RuntimeError):
    """The runtime refused or did not answer; the message has its own words."""


def from_config(svc, instance: str = "default") -> "OCIBackend":
    """controller.BACKENDS: a service with a [services.NAME.oci] table."""
    return OCIBackend(svc.name, svc.oci, mode=svc.sleep, host=svc.upstream.host, port=svc.upstream.port,
                      ready_path=svc.ready_path, ready_timeout=svc.wake_timeout, instance=instance)


class OCIBackend:
    """One service's OCI container: run, pause, resume, kill and delete through the runtime's CLI."""

    started_elsewhere = None  # Service sets it; the runtime has no events to tell us

    def __init__(self, name: str, cfg, *, mode: str, host: str, port: int, ready_path: str,
                 ready_timeout: float, instance: str = "default") -> None:
        self.name = name
        self.cfg = cfg  # config.OCIConfig
        self.mode = mode  # "pause" or "stop"
        self.keeps_connections = mode == "pause"
        self.host = host
        self.port = port
        self.ready_path = ready_path
        self.ready_timeout = ready_timeout
        self.pools: list = []
        # The container id: unique per wakegate instance and service, so two wakegates never share one.
        self.id = cfg.container_id or f"wakegate-{instance}-{name}"
        self.logfile = Path(cfg.log) if cfg.log else None
        self.proc: subprocess.Popen | _Adopted | None = None  # the runtime in the container's foreground
        self.paused = False
        self.last_resume_seconds: float | None = None
        self.last_ready_seconds: float | None = None
        self._exited: asyncio.Future | None = None
        self._stop = SharedStop()

    # ---- the runtime's CLI ----

    def _argv(self, *args: str) -> list[str]:
        root = ["--root", self.cfg.root] if self.cfg.root else []
        return [self.cfg.runtime, *self.cfg.runtime_args, *root, *args]

    async def _call(self, *args: str, ok_if: str = "") -> str:
        """Run one runtime command to completion, bounded in time; its stdout, or OCIRuntimeError."""
        proc = await asyncio.create_subprocess_exec(*self._argv(*args), stdin=subprocess.DEVNULL,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), RUNTIME_CALL_TIMEOUT)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise OCIRuntimeError(f"{self.cfg.runtime} {args[0]} {self.id}: no answer within {RUNTIME_CALL_TIMEOUT:g}s")
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip().splitlines()
            message = text[-1] if text else f"exit status {proc.returncode}"
            if ok_if and ok_if in message:
                return ""
            raise OCIRuntimeError(f"{self.cfg.runtime} {args[0]} {self.id}: {message}")
        return out.decode(errors="replace")

    async def state(self) -> dict | None:
        """The runtime's view of the container ({"status": "running"|"paused"|"stopped"|...}), or None."""
        try:
            out = await self._call("state", self.id)
        except OCIRuntimeError as exc:
            if "does not exist" in str(exc) or "not exist" in str(exc):
                return None
            raise
        return orjson.loads(out)

    async def _take_over(self) -> bool:
        """A container of our id that no process of ours runs: started by hand, or left by a wakegate
        that died. Running or paused, it counts as awake and is adopted (its exit watched through a
        pidfd); stopped, it is deleted so that a fresh one can run. True when adopted."""
        found = await self.state()
        if found is None:
            return False
        status, pid = found.get("status"), int(found.get("pid") or 0)
        if status in ("running", "paused") and pid > 0:
            if status == "paused":
                await self._call("resume", self.id)
            log.warning("service %s: container %s was started outside wakegate (pid %d): adopted",
                        self.name, self.id, pid)
            self.proc = adopted = _Adopted(pid)
            self.paused = False
            loop = asyncio.get_running_loop()
            self._exited = exited = loop.create_future()
            watch_exit(adopted, exited, loop)  # a pidfd works for any process, not only children
            return True
        log.warning("service %s: deleting container %s (%s) left outside wakegate", self.name, self.id, status)
        await self._call("delete", "--force", self.id, ok_if="does not exist")
        return False

    # ---- what Service asks ----

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exited(self) -> asyncio.Future:
        if self._exited is None:
            self._exited = asyncio.get_running_loop().create_future()
            if not self.running:
                self._exited.set_result(None)
        return self._exited

    async def wake(self, deadline: float) -> None:
        await self._stop.wait()
        started = time.monotonic()
        if self.running and self.paused:
            await self._call("resume", self.id)
            self.paused = False
        elif not self.running and not await self._take_over():
            self._run()
        self.last_resume_seconds = time.monotonic() - started
        resumed = time.monotonic()
        await probe_until_ready(self.host, self.port, self.ready_path, deadline, self.exited(), ATTEMPT_FIRST)
        self.last_ready_seconds = time.monotonic() - resumed

    def _run(self) -> None:
        """``runtime run --bundle B ID`` in the foreground: the runtime stays our child while the
        container runs, and its exit is the container's."""
        out = subprocess.DEVNULL
        if self.logfile is not None:
            self.logfile.parent.mkdir(parents=True, exist_ok=True)
            out = os.open(self.logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self.proc = proc = subprocess.Popen(
                PDEATHSIG + self._argv("run", "--bundle", self.cfg.bundle, self.id),
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        except OSError as exc:
            raise OCIRuntimeError(f"cannot start {self.cfg.runtime!r}: {exc.strerror or exc}") from None
        finally:
            if out is not subprocess.DEVNULL:
                os.close(out)
        self.paused = False
        loop = asyncio.get_running_loop()
        self._exited = exited = loop.create_future()
        watch_exit(proc, exited, loop)
        log.info("service %s: %s run %s (pid %d)", self.name, self.cfg.runtime, self.id, proc.pid)

    async def sleep(self) -> None:
        if not self.running:
            return
        if self.mode == "pause":
            await self._call("pause", self.id)
            self.paused = True
        else:
            await self.stop()

    async def stop(self) -> None:
        """TERM, KILL after stop_timeout, then delete; concurrent callers wait for the same stop."""
        proc = self.proc
        await self._stop.run(lambda: self._end(proc))

    def _end(self, proc: subprocess.Popen | None):
        if proc is None or proc.poll() is not None:
            return self._delete_if_left()

        async def end() -> None:
            if self.paused:
                await self._call("resume", self.id, ok_if="not paused")
                self.paused = False
            exited = self.exited()
            for sig, wait in ((signal.SIGTERM, self.cfg.stop_timeout), (signal.SIGKILL, EXIT_WAIT_AFTER_KILL)):
                try:
                    await self._call("kill", self.id, sig.name[3:], ok_if="not running")
                except OCIRuntimeError as exc:
                    log.warning("service %s: %s", self.name, exc)
                try:
                    await asyncio.wait_for(asyncio.shield(exited), wait)
                    break
                except asyncio.TimeoutError:
                    continue
            if proc.poll() is None and not isinstance(proc, _Adopted):  # the runtime hangs: end it; delete below
                os.killpg(proc.pid, signal.SIGKILL)
                await asyncio.shield(exited)
            await self._call("delete", "--force", self.id, ok_if="does not exist")

        return end()

    def _delete_if_left(self):
        if self.proc is None:
            return None

        async def delete() -> None:
            await self._call("delete", "--force", self.id, ok_if="does not exist")

        return delete()

    def prepare_next_wake(self) -> None:
        """Nothing to start ahead: a start is one runtime call."""

    def snapshot_stats(self) -> None:
        return None

    def describe(self) -> dict:
        return {"pid": self.proc.pid if self.running else None,
                "oci": {"runtime": self.cfg.runtime, "bundle": self.cfg.bundle, "id": self.id, "paused": self.paused}}

    async def close(self) -> None:
        """Nothing outlives the service."""


class _Adopted:
    """A container process wakegate did not start (not its child): what watch_exit and the stop
    path need of a Popen (pid, poll, returncode), read from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                state = "X"
            if state in ("Z", "X"):
                self.returncode = 0
        return self.returncode
