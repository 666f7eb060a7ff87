"""A Docker Engine of our own, for the tests and the wake benchmark: dockerd on a private socket,
data root and exec root, with no iptables rules and no bridge (containers use the host network),
and a tiny image made by ``docker import`` from a busybox rootfs. Nothing is pulled, and close()
leaves no process, container or mount behind.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

DOCKERD = shutil.which("dockerd")
DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else shutil.which("docker")
BUSYBOX = "/bin/busybox"
RUNC = shutil.which("runc")
IMAGE = "wakegate-test/httpd:1"
HELLO = b"hello from a container\n"


def unavailable() -> str | None:
    """Why no private Engine can run here, or None."""
    if not (DOCKERD and DOCKER):
        return "needs Debian's docker.io (make docker)"
    if not os.path.exists(BUSYBOX):
        return "needs busybox-static (make test-deps)"
    return None


class PrivateEngine:
    """dockerd on its own socket and folders, and the docker CLI pointed at it."""

    def __init__(self) -> None:
        # Short paths: containerd's sockets live under the exec root, and a Unix socket path has 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="wgd-", dir="/tmp"))
        self.socket = self.root / "docker.sock"
        # The containers' cgroups go under a parent of our own (not the host's "docker"), removed in close().
        self.cgroup_parent = f"wakegate-test-{self.root.name}"
        self.networks: list[str] = []  # bridge networks made by bridge_network(), removed in close()
        self.log = open(self.root / "dockerd.log", "wb")
        self.proc = subprocess.Popen(
            [DOCKERD, "-H", f"unix://{self.socket}", "--data-root", str(self.root / "data"),
             "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"),
             "--iptables=false", "--ip6tables=false", "--bridge=none", "--ip-forward=false", "--ip-masq=false",
             "--cgroup-parent", self.cgroup_parent,
             "--log-level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while self.run("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dockerd did not start: " + (self.root / "dockerd.log").read_text()[-2000:])
            time.sleep(0.05)
        self.build_image()

    def run(self, *args, check=True, input=None) -> subprocess.CompletedProcess:
        result = subprocess.run([DOCKER, "-H", f"unix://{self.socket}", *args], capture_output=True, input=input,
                                timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {result.stderr.decode()[-1000:]}")
        return result

    def build_image(self) -> None:
        rootfs = self.root / "rootfs"
        (rootfs / "bin").mkdir(parents=True)
        (rootfs / "www").mkdir()
        shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
        (rootfs / "bin" / "sh").symlink_to("busybox")
        (rootfs / "www" / "index.html").write_bytes(HELLO)
        tarball = subprocess.run(["tar", "-C", str(rootfs), "-cf", "-", "."], capture_output=True, check=True).stdout
        self.run("import", "-", IMAGE, input=tarball)

    def create(self, name: str, port: int, labels: dict | None = None) -> None:
        """A stopped container serving HELLO on 127.0.0.1:port (host network)."""
        label_args = [a for k, v in (labels or {}).items() for a in ("--label", f"{k}={v}")]
        self.run("create", "--name", name, "--network", "host", *label_args, IMAGE,
                 "/bin/busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www")

    def api(self, method: str, path: str) -> int:
        """One Engine API call on a fresh connection (what a client without a pool pays); its status."""
        conn = _UnixHTTP(str(self.socket))
        try:
            conn.request(method, "/v1.41" + path)
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def status(self, name: str) -> str:
        return json.loads(self.run("inspect", name).stdout)[0]["State"]["Status"]

    def remove_all(self) -> None:
        ids = self.run("ps", "-aq").stdout.split()
        if ids:
            self.run("rm", "-f", *[i.decode() for i in ids])

    def bridge_network(self, name: str) -> str:
        """A bridge network of this Engine's on a /24 no interface of the host has (a bridge left by an
        Engine that died would take the traffic of a new one on the same subnet); its name."""
        used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
        subnet = next(n for n in random.sample(range(16, 255), 239) if f"172.31.{n}." not in used)
        self.run("network", "create", "--driver", "bridge", "--subnet", f"172.31.{subnet}.0/24", name)
        self.networks.append(name)
        return name

    def close(self) -> None:
        self.remove_all()
        for network in self.networks:  # before dockerd goes: it leaves a bridge's interface behind otherwise
            self.run("network", "rm", network, check=False)
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        left = subprocess.run(["pgrep", "-f", str(self.root)], capture_output=True, text=True).stdout.split()
        for pid in left:
            os.kill(int(pid), signal.SIGKILL)
        mounts = self.mounts()  # dockerd leaves its network namespace file mounted (exec/netns/default)
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", mount], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        groups = [g for g in Path("/sys/fs/cgroup").glob(f"*/{self.cgroup_parent}")]
        for group in groups:
            try:
                group.rmdir()
            except OSError:
                pass
        assert not left, f"processes of the test Engine left behind: {left}"
        assert not [g for g in groups if g.exists()], "cgroups of the test Engine left behind"
        assert not self.mounts() and not self.root.exists(), f"mounts left behind: {self.mounts()}"

    def mounts(self) -> list[str]:
        with open("/proc/self/mounts") as f:
            return [line.split()[1] for line in f if line.split()[1].startswith(str(self.root))]


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("docker", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def make_bundle(folder, port):
    """An OCI bundle: busybox httpd serving HELLO on 127.0.0.1:port, sharing the host's network."""
    rootfs = folder / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "www").mkdir()
    shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
    (rootfs / "www" / "index.html").write_bytes(HELLO)
    subprocess.run([RUNC or "runc", "spec", "--bundle", str(folder)], check=True)
    spec = json.loads((folder / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["/bin/busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www"]
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
    (folder / "config.json").write_text(json.dumps(spec))
    return folder
