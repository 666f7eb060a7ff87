"""``make run``: start the demo backends, then wakegate with config.example.toml.

The backends (examples/backend.py) listen where config.example.toml expects
them; Ctrl-C or SIGTERM stops wakegate (which drains) and then the backends.
"""

import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = [("hello", 9001), ("api", 9002)]


def main() -> int:
    procs = []
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
            "demo: try  curl -H 'Host: hello.localhost' http://127.0.0.1:8080/hello\n"
            "           curl -H 'Host: hello.localhost' http://127.0.0.1:8080/api/headers",
            flush=True,
        )
        wakegate = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "serve", "-c", str(ROOT / "config.example.toml")], cwd=ROOT
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
