"""controller/kube: wakegate as a Kubernetes node, against a real control plane (etcd, kube-apiserver,
kube-controller-manager and kube-scheduler built by deploy/kubernetes.sh) started for this module.

Every wakegate node here runs with a node token whose only rights are deploy/kubernetes/rbac.yaml's.
Pod addresses are on a veth pair to a network namespace of the test's (Kubernetes refuses loopback
endpoints), and clients connect from inside that namespace, as another machine would.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import zlib

import pytest

from bench.kubecluster import (ControlPlane, NetNamespace, create, deployment, endpoints, node_config,
                               process_container, service_manifest, unavailable, wait_for)

from .conftest import Client
from .test_guest import built_guest  # noqa: F401  (fixture)
from .test_controller import admin, alive, get, state

pytestmark = [pytest.mark.backend, pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")]

NODE_GRACE = 8  # seconds without a heartbeat before the node lifecycle controller calls a node NotReady


@pytest.fixture(scope="module")
def cluster():
    cp = ControlPlane(node_monitor_grace=f"{NODE_GRACE}s", node_monitor_period="1s")
    cp.apply_rbac()
    yield cp
    cp.close()


@pytest.fixture(scope="module")
def net():
    ns = NetNamespace(nodes=2)
    yield ns
    ns.close()


@pytest.fixture
def kube(cluster):
    with cluster.client() as client:
        yield client


@pytest.fixture
def tag(request):
    """A name of this test's own (its nodes, its namespace's objects): tests never see each other's pods."""
    return "t%06x" % (zlib.crc32(request.node.name.encode()) & 0xFFFFFF)


@pytest.fixture
def start_node(start_wakegate, cluster, net, tag, kube):
    """start_node(index, extra="") -> a wakegate that is node TAG-INDEX at net.addresses[index]. After
    the test its nodes are deleted: NotReady nodes left behind would put the zone into partial
    disruption, where the node lifecycle controller slows evictions down to one node per 100 s."""
    started = []

    def start(index: int = 0, extra: str = "", workers: int = 2):
        w = start_wakegate(f'[proxy]\nworkers = {workers}\ndrain_timeout = "5s"\n' + node_config(
            cluster, index, f"{tag}-{index}", net.addresses[index], tag,
            f'renew_interval = "1s"\nlease_duration = "{NODE_GRACE}s"\n{extra}'))
        started.append((f"{tag}-{index}", w))
        return w

    yield start
    from lightkube import ApiError
    from lightkube.resources.core_v1 import Node

    for name, w in started:
        w.stop()
        try:
            kube.delete(Node, name)
        except ApiError:
            pass


def pod_manifest(name: str, node: str, annotations: dict | None = None, container: dict | None = None,
                 **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": name},
                         "annotations": {"wakegate.dev/run": "process", **(annotations or {})}},
            "spec": {"nodeName": node, "containers": [container or process_container()], **spec}}


def pods_of(kube, app: str) -> list:
    from lightkube.resources.core_v1 import Pod

    return list(kube.list(Pod, namespace="default", labels={"app": app}))


def ready(pod) -> bool:
    return bool(pod.status and any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []))


def get_pod(kube, name: str):
    from lightkube import ApiError
    from lightkube.resources.core_v1 import Pod

    try:
        return kube.get(Pod, name, namespace="default")
    except ApiError as exc:
        if exc.status.code == 404:
            return None
        raise


def ns_request(net, address: str, port: int, path: str = "/hello", host: str = "any.example", timeout: float = 30):
    """One request from inside the network namespace, on a connection of its own."""
    c = Client.__new__(Client)
    c.sock, c.leftover = net.connect(address, port, timeout), b""
    try:
        return c.request(get(host, path))
    finally:
        c.close()


# ---- the node ----------------------------------------------------------------------------

