"""wakegate's TOML configuration: load, validate, and explain every mistake.

``load(path)`` returns a frozen ``Config`` or raises ``ConfigError`` whose
message names the file, the key and what is wrong with it.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

# Defaults, each with its precedent.
DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9090"  # loopback: the admin API is not for the world
HEAD_TIMEOUT = 10.0  # slow head gets 408; nginx client_header_timeout is 60 s, HAProxy's http-request 10 s
KEEPALIVE_TIMEOUT = 75.0  # idle client connection; nginx keepalive_timeout 75 s
BODY_TIMEOUT = 60.0  # gap between request body reads; nginx client_body_timeout 60 s
CONNECT_TIMEOUT = 5.0  # upstream connect; HAProxy's timeout connect 5 s
UPSTREAM_TIMEOUT = 60.0  # gap between upstream reads; nginx proxy_read_timeout 60 s
SEND_TIMEOUT = 60.0  # client not reading a response; nginx send_timeout 60 s
ADMIN_IDLE_TIMEOUT = 10.0  # an admin connection finishes a request, or idles, within this; HAProxy's http-request 10 s
TUNNEL_TIMEOUT = 3600.0  # idle Upgrade tunnel; HAProxy's timeout tunnel is often 1 h
MAX_WORKERS = 64  # proxy worker processes; HAProxy's nbthread tops out at 64 per thread group
DRAIN_TIMEOUT = 30.0  # grace for in-flight requests on SIGTERM; Kubernetes' default grace is 30 s
MAX_HEAD_SIZE = 16 * 1024  # h11 and node: 16 KiB
MAX_BODY_SIZE = 0  # 0: no limit, as HAProxy (nginx has 1 MiB, too small for uploads)
UPSTREAM_KEEPALIVE = 64  # idle upstream connections kept per service; nginx's keepalive example uses 32-64
UPSTREAM_MAX_CONNECTIONS = 1024  # open upstream connections per service, like nginx max_conns; a burst of
# 10,000 released requests queues here instead of opening 10,000 sockets against one service
UNKNOWN_HOST_STATUSES = (404, 421)
IDLE_TIMEOUT = 300.0  # idle time before a service with a command sleeps; Cloud Run keeps idle instances up to 15 min
WAKE_TIMEOUT = 30.0  # held requests wait at most this for a wake; Knative's activator waits up to its 30 s probe timeout
MAX_QUEUE = 10_000  # held requests per service; Knative activator's queue depth
SLEEP_MODES = ("pause", "stop", "snapshot")  # for a command; "snapshot" is CRIU
MICROVM_SLEEP_MODES = ("snapshot", "pause")
SNAPSHOT_POLICIES = ("stateful", "prepared")
MICROVM_ACCELS = ("tcg", "kvm", "auto")
MICROVM_MEMORY_MIN_MB = 80  # DESIGN.md: below 80 MB the Debian cloud kernel panics before /init runs
MICROVM_MEMORY_DEFAULT_MB = 128  # the size DESIGN.md's restore times were measured with
MICROVM_MEMORY_MAX_MB = 64 * 1024
MICROVM_CPUS_MAX = 8
MICROVM_SNAPSHOT_DIR = ".cache/snapshots"  # beside the config, like every relative path in it
# "ram-file": the guest RAM is a file and a snapshot is that file plus the device state, restored
# copy-on-write without reading the RAM; "stream": the whole VM in one migration stream (the
# format before; kept to compare with, and read and converted when found on disk).
MICROVM_SNAPSHOT_FORMATS = ("ram-file", "stream")
DOCKER_SLEEP_MODES = ("pause", "stop")  # the Engine's pause/unpause (memory kept) and stop/start
DOCKER_SOCKET = "/var/run/docker.sock"  # the Engine's default
DOCKER_STOP_TIMEOUT = 10.0  # docker stop's own default: SIGTERM, then SIGKILL after this
DOCKER_API_TIMEOUT = 10.0  # any other Engine call; it answers in ~10 ms here
OCI_RUNTIMES = ("runc", "crun", "runsc")  # the CLIs that take run/pause/resume/kill/delete/state alike
QEMU_BINARY = "qemu-system-x86_64"


class ConfigError(Exception):
    """A configuration mistake; the message names file, key and problem."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ProxySettings:
    listen: Address
    head_timeout: float = HEAD_TIMEOUT
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    connect_timeout: float = CONNECT_TIMEOUT
    upstream_timeout: float = UPSTREAM_TIMEOUT
    tunnel_timeout: float = TUNNEL_TIMEOUT
    send_timeout: float = SEND_TIMEOUT
    drain_timeout: float = DRAIN_TIMEOUT
    max_head_size: int = MAX_HEAD_SIZE
    max_body_size: int = MAX_BODY_SIZE
    upstream_keepalive: int = UPSTREAM_KEEPALIVE
    upstream_max_connections: int = UPSTREAM_MAX_CONNECTIONS
    default_service: str = ""
    unknown_host_status: int = 404
    workers: int = 1  # proxy worker processes; the config's default is the CPUs this process may use


