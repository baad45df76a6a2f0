"""The embedded engine's static-KV-cache path: preallocated memory and, on CUDA, decode steps replayed
from CUDA graphs (the GPU fast path; on CPU it runs the same code eagerly, which is what CI checks).

Invariants (on top of those of actors/engine/model.py, which this path keeps):
- The arena holds the running rows' keys/values in one [rows, kv_heads, columns, head_dim] buffer per layer,
  allocated once (regrown only when a longer context needs it). Running rows are rows [0, n), left-padded:
  every row writes its next token at the shared column `col`; `valid[r, c]` marks row r's real tokens.
  Rows >= n and columns >= col hold finite junk that no running row ever attends to.
- merge / select / trim move rows and columns inside the arena and never change any row's outputs.
- A decode step (forward, sampling, packing token + logprob) is a fixed sequence of device ops per
  (batch bucket, column bucket, top-k on, top-p on): on CUDA it is captured once per key and replayed, and
  the host reads back one [2, n] tensor per step.
- Weights only ever change by copies into the existing parameter storage (Engine.load_*), so captured
  graphs stay valid across weight swaps; a regrown arena drops its graphs.
"""
from __future__ import annotations

import importlib
import time

import torch
import torch.nn.functional as F

from actors.engine.sampling import process_logits
from actors.engine.protocol import Sequence

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
COLUMN_BLOCK = 128  # graph column buckets and arena growth are multiples of this


def unsupported_reason(model) -> str:
    """'' when the static path can run `model`, else why not."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type={cfg.model_type!r} (the static path supports {list(SUPPORTED_MODEL_TYPES)})"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "sliding-window attention layers"
    return ""


def batch_buckets(max_rows: int) -> list[int]:
    return sorted({b for b in (1, 2, 4, 8, *range(16, max_rows + 1, 16)) if b <= max_rows} | {max_rows})


def _round_up(x: int, block: int) -> int:
    return -(-x // block) * block


def sample(logprobs: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and their logprobs: argmax where temperature == 0, else a draw from exp(logprobs) by the
    exponential race (argmax p_i / E_i, E_i ~ Exp(1), picks i with probability p_i; no host sync)."""
    noise = torch.empty_like(logprobs).exponential_().clamp_(min=1e-30)
    drawn = (logprobs.exp() / noise).argmax(-1)
    tokens = torch.where(temperature > 0, drawn, logprobs.argmax(-1))
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)


class DecoderRunner:
    """A Llama-family forward pass over the HF model's own modules (so weight updates reach it) that reads
    and writes keys/values in caller-given buffers instead of an HF cache."""

    def __init__(self, model):
        inner = model.model
        self.embed, self.rotary, self.norm, self.head = inner.embed_tokens, inner.rotary_emb, inner.norm, model.lm_head
        self.layers = list(inner.layers)
        attn = self.layers[0].self_attn
        self.rope = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb
        cfg = model.config
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads

    def forward(self, ids, positions, mask, keys, values, write_cols, rows: int, cols: int) -> torch.Tensor:
        """ids/positions [rows, q]; mask [rows, 1, q, cols] bool (True = attend); the new keys/values go to
        columns `write_cols` [q] of keys[l][:rows]; returns float32 logits of the last position [rows, V]."""
        h = self.embed(ids)
        cos, sin = self.rotary(h, positions)
        for i, layer in enumerate(self.layers):
            attn_in = layer.input_layernorm(h)
            h = h + self._attention(layer.self_attn, attn_in, cos, sin, mask, keys[i][:rows], values[i][:rows],
                                    write_cols, cols)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.head(self.norm(h[:, -1])).float()

    def _attention(self, attn, x, cos, sin, mask, k_buf, v_buf, write_cols, cols: int) -> torch.Tensor:
        b, q, _ = x.shape
        shape = (b, q, -1, self.head_dim)
        qs, ks = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape)
        if hasattr(attn, "q_norm"):  # qwen3
            qs, ks = attn.q_norm(qs), attn.k_norm(ks)
        qs, ks = self.rope(qs.transpose(1, 2), ks.transpose(1, 2), cos, sin)
        k_buf.index_copy_(2, write_cols, ks)
        v_buf.index_copy_(2, write_cols, attn.v_proj(x).view(shape).transpose(1, 2))
        k_all, v_all = k_buf[:, :, :cols], v_buf[:, :, :cols]
        group = self.n_heads // self.n_kv
        if q == 1:  # decode: grouped matmuls read each kv head once (no repeat of the cache)
            scores = torch.matmul(qs.view(b, self.n_kv, group, self.head_dim), k_all.transpose(-1, -2))
            scores = (scores * self.scaling).float().masked_fill(~mask, float("-inf"))
            out = torch.matmul(scores.softmax(-1).to(v_all.dtype), v_all).view(b, self.n_heads, 1, self.head_dim)
        else:
            out = F.scaled_dot_product_attention(qs, k_all.repeat_interleave(group, 1),
                                                 v_all.repeat_interleave(group, 1), attn_mask=mask,
                                                 scale=self.scaling)
        return attn.o_proj(out.transpose(1, 2).reshape(b, q, -1))