def test_the_node_registers_keeps_its_lease_and_goes_not_ready_on_a_clean_exit(start_node, kube, net, tag):
    from lightkube.resources.coordination_v1 import Lease
    from lightkube.resources.core_v1 import Node

    w = start_node(0, extra='[kubernetes.capacity]\npods = 20\ncpu = "1500m"\nmemory = "2Gi"')
    node = wait_for("the node and its status", lambda: next(
        (n for n in kube.list(Node) if n.metadata.name == f"{tag}-0" and n.status.conditions), None))
    assert node.metadata.labels["wakegate.dev/test"] == tag and node.metadata.labels["type"] == "wakegate"
    assert [(t.key, t.value, t.effect) for t in node.spec.taints] == [("wakegate.dev/scale-to-zero", "true", "NoSchedule")]
    assert node.status.capacity == {"pods": "20", "cpu": "1500m", "memory": "2Gi"}
    assert [(a.type, a.address) for a in node.status.addresses][0] == ("InternalIP", net.addresses[0])
    assert {c.type: c.status for c in node.status.conditions}["Ready"] == "True"
    def renewed():
        from lightkube import ApiError

        try:
            return kube.get(Lease, f"{tag}-0", namespace="kube-node-lease").spec.renewTime
        except ApiError:  # registration writes the status first, then makes the lease
            return None

    first = wait_for("the node's lease", renewed, timeout=5)
    wait_for("a renewed lease", lambda: (renewed() or first) > first, timeout=5)
    assert w.stop() == 0
    node = kube.get(Node, f"{tag}-0")
    ready = next(c for c in node.status.conditions if c.type == "Ready")
    assert (ready.status, ready.reason) == ("False", "WakegateStopped")


# ---- pods: set up, wake, sleep, delete ----------------------------------------------------

def test_a_deployment_pod_wakes_sleeps_and_stays_ready(start_node, kube, net, tag):
    """Register, apply a Deployment, pod Running, first request wakes it, idle sleeps it while
    Kubernetes still shows it Running and Ready, the next request wakes it again; its Service's
    Endpoints have the node's address."""
    w = start_node(0)
    create(kube, deployment(f"{tag}-web", 1, ("wakegate.dev/test", tag), {"wakegate.dev/run": "process", "wakegate.dev/sleep": "pause",
                                                   "wakegate.dev/idle-timeout": "300ms"}))
    create(kube, service_manifest(f"{tag}-web"))
    pod = wait_for("a Running and Ready pod", lambda: next((p for p in pods_of(kube, f"{tag}-web") if ready(p)), None))
    assert pod.spec.nodeName == f"{tag}-0" and pod.status.phase == "Running"
    assert pod.status.podIP == net.addresses[0] and pod.status.hostIP == net.addresses[0]
    assert wait_for("endpoints", lambda: endpoints(kube, f"{tag}-web")) == [net.addresses[0]]
    name = f"default.{pod.metadata.name}"
    assert state(w, name)["state"] == "asleep"  # set up asleep: nothing runs until a request comes
    response = ns_request(net, net.addresses[0], 8080)
    assert response.status == 200 and response.header(b"x-backend") == pod.metadata.name.encode()
    pid = state(w, name)["pid"]
    wait_for("sleep", lambda: state(w, name)["state"] == "asleep", timeout=10)
    asleep = get_pod(kube, pod.metadata.name)
    assert ready(asleep) and asleep.status.phase == "Running"
    assert ns_request(net, net.addresses[0], 8080).status == 200
    assert state(w, name)["pid"] == pid and state(w, name)["wakes"] == 2  # thawed: the same process
    # Host routing from the main listener is there for pods that ask for it (next test); this one has none
    c = Client(w.port)
    assert c.request(get("web.example")).status == 404
    c.close()


