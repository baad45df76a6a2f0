"""Eval worker: evaluates the run's policy every `eval_interval` versions while it trains, never stopping it.

    python -m actors.eval_worker --config RUN_DIR/config.yaml --run-dir RUN_DIR

Started once by the launcher when eval.eval_interval > 0. It runs its own embedded engine (a child process
that the kernel stops when the worker dies, PR_SET_PDEATHSIG) rather than borrowing a fleet engine: a fleet
engine would have to be paused or pinned at an old version while its generator wants it at the newest, so
evaluation would stall generation; an engine of its own costs one more copy of the model and shares the
CPU with the fleet, but training and generation never wait for it.

Invariants:
- Each version v that is a multiple of eval_interval (and v0, the initial weights) is evaluated at most
  once, in version order, with the weights of exactly v: the learner publishes such a version with a pin
  file (`weights/pins/v{v}`, see learners/weights.py) that keep_weight_versions pruning honours, and this
  worker deletes the pin only after the version's row is written.
- SIGTERM (the launcher stopping the run) drains: versions already published are still evaluated (within
  the launcher's grace period), then the worker exits 0.
- One row per version in `run_dir/eval.jsonl`: `version`, `step` (learner steps trained into it),
  `eval/<name>/pass@k` for k = 1, 2, 4, ... <= n_samples_per_eval_prompt, `eval/<name>/reward` (mean) and
  `eval/<name>/num_prompts` for every eval set. A restarted worker (launch --resume) skips versions that
  already have a row.
"""
from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from actors.engine_client import EngineClient
from actors.evaluate import eval_reward_config, evaluate_sets, load_eval_set
from actors.rewards import RewardScorer
from async_rl import config as config_mod
from async_rl.config_rules.eval import eval_datasets


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def done_versions(path: Path) -> set[int]:
    if not path.exists():
        return set()
    out = set()
    for line in path.read_text().splitlines():
        try:
            out.add(int(json.loads(line)["version"]))
        except (ValueError, KeyError):
            continue  # a line cut short by a kill
    return out


def due_versions(weights: Path, interval: int, done: set[int]) -> list[int]:
    """Versions to evaluate now, oldest first: v0, every pinned version, and any version on disk that is a
    multiple of `interval` (e.g. published before a resume changed eval_interval)."""
    found = {0}
    for p in (weights / "pins").glob("v*"):
        if p.name[1:].isdigit():
            found.add(int(p.name[1:]))
    for p in weights.glob("v*"):
        if p.name[1:].isdigit() and int(p.name[1:]) % interval == 0:
            found.add(int(p.name[1:]))
    return sorted(found - done)


def _die_with_parent() -> None:
    """In the engine child: get SIGTERM when the worker dies, even by SIGKILL (Linux), so none is left behind."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EvalWorker:
    def __init__(self, cfg: config_mod.Config, run_dir: str | Path, device: str = "cpu"):
        from transformers import AutoTokenizer

        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.weights, self.out = self.run_dir / "weights", self.run_dir / "eval.jsonl"
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.ckpt.hf_checkpoint)
        self.scorer = RewardScorer(eval_reward_config(cfg))
        self.sets = {name: load_eval_set(cfg, path) for name, path in eval_datasets(cfg.eval)}
        self.device = device
        self.proc: subprocess.Popen | None = None
        self.engine: EngineClient | None = None
        self.stopping = False

    def start_engine(self) -> None:
        c = self.cfg.cluster
        host = "127.0.0.1"  # only this worker talks to its engine: never reachable from another host
        port = free_port(host)
        cmd = [sys.executable, "-m", "actors.engine.server", "--model-path", self.cfg.ckpt.hf_checkpoint,
               "--host", host, "--port", str(port), "--num-threads", str(c.engine_num_threads),
               "--seed", str(self.cfg.train.seed + 7919), "--device", self.device, "--max-batch-size", "128"]
        log = self.run_dir / "logs" / "eval_engine.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        # its own session, so the launcher's SIGTERM to our group lets us drain with the engine still up
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        self.engine = EngineClient(f"http://{host}:{port}")
        self.engine.wait_ready(c.startup_timeout, proc=self.proc)

    def final_version(self) -> int:
        r = self.cfg.rollout
        return r.num_rollout // r.update_weights_interval

    def evaluate_version(self, version: int) -> dict | None:
        """Load `version` into the engine and evaluate it; None when its weights are gone (never pinned)."""
        if version > 0:
            path = self.weights / f"v{version}"
            ok, message = self.engine.update_weights_from_disk(str(path), version)
            if not ok:
                print(f"eval: v{version} could not be loaded ({message}); skipped", flush=True)
                return None
        t0 = time.perf_counter()
        results = evaluate_sets(self.cfg, self.engine, self.tokenizer, self.sets, self.scorer)
        row = {"version": version, "step": version * self.cfg.rollout.update_weights_interval, "time": time.time(),
               "eval/seconds": time.perf_counter() - t0,
               "eval/n_samples_per_prompt": self.cfg.eval.n_samples_per_eval_prompt}
        for name, metrics in results.items():
            row.update({f"eval/{name}/{k}": v for k, v in metrics.items()})
        return row

    def write(self, row: dict) -> None:
        with open(self.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print("eval: " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in row.items() if k != "time"), flush=True)

    def run(self, poll_s: float = 0.5) -> int:
        """Evaluate due versions until the final one is done, or (after SIGTERM) until none is due; returns
        the number of versions evaluated."""
        interval, last = self.cfg.eval.eval_interval, self.final_version()
        done, count = done_versions(self.out), 0
        while True:
            due = due_versions(self.weights, interval, done)
            if not due:
                if self.stopping or max(done, default=-1) >= last - last % interval:
                    break  # drained, or every version the run will publish and evaluate is done
                time.sleep(poll_s)
                continue
            version = due[0]
            if version > 0 and not (self.weights / f"v{version}" / "config.json").exists():
                if (self.weights / "pins" / f"v{version}").exists() and not self.stopping:
                    time.sleep(poll_s)  # a pin is written just before its version is renamed into place
                else:
                    done.add(version)  # unpinned and already pruned: nothing left to evaluate
                continue
            row = self.evaluate_version(version)
            if row is not None:
                self.write(row)
                count += 1
            done.add(version)
            (self.weights / "pins" / f"v{version}").unlink(missing_ok=True)
        return count

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="async-rl eval worker: pass@k every eval_interval versions")
    ap.add_argument("--config", required=True, help="resolved config.yaml of the run")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--device", default="cpu", help="device of the eval engine (cpu, cuda)")
    args = ap.parse_args(argv)
    cfg = config_mod.load(args.config)
    if not cfg.eval.eval_interval or not cfg.eval.eval_prompt_data:
        print("eval worker: eval.eval_interval=0 or no eval_prompt_data; nothing to do", flush=True)
        return 0
    worker = EvalWorker(cfg, args.run_dir, args.device)

    def stop(*_):
        worker.stopping = True
    signal.signal(signal.SIGTERM, stop)
    try:
        worker.start_engine()
        n = worker.run()
        print(f"eval worker: done ({n} versions evaluated)", flush=True)
    finally:
        worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
