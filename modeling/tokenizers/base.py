"""What every tokenizer shares: it is frozen, its codebook gives its sizes, its inputs are checked; and the
convolutional tokenizers' (MaskGIT-VQGAN, VQGAN+) encode / decode over a square grid of tokens."""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from .checks import check_images, check_tokens


def conv_vqgan_sizes(state_dict: Mapping[str, Tensor], blocks: str) -> Optional[dict]:
    """The sizes a convolutional VQGAN's state dict records (its residual blocks under `encoder.down.<i>.<blocks>.`),
    or None if it is not one (loading then lists the misfits)."""
    names = ("encoder.conv_in.weight", f"encoder.down.0.{blocks}.0.conv1.weight", "quantize.embedding.weight")
    if not all(name in state_dict for name in names):
        return None
    hidden, num_channels = state_dict["encoder.conv_in.weight"].shape[:2]
    levels = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.down."))
    per_level = 1 + max(int(k.split(".")[4]) for k in state_dict if k.startswith(f"encoder.down.0.{blocks}."))
    codebook_size, token_size = state_dict["quantize.embedding.weight"].shape
    return {
        "channel_mult": [state_dict[f"encoder.down.{i}.{blocks}.0.conv1.weight"].shape[0] // hidden
                         for i in range(levels)],
        "num_resolutions": levels,
        "hidden_channels": hidden,
        "num_channels": num_channels,
        "num_res_blocks": per_level,
        "codebook_size": codebook_size,
        "token_size": token_size,
    }


def resolve_sizes(released: Mapping[str, object], config: Optional[Mapping[str, object]], what: str) -> dict:
    """A convolutional VQGAN's `released` config updated by `config`; an unknown key or inconsistent sizes are an
    error naming the tokenizer (`what`)."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(released))
    if unknown:
        raise ValueError(f"unknown {what} config keys {unknown}; known keys: {sorted(released)}")
    resolved = {**released, **config}
    resolved["channel_mult"] = list(resolved["channel_mult"])
    if resolved["num_resolutions"] != len(resolved["channel_mult"]):
        raise ValueError(
            f"num_resolutions ({resolved['num_resolutions']}) must equal len(channel_mult) "
            f"({len(resolved['channel_mult'])})"
        )
    return resolved


class RandomCodebook(nn.Module):
    """A stand-in for a tokenizer where only its alignment targets matter (speed measurements, tests of the
    objective): a random codebook looked up as a tokenizer's `get_quantized_states` is."""

    def __init__(self, codebook_size: int, width: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, width)

    def get_quantized_states(self, tokens: Tensor) -> Tensor:
        return self.embedding(tokens)


class Tokenizer(nn.Module):
    """A frozen tokenizer. Subclasses set `self.quantize` (with an `embedding` table) and implement `encode`,
    `decode_tokens` and `codebook_vectors`; `num_tokens` and `image_size` say what one image is."""

    needs_fit = False  # fitted on images by training rather than loaded (the toy tokenizer)
    decodes_prefixes = False  # any first k of its tokens decode (ReTok)
    pixel_rounding = "truncate"  # how its original writes decoded images as bytes: truncate | nearest

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Tokenizer":
        # Frozen: a parent's .train() must not switch dropout back on.
        return super().train(False)

    @property
    def codebook_size(self) -> int:
        return self.quantize.embedding.num_embeddings

    @property
    def token_size(self) -> int:
        return self.quantize.embedding.embedding_dim

    def codebook_vectors(self, tokens: Tensor) -> Tensor:
        """The original's own look-up of `tokens` (normalised where it normalises)."""
        return self.quantize.embedding(tokens)

    @torch.no_grad()
    def get_quantized_states(self, tokens: Tensor) -> Tensor:
        """Tokens (B, N) → their codebook vectors (B, N, token_size): what reAR's alignment heads are trained towards."""
        check_tokens(tokens, self.codebook_size)
        return self.codebook_vectors(tokens)


class SequenceTokenizer(Tokenizer):
    """A ViT tokenizer of fixed-size images into a 1D sequence (TiTok, AliTok, ReTok): its config holds
    `num_latent_tokens` and `image_size`."""

    @property
    def num_tokens(self) -> int:
        return self.config["num_latent_tokens"]

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    def check_images(self, images: Tensor) -> None:
        """A clear error unless `images` is a float (B, 3, image_size, image_size) batch."""
        expected = (3, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floats in [0, 1], got dtype {images.dtype}")


class ConvTokenizer(Tokenizer):
    """A convolutional VQGAN: `encoder` maps (B, 3, H, W) to a (B, C, H/f, W/f) grid whose vectors are looked up in
    the codebook row-major; `decoder` maps the grid of codebook vectors back to pixels."""

    image_size: int

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.config["num_resolutions"] - 1)

    @property
    def num_tokens(self) -> int:
        """Tokens of an `image_size` image (the network takes any multiple of the factor)."""
        return (self.image_size // self.downsample_factor) ** 2

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] → tokens (B, H/f · W/f), row-major."""
        check_images(images, self.config["num_channels"], self.downsample_factor)
        z = self.encoder(images).permute(0, 2, 3, 1)  # (B, h, w, C): rows of z are token positions, row-major
        return self.quantize.nearest_codes(z.reshape(-1, z.shape[-1])).reshape(images.shape[0], -1)

    @torch.no_grad()
    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """Tokens (B, N), N a square number → images (B, 3, H, W) clamped to [0, 1]."""
        codes = self.get_quantized_states(tokens)
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(f"decode_tokens needs a square number of tokens per image, got {tokens.shape[1]}")
        # contiguous, as the originals: a channels-last view would run other conv kernels (other rounding)
        z = codes.reshape(tokens.shape[0], side, side, self.token_size).permute(0, 3, 1, 2).contiguous()
        return self.decoder(z).clamp(0.0, 1.0)


__all__ = ["ConvTokenizer", "RandomCodebook", "SequenceTokenizer", "Tokenizer", "conv_vqgan_sizes", "resolve_sizes"]