def test_fifty_sleep_wake_cycles_lose_nothing_while_the_pod_stays_ready(start_node, kube, net, tag):
    w = start_node(0)
    create(kube, pod_manifest(f"{tag}-cycle", f"{tag}-0", {"wakegate.dev/sleep": "pause",
                                                          "wakegate.dev/idle-timeout": "50ms",
                                                          "wakegate.dev/hosts": f"{tag}.example"}))
    pod = wait_for("Ready", lambda: (lambda p: p if p is not None and ready(p) else None)(get_pod(kube, f"{tag}-cycle")))
    version = pod.metadata.resourceVersion
    since = next(c.lastTransitionTime for c in pod.status.conditions if c.type == "Ready")
    name = f"default.{tag}-cycle"
    statuses = []
    for i in range(50):
        if i % 2:
            statuses.append(ns_request(net, net.addresses[0], 8080).status)
        else:  # the main listener routes the pod's Host annotation to it too
            c = Client(w.port)
            statuses.append(c.request(get(f"{tag}.example")).status)
            c.close()
        wait_for("sleep", lambda: state(w, name)["state"] == "asleep", timeout=10, every=0.01)
        if i % 10 == 0:
            assert ready(get_pod(kube, f"{tag}-cycle"))
    assert statuses == [200] * 50
    assert state(w, name)["wakes"] >= 50 and state(w, name)["sleeps"] >= 50
    after = get_pod(kube, f"{tag}-cycle")
    assert ready(after) and next(c.lastTransitionTime for c in after.status.conditions if c.type == "Ready") == since
    assert after.metadata.resourceVersion == version, "sleeping and waking wrote nothing to Kubernetes"


def test_deleting_a_pod_drains_its_requests_stops_it_and_confirms(start_node, kube, net, tag):
    from lightkube.resources.core_v1 import Pod

    w = start_node(0)
    create(kube, pod_manifest(f"{tag}-del", f"{tag}-0", {"wakegate.dev/sleep": "stop"}))
    wait_for("Ready", lambda: (lambda p: p is not None and ready(p))(get_pod(kube, f"{tag}-del")))
    assert ns_request(net, net.addresses[0], 8080).status == 200
    pid = state(w, f"default.{tag}-del")["pid"]
    slow = Client.__new__(Client)
    slow.sock, slow.leftover = net.connect(net.addresses[0], 8080), b""
    slow.send(get("x", "/slow?delay=1.5"))
    time.sleep(0.2)
    kube.delete(Pod, f"{tag}-del", namespace="default")
    terminating = get_pod(kube, f"{tag}-del")
    assert terminating is not None and terminating.metadata.deletionTimestamp is not None
    response = slow.response()
    slow.close()
    assert response.status == 200 and response.body == b"slow"  # in flight when the delete came: finished
    wait_for("the deletion confirmed", lambda: get_pod(kube, f"{tag}-del") is None, timeout=15)
    assert not alive(pid)
    assert not any(s["name"] == f"default.{tag}-del" for s in admin(w)[1]["services"])
    with pytest.raises(ConnectionRefusedError):  # its port is no longer served
        ns_request(net, net.addresses[0], 8080)


def test_the_restart_count_goes_up_when_the_process_exits_on_its_own(start_node, kube, net, tag):
    w = start_node(0)
    create(kube, pod_manifest(f"{tag}-crash", f"{tag}-0", {"wakegate.dev/sleep": "pause"}))
    wait_for("Ready", lambda: (lambda p: p is not None and ready(p))(get_pod(kube, f"{tag}-crash")))
    assert ns_request(net, net.addresses[0], 8080).status == 200
    name = f"default.{tag}-crash"
    import os

    os.kill(state(w, name)["pid"], signal.SIGKILL)  # it dies on its own, as far as wakegate knows
    wait_for("asleep after the exit", lambda: state(w, name)["state"] == "asleep", timeout=10)
    assert ns_request(net, net.addresses[0], 8080).status == 200  # started again
    pod = wait_for("restartCount 1", lambda: (lambda p: p if p.status.containerStatuses[0].restartCount == 1 else None)(
        get_pod(kube, f"{tag}-crash")))
    status = pod.status.containerStatuses[0]
    assert status.lastState.terminated.exitCode == -signal.SIGKILL or status.lastState.terminated.exitCode == 137 \
        or status.lastState.terminated.reason == "Error"
    assert ready(pod) and status.state.running is not None


