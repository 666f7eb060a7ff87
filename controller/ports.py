"""Free TCP ports for what wakegate starts itself (a pod's process or microVM): below the kernel's
ephemeral range, so that no outgoing connection can take one between the pick and the bind."""

from __future__ import annotations

import random
import socket

PORT_RANGE = (20000, 32767)  # below Linux's default ephemeral range (32768-60999)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, from PORT_RANGE capped below this host's ephemeral range."""
    low, high = PORT_RANGE
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        high = min(high, int(f.read().split()[0]) - 1)
    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {low} and {high}")
