"""Rules of the cluster section: endpoints, placement (`--cluster ray` and the local launcher's GPU
assignment, async_rl/placement.py), the supervisor's restarts. Placement reads train.actor_num_gpus_per_node and
rollout.rollout_num_gpus_per_engine against cluster.num_gpus_per_node (one bundle sits on one node): those rules
are about the cluster, so they live here; rollout's `validate` has checked rollout_num_gpus_per_engine >= 1.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from async_rl.config_rules.base import ConfigError, at_least

if TYPE_CHECKING:
    from async_rl.config import Config


def validate(cfg: "Config") -> None:
    c = cfg.cluster
    for name in ("num_engines", "num_generators", "engine_num_threads", "learner_num_threads"):
        at_least("cluster", c, name, 1)
    if not 0 <= c.hub_port < 65536:
        raise ConfigError(f"cluster.hub_port={c.hub_port}: must be a TCP port in [0, 65535] (0 = pick a free one)")
    if not 0 <= c.weights_port < 65536:
        raise ConfigError(f"cluster.weights_port={c.weights_port}: must be a TCP port in [0, 65535] (0 = pick a free one)")
    # YAML reads a bare on/off as a bool
    c.serve_weights = {"true": "on", "false": "off"}.get(str(c.serve_weights).lower(), str(c.serve_weights))
    if c.serve_weights not in ("auto", "on", "off"):
        raise ConfigError(f"cluster.serve_weights={c.serve_weights!r}: must be auto, on or off")
    if c.host in ("0.0.0.0", "::", "") and not c.advertise_host:
        raise ConfigError(f"cluster.host={c.host!r} binds every interface; set cluster.advertise_host to the address "
                         f"other hosts reach this one by (e.g. cluster.advertise_host=10.0.0.5)")
    _placement_rules(cfg)
    _supervisor_rules(c)


def _placement_rules(cfg: "Config") -> None:
    """The slime placement options that `--cluster ray` honours, and a clear no for those it cannot."""
    from async_rl import placement
    placement.check(cfg)  # cluster.engine_gpus / learner_gpus (the local launcher's GPU assignment)
    c = cfg.cluster
    at_least("cluster", c, "num_gpus_per_node", 0)
    at_least("cluster", c, "actor_num_nodes", 1)  # > 1: --cluster ray only (the local launcher refuses it)
    if c.actor_num_nodes > 1 and c.colocate:
        raise ConfigError(f"cluster.actor_num_nodes={c.actor_num_nodes} with colocate=true: colocate packs the learner "
                         f"and the engines onto one node; set colocate=false, or actor_num_nodes=1")
    if c.offload:
        raise ConfigError("cluster.offload=true: not supported: in a fully asynchronous run engines and learner work at "
                         "the same time, so there is no idle phase to offload in; set offload=false")
    if c.colocate and c.num_gpus_per_node > 0:
        raise ConfigError(f"cluster.colocate=true with num_gpus_per_node={c.num_gpus_per_node}: engines sharing the "
                         f"learner's GPUs need offload, which is not built; set colocate=false (engines get GPUs of their "
                         f"own: rollout.rollout_num_gpus)")
    for sec, obj, name in (("train", cfg.train, "actor_num_gpus_per_node"),
                           ("rollout", cfg.rollout, "rollout_num_gpus_per_engine")):
        if c.num_gpus_per_node and getattr(obj, name) > c.num_gpus_per_node:
            raise ConfigError(f"{sec}.{name}={getattr(obj, name)}: more than cluster.num_gpus_per_node="
                             f"{c.num_gpus_per_node}; one bundle sits on one node: lower it or raise num_gpus_per_node")


def _supervisor_rules(c) -> None:
    """The local launcher's supervisor (launch/supervisor.py)."""
    if c.max_restarts < -1:
        raise ConfigError(f"cluster.max_restarts={c.max_restarts}: must be >= 0, or -1 for no limit")
    at_least("cluster", c, "restart_backoff", 0)
