"""Shared fixtures: both parser implementations, and the implementation the server uses."""

import importlib
import os

import pytest

PURE = os.environ.get("WAKEGATE_PUREPYTHON", "") not in ("", "0")


def _implementations():
    names = ["proxy._native"]
    if not PURE:
        # No silent fallback: when the C path is asked for, its absence is a failure.
        names.insert(0, "proxy._speedups")
    return names


@pytest.fixture(params=_implementations(), ids=lambda name: name.rsplit(".", 1)[1].lstrip("_"))
def http11(request):
    """Each parser implementation in turn: the C extension and the pure-Python twin."""
    return importlib.import_module(request.param)


# ---- real processes: the backend app and wakegate itself -------------------------

import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import h11  # noqa: E402

from bench.common import free_port  # noqa: E402,F401  (one port picker for tests and benchmarks)

ROOT = Path(__file__).resolve().parent.parent
BACKEND = ROOT / "examples" / "backend.py"


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {port}")


class Backend:
    """examples/backend.py as a real process."""

    def __init__(self, name: str = "backend") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BACKEND), "--port", "0", "--name", name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        line = self.proc.stdout.readline().decode()
        if not line.startswith("listening"):
            raise RuntimeError(f"backend did not start: {line!r} {self.proc.stderr.read().decode()[-2000:]}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


OUR_INSTANCES: set[str] = set()  # wakegate instance names (cgroup folders) of this test session


class Wakegate:
    """``wakegate serve`` as a real process, with a config written for the test."""

    def __init__(self, tmp: Path, config: str, admin_extra: str = "", launcher: tuple = ()) -> None:
        self.launcher = list(launcher)  # a command to run wakegate under (prlimit, setpriv, ...)
        self.port = free_port()
        self.admin_port = free_port()
        while self.admin_port == self.port:  # two picks of a free port can be the same one
            self.admin_port = free_port()
        OUR_INSTANCES.add(f"127.0.0.1-{self.port}")  # its cgroups are ours to check (see no_leaks)
        self.config_path = tmp / f"wakegate-{self.port}.toml"
        self.rewrite(config, admin_extra)
        self.log_path = tmp / f"wakegate-{self.port}.log"
        self.log = open(self.log_path, "wb")
        self._spawn()

    def rewrite(self, config: str, admin_extra: str = "") -> None:
        """Write the config file (the same listeners), for a start or a reload."""
        self.config_path.write_text(
            f'[proxy]\nlisten = "127.0.0.1:{self.port}"\n' + config.replace("[proxy]\n", "")
            + f'\n[admin]\nlisten = "127.0.0.1:{self.admin_port}"\n{admin_extra}\n'
        )

    def restart(self) -> None:
        """Start wakegate again with the same config (and so the same ports), after it exited."""
        assert self.proc.poll() is not None, "still running"
        self.proc.stderr.close()
        if self.log.closed:  # stopped by stop(): the log goes on
            self.log = open(self.log_path, "ab")
        self._spawn()

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(
            self.launcher + [sys.executable, "-m", "controller.cli", "serve", "-c", str(self.config_path)],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.proc.stderr = open(self.log_path, "rb")
        wait_for_port(self.port, self.proc)
        wait_for_port(self.admin_port, self.proc)  # listening after the proxy

    def rss_kib(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.proc.stderr.close()
        return self.proc.returncode

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


class Response:
    def __init__(self, status, headers, body, trailers, informational, http_version):
        self.status = status
        self.headers = headers  # [(lower name, value)]
        self.body = body
        self.trailers = trailers
        self.informational = informational
        self.http_version = http_version

    def header(self, name: bytes):
        values = [v for n, v in self.headers if n == name]
        return values[0] if values else None

    def __repr__(self):
        return f"<Response {self.status} {self.headers} {self.body[:80]!r}>"


class Client:
    """A raw-socket client; responses are read with h11 as the reference parser."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.leftover = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int = 65536) -> bytes:
        if self.leftover:
            data, self.leftover = self.leftover, b""
            return data
        return self.sock.recv(n)

    def response(self, method: bytes = b"GET") -> Response:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
        conn.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"x"), (b"content-length", b"0")]))
        conn.send(h11.EndOfMessage())
        informational, body, trailers = [], bytearray(), []
        response = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = self.recv()
                conn.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                informational.append(event.status_code)
                if event.status_code == 101:
                    self.leftover = bytes(conn.trailing_data[0])
                    return Response(101, list(event.headers), b"", [], informational, event.http_version)
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                trailers = list(event.headers)
                self.leftover = bytes(conn.trailing_data[0])
                return Response(response.status_code, list(response.headers), bytes(body), trailers,
                                informational, response.http_version)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("closed before a complete response")

    def request(self, data: bytes, method: bytes = b"GET") -> Response:
        self.send(data)
        return self.response(method)

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection (EOF or reset) within timeout."""
        self.sock.settimeout(timeout)
        try:
            data = self.leftover or self.sock.recv(65536)
            self.leftover = b""
            while data:
                data = self.sock.recv(65536)
            return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="session")
def backend():
    b = Backend()
    yield b
    b.stop()


@pytest.fixture
def start_wakegate(tmp_path_factory):
    """A factory: start_wakegate(config_text) -> a running Wakegate, stopped after the test."""
    started = []

    def start(config: str, admin_extra: str = "", launcher: tuple = ()) -> Wakegate:
        w = Wakegate(tmp_path_factory.mktemp("wg"), config, admin_extra, launcher)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


class ScriptedOrigin:
    """A raw-socket origin whose answers a test scripts: ``answer(method, path, nth)`` returns the
    bytes to send for the nth request (0-based) on its connection, or None to close without an
    answer. Every request that arrives is logged in ``seen`` as (method, path, nth)."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.seen: list[tuple[str, str, int]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stopped = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        nth = 0
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                method, path = lines[0].split(b" ")[:2]
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                buf = buf[length:]
                self.seen.append((method.decode(), path.decode(), nth))
                out = self.answer(method.decode(), path.decode(), nth)
                if out is None:
                    return
                conn.sendall(out)
                nth += 1
        except OSError:
            return
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopped = True
        self.listener.close()
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass


# ---- every test fails if it leaves something behind ------------------------------

import asyncio  # noqa: E402
import ctypes  # noqa: E402

PR_SET_CHILD_SUBREAPER = 36
LEAK_GRACE = 3.0  # seconds a test's processes get to exit after its fixtures are torn down
CGROUP_DIRS = [Path("/sys/fs/cgroup") / sub / "wakegate" for sub in ("", "freezer", "unified")]


def _children() -> set[int]:
    """Our child processes, zombies included (orphaned descendants become ours: see the subreaper)."""
    me = str(os.getpid())
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == me:
                out.add(int(entry))
    return out


def _fds() -> dict[int, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def _cgroups() -> set[str]:
    """The service cgroups of the wakegates this session started (another suite may run beside us)."""
    out = set()
    for base in CGROUP_DIRS:
        if base.is_dir():
            for path in base.glob("*/*"):
                if path.is_dir() and path.parent.name in OUR_INSTANCES:
                    out.add(str(path))
    return out


def _reap(pids) -> None:
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


@pytest.fixture(scope="session", autouse=True)
def _subreaper():
    """Orphaned descendants (a service process whose wakegate died) become pytest's children, so
    the leak check below sees them instead of losing them to init."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    import uvloop

    uvloop.new_event_loop().close()  # uvloop opens a process-wide pipe once, on its first loop
    yield


@pytest.fixture(autouse=True)
def no_leaks(request, monkeypatch):
    """Fail the test that leaves a child process, a file descriptor or a wakegate cgroup behind, or
    ends an asyncio.run() with a task still pending or a timer still scheduled."""
    children, fds, cgroups = _children(), _fds(), _cgroups()
    left_in_loops = []
    cancel_all = asyncio.runners._cancel_all_tasks

    def checked(loop):  # asyncio.run() would cancel what is left without a word
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        timers = [h for h in getattr(loop, "_scheduled", ()) if not h.cancelled()]
        if tasks or timers:
            left_in_loops.append(f"tasks {tasks}, timers {timers}")
        return cancel_all(loop)

    monkeypatch.setattr(asyncio.runners, "_cancel_all_tasks", checked)
    yield
    deadline = time.monotonic() + LEAK_GRACE
    while True:
        new = _children() - children
        _reap(new)
        new = {pid for pid in _children() - children if Path(f"/proc/{pid}").exists()
               and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"}
        left_fds = {fd: target for fd, target in _fds().items() if fd not in fds and not target.startswith("anon_inode")}
        left_cgroups = _cgroups() - cgroups
        if not (new or left_fds or left_cgroups) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    _reap(_children() - children)
    problems = []
    if new:
        cmdlines = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    for pid in new if Path(f"/proc/{pid}").exists()}
        for pid in new:
            try:
                os.kill(pid, signal.SIGKILL)  # so the next test starts clean
            except ProcessLookupError:
                pass
        _reap(new)
        problems.append(f"child processes left behind: {cmdlines}")
    if left_fds:
        problems.append(f"file descriptors left open: {left_fds}")
    if left_cgroups:
        problems.append(f"cgroups left behind: {sorted(left_cgroups)}")
    if left_in_loops:
        problems.append(f"left in an event loop at its end: {'; '.join(left_in_loops)}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


def random_arrivals(port: int, host: str, wakes, seconds: float, pauses, path: str = "/",
                    timeout: float = 30) -> list:
    """Two clients sending GET path at random intervals (pauses: the choices, seconds) around a
    service's idle timeout, on keep-alive connections that are now and then replaced by fresh ones,
    until wakes() reaches 100 or seconds pass. Every (status, body) in the order received."""
    import random
    import threading

    deadline = time.monotonic() + seconds
    results, lock = [], threading.Lock()
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()

    def worker(seed):
        r = random.Random(seed)
        c = Client(port, timeout=timeout)
        while time.monotonic() < deadline and wakes() < 100:
            if r.random() < 0.3:
                c.close()
                c = Client(port, timeout=timeout)
            response = c.request(request)
            with lock:
                results.append((response.status, response.body))
            time.sleep(r.choice(pauses))
        c.close()

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
