"""CURVE keys of a run (ZeroMQ's `zmq.auth`): generated once into `run_dir/keys/`.

- `server.key_secret` / `server.key`: the hub's keypair; clients need only the public `server.key`.
- `client.key_secret`: the keypair every legitimate client (generators, learner, CLI) presents;
  `authorized/client.key` holds its public half, the only key the hub accepts.
A node without a shared filesystem gets `server.key` and `client.key_secret` copied to it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import zmq
import zmq.auth


def create_keys(keys_dir: str | Path) -> Path:
    keys = Path(keys_dir)
    if (keys / "server.key_secret").exists() and (keys / "client.key_secret").exists():
        return keys
    (keys / "authorized").mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(str(keys), "server")
    zmq.auth.create_certificates(str(keys), "client")
    shutil.move(str(keys / "client.key"), str(keys / "authorized" / "client.key"))
    return keys


def secure_server(ctx: zmq.Context, sock: zmq.Socket, keys_dir: str | Path):
    """Turn `sock` into a CURVE server accepting only authorized client keys; returns the authenticator."""
    from zmq.auth.thread import ThreadAuthenticator

    keys = Path(keys_dir)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys / "authorized"))
    public, secret = zmq.auth.load_certificate(str(keys / "server.key_secret"))
    sock.curve_publickey, sock.curve_secretkey, sock.curve_server = public, secret, True
    return auth


def secure_client(sock: zmq.Socket, keys_dir: str | Path) -> None:
    keys = Path(keys_dir)
    public, secret = zmq.auth.load_certificate(str(keys / "client.key_secret"))
    server_public = (zmq.auth.load_certificate(str(keys / "server.key"))[0] if (keys / "server.key").exists()
                     else zmq.auth.load_certificate(str(keys / "server.key_secret"))[0])
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server_public
