"""controller.cli: `wakegate check`, `--version`, and clean failures without tracebacks."""

import os
import socket
import subprocess
import sys

import pytest

from .conftest import ROOT, free_port

PARSER = ("pure Python, warm path: Python" if os.environ.get("WAKEGATE_PUREPYTHON")
          else "C extension, warm path: C")


def wakegate(*args):
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
    )


def test_version_names_the_parser():
    result = wakegate("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("wakegate ") and f"(parser: {PARSER})" in result.stdout


def test_check_example_config():
    result = wakegate("check", "-c", "config.example.toml")
    assert result.returncode == 0, result.stderr
    assert "ok, 6 services" in result.stdout and PARSER in result.stdout


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[proxy\n", "not valid TOML"),
        ('[services.a]\nhosts = ["a.example"]\nupstream = "nowhere"\n', "services.a.upstream"),
        ('[proxy]\nhead_timeout = "fast"\n[services.a]\nhosts = ["a"]\nupstream = "127.0.0.1:1"\n', "proxy.head_timeout"),
    ],
)
def test_check_bad_config(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    for command in ("check", "serve"):
        result = wakegate(command, "-c", str(path))
        assert result.returncode == 2
        assert str(path) in result.stderr and needle in result.stderr
        assert "Traceback" not in result.stderr


def test_check_missing_file(tmp_path):
    result = wakegate("check", "-c", str(tmp_path / "none.toml"))
    assert result.returncode == 2 and "no such file" in result.stderr


@pytest.mark.parametrize("key", ["proxy.listen", "admin.listen"])
def test_serve_port_in_use(tmp_path, key):
    # issue 10, defect 16: one line naming file, key and problem, exit status 2 (it was 1, no key)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proxy_port, admin_port = (port, free_port()) if key == "proxy.listen" else (free_port(), port)
        path = tmp_path / "c.toml"
        path.write_text(f'[proxy]\nlisten = "127.0.0.1:{proxy_port}"\n[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
                        '[services.a]\nhosts = ["a"]\nupstream = "127.0.0.1:1"\n')
        result = wakegate("serve", "-c", str(path))
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"wakegate: {path}: {key}: cannot listen on 127.0.0.1:{port}"), line
    assert "Traceback" not in result.stderr


def test_no_command_prints_help():
    result = wakegate()
    assert result.returncode == 2 and "serve" in result.stderr


@pytest.mark.parametrize("service,needle", [("nope", "no service 'nope'"), ("a", "has no snapshot to prepare")])
def test_snapshot_refuses_what_it_cannot_snapshot(tmp_path, service, needle):
    path = tmp_path / "c.toml"
    path.write_text('[services.a]\nhosts = ["a"]\nupstream = "127.0.0.1:1"\n')
    result = wakegate("snapshot", service, "-c", str(path))
    assert result.returncode == 2 and needle in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("script,needle", [
    ("echo 'fake-qemu: cannot set up host forwarding' >&2; exit 1", "cannot set up host forwarding"),
    ("exit 0", "QEMU exited with status 0"),
])
def test_snapshot_reports_a_failing_vmm_in_one_line(tmp_path, script, needle):
    """A fake QEMU (named so) that exits at once: `wakegate snapshot` says why, exits 1, leaves nothing."""
    fake = tmp_path / "fake-qemu"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    path = tmp_path / "c.toml"
    path.write_text(f'[services.vm]\nhosts = ["vm"]\nupstream = "127.0.0.1:1"\nwake_timeout = "20s"\n'
                    f'[services.vm.microvm]\nkernel = "/bin/sh"\nqemu = "{fake}"\nsnapshot_dir = "{tmp_path / "s"}"\n')
    result = wakegate("snapshot", "vm", "-c", str(path))
    assert result.returncode == 1 and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "s" / "vm.vmstate").exists()