CANNOT_RUN = [
    # what the pod has, the reason Kubernetes shows, words of the message
    (dict(containers=[{**process_container(), "name": "a"}, {**process_container(), "name": "b"}]), "UnsupportedPod",
     "one container per pod"),
    (dict(annotations={"wakegate.dev/sleep": "hibernate"}), "InvalidAnnotation", "pause or stop"),
    (dict(annotations={"wakegate.dev/nap": "1"}), "InvalidAnnotation", "unknown"),
    (dict(container={**process_container(), "command": ["/no/such/program"]}), "RunContainerError", "does not exist"),
    (dict(container={**process_container(), "ports": []}), "UnsupportedPort", "exactly one containerPort"),
    (dict(volumes=[{"name": "data", "emptyDir": {}}]), "UnsupportedVolume", "emptyDir"),
]


@pytest.mark.parametrize("case,reason,words", CANNOT_RUN, ids=[c[1] + str(i) for i, c in enumerate(CANNOT_RUN)])
def test_a_pod_that_cannot_run_gets_a_clear_waiting_reason(start_node, kube, tag, case, reason, words):
    start_node(0)
    case = dict(case)
    annotations = case.pop("annotations", {})
    container = case.pop("container", None)
    containers = case.pop("containers", None)
    manifest = pod_manifest(f"{tag}-bad", f"{tag}-0", annotations, container, **case)
    if containers:
        manifest["spec"]["containers"] = containers
    create(kube, manifest)

    found = wait_for("a waiting reason", lambda: waiting(kube, f"{tag}-bad"))
    pod = get_pod(kube, f"{tag}-bad")
    assert found.reason == reason and words in found.message, found
    assert pod.status.phase == "Pending" and not ready(pod)


def waiting(kube, name: str):
    pod = get_pod(kube, name)
    statuses = pod.status.containerStatuses if pod and pod.status else None
    return statuses[0].state.waiting if statuses and statuses[0].state.waiting else None


def test_a_port_taken_by_a_pod_that_is_not_a_replica_is_refused(start_node, kube, net, tag):
    start_node(0)
    create(kube, pod_manifest(f"{tag}-one", f"{tag}-0"))
    wait_for("Ready", lambda: (lambda p: p is not None and ready(p))(get_pod(kube, f"{tag}-one")))
    create(kube, pod_manifest(f"{tag}-two", f"{tag}-0"))  # another app (its labels differ), the same port
    pod = wait_for("refused", lambda: (lambda p: p if p and p.status and p.status.containerStatuses else None)(
        get_pod(kube, f"{tag}-two")))
    waiting = pod.status.containerStatuses[0].state.waiting
    assert waiting.reason == "PortConflict" and f"{tag}-one" in waiting.message
    assert ns_request(net, net.addresses[0], 8080).header(b"x-backend") == f"{tag}-one".encode()
    # once the first one is gone, the port is the second one's: it is tried again and runs
    from lightkube.resources.core_v1 import Pod

    kube.delete(Pod, f"{tag}-one", namespace="default")
    wait_for("the second pod Ready", lambda: (lambda p: p is not None and ready(p))(get_pod(kube, f"{tag}-two")))
    assert ns_request(net, net.addresses[0], 8080).header(b"x-backend") == f"{tag}-two".encode()


