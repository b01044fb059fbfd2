"""Image tokenizers, chosen by `model.vq_model.model_type`.

A tokenizer module has `encode(images)`, `decode_tokens(tokens)`, `get_quantized_states(tokens)` and the
properties `codebook_size` and `token_size`. A new one registers a builder with `@register_tokenizer(name)`:
`builder(config, checkpoint)` gets the whole config and the weights file to load (or None) and returns the
frozen tokenizer.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

from torch import nn

from utils.weights import load_checked, load_state_dict_file, resolve_weights

from .maskgit_vqgan import MaskGITVQGAN

TokenizerBuilder = Callable[[object, Optional[str]], nn.Module]
TOKENIZERS: Dict[str, TokenizerBuilder] = {}


def register_tokenizer(name: str) -> Callable[[TokenizerBuilder], TokenizerBuilder]:
    def register(builder: TokenizerBuilder) -> TokenizerBuilder:
        if name in TOKENIZERS:
            raise ValueError(f"tokenizer '{name}' is already registered")
        TOKENIZERS[name] = builder
        return builder

    return register


@register_tokenizer("maskgit_vqgan")
def build_maskgit_vqgan(config, checkpoint: Optional[str]) -> nn.Module:
    """The released f16 architecture; without a checkpoint its weights are random (tests only)."""
    return MaskGITVQGAN.from_pretrained(checkpoint) if checkpoint else MaskGITVQGAN()


@register_tokenizer("toy")
def build_toy_tokenizer(config, checkpoint: Optional[str]) -> nn.Module:
    """Patch k-means on the built-in toy images: loaded from `checkpoint`, else fitted from `dataset.toy.seed`
    (the same codebook for the same config). Patch size = image size / sqrt(num_latent_tokens)."""
    from utils.toy_data import toy_images

    from .toy import PatchKMeansTokenizer

    vq, toy = config.model.vq_model, config.dataset.toy
    side = math.isqrt(vq.num_latent_tokens)
    if side * side != vq.num_latent_tokens or toy.image_size % side:
        raise ValueError(
            f"model.vq_model.num_latent_tokens ({vq.num_latent_tokens}) must be a square whose side divides "
            f"dataset.toy.image_size ({toy.image_size})"
        )
    patch_size = toy.image_size // side
    tokenizer = PatchKMeansTokenizer(vq.codebook_size, patch_size, toy.image_size)
    if checkpoint:
        return load_checked(tokenizer, load_state_dict_file(checkpoint), f"toy tokenizer {checkpoint}")
    images, _ = toy_images(min(toy.num_images, 1000), toy.num_classes, toy.image_size, toy.seed)
    return tokenizer.fit(images, iterations=15, seed=toy.seed)


def build_tokenizer(config) -> nn.Module:
    """The tokenizer named by `config.model.vq_model.model_type`, with its weights loaded.

    Weights: `experiment.tokenizer_checkpoint` if set, else `model.vq_model.pretrained_tokenizer_weight`;
    either is a local path or the name of a published file (fetched from the Hugging Face Hub).
    """
    vq = config.model.vq_model
    if vq.model_type not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer model_type '{vq.model_type}'; known: {sorted(TOKENIZERS)}")
    checkpoint = config.experiment.tokenizer_checkpoint or vq.pretrained_tokenizer_weight
    tokenizer = TOKENIZERS[vq.model_type](config, resolve_weights(checkpoint) if checkpoint else None)
    # The generator's vocabulary and alignment heads are sized from the config, so it must describe this tokenizer.
    for key in ("codebook_size", "token_size"):
        if getattr(tokenizer, key) != vq[key]:
            raise ValueError(
                f"model.vq_model.{key} is {vq[key]} but the '{vq.model_type}' tokenizer has {getattr(tokenizer, key)}"
            )
    return tokenizer


__all__ = ["TOKENIZERS", "MaskGITVQGAN", "build_tokenizer", "register_tokenizer"]
