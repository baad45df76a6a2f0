"""The config's sections: one dataclass per component, each field a `knob` with its documentation (slime's
names for slime's concepts; `Literal[...]` annotations are a field's allowed values, checked by the loader).

Invariants: this module holds data and docs only (docs/CONFIG.md is generated from it by
`async-rl config --doc`); it imports nothing of the project. `async_rl.config` composes the sections into
`Config` and loads it; each section's cross-field rules are in `async_rl/config_rules/<section>.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def knob(default: Any, doc: str):
    """A config field with its documentation (shown by `async-rl config --doc` and docs/CONFIG.md)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ClusterConfig:
    """Where processes run and how they find each other."""
    host: str = knob("127.0.0.1", "Address every endpoint binds to (loopback for a one-machine run).")
    hub_port: int = knob(0, "Buffer hub ZeroMQ port; 0 picks a free one (written to run.json).")
    advertise_host: str = knob("", "Address other hosts use to reach this host's endpoints (hub, weight server, engines, the learner's broadcast rendezvous), recorded in run.json and handed out by the hub; empty = cluster.host. Required when cluster.host is a wildcard (0.0.0.0 / ::).")
    serve_weights: str = knob("auto", "Serve published weights in chunks over ZeroMQ (async_rl/weight_server.py) to hosts without the run dir (`async-rl attach --hub`): `auto` (when cluster.host is not loopback), `on`, `off`. The shared filesystem stays the path for processes that see the run dir.")
    weights_port: int = knob(0, "Weight server port (cluster.serve_weights); 0 picks a free one (written to run.json).")
    weights_auth: bool = knob(True, "CURVE (the run's keys, as the hub's socket) on the weight server: only key holders pull, and weights are encrypted on the wire. It costs CPU, about as much as the transfer itself: a 400 MB pull over a veth link took 1.25x a raw TCP transfer with it on a quiet machine, up to 2.2x on a busy one, under 1x without (docs/BENCHMARKS.md). false = anyone who reaches the port can download the weights; only on a trusted network. Chunks are checksummed either way.")
    num_engines: int = knob(1, "Embedded engine servers to start (`rollout_engine: embedded`).")
    num_generators: int = knob(1, "Generator workers; generator i uses engine i % num_engines.")
    engine_num_threads: int = knob(1, "torch threads per engine process.")
    learner_num_threads: int = knob(1, "torch threads in the learner process.")
    engine_cpus: list = knob([], "CPU cores engines and generators are pinned to ([] = no pinning).")
    learner_cpus: list = knob([], "CPU cores the learner is pinned to ([] = no pinning).")
    engine_gpus: list = knob([], "GPU ids the local launcher gives the engines, in turn rollout_num_gpus_per_engine each (1 for embedded engines): engine i runs with CUDA_VISIBLE_DEVICES = its ids (so engine_device=cuda is its first); [] = every GPU visible (engine_device picks). `launch --dry-run` prints the result.")
    learner_gpus: list = knob([], "GPU ids the learner runs on (its CUDA_VISIBLE_DEVICES; megatron's ranks take them in order, the torch learner its first with learner_device=cuda); [] = every GPU visible.")
    startup_timeout: float = knob(120.0, "Seconds to wait for a process to become ready before failing.")
    actor_num_nodes: int = knob(1, "Nodes the learner spans (slime's name), train.actor_num_gpus_per_node ranks on each (world size = their product). `--cluster ray` only for > 1: one bundle per learner node (one node each, STRICT_SPREAD), one Ray actor per rank (async_rl/launch/ray_ranks.py), rank 0 on the first node. The local launcher runs every rank on its host (one torchrun) and refuses > 1.")
    num_gpus_per_node: int = knob(0, "GPUs per node of the Ray cluster (slime's name); 0 = a CPU cluster: `--cluster ray` bundles ask for CPUs only (learner_num_threads, engine_num_threads). Else the learner's bundle takes train.actor_num_gpus_per_node GPUs and each engine's rollout.rollout_num_gpus_per_engine.")
    shared_run_dir: bool = knob(True, "`--cluster ray`: every node sees the run dir at the same path. false: only the node that runs `launch` has it; the hub, learner and weight server run there, and each engine's bundle runs `async-rl attach --hub` (engine + generator, weights pulled over the network, async_rl/launch/ray_remote.py). Needs cluster.host reachable from the other nodes, buffer.auth and update_weight_mode=disk.")
    colocate: bool = knob(False, "Put engines on the learner's node (slime's name): `--cluster ray` packs every bundle onto one node (STRICT_PACK). Sharing the learner's GPUs needs offload, which is not built, so with num_gpus_per_node > 0 it is refused.")
    offload: bool = knob(False, "Offload engine and learner GPU memory between generation and training (slime's name). Not supported: in a fully asynchronous run engines and learner work at the same time; leave false.")
    max_restarts: int = knob(3, "Times the local launcher's supervisor restarts each dead process over a run (Ray's actor option name): the hub from its WAL on the same port, an engine on its port (then re-synced to the current weights), a generator under a new incarnation id, the learner from its newest checkpoint (exact at any ckpt.save_interval: the hub replays the batches trained since). 0 = a dead process fails the run; -1 = no limit. Engines restarted by their generator (use_fault_tolerance) are not counted here.")
    restart_backoff: float = knob(1.0, "Seconds between a process's death and its first restart; doubles with each further restart of that process (at most 30 s).")