def test_a_container_pod_runs_from_a_local_image(start_node, kube, net, tag):
    from bench.engine import HELLO, IMAGE, PrivateEngine
    from bench.engine import unavailable as no_docker

    if no_docker():
        pytest.skip(no_docker())
    engine = PrivateEngine()
    try:
        network = engine.bridge_network(f"{tag}-net")
        w = start_node(0, extra=f'docker_socket = "{engine.socket}"\ncontainer_network = "{network}"')
        container = {"name": "httpd", "image": IMAGE, "ports": [{"containerPort": 8080}],
                     "command": ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]}
        create(kube, pod_manifest(f"{tag}-ctr", f"{tag}-0", {"wakegate.dev/run": "container",
                                                            "wakegate.dev/sleep": "stop",
                                                            "wakegate.dev/idle-timeout": "500ms"}, container))
        pod = wait_for("Ready", lambda: (lambda p: p if p is not None and ready(p) else None)(get_pod(kube, f"{tag}-ctr")))
        cid = pod.status.containerStatuses[0].containerID
        assert cid.startswith("docker://wakegate_")
        assert engine.status(cid[len("docker://"):]) == "created"  # made from the image, not started
        response = ns_request(net, net.addresses[0], 8080, "/")
        assert response.status == 200 and response.body == HELLO
        name = f"default.{tag}-ctr"
        wait_for("stopped when idle", lambda: state(w, name)["state"] == "asleep", timeout=15)
        assert engine.status(cid[len("docker://"):]) == "exited" and ready(get_pod(kube, f"{tag}-ctr"))
        assert ns_request(net, net.addresses[0], 8080, "/").body == HELLO
        from lightkube.resources.core_v1 import Pod

        kube.delete(Pod, f"{tag}-ctr", namespace="default")
        wait_for("the deletion confirmed", lambda: get_pod(kube, f"{tag}-ctr") is None, timeout=30)
        assert engine.run("ps", "-aq").stdout.strip() == b""  # its container removed
        # an image that is not on the node: nothing is pulled, the pod says why it waits
        create(kube, pod_manifest(f"{tag}-noimg", f"{tag}-0", {"wakegate.dev/run": "container"},
                                  {**container, "image": "registry.example/absent:1"}))
        found = wait_for("a waiting reason", lambda: waiting(kube, f"{tag}-noimg"))
        assert found.reason == "ErrImageNeverPull" and "pulls nothing" in found.message, found
        w.stop()
    finally:
        engine.close()


# ---- several nodes --------------------------------------------------------------------------

