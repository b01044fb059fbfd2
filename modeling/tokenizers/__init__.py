"""Image tokenizers, chosen by `model.vq_model.model_type`.

A tokenizer is a frozen module with `encode(images in [0, 1]) -> (B, N)`, `decode_tokens(tokens)`,
`get_quantized_states(tokens) -> (B, N, token_size)` (the codebook vectors reAR's alignment heads are trained
towards) and the properties `codebook_size`, `token_size`, `num_tokens` and `image_size`. A new one is one module
and one `@register_tokenizer(name)` line: `builder(config, checkpoint)` gets the whole config and the weights file
to load, or None, and returns the tokenizer. What None means, its registration says: random weights (which
`build_tokenizer` refuses outside tests), or, with `fitted=True`, a tokenizer to fit: it has `needs_fit` set and a
`fit(images, iterations, seed)` method, and training fits it on the toy images at start-up (the toy tokenizer).
Its images are the data's: `data_image_size(config)`. The contract in full: docs/models.md.

Two optional attributes say how a tokenizer differs from the default, for the pipeline around it:
- `decodes_prefixes = True`: it decodes any first k of its N tokens (ReTok), so a generator may model only those;
- `pixel_rounding = "nearest"`: its original evaluation turns decoded images into bytes by rounding (ReTok,
  `clamp(127.5 x + 128)` of its [-1, 1] output) rather than RAR's truncation of 255 x (`to_uint8`).
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Callable, Dict, Optional, Set

import numpy as np
from omegaconf import OmegaConf
from torch import Tensor, nn

from modeling.sampler import to_uint8
from utils.config import canonical_choice, register_entry
from utils.errors import ConfigError, MissingWeightsError
from utils.weights import is_model_folder, load_checked, load_state_dict_file, resolve_weights

from .alitok import AliTok, AliTokConfig
from .maskgit_vqgan import MaskGITVQGAN
from .retok import ReTok
from .retok import config_from_vq_model as retok_config
from .titok import TiTok
from .titok import config_from_vq_model as titok_config
from .toy import PatchKMeansTokenizer
from .vqgan_plus import RELEASED_CONFIG as VQGAN_PLUS_CONFIG
from .vqgan_plus import VQGANPlus

TokenizerBuilder = Callable[[object, Optional[str]], nn.Module]
TOKENIZERS: Dict[str, TokenizerBuilder] = {}
RELEASED_WEIGHTS: Dict[str, str] = {}  # the weights a tokenizer loads when the config names none
PREFIX_TOKENIZERS: Set[str] = set()  # tokenizers that decode any first k of their tokens (ReTok)
FITTED_TOKENIZERS: Set[str] = set()  # tokenizers fitted at start-up when no weights are named (the toy one)
# The sizes an original fixes in its code rather than its YAML, which `model.vq_model.architecture` may set.
ARCHITECTURE_KEYS = {
    "alitok": tuple(f.name for f in fields(AliTokConfig)
                    if f.name not in ("codebook_size", "token_size", "num_latent_tokens", "image_size")),
    "retok": ("ch", "vit_sizes"),
}


def register_tokenizer(name: str, *aliases: str, released: Optional[str] = None, decodes_prefixes: bool = False,
                       fitted: bool = False) -> Callable[[TokenizerBuilder], TokenizerBuilder]:
    """Register `builder` under `name` (and the original configs' other names for it, `aliases`); `released` is the
    published weights file used when the config gives none; `decodes_prefixes`: any first k of its tokens decode;
    `fitted`: without weights it is fitted on images at start-up, rather than random."""

    def register(builder: TokenizerBuilder) -> TokenizerBuilder:
        register_entry(TOKENIZERS, "model.vq_model.model_type", "tokenizer", name, builder, aliases)
        if released:
            RELEASED_WEIGHTS[name] = released
        if decodes_prefixes:
            PREFIX_TOKENIZERS.add(name)
        if fitted:
            FITTED_TOKENIZERS.add(name)
        return builder

    return register


def data_image_size(config) -> int:
    """The size of the images the tokenizer is given: the toy set's `dataset.toy.image_size`, else
    `dataset.preprocessing.crop_size`."""
    return config.dataset.toy.image_size if config.dataset.name == "toy" else config.dataset.preprocessing.crop_size


@register_tokenizer("maskgit_vqgan", "maskgitvq", released="maskgit-vqgan-imagenet-f16-256.bin")
def build_maskgit_vqgan(config, checkpoint: Optional[str]) -> nn.Module:
    """The released f16 architecture (or the one the weights' shapes describe); random weights without a checkpoint."""
    resolution = data_image_size(config)
    if checkpoint:
        return MaskGITVQGAN.from_pretrained(checkpoint, resolution=resolution)
    return MaskGITVQGAN({"resolution": resolution})


@register_tokenizer("toy", fitted=True)
def build_toy_tokenizer(config, checkpoint: Optional[str]) -> nn.Module:
    """Patch k-means on the built-in toy images, loaded from `checkpoint` or fitted by training (`needs_fit`).
    Patch size = image size / sqrt(num_latent_tokens)."""
    vq, size = config.model.vq_model, data_image_size(config)
    side = math.isqrt(vq.num_latent_tokens)
    if side * side != vq.num_latent_tokens or size % side:
        raise ConfigError(
            f"'model.vq_model.num_latent_tokens' ({vq.num_latent_tokens}) must be a square whose side divides "
            f"the image size ({size})"
        )
    tokenizer = PatchKMeansTokenizer(vq.codebook_size, size // side, size)
    if checkpoint:
        return load_checked(tokenizer, load_state_dict_file(checkpoint), f"toy tokenizer {checkpoint}")
    tokenizer.needs_fit = True
    return tokenizer


@register_tokenizer("titok")
def build_titok(config, checkpoint: Optional[str]) -> nn.Module:
    """TiTok as `model.vq_model` describes it (the original YAML's keys), at the data's image size."""
    architecture = titok_config(config.model.vq_model, data_image_size(config))
    return TiTok.from_pretrained(checkpoint, architecture) if checkpoint else TiTok(architecture)


@register_tokenizer("vqgan_plus", "vqplus")
def build_vqgan_plus(config, checkpoint: Optional[str]) -> nn.Module:
    """MaskBit's VQGAN+, sized by the `model.vq_model` keys of its YAML (reAR's rear_vqplus.yaml)."""
    vq = config.model.vq_model
    if vq.quantizer_type != "lookup":
        raise ConfigError(f"'model.vq_model.quantizer_type' is '{vq.quantizer_type}': VQGAN+ needs 'lookup' "
                          "(MaskBit's 'lookup-free' tokenizer is another model)")
    architecture, size = {key: vq[key] for key in VQGAN_PLUS_CONFIG}, data_image_size(config)
    return VQGANPlus.from_pretrained(checkpoint, architecture, size) if checkpoint else VQGANPlus(architecture, size)


@register_tokenizer("alitok")
def build_alitok(config, checkpoint: Optional[str]) -> nn.Module:
    """AliTok's released architecture with `model.vq_model.{codebook_size, token_size, num_latent_tokens}` (4096, 32,
    273 = 17 prefix + 256 in its YAML) at the data's image size; the original fixes the rest in code
    (`model.vq_model.architecture` may set it)."""
    vq, image_size = config.model.vq_model, data_image_size(config)
    architecture = AliTokConfig(codebook_size=vq.codebook_size, token_size=vq.token_size,
                                num_latent_tokens=vq.num_latent_tokens, image_size=image_size,
                                **architecture_sizes(config, "alitok"))
    return AliTok.from_pretrained(checkpoint, architecture) if checkpoint else AliTok(architecture)


@register_tokenizer("retok", decodes_prefixes=True)
def build_retok(config, checkpoint: Optional[str]) -> nn.Module:
    """ReTok, the architecture from the original init_args' keys in `model.vq_model` (VQ_SB256 released), at
    the data's image size."""
    architecture = {**retok_config(config.model.vq_model), "image_size": data_image_size(config),
                    **architecture_sizes(config, "retok")}
    return ReTok.from_pretrained(checkpoint, architecture) if checkpoint else ReTok(architecture)


def architecture_sizes(config, name: str) -> dict:
    """`model.vq_model.architecture`: sizes the `name` tokenizer's original fixes in code (none for most)."""
    sizes = OmegaConf.to_container(config.model.vq_model.architecture)
    allowed = ARCHITECTURE_KEYS.get(name, ())
    unknown = sorted(set(sizes) - set(allowed))
    if unknown:
        takes = f"it takes {', '.join(allowed)}" if allowed else "it takes none"
        raise ConfigError(f"'model.vq_model.architecture' sets {', '.join(unknown)}, not a size of the '{name}' "
                          f"tokenizer ({takes}; the image size is the data's: 'dataset.preprocessing.crop_size', "
                          "or 'dataset.toy.image_size' on the toy set)")
    return sizes


def check_pairing(config, tokenizer: nn.Module) -> None:
    """The generator is sized by the config; it must describe this tokenizer (vocabulary, length, alignment width).
    A generator over a tokenizer that decodes prefixes (ReTok) may model only its first k <= N tokens."""
    vq, g, name = config.model.vq_model, config.model.generator, config.model.vq_model.model_type
    pairs = [
        ("model.vq_model.codebook_size", vq.codebook_size, tokenizer.codebook_size),
        ("model.vq_model.token_size", vq.token_size, tokenizer.token_size),
    ]
    if g.transition_alignment and g.z_dim is not None:  # the heads' outputs are compared with the codebook vectors
        pairs.append(("model.generator.z_dim", g.z_dim, tokenizer.token_size))
    if not getattr(tokenizer, "decodes_prefixes", False):
        pairs.append(("model.generator.image_seq_len", g.image_seq_len, tokenizer.num_tokens))
    elif not 1 <= g.image_seq_len <= tokenizer.num_tokens:
        raise ConfigError(f"'model.generator.image_seq_len' is {g.image_seq_len} but the '{name}' tokenizer decodes "
                          f"the first 1 to {tokenizer.num_tokens} of its tokens")
    for key, configured, actual in pairs:
        if configured != actual:
            raise ConfigError(f"'{key}' is {configured} but the '{name}' tokenizer has {actual}")


def decoded_to_uint8(images: Tensor, tokenizer: nn.Module) -> np.ndarray:
    """Decoded images (B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3), the bytes the tokenizer's original evaluation
    writes: 255 x truncated (`to_uint8`, RAR's sampler), or rounded to the nearest level (`pixel_rounding`)."""
    if getattr(tokenizer, "pixel_rounding", "truncate") == "nearest":
        # 255 (x + 1/510) truncated is 255 x rounded; `to_uint8` clamps after the shift, as the original clamps
        # 127.5 y + 128 (y = 2x - 1)
        images = images.float() + 0.5 / 255
    return to_uint8(images)


def decodes_prefixes(config) -> bool:
    """Whether the config's tokenizer decodes any first k of its tokens, so that a generator may model only those."""
    return canonical_choice(config, "model.vq_model.model_type") in PREFIX_TOKENIZERS


def tokenizer_weights(config) -> Optional[str]:
    """The weights the config names for its tokenizer: `experiment.tokenizer_checkpoint` if set, else
    `model.vq_model.pretrained_tokenizer_weight`, else the tokenizer's released file (None: no weights)."""
    vq = config.model.vq_model
    name = canonical_choice(config, "model.vq_model.model_type")
    return config.experiment.tokenizer_checkpoint or vq.pretrained_tokenizer_weight or RELEASED_WEIGHTS.get(name)


def fits_tokenizer(config) -> bool:
    """Whether the config's tokenizer is fitted at start-up: one registered `fitted`, with no weights named."""
    return canonical_choice(config, "model.vq_model.model_type") in FITTED_TOKENIZERS and not tokenizer_weights(config)


def build_tokenizer(config, fit_images: Optional[Tensor] = None, random_weights: bool = False) -> nn.Module:
    """The tokenizer named by `config.model.vq_model.model_type`, with its weights loaded (or fitted on
    `fit_images`), checked against the config.

    Weights (`tokenizer_weights`): a local path, the name of a published file (fetched from where it is
    published), or a folder of config.json + weights (local, or a Hub repo "owner/name"), passed on as is. With no
    weights at all it is an error, unless the tokenizer is registered `fitted` or `random_weights` is asked for
    (tests and speed measurements only).
    """
    name = canonical_choice(config, "model.vq_model.model_type")
    if name not in TOKENIZERS:
        raise ConfigError(f"'model.vq_model.model_type' is '{name}', not one of {', '.join(sorted(TOKENIZERS))}")
    architecture_sizes(config, name)  # a size the tokenizer does not take fails before any file is read
    checkpoint = tokenizer_weights(config)
    if checkpoint is None and not random_weights and name not in FITTED_TOKENIZERS:
        raise MissingWeightsError(f"no weights for the '{name}' tokenizer: set experiment.tokenizer_checkpoint=PATH "
                                  "(the released files and where they are published: docs/models.md)")
    if checkpoint and not is_model_folder(checkpoint):
        checkpoint = resolve_weights(checkpoint, local_option="experiment.tokenizer_checkpoint=PATH")
    tokenizer = TOKENIZERS[name](config, checkpoint)
    if getattr(tokenizer, "needs_fit", False):
        if fit_images is None:
            raise MissingWeightsError(
                f"the '{name}' tokenizer has no weights: training fits it and saves OUTPUT_DIR/tokenizer.safetensors; "
                "pass the run's config (config=OUTPUT_DIR/config.yaml, which names it) or "
                "experiment.tokenizer_checkpoint=OUTPUT_DIR/tokenizer.safetensors"
            )
        tokenizer.fit(fit_images, iterations=15, seed=config.dataset.toy.seed)
    check_pairing(config, tokenizer)
    return tokenizer


__all__ = ["TOKENIZERS", "AliTok", "MaskGITVQGAN", "ReTok", "TiTok", "VQGANPlus", "build_tokenizer", "check_pairing",
           "data_image_size", "decoded_to_uint8", "fits_tokenizer", "register_tokenizer", "tokenizer_weights"]
