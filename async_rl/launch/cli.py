"""The `async-rl` command: `launch` a run, show its `status`, print the documented `config`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from dataclasses import fields

from async_rl import config as config_mod
from async_rl import protocol
from async_rl.metrics import read_metrics
from async_rl.run_dir import pid_alive, read_manifest


def cmd_launch(args) -> int:
    from async_rl.launch.launcher import launch
    try:
        cfg = config_mod.load(args.config, args.overrides)
    except (config_mod.ConfigError, ValueError) as exc:
        print(f"async-rl: config error: {exc}", file=sys.stderr)
        return 2
    from async_rl.launch.launcher import local_problem
    if args.cluster != "ray" and local_problem(cfg):
        print(f"async-rl: {local_problem(cfg)}", file=sys.stderr)
        return 2
    if args.dry_run:  # validated above; print what launch would do, start and write nothing
        from async_rl.launch.plan import plan
        print(f"{args.config or '(no YAML)'}: the config is valid; --dry-run starts nothing\n{plan(cfg)}")
        if args.cluster == "ray":
            print("--cluster ray: Ray places the processes instead (one bundle per learner node: "
                  "train.actor_num_gpus_per_node GPUs, one Ray actor per rank; one per engine: its "
                  "rollout_num_gpus_per_engine)")
        return 0
    run_dir = args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    launcher = None
    if args.address and args.cluster != "ray":
        print(f"async-rl: --address {args.address}: only for --cluster ray (the head of a Ray cluster)", file=sys.stderr)
        return 2
    if args.cluster == "ray":
        try:
            import ray  # noqa: F401
            from async_rl.launch.ray_launcher import RayLauncher
            from async_rl.launch.ray_remote import RemoteRayLauncher
        except ImportError as exc:
            print(f"async-rl: --cluster ray needs Ray ({exc}): pip install -e '.[ray]' (scripts/setup.sh does)",
                  file=sys.stderr)
            return 2
        kind = RayLauncher if cfg.cluster.shared_run_dir else RemoteRayLauncher
        launcher = kind(cfg, run_dir, resume=args.resume, address=args.address)
    out = None
    if not sys.stdout.isatty():  # the supervisor must never block on a pipe nobody reads (async_rl/launch/outstream.py)
        from async_rl.launch.outstream import Unblocked
        out = sys.stdout = Unblocked(sys.stdout)
    try:
        return launch(cfg, run_dir, resume=args.resume, launcher=launcher)
    except config_mod.ConfigError as exc:
        print(f"async-rl: config error: {exc}", file=sys.stderr)
        return 2
    finally:
        if out is not None:
            out.drain(timeout=10)
            sys.stdout = out.stream


def status_dict(run_dir: str) -> dict:
    manifest = read_manifest(run_dir)
    rows = read_metrics(run_dir)
    out = {"run_dir": manifest["run_dir"], "status": manifest["status"], "exit_code": manifest.get("exit_code"),
           "launcher_alive": pid_alive(manifest.get("launcher_pid")),
           "processes": {n: {**p, "alive": pid_alive(p["pid"]) and p.get("returncode") is None}
                         for n, p in manifest.get("processes", {}).items()},
           "last_step": rows[-1] if rows else None, "hub": None,
           "attached": [p.stem for p in (Path(run_dir) / "attached").glob("*.json")],
           "errors": _log_errors(run_dir)}
    hub = manifest.get("endpoints", {}).get("hub")
    if hub and out["launcher_alive"]:
        from async_rl.hub_client import HubClient
        client = HubClient(hub, identity="status", keys_dir=manifest.get("keys"))
        try:
            out["hub"] = client.stats(timeout=2.0)
        except Exception as exc:  # the hub may be gone already
            out["hub"] = {"error": str(exc)}
        finally:
            client.close()
    return out


def _log_errors(run_dir: str) -> dict:
    """The last traceback or error line of each process log that has one."""
    out = {}
    for log in sorted((Path(run_dir) / "logs").glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-200:]
        hits = [i for i, line in enumerate(lines) if "Traceback" in line or "Error" in line]
        if hits:
            out[log.stem] = "\n".join(lines[hits[-1]:hits[-1] + 12])
    return out


def cmd_status(args) -> int:
    try:
        st = status_dict(args.run_dir)
    except FileNotFoundError as exc:
        print(f"async-rl: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    from async_rl.launch.progress import describe
    print(f"run {st['run_dir']}: {st['status']}" + (f" (exit code {st['exit_code']})" if st["exit_code"] is not None else ""))
    if st["last_step"]:
        print(f"  step {st['last_step']['step'] + 1}: {describe(st['last_step'])}")
    for name, p in st["processes"].items():
        print(f"  {name:<12} pid {p['pid']:<8} {'alive' if p['alive'] else 'exited'}  log {p['log']}")
    hub = st["hub"] or {}
    if "error" in hub:
        print(f"  hub: unreachable ({hub['error']})")
    elif hub:
        print(f"  hub: version {hub['version']}, buffer {hub['size']} groups (+{hub['in_flight']} in flight), "
              f"staleness histogram {hub['staleness_hist']}, max_staleness {hub['max_staleness']}, "
              f"credits {hub['credits_available']}")
        print(f"       accepted {hub['accepted']} = consumed {hub['consumed']} + evicted stale {hub['evicted_stale']}"
              f" + evicted capacity {hub['evicted_capacity']} + buffer + in flight; malformed {hub['malformed']}")
        for gid, g in hub.get("generators", {}).items():
            print(f"       generator {gid:<22} {'alive' if g['alive'] else 'silent'}  groups {g['groups']}"
                  f"  running {g['running']}  tokens {g['gen_tokens']:.0f}")
    for name, text in st["errors"].items():
        print(f"  last error in {name}.log: {text.splitlines()[0][:160]}")
    return 0


def cmd_stop(args) -> int:
    import os
    import signal
    try:
        manifest = read_manifest(args.run_dir)
    except FileNotFoundError as exc:
        print(f"async-rl: {exc}", file=sys.stderr)
        return 2
    pid = manifest.get("launcher_pid")
    if not pid_alive(pid):
        print(f"async-rl: run {args.run_dir} is not running (status {manifest['status']})", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGUSR1)
    deadline = time.time() + args.timeout
    while pid_alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    status = read_manifest(args.run_dir)["status"]
    print(f"run {args.run_dir}: {status}")
    return 0 if status == "stopped" else 1


def cmd_set(args) -> int:
    from pathlib import Path

    from async_rl import knobs
    from async_rl.hub_client import HubClient, HubError
    try:
        manifest = read_manifest(args.run_dir)
        cfg = config_mod.load(Path(args.run_dir) / "config.yaml")
        new, hub, learner, generator = knobs.plan(cfg, args.overrides)
    except (FileNotFoundError, config_mod.ConfigError, ValueError) as exc:
        print(f"async-rl: {exc}", file=sys.stderr)
        return 2
    if not pid_alive(manifest.get("launcher_pid")):
        print(f"async-rl: run {args.run_dir} is not running (status {manifest['status']}); nothing to set",
              file=sys.stderr)
        return 1
    client = HubClient(manifest["endpoints"]["hub"], identity="set", keys_dir=manifest.get("keys"))
    try:
        reply = client.request(protocol.Set(knobs=hub, learner=learner, generator=generator), timeout=10)
    except (HubError, TimeoutError) as exc:
        print(f"async-rl: the hub refused or did not answer: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    config_mod.save(new, Path(args.run_dir) / "config.yaml")
    with open(Path(args.run_dir) / "config_history.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), "event": "set", "knob_version": reply["knob_version"],
                            "changes": {**{f"buffer.{k}": v for k, v in hub.items()}, **learner, **generator}}) + "\n")
    print(f"set (knob version {reply['knob_version']}): hub {hub or '-'}, learner {learner or '-'}, "
          f"generators {generator or '-'}")
    return 0


def cmd_config(args) -> int:
    if args.doc:
        for sec in fields(config_mod.Config):
            section = sec.default_factory()
            print(f"\n## {sec.name}\n{type(section).__doc__}\n")
            for f in fields(section):
                print(f"- `{sec.name}.{f.name}` (default `{getattr(section, f.name)!r}`): {f.metadata.get('doc', '')}")
        from async_rl.slime_flags import doc
        print(f"\n{doc()}")
        return 0
    try:
        cfg = config_mod.load(args.config, args.overrides)
    except (config_mod.ConfigError, ValueError) as exc:
        print(f"async-rl: config error: {exc}", file=sys.stderr)
        return 2
    import yaml
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def cmd_attach(args) -> int:
    if bool(args.hub) == bool(args.run_dir):
        print("async-rl: attach needs --run-dir DIR (this host sees the run dir) or --hub tcp://HOST:PORT --key FILE "
              "(it does not), not both", file=sys.stderr)
        return 2
    if args.hub and args.address:
        from async_rl.launch.attach_ray import attach_remote_ray
        return attach_remote_ray(args.hub, args.key, args.engines, args.address, args.node_resource)
    if args.hub:
        from async_rl.launch.attach_remote import attach_remote
        return attach_remote(args.hub, args.key, args.engines, args.work_dir, args.host)
    if args.node_resource and not args.address:
        print(f"async-rl: --node-resource {args.node_resource}: only with --address HEAD:PORT (a Ray cluster's head)",
              file=sys.stderr)
        return 2
    from async_rl.launch.attach import attach
    return attach(args.run_dir, args.engines, args.address, args.node_resource)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="async-rl", description="fully asynchronous RL post-training")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("launch", help="run a job: async-rl launch [CONFIG] [key=value | --slime-flag value ...] --run-dir DIR")
    p.add_argument("config", nargs="?", help="YAML config (optional: defaults plus the overrides)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. rollout.n_samples_per_prompt=8 or max_staleness=0; "
                                                "slime's dashed flags too: --rollout-batch-size 8 --use-tis")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/TIMESTAMP)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its learner checkpoint and hub state")
    p.add_argument("--cluster", choices=("local", "ray"), default="local",
                   help="local processes (default) or Ray actors placed by the cluster.* options")
    p.add_argument("--address", default=None,
                   help="--cluster ray: the Ray head (HOST:PORT or auto); default start a local Ray for the run")
    p.add_argument("--dry-run", action="store_true", help="validate, print the placement, batch arithmetic and a "
                                                          "memory estimate per GPU; start nothing")
    p.set_defaults(fn=cmd_launch)
    p = sub.add_parser("stop", help="drain, checkpoint and end a running job (exit 0); resume it with launch --resume")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the run to end")
    p.set_defaults(fn=cmd_stop)
    p = sub.add_parser("status", help="where a run stands")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("set", help="change live knobs of a running job: async-rl set --run-dir DIR max_staleness=4 tis_clip=1.5")
    p.add_argument("--run-dir", required=True)
    p.add_argument("overrides", nargs="+", help="key=value words (see async_rl/knobs.py for the live ones)")
    p.set_defaults(fn=cmd_set)
    p = sub.add_parser("attach", help="add engines + generators to a running job, on this machine or (--address) "
                                      "on nodes of a Ray cluster")
    p.add_argument("--run-dir", default=None, help="the run's directory, where this host can see it")
    p.add_argument("--hub", default=None, help="tcp://HOST:PORT of the hub (run.json endpoints.hub), for a host "
                                              "without the run dir: weights are pulled over the network")
    p.add_argument("--key", default=None, help="with --hub: the run's keys/attach.key, copied to this host")
    p.add_argument("--work-dir", default=None, help="with --hub: this host's working dir (default ./attach-PID)")
    p.add_argument("--host", default="127.0.0.1", help="with --hub: address this host's engines bind to")
    p.add_argument("--engines", type=int, default=1, help="engines to start (one generator each)")
    p.add_argument("--address", help="HEAD:PORT of a Ray cluster: start them there as Ray actors")
    p.add_argument("--node-resource", help="with --address: only on nodes advertising this custom Ray resource, "
                                           "e.g. generator for `ray start --resources='{\"generator\": 1}'`")
    p.set_defaults(fn=cmd_attach)
    p = sub.add_parser("detach", help="drain and remove the generators `attach` added")
    p.add_argument("--run-dir", required=True)
    p.set_defaults(fn=lambda a: __import__("async_rl.launch.attach", fromlist=["detach"]).detach(a.run_dir))
    p = sub.add_parser("config", help="print a resolved config, or every knob with --doc")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--doc", action="store_true")
    p.set_defaults(fn=cmd_config)
    return ap


def _slime_words(ap: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`launch` / `config` take slime's dashed flags (async_rl/slime_flags.py) as key=value words; with no YAML
    (slime's run scripts have none) a first word that is no file is an override, not the config."""
    from async_rl.slime_flags import to_words
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
    own = {o: a.nargs != 0 for a in sub._actions for o in a.option_strings}
    return [argv[0], *to_words(argv[1:], own)]


def _is_file(word: str) -> bool:
    """A path that exists; False also for a word no file can be named (a key=value longer than NAME_MAX)."""
    try:
        return Path(word).is_file()
    except OSError:
        return False


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line, slime's dashed flags included; raises ConfigError for a flag that cannot be taken."""
    ap = build_parser()
    if argv and argv[0] in ("launch", "config"):
        argv = _slime_words(ap, argv)
    args = ap.parse_args(argv)
    if getattr(args, "config", None):  # the YAML is the positional word that is no key=value, wherever it is
        words = [args.config, *args.overrides]
        files = [w for w in words if "=" not in w or _is_file(w)]
        args.config = files[0] if files else None
        args.overrides = [w for w in words if w is not args.config]
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(list(sys.argv[1:] if argv is None else argv))
    except config_mod.ConfigError as exc:
        print(f"async-rl: config error: {exc}", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except BrokenPipeError:  # `async-rl config --doc | head`: the reader has what it wanted
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0


if __name__ == "__main__":
    sys.exit(main())
