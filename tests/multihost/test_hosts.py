"""The simulated-hosts fixture itself: hosts reach each other by address and only so, a hidden directory is
invisible on the host that hides it, a link set down is a partition that heals, and teardown leaves no
namespace or process behind."""
from __future__ import annotations

import sys

from tests.multihost.hosts import existing_namespaces, wait_for

SERVER = ("import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
          "s.bind((sys.argv[1], 7001)); s.listen(8)\n"
          "while True:\n c,_=s.accept(); c.sendall(b'hello from head'); c.close()")
CLIENT = ("import socket,sys\ntry:\n s=socket.create_connection((sys.argv[1], 7001), timeout=float(sys.argv[2]));"
          " print(s.recv(100).decode())\nexcept OSError as e: print('unreachable', type(e).__name__)")


def _connect(host, addr: str, timeout: float = 3.0) -> str:
    return host.run([sys.executable, "-c", CLIENT, addr, str(timeout)], timeout=30).stdout.strip()


def test_hosts_talk_by_address_see_only_their_files_and_heal_after_a_partition(network, tmp_path):
    secret = tmp_path / "headonly"
    secret.mkdir()
    (secret / "run.json").write_text("{}")
    net = network({"head": [], "gen1": [secret]})
    head, gen1 = net["head"], net["gen1"]
    server = head.python(["-c", SERVER, head.addr], "server.log")
    wait_for("server up", lambda: _connect(head, head.addr) == "hello from head", 20, [server],
             [("server", head.log("server.log"))])
    assert _connect(gen1, head.addr) == "hello from head"
    # the hosts do not share loopback: gen1's 127.0.0.1 has no server
    assert _connect(gen1, "127.0.0.1").startswith("unreachable")
    # gen1 has its own view of the filesystem: the head's directory is empty there, not on the head
    assert gen1.run(["ls", "-A", str(secret)]).stdout.strip() == ""
    assert head.run(["ls", "-A", str(secret)]).stdout.strip() == "run.json"
    gen1.link(False)
    assert _connect(gen1, head.addr, timeout=1.0).startswith("unreachable")
    gen1.link(True)
    wait_for("link healed", lambda: _connect(gen1, head.addr) == "hello from head", 20)


def test_teardown_kills_every_process_and_deletes_the_namespaces(network, tmp_path):
    net = network({"head": [], "gen1": []})
    sleeper = net["gen1"].start(["sleep", "600"], "sleep.log")
    names = set(net.namespaces())
    assert names <= existing_namespaces()
    net.close()
    assert sleeper.poll() is not None
    assert not names & existing_namespaces()
