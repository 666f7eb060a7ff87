"""The demo microVM guest, built from Debian packages only: a kernel and a busybox initramfs.

``build(cache)`` downloads Debian's cloud kernel package, keeps the kernel as an
uncompressed ELF (half the boot time under emulation) and the virtio modules,
and writes an initramfs whose /init loads them in order and runs busybox httpd
on port 80. Nothing built here is committed; it lives in the cache folder.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path

KERNEL_META = "linux-image-cloud-amd64"  # Debian's metapackage: depends on the current cloud kernel
BUSYBOX = Path("/bin/busybox")  # from busybox-static
# Debian builds virtio as modules; they load in this order (DESIGN.md).
MODULES = ("virtio_ring", "virtio", "virtio_mmio", "failover", "net_failover", "virtio_net")
XZ_MAGIC = b"\xfd7zXZ\x00"

# /init. /cgi-bin/count keeps a counter in guest memory: a stateful snapshot keeps it, a prepared one
# forgets it, which is how the tests tell the two policies apart.
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in {modules}; do insmod /lib/modules/$m.ko; done
ifconfig lo 127.0.0.1 up
ifconfig eth0 10.0.2.15 netmask 255.255.255.0 up
route add default gw 10.0.2.2
mkdir -p /www/cgi-bin /tmp
echo "hello from the microVM guest" > /www/index.html
cat > /www/cgi-bin/count <<'EOF'
#!/bin/sh
n=$(( $(cat /tmp/count 2>/dev/null || echo 0) + 1 ))
echo $n > /tmp/count
printf 'Content-Type: text/plain\\r\\n\\r\\n%s\\n' $n
EOF
chmod 755 /www/cgi-bin/count
echo "wakegate guest ready"
exec httpd -f -p 80 -h /www
"""


class GuestBuildError(Exception):
    """A step of the guest build failed; the message says which and why."""


def _run(cmd: list[str], cwd: Path | None = None) -> bytes:
    try:
        return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=300).stdout
    except FileNotFoundError:
        raise GuestBuildError(f"{cmd[0]} not found") from None
    except subprocess.CalledProcessError as exc:
        raise GuestBuildError(f"{' '.join(cmd)}: {exc.stderr.decode(errors='replace').strip()[-500:]}") from None


def kernel_package() -> str:
    """The concrete kernel package behind the metapackage, e.g. linux-image-6.1.0-56-cloud-amd64.

    A machine whose package lists were never fetched (or were cleaned, as in container images)
    knows no such package: as root, fetch them once and ask again.
    """
    for attempt in range(2):
        try:
            text = _run(["apt-cache", "depends", KERNEL_META]).decode()
        except GuestBuildError:
            text = ""
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("Depends:") and "linux-image-" in line:
                return line.split()[1]
        if attempt == 0 and os.geteuid() == 0:
            _run(["apt-get", "update", "-qq"])
    raise GuestBuildError(f"apt-cache depends {KERNEL_META} names no kernel (run apt-get update first)")


