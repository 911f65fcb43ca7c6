import socket

from datasel_ray.ports import LOWEST_PORT, ephemeral_port_range, pick_unbound_ports


def test_ports_are_distinct_bindable_and_outside_the_ephemeral_range():
    low, high = ephemeral_port_range()
    ports = pick_unbound_ports(9)
    assert len(set(ports)) == 9
    for port in ports:
        assert port >= LOWEST_PORT and not low <= port <= high
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_taken_port_is_never_returned(monkeypatch):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        taken = holder.getsockname()[1]
        monkeypatch.setattr("datasel_ray.ports.LOWEST_PORT", taken)
        monkeypatch.setattr("datasel_ray.ports.ephemeral_port_range", lambda: (1, 2))
        monkeypatch.setattr("datasel_ray.ports.random.SystemRandom.sample", lambda self, seq, k: list(seq)[:k])
        assert taken not in pick_unbound_ports(3)
