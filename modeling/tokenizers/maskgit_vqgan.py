"""MaskGIT-VQGAN: the frozen f16 image tokenizer reAR and RAR generate tokens for.

A PyTorch port of MaskGIT's VQGAN (no attention layers), as in the TiTok / RAR code, so that the released
`maskgit-vqgan-imagenet-f16-256.bin` (Hugging Face `fun-research/TiTok`) loads with `strict=True`:
256x256 RGB in [0, 1] -> 16x16 = 256 tokens from a 1024 x 256 codebook, and back.
Two details the weights depend on are kept on purpose; see `ResnetBlock.forward` and
`VectorQuantizer.nearest_codes`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from utils.weights import load_checked, load_state_dict_file, resolve_weights

from .base import ConvTokenizer, conv_vqgan_sizes, resolve_sizes

# The released f16 tokenizer; a mapping with (some of) these keys builds another size.
RELEASED_CONFIG = {
    "channel_mult": [1, 1, 2, 2, 4],
    "num_resolutions": 5,
    "dropout": 0.0,
    "hidden_channels": 128,
    "num_channels": 3,
    "num_res_blocks": 2,
    "resolution": 256,
    "z_channels": 256,
    "codebook_size": 1024,
    "token_size": 256,
}


def resolve_config(config: Optional[Mapping[str, Any]]) -> dict:
    """The released config updated by `config`; an unknown key or an inconsistent size is an error."""
    resolved = resolve_sizes(RELEASED_CONFIG, config, "MaskGIT-VQGAN")
    if resolved["z_channels"] != resolved["token_size"]:
        raise ValueError(
            f"z_channels ({resolved['z_channels']}) must equal token_size ({resolved['token_size']}): "
            "the encoder output is looked up in the codebook"
        )
    return resolved


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding (the odd pixel of padding goes to the bottom / right).

    The weights were trained in JAX/TF; PyTorch's symmetric padding would shift every feature map.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            pads.append(max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0))
        pad_h, pad_w = pads
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = Conv2dSame(in_channels, out_channels, kernel_size=3, bias=False)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2dSame(out_channels, out_channels, kernel_size=3, bias=False)
        self.changes_channels = in_channels != out_channels
        if self.changes_channels:
            # out -> out, not in -> out: it is applied to the block's output (see forward).
            self.nin_shortcut = Conv2dSame(out_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        # Quirk of the original port that the released weights depend on: when the channels change, the
        # "shortcut" is the 1x1 conv of the block's OUTPUT, not of its input, so the input is not carried over.
        residual = self.nin_shortcut(h) if self.changes_channels else x
        return h + residual


def res_blocks(in_channels: int, out_channels: int, count: int, dropout: float) -> nn.ModuleList:
    """`count` ResnetBlocks; the first maps in -> out channels, the rest out -> out."""
    channels = [in_channels] + [out_channels] * count
    return nn.ModuleList(ResnetBlock(channels[i], out_channels, dropout) for i in range(count))


class DownsamplingBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, dropout: float, downsample: bool):
        super().__init__()
        self.block = res_blocks(in_channels, out_channels, num_res_blocks, dropout)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2) if self.downsample else x


class UpsamplingBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, dropout: float, upsample: bool):
        super().__init__()
        self.block = res_blocks(in_channels, out_channels, num_res_blocks, dropout)
        self.upsample = upsample
        if upsample:
            self.upsample_conv = Conv2dSame(out_channels, out_channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.upsample:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Encoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        hidden, mult, levels = c["hidden_channels"], c["channel_mult"], c["num_resolutions"]
        in_mult = [1] + mult
        self.conv_in = Conv2dSame(c["num_channels"], hidden, kernel_size=3, bias=False)
        self.down = nn.ModuleList(
            DownsamplingBlock(
                hidden * in_mult[i], hidden * mult[i], c["num_res_blocks"], c["dropout"], downsample=i != levels - 1
            )
            for i in range(levels)
        )
        mid = hidden * mult[-1]
        self.mid = res_blocks(mid, mid, c["num_res_blocks"], c["dropout"])
        self.norm_out = group_norm(mid)
        self.conv_out = Conv2dSame(mid, c["z_channels"], kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in [*self.down, *self.mid]:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        hidden, mult, levels = c["hidden_channels"], c["channel_mult"], c["num_resolutions"]
        mid = hidden * mult[-1]
        self.conv_in = Conv2dSame(c["z_channels"], mid, kernel_size=3)
        self.mid = res_blocks(mid, mid, c["num_res_blocks"], c["dropout"])
        # Indexed by resolution level like the encoder (up.0 is the finest) and run from the coarsest.
        self.up = nn.ModuleList(
            UpsamplingBlock(
                mid if i == levels - 1 else hidden * mult[i + 1],
                hidden * mult[i],
                c["num_res_blocks"],
                c["dropout"],
                upsample=i != 0,
            )
            for i in range(levels)
        )
        self.norm_out = group_norm(hidden * mult[0])
        self.conv_out = Conv2dSame(hidden * mult[0], c["num_channels"], kernel_size=3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for block in [*self.mid, *reversed(self.up)]:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, token_size: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, token_size)

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry for each row of z (M, C), by squared L2 distance.

        Computed as ||z||^2 + ||e||^2 - 2 z.e with this exact addmm, in float32 and outside autocast: the
        tokens the generators were trained on came from this formula, and another formula or a lower precision
        rounds differently and flips near-ties to other tokens.
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            e_t = self.embedding.weight.float().t()
            distances = torch.addmm(
                z.pow(2).sum(dim=1, keepdim=True) + e_t.pow(2).sum(dim=0, keepdim=True), z, e_t, alpha=-2.0
            )
        return distances.argmin(dim=1)


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Optional[dict]:
    """The architecture a MaskGIT-VQGAN state dict was saved from (RELEASED_CONFIG's keys but `resolution` and
    `dropout`, which the weights do not record), or None if it is not one (loading then lists the misfits)."""
    sizes = conv_vqgan_sizes(state_dict, "block")
    return None if sizes is None else {**sizes, "z_channels": sizes["token_size"]}


class MaskGITVQGAN(ConvTokenizer):
    """The frozen tokenizer: `encode` images to tokens, `decode_tokens` back, `get_quantized_states` for alignment."""

    def __init__(self, config: Optional[Mapping[str, Any]] = None):
        super().__init__()
        self.config = resolve_config(config)
        self.image_size = self.config["resolution"]
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quantize = VectorQuantizer(self.config["codebook_size"], self.config["token_size"])
        self.freeze()

    @classmethod
    def from_pretrained(cls, path: str, config: Optional[Mapping[str, Any]] = None,
                        resolution: Optional[int] = None) -> "MaskGITVQGAN":
        """Load weights (the released `.bin` state dict, or a `.safetensors` file) with strict key checking.

        Without `config` the architecture is read off the weights' shapes (the released file gives the
        released architecture), so that a smaller tokenizer loads through the same path; `resolution` (which
        the weights do not record) sets the image size the tokenizer is used at."""
        state_dict = load_state_dict_file(resolve_weights(path))  # first, so that a missing file fails before building the model
        if config is None:
            config = config_from_state_dict(state_dict)
            if config is not None and resolution is not None:
                config["resolution"] = resolution
        return load_checked(cls(config), state_dict, what=f"MaskGIT-VQGAN weights {path}")
