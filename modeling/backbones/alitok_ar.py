"""AliTok's autoregressive generator as a reAR backbone, `alitok_ar` (AliTok, arXiv 2506.05289; ali-vilab/alitok
`modeling/ar.py`).

A LlamaGen-style decoder-only transformer: pre-norm blocks with RMSNorm, a SwiGLU feed-forward, causal attention with
per-head RMSNorm on queries and keys, and rotary position embeddings. There is no learned position table and no
adaLN: the class enters only as the first token of the sequence.

Token space of the single embedding table (V = codebook size, C = number of classes):
    [0, V) image tokens · V unused (kept for the released shape) · V+1+c class c · V+1+C the null class.
AliTok's tokenizer writes N = 273 tokens an image: 17 prefix tokens, then a 16×16 grid in raster order.
Sequence fed to the transformer: [class, tok_0, …, tok_{N-1}]; position 1+i reads tok_i, position i predicts it.

The rotary table gives each kind of position its own geometry (d = head dim):
- class: (cos, sin) = (0, 0), so its query and key are zero: every query scores it 0 (its value still flows in),
  and it attends only to itself. LlamaGen's convention; the released weights were trained with it.
- prefix token j (0..16): 1-D angles j·θ_k, θ_k = 10000^(-2k/d), k < d/2;
- grid token (r, c): 2-D angles, the first d/4 pairs (17+r)·φ_k and the last d/4 pairs (17+c)·φ_k with
  φ_k = 10000^(-2k/(d/2)), k < d/4: rows and columns go on counting after the 17 prefix positions.
The layout is fixed whatever `image_seq_len` is: a shorter sequence uses the first rows of the table, as the original.

Its sampler is RAR's (`Generator.generate` with the cosine_power schedule and RAR's one leading uniform draw
per sample); its KV cache is correct, so cached and uncached sampling draw the same tokens.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from modeling.generator import Generator
from modeling.rear import KVCache, causal_attention
from utils.config import validate
from utils.errors import ConfigError

from . import register_backbone
from .llamagen import FeedForward, RMSNorm, normal_init

PREFIX_TOKENS = 17  # AliTok's prefix tokens, ahead of the grid
GRID_SIZE = 16  # the grid tokens form a 16×16 image
ROPE_BASE = 10000


# ----------------------------------------------------------------------------------------- rotary positions
def inverse_frequencies(dim: int) -> Tensor:
    """10000^(-2k/dim) for k < dim/2, in float32 as the original computes them."""
    return 1.0 / (ROPE_BASE ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))


def rotary_table(head_dim: int) -> Tensor:
    """(cos, sin) of every position of [class, 17 prefix tokens, 16×16 grid]: (1 + 17 + 256, head_dim/2, 2)."""
    prefix = torch.outer(torch.arange(PREFIX_TOKENS), inverse_frequencies(head_dim))
    # torch.polar, not cos/sin, for the prefix: the two differ in the last bit, and the original uses polar here.
    prefix = torch.view_as_real(torch.polar(torch.ones_like(prefix), prefix))
    axis = torch.arange(PREFIX_TOKENS, PREFIX_TOKENS + GRID_SIZE)  # rows and columns count on from 17
    axis = torch.outer(axis, inverse_frequencies(head_dim // 2))
    grid = torch.cat(
        [axis[:, None].expand(-1, GRID_SIZE, -1), axis[None, :].expand(GRID_SIZE, -1, -1)], dim=-1
    ).flatten(0, 1)  # (row, column) in raster order
    grid = torch.stack([grid.cos(), grid.sin()], dim=-1)
    return torch.cat([torch.zeros(1, head_dim // 2, 2), prefix, grid])


def apply_rotary(x: Tensor, table: Tensor) -> Tensor:
    """Rotate adjacent pairs of x (B, H, L, d) by the angles of `table` (L, d/2, 2), in float32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[..., 0], table[..., 1]
    rotated = torch.stack(
        [pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], dim=-1
    )
    return rotated.flatten(-2).type_as(x)


