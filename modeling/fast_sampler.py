"""Fast sampling from a trained ReAR: the tokens of `ReAR.generate`, from a hot loop designed for speed.

`ReAR.generate` is the readable sampler. This one reorganises the same computation (gpt-fast's recipe):
- a static KV cache: every layer's keys and values for the whole sequence, allocated once and written in place
  at the current position; positions not written yet are masked out, so every step has the same shapes
  (which CUDA graphs need). The prefix [cls, class] runs as two such steps, one position each;
- per step only the newest token is embedded. Everything that depends only on the class and the position is
  computed once per call: the positional tables and the adaLN modulations of every block and of the head
  (c = class embedding + timestep embedding; the null class's rows are shared by the whole batch);
- the conditional and null-class halves of classifier-free guidance run as one batch, and the guidance scales
  of all steps come from `cfg_scale_at` once, before the loop;
- on CUDA the decode step is captured in a CUDA graph (optionally torch.compile'd first) and can run in bf16.
The random stream is `ReAR.generate`'s: one `torch.rand` of shape (B,), then one `torch.multinomial` per step,
so on a CPU in float32 the tokens equal the plain sampler's for a fixed seed (tests/test_fast_sampler.py).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch
from torch import Tensor

from modeling.rear import ReAR
from modeling.next_token import Progress, cfg_scale_at, sample_next_token


class StaticKVCache:
    """One layer's keys and values for every position, written in place at `position` (shared by all layers);
    `attn_mask` (shared too) hides the positions not written yet."""

    def __init__(self, shape, dtype: torch.dtype, device, position: Tensor, attn_mask: Tensor):
        # Zeros, not empty: a masked position gets weight 0 in the softmax, but 0 * NaN would still be NaN.
        # (Later calls leave the previous call's values there: finite, and masked until overwritten.)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.position = position
        self.attn_mask = attn_mask

    def update(self, k: Tensor, v: Tensor):
        # Indexing with a tensor (not an int) keeps the position out of the recorded graph.
        self.k[:, :, self.position] = k.to(self.k.dtype)
        self.v[:, :, self.position] = v.to(self.v.dtype)
        return self.k, self.v, self.attn_mask


class FastSampler:
    """Samples `batch_size` images at a time from `model`, with classifier-free guidance if `guidance`.

    `dtype` (e.g. torch.bfloat16) runs a copy of the model in that dtype under autocast (a copy, so that the
    weights are not cast again at every step); None uses the model itself, as it is at each call. On CUDA the
    decode step is replayed from a CUDA graph (`cuda_graph`, default on; ignored elsewhere). `compile` runs
    the decode step through torch.compile (inductor's kernels, captured here like the eager step: the graph and
    its buffers stay in this class's hands); without it the step runs eagerly.
    Every buffer is allocated here, once, at a fixed address, as a graph needs. A captured graph reads the
    weights where they were: update them in place (`load_state_dict`), or build a new sampler; a copy in another
    dtype takes the model's current weights at every call.
    """

    def __init__(self, model: ReAR, batch_size: int, guidance: bool = True, dtype: Optional[torch.dtype] = None,
                 compile: bool = False, cuda_graph: Optional[bool] = None):
        weight = model.lm_head.weight
        self.device = weight.device
        self.dtype = dtype or weight.dtype
        self.source = model
        self.model = copy.deepcopy(model).to(self.dtype).eval() if self.dtype != weight.dtype else model
        self.batch_size, self.guidance = batch_size, guidance
        self.use_graph = self.device.type == "cuda" and cuda_graph is not False
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.decode = torch.compile(self.decode_step, fullgraph=True, dynamic=False) if compile else self.decode_step

        m, device = self.model, self.device
        n, dim = m.image_seq_len, m.hidden_size
        self.length = n + 1  # cls, class, tok_0..tok_{N-2}: the last token is sampled, never read
        rows = 2 * batch_size if guidance else batch_size  # [conditional; null class]
        # Distinct conditions: the batch's classes, and the null class once for all its rows.
        self.num_conditions = conditions = batch_size + 1 if guidance else batch_size
        self.condition_of_row = torch.arange(rows, device=device).clamp(max=conditions - 1)

        # What one step reads, at fixed addresses: its position, the visible positions, the newest token.
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.visible = torch.zeros(1, 1, 1, self.length, dtype=torch.bool, device=device)
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)
        heads = m.blocks[0].attn.num_heads
        shape = (rows, heads, self.length, dim // heads)
        self.caches = [StaticKVCache(shape, self.dtype, device, self.position, self.visible) for _ in m.blocks]
        # Everything that depends only on the class and the position, filled at the start of each call.
        table = dict(dtype=self.dtype, device=device)
        self.pos = torch.zeros(self.length, dim, **table)
        self.target = torch.zeros(self.length, dim, **table)
        self.block_modulations = torch.zeros(len(m.blocks), conditions, self.length, 6 * dim, **table)
        self.head_modulations = torch.zeros(conditions, self.length, 2 * dim, **table)
        self.cfg_scales = {}  # (guidance_scale, power) -> the scales of all steps

    @torch.no_grad()
    def sync_weights(self) -> None:
        """The copy in another dtype takes the model's current weights, in place (where a captured graph reads them)."""
        if self.model is not self.source:
            for mine, theirs in zip(self.model.parameters(), self.source.parameters()):
                mine.copy_(theirs)

    def autocast(self):
        if self.dtype in (torch.bfloat16, torch.float16):
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def cfg_scales_for(self, guidance_scale: float, power: float) -> Tensor:
        """`cfg_scale_at` of every step (N,), computed by that very function so that the float32 values match."""
        key = (guidance_scale, power)
        if key not in self.cfg_scales:
            n = self.model.image_seq_len
            scales = [cfg_scale_at(step, n, guidance_scale, power, self.device) for step in range(n)]
            self.cfg_scales[key] = torch.cat(scales)
        return self.cfg_scales[key]

    # ------------------------------------------------------------------------------ per call
    def prepare(self, conditions: Tensor) -> None:
        """Fill the class- and position-dependent tables for the raw labels `conditions` (one per condition)."""
        m, length = self.model, self.length
        c = m.embeddings(m.class_token_ids(conditions))[:, None] + m.timesteps_embeddings[:, :length]
        for table, block in zip(self.block_modulations, m.blocks):
            table.copy_(block.adaLN_modulation(c))
        self.head_modulations.copy_(m.adaln_before_head.adaLN_modulation(c))
        pos, target = m.position_tables()
        self.pos.copy_(pos[0, :length])
        self.target.copy_(target[0, :length])
        self.visible.zero_()

    def move_to(self, position: int) -> None:
        self.position.fill_(position)
        self.visible[..., position] = True

    # ------------------------------------------------------------------------------ one position
    def step(self, x: Tensor) -> Tensor:
        """Logits (rows, V) of the next token, for the input x (rows, 1, D) at `self.position`."""
        m = self.model
        entries = self.condition_of_row * self.length + self.position  # each row's (condition, position) entry
        # (blocks, rows, 1, 6D): an index_select, several times faster on a CPU than indexing [:, rows, position]
        modulations = self.block_modulations.flatten(1, 2).index_select(1, entries)[:, :, None]
        for block, modulation, cache in zip(m.blocks, modulations, self.caches):
            x = block.modulated_forward(x, modulation, cache)
        head_modulation = self.head_modulations.flatten(0, 1).index_select(0, entries)[:, None]
        x = m.adaln_before_head.modulated_forward(x, head_modulation)
        return m.lm_head(x)[:, 0].float()

    def decode_step(self) -> Tensor:
        """`step` for the newest token: its embedding plus the tables' entries of its position."""
        p = self.position
        x = self.model.embeddings(self.token) + self.pos[p]
        return self.step(x + self.target[p])

    def next_logits(self) -> Tensor:
        if not self.use_graph:
            with self.autocast():
                return self.decode()
        if self.graph is None:
            self.capture()
        self.graph.replay()
        return self.graph_logits

    def capture(self) -> None:
        """Record the decode step once; each step then replays it, reading the buffers at their fixed addresses."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self.autocast():
            for _ in range(3):  # compilation, autotuning and library workspaces happen outside the capture
                self.decode()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), self.autocast():
            self.graph_logits = self.decode()

    # ------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, class_ids: Tensor, guidance_scale: float, guidance_scale_pow: float, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 progress: Optional[Progress] = None) -> Tensor:
        """Tokens (B, N) for raw labels (B,), B = batch_size; the arguments are `ReAR.generate`'s."""
        m, batch, n = self.model, self.batch_size, self.model.image_seq_len
        m.check_ids(None, class_ids)
        if self.source.training:
            raise ValueError("the generator is in training mode (dropout on): call .eval() before sampling")
        self.sync_weights()
        if len(class_ids) != batch:
            raise ValueError(f"this sampler draws batches of {batch} (its buffers' shape), got {len(class_ids)}")
        if (guidance_scale != 0) != self.guidance:
            raise ValueError(f"guidance_scale {guidance_scale} needs a sampler built with guidance={not self.guidance}")
        class_ids = class_ids.to(self.device)
        m.start_sampling(class_ids)  # ReAR.generate's draw: keeps the random stream in step
        cfg = self.cfg_scales_for(guidance_scale, guidance_scale_pow) if self.guidance else None
        row_classes = torch.cat([class_ids, torch.full_like(class_ids, m.null_class)]) if self.guidance else class_ids
        with self.autocast():
            self.prepare(row_classes[: self.num_conditions])
            # The prefix [cls, class] as two one-position steps; the class position predicts tok_0.
            prefix, _ = m.embed(row_classes.new_empty(len(row_classes), 0), row_classes)
            for position in range(2):
                self.move_to(position)
                logits = self.step(prefix[:, position : position + 1])
        tokens = class_ids.new_empty(batch, n)
        for step in range(n):
            if step > 0:
                self.move_to(step + 1)
                logits = self.next_logits()
            sampled = sample_next_token(logits, cfg[step : step + 1] if self.guidance else None, temperature, top_k, top_p)
            tokens[:, step : step + 1] = sampled
            self.token.copy_(torch.cat([sampled, sampled]) if self.guidance else sampled)
            if progress is not None:
                progress(step + 1, n)
        return tokens


__all__ = ["FastSampler", "StaticKVCache"]