def test_two_nodes_and_one_killed(start_node, kube, net, tag):
    """A Deployment of 2 replicas spread over two wakegate nodes, each serving and sleeping its own
    pod; one wakegate is killed: the node goes NotReady, its pod leaves the Endpoints and is evicted
    (a toleration of 2 s), its replacement runs beside the other replica on the surviving node, and
    a client of the Service sees failures only on the dead node's address and only until the
    Endpoints drop it. Restarted, the dead node confirms the deletion of the pod evicted meanwhile."""
    from lightkube.resources.core_v1 import Node

    nodes = [start_node(0), start_node(1)]
    for index in range(2):
        wait_for(f"node {index} Ready", lambda: node_ready(kube, f"{tag}-{index}"))
    app = f"{tag}-spread"
    unreachable = [{"key": f"node.kubernetes.io/{k}", "operator": "Exists", "effect": "NoExecute",
                    "tolerationSeconds": 2} for k in ("unreachable", "not-ready")]
    create(kube, deployment(app, 2, ("wakegate.dev/test", tag), {"wakegate.dev/run": "process", "wakegate.dev/sleep": "pause",
                                          "wakegate.dev/idle-timeout": "500ms"}, tolerations=unreachable,
                            topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                                        "whenUnsatisfiable": "ScheduleAnyway",
                                                        "labelSelector": {"matchLabels": {"app": app}}}]))
    create(kube, service_manifest(app))
    pods = wait_for("2 Ready pods", lambda: (lambda ps: ps if len([p for p in ps if ready(p)]) == 2 else None)(
        pods_of(kube, app)))
    placed = {p.spec.nodeName: p.metadata.name for p in pods}
    assert set(placed) == {f"{tag}-0", f"{tag}-1"}, f"not spread over both nodes: {placed}"
    assert sorted(wait_for("2 endpoints", lambda: (lambda e: e if len(e) == 2 else None)(endpoints(kube, app)))) \
        == sorted(net.addresses)
    for index, address in enumerate(net.addresses):  # each node serves, and sleeps, its own pod
        assert ns_request(net, address, 8080).header(b"x-backend") == placed[f"{tag}-{index}"].encode()
        assert state(nodes[index], f"default.{placed[f'{tag}-{index}']}")["wakes"] == 1

    # a client of the Service: reads the Endpoints and takes their addresses in turn (kube-proxy's job)
    seen, stop = [], threading.Event()

    def client():
        with ControlPlaneClient(kube) as api:
            turn = 0
            while not stop.is_set():
                addresses = endpoints(api, app)
                if addresses:
                    address = addresses[turn % len(addresses)]
                    turn += 1
                    try:
                        outcome = ns_request(net, address, 8080, timeout=5).status
                    except OSError as exc:
                        outcome = type(exc).__name__
                    seen.append((time.monotonic(), address, outcome))
                time.sleep(0.05)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        time.sleep(1)
        killed_at = time.monotonic()
        nodes[0].proc.send_signal(signal.SIGKILL)
        nodes[0].proc.wait()
        not_ready = wait_for("node 0 NotReady", lambda: next(
            (c for c in kube.get(Node, f"{tag}-0").status.conditions if c.type == "Ready" and c.status != "True"), None),
            timeout=NODE_GRACE + 15, every=0.2)
        not_ready_at = time.monotonic()
        wait_for("node 0's address gone from the Endpoints", lambda: endpoints(kube, app) and
                 net.addresses[0] not in endpoints(kube, app), timeout=30, every=0.1)
        endpoints_at = time.monotonic()
        evicted = wait_for(lambda: f"the pod on node 0 evicted: {describe_pods(kube, app)}", lambda: (
            lambda p: p is not None and p.metadata.deletionTimestamp is not None)(get_pod(kube, placed[f"{tag}-0"])),
            timeout=30, every=0.2)
        replacement = wait_for(lambda: f"a replacement Ready on node 1: {describe_pods(kube, app)}", lambda: next(
            (p for p in pods_of(kube, app) if p.metadata.name not in placed.values() and ready(p)), None),
            timeout=30, every=0.1)
        replaced_at = time.monotonic()
        assert replacement.spec.nodeName == f"{tag}-1" and replacement.status.podIP == net.addresses[1]
        time.sleep(1.5)
    except BaseException:
        if nodes[0].proc.poll() is not None:
            nodes[0].restart()  # it reaps what the killed one left (processes, cgroups) before the leak check
        raise
    finally:
        stop.set()
        thread.join()
    assert not_ready.status == "Unknown"
    assert evicted and get_pod(kube, placed[f"{tag}-0"]) is not None  # Terminating: no node confirms it
    # node 1 serves both replicas on the one port now: an awake one in turn
    backends = {ns_request(net, net.addresses[1], 8080).header(b"x-backend").decode() for _ in range(6)}
    assert backends <= {placed[f"{tag}-1"], replacement.metadata.name} and placed[f"{tag}-1"] in backends
    after = [outcome for t, address, outcome in seen if t > endpoints_at + 0.5]
    before = [(address, outcome) for t, address, outcome in seen if t < killed_at]
    assert after and all(o == 200 for o in after), after
    assert before and all(o == 200 for _, o in before), before
    failures = [(round(t - killed_at, 2), address, outcome) for t, address, outcome in seen if outcome != 200]
    assert all(address == net.addresses[0] and t <= endpoints_at - killed_at + 0.5 for t, address, _ in failures), failures
    timeline = {"not_ready_s": round(not_ready_at - killed_at, 2), "endpoints_s": round(endpoints_at - killed_at, 2),
                "replacement_ready_s": round(replaced_at - killed_at, 2),
                "client_failures": len(failures), "client_requests": len(seen)}
    print("killed node timeline:", json.dumps(timeline))
    # node 0 comes back: it confirms the deletion of its evicted pod (and reaps what its death left)
    nodes[0].restart()
    wait_for("the evicted pod's deletion confirmed", lambda: get_pod(kube, placed[f"{tag}-0"]) is None, timeout=30)
    assert {c.type: c.status for c in kube.get(Node, f"{tag}-0").status.conditions}["Ready"] == "True"


def describe_pods(kube, app: str) -> list:
    """Each pod of app: name, node, phase, ready, waiting reason, deleting (for failure messages)."""
    out = []
    for p in pods_of(kube, app):
        statuses = (p.status.containerStatuses or []) if p.status else []
        waiting = statuses[0].state.waiting if statuses and statuses[0].state else None
        out.append((p.metadata.name, p.spec.nodeName, p.status.phase if p.status else None, ready(p),
                    waiting.reason if waiting else None, bool(p.metadata.deletionTimestamp)))
    return out


