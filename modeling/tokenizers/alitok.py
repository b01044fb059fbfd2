"""AliTok: the frozen 1D tokenizer of "AliTok: Towards Sequence Modeling Alignment between Tokenizer and
Autoregressive Model" (Wu et al., arXiv 2506.05289; github.com/ali-vilab/alitok).

256x256 RGB in [0, 1] -> 273 tokens from a 4096 x 32 codebook: 17 prefix tokens, then 256 tokens at whose
decoder positions the 16x16 patches come out. The generator predicts all 273 in this order, and `decode_tokens`
takes all 273 (the prefix tokens reach the image only through the decoder's attention).
- Encoder: a ViT over the 16x16 patches followed by 273 learned latent tokens (full attention); each latent
  token's output, projected to 32 dims, becomes the index of its nearest code (plain squared L2, no normalisation).
- Decoder: 32 learned tokens, then the 273 codes, through a ViT with full attention; the outputs at the last 256
  positions are the patches in raster order (1x1 conv to 16*16*3 pixels, a 1x1 conv on RGB, sigmoid).

This is the inference model of the release (`modeling/alitok.py`), the stage-2 model of the paper's two-stage
training: the encoder and codebook come from stage 1 (trained with a causal decoder), the decoder was retrained
with full attention. The released `AliTok.pth` is a plain state dict of it; the names here are the original's, so
it loads with strict=True.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.weights import load_checked, load_state_dict_file, resolve_weights, unwrap

from .base import SequenceTokenizer


@dataclass(frozen=True)
class AliTokConfig:
    """The released architecture. The original hard-codes all of it but the first three (its YAML's keys)."""

    codebook_size: int = 4096
    token_size: int = 32
    num_latent_tokens: int = 273  # prefix tokens + (image_size / patch_size)**2
    image_size: int = 256
    patch_size: int = 16
    encoder_width: int = 768
    encoder_layers: int = 12
    encoder_heads: int = 12
    decoder_width: int = 1024
    decoder_layers: int = 24
    decoder_heads: int = 16
    decoder_class_tokens: int = 32  # the learned tokens in front of the codes (`decoder.class_embedding`)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.num_latent_tokens < self.grid_size**2:
            raise ValueError(
                f"num_latent_tokens ({self.num_latent_tokens}) must be at least the {self.grid_size**2} patches "
                f"of a {self.image_size}x{self.image_size} image (AliTok: 17 prefix tokens + 256 = 273)"
            )
        for part in ("encoder", "decoder"):
            width, heads = getattr(self, f"{part}_width"), getattr(self, f"{part}_heads")
            if width % heads:
                raise ValueError(f"{part}_width ({width}) must be a multiple of {part}_heads ({heads})")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return self.num_latent_tokens - self.grid_size**2


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.in_proj(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(x.transpose(1, 2).reshape(b, n, d))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block, MLP ratio 4, exact GELU."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width))
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def transformer(width: int, heads: int, layers: int) -> nn.ModuleList:
    return nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))


