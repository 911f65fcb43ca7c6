"""Free TCP ports that do not race with Ray's own listeners.

Ray workers and agents bind port 0 at any moment, which the kernel serves from its ephemeral range; a port picked
with ``bind(("", 0))`` and released is therefore likely to be taken again before the caller binds it. Ports here
come from outside that range and above Ray's default worker ports (10002-19999).
"""

from __future__ import annotations

import random
import socket

LOWEST_PORT = 20000


def ephemeral_port_range() -> tuple[int, int]:
    """(low, high) of the kernel's ephemeral port range; Linux's default where /proc is unavailable."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            low, high = (int(x) for x in handle.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def pick_unbound_ports(count: int = 1, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that bind on ``host`` now and lie outside the ephemeral range."""
    low, high = ephemeral_port_range()
    candidates = [p for p in range(LOWEST_PORT, 65536) if not low <= p <= high]
    chosen: list[int] = []
    for port in random.SystemRandom().sample(candidates, min(len(candidates), 400)):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    raise RuntimeError(f"found only {len(chosen)} of {count} free TCP ports on {host} outside {low}-{high}")