@dataclass
class CkptConfig:
    """Model checkpoints in and out."""
    hf_checkpoint: str = knob("", "HF checkpoint dir (model + tokenizer) the run starts from. Required.")
    keep_weight_versions: int = knob(3, "Published weight versions kept under run_dir/weights/ (older are deleted).")
    ref_load: str = knob("", "HF checkpoint dir of the reference model for KL (kl_coef / use_kl_loss); empty = hf_checkpoint.")
    ref_update_interval: int = knob(0, "Learner steps between copies of the current policy into the reference model; 0 = never.")
    save_interval: int = knob(50, "Learner steps between resumable checkpoints in run_dir/checkpoints/step_N (model, optimizer, RNG, version, hub lease); 0 = only when the run ends or is stopped. The hub keeps the batches trained since the last checkpoint (at most save_interval x rollout_batch_size groups, in memory and in its snapshots) so a learner restarted from it retrains them exactly; 0 keeps every batch of the run.")
    keep_checkpoints: int = knob(2, "Complete learner checkpoints kept (older are deleted).")


@dataclass
class RolloutConfig:
    """Generation: how many samples, how long, how they are drawn, and how often weights move."""
    rollout_engine: Literal["embedded", "sglang"] = knob("embedded", "Engine server: `embedded` (torch + transformers; CPU, small GPU jobs, tests) or `sglang` (`python -m sglang.launch_server`, GPUs; `pip install .[sglang]`).")
    engine_device: str = knob("cpu", "rollout_engine=embedded: torch device of each engine (`cpu`, `cuda`, `cuda:N`).")
    engine_dtype: Literal["auto", "float32", "bfloat16", "float16"] = knob("auto", "rollout_engine=embedded: weight/activation dtype: `auto` (bfloat16 on CUDA, float32 on CPU), `float32`, `bfloat16`, `float16`.")
    engine_kv_cache: Literal["auto", "dynamic", "static"] = knob("auto", "rollout_engine=embedded: `dynamic` (HF cache, any causal LM), `static` (preallocated arena + on-device sampling, Llama/Qwen2/Qwen3/Mistral; actors/engine/static.py) or `auto` (static on CUDA when the model is supported, else dynamic).")
    engine_max_batch_size: int = knob(64, "rollout_engine=embedded: most sequences one engine decodes together (its --max-batch-size); more queue. Raise it with sglang_server_concurrency on a GPU.")
    engine_cuda_graph: bool = knob(True, "rollout_engine=embedded, static KV cache on CUDA: replay decode steps from CUDA graphs captured per (batch, context) bucket; false = run them eagerly.")
    sglang_python: str = knob("", "rollout_engine=sglang: Python interpreter that runs SGLang (its own venv when it pins another torch); empty = this one. CPU tests: scripts/sglang_cpu/python.")
    sglang_server_args: list = knob([], "rollout_engine=sglang: options forwarded verbatim to every SGLang server (slime's --sglang-*), e.g. [\"--mem-fraction-static 0.8\", \"--max-running-requests 256\"]; --model-path/--host/--port/--tp-size/--weight-version are set by the launcher.")
    rollout_num_gpus: int = knob(0, "rollout_engine=sglang: GPUs for generation; engines = rollout_num_gpus / rollout_num_gpus_per_engine (0 = cluster.num_engines engines).")
    rollout_num_gpus_per_engine: int = knob(1, "rollout_engine=sglang: GPUs per SGLang server (its --tp-size).")
    rollout_external_engine_addrs: list = knob([], "Addresses (host:port or http://host:port) of engines already running (SGLang or embedded); when set, no engine is started and generator i uses engine i % len.")
    sglang_server_concurrency: int = knob(64, "Most samples a generator keeps in flight on one engine (its engine calls run concurrently up to this; at least one call).")
    interrupt_mode: Literal["none", "in_place", "retract", "abort"] = knob("in_place", "What a generator does to in-flight requests when new weights are published: `none` (no interruption: an update waits until the engine's in-flight requests finish, new ones wait behind it), `in_place` (pause, swap weights, continue; KV cache kept, PipelineRL), `retract` (pause, swap, continue; the engine recomputes the KV under the new weights), `abort` (abort, swap, resubmit: from the tokens so far with partial_rollout, else from scratch). Every token carries the version that produced it.")
    partial_rollout: bool = knob(True, "interrupt_mode=abort: resubmit an interrupted sample with its tokens so far (kept, with their versions and logprobs); false = restart it from scratch under the new weights.")
    mask_offpolicy_in_partial_rollout: bool = knob(False, "Send a per-token loss_mask that zeroes the tokens produced by an older version than the sample's last token (only tokens of the newest version are trained on).")
    weight_poll_interval: float = knob(1.0, "Seconds between a generator's checks of the hub for a newer weight version (with interrupt_mode != none, in-flight requests are interrupted at most this long after a publication).")
    update_weight_buffer_size: int = knob(512 * 2**20, "Bytes per bucket when weights are broadcast to engines (/update_weights_from_distributed; slime's --update-weight-buffer-size).")
    update_weight_mode: Literal["disk", "broadcast", "tensor"] = knob("disk", "How the run's engines get each published version: `disk` (the learner writes run_dir/weights/v{N}, generators make their engines load it: /update_weights_from_disk) or `broadcast` (the learner sends the tensors straight into every engine of the run over a torch process group, gloo on CPU / NCCL on GPU, in update_weight_buffer_size buckets, pausing per interrupt_mode; generators then load from disk only for an engine that missed it, e.g. a restarted one) or `tensor` (engines on the learner's machine, e.g. one GPU shared by learner and engine: the learner hands each engine CUDA IPC / shared-memory handles to a staging copy of its weights and the engine copies them, SGLang's /update_weights_from_tensor; the disk copy is written in the background). All three write every version to disk (eval, restarts, late joiners).")
    use_fault_tolerance: bool = knob(False, "Health-check every engine (/health_generate); a dead or hung one is killed, restarted, re-synced to the current weights, and its in-flight prompts re-issued (none lost, none duplicated).")
    rollout_health_check_interval: float = knob(10.0, "use_fault_tolerance: seconds between health checks of an engine.")
    rollout_health_check_timeout: float = knob(30.0, "use_fault_tolerance: seconds a health check may take before the engine counts as hung.")
    rollout_health_check_first_wait: float = knob(0.0, "use_fault_tolerance: seconds after an engine (re)starts before its first health check.")
    custom_generate_function_path: str = knob("", "Dotted path of an async fn(ctx: actors.custom_generate.GenerateContext, prompt: dict) -> async_rl.types.Trajectory that generates one sample (several turns, tool calls); its loss_mask must cover model-generated tokens only. Built-in example: actors.tools.calculator_generate.")
    rollout_function_path: str = knob("", "Dotted path of fn(generator: actors.generator.Generator, prompts: list[dict]) -> list[async_rl.types.Group] replacing the whole rollout of one engine call (unscored groups; rewards and filters still apply).")
    custom_config_path: str = knob("", "YAML file of `key: value` settings (slime's --custom-config-path), read once at launch into custom_config: keys that name config fields (bare, dotted, or a section map) set them, after the YAML and the key=value words; every other key is a setting for the run's plug-ins, which read them with async_rl.plugins.custom_config(). Empty = none.")
    custom_config: dict = knob({}, "The content of custom_config_path (filled at launch and kept in run_dir/config.yaml, so every process and host sees the same settings); may also be written here as a map.")
    rollout_batch_size: int = knob(8, "Prompts (groups) consumed per learner step.")
    n_samples_per_prompt: int = knob(8, "Responses generated per prompt (a group, for GRPO).")
    global_batch_size: int = knob(0, "Samples per optimizer step; 0 = rollout_batch_size * n_samples_per_prompt / num_steps_per_rollout.")
    num_steps_per_rollout: int = knob(1, "Optimizer steps per learner step (each on global_batch_size samples).")
    micro_batch_size: int = knob(0, "Samples per forward/backward (gradient accumulation); 0 = global_batch_size.")
    num_rollout: int = knob(50, "Learner steps to run; the run ends after this many. 0 = num_epoch passes over the prompt data (num_epoch * prompts // rollout_batch_size steps, resolved at launch).")
    num_epoch: int = knob(1, "With num_rollout=0: passes over the prompt data (after the rollout_max_prompt_len filter) that make up the run.")
    rollout_max_response_len: int = knob(8, "Max new tokens per response (SGLang's max_new_tokens).")
    rollout_max_context_len: int = knob(0, "Max tokens of prompt plus response in generation (slime's): every request's max_new_tokens is cut to this minus its prompt's length (evals too), and with data.rollout_max_prompt_len=0 prompts longer than this - 1 are dropped at load (so each sample has at least one response token); must not exceed max_position_embeddings of ckpt.hf_checkpoint's config.json. A custom generate function reads it from ctx.cfg to budget its turns. 0 = no limit (rollout_max_response_len alone bounds a response).")
    rollout_temperature: float = knob(1.0, "Sampling temperature (the learner scales logits by it too).")
    rollout_top_p: float = knob(1.0, "Top-p (nucleus) sampling.")
    rollout_top_k: int = knob(-1, "Top-k sampling; -1 disables.")
    rollout_stop_token_ids: list = knob([], "Extra token ids that end a response (EOS always does).")
    rollout_stop: list = knob([], "Stop strings: a response ends once its decoded text contains one (SGLang's `stop`; the embedded engine checks the decoded tail), e.g. [\"</answer>\"]; also in evals.")
    update_weights_interval: int = knob(1, "Learner steps between weight publications (version v -> v+1).")
    groups_per_engine_call: int = knob(4, "Groups a generator batches into one /generate call.")
    rm_type: Literal["exact_match", "math", "dapo", "deepscaler", "f1", "gpqa", "remote_rm"] = knob("exact_match", "Built-in reward (actors/rm_hub): `exact_match` (stripped response == label), `math` (last \\boxed{} answer equivalent to the label: 1/0), `dapo` (DAPO: text after the last `Answer:`, +1/-1), `deepscaler` (boxed answer after `</think>`: 1/0), `f1` (SQuAD token F1), `gpqa` (multiple-choice letter A-D: 1/0), `remote_rm` (HTTP POST to rm_url).")
    custom_rm_path: str = knob("", "Dotted path `module.fn` of a reward fn(prompt: str, response: str, label) -> float | dict; overrides rm_type. With group_rm: fn(prompt: str, responses: list[str], label) -> list[float | dict].")
    rm_url: str = knob("", "rm_type=remote_rm: URL the generator POSTs JSON {prompt, response, label} to; the reply is a number or a map such as {\"reward\": 0.7}.")
    rm_timeout: float = knob(30.0, "rm_type=remote_rm: seconds to wait for one reply before retrying.")
    rm_max_retries: int = knob(3, "rm_type=remote_rm: retries after a failed try (exponential backoff from 0.5 s); then the generator fails with the last error.")
    group_rm: bool = knob(False, "Score all n_samples_per_prompt responses of a prompt in one call to custom_rm_path (required).")
    reward_key: str = knob("", "When a reward fn returns a dict, the entry used as the scalar reward; empty = `reward`, else `score`. The dicts are kept in the group's meta `reward_details`.")
    custom_reward_post_process_path: str = knob("", "Dotted path of fn(rewards: list[float], group: async_rl.types.Group) -> list[float], applied to each group's rewards before it is sent (the raw ones stay in meta `raw_rewards`).")
    dynamic_sampling_filter_path: str = knob("", "Dotted path of fn(group: async_rl.types.Group) -> bool (False drops the scored group before it is sent; its credit goes back to the hub). Built-in: `actors.filters.reward_std_positive` (drop groups whose rewards are all equal).")
    over_sampling_batch_size: int = knob(0, "Groups a generator asks the hub for per ACQUIRE when a dynamic sampling filter drops some; 0 = groups_per_engine_call.")