def default_workers() -> int:
    """The CPUs this process may run on (its affinity, which taskset and cgroup cpusets narrow)."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


@dataclass(frozen=True)
class AdminSettings:
    listen: Address
    token: str = ""
    idle_timeout: float = ADMIN_IDLE_TIMEOUT


@dataclass(frozen=True)
class LogSettings:
    access: str = ""  # "-" for stdout, a path, or "" for off
    server_timing: bool = False


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = True


@dataclass(frozen=True)
class NoWake:
    """Requests that must not wake a sleeping service (uptime monitors, health checkers)."""

    paths: tuple[str, ...] = ()
    user_agents: tuple[str, ...] = ()
    status: int = 503


@dataclass(frozen=True)
class MicroVMConfig:
    """A QEMU microVM: what to boot, how big, and where its snapshots go (absolute paths)."""

    kernel: str
    initrd: str
    guest_port: int = 80
    memory_mb: int = MICROVM_MEMORY_DEFAULT_MB
    cpus: int = 1
    accel: str = "tcg"  # resolved: "auto" has become "tcg" or "kvm"
    snapshot_dir: str = ""
    qemu: str = QEMU_BINARY  # the binary, resolved on PATH
    cmdline: str = ""  # appended to the kernel command line
    warmup: tuple[str, ...] = ()  # paths requested after a cold boot, before the prepared snapshot
    snapshot_format: str = "ram-file"  # one of MICROVM_SNAPSHOT_FORMATS
    standby: bool = True  # while asleep, a QEMU waits with the snapshot mapped: a wake only loads devices


@dataclass(frozen=True)
class DockerConfig:
    """A Docker container, or every container a label selector matches (a Compose service)."""

    socket: str = DOCKER_SOCKET
    container: str = ""  # a name or an id; or:
    labels: tuple[tuple[str, str], ...] = ()  # every container with all these labels
    stop_timeout: float = DOCKER_STOP_TIMEOUT
    api_timeout: float = DOCKER_API_TIMEOUT
    port: int = 0  # the container's port: the upstream is found at each wake (host network or published)

    def describe(self) -> str:
        if self.container:
            return f"container {self.container!r}"
        return "containers labelled " + ", ".join(f"{k}={v}" for k, v in self.labels)


@dataclass(frozen=True)
class OCIConfig:
    """An OCI bundle (a folder with config.json and its rootfs) run by an OCI runtime's CLI."""

    bundle: str
    runtime: str = "runc"  # resolved on PATH
    root: str = ""  # the runtime's state folder (--root); empty: its default
    container_id: str = ""  # empty: wakegate-<instance>-<service>
    stop_timeout: float = DOCKER_STOP_TIMEOUT
    log: str = ""  # the container's stdout and stderr; empty: discarded
    runtime_args: tuple[str, ...] = ()  # global flags before every command (runsc: --network=host ...)


@dataclass(frozen=True)
class CriuConfig:
    """A command service that sleeps as a CRIU image (absolute paths)."""

    binary: str  # a CRIU new enough, found or configured
    snapshot_dir: str = ""
    warmup: tuple[str, ...] = ()  # paths requested after a cold start, before the prepared snapshot


WASM_MAX_MEMORY = 64 * 1024 * 1024  # linear memory per instance; Fastly Compute's heap limit is 128 MB
WASM_MAX_TIME = 1.0  # wall time per request; Cloudflare Workers allow 10-50 ms of CPU, Fastly 60 s of wall time
WASM_MAX_RESPONSE = 10 * 1024 * 1024  # response bytes a handler may write; Fastly's default body cap is 8 MB
WASM_MAX_BODY = 10 * 1024 * 1024  # request body a handler gets on stdin (held in memory); the same order
WASM_INSTANCES = 8  # handlers running at once per proxy process; more requests wait their turn
WASM_MAX_INSTANCES = 256


@dataclass(frozen=True)
class WasmConfig:
    """A WebAssembly (WASI) module that answers each request in a fresh instance, CGI-style."""

    module: str  # absolute path of the .wasm
    cache_dir: str  # compiled modules, so a restart does not compile again
    env: tuple[tuple[str, str], ...] = ()
    dirs: tuple[tuple[str, str, bool], ...] = ()  # (guest path, host path, writable)
    max_memory: int = WASM_MAX_MEMORY
    max_time: float = WASM_MAX_TIME
    max_response: int = WASM_MAX_RESPONSE
    max_body: int = WASM_MAX_BODY
    instances: int = WASM_INSTANCES


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    hosts: tuple[str, ...]
    paths: tuple[str, ...]
    upstream: Address
    command: tuple[str, ...] = ()  # empty: always up, a plain proxied upstream
    cwd: str | None = None
    env: dict[str, str] | None = None
    sleep: str = "stop"
    idle_timeout: float = IDLE_TIMEOUT
    wake_timeout: float = WAKE_TIMEOUT
    ready_path: str = "/"
    max_queue: int = MAX_QUEUE
    no_wake: NoWake = NoWake()
    wait_page: bool = False  # browsers held longer than wait_page_after get a page that waits for the wake
    wait_page_after: float = 1.0
    microvm: MicroVMConfig | None = None  # set: the service runs in a microVM, not as a command
    snapshot_policy: str = "stateful"
    criu: CriuConfig | None = None  # set: a command service with sleep = "snapshot"
    docker: DockerConfig | None = None  # set: the service is a Docker container (or several)
    oci: OCIConfig | None = None  # set: the service is an OCI bundle run by runc (or crun, runsc)
    wasm: WasmConfig | None = None  # set: wakegate runs the service's WebAssembly module per request
    # Listeners of the service's own: every request on them goes to it, whatever its Host (a
    # Kubernetes pod's containerPort on the node's address, or ``listen`` in its table).
    listen: tuple[Address, ...] = ()

    @property
    def wakeable(self) -> bool:
        """Has something to wake (a command, a microVM or a container); otherwise always up."""
        return bool(self.command) or any(x is not None for x in (self.microvm, self.docker, self.oci))


@dataclass(frozen=True)
class DiscoverySettings:
    """[docker]: containers labelled wakegate.enable=true become services, live."""

    enabled: bool = False
    socket: str = DOCKER_SOCKET


KUBE_TAINT = "wakegate.dev/scale-to-zero=true:NoSchedule"  # only pods that tolerate it land on a wakegate node
KUBE_MAX_PODS = 110  # the kubelet's default maxPods
KUBE_LEASE_DURATION = 40.0  # the kubelet's node lease: 40 s, the node lifecycle controller's grace period
KUBE_RENEW_INTERVAL = 10.0  # the kubelet renews its lease every 10 s (a quarter of its duration)
KUBE_STATUS_INTERVAL = 60.0  # node status written this often when nothing changed; the kubelet's is 5 min
KUBE_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
KUBE_SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # what in_cluster reads
_KUBE_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_KUBE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")  # a DNS subdomain
_KUBE_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


@dataclass(frozen=True)
class KubernetesSettings:
    """[kubernetes]: this host is a Kubernetes node; the pods bound to it are wakegate services."""

    enabled: bool = False
    kubeconfig: str = ""  # a kubeconfig file; empty with in_cluster: the pod's service account
    in_cluster: bool = False
    node_name: str = ""
    node_address: str = ""  # every pod's IP, and where their containerPorts are served
    labels: tuple[tuple[str, str], ...] = ()
    taint: tuple[str, str, str] | None = None  # (key, value, effect); None: no taint
    capacity: tuple[tuple[str, str], ...] = ()  # pods, cpu, memory as Kubernetes quantities
    lease_duration: float = KUBE_LEASE_DURATION
    renew_interval: float = KUBE_RENEW_INTERVAL
    status_interval: float = KUBE_STATUS_INTERVAL
    docker_socket: str = DOCKER_SOCKET  # the Engine that runs pods' containers
    container_network: str = "bridge"  # the Engine network pods' containers join; their ports are published
    host_processes: bool = False  # pods may ask to run their command as a host process (annotation)
    microvm_assets: tuple[str, ...] = ()  # folders pods' microVM kernels and initrds may come from


