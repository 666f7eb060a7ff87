"""A tiny HTTP/1.1 app for the demo, standard library only: `python3 demo_app.py PORT NAME`.

GET / answers who it is, its pid and how many requests it has served since it
started; the counter survives a pause (the process is frozen, not restarted)
and resets after a stop.
"""

import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 9001
NAME = sys.argv[2] if len(sys.argv) > 2 else "demo"
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
            f"request {served} since start\n"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    server.daemon_threads = True
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
