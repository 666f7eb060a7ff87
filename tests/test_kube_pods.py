"""controller/kube/pods.py: from a pod's API JSON to the service that runs it, or the reason it cannot."""

import sys

import pytest

from controller.config import KubernetesSettings
from controller.kube.pods import CannotRun, docker_container_name, expand, plan_pod, service_name

SETTINGS = KubernetesSettings(enabled=True, kubeconfig="/dev/null", node_name="node-a", node_address="10.0.0.5",
                              host_processes=True, docker_socket="/run/test-docker.sock", container_network="pods",
                              microvm_assets=("/opt/guests",))


def pod(annotations=None, container=None, **spec):
    base = {"name": "app", "image": "registry.example/app:1", "ports": [{"containerPort": 8080}]}
    return {"metadata": {"name": "web-1", "namespace": "shop", "uid": "0123456789abcdef",
                         "labels": {"app": "web", "pod-template-hash": "abc"}, "annotations": annotations or {}},
            "spec": {"nodeName": "node-a", "containers": [{**base, **(container or {})}], **spec}}


PROCESS = {"wakegate.dev/run": "process"}
PY = sys.executable


def test_a_container_pod_becomes_a_docker_service_on_the_node_address():
    plan = plan_pod(pod({"wakegate.dev/idle-timeout": "2m"}, {"command": ["/app"], "args": ["--port", "8080"]}),
                    SETTINGS, upstream_port=20001, base_dir="/srv")
    svc = plan.service
    assert (plan.kind, plan.port, svc.name) == ("container", 8080, "shop.web-1")
    assert [str(a) for a in svc.listen] == ["10.0.0.5:8080"] and svc.hosts == ()
    assert svc.docker.container == plan.docker_name == "wakegate_node-a_shop_web-1_01234567"
    assert (svc.docker.port, svc.docker.socket, svc.sleep, svc.idle_timeout) == (8080, "/run/test-docker.sock", "pause", 120)
    create = plan.docker_create
    assert (create["Image"], create["Entrypoint"], create["Cmd"]) == ("registry.example/app:1", ["/app"], ["--port", "8080"])
    assert create["HostConfig"]["NetworkMode"] == "pods"
    assert create["HostConfig"]["PortBindings"] == {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
    assert create["Labels"]["io.kubernetes.pod.uid"] == "0123456789abcdef"
    # replicas: the same namespace, port and labels but for the ReplicaSet's revision label
    assert plan.replicas == ("shop", 8080, (("app", "web"),))


def test_a_process_pod_gets_its_port_in_PORT_and_kubernetes_variable_expansion():
    container = {"command": [PY, "-m", "http.server"], "args": ["--bind", "127.0.0.1", "$(PORT)"],
                 "env": [{"name": "GREETING", "value": "hi $(POD)"}, {"name": "POD", "valueFrom": {"fieldRef": {
                     "fieldPath": "metadata.name"}}}, {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                 "workingDir": "/tmp", "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}}}
    plan = plan_pod(pod({**PROCESS, "wakegate.dev/sleep": "stop", "wakegate.dev/hosts": "web.example, *.web.example"},
                        container), SETTINGS, upstream_port=20002, base_dir="/srv")
    svc = plan.service
    assert svc.command == (PY, "-m", "http.server", "--bind", "127.0.0.1", "20002")
    assert svc.env == {"PORT": "20002", "GREETING": "hi $(POD)", "POD": "web-1", "IP": "10.0.0.5"}
    assert (str(svc.upstream), svc.cwd, svc.sleep, svc.ready_path) == ("127.0.0.1:20002", "/tmp", "stop", "/healthz")
    assert svc.hosts == ("web.example", "*.web.example")


def test_a_microvm_pod_takes_its_kernel_from_the_allowed_folders(tmp_path, monkeypatch):
    guests = tmp_path / "guests"
    guests.mkdir()
    (guests / "vmlinux").write_bytes(b"\x7fELF")
    settings = KubernetesSettings(**{**SETTINGS.__dict__, "microvm_assets": (str(guests),)})
    monkeypatch.setattr("controller.config.shutil.which", lambda name: "/usr/bin/" + name)
    plan = plan_pod(pod({"wakegate.dev/run": "microvm", "wakegate.dev/microvm-kernel": str(guests / "vmlinux"),
                         "wakegate.dev/microvm-memory": "96"}, {"ports": [{"containerPort": 80}]}),
                    settings, upstream_port=20003, base_dir=str(tmp_path))
    vm = plan.service.microvm
    assert (vm.kernel, vm.guest_port, vm.memory_mb, plan.service.sleep) == (str(guests / "vmlinux"), 80, 96, "snapshot")
    assert str(plan.service.upstream) == "127.0.0.1:20003"


CANNOT = [
    # annotations, container, spec, reason, words
    ({}, {}, {"initContainers": [{"name": "init"}]}, "UnsupportedPod", "init containers"),
    ({}, {"ports": [{"containerPort": 80}, {"containerPort": 81}]}, {}, "UnsupportedPort", "declared: 80, 81"),
    ({}, {"ports": [{"containerPort": 53, "protocol": "UDP"}]}, {}, "UnsupportedPort", "TCP"),
    ({}, {"volumeMounts": [{"name": "cfg", "mountPath": "/etc/app"}]}, {"volumes": [{"name": "cfg", "configMap": {}}]},
     "UnsupportedVolume", "mounted at /etc/app"),
    ({}, {"envFrom": [{"configMapRef": {"name": "x"}}]}, {}, "CreateContainerConfigError", "envFrom"),
    ({}, {"env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}, {},
     "CreateContainerConfigError", "secretKeyRef"),
    ({"wakegate.dev/run": "vm"}, {}, {}, "InvalidAnnotation", "container, process, microvm"),
    ({"wakegate.dev/idle-timeout": "soon"}, {}, {}, "InvalidAnnotation", "duration"),
    ({"wakegate.dev/max-queue": "-1"}, {}, {}, "InvalidAnnotation", "whole number"),
    ({"wakegate.dev/sleep": "snapshot"}, {}, {}, "InvalidAnnotation", "pause or stop"),
    ({"wakegate.dev/hosts": "not a host"}, {}, {}, "CreateContainerConfigError", "not a host name"),
    ({"wakegate.dev/ready-path": "healthz"}, {}, {}, "CreateContainerConfigError", "ready_path"),
    (PROCESS, {}, {}, "CreateContainerConfigError", "needs the container's command"),
    (PROCESS, {"command": ["no-such-program-here"]}, {}, "RunContainerError", "not on PATH"),
    (PROCESS, {"command": ["sh"], "workingDir": "/no/such/dir"}, {}, "RunContainerError", "not a directory"),
    ({"wakegate.dev/run": "microvm", "wakegate.dev/microvm-kernel": "/etc/passwd"}, {}, {}, "InvalidAnnotation",
     "outside the folders"),
    ({"wakegate.dev/run": "microvm"}, {}, {}, "InvalidAnnotation", "microvm-kernel: missing"),
]


@pytest.mark.parametrize("annotations,container,spec,reason,words", CANNOT)
def test_what_a_wakegate_node_cannot_run_says_why(annotations, container, spec, reason, words):
    with pytest.raises(CannotRun) as caught:
        plan_pod(pod(annotations, container, **spec), SETTINGS, upstream_port=20004, base_dir="/srv")
    assert caught.value.reason == reason and words in caught.value.message, caught.value


def test_host_processes_are_refused_unless_the_node_allows_them():
    settings = KubernetesSettings(**{**SETTINGS.__dict__, "host_processes": False})
    with pytest.raises(CannotRun) as caught:
        plan_pod(pod(PROCESS, {"command": ["sh"]}), settings, upstream_port=20005, base_dir="/srv")
    assert caught.value.reason == "HostProcessesNotAllowed" and "host_processes = true" in caught.value.message


def test_the_service_account_token_volume_is_no_reason_to_refuse():
    token = "/var/run/secrets/kubernetes.io/serviceaccount"
    plan = plan_pod(pod({}, {"volumeMounts": [{"name": "default-token-x", "mountPath": token}]},
                        volumes=[{"name": "default-token-x", "secret": {"secretName": "default-token-x"}}]),
                    SETTINGS, upstream_port=20006, base_dir="/srv")
    assert plan.kind == "container"


@pytest.mark.parametrize("text,env,out", [
    ("$(A)", {"A": "1"}, "1"),
    ("x$(A)y$(B)", {"A": "1", "B": "2"}, "x1y2"),
    ("$(MISSING)", {}, "$(MISSING)"),
    ("$$(A)", {"A": "1"}, "$(A)"),
    ("$$", {}, "$"),
    ("$(A", {"A": "1"}, "$(A"),
    ("plain", {}, "plain"),
])
def test_variable_expansion_as_kubernetes_does_it(text, env, out):
    assert expand(text, env) == out


def test_long_names_are_cut_with_a_piece_of_the_uid():
    name = service_name("a-namespace-with-a-long-name", "a-pod-name-that-goes-on-and-on-and-on", "uid-1")
    assert len(name) <= 63 and name != service_name("a-namespace-with-a-long-name",
                                                     "a-pod-name-that-goes-on-and-on-and-on", "uid-2")
    assert service_name("ns", "pod", "uid") == "ns.pod"
    assert docker_container_name("n", "ns", "p", "abcdef0123") == "wakegate_n_ns_p_abcdef01"


def test_the_example_deployment_runs_on_a_wakegate_node():
    """deploy/kubernetes/example-deployment.yaml's pods are what a wakegate node runs as documented."""
    from pathlib import Path

    import yaml

    docs = list(yaml.safe_load_all((Path(__file__).parent.parent / "deploy/kubernetes/example-deployment.yaml").read_text()))
    template = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]
    raw = {"metadata": {**template["metadata"], "name": "hello-1", "namespace": "default", "uid": "u1"},
           "spec": {**template["spec"], "nodeName": "node-a"}}
    plan = plan_pod(raw, SETTINGS, upstream_port=20007, base_dir="/srv")
    assert (plan.kind, plan.port, plan.service.sleep, plan.service.idle_timeout) == ("container", 8080, "pause", 300)
    assert plan.service.no_wake.paths == ("/healthz",) and plan.service.ready_path == "/ready"
    assert {"key": "wakegate.dev/scale-to-zero", "operator": "Exists", "effect": "NoSchedule"} in template["spec"]["tolerations"]
