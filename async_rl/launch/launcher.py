"""Local launcher: start hub, engines, generators and learner as local processes, show progress, stop
cleanly at `num_rollout` or on Ctrl-C, and supervise them (async_rl/launch/supervisor.py: a dead process is
restarted so that no acked group is lost and none is trained twice, or it fails the run with its log tail).

Exit codes: 0 the learner finished; 1 a process failed; 130 interrupted. In every case every child
process is gone when `launch` returns.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from async_rl import config as config_mod
from async_rl import protocol
from async_rl.config_rules.paths import check_paths
from async_rl.endpoints import advertise, advertised_host, is_loopback, serves_weights
from async_rl.launch.procs import Interrupts, ProcessGroup, RestartPolicy
from async_rl.launch.progress import Progress
from async_rl.launch.supervisor import LaunchError, Supervision, _engine_ready, _wait  # noqa: F401
from async_rl.placement import assignment, gpu_env, learner_is_ranked
from async_rl.launch.preflight import check_before_start
from async_rl.run_dir import Manifest, RunDirBusy, lock_run_dir


def free_port(host: str) -> int:
    from async_rl.endpoints import free_port as free
    return free(host)


def _start_command(procs: ProcessGroup, name: str, cmd: list[str], cpus: list, threads: int, critical: bool):
    """ProcessGroup.start for a full command line (an SGLang server runs under its own Python)."""
    return procs.start_command(name, cmd, cpus, threads, critical)


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


def local_problem(cfg: config_mod.Config) -> str | None:
    """Why the local launcher cannot run this config (None when it can)."""
    if cfg.cluster.actor_num_nodes > 1:
        return (f"cluster.actor_num_nodes={cfg.cluster.actor_num_nodes}: the local launcher runs every learner rank on "
                f"this host (one torchrun); launch with --cluster ray (one Ray actor per rank, "
                f"train.actor_num_gpus_per_node on each node), or set actor_num_nodes=1")
    return None


class Launcher(Supervision):
    def __init__(self, cfg: config_mod.Config, run_dir: str | Path, resume: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.stop_requested = False  # `async-rl stop` (SIGUSR1): drain, checkpoint, exit 0
        self.run_dir = Path(run_dir)
        self.cfg_path = self.run_dir / "config.yaml"
        self.procs = ProcessGroup(self.run_dir / "logs")
        self.procs.env = {name: gpu_env(cfg, name) for name in assignment(cfg)}  # cluster.engine_gpus / learner_gpus
        self.hub_endpoint = ""
        self.weights_endpoint = ""  # the weight server's advertised address, when it runs
        self.generator_args: list[str] = []  # more generator options (attach --hub: where to pull weights from)
        self.engine_urls: list[str] = []
        self.restart_policy = RestartPolicy(cfg.cluster.max_restarts, cfg.cluster.restart_backoff)
        self.restart_due: dict[str, float] = {}  # dead process -> when its restart is due (monotonic)
        self.lock_fd: int | None = None  # run_dir/launch.lock, held from prepare() to the end of launch()

    def release(self) -> None:
        """Give up the run directory (launch() does, once every process is gone and run.json is final)."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def key_args(self) -> list[str]:
        return ["--keys", str(self.keys_dir)] if self.keys_dir else []

    spans_nodes = False  # whether the learner's ranks may span nodes (cluster.actor_num_nodes > 1): Ray's only

    def prepare(self) -> None:
        if not self.spans_nodes and local_problem(self.cfg):
            raise LaunchError(local_problem(self.cfg))
        check_paths(self.cfg)
        check_before_start(self.cfg)
        if self.resume and not (self.run_dir / "hub").is_dir():  # checked before anything is created there
            raise LaunchError(f"--resume: {self.run_dir} holds no hub state (run_dir/hub); launch it without --resume")
        try:  # held for the run's life: a second launch into this dir stops here, having touched nothing
            self.lock_fd = lock_run_dir(self.run_dir)
        except RunDirBusy as exc:
            raise LaunchError(str(exc)) from None
        d = self.cfg.debug
        if d.debug_train_only:
            from async_rl.debug import check_load_data
            try:
                check_load_data(self.cfg)
            except config_mod.ConfigError as exc:
                raise LaunchError(str(exc)) from None
        if d.debug_rollout_only:  # the version stays 0, so admission must cover the whole run at staleness 0
            self.cfg.buffer.max_staleness = max(self.cfg.buffer.max_staleness, self.cfg.rollout.num_rollout)
        self.keys_dir = None
        if self.cfg.buffer.auth:
            from async_rl.keys import create_keys
            self.keys_dir = create_keys(self.run_dir / "keys")
        if not is_loopback(self.cfg.cluster.host):  # engines other hosts can reach are not open doors
            from async_rl.keys import ENGINE_KEY_ENV, engine_api_key
            os.environ[ENGINE_KEY_ENV] = engine_api_key(self.run_dir / "keys")  # every child sends it
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "hub.endpoint").unlink(missing_ok=True)
        if self.resume:
            if not self.cfg.debug.debug_rollout_only:  # after a crash: rows past the checkpoint are trained again
                self._rewind_metrics(self._learner_resume_step())
        else:  # a new run starts with an empty hub and no metrics
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / "hub", ignore_errors=True)
        config_mod.save(self.cfg, self.cfg_path)
        with open(self.run_dir / "config_history.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), "event": "resume" if self.resume else "launch",
                                "config": self.cfg.to_dict()}) + "\n")
        self.manifest = Manifest(self.run_dir, self.cfg.to_dict())

    def start_weight_server(self) -> None:
        """cluster.serve_weights: published versions in chunks over ZeroMQ, for hosts without the run dir."""
        c = self.cfg.cluster
        if not serves_weights(c) or self.cfg.debug.debug_train_only:
            return
        endpoint_file = self.run_dir / "weights.endpoint"
        endpoint_file.unlink(missing_ok=True)
        bind = f"tcp://{c.host}:{c.weights_port or free_port(c.host)}"  # fixed, so a restart is found again
        self.procs.start("weight_server", "async_rl.weight_server",
                         ["--root", str(self.run_dir / "weights"), "--initial", self.cfg.ckpt.hf_checkpoint,
                          "--bind", bind, "--endpoint-file", str(endpoint_file),
                          *(self.key_args() if c.weights_auth else [])], cpus=c.engine_cpus)
        _wait("weight server", endpoint_file.exists, self.procs, ["weight_server"], c.startup_timeout)
        self.weights_endpoint = advertise(endpoint_file.read_text().strip(), advertised_host(c))

    def start_hub(self) -> None:
        c = self.cfg.cluster
        self.start_weight_server()  # first: the hub advertises its address (INFO)
        endpoint_file = self.run_dir / "hub.endpoint"
        # a fixed port (picked now when hub_port is 0) so a restarted hub is found where clients reconnect
        bind = f"tcp://{c.host}:{c.hub_port or free_port(c.host)}"
        args = ["--config", str(self.cfg_path), "--bind", bind, "--endpoint-file", str(endpoint_file),
                "--state-dir", str(self.run_dir / "hub")]
        if self.weights_endpoint:
            args += ["--advertise", f"weights={self.weights_endpoint}"]
        # the hub answers everyone on the critical path: it must not queue behind a busy engine on its core
        self.procs.start("hub", "buffer.service", args + self.key_args(), cpus=c.engine_cpus, nice=-5)
        _wait("hub", endpoint_file.exists, self.procs, ["hub"], c.startup_timeout)
        self.hub_endpoint = advertise(endpoint_file.read_text().strip(), advertised_host(c))
        if self.resume:  # the hub remembers the STOP that ended the run before; lift it
            from async_rl.hub_client import HubClient
            client = HubClient(self.hub_endpoint, identity="launcher", keys_dir=self.keys_dir)
            client.request(protocol.Start(), timeout=c.startup_timeout)
            client.close()

    def start_engines(self) -> None:
        """Start the engines (embedded, or SGLang servers with the forwarded sglang_server_args), or use
        rollout_external_engine_addrs; wait for each to answer /health_generate (cluster.startup_timeout); a
        server that exits or never gets ready fails the launch with the tail of its log. With
        use_fault_tolerance, engines are not critical (their generator restarts them) and how each was started
        is written to run_dir/engines.json for that."""
        c, r = self.cfg.cluster, self.cfg.rollout
        if self.cfg.debug.debug_train_only:  # trains from saved rollouts: nothing to generate with
            return
        if r.rollout_external_engine_addrs:
            self.engine_urls = [a if a.startswith("http") else f"http://{a}" for a in r.rollout_external_engine_addrs]
            self.engine_urls = [u.rstrip("/") for u in self.engine_urls]
            for url in self.engine_urls:
                _wait_url(url, c.startup_timeout)
            return
        specs = []
        for i in range(self._num_engines()):
            port = free_port(c.host)  # chosen here, on the host that runs the engine
            url = f"http://{advertised_host(c)}:{port}"
            cmd = self._engine_command(i, port)
            child = _start_command(self.procs, f"engine{i}", cmd, c.engine_cpus, c.engine_num_threads,
                                   critical=not r.use_fault_tolerance)
            specs.append({"url": url, "cmd": cmd, "log": str(child.log), "pid": child.proc.pid,
                          "owner": f"g{i}" if i < c.num_generators else "g0",
                          "env": {"OMP_NUM_THREADS": str(c.engine_num_threads), **gpu_env(self.cfg, f"engine{i}")}})
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
        from async_rl.keys import ENGINE_KEY_ENV
        key = os.environ.get(ENGINE_KEY_ENV)
        if r.rollout_engine == "sglang":
            return [r.sglang_python or sys.executable, "-m", "sglang.launch_server", "--model-path",
                    self.cfg.ckpt.hf_checkpoint, "--host", c.host, "--port", str(port), "--tp-size",
                    str(r.rollout_num_gpus_per_engine), "--weight-version", "0", "--random-seed",
                    str(self.cfg.train.seed + i), *(["--api-key", key] if key else []),
                    *_split_words(r.sglang_server_args)]
        guard = ["--weight-store", str(self.weight_store()), "--weight-store", self.cfg.ckpt.hf_checkpoint,
                 *(["--api-key-env", ENGINE_KEY_ENV] if key else [])]
        return [sys.executable, "-m", "actors.engine.server", "--model-path", self.cfg.ckpt.hf_checkpoint, *guard,
                "--host", c.host, "--port", str(port), "--num-threads", str(c.engine_num_threads),
                "--seed", str(self.cfg.train.seed + i), "--device", r.engine_device, "--dtype", r.engine_dtype,
                "--kv-cache", r.engine_kv_cache, "--max-batch-size", str(r.engine_max_batch_size),
                *([] if r.engine_cuda_graph else ["--no-cuda-graph"])]

    def weight_store(self) -> Path:
        """Where this host's engines may load weights from (besides ckpt.hf_checkpoint)."""
        return self.run_dir / "weights"

    def start_generators(self, id_prefix: str = "g") -> None:
        c = self.cfg.cluster
        for i in range(c.num_generators):
            self.procs.start(f"generator{i}", "actors.generator",
                             ["--config", str(self.cfg_path), "--hub", self.hub_endpoint,
                              "--engine-url", self.engine_urls[i % len(self.engine_urls)],
                              "--generator-id", f"{id_prefix}{i}", *self.key_args(), *self.generator_args],
                             cpus=c.engine_cpus)

    def start_workers(self) -> None:
        c, d = self.cfg.cluster, self.cfg.debug
        common = ["--config", str(self.cfg_path), "--hub", self.hub_endpoint, *self.key_args()]
        if d.debug_train_only:  # a feeder replays the saved batches in place of generators
            self.procs.start("feeder", "async_rl.debug", ["feed", *common], cpus=c.engine_cpus)
        else:
            self.start_generators()
        if d.debug_rollout_only:  # a sink takes (and acks) the batches in place of the learner
            self.procs.start("learner", "async_rl.debug", ["sink", *common, "--run-dir", str(self.run_dir),
                                                           *(["--resume"] if self.resume else [])], cpus=c.learner_cpus)
            return
        t = self.cfg.train
        entry = "learners.megatron.learner" if t.train_backend == "megatron" else "learners.torch_learner"
        args = ["--config", str(self.cfg_path), "--run-dir", str(self.run_dir), "--hub", self.hub_endpoint,
                *self.key_args(), *(["--resume"] if self.resume else [])]
        if learner_is_ranked(self.cfg):  # one process per rank
            self.start_ranked_learner(entry, args)
        else:
            self.procs.start("learner", entry, args, cpus=c.learner_cpus, threads=c.learner_num_threads)
        if self.cfg.eval.eval_interval:  # pass@k every eval_interval versions, on its own engine (actors/eval_worker.py)
            self.procs.start("eval_worker", "actors.eval_worker", ["--config", str(self.cfg_path), "--run-dir",
                             str(self.run_dir)], cpus=c.engine_cpus, threads=c.engine_num_threads, critical=False)

    def start_ranked_learner(self, entry: str, args: list[str]) -> None:
        """The learner's ranks, here under one torchrun on this host (--standalone: its own rendezvous port);
        the Ray launcher starts one actor per rank instead (async_rl/launch/ray_ranks.py)."""
        c = self.cfg.cluster
        self.procs.start("learner", "torch.distributed.run",
                         ["--standalone", f"--nproc-per-node={self.cfg.train.actor_num_gpus_per_node}", "-m", entry,
                          *args], cpus=c.learner_cpus, threads=c.learner_num_threads)

    def evaluate(self, tag: str, weights: str) -> dict | None:
        """Greedy eval of `weights` on engine0 in a subprocess; None when eval is off or failed."""
        if not self.cfg.eval.eval_prompt_data or not self.engine_urls:
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
        procs = {n: {"pid": ch.proc.pid, "log": str(ch.log), "returncode": ch.proc.poll(), "restarts": ch.restarts}
                 for n, ch in self.procs.children.items()}
        self.manifest.update(status=status, processes=procs, restarts=sum(ch.restarts for ch in self.procs.children.values()), keys=str(self.keys_dir) if self.keys_dir else None,
                             endpoints={"hub": self.hub_endpoint, "engines": self.engine_urls,
                                        **({"weights": self.weights_endpoint} if self.weights_endpoint else {})}, **extra)

    def monitor(self, progress: Progress) -> None:
        learner = self.procs.children["learner"]  # respawn keeps the Child, so this follows restarts
        self.progress = progress
        stop_sent = False
        while True:
            progress.refresh()
            if self.stop_requested and not stop_sent:  # the learner checkpoints and exits 0 on SIGTERM
                print("async-rl: stop requested: the learner checkpoints and the run ends", flush=True)
                learner.proc.send_signal(signal.SIGTERM)
                stop_sent = True
            code = learner.proc.poll()
            if code == 0:
                return
            if self.stop_requested and code is not None:
                # it died before it could checkpoint (e.g. SIGTERM before its handler was installed): no restart,
                # the run stops; its last checkpoint plus the hub's replay log make `--resume` exact
                self.restart_due.pop("learner", None)
                print(f"async-rl: the learner exited with code {code} while stopping; `async-rl launch --resume` "
                      f"continues from its last checkpoint", flush=True)
                return
            self.supervise()
            time.sleep(0.5)

    def stop_workers(self) -> None:
        try:
            from async_rl.hub_client import HubClient
            client = HubClient(self.hub_endpoint, identity="launcher", keys_dir=self.keys_dir)
            client.request(protocol.Stop(), timeout=2.0)
            client.close()
        except Exception:
            pass  # the hub is gone; SIGTERM below still stops everyone
        for name in [n for n in self.procs.children if n.startswith("generator")]:
            self.procs.stop(name)


