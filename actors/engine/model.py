"""The embedded engine's model side: weights and their identity, and continuous batching on an HF KV cache.

Invariants:
- Every generated token is stamped with `Engine.weight_version` at the moment it is sampled, so a
  generation that spans a weight update carries both versions (`Sequence.token_versions`).
- Each token's logprob is that of the distribution it was sampled from (raw logits for greedy;
  logits/temperature, top-k, top-p, renormalized otherwise).
- A running `Batch` is left-padded: row r's real tokens are the columns where `mask[r] == 1`; joining
  sequences (merge), finished ones leaving (select) and a retract never change any row's outputs, only
  padding, so batching is invisible in the results (tests compare with one-at-a-time greedy).
- Weight loads are all-or-nothing: a refused update leaves weights, `model_path` and `weight_version`.
- On CUDA (or with kv_cache=static) batches live in a preallocated arena and decode steps may replay CUDA
  graphs (actors/engine/static.py); the invariants above hold on both paths (tests/actors/test_engine_static.py).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from actors.engine.protocol import Sequence
from actors.engine.sampling import process_logits


@dataclass
class Batch:
    """Sequences decoding together: their KV cache, attention mask over the cache columns, the position
    and token each row feeds next (the last sampled token, not yet in the cache), and sampling params."""
    seqs: list[Sequence]
    cache: object  # transformers DynamicCache
    mask: torch.Tensor  # [B, T] long
    positions: torch.Tensor  # [B] long
    next_ids: torch.Tensor  # [B] long
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor

    def __len__(self) -> int:
        return len(self.seqs)

    def select(self, rows: list[int]) -> None:
        idx = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        for name in ("mask", "positions", "next_ids", "temperature", "top_k", "top_p"):
            setattr(self, name, getattr(self, name)[idx])
        self.seqs = [self.seqs[r] for r in rows]
        self._trim()

    def _trim(self) -> None:
        """Drop leading cache columns that are padding in every row (finished long rows left them)."""
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else self.mask.shape[1]
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def merge(self, other: "Batch") -> None:
        """Append `other`'s rows, left-padding the shorter cache so both have the same width."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width, dim=1), _pad_left(other.mask, width, dim=1)])
        for name in ("positions", "next_ids", "temperature", "top_k", "top_p"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        self.seqs = self.seqs + other.seqs


def _pad_left(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Engine:
    """The model, its weights' identity (`model_path`, `weight_version`) and the batch operations."""

    def __init__(self, model_path: str, weight_version: int, device: str = "cpu", dtype: str = "auto",
                 kv_cache: str = "auto", cuda_graph: bool = True, max_batch_size: int = 64):
        """dtype: auto (bfloat16 on CUDA, float32 elsewhere) or a DTYPES name; kv_cache: dynamic (HF cache),
        static (actors/engine/static.py; CUDA graphs there when cuda_graph) or auto (static on CUDA)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from actors.engine.protocol import DTYPES

        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"engine dtype={dtype!r}: must be auto or one of {sorted(DTYPES)}")
        if kv_cache not in ("auto", "dynamic", "static"):
            raise ValueError(f"engine kv_cache={kv_cache!r}: must be auto, dynamic or static")
        torch_dtype = DTYPES[dtype] if dtype != "auto" else torch.bfloat16 if on_cuda else torch.float32
        self.model_path, self.weight_version = str(model_path), int(weight_version)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.tokenizer_lock = threading.Lock()  # the scheduler and HTTP threads share one Rust tokenizer
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch_dtype)
        self.model.to(self.device).eval()
        self.static = self._static_decoder(kv_cache, on_cuda, cuda_graph, max_batch_size)
        cfg = self.model.config
        self.vocab_size, self.max_positions = cfg.vocab_size, cfg.max_position_embeddings
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _static_decoder(self, kv_cache: str, on_cuda: bool, cuda_graph: bool, max_batch_size: int):
        from actors.engine import static as engine_static

        reason = engine_static.unsupported_reason(self.model)
        if kv_cache == "static" and reason:
            raise ValueError(f"engine kv_cache=static: cannot serve {self.model_path}: {reason}; use kv_cache=dynamic")
        if kv_cache == "dynamic" or (kv_cache == "auto" and (not on_cuda or reason)):
            return None
        return engine_static.StaticDecoder(self, max_batch_size, cuda_graph)

    # ---- generation ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> tuple[Batch | None, int]:
        """Run the contexts (prompt + output so far) of `seqs` and sample one token each; returns the batch
        of those still running (None when all finished) and the number of tokens generated."""
        from transformers import DynamicCache

        if self.static is not None:
            return self.static.prefill(seqs)

        contexts = [s.context_ids() for s in seqs]
        width = max(map(len, contexts))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, ctx in enumerate(contexts):
            ids[row, width - len(ctx):] = torch.tensor(ctx)
            mask[row, width - len(ctx):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        dev = self.device
        batch = Batch(seqs, cache, mask, mask.sum(-1), torch.zeros(len(seqs), dtype=torch.long, device=dev),
                      torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32, device=dev),
                      torch.tensor([s.params.top_k for s in seqs], dtype=torch.long, device=dev),
                      torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32, device=dev))
        return self._sample(batch, logits), len(seqs)

    @torch.inference_mode()
    def step(self, batch: Batch) -> tuple[Batch | None, int]:
        """One decode step of every row; returns the rows still running (None when none) and tokens made."""
        if self.static is not None:
            return self.static.step(batch)
        mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
        logits = self.model(input_ids=batch.next_ids[:, None], attention_mask=mask,
                            position_ids=batch.positions[:, None], past_key_values=batch.cache,
                            use_cache=True).logits[:, -1]
        batch.mask, batch.positions = mask, batch.positions + 1
        n = len(batch)
        return self._sample(batch, logits), n

    def _sample(self, batch: Batch, logits: torch.Tensor) -> Batch | None:
        logprobs = process_logits(logits.float(), batch.temperature, batch.top_k, batch.top_p)
        tokens = logprobs.argmax(-1)
        sampled = batch.temperature > 0
        if bool(sampled.any()):
            tokens = torch.where(sampled, torch.multinomial(logprobs.exp(), 1).squeeze(1), tokens)
            for row, seq in enumerate(batch.seqs):
                if seq.generator is not None and bool(sampled[row]):
                    tokens[row] = torch.multinomial(logprobs[row].exp(), 1, generator=seq.generator)[0]
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
        batch.next_ids = tokens
        keep = [row for row, (s, t, lp) in enumerate(zip(batch.seqs, tokens.tolist(), chosen))
                if not self._append(s, t, lp)]
        if not keep:
            return None
        if len(keep) < len(batch):
            batch.select(keep)
        return batch

    def _append(self, seq: Sequence, token: int, logprob: float) -> bool:
        """Record one token; returns True (and finishes the sequence) when it ended the sequence."""
        seq.output_ids.append(token)
        seq.output_logprobs.append(logprob)
        seq.token_versions.append(self.weight_version)
        p = seq.params
        matched = self._matched_stop_string(seq) if p.stop else None
        if matched is not None:  # SGLang's order: stop strings, then stop tokens / EOS, then length
            reason = {"type": "stop", "matched": matched}
        elif not p.ignore_eos and (token in self.eos_ids or token in p.stop_token_set):
            reason = {"type": "stop", "matched": token}
        elif len(seq.output_ids) >= p.max_new_tokens:
            reason = {"type": "length", "length": seq.params.max_new_tokens}
        else:
            return False
        seq.request.finish(seq, reason)
        return True

    def _matched_stop_string(self, seq: Sequence) -> str | None:
        longest = max(map(len, seq.params.stop))
        with self.tokenizer_lock:  # a token is at least one character: the last `longest` tokens suffice
            tail = self.tokenizer.decode(seq.output_ids[-longest:], skip_special_tokens=True)
        return next((s for s in seq.params.stop if s in tail), None)

    # ---- weights ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def load_weights(self, model_path: str, weight_version: str | None) -> tuple[bool, str]:
        """Load the safetensors weights of an HF checkpoint dir in place; all-or-nothing."""
        from safetensors.torch import load_file

        files = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
        if not files:
            return False, f"model_path={model_path!r}: no *.safetensors files there; pass an HF checkpoint dir"
        try:
            state = {}
            for f in files:
                state.update(load_file(str(f)))
        except Exception as e:  # a corrupt file must not take the server down
            return False, f"model_path={model_path!r}: could not read safetensors: {e}"
        current = self.model.state_dict()
        tied = self.model.config.tie_word_embeddings and "model.embed_tokens.weight" in state
        if tied and "lm_head.weight" in current and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        missing = sorted(set(current) - set(state))
        problem = self.check_named_tensors(state)
        if missing or problem:
            return False, (f"model_path={model_path!r}: weights do not match the served model "
                           f"(missing {missing[:5]}{'; ' + problem if problem else ''})")
        # copies into the existing parameter storage (never new tensors): captured CUDA graphs stay valid
        self.model.load_state_dict({k: v.to(current[k].dtype) for k, v in state.items()}, strict=True)
        message = self._bump_version(weight_version)
        self.model_path = str(model_path)
        return True, f"loaded {len(files)} file(s) from {model_path}; {message}"

    def check_named_tensors(self, tensors: dict) -> str:
        """'' when every tensor names a parameter of the served model with its shape, else what is wrong."""
        current = self.model.state_dict()
        unexpected = sorted(set(tensors) - set(current))
        bad_shape = [k for k in tensors if k in current and tuple(tensors[k].shape) != tuple(current[k].shape)]
        if unexpected or bad_shape:
            return f"unexpected {unexpected[:5]}, wrong shape {bad_shape[:5]}"
        return ""

    @torch.inference_mode()
    def load_named_tensors(self, tensors: dict, weight_version: str | None) -> tuple[bool, str]:
        """Copy a (possibly partial: one bucket) set of named tensors into the model; all-or-nothing."""
        problem = self.check_named_tensors(tensors)
        if problem:
            return False, f"received weights do not match the served model: {problem}"
        current = self.model.state_dict()
        for name, value in tensors.items():
            current[name].copy_(value.to(current[name].dtype))
        return True, f"updated {len(tensors)} tensor(s); {self._bump_version(weight_version)}"

    def _bump_version(self, weight_version: str | None) -> str:
        old = self.weight_version
        if weight_version is not None:
            self.weight_version = int(weight_version)
        return f"weight_version {old} -> {self.weight_version}"
