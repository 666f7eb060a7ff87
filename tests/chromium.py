"""Headless Chromium (Debian's chromium) driven over the DevTools protocol, for the tests of the pages
wakegate serves to browsers. Every name resolves to 127.0.0.1 inside the browser: it reaches nothing else."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time

import aiohttp

ARTIFACTS = __import__("pathlib").Path(__file__).resolve().parent.parent / "build" / "test-artifacts"


def available() -> str | None:
    return None if shutil.which("chromium") else "Debian's chromium is not installed (make test installs it)"


class Browser:
    """One headless Chromium and one page; ``async with Browser() as b: await b.goto(url)``."""

    def __init__(self) -> None:
        self.profile = tempfile.TemporaryDirectory(prefix="wakegate-chromium-")
        self.proc: subprocess.Popen | None = None
        self.ws = None
        self.http: aiohttp.ClientSession | None = None
        self.session_id = None
        self._ids = itertools.count(1)

    async def __aenter__(self) -> "Browser":
        self.proc = subprocess.Popen(
            ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-dev-shm-usage", "--remote-debugging-port=0", f"--user-data-dir={self.profile.name}",
             "--host-resolver-rules=MAP * 127.0.0.1", "--window-size=1000,700", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = await asyncio.get_running_loop().run_in_executor(None, self._devtools_url)
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(url, max_msg_size=64 * 1024 * 1024)
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        self.session_id = attached["sessionId"]
        await self.call("Page.enable")
        return self

    def _devtools_url(self) -> str:
        deadline = time.monotonic() + 30
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:  # keep reading what it says, so a full pipe never stalls it
                threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
                return m.group(1)
            if time.monotonic() > deadline:
                break
        raise RuntimeError("chromium did not start its DevTools endpoint")

    async def call(self, method: str, **params):
        ident = next(self._ids)
        message = {"id": ident, "method": method, "params": params}
        if self.session_id is not None and not method.startswith("Target."):
            message["sessionId"] = self.session_id
        await self.ws.send_str(json.dumps(message))
        while True:
            reply = json.loads((await self.ws.receive()).data)
            if reply.get("id") == ident:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0):
        """Poll until the expression is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = await self.evaluate(expression)
            except RuntimeError:  # between documents
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"never true in the browser: {expression}")
            await asyncio.sleep(0.05)

    async def screenshot(self, name: str) -> bytes:
        """A PNG of the page, also kept in build/test-artifacts/NAME.png."""
        png = base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"])
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / f"{name}.png").write_bytes(png)
        return png

    async def __aexit__(self, *exc) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.http is not None:
            await self.http.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc.stderr.close()
        self.profile.cleanup()
