"""TiTok: a 1D image tokenizer, 256x256 images -> 32, 64 or 128 tokens (Yu et al., arXiv 2406.07550).

A ViT encoder reads the image patches together with N learned latent tokens; its outputs at the latent tokens,
projected to `token_size` and quantized against a codebook, are the image's tokens: a 1D sequence, not a grid.
A ViT decoder reads the N codes together with a grid of mask tokens. In the released two-stage models
(TiTok-L-32, B-64, S-128: `is_legacy` and `finetune_decoder`) it predicts, per grid cell, a distribution over
MaskGIT-VQGAN's 1024 codes, and the expected code goes through MaskGIT-VQGAN's pixel decoder. The single-stage
models (the VQ-8k ones: `is_legacy: False`, `finetune_decoder: False`) predict the pixels directly.

State-dict names and numerics are those of bytedance/1d-tokenizer's `modeling/titok.py`, so that the released
weights load with strict=True and give the same tokens. The architecture is read from the keys of the original
YAML's `model.vq_model` section, plus `image_size` (the YAML's `dataset.preprocessing.crop_size`) and two options
of ours for sizes the original does not build (tests): `vit_model_sizes` adds named ViT sizes to the
small / base / large table, and `pixel_decoder_config` replaces keys of the released MaskGIT-VQGAN pixel decoder.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from utils.weights import is_model_folder, load_checked, load_state_dict_file, resolve_weights

from .maskgit_vqgan import Decoder as PixelDecoder
from .maskgit_vqgan import VectorQuantizer as PixelCodebook
from .base import SequenceTokenizer
from .maskgit_vqgan import resolve_config as resolve_pixel_decoder_config


class ViTSize(NamedTuple):
    width: int
    num_layers: int
    num_heads: int


# The original's table for vit_enc_model_size / vit_dec_model_size.
VIT_SIZES = {
    "small": ViTSize(width=512, num_layers=8, num_heads=8),
    "base": ViTSize(width=768, num_layers=12, num_heads=12),
    "large": ViTSize(width=1024, num_layers=24, num_heads=16),
}

# The keys the original reads with a default (image_size is its dataset.preprocessing.crop_size), and ours.
DEFAULTS = {
    "image_size": 256,
    "vit_enc_patch_size": 16,
    "vit_dec_patch_size": 16,
    "use_l2_norm": False,
    "quantize_mode": "vq",
    "is_legacy": True,
    "finetune_decoder": True,
    "vit_model_sizes": {},
    "pixel_decoder_config": {},
}
REQUIRED = ("codebook_size", "token_size", "num_latent_tokens", "vit_enc_model_size", "vit_dec_model_size")

# configs/infer/TiTok/titok_{l32,b64,s128}.yaml, and the released state dicts on the Hub repo fun-research/TiTok.
RELEASED_CONFIGS = {
    f"titok_{name}": {
        "codebook_size": 4096,
        "token_size": 12,
        "use_l2_norm": True,
        "vit_enc_model_size": size,
        "vit_dec_model_size": size,
        "num_latent_tokens": tokens,
    }
    for name, size, tokens in (("l32", "large", 32), ("b64", "base", 64), ("s128", "small", 128))
}
RELEASED_FILES = {f"tokenizer_{name}.bin": name for name in RELEASED_CONFIGS}
# What PyTorchModelHubMixin writes to a folder (the Hub repos yucornetto/tokenizer_titok_*_imagenet), newest first.
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def resolve_config(config: Mapping[str, Any]) -> dict:
    """`config` with the original's defaults filled in; an unknown or missing key, or a variant without discrete
    tokens and a pixel decoder, is an error."""
    unknown = sorted(set(config) - set(DEFAULTS) - set(REQUIRED))
    if unknown:
        raise ValueError(f"unknown TiTok config keys {unknown}; known keys: {sorted([*DEFAULTS, *REQUIRED])}")
    missing = [key for key in REQUIRED if config.get(key) is None]
    if missing:
        raise ValueError(f"TiTok config is missing {missing} (model.vq_model.* in a YAML config)")
    c = {**DEFAULTS, **config}
    if c["quantize_mode"] != "vq":
        raise ValueError(f"TiTok quantize_mode '{c['quantize_mode']}' has no discrete tokens; only 'vq' is supported")
    if c["is_legacy"] != c["finetune_decoder"]:
        raise ValueError(
            f"TiTok with is_legacy={c['is_legacy']} and finetune_decoder={c['finetune_decoder']} does not decode to "
            "images: the two-stage models (TiTok-L-32, B-64, S-128) set both True, the single-stage ones both False"
        )
    for which in ("enc", "dec"):
        vit_size(c, which)
        if c["image_size"] % c[f"vit_{which}_patch_size"]:
            raise ValueError(f"image_size {c['image_size']} is not a multiple of vit_{which}_patch_size")
    if c["is_legacy"]:
        c["pixel_decoder_config"] = resolve_pixel_decoder_config(c["pixel_decoder_config"])
        upsampling = 2 ** (c["pixel_decoder_config"]["num_resolutions"] - 1)
        if c["vit_dec_patch_size"] != upsampling:
            raise ValueError(
                f"vit_dec_patch_size ({c['vit_dec_patch_size']}) must equal the pixel decoder's upsampling "
                f"({upsampling}) for the decoded images to have image_size"
            )
    return c


def vit_size(config: Mapping[str, Any], which: str) -> ViTSize:
    """The ViT size named by `vit_{which}_model_size` ("enc" or "dec")."""
    for name, size in config["vit_model_sizes"].items():
        if len(size) != 3:
            raise ValueError(f"vit_model_sizes['{name}'] must be [width, num_layers, num_heads], got {size}")
    sizes = {**VIT_SIZES, **{name: ViTSize(*size) for name, size in config["vit_model_sizes"].items()}}
    name = config[f"vit_{which}_model_size"]
    if name not in sizes:
        raise ValueError(f"unknown vit_{which}_model_size '{name}'; known: {sorted(sizes)}")
    return sizes[name]


def config_from_vq_model(vq_model: Mapping[str, Any], image_size: int) -> dict:
    """The TiTok config in a `model.vq_model` section (of a YAML config or a Hub folder's config.json); other
    tokenizers' keys and keys without effect on a frozen tokenizer (commitment_cost, ...) are left out."""
    keys = (*REQUIRED, *DEFAULTS)
    return {key: _plain(vq_model[key]) for key in keys if key in vq_model and vq_model[key] is not None} | {
        "image_size": image_size
    }


def _plain(value: Any) -> Any:
    """A plain dict / list for an OmegaConf container (the schema's mapping-valued keys)."""
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block (open_clip's): x + attn(ln_1(x)), then x + mlp(ln_2(x)), on (L, B, D)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        # Sequence-first, as in the original: batch_first would take PyTorch's fused fast path in eval mode,
        # which rounds differently.
        self.attn = nn.MultiheadAttention(width, num_heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """The part TiTok's encoder and decoder share: a class token, a grid of g*g tokens and N latent tokens with
    learned positions, through LayerNorm, the transformer blocks and a final LayerNorm."""

    def __init__(self, size: ViTSize, grid_size: int, num_latent_tokens: int):
        super().__init__()
        width, scale = size.width, size.width**-0.5
        self.grid_size = grid_size
        self.class_embedding = nn.Parameter(scale * torch.randn(1, width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid_size**2 + 1, width))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(num_latent_tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList(ResidualAttentionBlock(width, size.num_heads) for _ in range(size.num_layers))
        self.ln_post = nn.LayerNorm(width)

    def grid_with_class_token(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, g*g, D) grid tokens -> (B, 1 + g*g, D): the class token first, positions added."""
        class_token = self.class_embedding.expand(grid.shape[0], 1, -1).to(grid.dtype)
        return torch.cat([class_token, grid], dim=1) + self.positional_embedding.to(grid.dtype)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_pre(x).transpose(0, 1)
        for block in self.transformer:
            x = block(x)
        return x.transpose(0, 1)


class TiTokEncoder(ViT):
    def __init__(self, c: dict):
        size, patch = vit_size(c, "enc"), c["vit_enc_patch_size"]
        super().__init__(size, c["image_size"] // patch, c["num_latent_tokens"])
        self.width, self.is_legacy = size.width, c["is_legacy"]
        self.patch_embed = nn.Conv2d(3, size.width, kernel_size=patch, stride=patch)
        self.conv_out = nn.Conv2d(size.width, c["token_size"], kernel_size=1)

    def forward(self, images: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) and the learned latent tokens (N, D) -> the unquantized tokens (B, N, token_size)."""
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, g*g, D), row-major
        latents = latent_tokens.expand(images.shape[0], -1, -1).to(patches.dtype)
        latents = latents + self.latent_token_positional_embedding.to(patches.dtype)
        x = self.transform(torch.cat([self.grid_with_class_token(patches), latents], dim=1))
        latents = self.ln_post(x[:, 1 + self.grid_size**2 :])
        return self.project(latents)

    def project(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, token_size) by the 1x1 conv_out."""
        batch, num_tokens, width = latents.shape
        if self.is_legacy:
            # Quirk of the released two-stage models, which their weights depend on: the (N, D) latents are
            # *reshaped* to D channels x N positions, not transposed, so every output token mixes several latents.
            channels_first = latents.reshape(batch, width, num_tokens)
        else:
            channels_first = latents.transpose(1, 2)
        return self.conv_out(channels_first.unsqueeze(-1)).squeeze(-1).transpose(1, 2)


class TiTokDecoder(ViT):
    def __init__(self, c: dict):
        size, patch = vit_size(c, "dec"), c["vit_dec_patch_size"]
        super().__init__(size, c["image_size"] // patch, c["num_latent_tokens"])
        self.patch_size, self.is_legacy = patch, c["is_legacy"]
        self.decoder_embed = nn.Linear(c["token_size"], size.width)
        self.mask_token = nn.Parameter(size.width**-0.5 * torch.randn(1, 1, size.width))
        if self.is_legacy:
            # Logits over the pixel decoder's codebook at each grid cell.
            pixel_codes = c["pixel_decoder_config"]["codebook_size"]
            self.ffn = nn.Sequential(
                nn.Conv2d(size.width, 2 * size.width, kernel_size=1),
                nn.Tanh(),
                nn.Conv2d(2 * size.width, pixel_codes, kernel_size=1),
            )
        else:
            # The p*p*3 pixels of each grid cell's patch, then a 3x3 conv over the image (a one-layer Sequential
            # for the original's name, ffn.0).
            self.ffn = nn.Sequential(nn.Conv2d(size.width, patch * patch * 3, kernel_size=1))
            self.conv_out = nn.Conv2d(3, 3, kernel_size=3, padding=1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, N, token_size) -> pixel-code logits (B, 1024, g, g), or images (B, 3, H, W) if not legacy."""
        batch, g = codes.shape[0], self.grid_size
        latents = self.decoder_embed(codes)
        latents = latents + self.latent_token_positional_embedding
        mask_tokens = self.mask_token.expand(batch, g * g, -1).to(latents.dtype)
        x = self.transform(torch.cat([self.grid_with_class_token(mask_tokens), latents], dim=1))
        grid = self.ln_post(x[:, 1 : 1 + g * g])
        out = self.ffn(grid.transpose(1, 2).reshape(batch, -1, g, g))
        return out if self.is_legacy else self.conv_out(self.patches_to_image(out))

    def patches_to_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, p*p*3, g, g), channels ordered (row in patch, column in patch, colour) -> (B, 3, g*p, g*p)."""
        batch, p, g = x.shape[0], self.patch_size, self.grid_size
        x = x.reshape(batch, p, p, 3, g, g).permute(0, 3, 4, 1, 5, 2)
        return x.reshape(batch, 3, g * p, g * p)


class TiTokQuantizer(nn.Module):
    """TiTok's codebook: nearest code by squared L2 distance, on the unit sphere when `use_l2_norm`."""

    def __init__(self, codebook_size: int, token_size: int, use_l2_norm: bool):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, token_size)
        self.use_l2_norm = use_l2_norm

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of z (M, token_size).

        In float32 outside autocast, with the original's exact formula: the tokens generators are trained on
        came from it, and another formula rounds differently and flips near-ties to other tokens.
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            z, codebook = z.float(), self.embedding.weight.float()
            if self.use_l2_norm:
                z, codebook = F.normalize(z, dim=-1), F.normalize(codebook, dim=-1)
            distances = (
                torch.sum(z**2, dim=1, keepdim=True)
                + torch.sum(codebook**2, dim=1)
                - 2 * torch.einsum("bd,dn->bn", z, codebook.T)
            )
        return distances.argmin(dim=1)

    def codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """The code vectors of `tokens` (any shape) -> (..., token_size), normalised when `use_l2_norm`."""
        codes = self.embedding(tokens)
        return F.normalize(codes, dim=-1) if self.use_l2_norm else codes


class TiTok(SequenceTokenizer):
    """The frozen tokenizer: `encode` images to N tokens, `decode_tokens` back, `get_quantized_states` for alignment."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.config = c = resolve_config(config)
        self.encoder = TiTokEncoder(c)
        self.decoder = TiTokDecoder(c)
        width = self.encoder.width
        self.latent_tokens = nn.Parameter(width**-0.5 * torch.randn(c["num_latent_tokens"], width))
        self.quantize = TiTokQuantizer(c["codebook_size"], c["token_size"], c["use_l2_norm"])
        if c["is_legacy"]:
            pixel = c["pixel_decoder_config"]
            self.pixel_quantize = PixelCodebook(pixel["codebook_size"], pixel["token_size"])
            self.pixel_decoder = PixelDecoder(pixel)
        self.freeze()

    @classmethod
    def from_pretrained(cls, path_or_name: str, config: Optional[Mapping[str, Any]] = None) -> "TiTok":
        """Load released weights with strict key checking, weights-only.

        `path_or_name` is a weights file (`.bin`, `.pt`, `.pth`, `.safetensors`; local, or a released file name
        such as `tokenizer_titok_l32.bin`, fetched from fun-research/TiTok), or a folder holding config.json and
        model.safetensors or pytorch_model.bin (local, or a Hub repo such as yucornetto/tokenizer_titok_l32_imagenet).
        The architecture is `config` if given, else the folder's config.json, else the released one of that name.
        """
        if is_model_folder(path_or_name):
            if config is None:
                config = config_from_json(folder_file(path_or_name, "config.json"))
            weights = folder_weights(path_or_name)
        else:
            if config is None:
                name = os.path.basename(path_or_name)
                if name not in RELEASED_FILES:
                    raise ValueError(
                        f"TiTok.from_pretrained({path_or_name!r}) needs a config: the architecture is known only "
                        f"for the released files {sorted(RELEASED_FILES)}"
                    )
                config = RELEASED_CONFIGS[RELEASED_FILES[name]]
            weights = resolve_weights(path_or_name)
        state_dict = load_state_dict_file(weights)  # before building, so that a bad file fails at once
        return load_checked(cls(config), state_dict, what=f"TiTok weights {weights}")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1], S = image_size -> tokens (B, N)."""
        self.check_images(images)
        z = self.encoder(images, self.latent_tokens)
        return self.quantize.nearest_codes(z.reshape(-1, z.shape[-1])).reshape(images.shape[0], -1)

    def codebook_vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised when `use_l2_norm`, as the original's look-up."""
        return self.quantize.codes(tokens)

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N) -> images (B, 3, S, S) clamped to [0, 1]."""
        codes = self.get_quantized_states(tokens)
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(f"decode_tokens needs {self.num_tokens} tokens per image, got {tokens.shape[1]}")
        decoded = self.decoder(codes)
        if self.config["is_legacy"]:
            # The decoder's distribution over the pixel codebook, as its expected code.
            pixel_codes = torch.einsum("nchw,cd->ndhw", decoded.softmax(1), self.pixel_quantize.embedding.weight)
            decoded = self.pixel_decoder(pixel_codes)
        return decoded.clamp(0.0, 1.0)

def config_from_json(path: str) -> dict:
    """The TiTok config in a config.json written by the original's `save_pretrained` (its whole OmegaConf config)."""
    with open(path) as f:
        saved = json.load(f)
    try:
        return config_from_vq_model(saved["model"]["vq_model"], saved["dataset"]["preprocessing"]["crop_size"])
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is not a TiTok config.json: it needs model.vq_model and dataset.preprocessing.crop_size "
            f"(missing {err})"
        ) from None


def folder_file(folder: str, name: str) -> str:
    """The file `name` of a local folder, or of the Hub model repo `folder` (fetched)."""
    if os.path.isdir(folder):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint folder {folder} has no {name}")
        return path
    return resolve_weights(f"{folder}/{name}", hub_repo=folder)


def folder_weights(folder: str) -> str:
    """The weights of a PyTorchModelHubMixin folder: model.safetensors, else pytorch_model.bin."""
    for name in FOLDER_WEIGHTS:
        try:
            return folder_file(folder, name)
        except FileNotFoundError as err:
            missing = err
    raise FileNotFoundError(f"checkpoint folder {folder} has none of {list(FOLDER_WEIGHTS)}: {missing}")
