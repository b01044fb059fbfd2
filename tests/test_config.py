"""Config schema: YAML + CLI overrides; typos and wrong types fail at start-up with the key's name."""

import textwrap
import typing

import pytest

from utils.config import (DOMAINS, REGISTERED_CHOICES, RELATIONS, ConfigError, config_from_cli, load_config,
                          schema_types, validate)

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
    with pytest.raises(ConfigError, match=rf"'{key}' is 0 \(must be > 0\)$"):
        load_config("configs/rear_tiny.yaml", [f"{key}=0"])


# ------------------------------------------------------------------------------------------- domains and relations
def numeric(hint) -> bool:
    """int, float, Optional of them, or a list of them (a dict of numbers is free-form: not a key's value)."""
    args = typing.get_args(hint)
    return hint in (int, float) or (typing.get_origin(hint) in (typing.Union, list) and any(a in (int, float)
                                                                                            for a in args))


def test_every_numeric_key_declares_its_domain():
    """A key added without a domain fails here: give its `option(...)` one (utils/config.py, 'value domains')."""
    numeric_keys = [key for key, hint in schema_types().items() if numeric(hint)]
    assert len(numeric_keys) >= 85
    assert [key for key in numeric_keys if key not in DOMAINS] == []


def test_every_relation_names_keys_of_the_schema():
    keys = schema_types()
    assert len(RELATIONS) == 8 and all(key in keys for related, _ in RELATIONS for key in related)


BAD = "bad config value in configs/rear_toy.yaml and the command line: "


DOMAIN_CASES = [
    ("training.max_grad_norm=nan", "'training.max_grad_norm' is nan (must be finite)"),
    ("optimizer.params.learning_rate=nan", "'optimizer.params.learning_rate' is nan (must be finite and > 0)"),
    ("optimizer.params.learning_rate=-1", "'optimizer.params.learning_rate' is -1.0 (must be > 0)"),
    ("lr_scheduler.params.learning_rate=nan", "'lr_scheduler.params.learning_rate' (nan) differs from "
     "'optimizer.params.learning_rate' (0.004); set one from the other: ${optimizer.params.learning_rate}"),
    ("lr_scheduler.params.warmup_steps=-10", "'lr_scheduler.params.warmup_steps' is -10 (must be >= 0)"),
    ("sampling.temperature=inf", "'sampling.temperature' is inf (must be finite and > 0)"),
    ("sampling.guidance_scale=-1", "'sampling.guidance_scale' is -1.0 (must be >= 0)"),
    ("sampling.seed=-1", "'sampling.seed' is -1 (must be in [0, 2^31))"),
    ("sampling.top_p=0", "'sampling.top_p' is 0.0 (must be in (0, 1])"),
    ("model.generator.dropout=1", "'model.generator.dropout' is 1.0 (must be in [0, 1))"),
    ("dataset.toy.num_classes=11", "'dataset.toy.num_classes' is 11 (must be in [1, 10])"),
    ("training.seed=9223372036854775808", "'training.seed' is 9223372036854775808 (must fit in 64 bits)"),
    ("model.generator.guidance_window=[0.5,0.2]", "'model.generator.guidance_window' is [0.5, 0.2]: its end is "
     "before its start"),
    ("model.generator.guidance_window=[0.5]", "'model.generator.guidance_window' is [0.5] (must be 2 numbers in "
     "[0, 1])"),
    ("model.vq_model.channel_mult=[1,0]", "'model.vq_model.channel_mult' is [1, 0] (must be a non-empty list of "
     "numbers > 0)"),
    ("model.generator.num_attention_heads=5", "'model.generator.hidden_size' (96) is not a multiple of "
     "'model.generator.num_attention_heads' (5)"),
    ("model.generator.decode_align_layer_idx=4", "'model.generator.decode_align_layer_idx' is 4, outside the 4 "
     "blocks (0..3)"),
    ("model.generator.randomness_anneal_start=900", "'model.generator.randomness_anneal_end' (800) is before "
     "'randomness_anneal_start' (900)"),
    ("sampling.num_samples=15", "'sampling.num_samples' (15) is not a multiple of the 10 classes "
     "('model.generator.condition_num_classes'): every class gets the same number of samples"),
    ("experiment.output_dir=README.md", "'experiment.output_dir' is 'README.md' (must be a folder, made if missing; "
     "not a file)"),
    ("experiment.init_weight=configs", "'experiment.init_weight' is 'configs' (must be a weights file or a released "
     "name, not a folder)"),
    ("dataset.params.pretokenization=configs", "'dataset.params.pretokenization' is 'configs' (must be a file, not a "
     "folder)"),
]


