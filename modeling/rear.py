"""The reAR generator: a class-conditional causal transformer over image tokens (arXiv 2510.04450).

The architecture is RAR's (a DiT-style decoder with adaLN-Zero conditioning and target-aware positions), the
`rar` backbone; reAR adds two small MLP heads that align hidden states with the tokenizer's codebook embeddings
during training (`modeling/objective.py`). At inference reAR is a plain autoregressive model.

Token space of the single embedding table (V = codebook size, C = number of classes):
    [0, V) image tokens · V the mask token · V+1+c class c · V+1+C the null class (classifier-free guidance).
Sequence fed to the transformer, for N image tokens:
    position 0: cls · position 1: the class · position 2+i: tok_i
Position p >= 1 predicts tok_{p-1}; its target-aware positional embedding is that of the token it predicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.generator import Generator, GeneratorOutput
from modeling.objective import shuffle
from utils.config import validate


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class KVCache:
    """Keys and values of one attention layer, pre-allocated for the whole sequence and filled in place."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None

    def update(self, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Append the new positions; returns every key and value so far, and no mask (all of them are visible)."""
        if self.k is None:
            shape = (*k.shape[:2], self.max_len, k.shape[-1])
            self.k = k.new_empty(shape)
            self.v = v.new_empty(shape)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions > {self.max_len}")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end], None


def causal_attention(q: Tensor, k: Tensor, v: Tensor, cache=None, dropout_p: float = 0.0) -> Tensor:
    """Causal scaled-dot-product attention over (B, H, L, d) heads; with a cache (`KVCache`, or the fast sampler's
    static one) the new keys and values are appended first, and the new positions attend to every cached one.
    Every backbone's attention ends here."""
    L = q.shape[2]
    mask = None
    if cache is not None:  # a growing cache shows every key; a static one masks the positions not written yet
        k, v, mask = cache.update(k, v)
    if L > 1 and k.shape[2] != L:
        raise ValueError("several new positions can only be processed from an empty cache")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=L > 1, dropout_p=dropout_p)


@dataclass
class DecodeState:
    """What one sampling call keeps between steps: every layer's cache and the position tables."""

    layers: List[KVCache]
    tables: Tuple[Tensor, Tensor]

    @property
    def length(self) -> int:
        return self.layers[0].length