@dataclass
class DataConfig:
    """Prompt data (dispensed by the hub, so generators never duplicate or skip a prompt)."""
    prompt_data: str = knob("", "Prompt file: JSONL (.jsonl/.json) or Parquet (.parquet). Required.")
    input_key: str = knob("input", "Key of the prompt: a string, or OpenAI-style messages [{role, content}] with apply_chat_template.")
    label_key: str = knob("label", "Key of the label the reward is checked against.")
    metadata_key: str = knob("", "Key of per-prompt metadata (a map) passed along with the prompt; empty = none.")
    tool_key: str = knob("", "Key of per-prompt tool specs (a list) for apply_chat_template(tools=...) and custom generate functions; empty = none.")
    apply_chat_template: bool = knob(False, "Render each prompt with the tokenizer's chat template (input as messages, or a string taken as one user message), with add_generation_prompt.")
    apply_chat_template_kwargs: str = knob("", "Extra keyword arguments of apply_chat_template as a YAML/JSON map, e.g. '{enable_thinking: false}'.")
    rollout_max_prompt_len: int = knob(0, "Drop prompts longer than this many tokens when the data is loaded (the count is logged); 0 = keep all.")
    rollout_shuffle: bool = knob(True, "Shuffle prompts each epoch.")
    rollout_seed: int = knob(42, "Seed of the prompt shuffle.")


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy accuracy (the rollout reward) at the start and end of a run, and pass@k every
    eval_interval versions while it trains (a separate eval worker with its own engine; training never waits)."""
    eval_prompt_data: list = knob([], "Eval sets as name/path pairs, e.g. [add, runs/tiny/data/test.jsonl, hard, data/hard.jsonl] (JSONL, same keys as data), or one path (named by its file stem); empty disables evaluation.")
    eval_interval: int = knob(0, "Evaluate every version that is a multiple of this (and v0) on every eval set, in the background (actors/eval_worker.py), logging eval/<name>/pass@k to run_dir/eval.jsonl and metrics.jsonl; 0 = only the start and end greedy evals.")
    n_samples_per_eval_prompt: int = knob(1, "Responses per eval prompt in the eval_interval evals; pass@k is logged for k = 1, 2, 4, ... <= this.")
    eval_temperature: float = knob(0.0, "Sampling temperature of the eval_interval evals (0 = greedy; set > 0 with n_samples_per_eval_prompt > 1). The start/end evals are always greedy.")
    eval_top_p: float = knob(1.0, "Top-p of the eval_interval evals.")
    eval_top_k: int = knob(-1, "Top-k of the eval_interval evals; -1 disables.")
    eval_max_prompts: int = knob(200, "Eval prompts used per evaluation.")
    eval_max_response_len: int = knob(0, "Max new tokens in evaluation; 0 = rollout_max_response_len.")
    eval_input_key: str = knob("", "Key of the prompt in the eval files; empty = data.input_key.")
    eval_label_key: str = knob("", "Key of the label in the eval files; empty = data.label_key.")
    eval_tool_key: str = knob("", "Key of per-prompt tool specs in the eval files; empty = data.tool_key.")
    eval_reward_key: str = knob("", "When the reward fn returns a dict, the entry evals score by; empty = rollout.reward_key.")
    eval_function_path: str = knob("", "Dotted path of the async fn(ctx: actors.custom_generate.GenerateContext, prompt: dict) -> async_rl.types.Trajectory that generates each eval response (the signature of rollout.custom_generate_function_path; ctx.sampling_params are the eval's); empty = rollout.custom_generate_function_path when set (as slime defaults to the rollout's), else one plain /generate call per response. Unlike slime's, it generates one sample, not a whole eval rollout; a rollout.rollout_function_path does not apply to evals.")


@dataclass
class AlgoConfig:
    """RL math: advantages, policy loss, KL, off-policy correction (slime's names; formulas in learners/)."""
    advantage_estimator: Literal["grpo", "gspo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"] = knob("grpo", "`grpo` (group-normalised reward), `gspo` (grpo advantages, sequence-level PPO ratio exp(mean token log ratio)), `reinforce_plus_plus` (discounted token returns with KL-shaped rewards, whitened over the batch), `reinforce_plus_plus_baseline` (reward minus group mean, whitened), `ppo` (GAE with gamma/lambd against a critic trained in the learner).")
    disable_grpo_std_normalization: bool = knob(False, "grpo/gspo: subtract the group mean but do not divide by the group reward std.")
    disable_rewards_normalization: bool = knob(False, "grpo/gspo/reinforce_plus_plus_baseline: use raw rewards (no group mean/std normalisation).")
    disable_compute_advantages_and_returns: bool = knob(False, "Skip advantages (all zero); only for loss_type sft_loss or custom_loss.")
    normalize_advantages: bool = knob(False, "Whiten advantages over the batch's response tokens (reinforce_plus_plus* always do).")
    gamma: float = knob(1.0, "Discount of reinforce_plus_plus returns and ppo GAE.")
    lambd: float = knob(1.0, "GAE lambda (ppo).")
    loss_type: Literal["policy_loss", "sft_loss", "custom_loss"] = knob("policy_loss", "`policy_loss` (PPO clip x importance weight, - entropy, + KL loss), `sft_loss` (NLL of responses), `custom_loss` (custom_loss_function_path).")
    custom_loss_function_path: str = knob("", "Dotted path of fn(logp, batch, algo) -> (loss, metrics) for loss_type custom_loss. logp [B, T] current-policy logprobs of the targets (with grad); batch: dict of [B, T] tensors of the micro-batch (mask, logp_old, rollout_logprobs, advantages, and when present returns, values, ref_logp, tis_weights; plus logits [B, T, V] before temperature, and token_denominator: float or None); algo: this section. Return a scalar loss reduced like learners.losses.masked_mean(x, mask, algo.calculate_per_token_loss, batch['token_denominator']) and a dict of float metrics.")
    eps_clip: float = knob(0.2, "PPO clip range (lower, and upper unless eps_clip_high is set).")
    eps_clip_high: float = knob(0.0, "PPO upper clip range; 0 = eps_clip.")
    eps_clip_c: float = knob(0.0, "Dual-clip PPO: cap a negative-advantage token's loss at -eps_clip_c * A; must be > 1; 0 disables.")
    calculate_per_token_loss: bool = knob(False, "Average the loss over all tokens of the global batch instead of per sample then over samples.")
    entropy_coef: float = knob(0.0, "policy_loss: subtract entropy_coef * (entropy of the current policy over response tokens).")
    kl_coef: float = knob(0.0, "Reward shaping: every response token's reward gets -kl_coef * KL(pi_old || pi_ref) (kl_loss_type estimator) before advantages, under reinforce_plus_plus, reinforce_plus_plus_baseline and ppo. Ignored under grpo/gspo, as in slime, unless grpo_kl_reward_shaping is set. Loads a reference model when it is used.")
    grpo_kl_reward_shaping: bool = knob(False, "grpo/gspo: apply kl_coef reward shaping (advantage - kl_coef * KL per token) too; slime ignores kl_coef there. For a KL penalty under grpo, slime's way is use_kl_loss + kl_loss_coef.")
    use_kl_loss: bool = knob(False, "policy_loss: add kl_loss_coef * KL(pi || pi_ref) to the loss (and log it). Loads a reference model.")
    kl_loss_coef: float = knob(0.0, "Weight of the KL loss (needs use_kl_loss); cannot be combined with kl_coef.")
    kl_loss_type: Literal["k1", "k2", "k3", "low_var_kl"] = knob("k1", "KL estimator for the KL loss and kl_coef shaping: `k1`, `k2`, `k3`, `low_var_kl` (k3 clamped to [-10, 10]).")
    use_tis: bool = knob(True, "Importance-weight each token's policy-gradient term by pi_old/pi_behavior (decoupled PPO: pi_old is the learner's recomputation, pi_behavior the engine's logprobs).")
    tis_clip: float = knob(2.0, "Upper bound C of the importance ratio (truncate clamps to it, mask drops tokens above it).")
    tis_clip_low: float = knob(0.0, "Lower bound of the importance ratio.")
    tis_level: Literal["token", "sequence_product", "sequence_geometric"] = knob("token", "Importance ratio per `token`, or per sample: `sequence_product` (product of token ratios) or `sequence_geometric` (their geometric mean).")
    tis_mode: Literal["truncate", "mask"] = knob("truncate", "`truncate` (TIS: clamp the ratio into [tis_clip_low, tis_clip]) or `mask` (MIS/IcePop: zero tokens, or whole samples at sequence levels, whose ratio leaves that band).")
    custom_tis_function_path: str = knob("", "Dotted path of fn(logp_old, logp_behavior, mask, algo) -> weights, all [B, T] float tensors (weights multiply each token's pg term; return 0 to drop a token); replaces tis_level/tis_mode. Needs use_tis.")
    rollout_data_postprocess_path: str = knob("", "Dotted path of fn(cfg, step: int, batch: learners.batch.TrainBatch) -> None that edits each learner step's batch in place (slime's --rollout-data-postprocess-path, e.g. to change the loss mask): it runs once logp_old, ref_logp, values and advantages are filled ([B, T-1] tensors on response-predicting positions), before importance weights and the loss; mask, advantages, returns and rewards must keep their shapes. The batch is this learner step's (rollout_batch_size groups), not a whole synchronous rollout.")
    use_rollout_logprobs: bool = knob(False, "Use the engine's logprobs as logp_old (no recomputation; the importance weight is then 1).")
    value_clip: float = knob(0.2, "ppo critic: clip of the value update around the old value.")
    critic_lr: float = knob(0.0, "ppo critic learning rate; 0 = optimizer.lr.")
    num_critic_only_steps: int = knob(0, "ppo: learner steps at the start that train only the critic (the policy waits for a useful baseline).")
    log_passrate: bool = knob(False, "Log pass@k (k = 1, 2, 4, ... <= n_samples_per_prompt; unbiased estimator; a sample passes when its reward >= 1) every learner step.")


@dataclass
class OptimizerConfig:
    """The learner's optimizer (AdamW)."""
    optimizer: Literal["adam"] = knob("adam", "`adam` (AdamW).")
    lr: float = knob(1e-3, "Learning rate.")
    weight_decay: float = knob(0.0, "Decoupled weight decay.")
    adam_beta1: float = knob(0.9, "Adam beta1.")
    adam_beta2: float = knob(0.95, "Adam beta2 (slime's default).")
    adam_eps: float = knob(1e-8, "Adam epsilon.")
    clip_grad: float = knob(1.0, "Max global grad norm; 0 disables clipping.")
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root"] = knob("constant", "megatron: learning-rate schedule after warmup over all optimizer steps (num_rollout * num_steps_per_rollout): `constant`, `linear`, `cosine` or `inverse-square-root` (down to min_lr).")
    lr_warmup_iters: int = knob(0, "megatron: optimizer steps of linear warmup from 0 to lr.")
    warmup_ratio: float = knob(0.0, "megatron: warmup as a fraction of all optimizer steps (instead of lr_warmup_iters).")
    min_lr: float = knob(0.0, "megatron: learning rate at the end of a decaying schedule.")


@dataclass
class BufferConfig:
    """The buffer hub: staleness bound and admission."""
    max_staleness: int = knob(2, "Max (learner version - behavior version) of any trained trajectory; 0 = synchronous on-policy.")
    selector: Literal["fifo", "lifo", "uniform", "prioritized"] = knob("fifo", "How SAMPLE picks groups: `fifo`, `lifo`, `uniform`, or `prioritized` (probability proportional to priority ** alpha).")
    priority_fn: str = knob("constant", "Priority of a new group: `constant`, `reward_variance` (groups whose rewards all agree teach nothing under GRPO), `freshness`, `response_length`, or a dotted path to fn(group, version) -> float >= 0.")
    alpha: float = knob(1.0, "Priority exponent of the prioritized selector (0 = uniform).")
    remover: Literal["fifo", "lifo", "min_priority"] = knob("fifo", "What is evicted when the table is at capacity: `fifo`, `lifo` or `min_priority`.")
    capacity: int = knob(0, "Max groups held; 0 = unbounded (admission credits already bound the table).")
    max_times_sampled: int = knob(1, "Times a group is handed to the learner before it is retired (1 = each group trained on once).")
    priority_update: str = knob("none", "What the learner sends back as each trained group's new priority (by key, after its step; needs max_times_sampled > 1 to matter): `none`, `abs_advantage` (mean |advantage| over the group's trained tokens), or a dotted path to fn(group, advantages) -> float >= 0, advantages being one float array per trajectory over its trained response tokens.")
    put_timeout: float = knob(10.0, "Seconds a client waits for the hub's reply before reconnecting and resending (requests are idempotent).")
    auth: bool = knob(True, "CURVE authentication + encryption on the hub's socket (keys in run_dir/keys); turn off only for a loopback run.")
    fsync: Literal["always", "batch", "never"] = knob("batch", "WAL fsync policy: `always` (each record), `batch` (once per hub loop iteration, before its replies), `never` (OS decides; survives a killed hub, not a machine crash).")
    snapshot_interval: int = knob(2000, "WAL records between hub snapshots (restart replays at most this many).")
    keep_snapshots: int = knob(2, "Complete hub snapshots kept on disk.")
    generator_timeout: float = knob(60.0, "Seconds without any message from a generator before its credits are returned.")
    heartbeat_interval: float = knob(2.0, "Seconds between a generator's heartbeats to the hub.")
    max_message_bytes: int = knob(256 * 2**20, "Largest message the hub accepts; bigger ones are refused by ZeroMQ (peer disconnected).")


@dataclass
class LoggingConfig:
    """Where metrics go."""
    progress: bool = knob(True, "Live progress line on the console.")
    use_wandb: bool = knob(False, "Log metrics to Weights & Biases.")
    wandb_mode: Literal["offline", "disabled", "online"] = knob("offline", "`offline` or `disabled` (no network here); `online` needs network.")
    wandb_project: str = knob("async-rl", "W&B project name.")
    use_tensorboard: bool = knob(False, "Write TensorBoard event files to run_dir/tensorboard (/tb_project_name/tb_experiment_name when set).")
    wandb_group: str = knob("", "W&B group of the run (slime's --wandb-group); empty = none.")
    wandb_run_id: str = knob("", "W&B run id; the same id again continues that W&B run (resume='allow'); empty = a new id.")
    wandb_dir: str = knob("", "Directory W&B writes its files to; empty = the run directory.")
    wandb_team: str = knob("", "W&B entity (team or user) the run is logged under; empty = your default.")
    wandb_host: str = knob("", "W&B server URL (a self-hosted one); empty = W&B's default.")
    wandb_key: str = knob("", "W&B API key (else the WANDB_API_KEY environment variable or `wandb login`); it is written to config.yaml, so prefer the variable.")
    tb_project_name: str = knob("", "With use_tensorboard: a subdirectory of run_dir/tensorboard for the project.")
    tb_experiment_name: str = knob("", "With use_tensorboard: a subdirectory (under tb_project_name) for this run.")


@dataclass
class TrainConfig:
    """The learner process."""
    train_backend: Literal["torch", "megatron"] = knob("torch", "`torch` (HF model, CPU or GPU) or `megatron` (megatron-core GPTModel built from the HF config, Llama/Qwen2/Qwen3; CUDA GPUs: `pip install -e .[megatron]`).")
    seed: int = knob(1234, "Seed of model-side randomness (learner and engines).")
    actor_num_gpus_per_node: int = knob(1, "Learner processes (one per GPU) on each learner node (cluster.actor_num_nodes; 1 under the local launcher). megatron: data parallel size = this x actor_num_nodes / (tensor * pipeline * context parallel sizes). torch: FSDP2 data-parallel ranks (learners/fsdp.py; NCCL, one GPU each, with learner_device=cuda; gloo ranks on the CPU with learner_device=cpu); rank 0 talks to the hub.")
    tensor_model_parallel_size: int = knob(1, "megatron: GPUs each layer's weights are split across (TP); must divide the attention and KV head counts.")
    pipeline_model_parallel_size: int = knob(1, "megatron: pipeline stages (PP): Megatron's 1F1B schedule over the micro-batches (stages exchange activation shapes, so dynamic micro-batches work); weights convert and gather per stage.")
    context_parallel_size: int = knob(1, "megatron: GPUs a sequence is split across (CP); needs Transformer Engine attention, so only 1 for now.")
    sequence_parallel: bool = knob(False, "megatron: shard activations along the sequence within TP; needs Transformer Engine or apex layer norms, so only false for now.")
    use_dynamic_batch_size: bool = knob(False, "Both backends: form micro-batches by a token budget (max_tokens_per_gpu, padded tokens) instead of micro_batch_size samples; each micro-batch is cut to its longest row.")
    max_tokens_per_gpu: int = knob(0, "Both backends: token budget of one training micro-batch per GPU (rows x longest row) with use_dynamic_batch_size.")
    log_probs_max_tokens_per_gpu: int = knob(0, "Both backends: token budget of one logprob-recomputation micro-batch with use_dynamic_batch_size; 0 = max_tokens_per_gpu.")
    balance_data: bool = knob(False, "Both backends: deal each global batch's samples to data-parallel ranks so their token counts are balanced (equal sample counts), instead of in order.")
    recompute_granularity: Literal["", "full", "selective"] = knob("", "megatron activation recomputation: `` (off), `full` (whole layers; recompute_method + recompute_num_layers) or `selective` (core attention only).")
    recompute_method: Literal["", "uniform", "block"] = knob("", "megatron, recompute_granularity=full: `uniform` (every recompute_num_layers layers as a unit) or `block` (the first recompute_num_layers layers of each stage).")
    recompute_num_layers: int = knob(0, "megatron, recompute_granularity=full: layers per recompute unit (uniform) or layers recomputed (block).")
    distributed_timeout_minutes: float = knob(10.0, "megatron: minutes a collective of the learner's process groups (the default group, Megatron's model-parallel groups, the gloo groups for objects and pipeline stages) may wait for a rank before it fails (slime's --distributed-timeout-minutes, its default 10); the failed rank exits and the launcher's supervisor restarts the learner (cluster.max_restarts). Fractions are allowed (slime takes whole minutes). The weight-broadcast group to engines keeps its own, shorter, limit: max(60 s, cluster.startup_timeout).")
    bf16: bool = knob(False, "GPU only. megatron: bf16 parameters and activations with fp32 main weights, gradients and Adam states (Megatron's mixed-precision optimizer). torch: bf16 autocast of the forward passes (fp32 weights and AdamW). false = fp32.")
    gradient_checkpointing: bool = knob(False, "torch: recompute each decoder layer's activations in the backward pass (HF gradient checkpointing; slime's FSDP name): less activation memory for ~1/3 more compute. megatron: use recompute_granularity.")
    fsdp_cpu_offload: bool = knob(False, "torch learner on GPU, at any actor_num_gpus_per_node (at 1 the learner runs as FSDP2 over one rank under torchrun): keep the sharded parameters, gradients and AdamW states in host memory (FSDP2 CPUOffloadPolicy; the optimizer steps on the CPU), copying each layer to the GPU for its forward/backward; slime's `optimizer=deepspeed_cpu_adam` does the same.")
    learner_device: str = knob("cpu", "train_backend=torch: torch device of the learner (`cpu`, `cuda`, `cuda:N`); the megatron backend always uses its rank's GPU.")


@dataclass
class DebugConfig:
    """slime's debug modes: isolate generation or training, record what a run trains on (async_rl/debug.py)."""
    debug_rollout_only: bool = knob(False, "Generate and store, train nothing: a sink process takes the batches from the hub in place of the learner (acks them, writes them with save_debug_rollout_data), weights stay at version 0.")
    debug_train_only: bool = knob(False, "Train from load_debug_rollout_data, start no engine or generator: a feeder process puts each saved batch into the hub once the learner is at the version that batch was trained at, so the learner trains on exactly the saved batches, in their order, at their staleness.")
    load_debug_rollout_data: str = knob("", "debug_train_only: the groups to train on, as written by save_debug_rollout_data (the same template with {rollout_id}, or the directory).")
    save_debug_rollout_data: str = knob("", "Write every batch the learner (or the debug_rollout_only sink) takes from the hub: a path template with {rollout_id} (the learner step, e.g. dbg/rollout_{rollout_id}.msgpack) or a directory (rollout_{rollout_id}.msgpack in it).")
    dump_details: str = knob("", "Directory for per-step details of training, for offline inspection: each step's tokens, loss mask, rewards, advantages, logprobs (engine, recomputed) and TIS weights (step_{N}.pt, torch.load-able); empty = off.")
