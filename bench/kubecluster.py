"""A real Kubernetes control plane of our own, for the tests and ``python -m bench k8s``: etcd,
kube-apiserver, kube-controller-manager and kube-scheduler (built by deploy/kubernetes.sh), on
127.0.0.1 only, with certificates made by openssl in a folder of their own. And a network namespace
with a veth pair, for the non-loopback addresses Kubernetes wants as pod IPs (Endpoints refuse
loopback ones): traffic stays on this machine, between the namespace and the host.

``close()`` leaves no process, folder, namespace or interface behind.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .common import ROOT, free_port, stop_process

ETCD = shutil.which("etcd")
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "pause")
ADMIN_TOKEN = "wakegate-admin-" + "%032x" % random.getrandbits(128)
NODE_GROUP = "wakegate:nodes"  # the group of the node tokens; RBAC binds deploy/kubernetes/rbac.yaml to it
START_TIMEOUT = 60.0  # etcd ~1 s, the apiserver ~3.5 s here; slow under load
SERVICE_RANGE = "10.96.0.0/16"


def binaries() -> Path | None:
    """The folder with the control plane's binaries (deploy/kubernetes.sh's cache), or None."""
    cache = Path(os.environ.get("WAKEGATE_CACHE", "/var/cache/wakegate")) / "kubernetes-1.20.2-1"
    return cache if all((cache / b).is_file() for b in BINARIES) else None


def unavailable() -> str | None:
    """Why no control plane can run here, or None."""
    if binaries() is None:
        return "needs the control plane built by deploy/kubernetes.sh (make kubernetes)"
    if ETCD is None or shutil.which("openssl") is None:
        return "needs etcd-server and openssl (make kubernetes)"
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 for the pods' network namespace"
    return None


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


class ControlPlane:
    """etcd and the three control plane programs, started in order and waited for."""

    def __init__(self, node_monitor_grace: str = "40s", node_monitor_period: str = "5s") -> None:
        self.root = Path(tempfile.mkdtemp(prefix="wgk8s-", dir="/tmp"))
        self.bin = binaries()
        assert self.bin is not None, unavailable()
        self.procs: list[subprocess.Popen] = []
        self.logs = []
        self.node_tokens = {f"node-{i}": "wakegate-node-%d-%032x" % (i, random.getrandbits(128)) for i in range(4)}
        self.nobody_token = "wakegate-nobody-%032x" % random.getrandbits(128)
        try:
            self._certificates()
            self.port = free_port()
            self.url = f"https://127.0.0.1:{self.port}"
            self._etcd()
            self._apiserver()
            self.admin_kubeconfig = self.kubeconfig("admin", ADMIN_TOKEN)
            self._wait_ready()
            common = ["--kubeconfig", str(self.admin_kubeconfig), "--bind-address=127.0.0.1", "--port=0",
                      "--secure-port=0", "--leader-elect=false"]
            self._spawn("kube-controller-manager", [
                str(self.bin / "kube-controller-manager"), *common,
                f"--service-account-private-key-file={self.root / 'sa.key'}", f"--root-ca-file={self.root / 'ca.crt'}",
                f"--node-monitor-grace-period={node_monitor_grace}", f"--node-monitor-period={node_monitor_period}",
                "--use-service-account-credentials=false", "--allocate-node-cidrs=false", "--v=1"])
            self._spawn("kube-scheduler", [str(self.bin / "kube-scheduler"), *common, "--v=1"])
            self._wait_for_default_service_account()
        except BaseException:
            self.close()
            raise

    # ---- set-up ----

    def _certificates(self) -> None:
        d = self.root
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
                 "-subj", "/CN=wakegate-test-ca", cwd=d)
        (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,"
                                   "DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key", "-out", "apiserver.csr",
                 "-subj", "/CN=kube-apiserver", cwd=d)
        _openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", "apiserver.crt", "-days", "2", "-extfile", "san.cnf", cwd=d)
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
        lines = [f'{ADMIN_TOKEN},admin,admin,"system:masters"']
        lines += [f'{token},wakegate-{name},wakegate-{name},"{NODE_GROUP}"' for name, token in self.node_tokens.items()]
        lines.append(f"{self.nobody_token},nobody,nobody")  # authenticated, and allowed nothing
        (d / "tokens.csv").write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")
        self.logs.append(log)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        proc.name = name
        self.procs.append(proc)
        return proc

    def _etcd(self) -> None:
        client, peer, metrics = free_port(), free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._spawn("etcd", [ETCD, "--name", "wakegate-test", "--data-dir", str(self.root / "etcd"),
                             "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
                             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                             "--initial-cluster", f"wakegate-test=http://127.0.0.1:{peer}",
                             "--listen-metrics-urls", f"http://127.0.0.1:{metrics}", "--log-level", "warn"])

    def _apiserver(self) -> None:
        d = self.root
        self._spawn("kube-apiserver", [
            str(self.bin / "kube-apiserver"), f"--etcd-servers={self.etcd_url}", "--bind-address=127.0.0.1",
            f"--secure-port={self.port}", "--insecure-port=0", f"--tls-cert-file={d / 'apiserver.crt'}",
            f"--tls-private-key-file={d / 'apiserver.key'}", f"--client-ca-file={d / 'ca.crt'}",
            f"--token-auth-file={d / 'tokens.csv'}", "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-signing-key-file={d / 'sa.key'}", f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-cluster-ip-range={SERVICE_RANGE}", "--endpoint-reconciler-type=none", "--allow-privileged",
            "--v=1"])

    def kubeconfig(self, user: str, token: str) -> Path:
        """A kubeconfig file for this cluster with a bearer token."""
        path = self.root / f"{user}.kubeconfig"
        path.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: {self.url}
    certificate-authority: {self.root / 'ca.crt'}
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: test
  context: {{cluster: test, user: {user}, namespace: default}}
current-context: test
""")
        return path

    def _wait_ready(self) -> None:
        import ssl
        import urllib.request

        context = ssl.create_default_context(cafile=str(self.root / "ca.crt"))
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self._check_alive()
            try:
                req = urllib.request.Request(self.url + "/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
                with urllib.request.urlopen(req, context=context, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("kube-apiserver not ready: " + self.log_tail("kube-apiserver"))
            time.sleep(0.1)

    def _wait_for_default_service_account(self) -> None:
        """Pods are admitted only once the controller manager made the namespace's service account."""
        from lightkube.resources.core_v1 import ServiceAccount

        deadline = time.monotonic() + START_TIMEOUT
        with self.client() as client:
            while True:
                self._check_alive()
                try:
                    client.get(ServiceAccount, "default", namespace="default")
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise RuntimeError("no default service account: " + self.log_tail("kube-controller-manager"))
                    time.sleep(0.1)

    def _check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with {proc.returncode}: " + self.log_tail(proc.name))

    def log_tail(self, name: str, size: int = 3000) -> str:
        try:
            return (self.root / f"{name}.log").read_text(errors="replace")[-size:]
        except OSError:
            return ""

    # ---- use ----

    def client(self):
        """A synchronous lightkube client with the admin token."""
        from lightkube import Client
        from lightkube.config.kubeconfig import KubeConfig

        return Client(KubeConfig.from_file(str(self.admin_kubeconfig)), field_manager="wakegate-test")

    def node_kubeconfig(self, index: int) -> Path:
        """A kubeconfig with the token of node user wakegate-node-INDEX (group wakegate:nodes), which has
        only what the node ClusterRole in deploy/kubernetes/rbac.yaml gives it once that is applied."""
        name = f"node-{index}"
        return self.kubeconfig(f"wakegate-{name}", self.node_tokens[name])

    def apply_rbac(self) -> None:
        """deploy/kubernetes/rbac.yaml as a user would apply it: it binds the node role to NODE_GROUP."""
        from lightkube import codecs

        with self.client() as client:
            for obj in codecs.load_all_yaml((ROOT / "deploy" / "kubernetes" / "rbac.yaml").read_text()):
                client.create(obj)

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for log in self.logs:
            log.close()
        shutil.rmtree(self.root, ignore_errors=True)


# ---- a real kubelet, for the Kubernetes way of scaling from zero ---------------------------

PAUSE_IMAGE = "wakegate-test/pause:3.4"  # the pod sandbox, from the kubelet's own tree (deploy/kubernetes.sh)
KUBELET_LOG_DIRS = (Path("/var/log/pods"), Path("/var/log/containers"))  # the 1.20 dockershim writes there
KUBELET_FIXED_DIR = Path("/var/lib/kubelet")  # its device plugins' socket folder is not configurable


class Kubelet:
    """A kubelet (built by deploy/kubernetes.sh, dockershim) beside the wakegate nodes: its pods run in
    containers of a private Docker Engine (bench/engine.py) on the host's network, so their IP is the
    node's address. It shows what a pod costs the usual way: sandbox, container start, readiness
    probes at the kubelet's period. No QoS cgroups, no iptables rules, no evictions."""

    def __init__(self, cluster: ControlPlane, engine, name: str, address: str, labels: dict) -> None:
        self.name = name
        self.engine = engine
        self.root = Path(tempfile.mkdtemp(prefix="wgkl-", dir="/tmp"))
        self.logs_before = {d: set(os.listdir(d)) if d.is_dir() else set() for d in KUBELET_LOG_DIRS}
        self.made_fixed_dir = not KUBELET_FIXED_DIR.exists()
        rootfs = self.root / "pause-rootfs"
        rootfs.mkdir()
        shutil.copy(cluster.bin / "pause", rootfs / "pause")
        tar = subprocess.run(["tar", "-C", str(rootfs), "-cf", "-", "."], capture_output=True, check=True).stdout
        engine.run("import", "--change", 'ENTRYPOINT ["/pause"]', "-", PAUSE_IMAGE, input=tar)
        node_labels = ",".join(f"{k}={v}" for k, v in labels.items())
        self.log = open(self.root / "kubelet.log", "wb")
        self.proc = subprocess.Popen([
            str(cluster.bin / "kubelet"), f"--kubeconfig={cluster.admin_kubeconfig}", f"--hostname-override={name}",
            f"--node-ip={address}", f"--root-dir={self.root / 'root'}", f"--cert-dir={self.root / 'pki'}",
            "--container-runtime=docker", f"--docker-endpoint=unix://{engine.socket}",
            f"--experimental-dockershim-root-directory={self.root / 'dockershim'}",
            f"--pod-infra-container-image={PAUSE_IMAGE}", "--cgroups-per-qos=false", "--enforce-node-allocatable=",
            "--cgroup-driver=cgroupfs", "--fail-swap-on=false", "--oom-score-adj=0", "--read-only-port=0",
            f"--port={free_port()}", "--healthz-port=0", "--make-iptables-util-chains=false", "--eviction-hard=",
            "--image-gc-high-threshold=100", "--image-gc-low-threshold=99", "--authorization-mode=AlwaysAllow",
            f"--node-labels={node_labels}", "--register-node=true", "--v=1"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def log_tail(self, size: int = 3000) -> str:
        return (self.root / "kubelet.log").read_text(errors="replace")[-size:]

    def close(self) -> None:
        stop_process(self.proc, 20)
        self.log.close()
        self.engine.remove_all()  # the pods' containers and sandboxes
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1] for line in f if line.split()[1].startswith(str(self.root))]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", mount], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        if self.made_fixed_dir:
            shutil.rmtree(KUBELET_FIXED_DIR, ignore_errors=True)
        for folder, before in self.logs_before.items():
            for entry in (set(os.listdir(folder)) - before) if folder.is_dir() else ():
                path = folder / entry
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink()


# ---- a network namespace for pod addresses -------------------------------------------------

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetNamespace:
    """A network namespace joined to the host by a veth pair on a private /24 of its own. The host
    end has ``addresses`` (the nodes' addresses: pod IPs), the namespace end ``peer``; a client in
    the namespace (``connect``) reaches the nodes across the veth, as another machine would."""

    def __init__(self, nodes: int = 2) -> None:
        tag = "%05x" % random.getrandbits(20)
        self.name, self.host_if, self.peer_if = f"wgk{tag}", f"wgkh{tag}", f"wgkp{tag}"
        used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
        subnet = next(n for n in random.sample(range(1, 255), 254) if f"10.213.{n}." not in used)
        self.prefix = f"10.213.{subnet}"
        self.addresses = [f"{self.prefix}.{i + 1}" for i in range(nodes)]
        self.peer = f"{self.prefix}.200"
        self._executor: ThreadPoolExecutor | None = None
        try:
            self._ip("netns", "add", self.name)
            self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
            self._ip("link", "set", self.peer_if, "netns", self.name)
            for address in self.addresses:
                self._ip("addr", "add", f"{address}/24", "dev", self.host_if)
            self._ip("link", "set", self.host_if, "up")
            self._ip("netns", "exec", self.name, "ip", "addr", "add", f"{self.peer}/24", "dev", self.peer_if)
            self._ip("netns", "exec", self.name, "ip", "link", "set", self.peer_if, "up")
            self._ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def _enter(self) -> None:
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)

    def connect(self, host: str, port: int, timeout: float = 10.0):
        """A TCP connection made from inside the namespace (a thread of ours lives there)."""
        import socket

        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, initializer=self._enter,
                                                thread_name_prefix=f"netns-{self.name}")
        return self._executor.submit(socket.create_connection, (host, port), timeout).result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)  # its peer goes with it
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


