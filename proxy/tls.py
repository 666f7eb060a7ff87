"""TLS for the proxy's HTTPS listener: a certificate per host name, chosen by SNI, and a default one;
TLS 1.2 and 1.3 only, forward-secret AEAD suites, ALPN ``http/1.1``. Certificates are reloaded in
place (a reload of the config, or their files changing), without touching open connections.
"""

from __future__ import annotations

import logging
import os
import ssl

log = logging.getLogger("wakegate.tls")

# Mozilla's "intermediate" TLS 1.2 suites: ECDHE key exchange (forward secrecy), AES-GCM or ChaCha20-Poly1305.
# TLS 1.3's suites are all AEAD and are not configured by this string.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
RELOAD_CHECK_SECONDS = 5.0  # how often the certificate files are looked at for changes


def make_context(cert: str, key: str) -> ssl.SSLContext:
    """One certificate's server context (raises ssl.SSLError or OSError for a bad file or pair)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(cert, key)
    return ctx


def _stamp(paths) -> tuple:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


class Certificates:
    """The HTTPS listener's certificates: ``context`` is given to the listener once; its SNI callback
    hands each handshake the context of the certificate for the name asked (exact, then the nearest
    wildcard), or the default one."""

    def __init__(self, entries) -> None:
        self.entries = ()
        self.by_host: dict[str, ssl.SSLContext] = {}
        self.default: ssl.SSLContext | None = None
        self._stamp = ()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # the listener's; every handshake switches
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(["http/1.1"])
        self.context.sni_callback = self._sni
        self.update(entries)

    def update(self, entries) -> None:
        """entries: (hosts, cert, key) per certificate; the first without hosts is the default, else the
        first. On a bad file the running certificates stay, and the error is raised."""
        entries = tuple(entries)
        by_host, default = {}, None
        for hosts, cert, key in entries:
            ctx = make_context(cert, key)
            for host in hosts:
                by_host[host.lower()] = ctx
            if not hosts and default is None:
                default = ctx
        if default is None and entries:
            default = make_context(entries[0][1], entries[0][2])
        self.by_host, self.default, self.entries = by_host, default, entries
        self._stamp = _stamp(p for _, cert, key in entries for p in (cert, key))

    def reload_if_changed(self) -> bool:
        if _stamp(p for _, cert, key in self.entries for p in (cert, key)) == self._stamp:
            return False
        try:
            self.update(self.entries)
        except (OSError, ssl.SSLError) as exc:
            log.error("tls: a certificate changed on disk but cannot be loaded (%s); keeping the old ones", exc)
            self._stamp = _stamp(p for _, cert, key in self.entries for p in (cert, key))
            return False
        log.info("tls: certificates reloaded from disk")
        return True

    def for_host(self, name: str | None) -> ssl.SSLContext | None:
        if name:
            name = name.lower().rstrip(".")
            ctx = self.by_host.get(name)
            if ctx is not None:
                return ctx
            parts = name.split(".")
            for i in range(1, len(parts)):
                ctx = self.by_host.get("*." + ".".join(parts[i:]))
                if ctx is not None:
                    return ctx
        return self.default

    def _sni(self, ssl_object, server_name, _context) -> None:
        ctx = self.for_host(server_name)
        if ctx is not None:
            ssl_object.context = ctx
        return None
