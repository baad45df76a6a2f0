"""The `async-rl` command: `launch` a run, show its `status`, print the documented `config`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields

from async_rl import config as config_mod
from async_rl.metrics import read_metrics
from async_rl.run_dir import pid_alive, read_manifest


def cmd_launch(args) -> int:
    from async_rl.launcher import launch
    try:
        cfg = config_mod.load(args.config, args.overrides)
    except (config_mod.ConfigError, ValueError) as exc:
        print(f"async-rl: config error: {exc}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        return launch(cfg, run_dir)
    except config_mod.ConfigError as exc:
        print(f"async-rl: config error: {exc}", file=sys.stderr)
        return 2


def status_dict(run_dir: str) -> dict:
    manifest = read_manifest(run_dir)
    rows = read_metrics(run_dir)
    out = {"run_dir": manifest["run_dir"], "status": manifest["status"], "exit_code": manifest.get("exit_code"),
           "launcher_alive": pid_alive(manifest.get("launcher_pid")),
           "processes": {n: {**p, "alive": pid_alive(p["pid"]) and p.get("returncode") is None}
                         for n, p in manifest.get("processes", {}).items()},
           "last_step": rows[-1] if rows else None, "hub": None}
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


def cmd_status(args) -> int:
    try:
        st = status_dict(args.run_dir)
    except FileNotFoundError as exc:
        print(f"async-rl: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    from async_rl.progress import describe
    print(f"run {st['run_dir']}: {st['status']}" + (f" (exit code {st['exit_code']})" if st["exit_code"] is not None else ""))
    if st["last_step"]:
        print(f"  step {st['last_step']['step'] + 1}: {describe(st['last_step'])}")
    for name, p in st["processes"].items():
        print(f"  {name:<12} pid {p['pid']:<8} {'alive' if p['alive'] else 'exited'}  log {p['log']}")
    if st["hub"]:
        print(f"  hub: {json.dumps(st['hub'], default=str)}")
    return 0


def cmd_config(args) -> int:
    if args.doc:
        for sec in fields(config_mod.Config):
            section = sec.default_factory()
            print(f"\n## {sec.name}\n{type(section).__doc__}\n")
            for f in fields(section):
                print(f"- `{sec.name}.{f.name}` (default `{getattr(section, f.name)!r}`): {f.metadata.get('doc', '')}")
        return 0
    try:
        cfg = config_mod.load(args.config, args.overrides)
    except (config_mod.ConfigError, ValueError) as exc:
        print(f"async-rl: config error: {exc}", file=sys.stderr)
        return 2
    import yaml
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="async-rl", description="fully asynchronous RL post-training")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("launch", help="run a job: async-rl launch CONFIG [key=value ...] --run-dir DIR")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. rollout.n_samples_per_prompt=8 or max_staleness=0")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/TIMESTAMP)")
    p.set_defaults(fn=cmd_launch)
    p = sub.add_parser("status", help="where a run stands")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("config", help="print a resolved config, or every knob with --doc")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--doc", action="store_true")
    p.set_defaults(fn=cmd_config)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