def kube_label_problem(key: str, value: str) -> str | None:
    """What is wrong with a Kubernetes label (or annotation-free label) key and value, or None."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _KUBE_NAME.match(prefix)):
        return f"label key {key!r}: its prefix must be a DNS subdomain"
    if not name or len(name) > 63 or not _KUBE_LABEL_NAME.match(name):
        return f"label key {key!r}: the name must be 1-63 letters, digits, '-', '_' or '.', alphanumeric at both ends"
    if len(value) > 63 or not _KUBE_LABEL_NAME.match(value):
        return f"label {key}={value!r}: a value is at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends"
    return None


def _memory_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1])}Ki"
    except OSError:
        pass
    return "1Gi"


def _kubernetes(k: _Reader, path: str) -> KubernetesSettings:
    if not k.table:
        return KubernetesSettings()
    in_cluster = k.boolean("in_cluster", False)
    kubeconfig = k.string("kubeconfig", "")
    if bool(kubeconfig) == in_cluster:
        raise k.error("kubeconfig", "name exactly one of kubeconfig (a file) or in_cluster = true (the pod's "
                      "service account)")
    if kubeconfig:
        file = _beside(path, kubeconfig)
        if not file.is_file():
            raise k.error("kubeconfig", f"{str(file)!r} does not exist")
        try:
            from lightkube.config.kubeconfig import KubeConfig

            usable = KubeConfig.from_file(str(file)).get()
        except Exception as exc:  # yaml errors, missing contexts: lightkube raises several kinds
            raise k.error("kubeconfig", f"{str(file)!r} is not a usable kubeconfig: {exc}") from None
        if usable is None:
            raise k.error("kubeconfig", f"{str(file)!r} is not a usable kubeconfig: it has no current-context")
        kubeconfig = str(file)
    import socket as _socket

    node_name = k.string("node_name", _socket.gethostname().lower())
    if len(node_name) > 253 or not _KUBE_NAME.match(node_name):
        raise k.error("node_name", f"a node name is a DNS subdomain (lower-case letters, digits, '-' and '.'), got "
                      f"{node_name!r}")
    address = k.get("node_address")
    if not isinstance(address, str) or not address:
        raise k.error("node_address", "missing; the address pods get as their IP and their ports are served on, "
                      "reachable from the cluster, like \"10.0.0.5\"")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise k.error("node_address", f"expected an IP address, got {address!r}") from None
    if ip.is_loopback or ip.is_unspecified:
        raise k.error("node_address", f"{address} cannot be a pod's IP: Kubernetes refuses loopback endpoints, "
                      "and other nodes must reach it")
    labels = k.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise k.error("labels", 'expected a table of strings, like { "wakegate.dev/pool" = "edge" }')
    for key, value in labels.items():
        problem = kube_label_problem(key, value)
        if problem:
            raise k.error("labels", problem)
    taint_text = k.string("taint", KUBE_TAINT)
    taint = None
    if taint_text:
        m = re.fullmatch(r"([^=:\s]+)(?:=([^:\s]*))?:(\w+)", taint_text)
        if not m or m.group(3) not in KUBE_TAINT_EFFECTS or kube_label_problem(m.group(1), m.group(2) or ""):
            raise k.error("taint", f'expected "key=value:Effect" with Effect one of {", ".join(KUBE_TAINT_EFFECTS)}, '
                          f'or "" for none; got {taint_text!r}')
        taint = (m.group(1), m.group(2) or "", m.group(3))
    c = k.sub("capacity")
    capacity = {"pods": str(c.integer("pods", KUBE_MAX_PODS, 1, 100_000)),
                "cpu": c.string("cpu", str(len(os.sched_getaffinity(0)))),
                "memory": c.string("memory", _memory_total())}
    for key in ("cpu", "memory"):
        if not _KUBE_QUANTITY.match(capacity[key]):
            raise c.error(key, f'expected a Kubernetes quantity like "2", "500m", "8Gi", got {capacity[key]!r}')
    c.finish()
    lease = k.duration("lease_duration", KUBE_LEASE_DURATION)
    renew = k.duration("renew_interval", KUBE_RENEW_INTERVAL)
    if renew >= lease:
        raise k.error("renew_interval", f"must be shorter than lease_duration ({lease:g}s), or the lease lapses "
                      "between renewals")
    socket_path = k.string("docker_socket", DOCKER_SOCKET)
    if not socket_path.startswith("/"):
        raise k.error("docker_socket", f"expected the absolute path of the Engine's Unix socket, got {socket_path!r}")
    network = k.string("container_network", "bridge")
    if network in ("host", "none", ""):
        raise k.error("container_network", f"pods' containers need a network of their own to publish their port "
                      f"from (the node's address serves it), not {network!r}")
    assets = []
    for folder in k.strings("microvm_assets"):
        folder_path = _beside(path, folder)
        if not folder_path.is_dir():
            raise k.error("microvm_assets", f"{str(folder_path)!r} is not a folder")
        assets.append(str(folder_path.resolve()))
    status_interval = k.duration("status_interval", KUBE_STATUS_INTERVAL)
    host_processes = k.boolean("host_processes", False)
    k.finish()
    if in_cluster and not os.path.exists(KUBE_SERVICE_ACCOUNT_TOKEN):
        raise k.error("in_cluster", f"this is not a pod with a service account: {KUBE_SERVICE_ACCOUNT_TOKEN} does not "
                      "exist; use kubeconfig = \"FILE\" instead")
    return KubernetesSettings(
        enabled=True, kubeconfig=kubeconfig, in_cluster=in_cluster, node_name=node_name, node_address=str(ip),
        labels=tuple(sorted(labels.items())), taint=taint, capacity=tuple(capacity.items()),
        lease_duration=lease, renew_interval=renew,
        status_interval=status_interval, docker_socket=socket_path, container_network=network,
        host_processes=host_processes, microvm_assets=tuple(assets),
    )


@dataclass(frozen=True)
class TLSSettings:
    """[tls]: an HTTPS listener beside the proxy's plain one, and its certificates."""

    listen: Address | None = None  # None: no HTTPS listener
    certificates: tuple[tuple[tuple[str, ...], str, str], ...] = ()  # (hosts, cert, key); no hosts: the default


