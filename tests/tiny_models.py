"""Tiny random weights for sampling and demo tests: the rear_tiny generator (16 tokens, codebook 32 x 16) and a
MaskGIT-VQGAN that turns 4x4 = 16 such tokens into 16x16 images."""

from pathlib import Path

import torch
from safetensors.torch import save_file

from modeling.rear import ReAR
from modeling.tokenizers.maskgit_vqgan import MaskGITVQGAN
from utils.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "rear_tiny.yaml"
TINY_VQGAN = {
    "channel_mult": [1, 1, 2],  # f4: 16x16 images <-> 4x4 tokens
    "num_resolutions": 3,
    "hidden_channels": 32,
    "num_res_blocks": 1,
    "resolution": 16,
    "z_channels": 16,
    "codebook_size": 32,
    "token_size": 16,
}


def write_tiny_weights(folder: Path) -> tuple[str, str]:
    """(generator, tokenizer) `.safetensors` paths in `folder`, fixed by seed 0."""
    torch.manual_seed(0)
    generator = ReAR(load_config(str(TINY_CONFIG)))
    # adaLN-Zero starts every block as the identity (and the class would not matter): give the gates weights.
    for name, param in generator.named_parameters():
        if "adaLN_modulation" in name:
            torch.nn.init.normal_(param, std=0.05)
    tokenizer = MaskGITVQGAN(TINY_VQGAN)
    paths = str(folder / "tiny_generator.safetensors"), str(folder / "tiny_vqgan.safetensors")
    save_file(generator.state_dict(), paths[0])
    save_file(tokenizer.state_dict(), paths[1])
    return paths
