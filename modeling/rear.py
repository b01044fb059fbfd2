"""The reAR generator: a class-conditional causal transformer over image tokens (arXiv 2510.04450).

The architecture is RAR's (a DiT-style decoder with adaLN-Zero conditioning and target-aware positions);
reAR adds two small MLP heads that align hidden states with the tokenizer's codebook embeddings during
training (see `modeling/losses.py`). At inference reAR is a plain autoregressive model.

Token space of the single embedding table (V = codebook size, C = number of classes):
    [0, V) image tokens · V the mask token · V+1+c class c · V+1+C the null class (classifier-free guidance).
Sequence fed to the transformer, for N image tokens:
    position 0: cls · position 1: the class · position 2+i: tok_i
Position p >= 1 predicts tok_{p-1}; its target-aware positional embedding is that of the token it predicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.config import validate


@dataclass
class GeneratorOutput:
    logits: Tensor  # (B, N, V): logits[:, i] is the distribution of tok_i given the class and tok_<i
    encode_z: Optional[Tensor] = None  # (B, N+2, z): encode_align_mlp over every position
    decode_z: Optional[Tensor] = None  # (B, N+2, z): decode_align_mlp over every position


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class KVCache:
    """Keys and values of one attention layer, pre-allocated for the whole sequence and filled in place."""

    attn_mask: Optional[Tensor] = None  # holds exactly the positions seen so far: nothing to hide

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None

    def append(self, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
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
        return self.k[:, :, :end], self.v[:, :, :end]


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

    def forward(self, x: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:
            k, v = cache.append(k, v)
        if L > 1 and k.shape[2] != L:
            raise ValueError("several new positions can only be processed from an empty cache")
        # Causal among the new positions; a single new position sees the whole cached prefix. A cache of fixed
        # length (modeling/fast_sampler.py) masks out the positions not written yet.
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if cache is None else cache.attn_mask, is_causal=L > 1,
            dropout_p=self.attn_drop if self.training else 0.0,
        )
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


def alignment_mlp(dim: int, projection_dim: int, z_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, projection_dim),
        nn.SiLU(),
        nn.Linear(projection_dim, projection_dim),
        nn.SiLU(),
        nn.Linear(projection_dim, z_dim),
    )


def shuffle(x: Tensor, orders: Tensor) -> Tensor:
    """x (B|1, N, ...) gathered along dim 1 by per-sample orders (B, N)."""
    x = x.expand(orders.shape[0], *x.shape[1:])
    return x[torch.arange(orders.shape[0], device=orders.device)[:, None], orders]


def cfg_scale_at(step: int, num_steps: int, guidance_scale: float, power: float, device=None) -> Tensor:
    """Classifier-free guidance scale at `step`: 1 at the first token, rising on a cosine to `guidance_scale`.

    Computed in float32 exactly as the original sampler does, so that sampled tokens match it bit for bit.
    """
    scale_pow = torch.ones(1, device=device) * power
    s = (1 - torch.cos(((step / num_steps) ** scale_pow) * torch.pi)) * 1 / 2
    return (guidance_scale - 1) * s + 1


def filter_logits(logits: Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """Keep the `top_k` largest logits and/or the smallest set whose probability reaches `top_p`."""
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already enough
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(
    logits: Tensor, cfg_scale: Optional[Tensor], temperature: float, top_k: Optional[int] = None, top_p: Optional[float] = None
) -> Tensor:
    """One sampling step from logits of the newest position. With `cfg_scale`, the rows are [conditional; null class]
    and are mixed as uncond + (cond - uncond)·cfg. Then temperature, optional top-k / top-p, and one multinomial draw
    for the whole batch, as the original sampler does (its random stream depends on that one call)."""
    if cfg_scale is not None:
        cond, uncond = logits.chunk(2)
        logits = uncond + (cond - uncond) * cfg_scale
    logits = filter_logits(logits / temperature, top_k, top_p)
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


class ReAR(nn.Module):
    """reAR / RAR generator. `config` is the whole project config (reads model.generator.* and
    model.vq_model.codebook_size / token_size)."""

    def __init__(self, config):
        super().__init__()
        config = validate(config)
        g = config.model.generator
        self.codebook_size = config.model.vq_model.codebook_size
        self.num_classes = g.condition_num_classes
        self.image_seq_len = g.image_seq_len
        self.hidden_size = g.hidden_size
        self.mask_token_id = self.codebook_size
        self.null_class = self.num_classes  # raw label C
        self.use_checkpoint = g.use_checkpoint
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

        self.alignment_layers: Tuple[int, int] = ()
        if g.transition_alignment:
            z_dim = g.z_dim if g.z_dim is not None else config.model.vq_model.token_size
            for idx in (g.encode_align_layer_idx, g.decode_align_layer_idx):
                if not 0 <= idx < g.num_hidden_layers:
                    raise ValueError(f"alignment layer {idx} is outside the {g.num_hidden_layers} blocks")
            self.encode_align_mlp = alignment_mlp(dim, g.projection_dim, z_dim)
            self.decode_align_mlp = alignment_mlp(dim, g.projection_dim, z_dim)
            self.alignment_layers = (g.encode_align_layer_idx, g.decode_align_layer_idx)
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
    def run_blocks(
        self, x: Tensor, c: Tensor, caches: Optional[Sequence[KVCache]] = None
    ) -> Tuple[Tensor, List[Tensor]]:
        """All blocks; returns the last hidden states and those of the alignment layers (encode, decode)."""
        kept = []
        for idx, block in enumerate(self.blocks):
            if self.use_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c, None if caches is None else caches[idx])
            kept += [x] * self.alignment_layers.count(idx)
        return x, kept

    def head(self, x: Tensor, c: Tensor) -> Tensor:
        return self.lm_head(self.adaln_before_head(x, c))

    def forward(self, input_ids: Tensor, class_ids: Tensor, orders: Optional[Tensor] = None) -> GeneratorOutput:
        """Teacher-forced logits (B, N, V); `logits[:, i]` predicts `input_ids[:, i]` (or, with RAR `orders`,
        the i-th token in that order). `class_ids` are raw labels in [0, C]; C is the null class."""
        if not self.training:
            self.check_ids(input_ids, class_ids)
        x, c = self.embed(input_ids, class_ids, orders)
        x, kept = self.run_blocks(x, c)
        output = GeneratorOutput(logits=self.head(x[:, 1:-1], c[:, 1:-1]))
        if kept:
            output.encode_z = self.encode_align_mlp(kept[0])
            output.decode_z = self.decode_align_mlp(kept[1])
        return output

    def check_ids(self, input_ids: Optional[Tensor], class_ids: Tensor) -> None:
        if class_ids.numel() and not (0 <= int(class_ids.min()) and int(class_ids.max()) <= self.num_classes):
            raise ValueError(
                f"class id out of range: got [{int(class_ids.min())}, {int(class_ids.max())}], "
                f"expected [0, {self.num_classes}] ({self.num_classes} is the null class)"
            )
        if input_ids is None or not input_ids.numel():
            return
        if input_ids.shape[1] > self.image_seq_len:
            raise ValueError(f"{input_ids.shape[1]} tokens > image_seq_len {self.image_seq_len}")
        if not (0 <= int(input_ids.min()) and int(input_ids.max()) < self.codebook_size):
            raise ValueError(
                f"token id out of range: got [{int(input_ids.min())}, {int(input_ids.max())}], "
                f"expected [0, {self.codebook_size})"
            )

    # ------------------------------------------------------------------------------ sampling
    def next_token_logits(
        self,
        prefix: Tensor,
        class_ids: Tensor,
        caches: Optional[List[KVCache]] = None,
        tables: Optional[Tuple[Tensor, Tensor]] = None,
    ) -> Tensor:
        """Logits (B, V) of the token after `prefix` (B, t). With `caches`, only the newest position is run:
        the caches must hold the keys and values of every earlier position. `tables` are `position_tables()`,
        passed in so that a sampling loop builds them once rather than at every step."""
        if caches is None or caches[0].length == 0:
            x, c = self.embed(prefix, class_ids)
        else:
            p = prefix.shape[1] + 1  # position of the newest token
            pos, target = tables if tables is not None else self.position_tables()
            x = self.embeddings(prefix[:, -1:]) + pos[:, p : p + 1]
            x = x + target[:, p : p + 1]
            c = self.embeddings(self.class_token_ids(class_ids))[:, None] + self.timesteps_embeddings[:, p : p + 1]
        x, _ = self.run_blocks(x, c, caches)
        return self.head(x[:, -1:], c[:, -1:])[:, 0]

    @torch.no_grad()
    def generate(
        self,
        class_ids: Tensor,
        guidance_scale: float,
        guidance_scale_pow: float,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        kv_cache: bool = True,
    ) -> Tensor:
        """Sample (B, N) image tokens for raw class labels (B,), with classifier-free guidance when
        `guidance_scale` != 0. For a fixed `torch.manual_seed` this reproduces the original sampler's tokens."""
        self.check_ids(None, class_ids)
        # The original maps the labels through its class-dropout routine with p = 0, which still draws one
        # uniform per sample from the global generator; without the same draw every token would differ.
        torch.rand(class_ids.shape, device=class_ids.device)
        batch, n = len(class_ids), self.image_seq_len
        use_cfg = guidance_scale != 0
        if use_cfg:  # conditional first, then the null class, in one batch
            class_ids = torch.cat([class_ids, torch.full_like(class_ids, self.null_class)])
        caches = [KVCache(n + 1) for _ in self.blocks] if kv_cache else None
        tables = self.position_tables()
        tokens = class_ids.new_empty(batch, 0)
        for step in range(n):
            prefix = torch.cat([tokens, tokens]) if use_cfg else tokens
            logits = self.next_token_logits(prefix, class_ids, caches, tables)
            cfg = cfg_scale_at(step, n, guidance_scale, guidance_scale_pow, logits.device) if use_cfg else None
            sampled = sample_next_token(logits, cfg, temperature, top_k, top_p)
            tokens = torch.cat([tokens, sampled], dim=1)
        return tokens

    @classmethod
    def from_pretrained(cls, config, path: str) -> "ReAR":
        """A generator built from `config` with the weights at `path` (local `.safetensors`/`.bin`, or a released
        file name such as `reAR-S.safetensors`, fetched from the Hugging Face Hub). A RAR checkpoint (no alignment
        heads) loads into a config with `transition_alignment: False`."""
        from utils.weights import load_checked, load_state_dict_file, resolve_weights

        model = cls(config)
        state = load_state_dict_file(resolve_weights(path))
        return load_checked(model, state, f"generator checkpoint {path}").eval()

    def num_parameters(self, exclude_alignment: bool = False) -> int:
        heads = {"encode_align_mlp", "decode_align_mlp"} if exclude_alignment else set()
        return sum(p.numel() for name, p in self.named_parameters() if name.split(".")[0] not in heads)


__all__ = ["ReAR", "GeneratorOutput", "KVCache", "cfg_scale_at", "filter_logits", "sample_next_token"]