@dataclass(frozen=True)
class Config:
    path: str
    proxy: ProxySettings
    admin: AdminSettings
    services: dict[str, ServiceConfig] = field(default_factory=dict)
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    discovery: DiscoverySettings = DiscoverySettings()
    tls: TLSSettings = TLSSettings()
    kubernetes: KubernetesSettings = KubernetesSettings()


_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*([0-9]+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class _Reader:
    """Walks one table, remembering the dotted key for error messages."""

    def __init__(self, path: str, table: dict, prefix: str) -> None:
        self.path = path
        self.table = table
        self.prefix = prefix
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self.key(name)}: {problem}")

    def get(self, name: str, default=None):
        self.used.add(name)
        return self.table.get(name, default)

    def has(self, name: str) -> bool:
        return name in self.table

    def sub(self, name: str) -> "_Reader":
        value = self.get(name, {})
        if not isinstance(value, dict):
            raise self.error(name, f"expected a table, got {_kind(value)}")
        return _Reader(self.path, value, self.key(name))

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key (check the spelling; config.example.toml lists every key)")

    def duration(self, name: str, default: float, allow_zero: bool = False) -> float:
        value = self.get(name, default)
        seconds = parse_duration(value)
        if seconds is None:
            raise self.error(name, f'expected a duration like 30, "250ms", "30s" or "5m", got {value!r}')
        if seconds < 0 or (seconds == 0 and not allow_zero):
            raise self.error(name, f"must be greater than zero, got {value!r}")
        return seconds

    def size(self, name: str, default: int, minimum: int = 0) -> int:
        value = self.get(name, default)
        n = parse_size(value)
        if n is None:
            raise self.error(name, f'expected a size like 16384, "16KiB" or "10MiB", got {value!r}')
        if n < minimum:
            raise self.error(name, f"must be at least {minimum}, got {value!r}")
        return n

    def integer(self, name: str, default: int, minimum: int, maximum: int) -> int:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"expected a whole number, got {_kind(value)} {value!r}")
        if not minimum <= value <= maximum:
            raise self.error(name, f"must be between {minimum} and {maximum}, got {value}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, f"expected true or false, got {_kind(value)} {value!r}")
        return value

    def string(self, name: str, default: str) -> str:
        value = self.get(name, default)
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {_kind(value)} {value!r}")
        return value

    def strings(self, name: str) -> list[str]:
        value = self.get(name, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, f"expected a list of strings, got {value!r}")
        return value

    def address(self, name: str, default: str | None = None) -> Address:
        value = self.get(name, default)
        if value is None:
            raise self.error(name, 'missing; expected "host:port", for example "127.0.0.1:9001"')
        address = parse_address(value)
        if address is None:
            raise self.error(name, f'expected "host:port" (IPv6 as "[::1]:port"), got {value!r}')
        return address


def _kind(value) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "a table"}.get(
        type(value), type(value).__name__
    )


def parse_duration(value) -> float | None:
    """Seconds from 30, 0.25, "250ms", "30s", "5m" or "1h"; None if it is none of those."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    return None


def parse_size(value) -> int | None:
    """Bytes from 16384, "16KiB", "10MiB" or "1GB"; None if it is none of those."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    return None


def parse_address(value) -> Address | None:
    """Address from "127.0.0.1:8080", "[::1]:8080" or "localhost:8080"; None if invalid."""
    if not isinstance(value, str):
        return None
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:([0-9]{1,5})$", value) or re.match(r"^([A-Za-z0-9.-]+):([0-9]{1,5})$", value)
    if not m:
        return None
    host, port = m.group(1), int(m.group(2))
    if not 0 <= port <= 65535:
        return None
    if value.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    return Address(host, port)


def _check_host_pattern(reader: _Reader, pattern: str) -> str:
    p = pattern.strip().lower().rstrip(".")
    name = p[2:] if p.startswith("*.") else p
    if p.startswith("[") and p.endswith("]"):
        try:
            ipaddress.IPv6Address(p[1:-1])
            return p
        except ValueError:
            pass
    elif name and all(_HOST_LABEL.match(label) for label in name.split(".")):
        return p
    raise reader.error(
        "hosts", f'{pattern!r} is not a host name; use names like "app.example" or "*.app.example", without port'
    )


def _check_path(reader: _Reader, path: str, key: str = "paths") -> str:
    if not path.startswith("/") or any(c in path for c in " ?#") or not path.isprintable():
        raise reader.error(key, f'{path!r} is not a path; paths start with "/", like "/api"')
    return path


def _beside(path: str, value: str) -> Path:
    """Relative paths in a config mean: beside the config file."""
    return Path(value) if Path(value).is_absolute() else Path(path).resolve().parent / value


def _command(r: _Reader, path: str, command) -> dict:
    out: dict = {}
    if isinstance(command, str) or not isinstance(command, list) or not command or not all(
        isinstance(c, str) and c for c in command
    ):
        raise r.error("command", 'expected a non-empty list of strings, like ["python3", "app.py"]')
    out["command"] = tuple(command)
    cwd = r.get("cwd")
    if cwd is not None:
        if not isinstance(cwd, str):
            raise r.error("cwd", f"expected a string, got {_kind(cwd)}")
        cwd_path = _beside(path, cwd)
        if not cwd_path.is_dir():
            raise r.error("cwd", f"{cwd!r} is not a directory")
        out["cwd"] = str(cwd_path)
    else:
        out["cwd"] = str(Path(path).resolve().parent)  # relative paths mean: beside the config
    exe = command[0]
    if "/" in exe:
        program = Path(exe) if Path(exe).is_absolute() else Path(out["cwd"]) / exe
        if not program.exists():
            raise r.error("command", f"{exe!r} does not exist")
        if not program.is_file():
            raise r.error("command", f"{exe!r} is not a file")
        if not os.access(program, os.X_OK):
            raise r.error("command", f"{exe!r} is not executable (chmod +x it, or run it through its interpreter)")
    elif shutil.which(exe) is None:
        raise r.error("command", f"{exe!r} is not on PATH")
    env = r.get("env")
    if env is not None:
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise r.error("env", 'expected a table of strings, like { PORT = "9001" }')
        out["env"] = dict(env)
    return out


