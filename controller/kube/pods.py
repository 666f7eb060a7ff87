"""From a pod bound to this node to the wakegate service that runs it, or ``CannotRun`` with the reason
Kubernetes shows. Pure: a pod is its API JSON (a dict), nothing here talks to a server.

A pod runs as a container from its image (the container backend, through the Docker Engine; the
image must be on the node already), or, with ``wakegate.dev/run: process``, its command as a host
process, or, with ``wakegate.dev/run: microvm``, a QEMU microVM from a kernel and initrd on the host.
Its one containerPort is served on the node's address; annotations choose the sleep mode, the idle
timeout, no-wake rules and Host names (ANNOTATIONS lists them).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from ..config import (DOCKER_SLEEP_MODES, MICROVM_MEMORY_DEFAULT_MB, MICROVM_MEMORY_MAX_MB, MICROVM_MEMORY_MIN_MB,
                      MICROVM_SLEEP_MODES, ConfigError, ServiceConfig, parse_duration, service_from_table)

PREFIX = "wakegate.dev/"
# Every annotation wakegate reads, with what it means (README "Kubernetes" shows the same).
ANNOTATIONS = {
    "run": "container (default), process (the command on the host) or microvm",
    "sleep": "pause or stop (container, process); snapshot or pause (microvm)",
    "idle-timeout": 'a duration like "30s" or "5m" (default 5m)',
    "wake-timeout": 'a duration (default 30s)',
    "max-queue": "held requests while it wakes (default 10000)",
    "hosts": "comma-separated Host names the main listener routes to the pod",
    "paths": "comma-separated path prefixes, with hosts",
    "ready-path": "the readiness path (default: readinessProbe.httpGet.path, else /)",
    "no-wake-paths": "comma-separated path prefixes that never wake it (monitors)",
    "no-wake-user-agents": "comma-separated User-Agent substrings that never wake it",
    "microvm-kernel": "the guest kernel on the host (run: microvm)",
    "microvm-initrd": "the guest initrd on the host (run: microvm)",
    "microvm-memory": "the guest's memory in MB (run: microvm; default 128)",
}
RUN_KINDS = ("container", "process", "microvm")
# Labels that differ between replicas of one app (ReplicaSet and StatefulSet revisions): ignored when
# telling whether two pods on this node are replicas that may share a containerPort.
REVISION_LABELS = ("pod-template-hash", "controller-revision-hash")
# Volumes every pod gets from the ServiceAccount admission plugin: not mounted (the service gets no
# API credentials), and no reason to refuse the pod.
TOKEN_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
FIELD_REFS = ("metadata.name", "metadata.namespace", "metadata.uid", "spec.nodeName", "spec.serviceAccountName",
              "status.podIP", "status.hostIP")
MAX_SERVICE_NAME = 63  # config's service names: letters, digits, '-', '_', '.'


class CannotRun(Exception):
    """A pod wakegate cannot run: ``reason`` (a CamelCase word, as the kubelet's waiting reasons) and
    a message that says what to change."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class PodPlan:
    """What wakegate does for one pod."""

    uid: str
    namespace: str
    name: str
    service: ServiceConfig  # listen: the node's address and the containerPort
    kind: str  # one of RUN_KINDS
    container_name: str  # the pod's container
    image: str
    port: int  # the containerPort served on the node's address
    replicas: tuple  # pods with the same key on this node are replicas and may share the port
    docker_name: str = ""  # kind container: the Engine's container for it
    docker_create: dict | None = None  # kind container: the Engine's create body


def service_name(namespace: str, name: str, uid: str) -> str:
    """NAMESPACE.POD, or cut with a piece of the uid when too long for a service name."""
    full = f"{namespace}.{name}"
    if len(full) <= MAX_SERVICE_NAME:
        return full
    tail = hashlib.sha256(uid.encode()).hexdigest()[:8]
    return f"{full[:MAX_SERVICE_NAME - 9].rstrip('.-')}-{tail}"


def docker_container_name(node: str, namespace: str, name: str, uid: str) -> str:
    """The kubelet's shape (k8s_CONTAINER_POD_NAMESPACE_UID), one per pod and node."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"wakegate_{node}_{namespace}_{name}_{uid[:8]}")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) in command, args and env values: a defined variable is replaced, $$ is a
    literal $, anything else is left as it is."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if text.startswith("$(", i):
            end = text.find(")", i + 2)
            if end > 0 and text[i + 2:end] in env:
                out.append(env[text[i + 2:end]])
                i = end + 1
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _field(pod: dict, path: str, node_address: str) -> str:
    if path in ("status.podIP", "status.hostIP"):
        return node_address
    value = pod
    for part in path.split("."):
        value = (value or {}).get(part)
    return "" if value is None else str(value)


def _env(pod: dict, container: dict, node_address: str) -> dict[str, str]:
    env: dict[str, str] = {}
    if container.get("envFrom"):
        raise CannotRun("CreateContainerConfigError", "envFrom (a whole ConfigMap or Secret) is not supported on a "
                        "wakegate node")
    for var in container.get("env") or []:
        name = var.get("name", "")
        source = var.get("valueFrom")
        if source is None:
            env[name] = expand(var.get("value") or "", env)
            continue
        ref = source.get("fieldRef")
        if ref is None or ref.get("fieldPath") not in FIELD_REFS:
            what = next(iter(source), "valueFrom")
            raise CannotRun("CreateContainerConfigError", f"env {name}: {what} is not supported on a wakegate node "
                            f"(only fieldRef to {', '.join(FIELD_REFS)})")
        env[name] = _field(pod, ref["fieldPath"], node_address)
    return env


def _list(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def _annotations(pod: dict) -> dict[str, str]:
    found = {}
    for key, value in ((pod.get("metadata") or {}).get("annotations") or {}).items():
        if key.startswith(PREFIX):
            name = key[len(PREFIX):]
            if name not in ANNOTATIONS:
                raise CannotRun("InvalidAnnotation", f"{key}: unknown; known: "
                                f"{', '.join(PREFIX + a for a in ANNOTATIONS)}")
            found[name] = value
    return found


def _check_volumes(spec: dict, container: dict) -> None:
    token_volumes = set()
    for mount in container.get("volumeMounts") or []:
        if mount.get("mountPath") == TOKEN_MOUNT:
            token_volumes.add(mount.get("name"))
        else:
            raise CannotRun("UnsupportedVolume", f"volume {mount.get('name')!r} mounted at {mount.get('mountPath')}: "
                            "wakegate nodes mount no volumes")
    for volume in spec.get("volumes") or []:
        if volume.get("name") in token_volumes:
            continue
        kind = next((k for k in volume if k != "name"), "volume")
        raise CannotRun("UnsupportedVolume", f"volume {volume.get('name')!r} ({kind}): wakegate nodes mount no volumes")


def _port(container: dict) -> int:
    ports = [p for p in container.get("ports") or [] if p.get("containerPort")]
    if any((p.get("protocol") or "TCP") != "TCP" for p in ports):
        raise CannotRun("UnsupportedPort", "only TCP containerPorts are served (HTTP)")
    if len(ports) != 1:
        declared = ", ".join(str(p["containerPort"]) for p in ports) or "none"
        raise CannotRun("UnsupportedPort", f"wakegate serves exactly one containerPort per pod (declared: {declared})")
    return int(ports[0]["containerPort"])


def _ready_path(container: dict, annotations: dict) -> str:
    if "ready-path" in annotations:
        return annotations["ready-path"]
    probe = (container.get("readinessProbe") or {}).get("httpGet") or {}
    return probe.get("path") or "/"


def plan_pod(pod: dict, settings, *, upstream_port: int, base_dir: str) -> PodPlan:
    """The plan for one pod, or CannotRun. upstream_port is a free loopback port for a process or a
    microVM (a container's is published by the Engine); base_dir holds the microVM snapshots."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    namespace, name, uid = meta.get("namespace", "default"), meta.get("name", ""), meta.get("uid", "")
    containers = spec.get("containers") or []
    if len(containers) != 1:
        raise CannotRun("UnsupportedPod", f"wakegate runs one container per pod; this one has {len(containers)}")
    if spec.get("initContainers"):
        raise CannotRun("UnsupportedPod", "init containers are not supported on a wakegate node")
    container = containers[0]
    _check_volumes(spec, container)
    annotations = _annotations(pod)
    kind = annotations.get("run", "container")
    if kind not in RUN_KINDS:
        raise CannotRun("InvalidAnnotation", f"{PREFIX}run: expected one of {', '.join(RUN_KINDS)}, got {kind!r}")
    if kind == "process" and not settings.host_processes:
        raise CannotRun("HostProcessesNotAllowed", f"{PREFIX}run: process runs the pod's command on the host; this "
                        "node allows it only with [kubernetes] host_processes = true")
    port = _port(container)
    address = settings.node_address
    listen = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    table: dict = {"listen": [listen], "ready_path": _ready_path(container, annotations)}
    for key in ("hosts", "paths"):
        if key in annotations:
            table[key] = _list(annotations[key])
    for key in ("idle-timeout", "wake-timeout"):
        if key in annotations:
            if parse_duration(annotations[key]) is None:
                raise CannotRun("InvalidAnnotation", f'{PREFIX}{key}: expected a duration like "30s" or "5m", got '
                                f"{annotations[key]!r}")
            table[key.replace("-", "_")] = annotations[key]
    if "max-queue" in annotations:
        if not annotations["max-queue"].isdigit():
            raise CannotRun("InvalidAnnotation", f"{PREFIX}max-queue: expected a whole number, got "
                            f"{annotations['max-queue']!r}")
        table["max_queue"] = int(annotations["max-queue"])
    no_wake = {key: _list(annotations[f"no-wake-{key.replace('_', '-')}"])
               for key in ("paths", "user_agents") if f"no-wake-{key.replace('_', '-')}" in annotations}
    if no_wake:
        table["no_wake"] = no_wake
    env = _env(pod, container, address)
    image = container.get("image") or ""
    docker_name, create = "", None
    if kind == "container":
        modes = DOCKER_SLEEP_MODES
        docker_name = docker_container_name(settings.node_name, namespace, name, uid)
        table["docker"] = {"socket": settings.docker_socket, "container": docker_name, "port": port}
        create = _docker_create(container, env, settings, port, meta, image)
    elif kind == "process":
        modes = ("pause", "stop")
        env = {"PORT": str(upstream_port), **env}
        argv = [expand(a, env) for a in (container.get("command") or []) + (container.get("args") or [])]
        if not argv:
            raise CannotRun("CreateContainerConfigError", "run: process needs the container's command (or args): a "
                            "host process has no image entrypoint to fall back on")
        table.update(command=argv, env=env, upstream=f"127.0.0.1:{upstream_port}")
        working_dir = container.get("workingDir") or "/"
        if not os.path.isabs(working_dir):
            raise CannotRun("CreateContainerConfigError", f"workingDir {working_dir!r} is not an absolute path")
        table["cwd"] = working_dir
    else:
        modes = MICROVM_SLEEP_MODES
        table["upstream"] = f"127.0.0.1:{upstream_port}"
        table["microvm"] = _microvm_table(annotations, settings, port, base_dir)
    sleep = annotations.get("sleep", modes[0])
    if sleep not in modes:
        raise CannotRun("InvalidAnnotation", f"{PREFIX}sleep: expected {' or '.join(modes)} for run: {kind}, got "
                        f"{sleep!r}")
    table["sleep"] = sleep
    where = f"pod {namespace}/{name}"
    try:
        service = service_from_table(where, service_name(namespace, name, uid), table)
    except ConfigError as exc:
        message = str(exc)[len(where) + 2:] if str(exc).startswith(where + ": ") else str(exc)
        reason = "RunContainerError" if message.startswith(("command:", "cwd:")) else "CreateContainerConfigError"
        raise CannotRun(reason, message) from None
    labels = {k: v for k, v in (meta.get("labels") or {}).items() if k not in REVISION_LABELS}
    return PodPlan(uid=uid, namespace=namespace, name=name, service=service, kind=kind,
                   container_name=container.get("name", ""), image=image, port=port,
                   replicas=(namespace, port, tuple(sorted(labels.items()))),
                   docker_name=docker_name, docker_create=create)


def _microvm_table(annotations: dict, settings, port: int, base_dir: str) -> dict:
    files = {}
    for key in ("kernel", "initrd"):
        value = annotations.get(f"microvm-{key}")
        if not value:
            if key == "initrd":
                continue
            raise CannotRun("InvalidAnnotation", f"{PREFIX}microvm-kernel: missing; the guest kernel's path on the node")
        real = os.path.realpath(value)
        if not any(real == folder or real.startswith(folder.rstrip("/") + "/") for folder in settings.microvm_assets):
            allowed = ", ".join(settings.microvm_assets) or "none: set [kubernetes] microvm_assets"
            raise CannotRun("InvalidAnnotation", f"{PREFIX}microvm-{key}: {value} is outside the folders this node "
                            f"takes microVM assets from ({allowed})")
        files[key] = real
    memory = annotations.get("microvm-memory", str(MICROVM_MEMORY_DEFAULT_MB))
    if not memory.isdigit() or not MICROVM_MEMORY_MIN_MB <= int(memory) <= MICROVM_MEMORY_MAX_MB:
        raise CannotRun("InvalidAnnotation", f"{PREFIX}microvm-memory: MB between {MICROVM_MEMORY_MIN_MB} and "
                        f"{MICROVM_MEMORY_MAX_MB}, got {memory!r}")
    return {**files, "guest_port": port, "memory_mb": int(memory),
            "snapshot_dir": os.path.join(base_dir, ".cache", "kube-snapshots")}


def _docker_create(container: dict, env: dict, settings, port: int, meta: dict, image: str) -> dict:
    """The Engine's create body for the pod's container: Kubernetes' command and args replace the
    image's entrypoint and cmd (a command alone drops the image's cmd too), the port published on a
    loopback port the Engine picks (read at each wake), labels that name the pod."""
    command = [expand(a, env) for a in container.get("command") or []]
    args = [expand(a, env) for a in container.get("args") or []]
    body: dict = {
        "Image": image,
        "Env": [f"{k}={v}" for k, v in env.items()],
        "ExposedPorts": {f"{port}/tcp": {}},
        "Labels": {"io.kubernetes.pod.name": meta.get("name", ""),
                   "io.kubernetes.pod.namespace": meta.get("namespace", "default"),
                   "io.kubernetes.pod.uid": meta.get("uid", ""), PREFIX + "node": settings.node_name},
        "HostConfig": {"NetworkMode": settings.container_network,
                       "PortBindings": {f"{port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]},
                       "RestartPolicy": {"Name": "no"}},
    }
    if command:
        body["Entrypoint"] = command
        body["Cmd"] = args
    elif args:
        body["Cmd"] = args
    if container.get("workingDir"):
        body["WorkingDir"] = container["workingDir"]
    body["Labels"][PREFIX + "spec"] = hashlib.sha256(repr(sorted(body.items())).encode()).hexdigest()[:16]
    return body
