"""GPT-1D as a reAR backbone, `gpt1d`: the class-conditional LlamaGen-family transformer that GigaTok and ReTok train
over 1D token sequences.

It is LlamaGen's GPT (`autoregressive/models/gpt.py`: pre-norm RMSNorm blocks, SwiGLU MLP, no biases, the class
as the first position) with the 2D rotary embedding replaced by a learned 1D absolute position table, plus
GigaTok's optional query/key LayerNorm and adaLN conditioning (`autoregressive/models/gpt_1d.py` of
SilentView/GigaTok and zfu006/ReTok, which are the same file). ReTok's released generator
`GPT_XL256_e300_VQ_SB.pt` is GPT-XL (36 layers, 20 heads, width 1280) over 256 tokens of a 16,384-code
codebook, with none of the options on. The original's `rope` option is left out: its RoPE table is built with
base 1 and 120 leading zero rows (all-zero queries and keys below position 120), and neither its sampler nor
its eval-mode forward runs with it, so no usable model has it.

Sequence fed to the transformer, for N image tokens:
    position 0 reads the class · position 1+i reads tok_i;   position i predicts tok_i.
The last token is read by no position that predicts anything, so the teacher-forced pass runs
[class, tok_0, …, tok_{N-2}] as the original's training step does (its dropout draws included); only when the
alignment heads ask for hidden states does it also run tok_{N-1}, which gives tok_{N-1} a reading position
(causal attention leaves the other positions' outputs unchanged).

Config (`model.generator`): hidden_size / num_hidden_layers / num_attention_heads are the original's
dim / n_layer / n_head (`gpt_model`, e.g. "GPT-XL", names them and is checked against them); image_seq_len is
block_size, condition_num_classes num_classes, model.vq_model.codebook_size vocab_size; class_label_dropout is
class_dropout_prob (> 0 gives the embedding table its null-class row), dropout is resid_dropout_p and
ffn_dropout_p (one --dropout-p in the original's training script), attn_drop is attn_dropout_p (0.0 in the
original: set it), tok_dropout is token_dropout_p. intermediate_size is not used: the MLP width follows LlamaGen's
rule. Class-label dropout itself is the training objective's job (the original draws it inside the model, first:
`torch.rand(B) < class_dropout_prob` → the null class, the same draw).

Its sampler (`autoregressive/models/generate.py`), as data for the shared loop: guidance only when the scale is
above 1; token 0 takes the scale itself, token t >= 1 the schedule at t / (N - 1) (the schedules registered
below; `cfg_interval` ends guidance early); no random draw before the first token.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from modeling.generator import Generator
from modeling.rear import KVCache, causal_attention, modulate
from modeling.next_token import Guidance, register_guidance_schedule
from utils.config import validate
from utils.errors import ConfigError

from . import register_backbone
from .llamagen import FeedForward, RMSNorm, normal_init

# name: (n_layer, n_head, dim), as the original's GPT_models.
GPT_SIZES: Dict[str, Tuple[int, int, int]] = {
    "GPT-B": (12, 12, 768),
    "GPT-L": (24, 16, 1024),
    "GPT-XL": (36, 20, 1280),
    "GPT-XXL": (48, 24, 1536),
    "GPT-XXXL": (48, 40, 2560),
    "GPT-1B": (22, 32, 2048),
    "GPT-3B": (24, 32, 3200),
    "GPT-7B": (32, 32, 4096),
}


# ------------------------------------------------------------------------------------------- GigaTok's schedules
def gigatok_schedule(name: str):
    """Register one of GigaTok's schedules, a function of (ratio = step / (N - 1), scale, guidance) in Python floats
    as the original computes it. (Token 0 never reaches it on this backbone: `GPT1D.guidance_scale_at`.)"""

    def register(fn: Callable[[float, float, Guidance], float]):
        @register_guidance_schedule(name)
        def schedule(step: int, num_steps: int, guidance: Guidance, device=None) -> float:
            return fn(1.0 * step / (num_steps - 1), guidance.scale, guidance)

        return fn

    return register


OFF = 1.0 + 1e-4  # GigaTok's "no guidance" inside a window schedule: still a mix of the two rows


@gigatok_schedule("constant")
def constant_schedule(ratio: float, scale: float, guidance: Guidance) -> float:
    return scale


@gigatok_schedule("linear")
def linear_schedule(ratio: float, scale: float, guidance: Guidance) -> float:
    return 1.0 + (scale - 1.0) * ratio + 1e-4


@gigatok_schedule("linear_re")
def linear_re_schedule(ratio: float, scale: float, guidance: Guidance) -> float:
    return 1.0 + (scale - 1.0) * (1.0 - ratio) + 1e-4


@gigatok_schedule("triangular")
def triangular_schedule(ratio: float, scale: float, guidance: Guidance, peak: float = 0.5) -> float:
    if ratio < peak:
        return 1.0 + (scale - 1.0) * (ratio / peak) + 1e-4
    return 1.0 + (scale - 1.0) * ((1.0 - ratio) / (1.0 - peak)) + 1e-4


@gigatok_schedule("rectangular")
def rectangular_schedule(ratio: float, scale: float, guidance: Guidance) -> float:
    start, end = guidance.window
    return scale if start <= ratio <= end else OFF


@gigatok_schedule("step")
def step_schedule(ratio: float, scale: float, guidance: Guidance) -> float:
    if scale == 1.0:
        return scale
    return scale if guidance.window[0] <= ratio else OFF


# ------------------------------------------------------------------------------------------- layers
class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability p (one Bernoulli per sample)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep.div_(1 - self.p)


class Attention(nn.Module):
    """Causal multi-head attention, one bias-free qkv projection; optional per-head LayerNorm on q and k."""

    def __init__(self, dim: int, num_heads: int, attn_dropout: float, resid_dropout: float, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.attn_dropout = attn_dropout
        self.resid_dropout = nn.Dropout(resid_dropout)
        if qk_norm:
            self.q_norm = nn.LayerNorm(self.head_dim)
            self.k_norm = nn.LayerNorm(self.head_dim)
        self.qk_norm = qk_norm

    def forward(self, x: Tensor, cache: Optional[KVCache]) -> Tensor:
        B, L, D = x.shape
        q, k, v = (t.view(B, L, self.num_heads, self.head_dim) for t in self.wqkv(x).split(D, dim=-1))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        x = causal_attention(q, k, v, cache, self.attn_dropout if self.training else 0.0)
        return self.resid_dropout(self.wo(x.transpose(1, 2).reshape(B, L, D)))


Modulation = Optional[Tuple[Tensor, ...]]  # (shift, scale, gate) of one sub-layer, or None without adaLN


class TransformerBlock(nn.Module):
    """Pre-norm block. With adaLN the class condition shifts, scales and gates both sub-layers, either through the
    block's own `adaLN_modulation` (use_adaLN) or through a modulation shared by all blocks plus the block's
    learned offset `ada_gss` (use_simple_adaLN)."""

    def __init__(self, g, dim: int, drop_path: float):
        super().__init__()
        self.attention = Attention(dim, g.num_attention_heads, g.attn_drop, g.dropout, g.use_qk_norm)
        self.feed_forward = FeedForward(dim, g.dropout)
        self.attention_norm = RMSNorm(dim)
        self.ffn_norm = RMSNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if g.use_adaLN:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))
        if g.use_simple_adaLN:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, dim) / dim**0.5)

    def modulation(self, cond: Optional[Tensor], shared: Optional[Tensor]) -> Tuple[Modulation, Modulation]:
        """(attention's, MLP's) (shift, scale, gate) for the condition (B, 1, D); `shared` (B, 1, 6, D)."""
        if hasattr(self, "adaLN_modulation"):
            chunks = self.adaLN_modulation(cond).chunk(6, dim=-1)
        elif hasattr(self, "ada_gss"):
            chunks = (shared + self.ada_gss).unbind(2)
        else:
            return None, None
        return chunks[:3], chunks[3:]

    def residual(self, x: Tensor, norm: nn.Module, sublayer: Callable[[Tensor], Tensor], mod: Modulation) -> Tensor:
        if mod is None:
            return x + self.drop_path(sublayer(norm(x)))
        shift, scale, gate = mod
        return x + gate * self.drop_path(sublayer(modulate(norm(x), shift, scale)))

    def forward(self, x: Tensor, cond: Optional[Tensor], shared: Optional[Tensor], cache: Optional[KVCache]) -> Tensor:
        attn_mod, mlp_mod = self.modulation(cond, shared)
        h = self.residual(x, self.attention_norm, lambda y: self.attention(y, cache), attn_mod)
        return self.residual(h, self.ffn_norm, self.feed_forward, mlp_mod)


class LabelEmbedder(nn.Module):
    """Class embeddings; a model trained with label dropout has one more row, the null class C."""

    def __init__(self, num_classes: int, dim: int, with_null_class: bool):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(with_null_class), dim)

    def forward(self, class_ids: Tensor) -> Tensor:
        return self.embedding_table(class_ids)[:, None]


def check_sizes(g) -> None:
    if g.gpt_model is not None:
        if g.gpt_model not in GPT_SIZES:
            raise ConfigError(f"'model.generator.gpt_model' is {g.gpt_model!r}, not one of {', '.join(GPT_SIZES)}")
        given = (g.num_hidden_layers, g.num_attention_heads, g.hidden_size)
        if given != GPT_SIZES[g.gpt_model]:
            layers, heads, dim = GPT_SIZES[g.gpt_model]
            raise ConfigError(
                f"'model.generator.gpt_model' {g.gpt_model} is num_hidden_layers={layers}, "
                f"num_attention_heads={heads}, hidden_size={dim}; the config has {given[0]}, {given[1]}, {given[2]}"
            )
    if g.use_adaLN and g.use_simple_adaLN:
        raise ConfigError("'model.generator.use_adaLN' and 'use_simple_adaLN' exclude each other")


# ------------------------------------------------------------------------------------------- the generator
@register_backbone("gpt1d")
class GPT1D(Generator):
    """GPT-1D generator (+ reAR's heads when `transition_alignment`). State-dict names are the original's, so
    released checkpoints load strictly."""

    prefix_len = 1  # position 0 reads the class
    guidance_schedule = "constant"  # generate.py's default
    checkpoint_keys = ("model", "module", "state_dict")  # what the original sampler looks for, in this order

    def __init__(self, config):
        super().__init__(config)
        config = validate(config)
        g = config.model.generator
        check_sizes(g)
        dim = self.hidden_size
        self.has_null_class = g.class_label_dropout > 0
        self.use_adaLN, self.use_simple_adaLN = g.use_adaLN, g.use_simple_adaLN

        # Built in the original's order, so the same seed gives the same initial weights.
        self.cls_embedding = LabelEmbedder(self.num_classes, dim, self.has_null_class)
        self.tok_embeddings = nn.Embedding(self.codebook_size, dim)
        self.tok_dropout = nn.Dropout(g.tok_dropout)
        drop_path = torch.linspace(0, g.drop_path_rate, g.num_hidden_layers, device="cpu").tolist()  # also under meta
        self.layers = nn.ModuleList(TransformerBlock(g, dim, p) for p in drop_path)
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, self.codebook_size, bias=False)
        self.positional_embedding = nn.Parameter(dim**-0.5 * torch.randn(self.prefix_len + self.image_seq_len, dim))
        if g.use_simple_adaLN:
            self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))
        if g.use_adaLN or g.use_simple_adaLN:
            self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))
        self.initialize_weights()
        # The heads come after the backbone's initialisation, so that a seed still gives the original's weights.
        self.attach_alignment_heads(config)
        normal_init(module for name in self.alignment_heads for module in getattr(self, name).modules())

    def initialize_weights(self) -> None:
        """LlamaGen's normal init; zero adaLN outputs and a zero `output` (so the model starts uniform).
        `positional_embedding` and `ada_gss` keep their randn·dim^-0.5."""
        normal_init(self.modules())
        zeroed = [self.output]
        if self.use_adaLN:
            zeroed += [layer.adaLN_modulation[-1] for layer in self.layers]
        if self.use_simple_adaLN:
            zeroed.append(self.adaLN[-1])
        if self.use_adaLN or self.use_simple_adaLN:
            zeroed.append(self.final_adaLN[-1])
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    @property
    def transformer_blocks(self) -> nn.ModuleList:
        return self.layers

    # ------------------------------------------------------------------------------ the transformer
    def condition(self, class_ids: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """adaLN's condition (B, 1, D), the class embedding plus position 0's embedding, for every position; and the
        modulation the blocks share under use_simple_adaLN (B, 1, 6, D). (None, None) without adaLN."""
        if not (self.use_adaLN or self.use_simple_adaLN):
            return None, None
        cond = self.cls_embedding(class_ids) + self.positional_embedding[:1]
        shared = self.adaLN(cond).unflatten(-1, (6, -1)) if self.use_simple_adaLN else None
        return cond, shared

    def embed(self, tokens: Tensor, class_ids: Tensor, start: int) -> Tensor:
        """Transformer input for the positions from `start`: [class, tokens...] from 0, else only `tokens`."""
        x = self.tok_embeddings(tokens)
        if start == 0:
            x = torch.cat([self.cls_embedding(class_ids), x], dim=1)
        return self.tok_dropout(x + self.positional_embedding[start : start + x.shape[1]])

    def run(self, tokens: Tensor, class_ids: Tensor, start: int = 0, caches: Optional[Sequence[KVCache]] = None,
            keep: Sequence[int] = ()) -> Tuple[Tensor, Dict[int, Tensor]]:
        """Logits of the positions from `start` (B, L, V) and the hidden states after the blocks in `keep`."""
        cond, shared = self.condition(class_ids)
        x, kept = self.through_blocks(self.embed(tokens, class_ids, start), cond, shared, caches=caches, keep=keep)
        return self.head(x, cond), kept

    def head(self, x: Tensor, cond: Optional[Tensor]) -> Tensor:
        x = self.norm(x)
        if cond is not None:
            shift, scale = self.final_adaLN(cond).chunk(2, dim=-1)  # (shift, scale): the blocks' order
            x = modulate(x, shift, scale)
        return self.output(x).float()

    def hidden_states(self, input_ids: Tensor, class_ids: Tensor, layers: Sequence[int] = (),
                      orders: Optional[Tensor] = None) -> Tuple[Tensor, Dict[int, Tensor]]:
        """Teacher-forced logits (B, N, V); with `layers`, the hidden states after those blocks over all N+1
        positions (all N tokens run, so that tok_{N-1} has a reading position), else the original's N positions."""
        logits, kept = self.run(input_ids if layers else input_ids[:, :-1], class_ids, keep=layers)
        return logits[:, : input_ids.shape[1]], kept

    def check_ids(self, input_ids: Optional[Tensor], class_ids: Tensor) -> None:
        super().check_ids(input_ids, class_ids)
        if not self.has_null_class and class_ids.numel() and int(class_ids.max()) == self.null_class:
            raise ValueError(
                f"class id {self.null_class} (the null class) needs a model trained with label dropout "
                "(model.generator.class_label_dropout > 0)"
            )

    # ------------------------------------------------------------------------------ sampling
    def uses_guidance(self, guidance_scale: float) -> bool:
        return guidance_scale > 1.0

    def guidance_scale_at(self, step: int, guidance: Guidance, device=None) -> Union[Tensor, float, None]:
        """Token 0 (the original's prefill) takes the scale itself, whatever the schedule."""
        return guidance.scale if step == 0 else super().guidance_scale_at(step, guidance, device)

    def new_caches(self, rows: int) -> List[KVCache]:
        """Empty key/value caches (allocated at the first write) for the class position and N tokens."""
        return [KVCache(self.prefix_len + self.image_seq_len) for _ in self.layers]

    def next_token_logits(self, prefix: Tensor, class_ids: Tensor, caches: Optional[List[KVCache]] = None) -> Tensor:
        """Logits (rows, V) of the token after `prefix` (rows, t). With `caches` holding positions 0..t-1, only
        position t (reading the newest token) runs; empty caches run the class position and the whole prefix."""
        if caches is None or caches[0].length == 0:
            logits, _ = self.run(prefix, class_ids, caches=caches)
        else:
            logits, _ = self.run(prefix[:, -1:], class_ids, start=prefix.shape[1], caches=caches)
        return logits[:, -1]


__all__ = ["GPT1D", "GPT_SIZES"]
