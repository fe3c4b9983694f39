"""The supervisor's listener sharing: one SO_REUSEPORT socket per worker on one address, and new
connections spread over them by the kernel (issue 13)."""

from __future__ import annotations

import select
import socket

import pytest

from fastrelay.supervisor import bind_shared


@pytest.mark.parametrize("host", ["127.0.0.1", ""])
def test_one_socket_per_worker_on_the_same_port(host):
    socks = bind_shared(host, 0, 3)
    try:
        ports = {s.getsockname()[1] for s in socks}
        assert len(socks) == 3 and len(ports) == 1 and 0 not in ports
    finally:
        for s in socks:
            s.close()


def test_connections_spread_over_the_workers_sockets():
    """Issue 13: "inbound connections spread over the workers"."""
    socks = bind_shared("127.0.0.1", 0, 2)
    port = socks[0].getsockname()[1]
    accepted = [0, 0]
    clients = []
    try:
        for _ in range(64):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            clients.append(c)
        pending = 64
        while pending:
            ready, _, _ = select.select(socks, [], [], 5)
            assert ready, "a connection was never offered to any socket"
            for s in ready:
                conn, _ = s.accept()
                conn.close()
                accepted[socks.index(s)] += 1
                pending -= 1
        assert all(accepted), accepted
    finally:
        for c in clients:
            c.close()
        for s in socks:
            s.close()


def test_an_address_in_use_is_a_clear_error():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError):
            bind_shared("127.0.0.1", taken.getsockname()[1], 2)
    finally:
        taken.close()