class Arena:
    """Preallocated per-row state of the resident batch (see the module invariants)."""

    def __init__(self, runner: DecoderRunner, rows: int, cols: int, dtype, device):
        self.runner, self.rows, self.dtype, self.device = runner, rows, dtype, device
        self.n, self.col, self.owner = 0, 0, None
        z = lambda dt: torch.zeros(rows, dtype=dt, device=device)  # noqa: E731
        self.ids, self.positions, self.top_k = z(torch.long), z(torch.long), z(torch.long)
        self.temperature, self.top_p = z(torch.float32), z(torch.float32)
        self.write_col = torch.zeros(1, dtype=torch.long, device=device)
        self._allocate(cols)

    def _allocate(self, cols: int) -> None:
        shape = (self.rows, self.runner.n_kv, cols, self.runner.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.runner.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.runner.layers]
        self.valid = torch.zeros((self.rows, cols), dtype=torch.bool, device=self.device)
        self.cols = cols

    def per_row(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values, self.valid, self.ids, self.positions, self.temperature, self.top_k,
                self.top_p]

    def make_room(self, width: int, limit: int) -> bool:
        """Room for a batch `width` columns wide and the next token at `col` (trim first, then regrow up to
        `limit` columns); True when the buffers were reallocated (captured graphs are then stale)."""
        need = lambda: max(self.col + 1, width)  # noqa: E731
        if need() <= self.cols:
            return False
        self.trim()
        if need() <= self.cols:
            return False
        old_keys, old_values, old_valid = self.keys, self.values, self.valid
        self._allocate(max(_round_up(need(), COLUMN_BLOCK), min(2 * self.cols, _round_up(limit, COLUMN_BLOCK))))
        for new_bufs, old_bufs in ((self.keys, old_keys), (self.values, old_values)):
            for new, prev in zip(new_bufs, old_bufs):
                new[:, :, :self.col] = prev[:, :, :self.col]
        self.valid[:, :self.col] = old_valid[:, :self.col]
        return True

    def trim(self) -> None:
        """Drop leading columns that are padding in every running row (finished long rows left them)."""
        used = self.valid[:self.n, :self.col].any(0).nonzero()
        first = int(used[0]) if len(used) else self.col
        if first > 0:
            self._shift(-first)

    def _shift(self, d: int) -> None:
        """Move the running rows' columns by d (> 0 right, < 0 left); the new columns are padding."""
        n, src = self.n, slice(max(-d, 0), self.col)
        dst = slice(max(d, 0), self.col + d)
        for buf in (*self.keys, *self.values):
            buf[:n, :, dst] = buf[:n, :, src].clone()
        self.valid[:n, dst] = self.valid[:n, src].clone()
        self.valid[:n, :max(d, 0)] = False
        self.col += d
        self.valid[:n, self.col:] = False

    def select(self, rows: list[int]) -> None:
        moved = [(new, old) for new, old in enumerate(rows) if new != old]
        if moved:
            dst = torch.tensor([m[0] for m in moved], device=self.device)
            src = torch.tensor([m[1] for m in moved], device=self.device)
            for t in self.per_row():
                t[dst] = t[src]
        self.n = len(rows)

    def place(self, batch: "StaticBatch") -> None:
        """Copy a freshly prefilled batch into rows [n, n + len), right-aligned to the write column."""
        b, width = len(batch), batch.valid.shape[1]
        if self.n + b > self.rows:
            raise RuntimeError(f"static arena: {self.n} + {b} rows exceed max_batch_size={self.rows}")
        if self.n == 0:
            self.col = 0
        if width > self.col:
            self._shift(width - self.col)
        rows, cols = slice(self.n, self.n + b), slice(self.col - width, self.col)
        for arena_bufs, batch_bufs in ((self.keys, batch.keys), (self.values, batch.values)):
            for mine, theirs in zip(arena_bufs, batch_bufs):
                mine[rows, :, cols] = theirs
        self.valid[rows] = False
        self.valid[rows, cols] = batch.valid
        for name in ("ids", "positions", "temperature", "top_k", "top_p"):
            getattr(self, name)[rows] = getattr(batch, name)
        self.n += b


