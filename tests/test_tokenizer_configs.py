"""The configs of reAR on each tokenizer: they load, the generator they describe fits their tokenizer (vocabulary,
length, alignment width), and the paper's rows are the same experiment but for the method."""

import pytest
import torch
from omegaconf import OmegaConf

from modeling.rear import ReAR
from modeling.tokenizers import TOKENIZERS, check_pairing
from utils.config import ConfigError, canonical_choice, load_config

# config -> (tokenizer, N tokens, codebook V, width z)
CONFIGS = {
    "ar_b_titok_b64": ("titok", 64, 4096, 12),
    "rar_b_titok_b64": ("titok", 64, 4096, 12),
    "rear_b_titok_b64": ("titok", 64, 4096, 12),
    "rear_l_vqplus": ("vqgan_plus", 256, 4096, 64),
    "rear_b_retok": ("retok", 256, 16384, 8),
    "rear_b": ("maskgit_vqgan", 256, 1024, 256),
}


def on_meta(config):
    """(tokenizer, generator) of the config, names and shapes only: the released sizes without their memory."""
    with torch.device("meta"):
        return TOKENIZERS[canonical_choice(config, "model.vq_model.model_type")](config, None), ReAR(config)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generator_and_tokenizer_agree(name):
    config = load_config(f"configs/{name}.yaml")
    tokenizer, generator = on_meta(config)
    check_pairing(config, tokenizer)
    model_type, n, vocabulary, z = CONFIGS[name]
    assert canonical_choice(config, "model.vq_model.model_type") == model_type
    assert (tokenizer.num_tokens, tokenizer.codebook_size, tokenizer.token_size) == (n, vocabulary, z)
    assert generator.lm_head.weight.shape == (vocabulary, config.model.generator.hidden_size)
    assert generator.pos_embed.shape[1] == n + 1024
    for head in generator.alignment_heads:
        assert getattr(generator, head)[4].out_features == z


def test_parameter_count_of_rear_b_on_titok_b64():
    # The paper's 261M (Table 2) is RAR-B's count on MaskGIT-VQGAN (V = 1024, N = 256): 260,923,648. On TiTok-B-64
    # (V = 4096, N = 64) the embedding table and the head grow and the position tables shrink: 265,202,944 for AR-B
    # and RAR-B; reAR-B's two alignment heads (2048 wide, to z = 12; used in training only) add 11,591,704.
    counts = {}
    for name in ("rar_b", "ar_b_titok_b64", "rar_b_titok_b64", "rear_b_titok_b64"):
        state = on_meta(load_config(f"configs/{name}.yaml"))[1].state_dict()
        counts[name] = sum(tensor.numel() for tensor in state.values())
    assert counts == {"rar_b": 260_923_648, "ar_b_titok_b64": 265_202_944, "rar_b_titok_b64": 265_202_944,
                      "rear_b_titok_b64": 276_794_648}


def flat(name: str) -> dict:
    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    return dict(leaves(OmegaConf.to_container(load_config(f"configs/{name}.yaml"), resolve=True)))


def test_titok_rows_differ_only_in_the_method():
    rear, rar, ar = flat("rear_b_titok_b64"), flat("rar_b_titok_b64"), flat("ar_b_titok_b64")
    run = {"experiment.name", "experiment.output_dir"}
    method = {f"model.generator.{key}" for key in ("perturb_mode", "transition_alignment", "order")}
    guidance = {"model.generator.guidance_scale", "model.generator.guidance_scale_pow"}
    assert {key for key in rear if rear[key] != ar[key]} == run | method - {"model.generator.order"}
    assert {key for key in rear if rear[key] != rar[key]} == run | method | guidance | {
        "model.generator.randomness_anneal_start"}
    assert (rar["model.generator.randomness_anneal_start"], rar["model.generator.randomness_anneal_end"]) == (
        125_000, 187_500)
    assert (rear["training.max_train_steps"], rear["model.generator.image_seq_len"]) == (250_000, 64)


def test_vqplus_config_keeps_the_releases_values():
    c = flat("rear_l_vqplus")
    assert c["optimizer.params.learning_rate"] == c["lr_scheduler.params.learning_rate"] == 1e-4
    assert (c["model.generator.hidden_size"], c["model.generator.decode_align_layer_idx"]) == (1024, 18)
    assert (c["model.vq_model.model_type"], c["model.vq_model.sample_with_conv"]) == ("vqplus", True)
    assert c["dataset.params.pretokenization"] == "dataset/pretokenized/vqplus.jsonl"
    assert c["training.enable_wandb"] is True and c["model.generator.z_dim"] is None


@pytest.mark.parametrize("override, message", [
    ("model.generator.z_dim=256", "'model.generator.z_dim' is 256 but the 'retok' tokenizer has 8"),
    ("model.generator.image_seq_len=257",
     "'model.generator.image_seq_len' is 257 but the 'retok' tokenizer decodes the first 1 to 256 of its tokens"),
    ("model.vq_model.token_size=256", "'model.vq_model.token_size' is 256 but the 'retok' tokenizer has 8"),
])
def test_pairing_refusals(override, message):
    config = load_config("configs/rear_b_retok.yaml", [override])
    with pytest.raises(ConfigError, match=f"^{message}$"):
        check_pairing(config, on_meta(config)[0])


def test_a_prefix_of_retok_pairs_with_it():
    config = load_config("configs/rear_b_retok.yaml", ["model.generator.image_seq_len=32"])
    check_pairing(config, on_meta(config)[0])


@pytest.mark.parametrize("config, sizes, message", [
    ("rear_b", "{ch: 32}", "sets ch, not a size of the 'maskgit_vqgan' tokenizer (it takes none;"),
    ("rear_b_retok", "{image_size: 64}",
     "sets image_size, not a size of the 'retok' tokenizer (it takes ch, vit_sizes;"),
])
def test_architecture_takes_only_the_sizes_an_original_fixes_in_code(config, sizes, message):
    from modeling.tokenizers import build_tokenizer

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_tokenizer(load_config(f"configs/{config}.yaml", [f"model.vq_model.architecture={sizes}"]))