def _writable_dir(folder: Path) -> bool:
    """folder is, or can be made, a writable directory."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def _microvm(v: _Reader, path: str, upstream: Address, upstream_reader: _Reader) -> MicroVMConfig:
    from .guest import kvm_usable

    try:
        ipaddress.IPv4Address(upstream.host)
    except ValueError:
        raise upstream_reader.error(
            "upstream", f"a microVM's upstream is the host end of its port forward: an IPv4 address like "
            f'"127.0.0.1:{upstream.port}", got {str(upstream)!r}'
        ) from None
    if upstream.port == 0:
        raise upstream_reader.error("upstream", "a microVM needs a fixed port to forward, not 0")
    files = {}
    for key, required in (("kernel", True), ("initrd", False)):
        value = v.get(key)
        if value is None:
            if required:
                raise v.error(key, "missing; the guest kernel (an uncompressed vmlinux). "
                              "`wakegate microvm build` makes a demo guest in .cache/guest")
            files[key] = ""
            continue
        if not isinstance(value, str) or not value:
            raise v.error(key, f"expected a file path, got {_kind(value)} {value!r}")
        file = _beside(path, value)
        if not file.is_file():
            raise v.error(key, f"{str(file)!r} does not exist; `wakegate microvm build` makes a demo guest "
                          "in .cache/guest")
        try:
            with open(file, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise v.error(key, f"{str(file)!r} cannot be read by this user: {exc.strerror}") from None
        files[key] = str(file)
    qemu = v.string("qemu", QEMU_BINARY)
    found = shutil.which(qemu) if "/" not in qemu else (str(_beside(path, qemu)) if _beside(path, qemu).exists() else None)
    if found is None:
        raise v.error("qemu", f"{qemu!r} is not on PATH; install it with: apt-get install qemu-system-x86")
    accel = v.string("accel", "tcg")
    if accel not in MICROVM_ACCELS:
        raise v.error("accel", f'expected "tcg", "kvm" or "auto", got {accel!r}')
    if accel == "kvm" and not kvm_usable():
        raise v.error("accel", '"kvm" needs a readable and writable /dev/kvm on a CPU with vmx or svm; '
                      'use "tcg" (emulation) or "auto"')
    if accel == "auto":
        accel = "kvm" if kvm_usable() else "tcg"
    snapshot_dir = _beside(path, v.string("snapshot_dir", MICROVM_SNAPSHOT_DIR))
    if not _writable_dir(snapshot_dir):
        raise v.error("snapshot_dir", f"{str(snapshot_dir)!r} is not a directory wakegate can write to")
    warmup = tuple(_check_path(v, p, "warmup") for p in v.strings("warmup"))
    cmdline = v.string("cmdline", "")
    if not cmdline.isprintable():
        raise v.error("cmdline", "must be printable text on one line")
    snapshot_format = v.string("snapshot_format", "ram-file")
    if snapshot_format not in MICROVM_SNAPSHOT_FORMATS:
        raise v.error("snapshot_format", f'expected "ram-file" or "stream", got {snapshot_format!r}')
    return MicroVMConfig(
        kernel=files["kernel"],
        initrd=files["initrd"],
        guest_port=v.integer("guest_port", 80, 1, 65535),
        memory_mb=v.integer("memory_mb", MICROVM_MEMORY_DEFAULT_MB, MICROVM_MEMORY_MIN_MB, MICROVM_MEMORY_MAX_MB),
        cpus=v.integer("cpus", 1, 1, MICROVM_CPUS_MAX),
        accel=accel,
        snapshot_dir=str(snapshot_dir),
        qemu=found,
        cmdline=cmdline,
        warmup=warmup,
        snapshot_format=snapshot_format,
        standby=v.boolean("standby", True),
    )


def _criu(c: _Reader, path: str) -> CriuConfig:
    from .criu import find_criu

    configured = c.string("binary", "")
    binary, why = find_criu(str(_beside(path, configured)) if "/" in configured else configured)
    if binary is None:
        raise c.error("binary", why)
    snapshot_dir = _beside(path, c.string("snapshot_dir", MICROVM_SNAPSHOT_DIR))
    if not _writable_dir(snapshot_dir):
        raise c.error("snapshot_dir", f"{str(snapshot_dir)!r} is not a directory wakegate can write to")
    warmup = tuple(_check_path(c, p, "warmup") for p in c.strings("warmup"))
    return CriuConfig(binary=binary, snapshot_dir=str(snapshot_dir), warmup=warmup)


def _docker(d: _Reader) -> DockerConfig:
    socket = d.string("socket", DOCKER_SOCKET)
    if not socket.startswith("/"):
        raise d.error("socket", f"expected the absolute path of the Engine's Unix socket, got {socket!r}")
    container = d.string("container", "")
    labels = d.get("labels")
    if labels is not None:
        if not isinstance(labels, dict) or not labels or not all(isinstance(v, str) for v in labels.values()):
            raise d.error("labels", "expected a table of label = \"value\" strings, like "
                          "{ \"com.docker.compose.service\" = \"web\" }")
    if bool(container) == bool(labels):
        raise d.error("container" if container else "labels",
                      "name exactly one of container (a name or id) or labels (a selector)")
    if container and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", container):
        raise d.error("container", f"not a container name or id: {container!r}")
    return DockerConfig(
        socket=socket,
        container=container,
        labels=tuple(sorted(labels.items())) if labels else (),
        stop_timeout=d.duration("stop_timeout", DOCKER_STOP_TIMEOUT, allow_zero=True),
        api_timeout=d.duration("api_timeout", DOCKER_API_TIMEOUT),
        port=d.integer("port", 0, 0, 65535),
    )


def _oci(o: _Reader, path: str) -> OCIConfig:
    bundle = o.get("bundle")
    if not isinstance(bundle, str) or not bundle:
        raise o.error("bundle", "missing; the folder with the container's config.json and rootfs")
    folder = _beside(path, bundle)
    if not (folder / "config.json").is_file():
        raise o.error("bundle", f"{str(folder)!r} has no config.json (an OCI bundle: `runc spec` makes one)")
    runtime = o.string("runtime", "runc")
    found = shutil.which(runtime) if "/" not in runtime else (runtime if os.access(runtime, os.X_OK) else None)
    if found is None:
        hint = " (apt-get install runc)" if runtime == "runc" else ""
        raise o.error("runtime", f"{runtime!r} is not on PATH{hint}")
    if os.path.basename(runtime) not in OCI_RUNTIMES:
        raise o.error("runtime", f"expected one of {', '.join(OCI_RUNTIMES)} (their CLIs match), got {runtime!r}")
    container_id = o.string("container_id", "")
    if container_id and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", container_id):
        raise o.error("container_id", f"not a container id: {container_id!r}")
    log = o.string("log", "")
    return OCIConfig(bundle=str(folder), runtime=found, root=str(_beside(path, o.string("root", ""))) if o.has("root") else "",
                     container_id=container_id, stop_timeout=o.duration("stop_timeout", DOCKER_STOP_TIMEOUT, allow_zero=True),
                     log=str(_beside(path, log)) if log else "", runtime_args=tuple(o.strings("runtime_args")))


def _tls(t: _Reader, path: str) -> TLSSettings:
    if not t.table:
        return TLSSettings()
    listen = t.address("listen")
    entries = t.get("certificates")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise t.error("certificates", 'expected one or more [[tls.certificates]] tables with cert and key')
    out = []
    for i, entry in enumerate(entries):
        c = _Reader(path, entry, f"tls.certificates[{i}]")
        files = []
        for key in ("cert", "key"):
            value = c.get(key)
            if not isinstance(value, str) or not value:
                raise c.error(key, f"missing; the PEM file of the {'certificate chain' if key == 'cert' else 'private key'}")
            file = _beside(path, value)
            if not file.is_file():
                raise c.error(key, f"{str(file)!r} does not exist")
            files.append(str(file))
        hosts = tuple(_check_host_pattern(c, h) for h in c.strings("hosts"))
        c.finish()
        from proxy.tls import make_context

        try:
            make_context(*files)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise c.error("cert", f"cannot load {files[0]} with {files[1]}: {getattr(exc, 'reason', None) or exc}") from None
        out.append((hosts, files[0], files[1]))
    t.finish()
    return TLSSettings(listen=listen, certificates=tuple(out))


def _wasm(w: _Reader, path: str) -> WasmConfig:
    module = w.get("module")
    if not isinstance(module, str) or not module:
        raise w.error("module", 'missing; the path of the WebAssembly module, like "handlers/hello.wasm"')
    file = _beside(path, module)
    if not file.is_file():
        raise w.error("module", f"{str(file)!r} does not exist")
    with open(file, "rb") as f:
        if f.read(4) != b"\0asm":
            raise w.error("module", f"{str(file)!r} is not a WebAssembly module (no \\0asm magic)")
    env = w.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise w.error("env", 'expected a table of strings, like { GREETING = "hi" }')
    dirs = []
    for key, writable in (("dirs", False), ("writable_dirs", True)):
        table = w.get(key, {})
        if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
            raise w.error(key, 'expected a table of guest path = host folder, like { "/static" = "public" }')
        for guest, host in table.items():
            folder = _beside(path, host)
            if not guest.startswith("/"):
                raise w.error(key, f"guest path {guest!r} must be absolute")
            if not folder.is_dir():
                raise w.error(key, f"{str(folder)!r} (for {guest}) is not a folder")
            dirs.append((guest, str(folder), writable))
    cache = w.string("cache_dir", ".cache/wasm")
    return WasmConfig(
        module=str(file), cache_dir=str(_beside(path, cache)), env=tuple(env.items()), dirs=tuple(dirs),
        max_memory=w.size("max_memory", WASM_MAX_MEMORY, minimum=65536),
        max_time=w.duration("max_time", WASM_MAX_TIME),
        max_response=w.size("max_response", WASM_MAX_RESPONSE, minimum=1),
        max_body=w.size("max_body", WASM_MAX_BODY),
        instances=w.integer("instances", WASM_INSTANCES, 1, WASM_MAX_INSTANCES),
    )


_WAKE_KEYS = ("cwd", "env", "sleep", "snapshot_policy", "idle_timeout", "wake_timeout", "max_queue", "ready_path",
              "no_wake", "wait_page", "wait_page_after")


def _refuse(r: _Reader, keys, why: str) -> None:
    """The first of keys that the table has is an error: why."""
    for key in keys:
        if r.has(key):
            r.get(key)
            raise r.error(key, why)


def _lifecycle(r: _Reader, path: str, upstream: Address) -> dict:
    """The keys that make a service sleep and wake: a command or a microVM, and when and how."""
    out: dict = {}
    command = r.get("command")
    kinds = [k for k in ("command", "microvm", "docker", "oci", "wasm") if r.has(k)]
    if len(kinds) > 1:
        r.get(kinds[1])
        raise r.error(kinds[1], f"a service has one of a command, a microvm, a docker, an oci or a wasm table; this "
                      f"one also has {kinds[0]!r}")
    if r.has("wasm"):
        w = r.sub("wasm")
        out["wasm"] = _wasm(w, path)
        w.finish()
        _refuse(r, _WAKE_KEYS, "does not apply to a wasm service: each request runs in a fresh instance, "
                "there is nothing to wake")
        return out
    if command is not None:
        out.update(_command(r, path, command))
        modes = SLEEP_MODES
    elif r.has("microvm"):
        vm = r.sub("microvm")
        out["microvm"] = _microvm(vm, path, upstream, r)
        vm.finish()
        modes = MICROVM_SLEEP_MODES
        _refuse(r, ("cwd", "env"), "only applies to a service with a command, not to a microVM")
    elif r.has("docker"):
        d = r.sub("docker")
        out["docker"] = _docker(d)
        d.finish()
        modes = DOCKER_SLEEP_MODES
        _refuse(r, ("cwd", "env"), "only applies to a service with a command; a container has its own")
    elif r.has("oci"):
        o = r.sub("oci")
        out["oci"] = _oci(o, path)
        o.finish()
        modes = DOCKER_SLEEP_MODES
        _refuse(r, ("cwd", "env"), "only applies to a service with a command; the bundle's config.json has its own")
    else:
        _refuse(r, _WAKE_KEYS, "only applies to a service with a command, a microvm, a docker or an oci table "
                "(one wakegate can wake)")
        return out
    sleep = r.string("sleep", modes[0] if command is None else "stop")
    if sleep not in modes:
        quoted = " or ".join(f'"{m}"' for m in modes)
        raise r.error("sleep", f"expected {quoted}, got {sleep!r}")
    out["sleep"] = sleep
    if command is not None and (sleep == "snapshot" or r.has("criu")):
        c = r.sub("criu")
        if sleep != "snapshot":
            raise r.error("criu", 'only applies to a service with sleep = "snapshot"')
        out["criu"] = _criu(c, path)
        c.finish()
    if r.has("snapshot_policy"):
        policy = r.string("snapshot_policy", "stateful")
        if sleep != "snapshot":
            raise r.error("snapshot_policy", 'only applies to a service with sleep = "snapshot"')
        if policy not in SNAPSHOT_POLICIES:
            raise r.error("snapshot_policy", f'expected "stateful" or "prepared", got {policy!r}')
        out["snapshot_policy"] = policy
    out["idle_timeout"] = r.duration("idle_timeout", IDLE_TIMEOUT)
    out["wake_timeout"] = r.duration("wake_timeout", WAKE_TIMEOUT)
    out["max_queue"] = r.integer("max_queue", MAX_QUEUE, 1, 1_000_000)
    ready_path = r.string("ready_path", "/")
    if not ready_path.startswith("/") or not ready_path.isprintable() or " " in ready_path:
        raise r.error("ready_path", f'expected a path like "/" or "/healthz", got {ready_path!r}')
    out["ready_path"] = ready_path
    out["wait_page"] = r.boolean("wait_page", False)
    out["wait_page_after"] = r.duration("wait_page_after", 1.0, allow_zero=True)
    w = r.sub("no_wake")
    out["no_wake"] = NoWake(
        paths=tuple(_check_path(w, p) for p in w.strings("paths")),
        user_agents=tuple(w.strings("user_agents")),
        status=w.integer("status", 503, 200, 599),
    )
    w.finish()
    return out


def load(path: str | Path) -> Config:
    """Read and validate a config file."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {_not_utf8(raw, exc.start)}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_dict(data, path)