def node_ready(kube, name: str) -> bool:
    from lightkube import ApiError
    from lightkube.resources.core_v1 import Node

    try:
        node = kube.get(Node, name)
    except ApiError:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])


class ControlPlaneClient:
    """A client of the API server of its own, for a thread (the test's client is not shared across threads)."""

    def __init__(self, kube) -> None:
        from lightkube import Client

        self.client = Client(kube.config, field_manager="wakegate-test-client")

    def __enter__(self):
        return self.client

    def __exit__(self, *exc) -> None:
        self.client.close()


def test_check_asks_the_api_server_what_the_credentials_may_do(cluster, tmp_path, net):
    """`wakegate check` with [kubernetes]: the node's credentials may do all a node does; credentials
    without the role are told which verbs are missing; an API server that does not answer is named."""
    import subprocess
    import sys

    from .conftest import ROOT

    def check(kubeconfig) -> subprocess.CompletedProcess:
        path = tmp_path / "check.toml"
        path.write_text(f'[kubernetes]\nkubeconfig = "{kubeconfig}"\nnode_name = "checked"\n'
                        f'node_address = "{net.addresses[0]}"\n')
        return subprocess.run([sys.executable, "-m", "controller.cli", "check", "-c", str(path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    good = check(cluster.node_kubeconfig(3))
    assert good.returncode == 0, good.stderr
    assert "may do what a node does" in good.stdout and "node checked is not registered yet" in good.stdout
    nobody = check(cluster.kubeconfig("nobody", cluster.nobody_token))
    assert nobody.returncode == 2 and "may not get nodes, create nodes" in nobody.stderr
    assert "create leases in kube-node-lease" in nobody.stderr and "rbac.yaml" in nobody.stderr
    gone = tmp_path / "gone.kubeconfig"
    gone.write_text(cluster.kubeconfig("x", "y").read_text().replace(cluster.url, "https://127.0.0.1:1"))
    unreachable = check(gone)
    assert unreachable.returncode == 2 and "cannot use the API server at https://127.0.0.1:1" in unreachable.stderr


def test_a_microvm_pod_sleeps_as_a_snapshot_and_wakes_from_it(start_node, kube, net, tag, built_guest):
    """wakegate.dev/run: microvm: the guest (the demo busybox guest, from the node's microvm_assets)
    serves the containerPort; idle, it is saved to a snapshot and QEMU exits; the next request
    restores it. Kubernetes sees a Running, Ready pod throughout."""
    kernel, initrd = built_guest["kernel"], built_guest["initrd"]
    w = start_node(0, extra=f'microvm_assets = ["{kernel.parent}"]')
    create(kube, pod_manifest(f"{tag}-vm", f"{tag}-0", {
        "wakegate.dev/run": "microvm", "wakegate.dev/microvm-kernel": str(kernel),
        "wakegate.dev/microvm-initrd": str(initrd), "wakegate.dev/idle-timeout": "1s",
        "wakegate.dev/wake-timeout": "60s"}, {"name": "guest", "image": "wakegate.dev/microvm",
                                              "ports": [{"containerPort": 80}]}))
    wait_for("Ready", lambda: (lambda p: p is not None and ready(p))(get_pod(kube, f"{tag}-vm")))
    name = f"default.{tag}-vm"
    assert ns_request(net, net.addresses[0], 80, "/", timeout=60).status == 200  # a cold boot
    wait_for("asleep as a snapshot", lambda: state(w, name)["state"] == "asleep", timeout=60)
    assert state(w, name)["microvm"]["snapshot"] and ready(get_pod(kube, f"{tag}-vm"))
    assert ns_request(net, net.addresses[0], 80, "/", timeout=60).status == 200  # restored from it
    assert state(w, name)["microvm"]["boots"].get("restore", 0) >= 1
    w.stop()