@pytest.mark.parametrize("override, line", DOMAIN_CASES, ids=[override for override, _ in DOMAIN_CASES])
def test_a_value_outside_its_domain_is_one_line_naming_the_key(override, line):
    with pytest.raises(ConfigError) as error:
        load_config("configs/rear_toy.yaml", [override])
    assert str(error.value) == BAD + line


def test_every_problem_is_reported_one_line_each():
    with pytest.raises(ConfigError) as error:
        load_config("configs/rear_toy.yaml", ["training.max_grad_norm=nan", "sampling.seed=-1",
                                              "model.generator.num_attention_heads=0", "model.generator.hidden_size=7",
                                              "model.generator.num_hidden_layers=2"])
    assert str(error.value).split("\n") == [BAD + line for line in (
        "'model.generator.num_attention_heads' is 0 (must be > 0)",  # not also a division by zero
        "'training.max_grad_norm' is nan (must be finite)",
        "'sampling.seed' is -1 (must be in [0, 2^31))",
        "'model.generator.decode_align_layer_idx' is 2, outside the 2 blocks (0..1)",
    )]


def test_a_value_in_its_domain_passes():
    config = load_config("configs/rear_toy.yaml", ["training.max_grad_norm=0", "sampling.top_p=1",
                                                   "model.generator.dropout=0", "experiment.keep_last_checkpoints=-1",
                                                   "model.generator.cfg_interval=-1", "sampling.seed=2147483647"])
    assert config.training.max_grad_norm == 0.0 and config.sampling.seed == 2**31 - 1


@pytest.mark.parametrize("content, line", [
    ("", "config file {P} is empty: it sets no section (experiment:, model:, ...)"),
    ("# only a comment\n", "config file {P} is empty: it sets no section (experiment:, model:, ...)"),
    (None, "config file {P} is a folder, not a YAML file"),
])
def test_an_empty_or_folder_config_file_is_refused(tmp_path, content, line):
    path = tmp_path / "config.yaml"
    path.mkdir() if content is None else path.write_text(content)
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert str(error.value) == line.format(P=path)


def test_an_empty_value_for_a_key_that_needs_one_says_so():
    with pytest.raises(ConfigError) as error:
        load_config("configs/rear_toy.yaml", ["experiment.output_dir="])
    assert str(error.value) == ("bad value for config key 'experiment.output_dir' in the command line: it is empty, "
                                "but it needs a value of type str")


def test_an_override_yaml_cannot_read_is_named():
    with pytest.raises(ConfigError) as error:
        load_config("configs/rear_toy.yaml", ["training.seed=3", "experiment.output_dir={name}/run"])
    assert str(error.value) == ("command-line argument 'experiment.output_dir={name}/run' is not a value YAML can read "
                                "(did not find expected <document start>); quote it: key='value'")


def test_a_registry_name_is_taken_once_and_becomes_a_choice_of_its_key():
    from modeling import BACKBONES
    from modeling.backbones import register_backbone
    from modeling.next_token import GUIDANCE_SCHEDULES, register_guidance_schedule
    from modeling.tokenizers import register_tokenizer

    with pytest.raises(ValueError, match="^backbone 'rar' is already registered$"):
        register_backbone("rar")(object)
    with pytest.raises(ValueError, match="^guidance schedule 'cosine_power' is already registered$"):
        register_guidance_schedule("cosine_power")(len)
    with pytest.raises(ValueError, match="^tokenizer 'toy' is already registered$"):
        register_tokenizer("toy")(len)
    assert BACKBONES["rar"].__name__ == "ReAR" and GUIDANCE_SCHEDULES["cosine_power"].__name__ == "cosine_power"
    assert REGISTERED_CHOICES["model.vq_model.model_type"]["maskgitvq"] == "maskgit_vqgan"  # an alias, declared
