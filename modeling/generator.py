"""The seam between reAR's method and an autoregressive backbone.

A backbone (the RAR-style transformer of `modeling/rear.py`, AliTok's AR, a LlamaGen-family GPT, ...) subclasses
`Generator` and provides the computation; the method — alignment heads, the objective, the sampling loop — is
written once against this small interface:

- `hidden_states(input_ids, class_ids, layers, orders=None) -> (logits (B, N, V), {k: hidden after block k})`,
  the teacher-forced pass; hidden states cover every position of the sequence the transformer runs, where
  position `prefix_len + i` reads tok_i and position `prefix_len - 1 + i` predicts it;
- `new_caches(rows)` and `next_token_logits(prefix, class_ids, caches)`: the logits of the token after `prefix`;
  with caches only the newest position runs (the first call runs the class / prefix positions);
- `check_ids`, and the attributes `codebook_size`, `num_classes`, `image_seq_len`, `null_class`, `hidden_size`.
What the originals' samplers do differently is data here: `guidance_schedule` (a name in
`modeling.sampler.GUIDANCE_SCHEDULES`) and `start_sampling` (random draws the original makes before its first step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from modeling import sampler
from modeling.objective import add_alignment_heads

LOCAL_GENERATOR = "experiment.generator_checkpoint=PATH"
HEAD_OUTPUTS = {"encode_align_mlp": "encode_z", "decode_align_mlp": "decode_z"}


@dataclass
class GeneratorOutput:
    logits: Tensor  # (B, N, V): logits[:, i] is the distribution of tok_i given the class and tok_<i
    encode_z: Optional[Tensor] = None  # (B, L, z): encode_align_mlp over every position
    decode_z: Optional[Tensor] = None  # (B, L, z): decode_align_mlp over every position
    prefix_len: int = 2  # position prefix_len + i reads tok_i; prefix_len - 1 + i predicts it


class Generator(nn.Module):
    """Base class of the backbones: the alignment heads, the teacher-forced output, sampling and loading."""

    prefix_len: int = 1
    supports_orders: bool = False  # RAR's randomized order
    has_fast_sampler: bool = False
    guidance_schedule: str = "cosine_power"

    def attach_alignment_heads(self, config) -> None:
        """reAR's heads (as configured) on this backbone; call at the end of the subclass's __init__ layers."""
        self.alignment_heads: Dict[str, int] = add_alignment_heads(self, config)

    # ------------------------------------------------------------------------------ what a backbone provides
    def hidden_states(self, input_ids: Tensor, class_ids: Tensor, layers: Sequence[int],
                      orders: Optional[Tensor] = None) -> Tuple[Tensor, Dict[int, Tensor]]:
        raise NotImplementedError

    def new_caches(self, rows: int):
        raise NotImplementedError

    def next_token_logits(self, prefix: Tensor, class_ids: Tensor, caches=None) -> Tensor:
        raise NotImplementedError

    def check_ids(self, input_ids: Optional[Tensor], class_ids: Tensor) -> None:
        raise NotImplementedError

    def start_sampling(self, class_ids: Tensor) -> None:
        """Random draws the original sampler makes before its first step (none by default)."""

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
                 top_k: Optional[int] = None, top_p: Optional[float] = None, kv_cache: bool = True) -> Tensor:
        """Sample (B, N) image tokens for raw class labels (B,); for a fixed `torch.manual_seed` this reproduces the
        original sampler's tokens (see `modeling.sampler.generate`)."""
        return sampler.generate(self, class_ids, guidance_scale, guidance_scale_pow, temperature, top_k, top_p, kv_cache)

    def num_parameters(self, exclude_alignment: bool = False) -> int:
        heads = set(HEAD_OUTPUTS) if exclude_alignment else set()
        return sum(p.numel() for name, p in self.named_parameters() if name.split(".")[0] not in heads)

    @staticmethod
    def unwrap_checkpoint(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """The state dict inside a released file (some originals wrap it, e.g. {"model": ...})."""
        return state

    @classmethod
    def from_pretrained(cls, config, path: str) -> "Generator":
        """A generator built from `config` with the weights at `path` (a local file, or a released file name fetched
        from where it is published). A checkpoint without alignment heads loads into a config without them."""
        from utils.weights import load_checked, load_state_dict_file, resolve_weights

        state = cls.unwrap_checkpoint(load_state_dict_file(resolve_weights(path, local_option=LOCAL_GENERATOR)))
        return load_checked(cls(config), state, f"generator checkpoint {path}").eval()


__all__ = ["Generator", "GeneratorOutput"]
