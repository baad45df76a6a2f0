"""Local launcher: start hub, engines, generators and learner as local processes, show progress, stop
cleanly at `num_rollout`, on Ctrl-C, or when any process dies (reported with the tail of its log).

Exit codes: 0 the learner finished; 1 a process failed; 130 interrupted. In every case every child
process is gone when `launch` returns.
"""
from __future__ import annotations

import json
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import requests

from async_rl import config as config_mod
from async_rl.config_rules import check_paths
from async_rl.procs import ProcessGroup
from async_rl.progress import Progress
from async_rl.run_dir import Manifest


class LaunchError(RuntimeError):
    pass


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait(what: str, ready, procs: ProcessGroup, names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for name in names:
            child = procs.children[name]
            if child.proc.poll() is not None:
                raise LaunchError(f"{name} exited with code {child.proc.returncode} while starting; "
                                  f"last lines of {child.log}:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise LaunchError(f"{what} not ready after {timeout:.0f}s (cluster.startup_timeout); see "
                              f"{[str(procs.children[n].log) for n in names]}")
        time.sleep(0.1)


def _start_command(procs: ProcessGroup, name: str, cmd: list[str], cpus: list, threads: int, critical: bool):
    """ProcessGroup.start for a full command line (an SGLang server runs under its own Python)."""
    import os
    import subprocess

    from async_rl.procs import Child
    log = procs.log_dir / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    cores = [int(c) for c in cpus or []]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True,
                                preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    procs.children[name] = child = Child(name, proc, log, critical)
    return child


def _split_words(args: list) -> list[str]:
    import shlex
    return [w for entry in args for w in shlex.split(str(entry))]


def _wait_url(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _engine_ready(url):
        if time.monotonic() > deadline:
            raise LaunchError(f"external engine {url} (rollout.rollout_external_engine_addrs) not healthy after "
                              f"{timeout:.0f}s (cluster.startup_timeout); is it running?")
        time.sleep(0.5)


def _engine_ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/health_generate", timeout=5).status_code == 200
    except requests.RequestException:
        return False


class Launcher:
    def __init__(self, cfg: config_mod.Config, run_dir: str | Path, resume: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.stop_requested = False  # `async-rl stop` (SIGUSR1): drain, checkpoint, exit 0
        self.run_dir = Path(run_dir)
        self.cfg_path = self.run_dir / "config.yaml"
        self.procs = ProcessGroup(self.run_dir / "logs")
        self.hub_endpoint = ""
        self.engine_urls: list[str] = []

    def key_args(self) -> list[str]:
        return ["--keys", str(self.keys_dir)] if self.keys_dir else []

    def prepare(self) -> None:
        check_paths(self.cfg)
        self.keys_dir = None
        if self.cfg.buffer.auth:
            from async_rl.keys import create_keys
            self.keys_dir = create_keys(self.run_dir / "keys")
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "hub.endpoint").unlink(missing_ok=True)
        if self.resume:
            if not (self.run_dir / "hub").is_dir():
                raise LaunchError(f"--resume: {self.run_dir} holds no hub state (run_dir/hub); launch it without --resume")
        else:  # a new run starts with an empty hub and no metrics
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / "hub", ignore_errors=True)
        config_mod.save(self.cfg, self.cfg_path)
        with open(self.run_dir / "config_history.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), "event": "resume" if self.resume else "launch",
                                "config": self.cfg.to_dict()}) + "\n")
        self.manifest = Manifest(self.run_dir, self.cfg.to_dict())

    def start_hub(self) -> None:
        c = self.cfg.cluster
        endpoint_file = self.run_dir / "hub.endpoint"
        # a fixed port (picked now when hub_port is 0) so a restarted hub is found where clients reconnect
        bind = f"tcp://{c.host}:{c.hub_port or free_port(c.host)}"
        args = ["--config", str(self.cfg_path), "--bind", bind, "--endpoint-file", str(endpoint_file),
                "--state-dir", str(self.run_dir / "hub")]
        # the hub answers everyone on the critical path: it must not queue behind a busy engine on its core
        self.procs.start("hub", "buffer.service", args + self.key_args(), cpus=c.engine_cpus, nice=-5)
        _wait("hub", endpoint_file.exists, self.procs, ["hub"], c.startup_timeout)
        self.hub_endpoint = endpoint_file.read_text().strip()
        if self.resume:  # the hub remembers the STOP that ended the run before; lift it
            from async_rl.hub_client import HubClient
            client = HubClient(self.hub_endpoint, identity="launcher", keys_dir=self.keys_dir)
            client.request({"type": "START"}, timeout=c.startup_timeout)
            client.close()

    def start_engines(self) -> None:
        """Start the engines (embedded, or SGLang servers with the forwarded sglang_server_args), or use
        rollout_external_engine_addrs; wait for each to answer /health_generate (cluster.startup_timeout); a
        server that exits or never gets ready fails the launch with the tail of its log. With
        use_fault_tolerance, engines are not critical (their generator restarts them) and how each was started
        is written to run_dir/engines.json for that."""
        c, r = self.cfg.cluster, self.cfg.rollout
        if r.rollout_external_engine_addrs:
            self.engine_urls = [a if a.startswith("http") else f"http://{a}" for a in r.rollout_external_engine_addrs]
            self.engine_urls = [u.rstrip("/") for u in self.engine_urls]
            for url in self.engine_urls:
                _wait_url(url, c.startup_timeout)
            return
        specs = []
        for i in range(self._num_engines()):
            port = free_port(c.host)
            url = f"http://{c.host}:{port}"
            cmd = self._engine_command(i, port)
            child = _start_command(self.procs, f"engine{i}", cmd, c.engine_cpus, c.engine_num_threads,
                                   critical=not r.use_fault_tolerance)
            specs.append({"url": url, "cmd": cmd, "log": str(child.log), "pid": child.proc.pid,
                          "owner": f"g{i}" if i < c.num_generators else "g0",
                          "env": {"OMP_NUM_THREADS": str(c.engine_num_threads)}})
            self.engine_urls.append(url)
        (self.run_dir / "engines.json").write_text(json.dumps(specs, indent=1))
        for i, url in enumerate(self.engine_urls):
            _wait(f"engine{i}", lambda u=url: _engine_ready(u), self.procs, [f"engine{i}"], c.startup_timeout)

    def _num_engines(self) -> int:
        r = self.cfg.rollout
        if r.rollout_engine == "sglang" and r.rollout_num_gpus:
            return r.rollout_num_gpus // r.rollout_num_gpus_per_engine
        return self.cfg.cluster.num_engines

    def _engine_command(self, i: int, port: int) -> list[str]:
        c, r = self.cfg.cluster, self.cfg.rollout
        if r.rollout_engine == "sglang":
            return [r.sglang_python or sys.executable, "-m", "sglang.launch_server", "--model-path",
                    self.cfg.ckpt.hf_checkpoint, "--host", c.host, "--port", str(port), "--tp-size",
                    str(r.rollout_num_gpus_per_engine), "--weight-version", "0", "--random-seed",
                    str(self.cfg.train.seed + i), *_split_words(r.sglang_server_args)]
        return [sys.executable, "-m", "actors.engine_server", "--model-path", self.cfg.ckpt.hf_checkpoint,
                "--host", c.host, "--port", str(port), "--num-threads", str(c.engine_num_threads),
                "--seed", str(self.cfg.train.seed + i)]

    def start_generators(self, id_prefix: str = "g") -> None:
        c = self.cfg.cluster
        for i in range(c.num_generators):
            self.procs.start(f"generator{i}", "actors.generator",
                             ["--config", str(self.cfg_path), "--hub", self.hub_endpoint,
                              "--engine-url", self.engine_urls[i % len(self.engine_urls)],
                              "--generator-id", f"{id_prefix}{i}", *self.key_args()],
                             cpus=c.engine_cpus)

    def start_workers(self) -> None:
        c = self.cfg.cluster
        self.start_generators()
        t = self.cfg.train
        if t.train_backend == "megatron":  # one process per GPU, under torchrun (its own rendezvous port)
            module, launch = "torch.distributed.run", ["--standalone", f"--nproc-per-node={t.actor_num_gpus_per_node}",
                                                       "-m", "learners.megatron.learner"]
        else:
            module, launch = "learners.torch_learner", []
        self.procs.start("learner", module,
                         [*launch, "--config", str(self.cfg_path), "--run-dir", str(self.run_dir), "--hub",
                          self.hub_endpoint, *self.key_args(), *(["--resume"] if self.resume else [])],
                         cpus=c.learner_cpus, threads=c.learner_num_threads)
        if self.cfg.eval.eval_interval:  # pass@k every eval_interval versions, on its own engine (actors/eval_worker.py)
            self.procs.start("eval_worker", "actors.eval_worker", ["--config", str(self.cfg_path), "--run-dir",
                             str(self.run_dir)], cpus=c.engine_cpus, threads=c.engine_num_threads, critical=False)

    def evaluate(self, tag: str, weights: str) -> dict | None:
        """Greedy eval of `weights` on engine0 in a subprocess; None when eval is off or failed."""
        if not self.cfg.eval.eval_prompt_data:
            return None
        out = self.run_dir / f"eval_{tag}.json"
        child = self.procs.start(f"eval_{tag}", "actors.evaluate",
                                 ["--config", str(self.cfg_path), "--engine-url", self.engine_urls[0],
                                  "--weights", weights, "--out", str(out)], critical=False)
        try:
            child.proc.wait(timeout=self.cfg.cluster.startup_timeout)
        except Exception:
            self.procs.stop(child.name)
        return json.loads(out.read_text()) if out.exists() else None

    def record(self, status: str, **extra) -> None:
        procs = {n: {"pid": ch.proc.pid, "log": str(ch.log), "returncode": ch.proc.poll()}
                 for n, ch in self.procs.children.items()}
        self.manifest.update(status=status, processes=procs, keys=str(self.keys_dir) if self.keys_dir else None,
                             endpoints={"hub": self.hub_endpoint, "engines": self.engine_urls}, **extra)

    def monitor(self, progress: Progress) -> None:
        learner = self.procs.children["learner"]
        stop_sent = False
        while True:
            progress.refresh()
            if self.stop_requested and not stop_sent:  # the learner checkpoints and exits 0 on SIGTERM
                print("async-rl: stop requested: the learner checkpoints and the run ends", flush=True)
                learner.proc.send_signal(signal.SIGTERM)
                stop_sent = True
            bad = self.procs.failed()
            if bad is not None:
                raise LaunchError(f"{bad.name} died with exit code {bad.proc.returncode}; last lines of "
                                  f"{bad.log}:\n{bad.tail()}")
            if learner.proc.poll() == 0:
                return
            if any(ch.proc.poll() is not None for ch in self.procs.children.values() if ch.critical):
                dead = [n for n, ch in self.procs.children.items() if ch.critical and ch.proc.poll() is not None]
                raise LaunchError(f"{dead} exited before the learner finished; see {self.run_dir / 'logs'}")
            time.sleep(0.5)

    def stop_workers(self) -> None:
        try:
            from async_rl.hub_client import HubClient
            client = HubClient(self.hub_endpoint, identity="launcher", keys_dir=self.keys_dir)
            client.request({"type": "STOP"}, timeout=2.0)
            client.close()
        except Exception:
            pass  # the hub is gone; SIGTERM below still stops everyone
        for name in [n for n in self.procs.children if n.startswith("generator")]:
            self.procs.stop(name)


