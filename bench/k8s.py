"""``python -m bench k8s``: a sleeping pod on a wakegate node against the Kubernetes way of scaling
from zero, on the same control plane (bench/kubecluster.py) in the same run.

- wakegate: a pod that sleeps while Kubernetes shows it Running and Ready. Per cycle: an awake request,
  then the pod put to sleep (the admin API), then the first request, which wakes it; every request on
  a fresh connection from the network namespace to the node's address, as a client of the Service
  would. In pause mode (frozen process) and stop mode (a cold start of the process).
- Kubernetes: a Deployment scaled from 0 to 1 through its scale subresource, then its Service's
  Endpoints watched until they list the new pod, then the same request. The pod lands on the same
  wakegate node, so the node agent's own part (seeing the pod, reporting it Ready) is in the figure,
  and the request then starts the process cold; a kubelet would also pull and start a container.
  Between cycles the Deployment goes back to 0 and its pod is gone.
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
from .kubecluster import (ControlPlane, NetNamespace, create, deployment, endpoints, node_config, service_manifest,
                          unavailable, wait_for)

GROUP = "bench"
NODE = "bench-0"
PORT = 8080


def _request(net: NetNamespace, address: str, port: int = PORT) -> float:
    """Seconds from connecting to the whole answer of one GET, on a fresh connection from the namespace."""
    started = time.perf_counter()
    sock = net.connect(address, port, timeout=30)
    try:
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: bench.example\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    elapsed = time.perf_counter() - started
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"bench k8s: unexpected answer {data[:80]!r}")
    return elapsed


def _ms(values: list[float]) -> dict:
    values = sorted(values)
    return {"p50": statistics.median(values) * 1e3, "p90": values[int(len(values) * 0.9)] * 1e3,
            "min": values[0] * 1e3, "max": values[-1] * 1e3, "n": len(values)}


class Node:
    """A wakegate that is node bench-0 of the cluster, one worker, its admin API for sleeping pods."""

    def __init__(self, tmp: Path, cluster: ControlPlane, address: str) -> None:
        self.admin_port = free_port()
        config = tmp / "node.toml"
        config.write_text(f'[proxy]\nlisten = "127.0.0.1:{free_port()}"\nworkers = 1\n'
                          f'[admin]\nlisten = "127.0.0.1:{self.admin_port}"\n'
                          + node_config(cluster, 0, NODE, address, GROUP, 'renew_interval = "2s"'))
        self.log = open(tmp / "node.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "serve", "-c", str(config),
                                      "--log-level", "warning"], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def admin(self, method: str, path: str):
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def service(self, name: str) -> dict:
        return next(s for s in self.admin("GET", "/services")["services"] if s["name"] == name)

    def close(self) -> None:
        stop_process(self.proc, 30)
        self.log.close()


def _pod_name(client, app: str) -> str:
    from lightkube.resources.core_v1 import Pod

    return wait_for(f"a pod of {app}", lambda: next(
        (p.metadata.name for p in client.list(Pod, namespace="default", labels={"app": app})
         if p.status and p.status.podIP and not p.metadata.deletionTimestamp), None), timeout=60)


def _wakegate_cycles(client, net, node: Node, sleep: str, cycles: int, progress) -> dict:
    """Awake request, sleep, first request; and whether Kubernetes saw any change meanwhile."""
    from lightkube.resources.core_v1 import Pod

    app = f"wg-{sleep}"
    create(client, deployment(app, 1, ("wakegate.dev/test", GROUP), {
        "wakegate.dev/run": "process", "wakegate.dev/sleep": sleep, "wakegate.dev/idle-timeout": "1h"}))
    pod = _pod_name(client, app)
    service = f"default.{pod}"
    wait_for("the pod's service", lambda: any(s["name"] == service for s in node.admin("GET", "/services")["services"]))
    _request(net, net.addresses[0])  # its first start
    version = client.get(Pod, pod, namespace="default").metadata.resourceVersion
    awake, first = [], []
    for i in range(cycles):
        awake.append(_request(net, net.addresses[0]))
        node.admin("POST", f"/services/{service}/sleep")
        wait_for("asleep", lambda: node.service(service)["state"] == "asleep", timeout=30, every=0.005)
        first.append(_request(net, net.addresses[0]))
        if i % 10 == 9:
            progress(f"  k8s: {sleep} pod, cycle {i + 1}/{cycles}: first request {first[-1] * 1e3:.2f} ms, "
                     f"awake {awake[-1] * 1e3:.2f} ms")
    after = client.get(Pod, pod, namespace="default")
    ready = any(c.type == "Ready" and c.status == "True" for c in after.status.conditions or [])
    from lightkube.resources.apps_v1 import Deployment

    client.delete(Deployment, app, namespace="default")
    return {"awake": _ms(awake), "first_request": _ms(first), "added": _ms([f - a for f, a in zip(first, awake)]),
            "wakes": node.service(service)["wakes"], "ready_throughout": ready,
            "status_writes_during_cycles": 0 if after.metadata.resourceVersion == version else "some"}


def _kubernetes_cycles(client, net, cycles: int, progress) -> dict:
    """Deployment 0 -> 1, Endpoints ready, then the request; back to 0 between cycles."""
    from lightkube.resources.apps_v1 import Deployment
    from lightkube.resources.core_v1 import Pod
    from lightkube.types import PatchType

    app = "k8s-way"
    create(client, deployment(app, 0, ("wakegate.dev/test", GROUP), {
        "wakegate.dev/run": "process", "wakegate.dev/sleep": "stop", "wakegate.dev/idle-timeout": "1h"}))
    create(client, service_manifest(app))
    totals, to_endpoints, requests = [], [], []
    for i in range(cycles):
        started = time.perf_counter()
        client.patch(Deployment.Scale, app, {"spec": {"replicas": 1}}, namespace="default",
                     patch_type=PatchType.MERGE)
        wait_for("Endpoints with the new pod", lambda: endpoints(client, app), timeout=60, every=0.005)
        listed = time.perf_counter()
        request = _request(net, net.addresses[0])
        totals.append(time.perf_counter() - started)
        to_endpoints.append(listed - started)
        requests.append(request)
        progress(f"  k8s: Deployment 0 -> 1, cycle {i + 1}/{cycles}: {totals[-1] * 1e3:.0f} ms "
                 f"(Endpoints after {to_endpoints[-1] * 1e3:.0f} ms)")
        client.patch(Deployment.Scale, app, {"spec": {"replicas": 0}}, namespace="default",
                     patch_type=PatchType.MERGE)
        wait_for("no pod left", lambda: not list(client.list(Pod, namespace="default", labels={"app": app})),
                 timeout=60, every=0.05)
        wait_for("no endpoints", lambda: not endpoints(client, app), timeout=60)
    return {"total": _ms(totals), "scale_to_endpoints": _ms(to_endpoints), "request": _ms(requests)}


def k8s(args, progress=print) -> dict:
    why = unavailable()
    if why:
        raise SystemExit(f"bench k8s: {why}")
    cycles = 5 if args.tiny else max(10, args.cycles)
    k8s_cycles = 2 if args.tiny else 10
    cluster = net = node = None
    try:
        cluster = ControlPlane()
        cluster.apply_rbac()
        net = NetNamespace(nodes=1)
        with tempfile.TemporaryDirectory(prefix="wakegate-k8s-") as tmp:
            node = Node(Path(tmp), cluster, net.addresses[0])
            with cluster.client() as client:
                from lightkube.resources.core_v1 import Node as NodeResource

                wait_for("the node Ready", lambda: any(
                    c.type == "Ready" and c.status == "True"
                    for n in client.list(NodeResource) if n.metadata.name == NODE for c in n.status.conditions or []),
                    timeout=30)
                out = {"scenario": "k8s", "cycles": cycles}
                for sleep in ("pause", "stop"):
                    out[f"wakegate_{sleep}"] = _wakegate_cycles(client, net, node, sleep, cycles, progress)
                out["kubernetes"] = _kubernetes_cycles(client, net, k8s_cycles, progress)
            node.close()
            node = None
    finally:
        if node is not None:
            node.close()
        if net is not None:
            net.close()
        if cluster is not None:
            cluster.close()
    out["ratio"] = out["kubernetes"]["total"]["p50"] / out["wakegate_pause"]["first_request"]["p50"]
    return out


def markdown(section: dict) -> str:
    pause, stop, kube = section["wakegate_pause"], section["wakegate_stop"], section["kubernetes"]
    rows = [
        ("awake pod: a request on a fresh connection", pause["awake"]),
        ("sleeping pause-mode pod: its first request (wakes it)", pause["first_request"]),
        ("  added by the wake, per cycle", pause["added"]),
        ("sleeping stop-mode pod: its first request (a cold start)", stop["first_request"]),
        ("  added by the wake, per cycle", stop["added"]),
        ("Kubernetes: Deployment 0 -> 1, Endpoints ready, then the request", kube["total"]),
        ("  of which: scale to Endpoints ready", kube["scale_to_endpoints"]),
        ("  of which: the request (the pod's cold start)", kube["request"]),
    ]
    lines = ["| path | p50 ms | p90 ms | min ms | n |", "| --- | --- | --- | --- | --- |"]
    for label, m in rows:
        lines.append(f"| {label} | {m['p50']:.2f} | {m['p90']:.2f} | {m['min']:.2f} | {m['n']} |")
    lines += ["", f"Scale-from-zero the Kubernetes way takes {section['ratio']:.0f}x the first request to a sleeping "
              f"pause-mode pod. Pods Ready throughout the cycles: pause {pause['ready_throughout']}, stop "
              f"{stop['ready_throughout']}; pod status writes during them: {pause['status_writes_during_cycles']}, "
              f"{stop['status_writes_during_cycles']}."]
    return "\n".join(lines) + "\n"
