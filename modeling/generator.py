"""The seam between reAR's method and an autoregressive backbone.

A backbone (the RAR-style transformer of `modeling/rear.py`, AliTok's AR, a LlamaGen-family GPT, ...) subclasses
`Generator` and provides the computation; the method — alignment heads, the objective, the sampling loop — is
written once against this small interface:

- `hidden_states(input_ids, class_ids, layers, orders=None) -> (logits (B, N, V), {k: hidden after block k})`,
  the teacher-forced pass; hidden states cover every position of the sequence the transformer runs, where
  position `prefix_len + i` reads tok_i and position `prefix_len - 1 + i` predicts it;
- `new_caches(rows)` and `next_token_logits(prefix, class_ids, caches)`: the logits of the token after `prefix`;
  with caches only the newest position runs (the first call runs the class / prefix positions);
- the attributes `codebook_size`, `num_classes`, `image_seq_len`, `null_class`, `hidden_size` (set by
  `Generator.__init__`), and `check_ids` (a default here);
- `has_mask_token`: whether its input embedding has a row for the mask token V, which `perturb_mode: mask` feeds
  it (a config that asks for it on a backbone without one is refused at start-up).
What the originals' samplers do differently is data or a small override here: `guidance_schedule` (a name in
`modeling.next_token.GUIDANCE_SCHEDULES`), `uses_guidance` (which scales run the null-class rows), `guidance_scale_at`
(the scale of token t, or None for the conditional logits alone) and `start_sampling` (random draws the original
makes before its first step). Shared helpers: `through_blocks` (the blocks of `transformer_blocks`, with activation
checkpointing and the hidden states the heads read) and `load_weights_file` (a released file, unwrapped by
`checkpoint_keys`, loaded strictly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from modeling.next_token import (DEFAULT_GUIDANCE_WINDOW, GUIDANCE_SCHEDULES, Guidance, Progress,
                                  sample_next_token)
from modeling.objective import add_alignment_heads
from utils.config import validate

LOCAL_GENERATOR = "experiment.generator_checkpoint=PATH"
HEAD_OUTPUTS = {"encode_align_mlp": "encode_z", "decode_align_mlp": "decode_z"}


@dataclass
class GeneratorOutput:
    logits: Tensor  # (B, N, V): logits[:, i] is the distribution of tok_i given the class and tok_<i
    encode_z: Optional[Tensor] = None  # (B, L, z): encode_align_mlp over every position
    decode_z: Optional[Tensor] = None  # (B, L, z): decode_align_mlp over every position
    prefix_len: int = 2  # position prefix_len + i reads tok_i; prefix_len - 1 + i predicts it


class Generator(nn.Module):
    """Base class of the backbones: the shared sizes, the alignment heads, the teacher-forced output, sampling and
    loading. `config` is the whole project config (model.generator.* and model.vq_model.codebook_size)."""

    prefix_len: int = 1
    supports_orders: bool = False  # RAR's randomized order
    has_mask_token: bool = False  # its token table embeds the mask token V (noisy context's `mask` mode)
    has_fast_sampler: bool = False
    draws_before_sampling: bool = False  # see start_sampling
    guidance_schedule: str = "cosine_power"
    checkpoint_keys: Tuple[str, ...] = ()  # where a released training checkpoint keeps the weights ("model", ...)

    def __init__(self, config):
        super().__init__()
        config = validate(config)
        g = config.model.generator
        self.codebook_size = config.model.vq_model.codebook_size
        self.num_classes = g.condition_num_classes
        self.null_class = self.num_classes  # raw label C
        self.image_seq_len = g.image_seq_len
        self.hidden_size = g.hidden_size
        self.use_checkpoint = g.use_checkpoint

    def attach_alignment_heads(self, config) -> None:
        """reAR's heads (as configured) on this backbone; call at the end of the subclass's __init__ layers."""
        self.alignment_heads: Dict[str, int] = add_alignment_heads(self, validate(config))

    # ------------------------------------------------------------------------------ what a backbone provides
    def hidden_states(self, input_ids: Tensor, class_ids: Tensor, layers: Sequence[int],
                      orders: Optional[Tensor] = None) -> Tuple[Tensor, Dict[int, Tensor]]:
        raise NotImplementedError

    def new_caches(self, rows: int):
        raise NotImplementedError

    def next_token_logits(self, prefix: Tensor, class_ids: Tensor, caches=None) -> Tensor:
        raise NotImplementedError

    def check_ids(self, input_ids: Optional[Tensor], class_ids: Tensor) -> None:
        """Raw labels in [0, C] (C the null class), image tokens in [0, V), at most N of them."""
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

    @property
    def transformer_blocks(self) -> nn.ModuleList:
        """The backbone's blocks in order (under the original's module name)."""
        return self.blocks

    def through_blocks(self, x: Tensor, *inputs, caches: Optional[Sequence] = None,
                       keep: Sequence[int] = ()) -> Tuple[Tensor, Dict[int, Tensor]]:
        """x through every block, called as `block(x, *inputs, cache)`; returns the last hidden states and those
        after the blocks in `keep`. With `use_checkpoint` in training, each block's activations are recomputed in
        the backward pass instead of kept."""
        blocks = self.transformer_blocks
        outside = [k for k in keep if not 0 <= k < len(blocks)]
        if outside:
            raise ValueError(f"layer {outside[0]} is outside the {len(blocks)} blocks")
        kept = {}
        for idx, block in enumerate(blocks):
            cache = None if caches is None else caches[idx]
            if self.use_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, *inputs, cache, use_reentrant=False)
            else:
                x = block(x, *inputs, cache)
            if idx in keep:
                kept[idx] = x
        return x, kept

    # ------------------------------------------------------------------------------ how its original samples
    def start_sampling(self, class_ids: Tensor) -> None:
        """Random draws the original sampler makes before its first step. RAR's (and AliTok's, a fork of it) maps the
        labels through its class-dropout routine with p = 0, which still draws one uniform per sample from the global
        generator: without the same draw every token would differ (`draws_before_sampling`)."""
        if self.draws_before_sampling:
            torch.rand(class_ids.shape, device=class_ids.device)

    def uses_guidance(self, guidance_scale: float) -> bool:
        """Whether sampling at this scale runs the rows [conditional; null class] (RAR's samplers: any scale but 0)."""
        return guidance_scale != 0

    def guidance_scale_at(self, step: int, guidance: Guidance, device=None) -> Union[Tensor, float, None]:
        """The guidance scale of token `step`, or None: that token comes from the conditional logits alone (after
        `guidance.interval`, GigaTok's cfg_interval: its decode step step-1 > interval; the batch stays doubled)."""
        if guidance.interval > -1 and step - 1 > guidance.interval:
            return None
        schedule = GUIDANCE_SCHEDULES[guidance.schedule or self.guidance_schedule]
        return schedule(step, self.image_seq_len, guidance, device)

    # ------------------------------------------------------------------------------ the method's side
    def forward(self, input_ids: Tensor, class_ids: Tensor, orders: Optional[Tensor] = None) -> GeneratorOutput:
        """Teacher-forced logits (B, N, V) and the alignment heads' outputs; `class_ids` are raw labels in [0, C],
        C the null class. `orders` (RAR) permute each sample's tokens and positions."""
        if orders is not None and not self.supports_orders:
            raise ValueError(f"the {type(self).__name__} backbone does not support RAR's randomized order")
        if not self.training:
            self.check_ids(input_ids, class_ids)
        heads = getattr(self, "alignment_heads", {})
        logits, hidden = self.hidden_states(input_ids, class_ids, sorted(set(heads.values())), orders)
        output = GeneratorOutput(logits=logits, prefix_len=self.prefix_len)
        for name, layer in heads.items():
            setattr(output, HEAD_OUTPUTS[name], getattr(self, name)(hidden[layer]))
        return output

    @torch.no_grad()
    def generate(self, class_ids: Tensor, guidance_scale: float, guidance_scale_pow: float, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, kv_cache: bool = True,
                 guidance_schedule: Optional[str] = None,
                 guidance_window: Tuple[float, float] = DEFAULT_GUIDANCE_WINDOW, cfg_interval: int = -1,
                 progress: Optional[Progress] = None) -> Tensor:
        """Sample (B, N) image tokens for raw class labels (B,): the readable sampler every backbone shares, which
        for a fixed `torch.manual_seed` draws its original sampler's tokens. Classifier-free guidance when the
        backbone `uses_guidance` at this scale (rows [conditional; null class] in one batch; each token's scale from
        `guidance_scale_at`). With `kv_cache` each step runs only the newest position; without it the whole prefix
        is recomputed (the originals' reference path). `progress(t, N)` is called after the t-th token."""
        self.check_ids(None, class_ids)
        self.start_sampling(class_ids)
        batch = len(class_ids)
        guidance = Guidance(guidance_scale, guidance_scale_pow, guidance_schedule, tuple(guidance_window), cfg_interval)
        use_cfg = self.uses_guidance(guidance_scale)
        if use_cfg:
            class_ids = torch.cat([class_ids, torch.full_like(class_ids, self.null_class)])
        caches = self.new_caches(len(class_ids)) if kv_cache else None
        tokens = class_ids.new_empty(batch, 0)
        for step in range(self.image_seq_len):
            prefix = torch.cat([tokens, tokens]) if use_cfg else tokens
            logits = self.next_token_logits(prefix, class_ids, caches)
            cfg = self.guidance_scale_at(step, guidance, logits.device) if use_cfg else None
            if use_cfg and cfg is None:
                logits = logits[:batch]  # guidance over: the conditional rows alone
            tokens = torch.cat([tokens, sample_next_token(logits, cfg, temperature, top_k, top_p)], dim=1)
            if progress is not None:
                progress(step + 1, self.image_seq_len)
        return tokens

    def num_parameters(self, exclude_alignment: bool = False) -> int:
        heads = set(HEAD_OUTPUTS) if exclude_alignment else set()
        return sum(p.numel() for name, p in self.named_parameters() if name.split(".")[0] not in heads)

    def load_weights_file(self, path: str, what: str, local_option: str = LOCAL_GENERATOR,
                          new_heads: bool = False) -> "Generator":
        """The weights at `path` (a local file, or a released file name fetched from where it is published; a
        training checkpoint is unwrapped by `checkpoint_keys`), loaded strictly. With `new_heads`, a checkpoint
        without the alignment heads (a released backbone such as AliTok-B) leaves this model's heads as initialised:
        reAR trained on top of it."""
        from utils.weights import load_checked, load_state_dict_file, resolve_weights, unwrap

        state = unwrap(load_state_dict_file(resolve_weights(path, local_option=local_option)), self.checkpoint_keys,
                       path)
        if new_heads and not any(key.split(".")[0] in HEAD_OUTPUTS for key in state):
            state = {**state, **{key: value for key, value in self.state_dict().items()
                                 if key.split(".")[0] in HEAD_OUTPUTS}}
        return load_checked(self, state, what)

    @classmethod
    def from_pretrained(cls, config, path: str) -> "Generator":
        """A generator built from `config` with the weights at `path` (see `load_weights_file`), in eval mode. A
        checkpoint without alignment heads loads into a config without them."""
        return cls(config).load_weights_file(path, f"generator checkpoint {path}").eval()


__all__ = ["Generator", "GeneratorOutput"]
