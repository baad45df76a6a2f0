"""The hub process: `python -m buffer.service --config C --bind tcp://HOST:PORT --state-dir DIR [--keys DIR]`.

Loop (the message lifecycle, step by step, is in `Hub`'s docstring): receive a message (with `fsync=batch`,
every waiting message: one fsync then covers them all), let the Hub turn each into log records and replies,
make the records durable (group commit), then send the replies. So no acknowledgement ever leaves before what
it acknowledges is in the write-ahead log. A PUT's groups are inserted into the table just after its ACK is sent
(`Hub.settle`), while the client prepares its next request, and always before the next message is handled.
On SIGTERM/SIGINT it snapshots and exits 0.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import zmq

from async_rl import config as config_mod
from async_rl import wire
from async_rl.data import load_prompt_data
from buffer.durable import DurableLog
from buffer.hub import Hub

MAX_DRAIN = 256  # messages handled per group commit (fsync=batch)
PACKED = ("groups",)  # PUT's groups stay in their wire bytes (async_rl.types.PackedGroup)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: pyzmq's enum arithmetic costs per message


def _write_endpoint(path: str, endpoint: str) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(endpoint)
    os.replace(tmp, path)


def _receive(sock: zmq.Socket, hub: Hub, max_bytes: int, flags: int = 0) -> list[tuple[bytes, dict]]:
    """Receive and handle one message; [] also when none came within the socket's RCVTIMEO."""
    try:
        frames = sock.recv_multipart(flags, copy=True)
    except zmq.Again:
        return []
    if len(frames) != 2:
        hub.state.counters["malformed"] += 1
        return []  # not a DEALER request: nothing sane to reply to
    ident, payload = frames
    if len(payload) > max_bytes:
        return [(ident, hub._error(None, f"message of {len(payload)} bytes: over buffer.max_message_bytes={max_bytes}"))]
    try:
        msg = wire.decode(payload, packed=PACKED)
    except wire.WireError as exc:
        return [(ident, hub._error(None, str(exc)))]
    return hub.handle_early(ident, msg)


def _send(sock: zmq.Socket, hub: Hub, replies: list) -> None:
    """Make what the replies acknowledge durable (group commit), then send them."""
    hub.flush()
    for peer, reply in replies:
        try:
            payload = wire.encode(reply)
        except (TypeError, ValueError, OverflowError) as exc:  # e.g. an absurd number echoed back
            payload = wire.encode(hub._error(reply.get("rid"), f"reply could not be encoded ({exc}); check the request"))
        try:
            sock.send_multipart([peer, payload])
        except zmq.ZMQError as exc:  # peer gone; it resends after reconnecting
            print(f"hub: reply to vanished peer dropped ({exc})", flush=True)


def serve(hub: Hub, bind: str, endpoint_file: str | None = None, keys_dir: str | None = None) -> None:
    """Run the ROUTER loop until SIGTERM/SIGINT."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished peer raises instead of vanishing
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 2 * hub.cfg.buffer.max_message_bytes)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)  # ZMTP heartbeats find dead TCP peers
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
    auth = None
    if keys_dir:
        from async_rl.keys import secure_server
        auth = secure_server(ctx, sock, keys_dir)
    sock.bind(bind)
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    if endpoint_file:
        _write_endpoint(endpoint_file, endpoint)
    print(f"hub listening on {endpoint} (auth {'on' if keys_dir else 'off'}; recovered "
          f"{hub.recovered_records} log records; version {hub.state.version})", flush=True)
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(1))
    last_log = last_reclaim = 0.0
    sock.setsockopt(zmq.RCVTIMEO, 200)  # a blocking recv, not poll + recv: fewer syscalls per message
    max_bytes = hub.cfg.buffer.max_message_bytes
    # draining pays off only where one fsync covers many records; elsewhere its check (ZMQ_EVENTS, ~2 us) is
    # pure cost on every message
    drain = MAX_DRAIN - 1 if hub.log is not None and hub.log.fsync == "batch" else 0
    while not stopping:
        replies = _receive(sock, hub, max_bytes)
        for _ in range(drain):
            if not sock.getsockopt(_EVENTS) & _POLLIN:
                break
            replies += _receive(sock, hub, max_bytes, zmq.NOBLOCK)
        now = time.time()
        if now - last_reclaim > 1.0:
            last_reclaim = now
            replies += hub.reclaim_silent_generators(now)
        _send(sock, hub, replies)
        later = hub.settle()  # deferred PUT inserts, while the client prepares its next request
        if later:
            _send(sock, hub, later)
        if now - last_log > 10:
            last_log = now
            print(f"hub stats {hub.stats()}", flush=True)
    _send(sock, hub, hub.settle())
    if hub.log is not None:
        hub.log.snapshot(hub.state.to_snapshot())
        hub.log.close()
    sock.close()
    if auth is not None:
        auth.stop()
    ctx.term()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="async-rl buffer hub")
    ap.add_argument("--config", required=True, help="resolved config.yaml of the run")
    ap.add_argument("--bind", default="tcp://127.0.0.1:*", help="ZeroMQ endpoint to bind (port * or 0 = any)")
    ap.add_argument("--endpoint-file", default=None, help="where to write the bound endpoint")
    ap.add_argument("--state-dir", default=None, help="WAL + snapshots directory (durable hub); none = in memory")
    ap.add_argument("--keys", default=None, help="CURVE keys dir (async_rl.keys); none = no auth")
    ap.add_argument("--advertise", action="append", default=[], metavar="NAME=URL",
                    help="an endpoint of the run the hub hands out with INFO, e.g. weights=tcp://10.0.0.5:5601")
    args = ap.parse_args(argv)
    bad = [a for a in args.advertise if "=" not in a]
    if bad:
        ap.error(f"--advertise {bad[0]!r}: expected NAME=URL, e.g. weights=tcp://10.0.0.5:5601")
    cfg = config_mod.load(args.config)
    prompts = load_prompt_data(cfg.data, cfg.ckpt.hf_checkpoint)
    log = DurableLog(args.state_dir, cfg.buffer.fsync, cfg.buffer.keep_snapshots) if args.state_dir else None
    bind = args.bind[:-2] + ":*" if args.bind.endswith(":0") else args.bind
    hub = Hub(cfg, prompts, log)
    hub.advertised = dict(a.split("=", 1) for a in args.advertise)
    serve(hub, bind, args.endpoint_file, args.keys)
    return 0


if __name__ == "__main__":
    sys.exit(main())
