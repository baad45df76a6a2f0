"""async-rl: fully asynchronous, off-policy actor-learner RL post-training (shared config, wire, types, CLI)."""
__version__ = "0.1.0"
