"""`async-rl attach --hub tcp://HOST:PORT --key FILE [--engines N]`: join a running job from a host that does
not have its run directory, knowing only the hub's address and the run's attach key (run_dir/keys/attach.key,
copied by the operator).

It asks the hub for the run (INFO: the resolved config and the weight server's address), pulls the current
version's weights over the network (async_rl/weight_pull.py) into a local working dir, starts N engines on
this host (loopback unless --host says otherwise; their ports chosen here) and one generator each. The
generators stream groups like any others and pull each later version as the learner publishes it. Exit and
detach are as for `attach --run-dir` (SIGTERM drains: each generator delivers the engine call in hand).

Invariants: nothing here reads a path of the head's filesystem; everything this host writes is under
`--work-dir` (config.yaml, weights/, logs/, attach.json).
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from async_rl import config as config_mod
from async_rl import protocol
from async_rl.endpoints import is_loopback
from async_rl.hub_client import HubClient, HubError, HubTimeout
from async_rl.launch.launcher import LaunchError, Launcher
from async_rl.launch.procs import ProcessGroup


class AttachError(RuntimeError):
    pass


def ask_run(hub: str, key: str | None, timeout: float) -> dict:
    client = HubClient(hub, identity=f"attach-{os.getpid()}", keys_dir=key, resend_after=min(5.0, timeout))
    try:
        return client.request(protocol.Info(), timeout=timeout)
    except HubTimeout:
        raise AttachError(f"--hub {hub}: no answer in {timeout:.0f}s; check the address is the one run.json records "
                          f"(endpoints.hub), that this host can reach it, and that --key is the run's keys/attach.key") from None
    except HubError as exc:
        raise AttachError(f"--hub {hub}: the hub refused INFO ({exc}); is it an async-rl hub of this version?") from None
    finally:
        client.close()


def prepare(info: dict, hub: str, key: str | None, work: Path, engines: int, host: str) -> tuple[Launcher, float]:
    """This host's copy of the run: config, the current weights (pulled), a Launcher for its processes."""
    from async_rl.weight_pull import WeightPuller, WeightPullError
    weights = info.get("endpoints", {}).get("weights")
    if not weights:
        raise AttachError(f"--hub {hub}: the run serves no weights over the network (cluster.serve_weights=off, or "
                          f"cluster.host is loopback); relaunch it with cluster.host=ADDRESS (or serve_weights=on)")
    cfg = config_mod.from_dict(info["config"])
    puller = WeightPuller(weights, work / "weights", key if cfg.cluster.weights_auth else None,
                          keep=cfg.ckpt.keep_weight_versions)
    t0 = time.monotonic()
    try:
        pulled = puller.pull(int(info["version"]))
    except WeightPullError:  # pruned since the hub answered: take the newest
        pulled = puller.pull(puller.latest())
    pull_s = time.monotonic() - t0
    base = work / "base"  # hard links: the engines' start-up weights and the tokenizer outlive pruning
    if not base.exists():
        tmp = work / f".base.{os.getpid()}"
        for f in (p for p in pulled.rglob("*") if p.is_file()):
            (tmp / f.relative_to(pulled)).parent.mkdir(parents=True, exist_ok=True)
            os.link(f, tmp / f.relative_to(pulled))
        os.replace(tmp, base)
    cfg.ckpt.hf_checkpoint = str(base)
    cfg.cluster.host, cfg.cluster.advertise_host = host, ""
    cfg.cluster.num_engines = cfg.cluster.num_generators = engines
    cfg.cluster.engine_cpus = []  # the head's core numbers mean nothing here
    cfg.rollout.rollout_external_engine_addrs = []
    cfg_path = work / "config.yaml"
    config_mod.save(cfg, cfg_path)
    launcher = Launcher(cfg, work)
    launcher.cfg_path, launcher.hub_endpoint, launcher.keys_dir = cfg_path, hub, key
    launcher.generator_args = ["--weights-from", weights, "--weights-dir", str(work / "weights")]
    return launcher, pull_s


