"""Tiny random weights for sampling and demo tests: the rear_tiny generator (16 tokens, codebook 32 x 16) and a
MaskGIT-VQGAN that turns 4x4 = 16 such tokens into 16x16 images; and a tiny toy run's folder, as training leaves it."""

import contextlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from modeling.rear import ReAR
from modeling.tokenizers.maskgit_vqgan import MaskGITVQGAN
from modeling.tokenizers.toy import PatchKMeansTokenizer
from utils.config import load_config, to_yaml

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


TOY_CONFIG = ROOT / "configs" / "rear_toy.yaml"
TINY_TOY = ("model.generator.hidden_size=32", "model.generator.num_hidden_layers=2",
            "model.generator.num_attention_heads=2", "model.generator.intermediate_size=64",
            "model.generator.decode_align_layer_idx=1", "model.generator.projection_dim=32")


def conditioned(generator: ReAR) -> ReAR:
    """At init adaLN-Zero makes every block the identity and the logits are nearly flat, so the class would not
    change the samples: give the modulations weights, the embeddings spread and the head sharper logits."""
    with torch.no_grad():
        for name, param in generator.named_parameters():
            if "adaLN_modulation" in name:
                torch.nn.init.normal_(param, std=0.1)
        torch.nn.init.normal_(generator.embeddings.weight, std=0.5)
        generator.lm_head.weight.mul_(10.0)
    return generator


def write_tiny_weights(folder: Path, overrides=()) -> tuple[str, str]:
    """(generator, tokenizer) `.safetensors` paths in `folder`, fixed by seed 0 (the generator of rear_tiny.yaml with
    `overrides`, e.g. fewer classes)."""
    torch.manual_seed(0)
    generator = conditioned(ReAR(load_config(str(TINY_CONFIG), overrides)))
    tokenizer = MaskGITVQGAN(TINY_VQGAN)
    paths = str(folder / "tiny_generator.safetensors"), str(folder / "tiny_vqgan.safetensors")
    save_file(generator.state_dict(), paths[0])
    save_file(tokenizer.state_dict(), paths[1])
    return paths


def write_tiny_toy_run(folder: Path) -> Path:
    """`folder`/runs/rear_toy as a finished toy run leaves it (config.yaml, generator.safetensors,
    tokenizer.safetensors), with a tiny generator and a random codebook, fixed by seed 0."""
    run = folder / "runs" / "rear_toy"
    run.mkdir(parents=True)
    config = load_config(str(TOY_CONFIG), TINY_TOY)
    (run / "config.yaml").write_text(to_yaml(config))
    torch.manual_seed(0)
    save_file(conditioned(ReAR(config)).state_dict(), str(run / "generator.safetensors"))
    tokenizer = PatchKMeansTokenizer(config.model.vq_model.codebook_size, 4, config.dataset.toy.image_size)
    tokenizer.codebook.copy_(torch.rand_like(tokenizer.codebook))
    save_file(tokenizer.state_dict(), str(run / "tokenizer.safetensors"))
    return run


@contextlib.contextmanager
def one_thread():
    """One torch thread: the same float sums as a torchrun worker (OMP_NUM_THREADS=1), and no oversubscription
    of a small, shared CPU (tiny ops on two busy threads run ten times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
