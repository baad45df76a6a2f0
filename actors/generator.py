"""Generator worker: ACQUIRE credits and prompts from the hub, generate `n_samples_per_prompt` responses per
prompt through its engines, score them, and PUT each engine call's groups (at least once) to the hub.

It never waits for the learner beyond what admission credits ask: it keeps generating while the learner
trains. Several engine calls run at once (up to `sglang_server_concurrency` samples per engine, over all the
engines it drives); ACQUIREs stay sequential (one `acquire_seq` stream). A watcher polls the hub for new
weights and brings the engines to them (interrupting in-flight requests per `interrupt_mode`), so every token
is stamped with the version that produced it (`token_versions`). A group is formed only from finished
samples, so a call that failed on a dead engine and is re-issued elsewhere never yields a duplicate.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from actors import rollout
from actors.engine_client import EngineError
from actors.engine_fleet import EngineFleet, EngineHandle, load_specs
from actors.filters import GroupFilter
from actors.rewards import RewardScorer
from async_rl import config as config_mod
from async_rl import knobs as knobs_mod
from async_rl import protocol
from async_rl.hub_client import Heartbeat, HubClient, HubTimeout
from async_rl.plugins import load_function
from async_rl.types import Group


class Generator:
    def __init__(self, cfg: config_mod.Config, generator_id: str, hub_endpoint: str, engine_url: str | list[str],
                 keys_dir: str | None = None, engine_specs: str | None = None, puller=None):
        from transformers import AutoTokenizer

        self.cfg = cfg
        # a fresh incarnation id: a restarted generator's (id, seq) keys must never collide with what its
        # previous life already delivered (the hub would drop them as duplicates)
        self.generator_id = f"{generator_id}-{uuid.uuid4().hex[:8]}"
        self.hub_endpoint, self.keys_dir, self._name = hub_endpoint, keys_dir, generator_id
        self.hub = HubClient(hub_endpoint, identity=generator_id, keys_dir=keys_dir,
                             resend_after=cfg.buffer.put_timeout)
        self._main_thread, self._local = threading.get_ident(), threading.local()
        self.heartbeat = Heartbeat(hub_endpoint, self.generator_id, cfg.buffer.heartbeat_interval, keys_dir)
        self.knob_version = 0
        # a host without the run dir: versions are pulled from the weight server (async_rl/weight_pull.py) into
        # a local store, and the engines load them from there
        self.puller = puller
        self.acquire_seq = 0  # makes ACQUIRE idempotent: a resent request gets the same grant back
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.ckpt.hf_checkpoint)
        # plug-ins (reward fns, post-processing, filter, generate fns) load here so a wrong path fails at start-up
        self.scorer = RewardScorer(cfg.rollout)
        self.group_filter = GroupFilter(cfg.rollout.dynamic_sampling_filter_path)
        r = cfg.rollout
        self.custom_generate = (load_function(r.custom_generate_function_path, "rollout.custom_generate_function_path", 2)
                                if r.custom_generate_function_path else None)
        self.rollout_function = (load_function(r.rollout_function_path, "rollout.rollout_function_path", 2)
                                 if r.rollout_function_path else None)
        self.dropped_groups = 0  # groups the sampling filter dropped (each reported to the hub by DROP)
        urls = [engine_url] if isinstance(engine_url, str) else list(engine_url)
        self.fleet = EngineFleet(urls, r, self.acquire_max_groups * r.n_samples_per_prompt,
                                 load_specs(engine_specs) if engine_specs else None, latest=self._latest, log=self._log,
                                 owner=generator_id)
        self.engine = self.fleet.engines[0].client
        self.seq, self._seq_lock = 0, threading.Lock()
        self.stopping = False
        self.failure: BaseException | None = None

    def _log(self, message: str) -> None:
        print(f"{self.generator_id}: {message}", flush=True)

    def hub_client(self) -> HubClient:
        """The hub client of the calling thread (a ZeroMQ socket is not shared between threads)."""
        if threading.get_ident() == self._main_thread:
            return self.hub
        if not hasattr(self._local, "hub"):
            self._local.hub = HubClient(self.hub_endpoint, identity=self._name, keys_dir=self.keys_dir,
                                        resend_after=self.cfg.buffer.put_timeout)
        return self._local.hub

    def next_seq(self) -> int:
        with self._seq_lock:
            self.seq += 1
            return self.seq - 1

    def apply_knobs(self, reply: dict) -> None:
        """Live sampling knobs (`async-rl set`) arrive with grants; sampling_params() reads them from cfg."""
        if int(reply.get("knob_version", 0)) > self.knob_version:
            changed = knobs_mod.apply(self.cfg, reply.get("knobs") or {})
            self.knob_version = int(reply["knob_version"])
            self._log(f"live knobs v{self.knob_version} applied: {changed}")

    def sampling_params(self) -> dict:
        r = self.cfg.rollout
        return {"temperature": r.rollout_temperature, "top_p": r.rollout_top_p, "top_k": r.rollout_top_k,
                "max_new_tokens": r.rollout_max_response_len, "stop_token_ids": list(r.rollout_stop_token_ids),
                **({"stop": list(r.rollout_stop)} if r.rollout_stop else {})}

    # ---- weights ------------------------------------------------------------------------------------
    def _latest(self) -> tuple[int, str]:
        reply = self.hub_client().request(protocol.Stats(), timeout=self.cfg.buffer.put_timeout)
        return self._localize(int(reply["version"]), str(reply["weights_path"]))

    def _localize(self, version: int, path: str) -> tuple[int, str]:
        """(version, a path this host's engines can load it from): the hub's path, or a pulled copy."""
        if self.puller is None:
            return version, path
        from async_rl.weight_pull import WeightPullError
        try:
            return version, str(self.puller.pull(version))
        except WeightPullError as exc:  # pruned on the head before we got to it: take the newest instead
            newest = self.puller.latest()
            self._log(f"pulling v{version} failed ({exc}); pulling v{newest}")
            return newest, str(self.puller.pull(newest))

    def sync_weights(self, version: int, path: str) -> None:
        """Bring every engine to `version`; if that version was already pruned, to whatever is newest."""
        if self.fleet.target is None or version > self.fleet.target[0]:
            try:
                version, path = self._localize(version, path)
            except (TimeoutError, OSError, RuntimeError) as exc:
                # the weight server is out of reach (a partition): generate on with the weights we have; the
                # hub's staleness bound still holds, and the next poll tries again
                self._log(f"pulling v{version} failed ({exc}); generating on, retrying with the next poll")
                if self.fleet.target is None:
                    raise  # nothing loaded yet: nothing to generate with
                return
        if self.cfg.rollout.update_weight_mode in ("broadcast", "tensor"):
            self._adopt_broadcast(version)
        before = [e.version for e in self.fleet.engines]
        self.fleet.sync(version, path)
        if [e.version for e in self.fleet.engines] != before:
            self._log(f"engines now at versions {[e.version for e in self.fleet.engines]}")

    def _adopt_broadcast(self, version: int) -> None:
        """update_weight_mode=broadcast / tensor: the learner put `version` into the engines before telling the hub, so
        take each engine's word for its version; the fleet then loads from disk only an engine that missed
        the broadcast (restarted, or attached after the learner formed its group)."""
        for e in self.fleet.engines:
            if not e.healthy.is_set() or e.updating or e.version >= version:
                continue
            try:
                e.version = max(e.version, int(e.client.model_info().get("weight_version") or 0))
            except EngineError:
                continue  # the fleet's own sync (and health checks) deal with it
            if e.version < version:
                self._log(f"engine {e.url} is at v{e.version}, missed the broadcast of v{version}; loading it from disk")

    def _watch_weights(self) -> None:
        """Poll the hub for new weights while calls are in flight (ACQUIRE replies carry them otherwise)."""
        while not self.stopping:
            time.sleep(self.cfg.rollout.weight_poll_interval)
            try:
                version, path = self._latest()
                if self.fleet.target is None or version > self.fleet.target[0]:
                    self.sync_weights(version, path)
            except HubTimeout:
                continue
            except Exception as e:  # noqa: BLE001  (reported by the main loop)
                self.failure = self.failure or e
                return

    # ---- one engine call ----------------------------------------------------------------------------
    def generate_groups(self, prompts: list[dict], engine: EngineHandle | None = None) -> tuple[list[Group], float, int]:
        """Generate, score and filter one group per prompt -> (kept groups, their share of engine seconds,
        their response tokens). Groups the sampling filter drops are reported to the hub (`drop_group`)."""
        engine = engine or self.fleet.engines[0]
        t0 = time.monotonic()
        groups = self._rollout(prompts, engine)
        busy = time.monotonic() - t0
        kept, tokens = [], 0
        for group, prompt in zip(groups, prompts):
            self.scorer.apply(group, prompt["label"])  # the raw label: it may be a list or a map
            if self.group_filter.keep(group):
                kept.append(group)
                tokens += sum(len(t.response_ids) for t in group.trajectories)
            else:
                self.drop_group(group, busy_s=busy / len(prompts))
        return kept, busy * len(kept) / max(1, len(prompts)), tokens

    def _rollout(self, prompts: list[dict], engine: EngineHandle) -> list[Group]:
        if self.rollout_function is not None:
            return self.rollout_function(self, prompts)
        n, r = self.cfg.rollout.n_samples_per_prompt, self.cfg.rollout
        if self.custom_generate is not None:
            from actors.custom_generate import run_custom_generate
            trajs = run_custom_generate(self.custom_generate, self, engine.client, prompts, n)
        else:
            prompt_ids = [self.prompt_ids(p) for p in prompts]
            samples = rollout.generate_samples(engine.client, [ids for ids in prompt_ids for _ in range(n)],
                                               self.sampling_params(), r.partial_rollout,
                                               max_context_len=r.rollout_max_context_len)
            trajs = [rollout.to_trajectory(s, self.tokenizer.decode(s.output_ids, skip_special_tokens=True),
                                           r.mask_offpolicy_in_partial_rollout) for s in samples]
        return [self.make_group(p, trajs[i * n:(i + 1) * n]) for i, p in enumerate(prompts)]

    def prompt_ids(self, prompt: dict) -> list[int]:
        if "input_ids" in prompt:  # rendered and tokenized at load (data.apply_chat_template)
            return list(prompt["input_ids"])
        # a rendered chat template already holds its special tokens
        return self.tokenizer(prompt["input"], add_special_tokens=not self.cfg.data.apply_chat_template)["input_ids"]

    def make_group(self, prompt: dict, trajs: list) -> Group:
        meta = {"metadata": prompt["metadata"]} if prompt.get("metadata") is not None else {}
        return Group(self.generator_id, self.next_seq(), int(prompt["prompt_index"]), str(prompt["label"]), trajs,
                     prompt_text=str(prompt["input"]), meta=meta)

    def drop_group(self, group: Group, busy_s: float = 0.0) -> None:
        """Tell the hub the sampling filter dropped `group`: its admission credit was spent without a PUT, so
        the hub gives the credit back (and counts buffer/dropped_filtered). Resent until answered, like PUT;
        the key (generator_id, seq) lets the hub count a resent DROP once. `stats` carries the work it cost
        (as PUT's does), so generation throughput still counts it."""
        stats = {"gen_tokens": sum(len(t.response_ids) for t in group.trajectories), "busy_s": busy_s}
        self.hub_client().request(protocol.Drop(generator_id=self.generator_id, seq=group.seq,
                                                prompt_index=group.prompt_index, stats=stats),
                                  timeout=None, should_stop=lambda: self.stopping)
        self.dropped_groups += 1

    @property
    def acquire_max_groups(self) -> int:
        """Groups to ask for per ACQUIRE: over_sampling_batch_size when set, so a filter that drops groups
        does not leave the engine under-fed; else groups_per_engine_call."""
        r = self.cfg.rollout
        return r.over_sampling_batch_size or r.groups_per_engine_call

    # ---- the loop -----------------------------------------------------------------------------------
    def _should_stop(self) -> bool:
        return self.stopping or self.failure is not None

    def run(self) -> None:
        self.heartbeat.start()
        threading.Thread(target=self._watch_weights, name="weights", daemon=True).start()
        self.fleet.start_monitor()
        slots = sum(e.capacity for e in self.fleet.engines)
        pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="call")
        try:
            while not self._should_stop():
                engine = self.fleet.acquire(self._should_stop)
                if engine is None:
                    break
                reply = self._acquire()
                if reply is None or reply["type"] == "DONE":
                    self.fleet.release(engine)
                    if reply is not None:
                        self._log("hub says the run is done")
                    break
                self.apply_knobs(reply)
                self.sync_weights(int(reply["version"]), str(reply["weights_path"]))
                pool.submit(self._call, engine, reply["prompts"])
        finally:
            pool.shutdown(wait=True)  # calls in flight finish and deliver (or stop, when asked to)
            self.stopping = True
            self.fleet.stop()
            self.heartbeat.stop()
        if self.failure is not None:
            raise self.failure

    def _acquire(self) -> dict | None:
        try:
            reply = self.hub.request(protocol.Acquire(generator_id=self.generator_id, acquire_seq=self.acquire_seq,
                                                      max_groups=self.acquire_max_groups),
                                     timeout=None, should_stop=self._should_stop)
        except HubTimeout:
            return None  # asked to stop while waiting
        if reply["type"] != "DONE":
            self.acquire_seq += 1
        return reply

    def _call(self, engine: EngineHandle, prompts: list[dict]) -> None:
        """One engine call: generate + deliver; on a failed engine (fault tolerance) re-issue elsewhere."""
        try:
            while True:
                try:
                    result = self.generate_groups(prompts, engine)
                    break
                except EngineError as e:
                    if not self.cfg.rollout.use_fault_tolerance or self._should_stop():
                        raise
                    self._log(f"call on {engine.url} failed ({e}); re-issuing its {len(prompts)} prompt(s)")
                    engine.healthy.clear()  # the health monitor restarts it
                    self.fleet.release(engine)
                    engine = self.fleet.acquire(self._should_stop)
                    if engine is None:
                        return
            self.deliver(*result, should_stop=self._should_stop)
        except HubTimeout:
            pass  # asked to stop while delivering
        except BaseException as e:  # noqa: BLE001  (the main loop re-raises it)
            self.failure = self.failure or e
        finally:
            if engine is not None:
                self.fleet.release(engine)

    def deliver(self, groups: list[Group], busy: float, tokens: int, should_stop=None) -> None:
        """All groups of one engine call in one PUT: one round trip and one WAL fsync, not one per group."""
        if groups:
            self.hub_client().put(groups, {"gen_tokens": tokens, "busy_s": busy}, timeout=None,
                                  should_stop=should_stop)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="async-rl generator worker")
    ap.add_argument("--config", required=True, help="resolved config.yaml of the run")
    ap.add_argument("--hub", required=True, help="hub endpoint, e.g. tcp://127.0.0.1:5555")
    ap.add_argument("--engine-url", required=True, action="append",
                    help="engine server URL, e.g. http://127.0.0.1:30000 (repeat for several engines)")
    ap.add_argument("--engine-specs", default=None, help="JSON of how each engine was started (to restart it)")
    ap.add_argument("--generator-id", default="g0")
    ap.add_argument("--keys", default=None, help="CURVE keys dir of the run, or its attach.key (none = no auth)")
    ap.add_argument("--weights-from", default=None,
                    help="weight server endpoint: pull each version into --weights-dir (a host without the run dir)")
    ap.add_argument("--weights-dir", default=None, help="with --weights-from: the local weight store")
    args = ap.parse_args(argv)
    specs = args.engine_specs
    if specs is None and (Path(args.config).parent / "engines.json").exists():  # written by the launcher
        specs = str(Path(args.config).parent / "engines.json")
    cfg = config_mod.load(args.config)
    puller = None
    if args.weights_from:
        from async_rl.weight_pull import WeightPuller
        puller = WeightPuller(args.weights_from, args.weights_dir or Path(args.config).parent / "weights",
                              args.keys if cfg.cluster.weights_auth else None, keep=cfg.ckpt.keep_weight_versions)
    gen = Generator(cfg, args.generator_id, args.hub, args.engine_url, args.keys, specs, puller)

    def stop(*_):
        gen.stopping = True
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    gen.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