def _xz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _gzip(data: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


def _tool(*cmd: str):
    def run(data: bytes) -> bytes:
        try:
            result = subprocess.run(list(cmd), input=data, capture_output=True, timeout=120)
        except FileNotFoundError:
            raise GuestBuildError(f"{cmd[0]} not found: apt-get install {cmd[0]}") from None
        return result.stdout  # trailing bytes after the stream make these tools complain; the output is whole

    return run


# As the kernel's scripts/extract-vmlinux does: find each format's magic, try it, keep what is an ELF.
KERNEL_FORMATS = (
    (b"\xfd7zXZ\x00", _xz),
    (b"\x1f\x8b\x08", _gzip),
    (b"\x02\x21\x4c\x18", _tool("lz4", "-dc")),  # Debian 12's kernels: lz4 legacy frames
    (b"\x28\xb5\x2f\xfd", _tool("zstd", "-dc")),
)


def decompress_kernel(bzimage: bytes) -> bytes:
    """The vmlinux ELF inside a bzImage, whichever compression the kernel was built with."""
    tried = []
    for magic, decompress in KERNEL_FORMATS:
        start = bzimage.find(magic)
        while 0 <= start < len(bzimage):
            try:
                elf = decompress(bzimage[start:])
            except (lzma.LZMAError, zlib.error, EOFError):
                elf = b""
            if elf.startswith(b"\x7fELF"):
                return elf
            tried.append(start)
            start = bzimage.find(magic, start + 1) if len(tried) < 8 else -1
    raise GuestBuildError("no compressed ELF kernel found in the image (tried xz, gzip, lz4, zstd)")


def cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An initramfs archive (cpio "newc"): (path, mode, data) entries; directories have no data."""
    out = io.BytesIO()

    def pad(n: int) -> None:
        out.write(b"\0" * ((4 - n % 4) % 4))

    for ino, (path, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], start=1):
        name = path.encode() + b"\0"
        header = "070701" + "".join(
            f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name), 0)
        )
        out.write(header.encode() + name)
        pad(110 + len(name))
        out.write(data)
        pad(len(data))
    return out.getvalue()


def build(cache: Path, modules: tuple[str, ...] = MODULES) -> dict[str, Path]:
    """Build (or reuse) the guest in cache: {"kernel": vmlinux, "initrd": initramfs.cpio}."""
    cache.mkdir(parents=True, exist_ok=True)
    kernel, initrd, stamp = cache / "vmlinux", cache / "initramfs.cpio", cache / "guest-version"
    version = hashlib.sha256((INIT + " ".join(modules)).encode()).hexdigest()[:16]
    if kernel.exists() and initrd.exists() and stamp.exists() and stamp.read_text().strip() == version:
        return {"kernel": kernel, "initrd": initrd}
    if not BUSYBOX.exists():
        raise GuestBuildError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    package = kernel_package()
    with tempfile.TemporaryDirectory(prefix="wakegate-guest-") as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)  # apt's download user must be able to write here
        _run(["apt-get", "download", "-qq", package], cwd=tmp)
        (deb,) = tmp.glob("*.deb")
        tar_bytes = _run(["dpkg-deb", "--fsys-tarfile", str(deb)])
        wanted_kernel = None
        found: dict[str, bytes] = {}
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            for member in tar:
                name = member.name
                if "/boot/vmlinuz-" in name:
                    wanted_kernel = tar.extractfile(member).read()
                elif name.endswith(".ko") and Path(name).stem in modules and "/kernel/" in name:
                    found[Path(name).stem] = tar.extractfile(member).read()
        if wanted_kernel is None:
            raise GuestBuildError(f"{package} has no /boot/vmlinuz")
        missing = [m for m in modules if m not in found]
        if missing:
            raise GuestBuildError(f"{package} lacks the modules {', '.join(missing)}")
        entries = [(d, 0o040755, b"") for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules", "www")]
        entries.append(("bin/busybox", 0o100755, BUSYBOX.read_bytes()))
        entries += [(f"lib/modules/{m}.ko", 0o100644, found[m]) for m in modules]
        entries.append(("init", 0o100755, INIT.format(modules=" ".join(modules)).encode()))
        kernel.with_suffix(".tmp").write_bytes(decompress_kernel(wanted_kernel))
        initrd.with_suffix(".tmp").write_bytes(cpio_newc(entries))
        kernel.with_suffix(".tmp").replace(kernel)
        initrd.with_suffix(".tmp").replace(initrd)
    (cache / "kernel-package").write_text(package + "\n")
    stamp.write_text(version + "\n")  # an /init or module change rebuilds the guest
    return {"kernel": kernel, "initrd": initrd}


def host_khz() -> int:
    """The host TSC frequency for tsc_early_khz (without it, about 1 boot in 5 hangs under TCG)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    return 2_000_000


def kvm_usable(device: Path = Path("/dev/kvm")) -> bool:
    """KVM can run a guest here: the device opens read-write and the CPU says vmx or svm.

    The CPU flag matters: some hosts expose /dev/kvm without hardware virtualisation
    (nested or emulated), and a stock kernel then never boots (DESIGN.md).
    """
    if not os.access(device, os.R_OK | os.W_OK):
        return False
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return bool({"vmx", "svm"} & set(line.split(":", 1)[1].split()))
    return False


def has_qemu() -> bool:
    return shutil.which("qemu-system-x86_64") is not None
