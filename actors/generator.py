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
from actors.rewards import get_reward_fn
from async_rl import config as config_mod
from async_rl.hub_client import HubClient, HubTimeout
from async_rl.types import Group, Trajectory


class Generator:
    def __init__(self, cfg: config_mod.Config, generator_id: str, hub_endpoint: str, engine_url: str):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.generator_id = generator_id
        self.hub = HubClient(hub_endpoint, identity=generator_id)
        self.engine = EngineClient(engine_url)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.ckpt.hf_checkpoint)
        self.reward_fn = get_reward_fn(cfg.rollout.rm_type, cfg.rollout.custom_rm_path)
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
        n = self.cfg.rollout.n_samples_per_prompt
        prompt_ids = [self.tokenizer(p["input"])["input_ids"] for p in prompts]
        batch = [ids for ids in prompt_ids for _ in range(n)]
        t0 = time.monotonic()
        results = self.engine.generate(batch, self.sampling_params(), return_logprob=True)
        busy = time.monotonic() - t0
        groups, tokens = [], 0
        for i, prompt in enumerate(prompts):
            trajs = []
            for res in results[i * n:(i + 1) * n]:
                text = self.tokenizer.decode(res.output_ids, skip_special_tokens=True)
                trajs.append(Trajectory(
                    prompt_ids=np.asarray(prompt_ids[i], np.int32),
                    response_ids=np.asarray(res.output_ids, np.int32),
                    rollout_logprobs=np.asarray(res.output_logprobs, np.float32),
                    token_versions=np.asarray(res.token_versions, np.int32),
                    reward=self.reward_fn(prompt["input"], text, prompt["label"]),
                    finish_reason=res.finish_reason, response_text=text))
                tokens += len(res.output_ids)
            groups.append(Group(self.generator_id, self.seq, int(prompt["prompt_index"]), str(prompt["label"]),
                                trajs, prompt_text=str(prompt["input"])))
            self.seq += 1
        return groups, busy, tokens

    def run(self) -> None:
        should_stop = lambda: self.stopping  # noqa: E731
        while not self.stopping:
            try:
                reply = self.hub.request({"type": "ACQUIRE", "generator_id": self.generator_id,
                                          "max_groups": self.cfg.rollout.groups_per_engine_call},
                                         timeout=None, should_stop=should_stop)
            except HubTimeout:
                break
            if reply["type"] == "DONE":
                print(f"{self.generator_id}: hub says the run is done", flush=True)
                break
            self.sync_weights(int(reply["version"]), str(reply["weights_path"]))
            groups, busy, tokens = self.generate_groups(reply["prompts"])
            for group in groups:
                stats = {"gen_tokens": tokens // len(groups), "busy_s": busy / len(groups)}
                self.hub.put(group.to_wire(), stats, timeout=self.cfg.buffer.put_timeout, should_stop=should_stop)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="async-rl generator worker")
    ap.add_argument("--config", required=True, help="resolved config.yaml of the run")
    ap.add_argument("--hub", required=True, help="hub endpoint, e.g. tcp://127.0.0.1:5555")
    ap.add_argument("--engine-url", required=True, help="engine server URL, e.g. http://127.0.0.1:30000")
    ap.add_argument("--generator-id", default="g0")
    args = ap.parse_args(argv)
    gen = Generator(config_mod.load(args.config), args.generator_id, args.hub, args.engine_url)

    def stop(*_):
        gen.stopping = True
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    gen.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