class StaticBatch:
    """The scheduler's batch on the static path. Fresh from prefill it holds its own keys/values; the first
    step or merge makes it the arena's resident batch (a batch displaced from the arena, e.g. by a new batch
    after a retract dropped it, must not be used again)."""

    def __init__(self, decoder: "StaticDecoder", seqs: list[Sequence], keys, values, valid, positions, params):
        self.decoder, self.seqs, self.resident = decoder, seqs, False
        self.keys, self.values, self.valid, self.positions = keys, values, valid, positions
        self.temperature, self.top_k, self.top_p = params
        self.ids = torch.zeros_like(positions)

    def __len__(self) -> int:
        return len(self.seqs)

    @torch.inference_mode()  # the arena's tensors are inference tensors; the scheduler calls this too
    def select(self, rows: list[int]) -> None:
        if self.resident:
            self.decoder.arena_for(self).select(rows)
        else:
            idx = torch.tensor(rows, device=self.valid.device)
            self.keys, self.values = [k[idx] for k in self.keys], [v[idx] for v in self.values]
            for name in ("valid", "positions", "ids", "temperature", "top_k", "top_p"):
                setattr(self, name, getattr(self, name)[idx])
        self.seqs = [self.seqs[r] for r in rows]

    @torch.inference_mode()
    def merge(self, other: "StaticBatch") -> None:
        arena = self.decoder.reside(self)
        self.decoder.make_room(other.valid.shape[1])
        arena.place(other)
        self.seqs = self.seqs + other.seqs


