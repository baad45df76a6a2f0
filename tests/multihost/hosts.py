"""Simulated hosts for multi-host tests: one Linux network namespace per host, all joined by a bridge that
lives in a namespace of its own (a "switch"), each host with its own working directory and a private mount
namespace in which the directories it must not see (the head's run dir, the model) are covered by an
empty tmpfs. Processes started on a host are real processes in that namespace.

Invariants:
- Every name is unique to this test process and network (`arl{pid}{n}`), so parallel sessions and parallel
  tests never touch each other's namespaces; traffic flows only between the namespaces made here.
- `Network.close()` (run by the fixture also when the test fails) kills every process started on a host
  (its process group) and everything else still inside the namespaces, then deletes the namespaces; it never
  raises, and leaves no namespace behind.
- A partition is a host's link set down (`Host.link(False)`); `tc netem` is not available here.
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUBNET = "10.77.0"  # per namespace, so every test may use the same addresses
_COUNTER = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def unavailable() -> str | None:
    """Why simulated hosts cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "multi-host tests need root (network namespaces); run them as root, as CI does"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "multi-host tests need `ip` (iproute2) and `unshare` (util-linux)"
    probe = f"arlprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed here ({made.stderr.strip()}); network namespaces are unavailable"
    _ip("netns", "del", probe, check=False)
    return None


class Host:
    def __init__(self, net: "Network", name: str, index: int, workdir: Path, hidden: list[Path]):
        self.net, self.name, self.index = net, name, index
        self.ns = f"{net.tag}-{name}"
        self.addr = f"{SUBNET}.{index + 1}"
        self.workdir = workdir
        self.hidden = [Path(p) for p in hidden]
        self.procs: list[subprocess.Popen] = []

    def _wrap(self, cmd: list[str]) -> list[str]:
        """`cmd` inside this host's network namespace and, when it hides directories, a private mount
        namespace where each hidden directory is an empty tmpfs."""
        wrapped = list(cmd)
        if self.hidden:
            mounts = "; ".join(f"mount -t tmpfs -o size=1m arl-hidden '{p}'" for p in self.hidden)
            wrapped = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       f"set -e; {mounts}; exec \"$@\"", "sh", *wrapped]
        return ["ip", "netns", "exec", self.ns, *wrapped]

    def env(self, extra: dict | None = None) -> dict:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(self.workdir), "TMPDIR": str(self.workdir / "tmp"),
               "PYTHONUNBUFFERED": "1"}
        return {**env, **(extra or {})}

    def start(self, cmd: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        """Start `cmd` on this host (its own process group), stdout+stderr to workdir/logs/`log`."""
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / log, "ab")
        proc = subprocess.Popen(self._wrap(cmd), stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir,
                                env=self.env(env), start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def python(self, args: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        return self.start([sys.executable, *args], log, env)

    def run(self, cmd: list[str], timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run `cmd` on this host to completion; returns it with stdout+stderr as text."""
        return subprocess.run(self._wrap(cmd), capture_output=True, text=True, timeout=timeout, cwd=self.workdir,
                              env=self.env(env))

    def link(self, up: bool) -> None:
        """Connect (True) or cut off (False) this host from every other: its one link set up or down."""
        _ip("-n", self.ns, "link", "set", "eth0", "up" if up else "down")

    def log(self, name: str) -> str:
        path = self.workdir / "logs" / name
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self) -> None:
        """Kill every process on this host: the groups started here, then anything else in the namespace."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        pids = _ip("netns", "pids", self.ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


class Network:
    """Hosts joined by one switch. `Network(tmp_path, {"head": [], "gen1": [hidden dirs]})`."""

    def __init__(self, root: Path, hosts: dict[str, list]):
        self.tag = f"arl{os.getpid()}{next(_COUNTER)}"
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        self._made: list[str] = []
        try:
            self._make_ns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, (name, hidden) in enumerate(hosts.items()):
                workdir = Path(root) / name
                (workdir / "tmp").mkdir(parents=True, exist_ok=True)
                host = Host(self, name, i, workdir, hidden)
                self._make_ns(host.ns)
                port = f"p{i}"
                _ip("link", "add", "eth0", "netns", host.ns, "type", "veth", "peer", "name", port, "netns", self.switch)
                _ip("-n", self.switch, "link", "set", port, "master", "br0")
                _ip("-n", self.switch, "link", "set", port, "up")
                _ip("-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
                _ip("-n", host.ns, "link", "set", "eth0", "up")
                _ip("-n", host.ns, "link", "set", "lo", "up")
                self.hosts[name] = host
        except BaseException:
            self.close()
            raise

    def _make_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def close(self) -> None:
        for host in self.hosts.values():
            try:
                host.kill()
            except Exception as exc:  # noqa: BLE001  (teardown goes on: the namespaces must go)
                print(f"multihost teardown: killing {host.ns}: {exc}", file=sys.stderr)
        for ns in reversed(self._made):
            for _ in range(20):  # a namespace with a process still exiting in it is deleted once it is gone
                if _ip("netns", "del", ns, check=False).returncode == 0:
                    break
                time.sleep(0.1)
        self._made.clear()

    def namespaces(self) -> list[str]:
        return [self.switch, *(h.ns for h in self.hosts.values())]


def existing_namespaces() -> set[str]:
    return {line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()}


def wait_for(what: str, ready, timeout: float, procs: list[subprocess.Popen] = (), logs=()) -> None:
    """Poll `ready()` until true; fail naming `what` (and the tails of `logs`: (name, text or callable)) on timeout
    or a dead process."""
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(f"--- {name}\n{(text() if callable(text) else text)[-3000:]}" for name, text in logs)
            why = f"process exited with {dead[0].returncode}" if dead else f"not within {timeout:.0f}s"
            raise AssertionError(f"{what}: {why}\n{tails}")
        time.sleep(0.2)