def _not_utf8(raw: bytes, offset: int) -> str:
    """Where a byte that is not UTF-8 sits: the key of its line when there is one, and the line."""
    line_no = raw.count(b"\n", 0, offset) + 1
    table = ""
    for line in raw[:offset].split(b"\n")[:-1]:
        header = re.match(rb"\s*\[+\s*([^\]]+?)\s*\]", line)
        if header:
            table = header.group(1).decode("utf-8", "replace").replace('"', "")
    current = raw[raw.rfind(b"\n", 0, offset) + 1:].split(b"\n", 1)[0]
    key = re.match(rb"\s*([A-Za-z0-9_.\-\"]+)\s*=", current)
    where = f"line {line_no}"
    if key:
        name = key.group(1).decode().replace('"', "")
        where = f"{table}.{name}" if table else name
        where += f" (line {line_no})"
    return f"{where}: byte 0x{raw[offset]:02x} is not UTF-8; a TOML file must be UTF-8"


def from_dict(data: dict, path: str = "<config>") -> Config:
    """Validate a parsed TOML document."""
    top = _Reader(path, data, "")
    p = top.sub("proxy")
    proxy = ProxySettings(
        listen=p.address("listen", DEFAULT_LISTEN),
        head_timeout=p.duration("head_timeout", HEAD_TIMEOUT),
        keepalive_timeout=p.duration("keepalive_timeout", KEEPALIVE_TIMEOUT),
        body_timeout=p.duration("body_timeout", BODY_TIMEOUT),
        connect_timeout=p.duration("connect_timeout", CONNECT_TIMEOUT),
        upstream_timeout=p.duration("upstream_timeout", UPSTREAM_TIMEOUT),
        tunnel_timeout=p.duration("tunnel_timeout", TUNNEL_TIMEOUT),
        send_timeout=p.duration("send_timeout", SEND_TIMEOUT),
        drain_timeout=p.duration("drain_timeout", DRAIN_TIMEOUT, allow_zero=True),
        max_head_size=p.size("max_head_size", MAX_HEAD_SIZE, minimum=256),
        max_body_size=p.size("max_body_size", MAX_BODY_SIZE),
        upstream_keepalive=p.integer("upstream_keepalive", UPSTREAM_KEEPALIVE, 0, 100_000),
        upstream_max_connections=p.integer("upstream_max_connections", UPSTREAM_MAX_CONNECTIONS, 0, 1_000_000),
        default_service=p.string("default_service", ""),
        unknown_host_status=p.integer("unknown_host_status", 404, 400, 599),
        workers=p.integer("workers", default_workers(), 1, MAX_WORKERS),
    )
    if proxy.unknown_host_status not in UNKNOWN_HOST_STATUSES:
        raise p.error("unknown_host_status", f"must be 404 or 421, got {proxy.unknown_host_status}")
    p.finish()

    a = top.sub("admin")
    admin = AdminSettings(listen=a.address("listen", DEFAULT_ADMIN_LISTEN), token=a.string("token", ""),
                          idle_timeout=a.duration("idle_timeout", ADMIN_IDLE_TIMEOUT))
    a.finish()

    lg = top.sub("log")
    log_settings = LogSettings(access=lg.string("access", ""), server_timing=lg.boolean("server_timing", False))
    if log_settings.access not in ("", "-"):
        folder = Path(log_settings.access).resolve().parent
        if not folder.is_dir():
            raise lg.error("access", f"folder {str(folder)!r} does not exist")
    lg.finish()
    m = top.sub("metrics")
    metrics_settings = MetricsSettings(enabled=m.boolean("enabled", True))
    m.finish()

    services: dict[str, ServiceConfig] = {}
    s = top.sub("services")
    seen: dict[tuple[str, str], str] = {}
    listened: dict[Address, str] = {}
    for name in list(s.table):
        r = s.sub(name)
        if not _NAME.match(name):
            raise top.error(f"services.{name}", "service names use letters, digits, '-', '_' and '.'")
        service = _service(r, name, path, hosts_optional=name == proxy.default_service)
        hosts, paths = service.hosts, service.paths
        for host in hosts:
            for prefix in paths or ("",):
                other = seen.setdefault((host, prefix), name)
                if other != name:
                    where = f"{host}{prefix}"
                    raise r.error("hosts", f"{where!r} is already routed to service {other!r}")
        for address in service.listen:
            other = listened.setdefault(address, name)
            if other != name:
                raise r.error("listen", f"{str(address)!r} is already the listener of service {other!r}")
            if address in (proxy.listen, admin.listen):
                raise r.error("listen", f"{str(address)!r} is the {'proxy' if address == proxy.listen else 'admin'} "
                              "listener")
        services[name] = service
    s.used.update(s.table)
    tls = _tls(top.sub("tls"), path)
    if tls.listen is not None and tls.listen in listened:
        raise s.sub(listened[tls.listen]).error("listen", f"{str(tls.listen)!r} is the tls listener")
    d = top.sub("docker")
    discovery = DiscoverySettings(enabled=d.boolean("discover", False), socket=d.string("socket", DOCKER_SOCKET))
    if not discovery.socket.startswith("/"):
        raise d.error("socket", f"expected the absolute path of the Engine's Unix socket, got {discovery.socket!r}")
    d.finish()
    kubernetes = _kubernetes(top.sub("kubernetes"), path)
    top.finish()

    if proxy.default_service and proxy.default_service not in services:
        raise p.error("default_service", f"names no service; known: {', '.join(sorted(services)) or 'none'}")
    if not services and not discovery.enabled and not kubernetes.enabled:
        raise top.error("services", "no services configured; add a [services.NAME] table (or discover containers: "
                        "[docker] discover = true, or run pods: [kubernetes])")
    return Config(path=path, proxy=proxy, admin=admin, services=services, log=log_settings, metrics=metrics_settings,
                  discovery=discovery, tls=tls, kubernetes=kubernetes)


