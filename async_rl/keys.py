"""CURVE keys of a run (ZeroMQ's `zmq.auth`): generated once into `run_dir/keys/`.

- `server.key_secret` / `server.key`: the hub's keypair; clients need only the public `server.key`.
- `client.key_secret`: the keypair every legitimate client (generators, learner, CLI) presents;
  `authorized/client.key` holds its public half, the only key the hub accepts.
- `attach.key`: one file holding what a generator host needs (the client keypair and the hub's public key);
  the operator copies it to a host without the run dir: `async-rl attach --hub tcp://HOST:PORT --key FILE`.
  Every client function here takes either the keys dir or that file.
- `engine_api.key`: the API key engines bound beyond loopback require (SGLang's `--api-key`; clients send it
  as `Authorization: Bearer KEY`, read from the ASYNC_RL_ENGINE_API_KEY environment variable, which the
  launcher and attach set for the processes they start).
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

ENGINE_KEY_ENV = "ASYNC_RL_ENGINE_API_KEY"

import zmq
import zmq.auth


def create_keys(keys_dir: str | Path) -> Path:
    keys = Path(keys_dir)
    if (keys / "server.key_secret").exists() and (keys / "client.key_secret").exists():
        if not (keys / "attach.key").exists():  # keys made before attach.key existed
            _write_attach_key(keys)
        return keys
    (keys / "authorized").mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(str(keys), "server")
    zmq.auth.create_certificates(str(keys), "client")
    shutil.move(str(keys / "client.key"), str(keys / "authorized" / "client.key"))
    _write_attach_key(keys)
    return keys


def _write_attach_key(keys: Path) -> None:
    server_public = zmq.auth.load_certificate(str(keys / "server.key"))[0]
    public, secret = zmq.auth.load_certificate(str(keys / "client.key_secret"))
    text = ("# async-rl attach key: copy to a generator host, then async-rl attach --hub tcp://HOST:PORT --key FILE\n"
            f"server_public = {server_public.decode()}\nclient_public = {public.decode()}\n"
            f"client_secret = {secret.decode()}\n")
    path = keys / "attach.key"
    path.write_text(text)
    path.chmod(0o600)


def _client_keys(keys: Path) -> tuple[bytes, bytes, bytes]:
    """(client public, client secret, server public) from a keys dir or an attach.key file."""
    if keys.is_file():
        fields = dict(line.split(" = ", 1) for line in keys.read_text().splitlines()
                      if " = " in line and not line.startswith("#"))
        try:
            return (fields["client_public"].strip().encode(), fields["client_secret"].strip().encode(),
                    fields["server_public"].strip().encode())
        except KeyError as exc:
            raise ValueError(f"--key {keys}: not an async-rl attach key (missing {exc.args[0]}); copy "
                             f"run_dir/keys/attach.key from the head") from None
    public, secret = zmq.auth.load_certificate(str(keys / "client.key_secret"))
    server_public = (zmq.auth.load_certificate(str(keys / "server.key"))[0] if (keys / "server.key").exists()
                     else zmq.auth.load_certificate(str(keys / "server.key_secret"))[0])
    return public, secret, server_public


def engine_api_key(keys_dir: str | Path) -> str:
    """The run's engine API key, generated on first use into keys_dir/engine_api.key."""
    path = Path(keys_dir) / "engine_api.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(secrets.token_urlsafe(32))
        tmp.chmod(0o600)
        os.replace(tmp, path)
    return path.read_text().strip()


def engine_headers() -> dict:
    """HTTP headers for a request to an engine: the API key when this process was given one."""
    key = os.environ.get(ENGINE_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


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
    public, secret, server_public = _client_keys(Path(keys_dir))
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server_public
