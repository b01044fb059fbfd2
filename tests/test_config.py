"""Config schema: YAML + CLI overrides; typos and wrong types fail at start-up with the key's name."""

import textwrap

import pytest

from utils.config import ConfigError, config_from_cli, load_config, validate

# The original RAR training config (configs/training/generator/rar.yaml of the RAR release), verbatim keys.
ORIGINAL_RAR_YAML = """
experiment:
    project: "rar_generation"
    name: "rar-b"
    max_train_examples: 1_281_167
    save_every: 50_000
    eval_every: 50_000
    generate_every: 5_000
    log_every: 50
    log_grad_norm_every: 1_000
    resume: True

model:
    vq_model:
        codebook_size: 1024
        token_size: 256
        num_latent_tokens: 256
        finetune_decoder: False
        pretrained_tokenizer_weight: "maskgit-vqgan-imagenet-f16-256.bin"
    generator:
        hidden_size: 768
        num_hidden_layers: 24
        num_attention_heads: 16
        intermediate_size: 3072
        dropout: 0.1
        attn_drop: 0.1
        class_label_dropout: 0.1
        image_seq_len: 256
        condition_num_classes: 1000
        randomize_temperature: 1.0
        guidance_scale: 16.0
        guidance_scale_pow: 2.75
        use_checkpoint: False
        randomness_anneal_start: 125_000
        randomness_anneal_end: 187_500

dataset:
    params:
        pretokenization: "maskgitvq.jsonl"
        train_shards_path_or_url: "imagenet_sharded/train/imagenet-train-{0000..0252}.tar"
        eval_shards_path_or_url: "imagenet_sharded/val/imagenet-val-{0000..0009}.tar"
        num_workers_per_gpu: 12
    preprocessing:
        resize_shorter_edge: 256
        crop_size: 256
        random_crop: False
        random_flip: True

optimizer:
    name: adamw
    params:
        learning_rate: 4e-4
        beta1: 0.9
        beta2: 0.96
        weight_decay: 0.03

lr_scheduler:
    scheduler: "cosine"
    params:
        learning_rate: ${optimizer.params.learning_rate}
        warmup_steps: 62_500
        end_lr: 1e-5

training:
    gradient_accumulation_steps: 1
    per_gpu_batch_size: 64
    mixed_precision: "bf16"
    enable_tf32: True
    enable_wandb: True
    use_ema: False
    seed: 42
    max_train_steps: 250_000
    max_grad_norm: 1.0
"""


def test_original_rar_yaml_loads_unchanged(tmp_path):
    path = tmp_path / "rar.yaml"
    path.write_text(ORIGINAL_RAR_YAML)
    config = load_config(str(path))
    assert config.model.generator.num_hidden_layers == 24
    assert config.lr_scheduler.params.learning_rate == pytest.approx(4e-4)
    assert config.lr_scheduler.params.end_lr == pytest.approx(1e-5)
    assert config.experiment.max_train_examples == 1_281_167


def test_cli_overrides_win(tmp_path):
    config = config_from_cli(["config=configs/rear_s.yaml", "model.generator.guidance_scale=10.0", "training.seed=7"])
    assert config.model.generator.guidance_scale == 10.0
    assert config.training.seed == 7
    assert config.model.generator.decode_align_layer_idx == 15


def test_unknown_key_names_key_and_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'model.generator.hiden_size'.*'model.generator.hidden_size'"):
        load_config("configs/rear_s.yaml", ["model.generator.hiden_size=3"])
    path = tmp_path / "typo.yaml"
    path.write_text(textwrap.dedent("""
        training:
          per_gpu_batchsize: 3
    """))
    with pytest.raises(ConfigError, match=rf"'training.per_gpu_batchsize' in {path}.*'training.per_gpu_batch_size'"):
        load_config(str(path))


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"bad value for config key 'model.generator.hidden_size'"):
        load_config(None, ["model.generator.hidden_size=big"])
    with pytest.raises(ConfigError, match=r"'training.enable_tf32'"):
        validate({"training": {"enable_tf32": "maybe"}})


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: configs/nope.yaml"):
        load_config("configs/nope.yaml")


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key.sub=value"):
        config_from_cli(["config=configs/rear_s.yaml", "training.seed"])


@pytest.mark.parametrize(
    "name, layers, hidden, decode_idx, cfg, power",
    [("rear_s", 20, 768, 15, 22.0, 2.75), ("rear_b", 24, 768, 18, 15.0, 2.5), ("rear_l", 24, 1024, 18, 15.0, 2.5)],
)
def test_released_hyperparameters(name, layers, hidden, decode_idx, cfg, power):
    g = load_config(f"configs/{name}.yaml").model.generator
    assert (g.num_hidden_layers, g.hidden_size, g.decode_align_layer_idx) == (layers, hidden, decode_idx)
    assert (g.guidance_scale, g.guidance_scale_pow, g.randomize_temperature) == (cfg, power, 1.0)
    assert (g.perturb_mode, g.transition_alignment, g.randomness_anneal_end) == ("switch", True, 187_500)


def test_baseline_configs():
    ar = load_config("configs/ar_l.yaml").model.generator
    assert (ar.perturb_mode, ar.transition_alignment, ar.order) == ("none", False, "raster")
    rar = load_config("configs/rar_b.yaml").model.generator
    assert (rar.order, rar.randomness_anneal_start, rar.randomness_anneal_end) == ("random", 125_000, 187_500)
    assert (rar.guidance_scale, rar.guidance_scale_pow, rar.num_hidden_layers) == (16.0, 2.75, 24)


@pytest.mark.parametrize("key", ["experiment.log_every", "training.gradient_accumulation_steps", "sampling.per_proc_batch_size"])
def test_zero_counts_are_errors(key):
    with pytest.raises(ConfigError, match=rf"'{key}'.*0 \(must be at least 1\)"):
        load_config("configs/rear_tiny.yaml", [f"{key}=0"])
