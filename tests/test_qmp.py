"""controller.qmp against real QEMU: a snapshot written to a file and restored into a new VMM,
and timeouts when the peer does not answer."""

import asyncio
import subprocess
import time
import urllib.request

import pytest

from controller import guest
from controller.qmp import QMP, QMPError

from .conftest import free_port
from .test_guest import built_guest  # noqa: F401  (fixture)

pytestmark = pytest.mark.backend  # end-to-end with a real backend: run once, on the C build


def qemu_args(g, port, sock, serial, extra=()):
    return ["qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-m", "128", "-smp", "1", "-nodefaults",
            "-no-user-config", "-display", "none", "-serial", f"file:{serial}",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80", "-device", "virtio-net-device,netdev=n0",
            "-qmp", f"unix:{sock},server,nowait", "-no-reboot", "-kernel", str(g["kernel"]), "-initrd", str(g["initrd"]),
            "-append", f"console=ttyS0 panic=-1 quiet tsc_early_khz={guest.host_khz()} tsc=reliable init_on_free=1",
            *extra]


async def answer(port, deadline):
    while time.monotonic() < deadline:
        try:  # short attempts: slirp accepts before the guest runs
            return await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=0.3).read())
        except OSError:
            await asyncio.sleep(0.01)
    raise TimeoutError("the guest did not answer")


def test_snapshot_to_file_and_restore(built_guest, tmp_path):  # noqa: F811
    """DESIGN.md's flow: stop, migrate to exec:cat > FILE (QEMU 7.2 has no file: URI), quit;
    a new QEMU with the same arguments and -incoming exec:cat FILE, cont, and the guest answers."""
    port = free_port()
    snapshot = tmp_path / "vm.snapshot"
    procs = []

    async def run():
        sock = tmp_path / "boot.sock"
        procs.append(subprocess.Popen(qemu_args(built_guest, port, sock, tmp_path / "boot.log")))
        qmp = await QMP.connect(str(sock), timeout=10)
        assert await answer(port, time.monotonic() + 90) == b"hello from the microVM guest\n"
        await qmp.execute("stop")
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": 10 * 1024**3})
        await qmp.execute("migrate", {"uri": f"exec:cat > {snapshot}"})
        deadline = time.monotonic() + 30
        while (status := (await qmp.execute("query-migrate"))["status"]) not in ("completed", "failed"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        assert status == "completed"
        await qmp.quit()
        procs[-1].wait(10)
        assert snapshot.stat().st_size > 10 << 20  # guest memory is in the file

        started = time.monotonic()
        sock = tmp_path / "restore.sock"
        procs.append(subprocess.Popen(qemu_args(built_guest, port, sock, tmp_path / "restore.log",
                                                ["-incoming", f"exec:cat {snapshot}"])))
        qmp = await QMP.connect(str(sock), timeout=10)
        while (await qmp.execute("query-status"))["status"] != "paused":
            assert time.monotonic() - started < 30
            await asyncio.sleep(0.002)
        await qmp.execute("cont")
        assert (await qmp.execute("query-status"))["status"] == "running"
        assert await answer(port, time.monotonic() + 30) == b"hello from the microVM guest\n"
        restored = time.monotonic() - started
        assert restored < 20  # seen here: about 0.3 s
        assert "wakegate guest ready" not in (tmp_path / "restore.log").read_text()  # no second boot
        await qmp.quit()

    try:
        asyncio.run(run())
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_errors_and_timeouts(tmp_path, built_guest):  # noqa: F811
    sock = tmp_path / "silent.sock"

    async def run():
        # A peer that accepts and never speaks: connect must give up, not hang.
        accepted = []
        server = await asyncio.start_unix_server(lambda r, w: accepted.append(w), path=str(sock))
        with pytest.raises(QMPError, match="did not answer"):
            await QMP.connect(str(sock), timeout=0.3)
        server.close()
        for writer in accepted:
            writer.close()
        await asyncio.sleep(0)  # the closes take effect on the next turn of the loop
        with pytest.raises(QMPError, match="no QMP socket"):
            await QMP.connect(str(tmp_path / "absent.sock"), timeout=0.1)
        # A real QEMU refuses an unknown command with QMPError.
        qsock = tmp_path / "q.sock"
        proc = subprocess.Popen(qemu_args(built_guest, free_port(), qsock, tmp_path / "s.log", ["-S"]))
        try:
            qmp = await QMP.connect(str(qsock), timeout=10)
            with pytest.raises(QMPError, match="no-such-command"):
                await qmp.execute("no-such-command")
            assert (await qmp.execute("query-status"))["status"] == "prelaunch"
            await qmp.close()
        finally:
            proc.kill()
            proc.wait()

    asyncio.run(run())