# ----------------------------------------------------------------------------------------- layers
class Attention(nn.Module):
    """Causal multi-head self-attention: per-head RMSNorm on queries and keys, then rotary positions."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, rotary: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(self.q_norm(q), rotary), apply_rotary(self.k_norm(k), rotary)
        x = causal_attention(q, k, v, cache, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, L, D)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float, attn_drop: float):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=dropout)
        self.norm2 = RMSNorm(dim)
        self.mlp = FeedForward(dim, dropout)

    def forward(self, x: Tensor, rotary: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        x = x + self.attn(self.norm1(x), rotary, cache)
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------------------- the generator
@register_backbone("alitok_ar")
class AliTokAR(Generator):
    """AliTok's AR generator (+ reAR's heads when `transition_alignment`). State-dict names as in the released
    `alitok_{b,l,xl}.bin` (plain state dicts)."""

    prefix_len = 1  # position 1+i reads tok_i: the class token comes first
    has_mask_token = True  # row V of `embeddings`, unused by the original
    draws_before_sampling = True  # its sampler is RAR's

    def __init__(self, config):
        super().__init__(config)
        config = validate(config)
        g = config.model.generator
        dim, heads = g.hidden_size, g.num_attention_heads
        if (dim // heads) % 4:
            raise ConfigError(f"alitok_ar: hidden_size / num_attention_heads = {dim // heads} must be a multiple of 4 "
                              "(the head's 2-D rotary angles)")
        if self.image_seq_len > PREFIX_TOKENS + GRID_SIZE**2:
            raise ConfigError(f"alitok_ar: image_seq_len {self.image_seq_len} > {PREFIX_TOKENS + GRID_SIZE**2}, "
                              f"AliTok's {PREFIX_TOKENS} prefix + {GRID_SIZE}×{GRID_SIZE} grid tokens")

        self.blocks = nn.ModuleList(Block(dim, heads, g.dropout, g.attn_drop) for _ in range(g.num_hidden_layers))
        self.embeddings = nn.Embedding(self.codebook_size + 1 + self.num_classes + 1, dim)
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, self.codebook_size)
        self.tok_dropout = nn.Dropout(g.tok_dropout)
        self.register_buffer("rotary", rotary_table(dim // heads), persistent=False)
        normal_init(self.modules())
        nn.init.zeros_(self.output.weight)  # the model starts uniform
        # The heads come after the backbone's initialisation, so that a seed still gives the original's weights.
        self.attach_alignment_heads(config)
        normal_init(module for name in self.alignment_heads for module in getattr(self, name).modules())

    # ------------------------------------------------------------------------------ the transformer
    def class_token_ids(self, class_ids: Tensor) -> Tensor:
        """Raw labels [0, C] (C = null class) → rows of the embedding table."""
        return class_ids + self.codebook_size + 1

    def embed(self, input_ids: Tensor, class_ids: Optional[Tensor]) -> Tensor:
        """Embeddings of [class, input_ids...] (or of input_ids alone when `class_ids` is None), with the
        original's token dropout (training only), which also drops parts of the class embedding."""
        if class_ids is not None:
            input_ids = torch.cat([self.class_token_ids(class_ids)[:, None], input_ids], dim=1)
        return self.tok_dropout(self.embeddings(input_ids))

    def run_blocks(self, x: Tensor, start: int = 0, caches: Optional[Sequence[KVCache]] = None,
                   keep: Sequence[int] = ()) -> Tuple[Tensor, Dict[int, Tensor]]:
        """All blocks over positions start..start+L-1: the last hidden states, and those after the blocks in `keep`."""
        return self.through_blocks(x, self.rotary[start : start + x.shape[1]], caches=caches, keep=keep)

    def head(self, x: Tensor) -> Tensor:
        return self.output(self.norm(x))

    def hidden_states(self, input_ids: Tensor, class_ids: Tensor, layers: Sequence[int] = (),
                      orders: Optional[Tensor] = None) -> Tuple[Tensor, Dict[int, Tensor]]:
        """Teacher-forced logits (B, N, V) and the hidden states after each block in `layers`, over all N+1
        positions (B, N+1, D). Like the original training step it feeds all N tokens and drops the last logit."""
        x, kept = self.run_blocks(self.embed(input_ids, class_ids), keep=layers)
        return self.head(x[:, :-1]), kept

    # ------------------------------------------------------------------------------ sampling
    def new_caches(self, rows: int) -> List[KVCache]:
        """Empty key/value caches for sequences of up to N+1 positions, one a block (allocated at the first write:
        under autocast queries and keys are float32 after the rotary, values are not)."""
        return [KVCache(self.image_seq_len + 1) for _ in self.blocks]

    def next_token_logits(self, prefix: Tensor, class_ids: Tensor, caches: Optional[List[KVCache]] = None) -> Tensor:
        """Logits (rows, V) of the token after `prefix` (rows, t). Without caches the whole [class, prefix] runs;
        with caches only the newest position does (the class and prefix positions at the first call)."""
        if caches is None or caches[0].length == 0:
            x, start = self.embed(prefix, class_ids), 0
        else:
            x, start = self.embed(prefix[:, -1:], None), prefix.shape[1]
        x, _ = self.run_blocks(x, start, caches)
        return self.head(x[:, -1])


__all__ = ["AliTokAR", "apply_rotary", "rotary_table"]
