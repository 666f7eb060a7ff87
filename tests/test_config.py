"""controller.config: durations, sizes, addresses, and errors that name file, key and problem."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from controller.config import ConfigError, load, parse_address, parse_duration, parse_size

GOOD = """
[proxy]
listen = "127.0.0.1:8080"
head_timeout = "250ms"
upstream_timeout = 30
keepalive_timeout = "5m"
max_body_size = "10MiB"

[admin]
listen = "[::1]:9090"

[services.app]
hosts = ["App.Example", "*.b.example"]
paths = ["/api"]
upstream = "127.0.0.1:9001"

[services.site]
hosts = ["app.example"]
upstream = "localhost:9002"
"""


def write(tmp_path, text):
    path = tmp_path / "wakegate.toml"
    path.write_text(text)
    return path


def test_good_config(tmp_path):
    config = load(write(tmp_path, GOOD))
    assert config.proxy.head_timeout == 0.25
    assert config.proxy.upstream_timeout == 30
    assert config.proxy.keepalive_timeout == 300
    assert config.proxy.max_body_size == 10 << 20
    assert str(config.admin.listen) == "[::1]:9090"
    assert config.services["app"].hosts == ("app.example", "*.b.example")
    assert config.services["app"].paths == ("/api",)
    assert config.services["site"].upstream.port == 9002


@pytest.mark.parametrize(
    "value,seconds",
    [(30, 30.0), (0.5, 0.5), ("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1.5s", 1.5),
     ("2", 2.0), ("x", None), ("5d", None), (True, None), ("-1s", None), (float("inf"), None)],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value,size", [(100, 100), ("16KiB", 16384), ("1MiB", 1 << 20), ("2GB", 2 * 10**9), ("1.5MiB", None), ("x", None)]
)
def test_parse_size(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize(
    "value,ok",
    [("127.0.0.1:80", True), ("[::1]:80", True), ("localhost:1", True), ("::1:80", False), ("host", False),
     ("h:99999", False), ("[zz]:80", False), (80, False)],
)
def test_parse_address(value, ok):
    assert (parse_address(value) is not None) == ok


VM = '[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:9010"\n'
BAD = [
    # text appended to a minimal valid config or replacing it, expected key, expected words
    ('[proxy]\nlisten = "nowhere"\n', "proxy.listen", "host:port"),
    ('[proxy]\nhead_timeout = "soon"\n', "proxy.head_timeout", "duration"),
    ("[proxy]\nhead_timeout = 0\n", "proxy.head_timeout", "greater than zero"),
    ("[proxy]\nmax_body_size = -1\n", "proxy.max_body_size", "at least"),
    ('[proxy]\nmax_body_size = "lots"\n', "proxy.max_body_size", "size"),
    ("[proxy]\nupstream_keepalive = 1.5\n", "proxy.upstream_keepalive", "whole number"),
    ("[proxy]\nunknown_host_status = 400\n", "proxy.unknown_host_status", "404 or 421"),
    ('[proxy]\ndefault_service = "nope"\n', "proxy.default_service", "names no service"),
    ("[proxy]\nlisten_port = 1\n", "proxy.listen_port", "unknown key"),
    ('[admin]\nlisten = "1.2.3.4"\n', "admin.listen", "host:port"),
    ("[bogus]\n", "bogus", "unknown key"),
    ('[services.x]\nhosts = ["x.example"]\n', "services.x.upstream", "missing"),
    ('[services.x]\nupstream = "127.0.0.1:1"\n', "services.x.hosts", "missing"),
    ('[services.x]\nhosts = "bad host"\nupstream = "127.0.0.1:1"\n', "services.x.hosts", "not a host name"),
    ('[services.x]\nhosts = ["a.example:80"]\nupstream = "127.0.0.1:1"\n', "services.x.hosts", "without port"),
    ('[services.x]\nhosts = [1]\nupstream = "127.0.0.1:1"\n', "services.x.hosts", "list of strings"),
    ('[services.x]\nhosts = ["x.example"]\npaths = ["api"]\nupstream = "127.0.0.1:1"\n', "services.x.paths", "start with"),
    ('[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\nport = 2\n', "services.x.port", "unknown key"),
    ('[services.x]\nhosts = ["ok.example"]\nupstream = "127.0.0.1:1"\n', "services.ok.hosts", "already routed"),
    ('[services."bad name"]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\n', "services.bad name", "service names"),
    ("services = 3\n", "services", "expected a table"),
    ('[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\ncommand = "app"\n', "services.x.command", "list of strings"),
    ('[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\ncommand = []\n', "services.x.command", "non-empty"),
    ('[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\ncommand = ["no-such-binary-here"]\n',
     "services.x.command", "not on PATH"),
    ('[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\ncommand = ["./missing.py"]\n',
     "services.x.command", "does not exist"),
    ('[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\ncommand = ["sh"]\nsleep = "hibernate"\n',
     "services.x.sleep", '"pause" or "stop"'),
    ('[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\ncommand = ["sh"]\ncwd = "/no/such/dir"\n',
     "services.x.cwd", "not a directory"),
    ('[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\ncommand = ["sh"]\nenv = { A = 1 }\n',
     "services.x.env", "table of strings"),
    ('[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\ncommand = ["sh"]\nidle_timeout = "later"\n',
     "services.x.idle_timeout", "duration"),
    ('[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\ncommand = ["sh"]\nready_path = "health"\n',
     "services.x.ready_path", "path"),
    ('[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\ncommand = ["sh"]\nmax_queue = 0\n',
     "services.x.max_queue", "between"),
    ('[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\ncommand = ["sh"]\n[services.x.no_wake]\nagents = []\n',
     "services.x.no_wake.agents", "unknown key"),
    ('[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\nsleep = "pause"\n', "services.x.sleep",
     "only applies to a service with a command"),
    ('[admin]\ntoken = 5\n', "admin.token", "expected a string"),
] + [  # Docker services
    ('[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\n' + body, key, words)
    for body, key, words in [
        ('[services.x.docker]\n', "services.x.docker.labels", "exactly one of container"),
        ('[services.x.docker]\ncontainer = "a"\nlabels = { a = "b" }\n', "services.x.docker.container",
         "exactly one of container"),
        ('[services.x.docker]\ncontainer = "a b"\n', "services.x.docker.container", "not a container name"),
        ('[services.x.docker]\nlabels = ["a=b"]\n', "services.x.docker.labels", "table of label"),
        ('[services.x.docker]\ncontainer = "a"\nsocket = "docker.sock"\n', "services.x.docker.socket",
         "absolute path"),
        ('[services.x.docker]\ncontainer = "a"\nstop_timeout = "soon"\n', "services.x.docker.stop_timeout",
         "duration"),
        ('[services.x.docker]\ncontainer = "a"\nimage = "x"\n', "services.x.docker.image", "unknown key"),
        ('sleep = "snapshot"\n[services.x.docker]\ncontainer = "a"\n', "services.x.sleep", '"pause" or "stop"'),
        ('cwd = "/"\n[services.x.docker]\ncontainer = "a"\n', "services.x.cwd", "a container has its own"),
        ('command = ["sh"]\n[services.x.docker]\ncontainer = "a"\n', "services.x.docker", "also has 'command'"),
    ]
] + [  # microVM services; /bin/sh stands in for a kernel file where the file is not the point
    (VM + line + ("" if "[services.x.microvm]" in line else '[services.x.microvm]\nkernel = "/bin/sh"\n'), key, words)
    for line, key, words in [
        ('command = ["sh"]\n', "services.x.microvm", "also has 'command'"),
        ('cwd = "/"\n', "services.x.cwd", "not to a microVM"),
        ('sleep = "stop"\n', "services.x.sleep", '"snapshot" or "pause"'),
        ('sleep = "pause"\nsnapshot_policy = "prepared"\n', "services.x.snapshot_policy", 'sleep = "snapshot"'),
        ('snapshot_policy = "sometimes"\n', "services.x.snapshot_policy", '"stateful" or "prepared"'),
        ('[services.x.microvm]\ninitrd = "/bin/sh"\n', "services.x.microvm.kernel", "microvm build"),
        ('[services.x.microvm]\nkernel = "/no/vmlinux"\n', "services.x.microvm.kernel", "does not exist"),
        ('[services.x.microvm]\nkernel = "/bin/sh"\ninitrd = "missing.cpio"\n', "services.x.microvm.initrd",
         "does not exist"),
        ('[services.x.microvm]\nkernel = "/bin/sh"\nqemu = "no-such-qemu"\n', "services.x.microvm.qemu",
         "apt-get install qemu-system-x86"),
        ('[services.x.microvm]\nkernel = "/bin/sh"\nmemory_mb = 64\n', "services.x.microvm.memory_mb",
         "between 80"),
        ('[services.x.microvm]\nkernel = "/bin/sh"\naccel = "xen"\n', "services.x.microvm.accel", '"tcg", "kvm"'),
        ('[services.x.microvm]\nkernel = "/bin/sh"\nguest_port = 0\n', "services.x.microvm.guest_port", "between"),
        ('[services.x.microvm]\nkernel = "/bin/sh"\nsnapshot_dir = "/dev/null/snapshots"\n',
         "services.x.microvm.snapshot_dir", "can write"),
        ('[services.x.microvm]\nkernel = "/bin/sh"\nwarmup = ["x"]\n', "services.x.microvm.warmup", "path"),
        ('[services.x.microvm]\nkernel = "/bin/sh"\ndisk = "a.img"\n', "services.x.microvm.disk", "unknown key"),
        ('[services.x.microvm]\nkernel = "/bin/sh"\nsnapshot_format = "qcow2"\n',
         "services.x.microvm.snapshot_format", '"ram-file" or "stream"'),
        ('[services.x.microvm]\nkernel = "/bin/sh"\nstandby = "yes"\n', "services.x.microvm.standby", "true or false"),
    ]
] + [
    ('[services.x]\nhosts = ["x.example"]\nupstream = "[::1]:9010"\n[services.x.microvm]\nkernel = "/bin/sh"\n',
     "services.x.upstream", "IPv4"),
    ('[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\nsnapshot_policy = "prepared"\n',
     "services.x.snapshot_policy", "a microvm, a docker or an oci table"),
    ('[services.x]\nhosts = ["x.example"]\n[services.x.wasm]\nmodule = "/bin/sh"\n', "services.x.wasm.module",
     "not a WebAssembly module"),
    ('[services.x]\nhosts = ["x.example"]\n[services.x.wasm]\nmodule = "nope.wasm"\n', "services.x.wasm.module",
     "does not exist"),
    ('[services.x]\nhosts = ["x.example"]\n[services.x.wasm]\n', "services.x.wasm.module", "missing"),
    ('[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\n[services.x.wasm]\nmodule = "/bin/sh"\n',
     "services.x.upstream", "no upstream"),
    ('[services.x]\nhosts = ["x.example"]\ncommand = ["sh"]\n[services.x.wasm]\n'
     'module = "/bin/sh"\n', "services.x.wasm", "also has 'command'"),
] + [  # [kubernetes]
    ('[kubernetes]\nnode_address = "10.0.0.5"\n', "kubernetes.kubeconfig", "exactly one of kubeconfig"),
    ('[kubernetes]\nkubeconfig = "/no/kubeconfig"\nnode_address = "10.0.0.5"\n', "kubernetes.kubeconfig",
     "does not exist"),
    ('[kubernetes]\nkubeconfig = "/etc/hostname"\nnode_address = "10.0.0.5"\n', "kubernetes.kubeconfig",
     "not a usable kubeconfig"),
    ('[kubernetes]\nin_cluster = true\n', "kubernetes.node_address", "missing"),
    ('[kubernetes]\nin_cluster = true\nnode_address = "127.0.0.1"\n', "kubernetes.node_address", "loopback"),
    ('[kubernetes]\nin_cluster = true\nnode_address = "node-a"\n', "kubernetes.node_address", "IP address"),
    ('[kubernetes]\nin_cluster = true\nnode_address = "10.0.0.5"\nnode_name = "Node_A"\n', "kubernetes.node_name",
     "DNS subdomain"),
    ('[kubernetes]\nin_cluster = true\nnode_address = "10.0.0.5"\ntaint = "a=b"\n', "kubernetes.taint", "Effect"),
    ('[kubernetes]\nin_cluster = true\nnode_address = "10.0.0.5"\nlabels = { "a b" = "c" }\n', "kubernetes.labels",
     "label key"),
    ('[kubernetes]\nin_cluster = true\nnode_address = "10.0.0.5"\n[kubernetes.capacity]\nmemory = "lots"\n',
     "kubernetes.capacity.memory", "quantity"),
    ('[kubernetes]\nin_cluster = true\nnode_address = "10.0.0.5"\nrenew_interval = "1m"\n',
     "kubernetes.renew_interval", "shorter than lease_duration"),
    ('[kubernetes]\nin_cluster = true\nnode_address = "10.0.0.5"\ncontainer_network = "host"\n',
     "kubernetes.container_network", "network of their own"),
    ('[kubernetes]\nin_cluster = true\nnode_address = "10.0.0.5"\nmicrovm_assets = ["/no/such"]\n',
     "kubernetes.microvm_assets", "not a folder"),
    ('[kubernetes]\nin_cluster = true\nnode_address = "10.0.0.5"\nnodes = 2\n', "kubernetes.nodes", "unknown key"),
    ('[kubernetes]\nin_cluster = true\nnode_address = "10.0.0.5"\n', "kubernetes.in_cluster", "not a pod"),
] + [  # a service's own listeners
    ('[services.x]\nupstream = "127.0.0.1:1"\nlisten = ["nowhere"]\n', "services.x.listen", "host:port"),
    ('[services.x]\nupstream = "127.0.0.1:1"\nlisten = ["127.0.0.1:0"]\n', "services.x.listen", "with a port"),
    ('[services.x]\nupstream = "127.0.0.1:1"\nlisten = ["127.0.0.1:7001", "127.0.0.1:7001"]\n', "services.x.listen",
     "listed twice"),
    ('[services.x]\nupstream = "127.0.0.1:1"\nlisten = ["127.0.0.1:7001"]\n[services.y]\nupstream = "127.0.0.1:1"\n'
     'listen = ["127.0.0.1:7001"]\n', "services.y.listen", "already the listener of service 'x'"),
    ('[proxy]\nlisten = "127.0.0.1:7002"\n[services.x]\nupstream = "127.0.0.1:1"\nlisten = ["127.0.0.1:7002"]\n',
     "services.x.listen", "the proxy listener"),
    ('[services.x]\nupstream = "127.0.0.1:1"\n', "services.x.hosts", "listen = ["),
    ('[services.x]\nlisten = ["127.0.0.1:7003"]\n[services.x.wasm]\nmodule = "/bin/sh"\n', "services.x.listen",
     "answered by Host"),
]

MINIMAL = '[services.ok]\nhosts = ["ok.example"]\nupstream = "127.0.0.1:9001"\n'


@pytest.mark.parametrize("text,key,words", BAD)
def test_bad_config_names_file_key_and_problem(tmp_path, text, key, words):
    body = text + "\n" + MINIMAL if not text.startswith("services =") else text
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert words in message


def test_kubernetes_settings(tmp_path, monkeypatch):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:6443'}}]\n"
                          "users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n"
                          "current-context: x\n")
    config = load(write(tmp_path, f'[kubernetes]\nkubeconfig = "kubeconfig"\nnode_name = "edge-1"\n'
                                  f'node_address = "10.0.0.5"\nlabels = {{ "wakegate.dev/pool" = "edge" }}\n'
                                  f'[kubernetes.capacity]\ncpu = "500m"\n'))
    k = config.kubernetes
    assert k.enabled and k.kubeconfig == str(kubeconfig) and (k.node_name, k.node_address) == ("edge-1", "10.0.0.5")
    assert k.taint == ("wakegate.dev/scale-to-zero", "true", "NoSchedule") and k.labels == (("wakegate.dev/pool", "edge"),)
    assert dict(k.capacity)["cpu"] == "500m" and dict(k.capacity)["pods"] == "110"
    assert not config.services  # pods are its services
    token = tmp_path / "token"
    token.write_text("t")
    monkeypatch.setattr("controller.config.KUBE_SERVICE_ACCOUNT_TOKEN", str(token))
    assert load(write(tmp_path, '[kubernetes]\nin_cluster = true\nnode_address = "10.0.0.5"\ntaint = ""\n')
                ).kubernetes.taint is None


def test_a_service_with_listeners_of_its_own_needs_no_hosts(tmp_path):
    config = load(write(tmp_path, '[services.x]\nupstream = "127.0.0.1:1"\nlisten = ["127.0.0.1:7001", "[::1]:7001"]\n'))
    assert [str(a) for a in config.services["x"].listen] == ["127.0.0.1:7001", "[::1]:7001"]
    assert config.services["x"].hosts == ()


def test_service_with_command(tmp_path):
    text = GOOD + '[services.w]\nhosts = ["w.example"]\nupstream = "127.0.0.1:9003"\ncommand = ["sh", "-c", "true"]\n' \
        'sleep = "pause"\nidle_timeout = "2m"\nenv = { A = "1" }\n[services.w.no_wake]\npaths = ["/healthz"]\n' \
        'user_agents = ["kube-probe"]\nstatus = 204\n'
    w = load(write(tmp_path, text)).services["w"]
    assert w.command == ("sh", "-c", "true") and w.sleep == "pause" and w.idle_timeout == 120
    assert w.cwd == str(tmp_path) and w.env == {"A": "1"}
    assert (w.no_wake.paths, w.no_wake.user_agents, w.no_wake.status) == (("/healthz",), ("kube-probe",), 204)
    assert w.max_queue == 10_000 and w.ready_path == "/"
    assert load(write(tmp_path, GOOD)).services["app"].command == ()


LABELS = [
    # labels (beyond wakegate.enable), the error's words, or None when they make a service
    ({"wakegate.hosts": "a.test", "wakegate.port": "9001"}, None),
    ({"wakegate.hosts": "a.test, b.test", "wakegate.upstream": "127.0.0.1:9001", "wakegate.sleep": "stop"}, None),
    ({"wakegate.hosts": "a.test"}, "container web: label wakegate.port: missing"),
    ({"wakegate.hosts": "a.test", "wakegate.port": "1", "wakegate.idle_timeout": "soon"},
     "container web: label wakegate.idle_timeout: expected a duration"),
    ({"wakegate.hosts": "a.test", "wakegate.port": "1", "wakegate.sleep": "snapshot"},
     "container web: label wakegate.sleep: expected \"pause\" or \"stop\""),
    ({"wakegate.hosts": "a.test", "wakegate.port": "1", "wakegate.colour": "red"},
     "container web: label wakegate.colour: unknown"),
    ({"wakegate.port": "1"}, "container web: label wakegate.hosts: missing"),
    ({"wakegate.hosts": "a.test", "wakegate.port": "1", "wakegate.service": "bad name"},
     "container web: label wakegate.service: service names"),
    ({"wakegate.hosts": "a.test", "wakegate.port": "1", "wakegate.max_queue": "many"},
     "container web: label wakegate.max_queue: expected a whole number"),
]


@pytest.mark.parametrize("labels,words", LABELS)
def test_labels_are_read_as_a_service_table(labels, words):
    from controller.config import service_from_labels

    labels = {"wakegate.enable": "true", "com.example.other": "ignored", **labels}
    if words is None:
        svc = service_from_labels("web", labels, "/run/d.sock")
        assert svc.name == "web" and svc.docker.container == "web" and svc.docker.socket == "/run/d.sock"
        assert svc.hosts[0] == "a.test" and 9001 in (svc.upstream.port, svc.docker.port)
        return
    with pytest.raises(ConfigError) as info:
        service_from_labels("web", labels, "/run/d.sock")
    assert str(info.value).startswith(words), str(info.value)


def test_replicas_are_selected_by_their_service_label():
    from controller.config import service_from_labels

    svc = service_from_labels("shop-1", {"wakegate.service": "shop", "wakegate.hosts": "s.test", "wakegate.port": "1"},
                              "/s")
    assert svc.name == "shop" and svc.docker.container == "" and svc.docker.labels == (("wakegate.service", "shop"),)


def test_discovery_settings(tmp_path):
    config = load(write(tmp_path, '[docker]\ndiscover = true\n'))
    assert config.discovery.enabled and config.discovery.socket == "/var/run/docker.sock" and config.services == {}
    with pytest.raises(ConfigError, match=r"docker.socket: expected the absolute path"):
        load(write(tmp_path, '[docker]\ndiscover = true\nsocket = "d.sock"\n'))
    with pytest.raises(ConfigError, match=r"docker.discover: expected true or false"):
        load(write(tmp_path, '[docker]\ndiscover = "yes"\n'))


def test_docker_service(tmp_path):
    text = GOOD + '[services.c]\nhosts = ["c.example"]\nupstream = "127.0.0.1:9020"\n' \
        '[services.c.docker]\nlabels = { "com.docker.compose.service" = "web", "com.docker.compose.project" = "p" }\n'
    c = load(write(tmp_path, text)).services["c"]
    assert c.wakeable and c.sleep == "pause" and c.docker.socket == "/var/run/docker.sock"
    assert c.docker.labels == (("com.docker.compose.project", "p"), ("com.docker.compose.service", "web"))
    assert c.docker.container == "" and c.docker.stop_timeout == 10.0


def test_microvm_service(tmp_path, monkeypatch):
    (tmp_path / "guest").mkdir()
    (tmp_path / "guest" / "vmlinux").write_bytes(b"\x7fELF")
    text = GOOD + '[services.vm]\nhosts = ["vm.example"]\nupstream = "127.0.0.1:9010"\nsnapshot_policy = "prepared"\n' \
        '[services.vm.microvm]\nkernel = "guest/vmlinux"\nmemory_mb = 96\nwarmup = ["/", "/api"]\naccel = "auto"\n'
    monkeypatch.setattr("controller.guest.kvm_usable", lambda: False)
    vm = load(write(tmp_path, text)).services["vm"]
    assert vm.wakeable and vm.sleep == "snapshot" and vm.snapshot_policy == "prepared"
    assert vm.microvm.kernel == str(tmp_path / "guest" / "vmlinux") and vm.microvm.initrd == ""
    assert vm.microvm.memory_mb == 96 and vm.microvm.accel == "tcg" and vm.microvm.warmup == ("/", "/api")
    assert vm.microvm.snapshot_dir == str(tmp_path / ".cache" / "snapshots")  # beside the config
    assert vm.microvm.qemu.endswith("qemu-system-x86_64") and vm.microvm.guest_port == 80
    assert vm.microvm.snapshot_format == "ram-file" and vm.microvm.standby is True
    monkeypatch.setattr("controller.guest.kvm_usable", lambda: True)
    assert load(write(tmp_path, text)).services["vm"].microvm.accel == "kvm"
    monkeypatch.setattr("controller.guest.kvm_usable", lambda: False)
    with pytest.raises(ConfigError, match=r"services.vm.microvm.accel: .*/dev/kvm"):
        load(write(tmp_path, text.replace('"auto"', '"kvm"')))


def test_no_services(tmp_path):
    with pytest.raises(ConfigError, match="no services configured"):
        load(write(tmp_path, "[proxy]\n"))


def test_not_toml(tmp_path):
    with pytest.raises(ConfigError, match=r"wakegate.toml: not valid TOML: .*line 1"):
        load(write(tmp_path, "[proxy\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "absent.toml")


def test_example_config_is_valid():
    from pathlib import Path

    config = load(Path(__file__).resolve().parent.parent / "config.example.toml")
    assert config.services


# ---- issue 10, defect 16: one line naming file, key and problem -------------------------

NOT_UTF8 = [
    (b'[proxy]\nlisten = "127.0.0.1:1"\n# caf\xe9\n', "line 3: byte 0xe9 is not UTF-8"),
    (b'[services.a]\nhosts = ["a"]\nupstream = "127.0.0.1:1"\ncommand = ["x\xff"]\n',
     "services.a.command (line 4): byte 0xff is not UTF-8"),
    (b'title = "\xc3"\n', "title (line 1): byte 0xc3 is not UTF-8"),
]


@pytest.mark.parametrize("raw,words", NOT_UTF8)
def test_not_utf8_names_where(tmp_path, raw, words):
    path = tmp_path / "wakegate.toml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}: {words}; a TOML file must be UTF-8"


def test_command_that_is_not_executable(tmp_path):
    script = tmp_path / "app.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    path = write(tmp_path, '[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\ncommand = ["./app.sh"]\n')
    with pytest.raises(ConfigError, match=r"services\.x\.command: './app.sh' is not executable"):
        load(path)


def test_kernel_the_serving_user_cannot_read(tmp_path):
    """Run `wakegate check` as nobody against a kernel only root may read."""
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to check as another user")
    if subprocess.run(as_nobody + ["-c", "import controller"], cwd=Path(__file__).resolve().parent.parent,
                      capture_output=True, timeout=60).returncode != 0:
        pytest.skip("nobody cannot run this Python or read this checkout")
    folder = Path(tempfile.mkdtemp(prefix="wakegate-unreadable-"))
    try:
        folder.chmod(0o755)
        kernel = folder / "vmlinux"
        kernel.write_bytes(b"\x7fELF")
        kernel.chmod(0o600)
        config = folder / "wakegate.toml"
        config.write_text('[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:9010"\n'
                          f'[services.x.microvm]\nkernel = "{kernel}"\nsnapshot_dir = "/tmp"\n')
        config.chmod(0o644)
        result = subprocess.run(as_nobody + ["-m", "controller.cli", "check", "-c", str(config)],
                                cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == (f"wakegate: {config}: services.x.microvm.kernel: '{kernel}' cannot be read "
                                         "by this user: Permission denied")
    finally:
        shutil.rmtree(folder)


# ---- process snapshots name a missing or too old CRIU ------------------------------------

@pytest.mark.parametrize("script,words", [
    ("#!/bin/sh\necho 'Version: 3.17.1'\n", "is CRIU 3.17, older than 4.2"),
    ("#!/bin/sh\nexit 1\n", "does not run"),
])
def test_snapshot_service_needs_a_recent_criu(tmp_path, script, words):
    criu = tmp_path / "criu"
    criu.write_text(script)
    criu.chmod(0o755)
    path = write(tmp_path, '[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\ncommand = ["sh"]\n'
                           f'sleep = "snapshot"\n[services.x.criu]\nbinary = "{criu}"\n')
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}: services.x.criu.binary: ") and words in str(info.value)


def test_criu_table_only_with_snapshot_sleep(tmp_path):
    path = write(tmp_path, '[services.x]\nhosts = ["x.example"]\nupstream = "127.0.0.1:1"\ncommand = ["sh"]\n'
                           'sleep = "stop"\n[services.x.criu]\n')
    with pytest.raises(ConfigError, match=r'services\.x\.criu: only applies to a service with sleep = "snapshot"'):
        load(path)
