"""``python -m bench k8s``: a sleeping pod on a wakegate node against the Kubernetes way of scaling
from zero, on the same control plane (bench/kubecluster.py) in the same run.

- wakegate: a pod that sleeps while Kubernetes shows it Running and Ready. Per cycle: an awake request,
  then the pod put to sleep (the admin API), then the first request, which wakes it. Three pods: the
  backend as a host process frozen (pause) or stopped (a cold start), and a busybox httpd container
  paused through the Docker Engine.
- Kubernetes: a Deployment of the same busybox container scaled from 0 to 1 through its scale
  subresource on a real kubelet (dockershim, the same kind of Docker Engine), its Service's
  Endpoints watched until they list the new pod (its readiness probe at the kubelet's shortest
  period, 1 s), then the same request. Between cycles the Deployment goes back to 0 and the pod
  is gone. The same 0 -> 1 with the wakegate node as the target shows the control plane's own part.
Every request is on a fresh connection from the network namespace to the pod's address, as a client
of the Service would make it.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .common import ROOT, free_port, stop_process
from .kubecluster import (ControlPlane, Kubelet, NetNamespace, create, deployment, endpoints, node_config,
                          service_manifest, unavailable, wait_for)

GROUP = "bench"  # the wakegate node's wakegate.dev/test label
NODE = "bench-0"
KUBELET = "bench-kubelet"
PORT = 8080


def httpd(address_env: bool = False) -> dict:
    """busybox httpd from bench/engine.py's image, on the containerPort (on the pod's IP on a host network)."""
    listen = "$(POD_IP):8080" if address_env else "8080"
    from .engine import IMAGE

    container = {"name": "httpd", "image": IMAGE, "imagePullPolicy": "Never",
                 "ports": [{"containerPort": PORT}],
                 "command": ["/bin/busybox", "httpd", "-f", "-p", listen, "-h", "/www"],
                 "readinessProbe": {"httpGet": {"path": "/", "port": PORT}, "periodSeconds": 1}}
    if address_env:
        container["env"] = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    return container


def _request(net: NetNamespace, address: str, path: str) -> float:
    """Seconds from connecting to the whole answer of one GET, on a fresh connection from the namespace."""
    started = time.perf_counter()
    sock = net.connect(address, PORT, timeout=30)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench.example\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    elapsed = time.perf_counter() - started
    if not data.startswith(b"HTTP/1.") or data[9:12] != b"200":
        raise RuntimeError(f"bench k8s: unexpected answer {data[:80]!r}")
    return elapsed


def _ms(values: list[float]) -> dict:
    values = sorted(values)
    return {"p50": statistics.median(values) * 1e3, "p90": values[int(len(values) * 0.9)] * 1e3,
            "min": values[0] * 1e3, "max": values[-1] * 1e3, "n": len(values)}


class Node:
    """A wakegate that is node bench-0 of the cluster, one worker, its admin API for sleeping pods."""

    def __init__(self, tmp: Path, cluster: ControlPlane, address: str, engine_socket: str, network: str) -> None:
        self.admin_port = free_port()
        config = tmp / "node.toml"
        config.write_text(f'[proxy]\nlisten = "127.0.0.1:{free_port()}"\nworkers = 1\n'
                          f'[admin]\nlisten = "127.0.0.1:{self.admin_port}"\n'
                          + node_config(cluster, 0, NODE, address, GROUP,
                                        f'renew_interval = "2s"\ndocker_socket = "{engine_socket}"\n'
                                        f'container_network = "{network}"'))
        self.log = open(tmp / "node.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "serve", "-c", str(config)],
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def admin(self, method: str, path: str):
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def service(self, name: str) -> dict:
        return next(s for s in self.admin("GET", "/services")["services"] if s["name"] == name)

    def log_tail(self, size: int = 3000) -> str:
        return Path(self.log.name).read_text(errors="replace")[-size:]

    def close(self) -> None:
        stop_process(self.proc, 30)
        self.log.close()


def _pod_of(client, app: str):
    from lightkube.resources.core_v1 import Pod

    return wait_for(f"a pod of {app}", lambda: next(
        (p for p in client.list(Pod, namespace="default", labels={"app": app})
         if p.status and p.status.podIP and not p.metadata.deletionTimestamp), None), timeout=60)


def _wakegate_cycles(client, net, node: Node, app: str, annotations: dict, container: dict | None, path: str,
                     cycles: int, progress) -> dict:
    """Awake request, sleep, first request; and whether Kubernetes saw any change meanwhile."""
    from lightkube.resources.apps_v1 import Deployment
    from lightkube.resources.core_v1 import Pod

    create(client, deployment(app, 1, ("wakegate.dev/test", GROUP), {**annotations, "wakegate.dev/idle-timeout": "1h"},
                              container=container))
    pod = _pod_of(client, app).metadata.name
    service = f"default.{pod}"
    wait_for("the pod's service", lambda: any(s["name"] == service for s in node.admin("GET", "/services")["services"]))
    address = net.addresses[0]
    _request(net, address, path)  # its first start
    version = client.get(Pod, pod, namespace="default").metadata.resourceVersion
    awake, first = [], []
    for i in range(cycles):
        awake.append(_request(net, address, path))
        node.admin("POST", f"/services/{service}/sleep")
        wait_for("asleep", lambda: node.service(service)["state"] == "asleep", timeout=30, every=0.005)
        first.append(_request(net, address, path))
        if i % 10 == 9 or i == cycles - 1:
            progress(f"  k8s: {app} cycle {i + 1}/{cycles}: first request {first[-1] * 1e3:.2f} ms, "
                     f"awake {awake[-1] * 1e3:.2f} ms")
    after = client.get(Pod, pod, namespace="default")
    ready = any(c.type == "Ready" and c.status == "True" for c in after.status.conditions or [])
    wakes = node.service(service)["wakes"]
    client.delete(Deployment, app, namespace="default")
    wait_for("the pod gone", lambda: not list(client.list(Pod, namespace="default", labels={"app": app})), timeout=60)
    return {"awake": _ms(awake), "first_request": _ms(first), "added": _ms([f - a for f, a in zip(first, awake)]),
            "wakes": wakes, "ready_throughout": ready,
            "status_writes_during_cycles": after.metadata.resourceVersion != version}


def _scale_cycles(client, net, app: str, node_label: tuple, address: str, annotations: dict, container: dict | None,
                  path: str, cycles: int, progress, **spec) -> dict:
    """Deployment 0 -> 1, Endpoints ready, then the request; back to 0 (and the pod gone) between cycles."""
    from lightkube.resources.apps_v1 import Deployment
    from lightkube.resources.core_v1 import Pod
    from lightkube.types import PatchType

    create(client, deployment(app, 0, node_label, annotations, container=container, **spec))
    create(client, service_manifest(app))
    totals, to_endpoints, requests = [], [], []
    for i in range(cycles):
        started = time.perf_counter()
        client.patch(Deployment.Scale, app, {"spec": {"replicas": 1}}, namespace="default",
                     patch_type=PatchType.MERGE)
        wait_for("Endpoints with the new pod", lambda: endpoints(client, app), timeout=120, every=0.005)
        listed = time.perf_counter()
        request = _request(net, address, path)
        totals.append(time.perf_counter() - started)
        to_endpoints.append(listed - started)
        requests.append(request)
        progress(f"  k8s: {app} 0 -> 1, cycle {i + 1}/{cycles}: {totals[-1] * 1e3:.0f} ms "
                 f"(Endpoints after {to_endpoints[-1] * 1e3:.0f} ms)")
        client.patch(Deployment.Scale, app, {"spec": {"replicas": 0}}, namespace="default",
                     patch_type=PatchType.MERGE)
        wait_for("no pod left", lambda: not list(client.list(Pod, namespace="default", labels={"app": app})),
                 timeout=120, every=0.05)
        wait_for("no endpoints", lambda: not endpoints(client, app), timeout=60)
    client.delete(Deployment, app, namespace="default")
    return {"total": _ms(totals), "scale_to_endpoints": _ms(to_endpoints), "request": _ms(requests)}


def k8s(args, progress=print) -> dict:
    from .engine import PrivateEngine
    from .engine import unavailable as no_engine

    why = unavailable() or no_engine()
    if why:
        raise SystemExit(f"bench k8s: {why}")
    cycles = 5 if args.tiny else max(10, args.cycles)
    scale_cycles = 2 if args.tiny else 10
    cluster = net = engine = node = kubelet = None
    out = {"scenario": "k8s", "cycles": cycles}
    try:
        cluster = ControlPlane()
        cluster.apply_rbac()
        net = NetNamespace(nodes=2)
        engine = PrivateEngine()
        network = engine.bridge_network("wg-bench")
        kubelet = Kubelet(cluster, engine, KUBELET, net.addresses[1], {"wakegate.dev/test": "kubelet"})
        with tempfile.TemporaryDirectory(prefix="wakegate-k8s-") as tmp:
            try:
                node = Node(Path(tmp), cluster, net.addresses[0], str(engine.socket), network)
                with cluster.client() as client:
                    from lightkube.resources.core_v1 import Node as NodeResource

                    for name in (NODE, KUBELET):
                        wait_for(f"node {name} Ready", lambda: any(
                            c.type == "Ready" and c.status == "True" for n in client.list(NodeResource)
                            if n.metadata.name == name for c in n.status.conditions or []), timeout=60)
                    for key, annotations, container, path in (
                            ("pause", {"wakegate.dev/run": "process", "wakegate.dev/sleep": "pause"}, None, "/hello"),
                            ("stop", {"wakegate.dev/run": "process", "wakegate.dev/sleep": "stop"}, None, "/hello"),
                            ("container", {"wakegate.dev/sleep": "pause"}, httpd(), "/")):
                        out[f"wakegate_{key}"] = _wakegate_cycles(client, net, node, f"wg-{key}", annotations, container,
                                                                  path, cycles, progress)
                    out["kubelet"] = _scale_cycles(client, net, "kubelet-way", ("wakegate.dev/test", "kubelet"),
                                                   net.addresses[1], {}, httpd(address_env=True), "/", scale_cycles,
                                                   progress, hostNetwork=True, automountServiceAccountToken=False,
                                                   terminationGracePeriodSeconds=1)
                    out["wakegate_node_scale"] = _scale_cycles(
                        client, net, "wg-scale", ("wakegate.dev/test", GROUP), net.addresses[0],
                        {"wakegate.dev/run": "process", "wakegate.dev/sleep": "stop"}, None, "/hello", scale_cycles, progress)
                node.close()
                node = None
            except BaseException:
                for name, part in (("wakegate node", node), ("kubelet", kubelet)):
                    if part is not None:
                        print(f"bench k8s: the {name}'s log ends with:\n{part.log_tail()}", file=sys.stderr)
                raise
    finally:
        # Everything is stopped, whatever fails on the way: a close that raises does not leave the
        # rest running (the first error is raised once all are done).
        errors = []
        for close in (node and node.close, kubelet and kubelet.close, engine and engine.close, net and net.close,
                      cluster and cluster.close):
            if close:
                try:
                    close()
                except Exception as exc:  # noqa: PERF203
                    errors.append(exc)
        if errors and sys.exc_info()[0] is None:
            raise errors[0]
    out["ratio"] = out["kubelet"]["total"]["p50"] / out["wakegate_pause"]["first_request"]["p50"]
    out["ratio_container"] = out["kubelet"]["total"]["p50"] / out["wakegate_container"]["first_request"]["p50"]
    return out


def markdown(section: dict) -> str:
    pause, stop, ctr = section["wakegate_pause"], section["wakegate_stop"], section["wakegate_container"]
    kube, scale = section["kubelet"], section["wakegate_node_scale"]
    rows = [
        ("wakegate node: an awake pod (host process), a request", pause["awake"]),
        ("wakegate node: a sleeping pause-mode pod's first request (wakes it)", pause["first_request"]),
        ("  added by the wake, per cycle", pause["added"]),
        ("wakegate node: a sleeping stop-mode pod's first request (a cold start)", stop["first_request"]),
        ("wakegate node: a sleeping busybox container pod's first request (Docker unpause)", ctr["first_request"]),
        ("  added by the wake, per cycle", ctr["added"]),
        ("kubelet: Deployment of the busybox container 0 -> 1, Endpoints ready, then the request", kube["total"]),
        ("  of which: scale to Endpoints ready (sandbox, container, readiness probe)", kube["scale_to_endpoints"]),
        ("wakegate node as the Deployment's target: 0 -> 1, Endpoints ready, the request (a cold start)", scale["total"]),
        ("  of which: scale to Endpoints ready (the control plane's own part)", scale["scale_to_endpoints"]),
    ]
    lines = ["| path | p50 ms | p90 ms | min ms | n |", "| --- | --- | --- | --- | --- |"]
    for label, m in rows:
        lines.append(f"| {label} | {m['p50']:.2f} | {m['p90']:.2f} | {m['min']:.2f} | {m['n']} |")
    lines += ["", f"Scaling from zero the Kubernetes way (a kubelet) takes {section['ratio']:.0f}x the first request to "
              f"a sleeping pause-mode pod on a wakegate node, and {section['ratio_container']:.0f}x that to a paused "
              f"container of the same image. Pods Ready throughout their sleep/wake cycles: "
              f"{all(s['ready_throughout'] for s in (pause, stop, ctr))}; pod status written during them: "
              f"{any(s['status_writes_during_cycles'] for s in (pause, stop, ctr))}."]
    return "\n".join(lines) + "\n"