def _service(r: _Reader, name: str, path: str, hosts_optional: bool = False) -> ServiceConfig:
    """One service's table (or a container's labels, or a pod, read as one)."""
    hosts = tuple(_check_host_pattern(r, h) for h in r.strings("hosts"))
    paths = tuple(_check_path(r, x) for x in r.strings("paths"))
    listen = []
    for value in r.strings("listen"):
        address = parse_address(value)
        if address is None or address.port == 0:
            raise r.error("listen", f'expected "host:port" with a port (IPv6 as "[::1]:port"), got {value!r}')
        if address in listen:
            raise r.error("listen", f"{value!r} is listed twice")
        listen.append(address)
    if r.has("wasm") and listen:
        raise r.error("listen", "a wasm service is answered by Host; it cannot have listeners of its own")
    if not hosts and not hosts_optional and not listen:
        raise r.error("hosts", 'missing; list the Host names this service answers, like ["app.example"] '
                      '(or give it listeners of its own: listen = ["127.0.0.1:9100"])')
    docker = r.table.get("docker")
    if not r.has("upstream") and isinstance(docker, dict) and docker.get("port"):
        upstream = Address("127.0.0.1", 0)  # found at each wake from the container (DockerConfig.port)
    elif r.has("wasm"):
        if r.has("upstream"):
            r.get("upstream")
            raise r.error("upstream", "a wasm service is answered by wakegate itself; it has no upstream")
        upstream = Address("127.0.0.1", 0)  # each proxy process's own handler listener, set when it starts
    else:
        upstream = r.address("upstream")
    lifecycle = _lifecycle(r, path, upstream)
    r.finish()
    return ServiceConfig(name=name, hosts=hosts, paths=paths, upstream=upstream, listen=tuple(listen), **lifecycle)


