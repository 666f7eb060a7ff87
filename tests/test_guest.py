"""controller.guest: the initramfs format, kernel extraction, and a real build and boot under QEMU."""

import gzip
import lzma
import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

from controller import guest

from .conftest import ROOT, free_port

pytestmark = pytest.mark.backend  # end-to-end with a real backend: run once, on the C build


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """A reader for cpio newc, written from the format's description, to check the writer."""
    out, pos = {}, 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += (4 - pos % 4) % 4
        body = data[pos : pos + size]
        pos += size
        pos += (4 - pos % 4) % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_cpio_newc_round_trip():
    entries = [("bin", 0o040755, b""), ("init", 0o100755, b"#!/bin/sh\n"), ("x/odd", 0o100644, b"abc")]
    parsed = read_cpio(guest.cpio_newc(entries))
    assert parsed == {name: (mode, data) for name, mode, data in entries}


ELF = b"\x7fELF" + bytes(range(256)) * 50


@pytest.mark.parametrize("compress", [lambda d: lzma.compress(d, format=lzma.FORMAT_XZ), gzip.compress])
def test_decompress_kernel_finds_the_payload(compress):
    image = b"MZ setup code \xfd7z not quite" + compress(ELF) + b"\0" * 100
    assert guest.decompress_kernel(image) == ELF


def test_decompress_kernel_without_payload():
    with pytest.raises(guest.GuestBuildError, match="no compressed ELF"):
        guest.decompress_kernel(b"\0" * 1000)


CACHE = ROOT / ".cache" / "guest"


@pytest.fixture(scope="session")
def built_guest():
    if not guest.has_qemu() or not guest.BUSYBOX.exists() or shutil.which("lz4") is None:
        message = "qemu-system-x86, busybox-static and lz4 are needed (make test installs them)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return guest.build(CACHE)


def test_built_guest_files(built_guest):
    assert built_guest["kernel"].read_bytes()[:4] == b"\x7fELF"
    files = read_cpio(built_guest["initrd"].read_bytes())
    assert "init" in files and "bin/busybox" in files
    assert all(f"lib/modules/{m}.ko" in files for m in guest.MODULES)
    assert guest.build(CACHE) == built_guest  # cached: nothing rebuilt


def test_guest_boots_and_answers_http(built_guest, tmp_path):
    """The DESIGN.md recipe: microvm machine under TCG, user networking, HTTP from busybox."""
    port = free_port()
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-m", "128", "-smp", "1", "-nodefaults",
         "-no-user-config", "-display", "none", "-serial", f"file:{tmp_path / 'serial.log'}",
         "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80", "-device", "virtio-net-device,netdev=n0",
         "-no-reboot", "-kernel", str(built_guest["kernel"]), "-initrd", str(built_guest["initrd"]),
         "-append", f"console=ttyS0 panic=-1 quiet tsc_early_khz={guest.host_khz()} tsc=reliable init_on_free=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90  # emulated CPU: seconds, not milliseconds
        body = b""
        while time.monotonic() < deadline:
            try:  # short attempts: user networking accepts long before the guest answers
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=0.5).read()
                break
            except (OSError, socket.timeout):
                time.sleep(0.1)
        assert body == b"hello from the microVM guest\n", (tmp_path / "serial.log").read_text()[-2000:]
        assert "wakegate guest ready" in (tmp_path / "serial.log").read_text()
    finally:
        qemu.kill()
        qemu.wait()