class Encoder(nn.Module):
    def __init__(self, c: AliTokConfig):
        super().__init__()
        width, scale = c.encoder_width, c.encoder_width**-0.5
        self.num_patches = c.grid_size**2
        self.patch_embed = nn.Conv2d(3, width, kernel_size=c.patch_size, stride=c.patch_size)
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.num_patches, width))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(c.num_latent_tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = transformer(width, c.encoder_heads, c.encoder_layers)
        self.ln_post = nn.LayerNorm(width)
        self.conv_out = nn.Conv2d(width, c.token_size, kernel_size=1)

    def forward(self, images: Tensor, latent_tokens: Tensor) -> Tensor:
        """Images (B, 3, H, W) and the learned latent tokens (N, width) -> unquantized latents (B, N, token_size)."""
        patches = self.patch_embed(images).flatten(2).transpose(1, 2) + self.positional_embedding
        latents = (latent_tokens + self.latent_token_positional_embedding).expand(images.shape[0], -1, -1)
        x = self.ln_pre(torch.cat([patches, latents], dim=1))
        for block in self.transformer:
            x = block(x)
        x = self.ln_post(x[:, self.num_patches :])
        # The projection is a 1x1 conv over the latents laid out as (B, width, N, 1), as in the original: a token
        # is decided by the last bits of these values, so they are computed by the same kernel.
        return self.conv_out(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)


class Decoder(nn.Module):
    def __init__(self, c: AliTokConfig):
        super().__init__()
        width, scale = c.decoder_width, c.decoder_width**-0.5
        self.grid_size, self.patch_size = c.grid_size, c.patch_size
        self.decoder_embed = nn.Linear(c.token_size, width)
        self.class_embedding = nn.Parameter(scale * torch.randn(c.decoder_class_tokens, width))
        self.latent_token_positional_embedding = nn.Parameter(
            scale * torch.randn(c.decoder_class_tokens + c.num_latent_tokens, width)
        )
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = transformer(width, c.decoder_heads, c.decoder_layers)
        self.ln_post = nn.LayerNorm(width)
        # A Sequential of one conv: the released weights name it `ffn.0` (the original's second entry, an einops
        # Rearrange, has no weights and is `unpatchify` here).
        self.ffn = nn.Sequential(nn.Conv2d(width, c.patch_size**2 * 3, kernel_size=1))
        self.conv_out = nn.Conv2d(3, 3, kernel_size=1)

    def forward(self, codes: Tensor) -> Tensor:
        """Codebook vectors (B, N, token_size) -> images (B, 3, H, W) in (0, 1)."""
        b, g = codes.shape[0], self.grid_size
        x = torch.cat([self.class_embedding.expand(b, -1, -1), self.decoder_embed(codes)], dim=1)
        x = self.ln_pre(x + self.latent_token_positional_embedding)
        for block in self.transformer:
            x = block(x)
        # The last g*g positions are the patches (the original inference file writes -image_size, which is 256
        # = 16**2 only at the released size; its training code writes -grid_size**2).
        x = self.ln_post(x[:, -g * g :])
        x = self.ffn(x.transpose(1, 2).reshape(b, -1, g, g))
        return torch.sigmoid(self.conv_out(self.unpatchify(x)))

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, p*p*3, g, g), channels ordered (row in patch, column in patch, RGB) -> (B, 3, g*p, g*p)."""
        b, p, g = x.shape[0], self.patch_size, self.grid_size
        return x.view(b, p, p, 3, g, g).permute(0, 3, 4, 1, 5, 2).reshape(b, 3, g * p, g * p)


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, token_size: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, token_size)

    def nearest_codes(self, z: Tensor) -> Tensor:
        """Index of the nearest codebook entry for each row of z (M, token_size), by squared L2 distance.

        The original's formula, operation for operation, in float32 outside autocast: another formula rounds
        differently and can flip a near-tie to another token.
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            z, codebook = z.float(), self.embedding.weight.float()
            distances = (
                torch.sum(z**2, dim=1, keepdim=True)
                + torch.sum(codebook**2, dim=1)
                - 2 * torch.einsum("bd,dn->bn", z, codebook.T)
            )
        return distances.argmin(dim=1)


class AliTok(SequenceTokenizer):
    """The frozen tokenizer: `encode` images to tokens, `decode_tokens` back, `get_quantized_states` for alignment."""

    def __init__(self, config: AliTokConfig = AliTokConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        width = config.encoder_width
        self.latent_tokens = nn.Parameter(width**-0.5 * torch.randn(config.num_latent_tokens, width))
        self.quantize = VectorQuantizer(config.codebook_size, config.token_size)
        self.freeze()

    @classmethod
    def from_pretrained(cls, path: str, config: AliTokConfig = AliTokConfig()) -> "AliTok":
        """Load the released `AliTok.pth` (a plain state dict; published on Google Drive only, so a local path)
        or a `.bin` / `.pt` / `.safetensors` file with the same names, with strict key and shape checking.

        A checkpoint of the original's tokenizer training (`train_tokenizer.py`, stage 2) keeps the model
        under "model_state"; that is read too.
        """
        # first, so that a missing file fails before building the model
        state_dict = unwrap(load_state_dict_file(resolve_weights(path)), ("model_state",), path)
        return load_checked(cls(config), state_dict, what=f"AliTok weights {path}")

    @property
    def num_tokens(self) -> int:
        """Tokens per image, prefix tokens included (273 released)."""
        return self.config.num_latent_tokens

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, image_size, image_size) in [0, 1] (fed as they are, no normalisation) -> tokens (B, N)."""
        self.check_images(images)
        z = self.encoder(images, self.latent_tokens)
        return self.quantize.nearest_codes(z.reshape(-1, self.token_size)).view(images.shape[0], -1)

    @torch.no_grad()
    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """Tokens (B, num_tokens), prefix tokens first -> images (B, 3, image_size, image_size) in [0, 1]."""
        if tokens.dim() == 2 and tokens.shape[1] != self.num_tokens:
            raise ValueError(
                f"decode_tokens needs all {self.num_tokens} tokens of an image ({self.config.num_prefix_tokens} "
                f"prefix + {self.config.grid_size**2}), got {tokens.shape[1]}"
            )
        return self.decoder(self.get_quantized_states(tokens)).clamp(0.0, 1.0)
