"""Addresses: what each endpoint binds to and what others are told to use.

Every endpoint binds to `cluster.host` (loopback by default: a one-machine run is reachable from nowhere
else) and is advertised, in run.json and by the hub's INFO reply, at `cluster.advertise_host` (default:
cluster.host). A wildcard bind (0.0.0.0) is never advertised: config_rules/cluster.py refuses it without an
advertise_host. A port is always chosen on the host whose process binds it.
"""
from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def advertised_host(cluster) -> str:
    return cluster.advertise_host or cluster.host


def advertise(endpoint: str, host: str) -> str:
    """`endpoint` (tcp://BOUND:PORT or http://BOUND:PORT) with its host replaced by `host`."""
    parts = urlsplit(endpoint)
    return f"{parts.scheme}://{_bracket(host)}:{parts.port}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def serves_weights(cluster) -> bool:
    """cluster.serve_weights: on, off, or auto = only where other hosts can reach the run at all."""
    return cluster.serve_weights == "on" or (cluster.serve_weights == "auto" and not is_loopback(cluster.host))


def free_port(host: str) -> int:
    """A port free on this host now (bind it soon: another process may take it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