class StaticDecoder:
    """Prefill and decode steps on the arena for one Engine (`engine._append` records tokens)."""

    def __init__(self, engine, max_batch_size: int, cuda_graph: bool):
        self.engine, self.max_batch_size = engine, max_batch_size
        self.runner = DecoderRunner(engine.model)
        self.dtype = next(engine.model.parameters()).dtype
        self.cuda_graph = cuda_graph and engine.device.type == "cuda"
        self.arena: Arena | None = None
        self.buckets = batch_buckets(max_batch_size)
        self.graphs: dict = {}
        self.pool = None
        self.captures, self.capture_s = 0, 0.0  # graphs captured so far and the seconds it took (logged)

    # ---- arena ownership ----------------------------------------------------------------------------
    def arena_for(self, batch: StaticBatch) -> Arena:
        if self.arena is None or self.arena.owner is not batch:
            raise RuntimeError("static batch no longer owns the arena (a newer batch replaced it)")
        return self.arena

    def reside(self, batch: StaticBatch) -> Arena:
        """Make `batch` the arena's resident batch (copying its prefill keys/values in) and return the arena."""
        if batch.resident:
            return self.arena_for(batch)
        if self.arena is None:
            need = max(len(s.context_ids()) + s.params.max_new_tokens - len(s.output_ids) for s in batch.seqs)
            cols = _round_up(min(need, self.engine.max_positions) + 1, COLUMN_BLOCK)
            self.arena = Arena(self.runner, self.max_batch_size, cols, self.dtype, self.engine.device)
        self.arena.n, self.arena.owner = 0, batch
        self.make_room(batch.valid.shape[1])
        self.arena.place(batch)
        batch.resident, batch.keys, batch.values = True, None, None
        return self.arena

    def make_room(self, width: int) -> None:
        if self.arena.make_room(width, self.engine.max_positions + 1):
            self.graphs, self.pool = {}, None

    # ---- generation ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> tuple[StaticBatch | None, int]:
        dev, b = self.engine.device, len(seqs)
        contexts = [s.context_ids() for s in seqs]
        width = max(map(len, contexts))
        ids = torch.full((b, width), self.engine.pad_id, dtype=torch.long)
        valid = torch.zeros((b, width), dtype=torch.bool)
        for row, ctx in enumerate(contexts):
            ids[row, width - len(ctx):] = torch.tensor(ctx)
            valid[row, width - len(ctx):] = True
        ids, valid = ids.to(dev), valid.to(dev)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones((width, width), dtype=torch.bool, device=dev).tril()
        # padding queries attend to themselves only: no all-masked softmax row, so no NaN in the cache
        mask = (causal & valid[:, None, :]) | torch.eye(width, dtype=torch.bool, device=dev)
        shape = (b, self.runner.n_kv, width, self.runner.head_dim)
        keys = [torch.empty(shape, dtype=self.dtype, device=dev) for _ in self.runner.layers]
        values = [torch.empty(shape, dtype=self.dtype, device=dev) for _ in self.runner.layers]
        logits = self.runner.forward(ids, positions, mask[:, None], keys, values,
                                     torch.arange(width, device=dev), b, width)
        params = (torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32, device=dev),
                  torch.tensor([s.params.top_k for s in seqs], dtype=torch.long, device=dev),
                  torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32, device=dev))
        batch = StaticBatch(self, seqs, keys, values, valid, valid.sum(-1), params)
        logprobs = process_logits(logits, *params)
        tokens, chosen = sample(logprobs, params[0])
        return self._record(batch, logprobs, tokens, chosen, batch.ids), b

    @torch.inference_mode()
    def step(self, batch: StaticBatch) -> tuple[StaticBatch | None, int]:
        arena = self.reside(batch)
        self.make_room(0)
        n, col = arena.n, arena.col
        arena.valid[:, col] = True  # rows >= n too: padding rows of a bucket then never see an empty mask
        arena.write_col.fill_(col)
        bucket = next(x for x in self.buckets if x >= n)
        key = (bucket, _round_up(col + 1, COLUMN_BLOCK), self._cuts(batch.seqs))
        run = lambda: self._decode(*key)  # noqa: E731
        logprobs, tokens, chosen = self._replay(key, run) if self.cuda_graph else run()
        arena.col += 1
        arena.positions[:n] += 1
        return self._record(batch, logprobs[:n], tokens[:n], chosen[:n], arena.ids[:n]), n

    @staticmethod
    def _cuts(seqs: list[Sequence]) -> tuple[bool, bool]:
        sampled = [s.params for s in seqs if s.params.temperature > 0]
        return any(p.top_k > 0 for p in sampled), any(p.top_p < 1 for p in sampled)

    def _decode(self, rows: int, cols: int, cuts: tuple[bool, bool]):
        a = self.arena
        cols = min(cols, a.cols)
        logits = self.runner.forward(a.ids[:rows, None], a.positions[:rows, None], a.valid[:rows, None, None, :cols],
                                     a.keys, a.values, a.write_col, rows, cols)
        logprobs = process_logits(logits, a.temperature[:rows], a.top_k[:rows], a.top_p[:rows], *cuts)
        tokens, chosen = sample(logprobs, a.temperature[:rows])
        return logprobs, tokens, chosen

    def _replay(self, key, run):
        """Capture `run` into a CUDA graph on first use of `key`, then replay it; returns its outputs."""
        if key not in self.graphs:
            t0 = time.perf_counter()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: writes the same column the replay writes
                run()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = run()
            self.pool = graph.pool()
            self.graphs[key] = (graph, outputs)
            self.captures, self.capture_s = self.captures + 1, self.capture_s + time.perf_counter() - t0
        graph, outputs = self.graphs[key]
        graph.replay()
        return outputs

    def _record(self, batch: StaticBatch, logprobs, tokens, chosen, next_ids) -> StaticBatch | None:
        """One host sync for every row's token and logprob, seeded rows redrawn from their own generator,
        then the engine records each token; finished rows leave the batch."""
        out = torch.stack([tokens.double(), chosen.double()]).tolist()
        for row, seq in enumerate(batch.seqs):
            if seq.generator is not None and seq.params.temperature > 0:
                token = torch.multinomial(logprobs[row].exp(), 1, generator=seq.generator)
                tokens[row] = token[0]
                out[0][row], out[1][row] = int(token), float(logprobs[row, token[0]])
        next_ids.copy_(tokens)
        keep = [row for row, (s, t, lp) in enumerate(zip(batch.seqs, out[0], out[1]))
                if not self.engine._append(s, int(t), lp)]
        if not keep:
            if batch.resident:
                self.arena.n = 0
            return None
        if len(keep) < len(batch):
            batch.select(keep)
        return batch