# ---- what tests and benchmarks put in the cluster, and how they read it back ---------------

BACKEND = ROOT / "examples" / "backend.py"
TAINT_TOLERATION = [{"key": "wakegate.dev/scale-to-zero", "operator": "Exists", "effect": "NoSchedule"}]


def wait_for(what, check, timeout: float = 30.0, every: float = 0.05):
    """check()'s first true value, asked every `every` seconds; AssertionError after timeout naming
    what was awaited (what: text, or a callable that describes the state then)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(every)


def process_container(name: str = "app", port: int = 8080) -> dict:
    """examples/backend.py as a pod's container, run as a host process (wakegate.dev/run: process):
    it listens on $PORT and names itself after its pod."""
    import sys

    return {"name": name, "image": "wakegate.dev/host-process", "ports": [{"containerPort": port}],
            "command": [sys.executable, str(BACKEND)], "args": ["--port", "$(PORT)", "--name", "$(POD_NAME)"],
            "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
            "readinessProbe": {"httpGet": {"path": "/hello", "port": port}}}


def deployment(name: str, replicas: int, node_label: tuple[str, str], annotations: dict, tolerations=(),
               container: dict | None = None, **spec) -> dict:
    """A Deployment of pods (process_container() unless container is given) that tolerate the
    wakegate taint and land on the nodes with node_label."""
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": "default"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}, "annotations": annotations},
                                  "spec": {"nodeSelector": dict([node_label]),
                                           "tolerations": TAINT_TOLERATION + list(tolerations),
                                           "containers": [container or process_container()], **spec}}}}


def service_manifest(name: str, port: int = 8080) -> dict:
    """A Service selecting app=name: its Endpoints list the ready pods' addresses."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": port}]}}


def create(client, manifest: dict):
    from lightkube import codecs

    return client.create(codecs.from_dict(manifest))


def endpoints(client, name: str) -> list[str]:
    """The ready addresses in a Service's Endpoints (none when it has none yet)."""
    from lightkube import ApiError
    from lightkube.resources.core_v1 import Endpoints

    try:
        ep = client.get(Endpoints, name, namespace="default")
    except ApiError:
        return []
    return [a.ip for subset in ep.subsets or [] for a in subset.addresses or []]


def node_config(cluster: ControlPlane, index: int, name: str, address: str, group: str, extra: str = "") -> str:
    """The [kubernetes] table of a test or benchmark node (the node token's rights only), labelled
    wakegate.dev/test=group so that a Deployment can pick a test's nodes."""
    return f"""[kubernetes]
kubeconfig = "{cluster.node_kubeconfig(index)}"
node_name = "{name}"
node_address = "{address}"
labels = {{ "wakegate.dev/test" = "{group}" }}
host_processes = true
{extra}
"""
