"""Configuration: a typed schema, YAML files and `a.b=c` command-line overrides.

Every run's configuration is the schema's defaults, then a YAML file, then CLI overrides, merged by
OmegaConf. The schema is what makes a typo an error: an unknown key or a value of the wrong type fails at
start-up with the key's dotted name and the closest valid key, instead of being silently ignored.
The original RAR / reAR YAML files load unchanged: every key they use is in the schema. A few of their keys have
no effect here; they are marked `# unused: ...` below.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


@dataclass
class ExperimentConfig:
    project: str = "rear"
    name: str = "rear"
    output_dir: str = "runs/rear"
    logging_dir: Optional[str] = None
    tracker: str = "none"  # wandb | tensorboard | none
    max_train_examples: int = 1_281_167
    save_every: int = 50_000
    eval_every: int = 50_000  # unused: evaluation is a separate step (python -m evaluator)
    generate_every: int = 5_000
    log_every: int = 50
    log_grad_norm_every: int = 1_000  # unused: the gradient norm is logged every log_every steps
    keep_last_checkpoints: int = 3
    resume: bool = True
    init_weight: Optional[str] = None
    generator_checkpoint: Optional[str] = None
    tokenizer_checkpoint: Optional[str] = None


@dataclass
class VQModelConfig:
    model_type: str = "maskgit_vqgan"  # maskgit_vqgan | toy
    codebook_size: int = 1024
    token_size: int = 256
    num_latent_tokens: int = 256
    finetune_decoder: bool = False  # unused: the tokenizer is frozen
    pretrained_tokenizer_weight: Optional[str] = "maskgit-vqgan-imagenet-f16-256.bin"


@dataclass
class GeneratorConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    intermediate_size: int = 3072
    dropout: float = 0.1
    attn_drop: float = 0.1
    class_label_dropout: float = 0.1
    image_seq_len: int = 256
    condition_num_classes: int = 1000
    # sampling
    randomize_temperature: float = 1.0
    guidance_scale: float = 22.0
    guidance_scale_pow: float = 2.75
    kv_cache: bool = True
    # memory
    use_checkpoint: bool = False
    # the schedule r(step) shared by noisy context and RAR's random order
    randomness_anneal_start: int = 0
    randomness_anneal_end: int = 187_500
    # noisy context: switch | mask | none
    perturb_mode: str = "switch"
    # RAR's randomized-order training: raster | random
    order: str = "raster"
    # codebook-embedding alignment
    transition_alignment: bool = True
    transition_alignment_weight: float = 1.0
    encode_align_layer_idx: int = 0
    decode_align_layer_idx: int = 15
    projection_dim: int = 2048
    z_dim: Optional[int] = None  # default: the tokenizer's embedding size (model.vq_model.token_size)


@dataclass
class ModelConfig:
    vq_model: VQModelConfig = field(default_factory=VQModelConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


@dataclass
class DatasetParams:
    pretokenization: Optional[str] = None
    pretokenized_cache_dir: Optional[str] = None  # where the JSONL's arrays go; None: next to the file
    train_shards_path_or_url: Optional[str] = None
    eval_shards_path_or_url: Optional[str] = None  # unused: no evaluation during training
    num_workers_per_gpu: int = 4
    shuffle_buffer_size: int = 1_000
    pin_memory: bool = True
    persistent_workers: bool = True


@dataclass
class DatasetPreprocessing:
    resize_shorter_edge: int = 256  # unused: the ADM center crop resizes to crop_size
    crop_size: int = 256
    random_crop: bool = False  # unused: always the ADM center crop
    random_flip: bool = True


@dataclass
class ToyDatasetConfig:
    num_classes: int = 10
    image_size: int = 32
    num_images: int = 20_000
    seed: int = 0


@dataclass
class DatasetConfig:
    name: str = "imagenet"  # imagenet | toy
    params: DatasetParams = field(default_factory=DatasetParams)
    preprocessing: DatasetPreprocessing = field(default_factory=DatasetPreprocessing)
    toy: ToyDatasetConfig = field(default_factory=ToyDatasetConfig)


@dataclass
class OptimizerParams:
    learning_rate: float = 4e-4
    beta1: float = 0.9
    beta2: float = 0.96
    weight_decay: float = 0.03
    epsilon: float = 1e-8
    fused: bool = True


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    params: OptimizerParams = field(default_factory=OptimizerParams)


@dataclass
class LRSchedulerParams:
    learning_rate: float = 4e-4
    warmup_steps: int = 62_500
    end_lr: float = 1e-5


@dataclass
class LRSchedulerConfig:
    scheduler: str = "cosine"
    params: LRSchedulerParams = field(default_factory=LRSchedulerParams)


@dataclass
class TrainingConfig:
    gradient_accumulation_steps: int = 1
    per_gpu_batch_size: int = 256
    mixed_precision: str = "bf16"  # bf16 | no
    enable_tf32: bool = True
    enable_wandb: bool = False
    use_ema: bool = False
    ema_decay: float = 0.9999
    seed: int = 42
    max_train_steps: int = 250_000
    max_grad_norm: float = 1.0
    num_generated_images: int = 10
    compile: bool = False


@dataclass
class SamplingConfig:
    num_samples: int = 50_000
    per_proc_batch_size: int = 125
    seed: int = 0
    guidance_scale: Optional[float] = None  # None: model.generator.guidance_scale
    guidance_scale_pow: Optional[float] = None
    temperature: Optional[float] = None  # None: model.generator.randomize_temperature
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    precision: str = "bf16"  # bf16 | fp32
    save_png: bool = False


@dataclass
class ReARConfig:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


class ConfigError(ValueError):
    """A configuration key or value that the schema does not accept."""


def _dotted_keys(node: Any, prefix: str = "") -> List[str]:
    keys = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            full = f"{prefix}.{key}" if prefix else str(key)
            keys.append(full)
            keys.extend(_dotted_keys(node._get_node(key), full))
    return keys


_VALID_KEYS = _dotted_keys(OmegaConf.structured(ReARConfig))


def closest_key(key: str) -> Optional[str]:
    """The valid dotted key nearest to `key` (a typo's likely intent), or None."""
    leaf = key.rsplit(".", 1)[-1]
    match = difflib.get_close_matches(key, _VALID_KEYS, n=1, cutoff=0.5)
    if match:
        return match[0]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in _VALID_KEYS}
    match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    return by_leaf[match[0]] if match else None


