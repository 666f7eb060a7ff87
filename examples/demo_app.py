"""A tiny HTTP/1.1 app for the demo, standard library only: `python3 demo_app.py PORT NAME [INIT_SECONDS]`.

GET / answers who it is, its pid and how many requests it has served since it
started; the counter survives a pause (the process is frozen, not restarted)
and resets after a stop. INIT_SECONDS stands for a slow initialisation (loading
a model, warming a cache) before it listens: a cold start takes that long, a
restore from a process snapshot taken after it does not.
"""

import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 9001
NAME = sys.argv[2] if len(sys.argv) > 2 else "demo"
INIT_SECONDS = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
STARTED = time.time()
served = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are separate writes: no 40 ms delayed-ACK stall

    def do_GET(self):
        global served
        served += 1
        body = (
            f"hello from {NAME}: pid {os.getpid()}, up {time.time() - STARTED:.1f}s, "
            f"request {served} since start" + (f", initialised in {INIT_SECONDS:g}s" if INIT_SECONDS else "") + "\n"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


if __name__ == "__main__":
    time.sleep(INIT_SECONDS)  # the slow initialisation
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    server.daemon_threads = True
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
