"""Throwaway TLS contexts from a trustme CA: a server context for peers, a client context for the relay."""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass

import trustme

__all__ = ["TLSPair", "tls_pair"]


@dataclass
class TLSPair:
    ca: trustme.CA
    server: ssl.SSLContext  # give to Sink(tls_context=...)
    client: ssl.SSLContext  # trusts the CA; checks the host name
    ca_pem: bytes  # for a relay configured by file: write it out

    def untrusting_client(self) -> ssl.SSLContext:
        """A client context that verifies against the system store, so our CA is not trusted."""
        return ssl.create_default_context()


def tls_pair(
    *hostnames: str,
    expired: bool = False,
) -> TLSPair:
    """A CA, a server context whose cert names ``hostnames`` (default sink.test, localhost and
    127.0.0.1-9), and a client context that trusts the CA. ``expired`` issues a cert that expired
    yesterday (for the "bad certificate" cases)."""
    names = hostnames or ("sink.test", "localhost", *(f"127.0.0.{i}" for i in range(1, 10)), "::1")
    ca = trustme.CA()
    kwargs = {}
    if expired:
        now = datetime.datetime.now(datetime.UTC)
        day = datetime.timedelta(days=1)
        kwargs = {"not_before": now - 30 * day, "not_after": now - day}
    cert = ca.issue_cert(*names, **kwargs)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client)
    return TLSPair(ca=ca, server=server, client=client, ca_pem=ca.cert_pem.bytes())
