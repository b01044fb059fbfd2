"""Tiny random weights for sampling and demo tests: the rear_tiny generator (16 tokens, codebook 32 x 16) and a
MaskGIT-VQGAN that turns 4x4 = 16 such tokens into 16x16 images; tiny versions of the other tokenizers of the paper;
and a tiny toy run's folder, as training leaves it."""

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from modeling.rear import ReAR
from modeling.tokenizers import build_tokenizer
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

# Tiny versions of the other tokenizers, in each original YAML's `vq_model` keys (sizes the original fixes in code go
# through `architecture`), with the crop size it reads and its number of tokens N.
TINY_TOKENIZERS = {
    "titok": dict(  # two-stage (TiTok-B-64's kind): a ViT to logits over a pixel codebook, MaskGIT-VQGAN pixels
        vq_model=dict(model_type="titok", codebook_size=64, token_size=6, use_l2_norm=True, num_latent_tokens=8,
                      vit_enc_model_size="a", vit_dec_model_size="b", vit_enc_patch_size=4, vit_dec_patch_size=2,
                      vit_model_sizes={"a": [16, 2, 2], "b": [24, 2, 3]}, finetune_decoder=True, is_legacy=True,
                      pixel_decoder_config=dict(channel_mult=[1, 1], num_resolutions=2, hidden_channels=32,
                                                num_res_blocks=1, z_channels=8, codebook_size=32, token_size=8)),
        crop=16, tokens=8),
    "vqplus": dict(  # the reAR release's name for VQGAN+; f4: 4 x 4 tokens
        vq_model=dict(model_type="vqplus", quantizer_type="lookup", codebook_size=64, token_size=8, hidden_channels=32,
                      channel_mult=[1, 1, 2], num_resolutions=3, num_res_blocks=1, sample_with_conv=True),
        crop=16, tokens=16),
    "alitok": dict(  # 3 prefix tokens + 4 x 4 patch tokens
        vq_model=dict(model_type="alitok", codebook_size=64, token_size=8, num_latent_tokens=19,
                      architecture=dict(patch_size=4, encoder_width=32, encoder_layers=2, encoder_heads=2,
                                        decoder_width=32, decoder_layers=2, decoder_heads=4, decoder_class_tokens=4)),
        crop=16, tokens=19),
    "retok": dict(  # the released path at 64 x 64, the smallest its 256 queries allow
        vq_model=dict(model_type="retok", codebook_size=512, token_size=8, codebook_embed_dim=8,
                      encoder_ch_mult=[1, 2, 2], decoder_ch_mult=[1, 1, 2], encoder_size="enc", decoder_size="dec",
                      z_channels=32, multi_level_query_init=True, adaptive_gn=True, d2s_up=True, use_attn=False,
                      distill_depth=2, out_inner_dim=16,
                      architecture=dict(ch=32, vit_sizes={"enc": [32, 2, 2], "dec": [48, 3, 4]})),
        crop=64, tokens=256),
}


def tokenizer_overrides(name: str) -> list:
    """The tiny tokenizer `name` as command-line overrides of `model.vq_model` (num_latent_tokens: its N)."""
    tiny = TINY_TOKENIZERS[name]
    vq_model = {**tiny["vq_model"], "num_latent_tokens": tiny["tokens"]}
    return [f"model.vq_model.{key}={value if isinstance(value, str) else json.dumps(value)}"
            for key, value in vq_model.items()]


def random_weights(config_path, path, overrides=()) -> str:
    """The tokenizer of the config (with `overrides`) with random weights (seed 0), saved to `path`."""
    torch.manual_seed(0)
    save_file(build_tokenizer(load_config(str(config_path), overrides), random_weights=True).state_dict(), str(path))
    return str(path)


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
