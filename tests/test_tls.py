"""proxy/tls.py: the HTTPS listener, with a CA and certificates made here by openssl: SNI picks the
certificate, TLS 1.2+ only with ALPN http/1.1, X-Forwarded-Proto https, a bad handshake disturbs no
one, a slow one is cut at head_timeout, and certificates are reloaded without a restart."""

import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

from proxy.tls import Certificates

from .conftest import Client, free_port


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_cert(folder, name, hosts, ca="ca"):
    """A key and a certificate for hosts (the first is the CN), signed by the CA in folder."""
    san = ",".join(f"DNS:{h}" for h in hosts)
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={hosts[0]}", cwd=folder)
    (folder / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)
    return folder / f"{name}.pem", folder / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=wakegate test CA", cwd=folder)
    certs = {name: make_cert(folder, name, hosts) for name, hosts in
             (("a", ["a.test", "*.a.test"]), ("b", ["b.test"]), ("default", ["default.test"]),
              ("a2", ["a.test", "*.a.test"]))}
    return folder, certs


def tls_config(pki, backend_port, extra=""):
    folder, certs = pki
    return f"""[proxy]
head_timeout = "1s"
{extra}
[tls]
listen = "127.0.0.1:{{tls_port}}"
[[tls.certificates]]
cert = "{certs['default'][0]}"
key = "{certs['default'][1]}"
[[tls.certificates]]
cert = "{certs['a'][0]}"
key = "{certs['a'][1]}"
hosts = ["a.test", "*.a.test"]
[[tls.certificates]]
cert = "{certs['b'][0]}"
key = "{certs['b'][1]}"
hosts = ["b.test"]
[services.s]
hosts = ["a.test", "b.test", "x.a.test", "other.test"]
upstream = "127.0.0.1:{backend_port}"
"""


@pytest.fixture
def https(start_wakegate, backend, pki):
    tls_port = free_port()
    w = start_wakegate(tls_config(pki, backend.port).replace("{tls_port}", str(tls_port)))
    w.tls_port = tls_port
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", tls_port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    return w


def client_context(pki, **kw):
    ctx = ssl.create_default_context(cafile=str(pki[0] / "ca.pem"))
    for key, value in kw.items():
        setattr(ctx, key, value)
    return ctx


