"""Test peers for fastrelay: SMTP/LMTP sinks, a DNS server, a fault proxy and a raw SMTP client."""

from __future__ import annotations

import socket

from .dns import DNSServer
from .loopthread import InThread, LoopThread
from .proxy import FaultProxy
from .sink import Faults, Message, PhaseFault, SessionInfo, Sink, ThreadedSink, read_ledger
from .smtpclient import MalformedReply, RawClient, ServerClosed
from .tls import TLSPair, tls_pair

__all__ = [
    "DNSServer",
    "FaultProxy",
    "Faults",
    "InThread",
    "LoopThread",
    "MalformedReply",
    "Message",
    "PhaseFault",
    "RawClient",
    "ServerClosed",
    "SessionInfo",
    "Sink",
    "TLSPair",
    "ThreadedSink",
    "free_port",
    "read_ledger",
    "tls_pair",
]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (nothing listens there: connects are
    refused). Prefer port 0 where the API allows it; this is for a port a config file must name
    before the server starts, or for a "connection refused" target."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