def _as_config_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        hint = closest_key(key)
        suggestion = f"; did you mean '{hint}'?" if hint else ""
        return ConfigError(f"unknown config key '{key}' in {source}{suggestion}")
    if isinstance(err, ValidationError):
        return ConfigError(f"bad value for config key '{key}' in {source}: {err.msg.splitlines()[0]}")
    return ConfigError(f"config error at '{key}' in {source}: {err}")


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        raise _as_config_error(err, source) from None


def validate(config: Any) -> DictConfig:
    """Return `config` (a mapping or DictConfig) checked against the schema, with defaults filled in."""
    if isinstance(config, DictConfig) and OmegaConf.get_type(config) is ReARConfig:
        return config
    return _merge(OmegaConf.structured(ReARConfig), config, "the given config")


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command-line override '{item}' is not of the form key.sub=value")
    return OmegaConf.from_dotlist(list(overrides))


# Counts and intervals that must be at least 1 (a 0 would divide by zero or skip the training step).
POSITIVE_KEYS = (
    "experiment.save_every",
    "experiment.generate_every",
    "experiment.log_every",
    "training.gradient_accumulation_steps",
    "training.per_gpu_batch_size",
    "sampling.num_samples",
    "sampling.per_proc_batch_size",
    "model.generator.image_seq_len",
    "model.generator.num_hidden_layers",
    "model.vq_model.codebook_size",
)


def check_positive(config: DictConfig, source: str) -> None:
    for key in POSITIVE_KEYS:
        value = OmegaConf.select(config, key)
        if value < 1:
            raise ConfigError(f"bad value for config key '{key}' in {source}: {value} (must be at least 1)")


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Schema defaults, then the YAML file at `path`, then `overrides` (["a.b=c", ...])."""
    config = OmegaConf.structured(ReARConfig)
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        config = _merge(config, OmegaConf.load(path), path)
    config = _merge(config, parse_overrides(overrides), "the command line")
    try:
        OmegaConf.resolve(config)
    except OmegaConfBaseException as err:
        raise _as_config_error(err, path or "the command line") from None
    check_positive(config, path or "the command line")
    return config


def config_from_cli(argv: Sequence[str]) -> DictConfig:
    """`config=FILE.yaml a.b=c ...` (the form every script takes) → the merged, validated config."""
    path = None
    overrides = []
    for arg in argv:
        if arg.startswith("config="):
            path = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    return load_config(path, overrides)


def to_yaml(config: DictConfig) -> str:
    return OmegaConf.to_yaml(config)


__all__ = [
    "ConfigError",
    "ReARConfig",
    "closest_key",
    "config_from_cli",
    "load_config",
    "validate",
    "to_yaml",
]