# Docker labels that make a container a service (README "Discovery"): wakegate.enable=true, then
# wakegate.<key> for the service keys below. Lists are comma-separated.
LABEL_PREFIX = "wakegate."
LABEL_KEYS = ("service", "hosts", "paths", "upstream", "port", "sleep", "idle_timeout", "wake_timeout",
              "ready_path", "max_queue")


def service_from_labels(container: str, labels: dict[str, str], socket: str) -> ServiceConfig:
    """The service a labelled container declares; ConfigError naming the container and the label."""
    where = f"container {container}"
    table: dict = {}
    for label, value in labels.items():
        if not label.startswith(LABEL_PREFIX) or label == LABEL_PREFIX + "enable":
            continue
        key = label[len(LABEL_PREFIX):]
        if key not in LABEL_KEYS:
            raise ConfigError(f"{where}: label {label}: unknown; known: {', '.join(LABEL_PREFIX + k for k in LABEL_KEYS)}")
        table[key] = value
    name = table.pop("service", container)
    if not _NAME.match(name):
        raise ConfigError(f"{where}: label {LABEL_PREFIX}service: service names use letters, digits, '-', '_' and '.'")
    for key in ("hosts", "paths"):
        if key in table:
            table[key] = [x.strip() for x in table[key].split(",") if x.strip()]
    port = table.pop("port", None)
    if "upstream" not in table and port is None:
        raise ConfigError(f"{where}: label {LABEL_PREFIX}port: missing; the port the container listens on "
                          f"(on the host network, or published), or {LABEL_PREFIX}upstream")
    if "max_queue" in table:
        try:
            table["max_queue"] = int(table["max_queue"])
        except ValueError:
            raise ConfigError(f"{where}: label {LABEL_PREFIX}max_queue: expected a whole number") from None
    # Replicas share the service label: all of them are the service; otherwise the container alone.
    selector = {"labels": {LABEL_PREFIX + "service": name}} if f"{LABEL_PREFIX}service" in labels \
        else {"container": container}
    table["docker"] = {"socket": socket, **selector}
    if port is not None and "upstream" not in table:
        try:
            table["docker"]["port"] = int(port)
        except ValueError:
            raise ConfigError(f"{where}: label {LABEL_PREFIX}port: expected a port number, got {port!r}") from None
    return _service(_Reader(where, table, "label wakegate"), name, where)


def service_from_table(where: str, name: str, table: dict) -> ServiceConfig:
    """A service table built by code (a Kubernetes pod, controller/kube/pods.py), validated as one in
    the file would be; errors start with where, and relative paths are not expected."""
    if not _NAME.match(name):
        raise ConfigError(f"{where}: service name {name!r}: letters, digits, '-', '_' and '.', at most 63")
    return _service(_Reader(where, table, ""), name, where, hosts_optional=True)
