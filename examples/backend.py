"""A small HTTP/1.1 origin server for demos and tests, built on h11 and asyncio.

``python examples/backend.py --port 0`` prints ``listening PORT`` once ready.
Endpoints (all GET unless said): /hello, /headers (JSON of the received head),
/echo (any method: the body back, with the request's framing), /count (any
method: bytes and sha256 of the body, streamed), /bytes?n=N (N bytes),
/chunked?n=N&size=S, /status?code=C, /slow?delay=S, /close (then closes),
/http10 (HTTP/1.0 reply delimited by close), /reset (resets the connection),
/garbage (not HTTP), /conn (the peer port: shows reuse), /ws (101, then echoes raw bytes), /continue (answers
Expect: 100-continue, then the byte count), /pid.
"""

import argparse
import asyncio
import hashlib
import json
import os
import signal
import socket
import struct
import sys
from urllib.parse import parse_qs, urlsplit

import h11

CHUNK = 64 * 1024


class Handler:
    def __init__(self, reader, writer, name):
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        self.name = name

    async def send(self, event):
        data = self.conn.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def next_event(self):
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(CHUNK)
                self.conn.receive_data(data)
                continue
            return event

    async def body(self):
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise RuntimeError(f"unexpected {event!r}")

    async def respond(self, status, body=b"", headers=()):
        headers = [(b"content-length", str(len(body)).encode()), (b"x-backend", self.name.encode()), *headers]
        await self.send(h11.Response(status_code=status, headers=headers))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())

    async def run(self):
        try:
            while True:
                event = await self.next_event()
                if isinstance(event, h11.ConnectionClosed):
                    return
                if not isinstance(event, h11.Request):
                    return
                if await self.handle(event) == "closed":
                    return
                while self.conn.their_state is h11.SEND_BODY:  # a body the handler did not read
                    if isinstance(await self.next_event(), h11.ConnectionClosed):
                        return
                if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is h11.MUST_CLOSE:
                    return
                self.conn.start_next_cycle()
        except (h11.ProtocolError, ConnectionError):
            return
        finally:
            self.writer.close()

    async def handle(self, req):
        url = urlsplit(req.target.decode())
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        if path == "/hello":
            await self.respond(200, b"hello")
        elif path == "/pid":
            await self.respond(200, str(os.getpid()).encode())
        elif path == "/conn":  # which upstream connection served this: shows pooling
            await self.respond(200, str(self.writer.get_extra_info("peername")[1]).encode())
        elif path == "/headers":
            body = json.dumps(
                {"method": req.method.decode(), "target": req.target.decode(), "version": req.http_version.decode(),
                 "headers": [[n.decode(), v.decode("latin-1")] for n, v in req.headers.raw_items()]}
            ).encode()
            async for _ in self.body():
                pass
            await self.respond(200, body, [(b"content-type", b"application/json")])
        elif path == "/echo":
            chunks = [c async for c in self.body()]
            await self.respond(200, b"".join(chunks))
        elif path in ("/count", "/continue"):
            digest = hashlib.sha256()
            n = 0
            if path == "/continue":
                await self.send(h11.InformationalResponse(status_code=100, headers=[]))
            async for chunk in self.body():
                digest.update(chunk)
                n += len(chunk)
            await self.respond(200, f"{n} {digest.hexdigest()}".encode())
        elif path == "/bytes":
            n = int(q.get("n", "0"))
            await self.send(h11.Response(status_code=200, headers=[(b"content-length", str(n).encode())]))
            block = b"x" * CHUNK
            while n > 0:
                await self.send(h11.Data(data=block[: min(n, CHUNK)]))
                n -= CHUNK
            await self.send(h11.EndOfMessage())
        elif path == "/chunked":
            n, size = int(q.get("n", "3")), int(q.get("size", "5"))
            await self.send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")]))
            for i in range(n):
                await self.send(h11.Data(data=bytes([97 + i % 26]) * size))
            await self.send(h11.EndOfMessage(headers=[(b"x-trailer", b"done")]))
        elif path == "/status":
            code = int(q.get("code", "200"))
            await self.send(h11.Response(status_code=code, headers=[] if code in (204, 304) else [(b"content-length", b"0")]))
            await self.send(h11.EndOfMessage())
        elif path == "/slow":
            await asyncio.sleep(float(q.get("delay", "1")))
            await self.respond(200, b"slow")
        elif path == "/close":
            await self.respond(200, b"bye", [(b"connection", b"close")])
            return "closed"
        elif path == "/http10":
            self.writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close")
            await self.writer.drain()
            return "closed"
        elif path == "/reset":
            sock = self.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.writer.transport.abort()
            return "closed"
        elif path == "/garbage":
            self.writer.write(b"this is not http\r\n\r\n")
            await self.writer.drain()
            return "closed"
        elif path == "/ws":
            self.writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            )
            rest = self.conn.trailing_data[0]
            if rest:
                self.writer.write(rest)
            while True:
                data = await self.reader.read(CHUNK)
                if not data:
                    return "closed"
                self.writer.write(data)
                await self.writer.drain()
        else:
            await self.respond(404, b"no such endpoint")


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="backend")
    parser.add_argument("--startup-delay", type=float, default=0.0, help="seconds to wait before listening")
    parser.add_argument("--term-delay", type=float, default=0.0, help="seconds between SIGTERM and exit")
    args = parser.parse_args()
    if args.term_delay:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.call_later(args.term_delay, os._exit, 0))
    if args.startup_delay:
        await asyncio.sleep(args.startup_delay)

    async def on_client(reader, writer):
        await Handler(reader, writer, args.name).run()

    server = await asyncio.start_server(on_client, args.host, args.port, limit=CHUNK)
    port = server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
