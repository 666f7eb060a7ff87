"""``make run``: start the always-up demo backend, prepare the microVM's snapshot, then wakegate
with config.example.toml.

wakegate itself starts (and puts to sleep) the services that have a command or
a microVM; the always-up one (examples/backend.py) is started here, and the
microVM's prepared snapshot is made here if there is none yet (a cold boot of a
few seconds), so that its first request is a restore. Ctrl-C or SIGTERM stops
wakegate (which drains and stops its services) and then the backend.
"""

import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = [("always", 9003)]
CONFIG = ROOT / "config.example.toml"
MICROVM = "vm"
SNAPSHOT_RECORD = ROOT / ".cache" / "snapshots" / f"{MICROVM}.json"


def prepare_microvm() -> None:
    """The prepared snapshot for the microVM service, unless one exists (wakegate checks it fits)."""
    if SNAPSHOT_RECORD.exists():
        return
    print(f"demo: preparing the {MICROVM} microVM's snapshot (one cold boot, a few seconds)", flush=True)
    result = subprocess.run([sys.executable, "-m", "controller.cli", "snapshot", MICROVM, "-c", str(CONFIG)], cwd=ROOT)
    if result.returncode != 0:
        print("demo: no prepared snapshot; the first request to vm.localhost will cold-boot instead", flush=True)


def main() -> int:
    procs = []
    prepare_microvm()
    try:
        for name, port in BACKENDS:
            p = subprocess.Popen(
                [sys.executable, str(ROOT / "examples" / "backend.py"), "--port", str(port), "--name", name],
                stdout=subprocess.PIPE,
            )
            line = p.stdout.readline().decode().strip()
            if not line.startswith("listening"):
                print(f"demo: backend {name} did not start on port {port}", file=sys.stderr)
                return 1
            procs.append(p)
            print(f"demo: backend {name} on 127.0.0.1:{port}", flush=True)
        print(
            "demo: try  curl -H 'Host: paused.localhost' http://127.0.0.1:8080/     (wakes a paused service)\n"
            "           curl -H 'Host: stopped.localhost' http://127.0.0.1:8080/    (cold-starts a stopped one)\n"
            "           curl -H 'Host: vm.localhost' http://127.0.0.1:8080/         (restores a microVM snapshot)\n"
            "           curl -H 'Host: slow.localhost' http://127.0.0.1:8080/       (3 s cold start; after its idle\n"
            "                                                                      sleep, a CRIU restore in ms)\n"
            "           curl http://127.0.0.1:9090/services                        (states, wakes, sleeps)",
            flush=True,
        )
        wakegate = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "serve", "-c", str(CONFIG)], cwd=ROOT
        )
        signal.signal(signal.SIGTERM, lambda *_: wakegate.send_signal(signal.SIGTERM))
        try:
            return wakegate.wait()
        except KeyboardInterrupt:
            wakegate.send_signal(signal.SIGTERM)
            return wakegate.wait()
    finally:
        for p in procs:
            p.terminate()
            p.wait()


if __name__ == "__main__":
    sys.exit(main())
