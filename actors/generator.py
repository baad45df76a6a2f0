"""Generator worker: ACQUIRE credits and prompts from the hub, generate `n_samples_per_prompt` responses per
prompt through the engine, score them, and PUT each group (at least once) to the hub.

It never waits for the learner beyond what admission credits ask: it keeps generating while the learner
trains. Before starting work it loads the newest published weights into its engine, so every token it
produces is stamped with the version that produced it (`token_versions`).
"""
from __future__ import annotations

import argparse
import signal
import sys
import time

import numpy as np

from actors.engine_client import EngineClient
from actors.filters import GroupFilter
from actors.rewards import RewardScorer
from async_rl import config as config_mod
from async_rl.hub_client import Heartbeat, HubClient, HubTimeout
from async_rl.types import Group, Trajectory


class Generator:
    def __init__(self, cfg: config_mod.Config, generator_id: str, hub_endpoint: str, engine_url: str,
                 keys_dir: str | None = None):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.generator_id = generator_id
        self.hub = HubClient(hub_endpoint, identity=generator_id, keys_dir=keys_dir,
                             resend_after=cfg.buffer.put_timeout)
        self.heartbeat = Heartbeat(hub_endpoint, generator_id, cfg.buffer.heartbeat_interval, keys_dir)
        self.acquire_seq = 0  # makes ACQUIRE idempotent: a resent request gets the same grant back
        self.engine = EngineClient(engine_url)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.ckpt.hf_checkpoint)
        # plug-ins (reward fns, post-processing, filter) load here so a wrong path fails at start-up
        self.scorer = RewardScorer(cfg.rollout)
        self.group_filter = GroupFilter(cfg.rollout.dynamic_sampling_filter_path)
        self.dropped_groups = 0  # groups the sampling filter dropped (each reported to the hub by DROP)
        self.engine_version = int(self.engine.model_info().get("weight_version") or 0)
        self.seq = 0
        self.stopping = False

    def sampling_params(self) -> dict:
        r = self.cfg.rollout
        return {"temperature": r.rollout_temperature, "top_p": r.rollout_top_p, "top_k": r.rollout_top_k,
                "max_new_tokens": r.rollout_max_response_len, "stop_token_ids": list(r.rollout_stop_token_ids)}

    def sync_weights(self, version: int, path: str) -> None:
        """Load `version` into the engine; if that version was already pruned, load whatever is newest."""
        while version > self.engine_version and not self.stopping:
            ok, message = self.engine.update_weights_from_disk(path, version)
            if ok:
                self.engine_version = version
                print(f"{self.generator_id}: engine now at version {version}", flush=True)
                return
            print(f"{self.generator_id}: loading v{version} failed ({message}); asking the hub again", flush=True)
            reply = self.hub.request({"type": "STATS"}, timeout=self.cfg.buffer.put_timeout)
            version, path = int(reply["version"]), str(reply["weights_path"])

    def generate_groups(self, prompts: list[dict]) -> tuple[list[Group], float, int]:
        """Generate, score and filter one group per prompt -> (kept groups, their share of engine seconds,
        their response tokens). Groups the sampling filter drops are reported to the hub (`drop_group`)."""
        n = self.cfg.rollout.n_samples_per_prompt
        prompt_ids = [self.tokenizer(p["input"])["input_ids"] for p in prompts]
        batch = [ids for ids in prompt_ids for _ in range(n)]
        t0 = time.monotonic()
        results = self.engine.generate(batch, self.sampling_params(), return_logprob=True)
        busy = time.monotonic() - t0
        kept, tokens = [], 0
        for i, prompt in enumerate(prompts):
            trajs = [Trajectory(prompt_ids=np.asarray(prompt_ids[i], np.int32),
                                response_ids=np.asarray(res.output_ids, np.int32),
                                rollout_logprobs=np.asarray(res.output_logprobs, np.float32),
                                token_versions=np.asarray(res.token_versions, np.int32),
                                finish_reason=res.finish_reason,
                                response_text=self.tokenizer.decode(res.output_ids, skip_special_tokens=True))
                     for res in results[i * n:(i + 1) * n]]
            group = Group(self.generator_id, self.seq, int(prompt["prompt_index"]), str(prompt["label"]),
                          trajs, prompt_text=str(prompt["input"]))
            self.seq += 1
            self.scorer.apply(group, prompt["label"])  # the raw label: it may be a list or a map
            if self.group_filter.keep(group):
                kept.append(group)
                tokens += sum(len(t.response_ids) for t in trajs)
            else:
                self.drop_group(group, busy_s=busy / len(prompts))
        return kept, busy * len(kept) / max(1, len(prompts)), tokens

    def drop_group(self, group: Group, busy_s: float = 0.0) -> None:
        """Tell the hub the sampling filter dropped `group`: its admission credit was spent without a PUT, so
        the hub gives the credit back (and counts buffer/dropped_filtered). Resent until answered, like PUT;
        the key (generator_id, seq) lets the hub count a resent DROP once. `stats` carries the work it cost
        (as PUT's does), so generation throughput still counts it."""
        stats = {"gen_tokens": sum(len(t.response_ids) for t in group.trajectories), "busy_s": busy_s}
        self.hub.request({"type": "DROP", "generator_id": self.generator_id, "seq": group.seq,
                          "prompt_index": group.prompt_index, "stats": stats},
                         timeout=None, should_stop=lambda: self.stopping)
        self.dropped_groups += 1

    @property
    def acquire_max_groups(self) -> int:
        """Groups to ask for per ACQUIRE: over_sampling_batch_size when set, so a filter that drops groups
        does not leave the engine under-fed; else groups_per_engine_call."""
        r = self.cfg.rollout
        return r.over_sampling_batch_size or r.groups_per_engine_call

    def run(self) -> None:
        should_stop = lambda: self.stopping  # noqa: E731
        self.heartbeat.start()
        try:
            while not self.stopping:
                reply = self.hub.request({"type": "ACQUIRE", "generator_id": self.generator_id,
                                          "acquire_seq": self.acquire_seq,
                                          "max_groups": self.acquire_max_groups},
                                         timeout=None, should_stop=should_stop)
                if reply["type"] == "DONE":
                    print(f"{self.generator_id}: hub says the run is done", flush=True)
                    break
                self.acquire_seq += 1
                self.sync_weights(int(reply["version"]), str(reply["weights_path"]))
                self.deliver(*self.generate_groups(reply["prompts"]), should_stop=should_stop)
        except HubTimeout:
            pass  # asked to stop while waiting
        finally:
            self.heartbeat.stop()

    def deliver(self, groups: list[Group], busy: float, tokens: int, should_stop=None) -> None:
        """All groups of one engine call in one PUT: one round trip and one WAL fsync, not one per group."""
        if groups:
            self.hub.request({"type": "PUT", "groups": [g.to_wire() for g in groups],
                              "stats": {"gen_tokens": tokens, "busy_s": busy}}, timeout=None, should_stop=should_stop)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="async-rl generator worker")
    ap.add_argument("--config", required=True, help="resolved config.yaml of the run")
    ap.add_argument("--hub", required=True, help="hub endpoint, e.g. tcp://127.0.0.1:5555")
    ap.add_argument("--engine-url", required=True, help="engine server URL, e.g. http://127.0.0.1:30000")
    ap.add_argument("--generator-id", default="g0")
    ap.add_argument("--keys", default=None, help="CURVE keys dir of the run (none = no auth)")
    args = ap.parse_args(argv)
    gen = Generator(config_mod.load(args.config), args.generator_id, args.hub, args.engine_url, args.keys)

    def stop(*_):
        gen.stopping = True
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    gen.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