def _first_group(hub: str, key: str | None, prefix: str, t0: float, timeout: float = 2.0) -> float | None:
    """Seconds from t0 to now, if the hub has acked a group of a generator named `prefix`...; else None."""
    client = HubClient(hub, identity=f"attach-{os.getpid()}-stats", keys_dir=key)
    try:
        gens = client.stats(timeout=timeout).get("generators", {})
    except (HubTimeout, HubError):
        return None
    finally:
        client.close()
    return time.monotonic() - t0 if any(g.startswith(prefix) and v["groups"] > 0 for g, v in gens.items()) else None


def attach_remote(hub: str, key: str | None, engines: int, work_dir: str | None = None,
                  host: str = "127.0.0.1", timeout: float = 120.0) -> int:
    t0 = time.monotonic()
    if engines < 1:
        print(f"async-rl: --engines {engines}: must be >= 1 (engines to start, one generator each)")
        return 2
    if key and not Path(key).exists():
        print(f"async-rl: --key {key}: no such file; copy run_dir/keys/attach.key from the head")
        return 2
    work = Path(work_dir or f"attach-{os.getpid()}").resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    from async_rl.launch.attach_ray import KEY_ENV
    if key is None and os.environ.get(KEY_ENV):  # started by attach_ray on a node where the key file is not
        key = str(work / "attach.key")
        Path(key).write_text(os.environ[KEY_ENV])
        Path(key).chmod(0o600)
    stopping: list[int] = []
    previous = {s: signal.signal(s, lambda *_: stopping.append(1)) for s in (signal.SIGTERM, signal.SIGINT)}
    launcher = None
    try:
        info = ask_run(hub, key, timeout)
        if not is_loopback(host):  # engines other hosts can reach require a key, as the head's do
            from async_rl.keys import ENGINE_KEY_ENV, engine_api_key
            os.environ[ENGINE_KEY_ENV] = engine_api_key(work / "keys")
        launcher, pull_s = prepare(info, hub, key, work, engines, host)
        launcher.procs = ProcessGroup(work / "logs")
        launcher.start_engines()
        prefix = f"a{os.getpid()}-g"
        launcher.start_generators(id_prefix=prefix)
        record = {"pid": os.getpid(), "hub": hub, "engines": launcher.engine_urls, "pull_s": round(pull_s, 3),
                  "version": int(info["version"]), "processes": {n: c.proc.pid for n, c in launcher.procs.children.items()}}
        (work / "attach.json").write_text(json.dumps(record, indent=1))
        print(f"attached {engines} engine(s) + generator(s) to {hub}: v{info['version']} pulled in {pull_s:.2f}s; "
              f"engines {launcher.engine_urls}", flush=True)
        _watch(launcher, hub, key, prefix, t0, stopping, work, record)
        return 0
    except (AttachError, LaunchError, config_mod.ConfigError, OSError, TimeoutError) as exc:
        print(f"async-rl: attach failed: {exc}", flush=True)
        return 1
    finally:
        if launcher is not None and launcher.procs is not None:
            for name in [n for n in launcher.procs.children if n.startswith("generator")]:
                launcher.procs.stop(name)
            launcher.procs.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _watch(launcher: Launcher, hub: str, key: str | None, prefix: str, t0: float, stopping: list, work: Path,
           record: dict) -> None:
    """Until asked to stop or the generators end (the hub said the run is done); notes the first acked group."""
    gens = [c for n, c in launcher.procs.children.items() if n.startswith("generator")]
    first, next_check = None, 0.0
    while not stopping and any(c.proc.poll() is None for c in gens):
        if first is None and time.monotonic() >= next_check:
            next_check = time.monotonic() + 0.5
            first = _first_group(hub, key, prefix, t0)
            if first is not None:
                record["first_group_s"] = round(first, 3)
                (work / "attach.json").write_text(json.dumps(record, indent=1))
                print(f"attach: first group acked {first:.2f}s after attach started", flush=True)
        time.sleep(0.2)