class Attention(nn.Module):
    """Causal multi-head self-attention with per-head LayerNorm on queries and keys."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, cache=None) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        x = causal_attention(q, k, v, cache, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, L, D)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: the class (and position) modulates both sub-layers."""

    def __init__(self, dim: int, num_heads: int, hidden: int, dropout: float, attn_drop: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden, drop=dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        return self.modulated_forward(x, self.adaLN_modulation(c), cache)

    def modulated_forward(self, x: Tensor, modulation: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        """The block given its adaLN modulation (…, 6D), which depends only on the condition c: the fast
        sampler computes it once per class and position."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), cache)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Non-affine LayerNorm modulated by the condition. Note the chunk order (scale, shift), the reverse of
    the blocks': the released weights depend on it."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self.modulated_forward(x, self.adaLN_modulation(c))

    def modulated_forward(self, x: Tensor, modulation: Tensor) -> Tensor:
        scale, shift = modulation.chunk(2, dim=-1)
        return modulate(self.norm_final(x), shift, scale)


class ReAR(Generator):
    """reAR / RAR generator (the `rar` backbone). `config` is the whole project config (reads model.generator.*
    and model.vq_model.codebook_size / token_size)."""

    prefix_len = 2  # [cls, class, tok_0, ...]: position 2+i reads tok_i
    supports_orders = True
    has_mask_token = True  # row V of `embeddings`
    has_fast_sampler = True
    draws_before_sampling = True

    def __init__(self, config):
        super().__init__(config)
        config = validate(config)
        g = config.model.generator
        dim, n = g.hidden_size, g.image_seq_len

        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Tables longer than needed, as released: 1024 extra positions, 100 extra steps.
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1024, dim))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, n + 1024, dim))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, n + 100, dim))
        self.blocks = nn.ModuleList(
            Block(dim, g.num_attention_heads, g.intermediate_size, g.dropout, g.attn_drop)
            for _ in range(g.num_hidden_layers)
        )
        self.embeddings = nn.Embedding(self.codebook_size + 1 + self.num_classes + 1, dim)
        self.adaln_before_head = FinalLayer(dim)
        self.lm_head = nn.Linear(dim, self.codebook_size)
        self.attach_alignment_heads(config)
        self.initialize_weights()

    # ----------------------------------------------------------------------------------------- init
    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for table in (self.pos_embed, self.target_aware_pos_embed, self.timesteps_embeddings):
            nn.init.trunc_normal_(table, std=0.02)
        nn.init.zeros_(self.cls_token)
        # adaLN-Zero: every block starts as the identity.
        for block in [*self.blocks, self.adaln_before_head]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)

    # ------------------------------------------------------------------------------ embeddings
    def class_token_ids(self, class_ids: Tensor) -> Tensor:
        """Raw labels [0, C] (C = null class) → rows of the embedding table."""
        return class_ids + self.codebook_size + 1

    def position_tables(self, orders: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """The additive tables for [cls, class, tok_0..tok_{N-1}]: (pos, target_aware), each (1|B, N+2, D).

        Position 1 and the position of tok_i carry the target-aware entry of the token they predict
        (2+0, 2+(i+1)); cls and the last token get zero. With `orders` (RAR), the image positions follow
        each sample's order.
        """
        n = self.image_seq_len
        pos_prefix, pos_image = self.pos_embed[:, :2], self.pos_embed[:, 2 : n + 2]
        target = self.target_aware_pos_embed[:, 2 : n + 2]
        if orders is not None:
            pos_image, target = shuffle(pos_image, orders), shuffle(target, orders)
            pos_prefix = pos_prefix.expand(orders.shape[0], -1, -1)
        zero = target.new_zeros(target.shape[0], 1, target.shape[2])
        return torch.cat([pos_prefix, pos_image], dim=1), torch.cat([zero, target, zero], dim=1)

    def embed(self, input_ids: Tensor, class_ids: Tensor, orders: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """The transformer's input (B, L, D) for [cls, class, input_ids...] and its per-position adaLN condition."""
        length = input_ids.shape[1] + 2
        class_emb = self.embeddings(self.class_token_ids(class_ids))[:, None]
        token_emb = self.embeddings(input_ids if orders is None else shuffle(input_ids, orders))
        x = torch.cat([self.cls_token.expand(len(input_ids), -1, -1), class_emb, token_emb], dim=1)
        pos, target = self.position_tables(orders)
        x = x + pos[:, :length]
        x = x + target[:, :length]
        return x, class_emb + self.timesteps_embeddings[:, :length]

    # ------------------------------------------------------------------------------ transformer
    def run_blocks(self, x: Tensor, c: Tensor, caches: Optional[DecodeState] = None,
                   keep: Sequence[int] = ()) -> Tuple[Tensor, Dict[int, Tensor]]:
        """All blocks; returns the last hidden states and those after the blocks in `keep`."""
        return self.through_blocks(x, c, caches=None if caches is None else caches.layers, keep=keep)

    def head(self, x: Tensor, c: Tensor) -> Tensor:
        return self.lm_head(self.adaln_before_head(x, c))

    def hidden_states(self, input_ids: Tensor, class_ids: Tensor, layers: Sequence[int] = (),
                      orders: Optional[Tensor] = None) -> Tuple[Tensor, Dict[int, Tensor]]:
        """Teacher-forced logits over positions 1..N (drop cls and the last token) and the hidden states after
        the blocks in `layers`, over all N+2 positions."""
        x, c = self.embed(input_ids, class_ids, orders)
        x, kept = self.run_blocks(x, c, keep=layers)
        return self.head(x[:, 1:-1], c[:, 1:-1]), kept

    # ------------------------------------------------------------------------------ sampling
    def new_caches(self, rows: int) -> DecodeState:
        return DecodeState([KVCache(self.image_seq_len + 1) for _ in self.blocks], self.position_tables())

    def next_token_logits(self, prefix: Tensor, class_ids: Tensor, caches: Optional[DecodeState] = None) -> Tensor:
        """Logits (B, V) of the token after `prefix` (B, t). With `caches`, only the newest position is run: they
        hold the keys and values of every earlier position (the first call runs cls, class and the prefix)."""
        if caches is None or caches.length == 0:
            x, c = self.embed(prefix, class_ids)
        else:
            p = prefix.shape[1] + 1  # position of the newest token
            pos, target = caches.tables
            x = self.embeddings(prefix[:, -1:]) + pos[:, p : p + 1]
            x = x + target[:, p : p + 1]
            c = self.embeddings(self.class_token_ids(class_ids))[:, None] + self.timesteps_embeddings[:, p : p + 1]
        x, _ = self.run_blocks(x, c, caches)
        return self.head(x[:, -1:], c[:, -1:])[:, 0]


__all__ = ["ReAR", "GeneratorOutput", "KVCache", "causal_attention"]
