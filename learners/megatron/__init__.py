"""The Megatron learner (`train.train_backend: megatron`): a megatron-core GPTModel built from an HF config,
trained by the learner loop (learners.loop) and its RL math with tensor/pipeline/data parallelism on CUDA GPUs.

- `model`: HF config -> TransformerConfig + local layer spec (SDPA core attention, `attention`); forward.
- `convert`: HF <-> Megatron state dicts (GQA-interleaved QKV, fused gate/up, TP split/merge), pure.
- `weights`: load an HF checkpoint into this rank's shard; gather all shards (TP, PP) into HF on rank 0.
- `optim`: Megatron DDP + optimizer + LR schedule; `batching`: DP rows, micro-batches, token budgets.
- `backend`: the loop's backend (learners.backend) over all of the above; `learner`: the process.
- `checkpoint`: this rank's part of a resumable checkpoint; `parallel`: process groups.
megatron-core is an optional dependency (`pip install -e .[megatron]`); nothing here imports a test shim.
"""
