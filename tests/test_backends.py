"""controller.backends in process, with real processes: what the service tests cannot reach."""

import asyncio
import os
import sys
import time

from controller.backends import CgroupV1Freezer, CgroupV2Freezer, ProcessBackend

from .conftest import BACKEND, free_port
from .test_controller import alive, frozen


def test_stop_after_a_freeze_cut_short():
    """wakegate stopping in the middle of a sleep leaves the group frozen with `frozen` false; the
    stop must thaw it anyway (a cgroup-v1-frozen process acts on no signal, SIGKILL included)."""
    port = free_port()

    async def scenario():
        backend = ProcessBackend("cut", [sys.executable, str(BACKEND), "--port", str(port)], cwd=None, env=None,
                                 mode="pause", host="127.0.0.1", port=port, ready_path="/hello", ready_timeout=15,
                                 instance=f"test-{os.getpid()}-{port}")
        await backend.wake(time.monotonic() + 15)
        pid = backend.proc.pid
        await backend.freezer.freeze()  # as _do_sleep would, but the flag is never set
        assert frozen(pid) and not backend.frozen
        started = time.monotonic()
        await backend.stop()
        return pid, time.monotonic() - started, backend.freezer

    pid, took, freezer = asyncio.run(scenario())
    assert not alive(pid)
    assert took < 3.0, took  # not a SIGTERM grace spent on a process that cannot act on it
    if isinstance(freezer, (CgroupV1Freezer, CgroupV2Freezer)):
        assert not freezer.path.exists() and not freezer.path.parent.exists()