def handshake(port, ctx, name):
    """(the certificate's CN, ALPN protocol, TLS version) for a handshake asking for name."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            cert = tls.getpeercert()
            cn = dict(x[0] for x in cert["subject"])["commonName"]
            return cn, tls.selected_alpn_protocol(), tls.version()


# ---- choosing a certificate ---------------------------------------------------------------------

@pytest.mark.parametrize("name, chosen", [
    ("a.test", "a"), ("x.a.test", "a"), ("A.TEST.", "a"), ("b.test", "b"), ("c.b.test", "default"),
    ("other.test", "default"), (None, "default"),
])
def test_sni_table(pki, name, chosen):
    _, certs = pki
    table = Certificates([((), str(certs["default"][0]), str(certs["default"][1])),
                          (("a.test", "*.a.test"), str(certs["a"][0]), str(certs["a"][1])),
                          (("b.test",), str(certs["b"][0]), str(certs["b"][1]))])
    expected = {"a": table.by_host["a.test"], "b": table.by_host["b.test"], "default": table.default}[chosen]
    assert table.for_host(name) is expected


def test_sni_picks_the_certificate_and_alpn_is_http11(https, pki):
    ctx = client_context(pki)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    assert handshake(https.tls_port, ctx, "a.test") == ("a.test", "http/1.1", "TLSv1.3")
    assert handshake(https.tls_port, ctx, "x.a.test")[0] == "a.test"
    assert handshake(https.tls_port, ctx, "b.test")[0] == "b.test"
    unverified = ssl.create_default_context()
    unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", https.tls_port), timeout=5) as raw:
        with unverified.wrap_socket(raw) as tls:  # no SNI at all: the default certificate
            der = tls.getpeercert(binary_form=True)
    assert der == ssl.PEM_cert_to_DER_cert(pki[1]["default"][0].read_text())


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_old_protocols_are_refused(https, pki):
    ctx = client_context(pki)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        handshake(https.tls_port, ctx, "a.test")
    ctx12 = client_context(pki)
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert handshake(https.tls_port, ctx12, "a.test")[2] == "TLSv1.2"


def test_curl_gets_the_page_with_x_forwarded_proto_https(https, pki):
    if shutil.which("curl") is None:
        pytest.skip("curl is missing")
    out = subprocess.run(["curl", "-sS", "--cacert", str(pki[0] / "ca.pem"), "--resolve",
                          f"a.test:{https.tls_port}:127.0.0.1", f"https://a.test:{https.tls_port}/headers"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    headers = {k.lower(): v for k, v in json.loads(out.stdout)["headers"]}
    assert headers["x-forwarded-proto"] == "https" and headers["host"] == f"a.test:{https.tls_port}"
    plain = Client(https.port)
    body = plain.request(b"GET /headers HTTP/1.1\r\nHost: a.test\r\n\r\n").body
    plain.close()
    assert {k.lower(): v for k, v in json.loads(body)["headers"]}["x-forwarded-proto"] == "http"


def test_a_bad_handshake_disturbs_no_one_and_a_slow_one_is_cut(https, pki):
    ctx = client_context(pki)
    with socket.create_connection(("127.0.0.1", https.tls_port), timeout=5) as good_raw:
        with ctx.wrap_socket(good_raw, server_hostname="a.test") as good:
            garbage = socket.create_connection(("127.0.0.1", https.tls_port), timeout=5)
            garbage.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n" + os.urandom(512))
            slow = socket.create_connection(("127.0.0.1", https.tls_port), timeout=5)
            slow.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
            started = time.monotonic()
            good.sendall(b"GET /hello HTTP/1.1\r\nHost: a.test\r\n\r\n")
            assert _whole(good).startswith(b"HTTP/1.1 200")
            try:
                answer = garbage.recv(4096)
            except ConnectionResetError:
                answer = b""
            assert not answer.startswith(b"HTTP/")  # closed, or a TLS alert: it never reaches a service
            assert slow.recv(4096) == b""  # cut by head_timeout (1 s)
            assert 0.5 < time.monotonic() - started < 4
            garbage.close()
            slow.close()
            good.sendall(b"GET /hello HTTP/1.1\r\nHost: a.test\r\n\r\n")
            assert _whole(good).startswith(b"HTTP/1.1 200")


def _whole(tls) -> bytes:
    """One response to GET /hello (its body is "hello"), however the records split it."""
    data = b""
    while not data.endswith(b"hello"):
        chunk = tls.recv(4096)
        assert chunk, data
        data += chunk
    return data


def test_certificates_are_reloaded_when_their_files_change(https, pki):
    folder, certs = pki
    ctx = client_context(pki)

    def serial():
        with socket.create_connection(("127.0.0.1", https.tls_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="a.test") as tls:
                return tls.getpeercert()["serialNumber"]

    before = serial()
    new_cert, new_key = certs["a2"]
    a_cert, a_key = certs["a"]
    saved = (a_cert.read_bytes(), a_key.read_bytes())
    try:
        for src, dst in ((new_key, a_key), (new_cert, a_cert)):
            tmp = dst.with_suffix(".new")
            shutil.copy(src, tmp)
            os.replace(tmp, dst)
        new_serial = ssl._ssl._test_decode_cert(str(new_cert))["serialNumber"]
        assert new_serial != before
        # Each worker looks at the files on its own timer (RELOAD_CHECK_SECONDS), so for a moment one
        # may serve the new certificate and another the old: wait until every connection in a row of
        # eight gets the new one (the kernel spreads new connections over the workers).
        deadline, in_a_row = time.monotonic() + 20, 0
        while in_a_row < 8:
            assert time.monotonic() < deadline, "the changed certificate was not picked up by every worker"
            got = serial()
            assert got in (before, new_serial)
            in_a_row = in_a_row + 1 if got == new_serial else 0
            if not in_a_row:
                time.sleep(0.2)
    finally:
        a_cert.write_bytes(saved[0])
        a_key.write_bytes(saved[1])


def test_a_bad_certificate_is_a_clear_config_error(tmp_path, pki):
    from controller.config import ConfigError, load

    _, certs = pki
    path = tmp_path / "bad.toml"
    path.write_text(f'[tls]\nlisten = "127.0.0.1:1"\n[[tls.certificates]]\ncert = "{certs["a"][0]}"\n'
                    f'key = "{certs["b"][1]}"\n[services.s]\nhosts = ["s.test"]\nupstream = "127.0.0.1:2"\n')
    with pytest.raises(ConfigError, match=r"tls\.certificates\[0\]\.cert: cannot load"):
        load(path)
    path.write_text('[tls]\nlisten = "127.0.0.1:1"\n[[tls.certificates]]\ncert = "nope.pem"\nkey = "nope.key"\n'
                    '[services.s]\nhosts = ["s.test"]\nupstream = "127.0.0.1:2"\n')
    with pytest.raises(ConfigError, match=r"tls\.certificates\[0\]\.cert: .* does not exist"):
        load(path)


def test_many_tls_clients_at_once(https, pki):
    ctx = client_context(pki)
    results, lock = [], threading.Lock()

    def one(name):
        with socket.create_connection(("127.0.0.1", https.tls_port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                tls.sendall(f"GET /hello HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
        with lock:
            results.append(data.split(b"\r\n", 1)[0])

    threads = [threading.Thread(target=one, args=(("a.test", "b.test")[i % 2],)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 40 and all(r.startswith(b"HTTP/1.1 200") for r in results), results