def launch(cfg: config_mod.Config, run_dir: str | Path, resume: bool = False, launcher: Launcher | None = None) -> int:
    """Run a whole job (or continue one, `resume`); returns the exit code. Never leaves a child process behind.
    `launcher`: one built elsewhere (the Ray launcher, async_rl/launch/ray_launcher.py); default a local one."""
    launcher = launcher or Launcher(cfg, run_dir, resume)
    try:
        launcher.prepare()
    except LaunchError as exc:
        launcher.release()  # (a failure after the lock was taken, e.g. Ray could not place the run)
        print(f"async-rl: {exc}", flush=True)
        return 2
    progress = Progress(launcher.run_dir, cfg.rollout.num_rollout, enabled=cfg.logging.progress, resume=resume)
    signals = Interrupts(launcher.procs)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, signals.handle)
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
        signals.cleaning = True  # from here an interrupt hurries the shutdown; it never aborts it
        progress.stop()
        print(f"async-rl: run failed: {exc}", flush=True)
    except KeyboardInterrupt:
        signals.cleaning = True
        progress.stop()
        print("async-rl: interrupted; stopping every process (interrupt again to kill them now)", flush=True)
        code, status = 130, "interrupted"
    finally:
        signals.cleaning = True
        launcher.procs.stop_all()
        launcher.record(status, exit_code=code, finished=time.time(), ended_by=signals.why(status))
    if signals.count > 1:
        print("async-rl: interrupted again: every process was killed", flush=True)
    from async_rl.launch.report import write_report
    summary = write_report(launcher.run_dir, evals=evals)
    if summary:
        print(summary, flush=True)
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    launcher.release()
    return code
