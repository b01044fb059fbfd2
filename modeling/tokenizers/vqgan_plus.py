"""VQGAN+: MaskBit's modernised convolutional VQGAN (Weber et al., arXiv 2409.16211), reAR's `vqplus` tokenizer.

The 12-bit release maps 256x256 RGB in [0, 1] to 16x16 = 256 tokens from a 4096 x 64 codebook, and back.
State-dict names are those of MaskBit's `ConvVQModel` (and of reAR's copy, `VQPlus`), so that the released
`vqgan_plus_12bit.bin` (Hugging Face `markweber/vqgan_plus_12bit`) loads with `strict=True`.

It is built from MaskGIT-VQGAN's blocks ("same"-padded convs, GroupNorm(32), the residual block whose 1x1 shortcut
reads the block's output) with four differences: downsampling by a strided 3x3 conv (`sample_with_conv`), every
level a `res_blocks` stage, the decoder's stages listed coarsest first, and MaskBit's own nearest-code formula.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from utils.weights import load_checked, load_state_dict_file, resolve_weights

from .base import ConvTokenizer, conv_vqgan_sizes, resolve_sizes
from .maskgit_vqgan import Conv2dSame, VectorQuantizer, group_norm, res_blocks

# The 12-bit release (MaskBit's configs/tokenizer/vqgan_plus_12bit.yaml, reAR's configs/rear_vqplus.yaml); the
# 10-bit `vqgan_plus_paper` differs only in codebook_size 1024 and token_size 256.
RELEASED_CONFIG = {
    "codebook_size": 4096,
    "token_size": 64,
    "num_channels": 3,
    "hidden_channels": 128,
    "channel_mult": [1, 1, 2, 2, 4],
    "num_resolutions": 5,
    "num_res_blocks": 2,
    "sample_with_conv": True,
}


def _resolve_config(config: Optional[Mapping[str, Any]]) -> dict:
    """The released config updated by `config`; an unknown key or an inconsistent size is an error."""
    return resolve_sizes(RELEASED_CONFIG, config, "VQGAN+")


class ResidualStage(nn.Module):
    """`num_res_blocks` residual blocks at one resolution (the first one may change the width)."""

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int):
        super().__init__()
        self.res_blocks = res_blocks(in_channels, out_channels, num_res_blocks, dropout=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x)
        return x


class DownsamplingStage(ResidualStage):
    """Residual blocks, then half the resolution: a strided 3x3 conv (VQGAN+) or 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, sample_with_conv: bool):
        super().__init__(in_channels, out_channels, num_res_blocks)
        self.sample_with_conv = sample_with_conv
        if sample_with_conv:
            self.down_conv = Conv2dSame(out_channels, out_channels, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return self.down_conv(x) if self.sample_with_conv else F.avg_pool2d(x, kernel_size=2, stride=2)


class UpsamplingStage(ResidualStage):
    """Residual blocks, then twice the resolution: nearest-neighbour upsampling and a 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int):
        super().__init__(in_channels, out_channels, num_res_blocks)
        self.upsample_conv = Conv2dSame(out_channels, out_channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample_conv(F.interpolate(super().forward(x), scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """Image -> (B, token_size, H/f, W/f): a stage per level (all but the last downsample), a middle stage."""

    def __init__(self, c: dict):
        super().__init__()
        widths = [c["hidden_channels"] * m for m in c["channel_mult"]]
        widths_in = [c["hidden_channels"]] + widths[:-1]
        last = c["num_resolutions"] - 1
        self.conv_in = Conv2dSame(c["num_channels"], c["hidden_channels"], kernel_size=3, bias=False)
        self.down = nn.ModuleList(
            DownsamplingStage(widths_in[i], widths[i], c["num_res_blocks"], c["sample_with_conv"])
            if i < last
            else ResidualStage(widths_in[i], widths[i], c["num_res_blocks"])
            for i in range(c["num_resolutions"])
        )
        self.mid = ResidualStage(widths[-1], widths[-1], c["num_res_blocks"])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = Conv2dSame(widths[-1], c["token_size"], kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for stage in [*self.down, self.mid]:
            x = stage(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Codebook vectors (B, token_size, h, w) -> image: a middle stage, then a stage per level from the coarsest."""

    def __init__(self, c: dict):
        super().__init__()
        widths = [c["hidden_channels"] * m for m in c["channel_mult"]]
        widths_in = widths[1:] + widths[-1:]  # level i reads the output of level i + 1 (the coarsest reads the middle)
        self.conv_in = Conv2dSame(c["token_size"], widths[-1], kernel_size=3)
        self.mid = ResidualStage(widths[-1], widths[-1], c["num_res_blocks"])
        # Unlike MaskGIT-VQGAN's decoder, up.0 is the coarsest level: the list is in the order the stages run.
        self.up = nn.ModuleList(
            UpsamplingStage(widths_in[i], widths[i], c["num_res_blocks"])
            if i > 0
            else ResidualStage(widths_in[i], widths[i], c["num_res_blocks"])
            for i in reversed(range(c["num_resolutions"]))
        )
        self.norm_out = group_norm(widths[0])
        self.conv_out = Conv2dSame(widths[0], c["num_channels"], kernel_size=3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for stage in [self.mid, *self.up]:
            x = stage(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Codebook(VectorQuantizer):
    """The codebook (`quantize.embedding`), with MaskBit's nearest-code formula."""

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry for each row of z (M, C), by squared L2 distance.

        MaskBit's `SimpleVectorizer` formula, in its order of operations (||z||^2 + ||e||^2, minus 2 z.e from an
        einsum), in float32 and outside autocast: the released tokens came from it, and another formula rounds
        differently and can flip near-ties.
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            e = self.embedding.weight.float()
            distances = (
                z.pow(2).sum(dim=1, keepdim=True) + e.pow(2).sum(dim=1) - 2 * torch.einsum("bd,dn->bn", z, e.t())
            )
        return distances.argmin(dim=1)


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Optional[dict]:
    """The architecture (RELEASED_CONFIG's keys) a VQGAN+ state dict was saved from, or None if it is not one
    (loading then lists the misfits)."""
    sizes = conv_vqgan_sizes(state_dict, "res_blocks")
    if sizes is None:
        return None
    return {**sizes, "sample_with_conv": sizes["num_resolutions"] > 1 and "encoder.down.0.down_conv.weight" in state_dict}


class VQGANPlus(ConvTokenizer):
    """The frozen tokenizer: `encode` images to tokens, `decode_tokens` back, `get_quantized_states` for alignment
    (the codebook vectors as MaskBit's lookup returns them, not normalised). Inputs are [0, 1] with no further
    normalisation, as MaskBit trained."""

    def __init__(self, config: Optional[Mapping[str, Any]] = None, image_size: int = 256):
        super().__init__()
        self.config = _resolve_config(config)
        self.image_size = image_size
        if image_size % self.downsample_factor:
            raise ValueError(f"image_size ({image_size}) must be a multiple of {self.downsample_factor}")
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quantize = Codebook(self.config["codebook_size"], self.config["token_size"])
        self.freeze()

    @classmethod
    def from_pretrained(
        cls, path: str, config: Optional[Mapping[str, Any]] = None, image_size: int = 256
    ) -> "VQGANPlus":
        """Load weights strictly: the released `.bin` (a plain state dict, as MaskBit's `save_pretrained` writes it)
        or a `.safetensors` file. Without `config` the architecture is read off the weights' shapes, so both
        released files (12-bit and the paper's 10-bit) load through this path."""
        state_dict = load_state_dict_file(resolve_weights(path))  # first, so that a missing file fails at once
        if config is None:
            config = config_from_state_dict(state_dict)
        return load_checked(cls(config, image_size), state_dict, what=f"VQGAN+ weights {path}")