def launch(cfg: config_mod.Config, run_dir: str | Path, resume: bool = False) -> int:
    """Run a whole job (or continue one, `resume`); returns the exit code. Never leaves a child process behind."""
    launcher = Launcher(cfg, run_dir, resume)
    try:
        launcher.prepare()
    except LaunchError as exc:
        print(f"async-rl: {exc}", flush=True)
        return 2
    progress = Progress(launcher.run_dir, cfg.rollout.num_rollout, enabled=cfg.logging.progress)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, _raise_interrupt)
    signal.signal(signal.SIGUSR1, lambda *_: setattr(launcher, "stop_requested", True))
    code, status, evals = 1, "failed", {}
    try:
        launcher.start_hub()
        launcher.start_engines()
        if not resume:
            evals["start"] = launcher.evaluate("start", cfg.ckpt.hf_checkpoint)
        launcher.start_workers()
        launcher.record("running")
        progress.start()
        launcher.monitor(progress)
        progress.stop()
        launcher.stop_workers()
        latest = sorted((launcher.run_dir / "weights").glob("v*"), key=lambda p: int(p.name[1:]))
        evals["end"] = launcher.evaluate("end", str(latest[-1]) if latest else cfg.ckpt.hf_checkpoint)
        code, status = 0, "stopped" if launcher.stop_requested else "completed"
    except LaunchError as exc:
        progress.stop()
        print(f"async-rl: run failed: {exc}", flush=True)
    except KeyboardInterrupt:
        progress.stop()
        print("async-rl: interrupted; stopping every process", flush=True)
        code, status = 130, "interrupted"
    finally:
        launcher.procs.stop_all()
        launcher.record(status, exit_code=code, finished=time.time())
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    from async_rl.report import write_report
    summary = write_report(launcher.run_dir, evals=evals)
    if summary:
        print(summary, flush=True)
    return code


def _raise_interrupt(*_):
    raise KeyboardInterrupt
