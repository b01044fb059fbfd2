"""Configuration: a typed schema, YAML files and `a.b=c` command-line overrides, checked at start-up.

Every run's configuration is the schema's defaults, then a YAML file, then CLI overrides, merged by OmegaConf.
The schema is what makes a mistake an error before any work starts: an unknown key, a value of the wrong type or
outside its fixed set of choices (`Literal[...]` below), a value outside its key's domain (every number and path
declares one: `option(default, help, domain)`), or keys that break a relation between them (`RELATIONS`) fail with
the keys' dotted names, every problem on a line of its own. Keys whose choices live in a registry (`model.vq_model.model_type`, `model.generator.backbone`,
`model.generator.guidance_schedule`) are checked against the names the registries under `modeling/` declare with
`register_choice`.

The original reAR / RAR YAML files load unchanged and mean what they meant: every key they use is here, and a key
they leave out defaults to what the original code did without it (e.g. no noisy context, no alignment). Keys the
original code never acted on are accepted and marked `unused` (docs/configuration.md lists them).
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Callable, Dict, Iterable, List, Literal, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from utils.errors import ConfigError


# ----------------------------------------------------------------------------------------- value domains
INT64 = 2**63  # integers go into torch and numpy: they must fit in 64 bits


@dataclass(frozen=True)
class Domain:
    """The values a key accepts beyond its type: `text` says which (`--help` shows it), `accepts` decides. A number
    must be finite (an integer: fit in 64 bits) whatever the domain; a key that may be None is checked when set."""

    text: str
    accepts: Callable[[Any], bool]
    finite: bool = True  # False: a relation holds the value to another key's, non-finite ones included

    def problem(self, value: Any) -> Optional[str]:
        """What is wrong with `value` ("is nan (must be finite and > 0)"), or None when it is in the domain."""
        if self.finite and isinstance(value, float) and not math.isfinite(value):
            return f"is {value} (must be finite{'' if self is FINITE else ' and ' + self.text})"
        if isinstance(value, int) and not -INT64 <= value < INT64:
            return f"is {value} (must fit in 64 bits)"
        if self.accepts(value):
            return None
        shown = list(value) if isinstance(value, ListConfig) else value
        return f"is {shown!r} (must be {self.text})"


def interval(low: float = -math.inf, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> Domain:
    """Numbers between `low` and `high` (each end included unless open): `[0, 1)`, `>= 1`, `> 0` ..."""
    if high == math.inf:
        text = f"{'>' if low_open else '>='} {low:g}"
    else:
        text = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Domain(text, lambda v: (low < v if low_open else low <= v) and (v < high if high_open else v <= high))


def each(domain: Domain, length: Optional[int] = None) -> Domain:
    """Lists of numbers of `domain`: `length` of them, or at least one."""
    count = f"{length} numbers" if length else "a non-empty list of numbers"
    return Domain(f"{count} {domain.text}", lambda v: (len(v) == length if length else len(v) > 0) and all(
        isinstance(x, (int, float)) and domain.problem(x) is None for x in v))


def _is_tokenizer_weights(path: str) -> bool:  # a folder is a model published as config.json + weights
    return not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json"))


ANY_INT = Domain("any integer", lambda v: True)
FINITE = Domain("finite", lambda v: True)
POSITIVE = interval(0, low_open=True)
NON_NEGATIVE = interval(0)
DROPOUT = interval(0, 1, high_open=True)  # a probability that leaves something: [0, 1)
UNIT = interval(0, 1)
SHARE = interval(0, 1, low_open=True)  # a share of probability mass that keeps something: (0, 1]
PEAK_LR = Domain("equal to optimizer.params.learning_rate", lambda v: True, finite=False)  # see RELATIONS
SEED = Domain("in [0, 2^31)", lambda v: 0 <= v < 2**31)  # numpy's seeds are < 2^32; training adds step and rank
FOLDER = Domain("a folder, made if missing; not a file", lambda v: v != "" and not os.path.isfile(v))
DATA_FILE = Domain("a file, not a folder", lambda v: v != "" and not os.path.isdir(v))
WEIGHTS = Domain("a weights file or a released name, not a folder", lambda v: v != "" and not os.path.isdir(v))
TOKENIZER_WEIGHTS = Domain("a weights file, a released name, or a folder with config.json",
                           lambda v: v != "" and _is_tokenizer_weights(v))


def option(default: Any, help: str, domain: Optional[Domain] = None) -> Any:
    """A schema field with its one-line description and, for a number or a path, its domain (`--help` prints both)."""
    metadata = {"help": help, "domain": domain}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, help: str = "") -> Any:
    return field(default_factory=cls, metadata={"help": help})


UNUSED = "unused: accepted for the original YAML files, no effect here"


@dataclass
class ExperimentConfig:
    project: str = option("rear", "project name (tracker project)")
    name: str = option("rear", "run name (tracker run)")
    entity: Optional[str] = option(None, "wandb entity (team or user) the run is logged under")
    output_dir: str = option("runs/rear", "where checkpoints, samples and final weights go (sampling: DIR -> DIR.npz; "
                                          "a run folder -> RUN/eval_samples.npz)", FOLDER)
    logging_dir: Optional[str] = option(None, "TensorBoard folder (default OUTPUT_DIR/logs)", FOLDER)
    tracker: Literal["wandb", "tensorboard", "swanlab", "none"] = option(
        "tensorboard", "where metrics go; training.enable_wandb / enable_swanlab override it as in the original"
    )
    max_train_examples: int = option(1_281_167, "samples per 'epoch' in the logs (ImageNet's training set)", POSITIVE)
    save_every: int = option(50_000, "checkpoint every N optimizer steps", POSITIVE)
    save_every_minutes: Optional[float] = option(
        None, "also checkpoint once this many minutes have passed since the last save, whichever comes first "
        "(a job with a wall-time cap always has a recent checkpoint); null: by steps only", POSITIVE)
    eval_every: int = option(50_000, UNUSED + " (evaluation is `python -m evaluator`)", POSITIVE)
    generate_every: int = option(5_000, "sample grid every N steps", POSITIVE)
    log_every: int = option(50, "log metrics every N steps", POSITIVE)
    log_grad_norm_every: int = option(1_000, "log every parameter's gradient norm every N steps (grad_norm/<name>)",
                                      POSITIVE)
    keep_last_checkpoints: int = option(3, "checkpoints kept (older ones are deleted; <= 0 keeps all)", ANY_INT)
    resume: bool = option(True, "continue from the newest checkpoint in output_dir")
    init_weight: Optional[str] = option(None, "start training from these generator weights (path or released name)",
                                        WEIGHTS)
    generator_checkpoint: Optional[str] = option(None, "generator weights to sample from (path or released name)",
                                                 WEIGHTS)
    tokenizer_checkpoint: Optional[str] = option(
        None, "tokenizer weights (default: model.vq_model.pretrained_tokenizer_weight)", TOKENIZER_WEIGHTS)


@dataclass
class VQModelConfig:
    model_type: str = option("maskgit_vqgan", "tokenizer (registry in modeling/tokenizers/)")
    codebook_size: int = option(1024, "V: number of codebook entries (the generator's vocabulary)", POSITIVE)
    token_size: int = option(256, "width of a codebook vector (the alignment target's width)", POSITIVE)
    num_latent_tokens: int = option(256, "N: tokens per image", POSITIVE)
    finetune_decoder: bool = option(False, "titok: must equal is_legacy (two-stage models); else unused (frozen)")
    pretrained_tokenizer_weight: Optional[str] = option(
        None, "tokenizer weights (path or released name); default: the tokenizer's released file, if it has one",
        TOKENIZER_WEIGHTS)
    commitment_cost: float = option(0.25, UNUSED + " (a tokenizer-training loss weight; TiTok, VQGAN+)", NON_NEGATIVE)
    # --- conv VQGAN architecture (VQGAN+; MaskGIT-VQGAN's own config uses the same names but reads its weights) ---
    num_channels: int = option(3, "vqgan_plus: image channels", POSITIVE)
    hidden_channels: int = option(128, "vqgan_plus: base channel width", POSITIVE)
    channel_mult: List[int] = option([1, 1, 2, 2, 4], "vqgan_plus: width multiplier per resolution", each(POSITIVE))
    num_resolutions: int = option(5, "vqgan_plus: resolution levels (= len(channel_mult))", POSITIVE)
    num_res_blocks: int = option(2, "vqgan_plus: residual blocks per level", POSITIVE)
    sample_with_conv: bool = option(False, "vqgan_plus: strided-conv downsampling (released: True) or average pooling")
    # --- VQGAN+ (markweberdev/maskbit; the reAR release's `vqplus`) ---
    quantizer_type: str = option("lookup", "vqgan_plus: must be 'lookup' (lookup-free is MaskBit's own tokenizer)")
    entropy_loss_weight: float = option(0.0, UNUSED + " (VQGAN+ training)", NON_NEGATIVE)
    entropy_loss_temperature: float = option(0.01, UNUSED + " (VQGAN+ training)", POSITIVE)
    entropy_gamma: float = option(1.0, UNUSED + " (VQGAN+ training)", NON_NEGATIVE)
    # --- TiTok (bytedance/1d-tokenizer) ---
    vit_enc_model_size: Optional[str] = option(None, "titok: small | base | large (or a vit_model_sizes name)")
    vit_dec_model_size: Optional[str] = option(None, "titok: small | base | large (or a vit_model_sizes name)")
    vit_enc_patch_size: int = option(16, "titok: encoder patch size", POSITIVE)
    vit_dec_patch_size: int = option(16, "titok: decoder patch size", POSITIVE)
    use_l2_norm: bool = option(False, "titok: codes on the unit sphere (the released TiTok: True)")
    quantize_mode: str = option("vq", "titok: vq (vae has no tokens)")
    is_legacy: bool = option(True, "titok: two-stage (MaskGIT-VQGAN pixel decoder) or single-stage (VQ-8k)")
    vit_model_sizes: Dict[str, List[int]] = option({}, "titok, not in the original: more sizes, name -> [width, layers, heads]")
    pixel_decoder_config: Dict[str, Any] = option({}, "titok, not in the original: MaskGIT-VQGAN keys of the pixel decoder")
    # --- AliTok (ali-vilab/alitok): its YAML gives only codebook_size 4096, token_size 32, num_latent_tokens 273 ---
    architecture: Dict[str, Any] = option({}, "alitok, retok, not in the original: sizes its code fixes (alitok: "
                                          "AliTokConfig fields; retok: ch, vit_sizes), to build smaller models")
    # --- ReTok (zfu006/ReTok): the original's model.init_args (VQ_SB256) ---
    codebook_embed_dim: int = option(8, "retok: codebook vector width (= token_size)", POSITIVE)
    codebook_l2_norm: bool = option(True, "retok: L2-normalised codebook")
    codebook_show_usage: bool = option(True, "retok: keeps the codebook_used buffer (a released state-dict entry)")
    commit_loss_beta: float = option(0.25, UNUSED + " (ReTok training)", NON_NEGATIVE)
    entropy_loss_ratio: float = option(0.0, UNUSED + " (ReTok training)", NON_NEGATIVE)
    encoder_ch_mult: List[int] = option([1, 1, 2, 2, 4], "retok: encoder CNN width multipliers", each(POSITIVE))
    decoder_ch_mult: List[int] = option([1, 1, 2, 2, 4], "retok: decoder CNN width multipliers", each(POSITIVE))
    model_size: Optional[str] = option("small", "retok: ViT size of both halves unless encoder/decoder_size")
    encoder_size: Optional[str] = option(None, "retok: encoder ViT size")
    decoder_size: Optional[str] = option(None, "retok: decoder ViT size")
    z_channels: int = option(256, "retok: latent channels", POSITIVE)
    dropout_p: float = option(0.0, UNUSED + " (the tokenizer is frozen)", DROPOUT)
    multi_level_query_init: bool = option(False, "retok: multi-level query init (released: True)")
    last_level_2d_query_init: bool = option(False, "retok: deprecated in the original; must be False")
    multi_level_2d_query_init: bool = option(False, "retok: deprecated in the original; must be False")
    adaptive_gn: bool = option(False, "retok: adaptive group norm (released: True)")
    d2s_up: bool = option(False, "retok: depth-to-space upsampling (released: True)")
    rot: bool = option(False, UNUSED + " (the rotation trick changes only gradients)")
    use_attn: bool = option(True, "retok: CNN attention (released: False)")
    fea_rec_loss_type: str = option("cosine", UNUSED + " (ReTok training)")
    fea_rec_loss_weight: float = option(1.0, UNUSED + " (ReTok training)", NON_NEGATIVE)
    distill_depth: Optional[int] = option(None, "retok: depth of the distillation head (a released state-dict part)",
                                          POSITIVE)
    out_inner_dim: int = option(768, "retok: width of the distillation head", POSITIVE)


@dataclass
class GeneratorConfig:
    backbone: str = option("rar", "the AR transformer (registry in modeling/backbones/)")
    hidden_size: int = option(768, "transformer width D", POSITIVE)
    num_hidden_layers: int = option(20, "number of transformer blocks", POSITIVE)
    num_attention_heads: int = option(16, "attention heads", POSITIVE)
    intermediate_size: int = option(3072, "MLP hidden width", POSITIVE)
    dropout: float = option(0.1, "dropout after attention projection and MLP", DROPOUT)
    attn_drop: float = option(0.1, "attention dropout", DROPOUT)
    class_label_dropout: float = option(0.1, "probability of training on the null class (for guidance)", DROPOUT)
    image_seq_len: int = option(256, "N: image tokens generated per sample", POSITIVE)
    condition_num_classes: int = option(1000, "C: number of classes", POSITIVE)
    # sampling
    randomize_temperature: float = option(1.0, "sampling temperature (released value)", POSITIVE)
    guidance_scale: float = option(22.0, "classifier-free guidance scale (released value; 0 turns guidance off)",
                                   NON_NEGATIVE)
    guidance_scale_pow: float = option(2.75, "power of the guidance schedule (released value)", NON_NEGATIVE)
    kv_cache: bool = option(True, "sample with a KV cache")
    use_checkpoint: bool = option(False, "activation checkpointing (memory for compute)")
    # the schedule r(step) shared by noisy context and RAR's random order
    randomness_anneal_start: int = option(0, "r(step) = 1 until this step", NON_NEGATIVE)
    randomness_anneal_end: int = option(187_500, "r(step) falls linearly to 0 at this step", NON_NEGATIVE)
    perturb_mode: Literal["switch", "mask", "none"] = option(
        "none", "noisy context: switch = random token, mask = mask token, none = off (the original's default)"
    )
    order: Literal["raster", "random"] = option("raster", "random = RAR's randomized order, annealed by r(step)")
    # codebook-embedding alignment
    transition_alignment: bool = option(False, "train the alignment heads (the original's default: off)")
    transition_alignment_weight: float = option(1.0, "weight of the alignment terms in the loss", NON_NEGATIVE)
    encode_align: bool = option(True, "build and train the encode head (block encode_align_layer_idx)")
    decode_align: bool = option(True, "build and train the decode head (block decode_align_layer_idx)")
    encode_align_layer_idx: int = option(0, "block whose output the encode head reads", NON_NEGATIVE)
    decode_align_layer_idx: int = option(15, "block whose output the decode head reads", NON_NEGATIVE)
    projection_dim: int = option(2048, "hidden width of the alignment heads", POSITIVE)
    z_dim: Optional[int] = option(None, "alignment heads' output width (default: model.vq_model.token_size)", POSITIVE)
    # guidance as the backbone's original sampler does it (modeling.generator.Generator.generate)
    guidance_schedule: Optional[str] = option(
        None, "cosine_power (RAR, AliTok) | constant | linear | linear_re | triangular | rectangular | step "
        "(GigaTok, ReTok); default: the backbone's own (rar, alitok_ar: cosine_power; gpt1d: constant)")
    guidance_window: List[float] = option(
        [0.18, 1.0], "step: full guidance from token share [0] on; rectangular: within [0], [1] "
        "(ReTok's --step-start-ratio 0.18; GigaTok's rectangular default [0.05, 1.0])", each(UNIT, length=2))
    cfg_interval: int = option(-1, "GigaTok's: tokens t >= cfg_interval + 2 are sampled without guidance (-1: never)",
                               interval(-1))
    # --- alitok_ar (ali-vilab/alitok) and gpt1d ---
    tok_dropout: float = option(0.1, "alitok_ar, gpt1d: dropout on the input embeddings in training "
                                "(AliTok's key; GigaTok's --token-dropout-p)", DROPOUT)
    seed: int = option(42, UNUSED + " (AliTok's sampling seed; here sampling.seed)", SEED)
    # --- gpt1d (SilentView/GigaTok, zfu006/ReTok): sizes are the keys above (hidden_size = dim, ...) ---
    gpt_model: Optional[str] = option(None, "gpt1d: GPT-B | GPT-L | GPT-XL | ...: checked against the sizes above")
    drop_path_rate: float = option(0.0, "gpt1d: stochastic depth, rising linearly from 0 to this at the last block",
                                   DROPOUT)
    use_qk_norm: bool = option(False, "gpt1d: per-head LayerNorm on queries and keys")
    use_adaLN: bool = option(False, "gpt1d: adaLN-Zero class conditioning per block")
    use_simple_adaLN: bool = option(False, "gpt1d: one adaLN modulation shared by the blocks plus per-block offsets")


@dataclass
class ModelConfig:
    vq_model: VQModelConfig = section(VQModelConfig, "the frozen image tokenizer")
    generator: GeneratorConfig = section(GeneratorConfig, "the autoregressive generator and reAR's regularisers")


@dataclass
class DatasetParams:
    pretokenization: Optional[str] = option(None, "pre-tokenized JSON Lines file to train on", DATA_FILE)
    pretokenized_cache_dir: Optional[str] = option(None, "where its memory-mapped arrays go (default: beside it)",
                                                   FOLDER)
    train_shards_path_or_url: Optional[str] = option(None, "WebDataset shards (brace pattern), tokenized on the fly")
    eval_shards_path_or_url: Optional[str] = option(None, UNUSED + " (no evaluation during training)")
    num_workers_per_gpu: int = option(4, "data loader workers per process", NON_NEGATIVE)
    shuffle_buffer_size: int = option(1_000, "WebDataset shuffle buffer", POSITIVE)
    pin_memory: bool = option(True, "pinned host memory for batches (CUDA)")
    persistent_workers: bool = option(True, "keep loader workers alive between passes")


@dataclass
class DatasetPreprocessing:
    resize_shorter_edge: int = option(256, "shards: resize the shorter edge to this (bicubic, antialiased)", POSITIVE)
    crop_size: int = option(256, "crop size (shards and pre-tokenization)", POSITIVE)
    random_crop: bool = option(False, "shards: random crop instead of center crop")
    random_flip: bool = option(True, "shards: random horizontal flip")


@dataclass
class ToyDatasetConfig:
    num_classes: int = option(10, "toy classes (at most 10)", interval(1, 10))
    image_size: int = option(32, "toy image size", POSITIVE)
    num_images: int = option(20_000, "toy images drawn", POSITIVE)
    seed: int = option(0, "seed of the toy images (and of the toy tokenizer's fit)", SEED)


@dataclass
class DatasetConfig:
    name: Literal["imagenet", "toy"] = option("imagenet", "imagenet (files below) or the built-in toy set")
    params: DatasetParams = section(DatasetParams)
    preprocessing: DatasetPreprocessing = section(DatasetPreprocessing)
    toy: ToyDatasetConfig = section(ToyDatasetConfig)


@dataclass
class OptimizerParams:
    learning_rate: float = option(4e-4, "peak learning rate", POSITIVE)
    beta1: float = option(0.9, "AdamW beta1", DROPOUT)
    beta2: float = option(0.96, "AdamW beta2", DROPOUT)
    weight_decay: float = option(0.03, "AdamW weight decay (not on norms, biases, embeddings)", NON_NEGATIVE)
    epsilon: float = option(1e-8, "AdamW epsilon", POSITIVE)
    fused: bool = option(True, "fused AdamW kernel on CUDA")


@dataclass
class OptimizerConfig:
    name: Literal["adamw"] = option("adamw", "optimizer")
    params: OptimizerParams = section(OptimizerParams)


@dataclass
class LRSchedulerParams:
    learning_rate: float = option(4e-4, "must equal optimizer.params.learning_rate", PEAK_LR)
    warmup_steps: int = option(62_500, "linear warm-up steps", NON_NEGATIVE)
    end_lr: float = option(1e-5, "learning rate at the last step (half cosine)", NON_NEGATIVE)


@dataclass
class LRSchedulerConfig:
    scheduler: Literal["cosine"] = option("cosine", "warm-up then half cosine")
    params: LRSchedulerParams = section(LRSchedulerParams)


@dataclass
class TrainingConfig:
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", POSITIVE)
    per_gpu_batch_size: int = option(256, "micro-batch size per process (with global_batch_size: the largest one)",
                                     POSITIVE)
    global_batch_size: Optional[int] = option(
        None, "samples per optimizer step over all processes (DiT's --global-batch-size): when set, each process "
        "takes global / processes, in the fewest micro-batches of at most per_gpu_batch_size "
        "(gradient_accumulation_steps is derived); null: processes x per_gpu_batch_size x gradient_accumulation_steps",
        POSITIVE)
    # fp16 is left out: its loss scaler skips steps with infinite gradients, which the non-finite stop halts on.
    mixed_precision: Literal["bf16", "no"] = option("bf16", "bf16 autocast or no (fp32)")
    enable_tf32: bool = option(True, "TF32 matmuls on CUDA")
    enable_wandb: bool = option(False, "log to wandb (the original's switch; same as experiment.tracker=wandb)")
    enable_swanlab: bool = option(False, "log to SwanLab (the original's switch; needs `pip install swanlab`)")
    use_ema: bool = option(False, "keep an EMA of the weights (the final weights are the EMA's)")
    ema_decay: float = option(0.999, "EMA decay, reached after the warm-up (1+s)/(10+s) (the original's 0.999)", UNIT)
    seed: int = option(42, "training seed", SEED)
    max_train_steps: int = option(250_000, "optimizer steps (the lr schedule's length)", POSITIVE)
    stop_steps: Optional[int] = option(None, "stop early at this step (the schedule still spans max_train_steps)",
                                       POSITIVE)
    max_grad_norm: float = option(1.0, "gradient clipping (<= 0: off)", FINITE)
    num_generated_images: int = option(10, "classes in the periodic sample grid", POSITIVE)
    compile: bool = option(False, "torch.compile the generator")


@dataclass
class SamplingConfig:
    num_samples: int = option(50_000, "images to sample, equally many per class, classes in order", POSITIVE)
    per_proc_batch_size: int = option(125, "images per batch (the output depends on it, not on the process count)",
                                      POSITIVE)
    seed: int = option(0, "sampling seed", SEED)
    guidance_scale: Optional[float] = option(None, "default: model.generator.guidance_scale", NON_NEGATIVE)
    guidance_scale_pow: Optional[float] = option(None, "default: model.generator.guidance_scale_pow", NON_NEGATIVE)
    temperature: Optional[float] = option(None, "default: model.generator.randomize_temperature", POSITIVE)
    top_k: Optional[int] = option(None, "keep the k most likely tokens", POSITIVE)
    top_p: Optional[float] = option(None, "keep the smallest set of tokens with this probability mass", SHARE)
    precision: Literal["fp32", "bf16"] = option(
        "fp32", "fp32 (TF32 on CUDA, as the original sampled) or bf16 (faster; tokens differ from fp32)"
    )
    sampler: Literal["fast", "plain"] = option("fast", "fast = static cache + CUDA graph; plain = the readable loop")
    save_png: bool = option(False, "also write DIR/NNNNNN.png")


@dataclass
class ReARConfig:
    experiment: ExperimentConfig = section(ExperimentConfig, "run name, output folder, checkpoints, logging")
    model: ModelConfig = section(ModelConfig)
    dataset: DatasetConfig = section(DatasetConfig, "training data")
    optimizer: OptimizerConfig = section(OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = section(LRSchedulerConfig)
    training: TrainingConfig = section(TrainingConfig)
    sampling: SamplingConfig = section(SamplingConfig, "sampling for evaluation")


# ----------------------------------------------------------------------------------------- the schema as data
def _leaves(cls: type = ReARConfig, prefix: str = "") -> List[Tuple[str, Any, Any]]:
    """(dotted key, dataclass field, type hint) of every leaf of the schema, in declaration order."""
    rows, hints = [], typing.get_type_hints(cls)
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        if f.default_factory is not MISSING and is_dataclass(f.default_factory):  # a section
            rows += _leaves(f.default_factory, f"{key}.")
        else:
            rows.append((key, f, hints[f.name]))
    return rows


def schema_fields() -> List[Tuple[str, Any, str]]:
    """(dotted key, default, help) of every leaf of the schema, in declaration order."""
    return [(key, f.default if f.default is not MISSING else f.default_factory(), f.metadata.get("help", ""))
            for key, f, _ in _leaves()]


def schema_types() -> Dict[str, Any]:
    """The type hint of every leaf of the schema by dotted key (`int`, `Optional[float]`, `List[int]` ...)."""
    return {key: hint for key, _, hint in _leaves()}


# The domain of every key that declares one (every number and every path): what `check` holds each value to.
DOMAINS: Dict[str, Domain] = {key: f.metadata["domain"] for key, f, _ in _leaves() if f.metadata.get("domain")}

_VALID_KEYS = [key for key, _, _ in schema_fields()]
_SECTIONS = sorted({key.rsplit(".", 1)[0] for key in _VALID_KEYS if "." in key})

# Keys whose allowed values come from a registry in modeling/ (filled by `register_choice`).
REGISTERED_CHOICES: Dict[str, Dict[str, str]] = {
    "model.vq_model.model_type": {}, "model.generator.backbone": {}, "model.generator.guidance_schedule": {}
}


def register_choice(key: str, name: str, canonical: Optional[str] = None) -> None:
    """Declare `name` an allowed value of `key` (`canonical`: the name it stands for, for aliases)."""
    if key not in REGISTERED_CHOICES:
        raise KeyError(f"{key} is not a registry-backed config key")
    REGISTERED_CHOICES[key][name] = canonical or name


def register_entry(table: Dict[str, Any], key: str, kind: str, name: str, entry: Any, aliases: Sequence[str] = ()):
    """Put `entry` in the registry `table` under `name` (a `kind`, e.g. "backbone", registered once) and declare
    `name` and its `aliases` allowed values of the config key `key`; returns `entry` (for decorators)."""
    if name in table:
        raise ValueError(f"{kind} '{name}' is already registered")
    table[name] = entry
    for alias in (name, *aliases):
        register_choice(key, alias, canonical=name)
    return entry


def canonical_choice(config: DictConfig, key: str) -> str:
    """The registry name the value of `key` stands for (e.g. the original's alias 'maskgitvq' → 'maskgit_vqgan')."""
    value = OmegaConf.select(config, key)
    return REGISTERED_CHOICES[key].get(value, value)


def closest_key(key: str) -> Optional[str]:
    """The valid dotted key nearest to `key` (a typo's likely intent), or None."""
    match = difflib.get_close_matches(key, _VALID_KEYS + _SECTIONS, n=1, cutoff=0.5)
    if match:
        return match[0]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in _VALID_KEYS}
    match = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=1, cutoff=0.6)
    return by_leaf[match[0]] if match else None


def _as_config_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        hint = closest_key(key)
        suggestion = f"; did you mean '{hint}'?" if hint else ""
        return ConfigError(f"unknown config key '{key}' in {source}{suggestion}")
    if isinstance(err, ValidationError):
        message = err.msg.splitlines()[0]
        if message.startswith("Invalid value") and "expected one of" in message:  # a Literal's choices
            value, allowed = message[len("Invalid value ") :].split(", expected one of ")
            message = f"{value} is not one of {allowed.replace(chr(39), '')}"
        if message.startswith("Incompatible value 'None'"):  # `key=` on the command line, or `key:` in YAML
            message = f"it is empty, but it needs a value of type {message.split('of type ')[-1].strip(chr(39))}"
        elif message.endswith("is not Optional"):  # the same for a list or a mapping
            message = "it is empty, but it needs a value"
        return ConfigError(f"bad value for config key '{key}' in {source}: {message}")
    return ConfigError(f"config error at '{key}' in {source}: {str(err).splitlines()[0]}")


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        raise _as_config_error(err, source) from None
    except TypeError:  # a list given for a mapping or the reverse: OmegaConf names no key
        key = _container_clash(OmegaConf.to_container(base), OmegaConf.to_container(OmegaConf.create(update)))
        raise ConfigError(f"bad value for config key '{key}' in {source}: a list where a mapping is expected, "
                          "or the reverse") from None


def _container_clash(base: dict, update: dict, prefix: str = "") -> Optional[str]:
    """The dotted key where `update` has a list and `base` a mapping, or the reverse."""
    for key, value in update.items():
        here = base.get(key)
        if isinstance(value, dict) and isinstance(here, dict):
            found = _container_clash(here, value, f"{prefix}{key}.")
            if found:
                return found
        elif isinstance(value, dict) and isinstance(here, list) or isinstance(value, list) and isinstance(here, dict):
            return f"{prefix}{key}"
    return None


def validate(config: Any) -> DictConfig:
    """Return `config` (a mapping or DictConfig) checked against the schema, with defaults filled in."""
    if isinstance(config, DictConfig) and OmegaConf.get_type(config) is ReARConfig:
        return config
    return _merge(OmegaConf.structured(ReARConfig), config, "the given config")


def _is_string(hint: Any) -> bool:
    """str, Optional[str] or a Literal of strings."""
    return str in typing.get_args(hint) or hint is str or typing.get_origin(hint) is Literal


_STRING_KEYS = {key for key, hint in schema_types().items() if _is_string(hint)}
_YAML_BOOLEANS = {"yes", "no", "on", "off", "y", "n"}


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    items = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"command-line argument '{item}' is not of the form key.sub=value (or config=FILE.yaml)")
        key, value = item.split("=", 1)
        if key in _STRING_KEYS and value.lower() in _YAML_BOOLEANS:  # YAML would read `no` as False
            item = f"{key}='{value}'"
        items.append(item)
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as err:
        raise ConfigError(f"command-line overrides could not be parsed: {str(err).splitlines()[0]}") from None
    except yaml.YAMLError as err:  # a value is read as YAML: `{x}/y` is a mapping cut short
        bad = next(item for item in items if not _parses(item.split("=", 1)[1]))
        raise ConfigError(f"command-line argument '{bad}' is not a value YAML can read ({err.problem}); quote "
                          "it: key='value'") from None


def _parses(value: str) -> bool:
    try:
        yaml.safe_load(value)
    except yaml.YAMLError:
        return False
    return True


def _load_yaml(path: str) -> DictConfig:
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a folder, not a YAML file")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors come from the parser with a multi-line message
        where = getattr(getattr(err, "problem_mark", None), "line", None)
        line = f" line {where + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path}{line} is not valid YAML: {problem}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} does not hold a mapping of sections (experiment:, model:, ...)")
    if not loaded:  # else a run on the schema's defaults, which only fails later (e.g. fetching weights)
        raise ConfigError(f"config file {path} is empty: it sets no section (experiment:, model:, ...)")
    return _paths_from_file(loaded, os.path.dirname(path))


# ----------------------------------------------------------------------------------------- paths in a file
# Keys that name a file or a folder. In a YAML file, such a value that is `.` or starts with `./` or `../` is
# relative to the file's folder (on the command line, as anywhere else, paths are relative to the working folder).
# A run's config.yaml names its own folder and weights that way, so that the folder can be moved or copied.
PATH_KEYS = (
    "experiment.output_dir",
    "experiment.logging_dir",
    "experiment.init_weight",
    "experiment.generator_checkpoint",
    "experiment.tokenizer_checkpoint",
    "model.vq_model.pretrained_tokenizer_weight",
    "dataset.params.pretokenization",
    "dataset.params.pretokenized_cache_dir",
)


def _relative_to_file(value: Any) -> bool:
    return isinstance(value, str) and (value in (".", "..") or value.startswith(("./", "../")))


def _paths_from_file(loaded: DictConfig, folder: str) -> DictConfig:
    for key in PATH_KEYS:
        value = OmegaConf.select(loaded, key, default=None)
        if _relative_to_file(value):
            OmegaConf.update(loaded, key, os.path.normpath(os.path.join(folder, value)))
    return loaded


def paths_for_folder(config: DictConfig, folder: str) -> DictConfig:
    """A copy of `config` as a YAML file in `folder` names its paths: those inside `folder` as `./...` (the folder
    itself as `.`), other local files and folders absolute, anything else (a released file's name) unchanged.
    `load_config` of that file gives back the same files, wherever the folder has moved."""
    recorded = copy.deepcopy(config)
    base = os.path.abspath(folder)
    for key in PATH_KEYS:
        value = OmegaConf.select(config, key)
        if not value:
            continue
        full = os.path.abspath(value)
        if full == base or full.startswith(base + os.sep):
            inside = os.path.relpath(full, base)
            OmegaConf.update(recorded, key, "." if inside == "." else f"./{inside}")
        elif os.path.exists(value):
            OmegaConf.update(recorded, key, full)
    return recorded


# ----------------------------------------------------------------------------------------- what a run is
# Training into a folder that holds a run continues that run, so the settings that make the model what it is must be
# those its config.yaml records (utils/training/run_record.py refuses others, naming each); the others may change
# on a resume. Every key is in exactly one of the two lists, by its dotted name or its section's: a new key must be
# put in one (tests/test_config.py fails until it is).
MODEL_SETTINGS = (  # the architecture and the tokenizer, the objective, the data, the optimizer and its schedule
    "model.vq_model",
    "model.generator.backbone",
    "model.generator.hidden_size",
    "model.generator.num_hidden_layers",
    "model.generator.num_attention_heads",
    "model.generator.intermediate_size",
    "model.generator.dropout",
    "model.generator.attn_drop",
    "model.generator.class_label_dropout",
    "model.generator.image_seq_len",
    "model.generator.condition_num_classes",
    "model.generator.randomness_anneal_start",
    "model.generator.randomness_anneal_end",
    "model.generator.perturb_mode",
    "model.generator.order",
    "model.generator.transition_alignment",
    "model.generator.transition_alignment_weight",
    "model.generator.encode_align",
    "model.generator.decode_align",
    "model.generator.encode_align_layer_idx",
    "model.generator.decode_align_layer_idx",
    "model.generator.projection_dim",
    "model.generator.z_dim",
    "model.generator.tok_dropout",
    "model.generator.gpt_model",
    "model.generator.drop_path_rate",
    "model.generator.use_qk_norm",
    "model.generator.use_adaLN",
    "model.generator.use_simple_adaLN",
    "experiment.init_weight",
    "experiment.tokenizer_checkpoint",
    "dataset.name",
    "dataset.params.pretokenization",
    "dataset.params.train_shards_path_or_url",
    "dataset.params.shuffle_buffer_size",
    "dataset.preprocessing",
    "dataset.toy",
    "optimizer",
    "lr_scheduler",
    "training.global_batch_size",
    "training.mixed_precision",
    "training.enable_tf32",
    "training.use_ema",
    "training.ema_decay",
    "training.seed",
    "training.max_grad_norm",
)
RESUMABLE_SETTINGS = (  # how long to train, where and how often it is logged and saved, how samples are drawn
    "experiment.project",
    "experiment.name",
    "experiment.entity",
    "experiment.output_dir",
    "experiment.logging_dir",
    "experiment.tracker",
    "experiment.max_train_examples",
    "experiment.save_every",
    "experiment.save_every_minutes",
    "experiment.eval_every",
    "experiment.generate_every",
    "experiment.log_every",
    "experiment.log_grad_norm_every",
    "experiment.keep_last_checkpoints",
    "experiment.resume",
    "experiment.generator_checkpoint",
    "model.generator.randomize_temperature",
    "model.generator.guidance_scale",
    "model.generator.guidance_scale_pow",
    "model.generator.kv_cache",
    "model.generator.use_checkpoint",
    "model.generator.guidance_schedule",
    "model.generator.guidance_window",
    "model.generator.cfg_interval",
    "model.generator.seed",
    "dataset.params.pretokenized_cache_dir",
    "dataset.params.eval_shards_path_or_url",
    "dataset.params.num_workers_per_gpu",
    "dataset.params.pin_memory",
    "dataset.params.persistent_workers",
    # how the global batch is split over processes and micro-batches (e.g. a smaller one after running out of
    # memory); a resume at another global batch is warned about (scripts/train_rear.py, warn_if_global_batch_changed)
    "training.gradient_accumulation_steps",
    "training.per_gpu_batch_size",
    "training.enable_wandb",
    "training.enable_swanlab",
    "training.max_train_steps",
    "training.stop_steps",
    "training.num_generated_images",
    "training.compile",
    "sampling",
)


def settings_entries(key: str) -> List[str]:
    """The entries of MODEL_SETTINGS and RESUMABLE_SETTINGS that classify `key` (exactly one, for a schema key)."""
    return [entry for entry in MODEL_SETTINGS + RESUMABLE_SETTINGS if key == entry or key.startswith(entry + ".")]


def model_settings(config: DictConfig) -> Dict[str, Any]:
    """{dotted key: plain value} of the settings that make the model what it is (MODEL_SETTINGS)."""
    values = {}
    for key in _VALID_KEYS:
        if settings_entries(key)[0] in MODEL_SETTINGS:
            value = OmegaConf.select(config, key)
            values[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return values


# ----------------------------------------------------------------------------------------- the start-up check
# Relations between keys, checked together once each key is in its domain: (keys, test of their values -> problem).
RELATIONS: List[Tuple[Tuple[str, ...], Callable[..., Optional[str]]]] = []


def relation(*keys: str) -> Callable:
    """Declare `test(*values of keys)` a relation: it returns what is wrong, or None."""
    def register(test: Callable[..., Optional[str]]) -> Callable[..., Optional[str]]:
        RELATIONS.append((keys, test))
        return test
    return register


@relation("model.generator.hidden_size", "model.generator.num_attention_heads")
def _heads_divide_width(width: int, heads: int) -> Optional[str]:
    if width % heads:
        return (f"'model.generator.hidden_size' ({width}) is not a multiple of 'model.generator.num_attention_heads' "
                f"({heads})")
    return None


def _alignment_layer_below_depth(head: str) -> None:
    @relation("model.generator.transition_alignment", f"model.generator.{head}_align",
              f"model.generator.{head}_align_layer_idx", "model.generator.num_hidden_layers")
    def test(on: bool, built: bool, index: int, depth: int) -> Optional[str]:
        if on and built and index >= depth:
            return f"'model.generator.{head}_align_layer_idx' is {index}, outside the {depth} blocks (0..{depth - 1})"
        return None


_alignment_layer_below_depth("encode")
_alignment_layer_below_depth("decode")


@relation("model.generator.transition_alignment", "model.generator.encode_align", "model.generator.decode_align")
def _an_alignment_head(on: bool, encode: bool, decode: bool) -> Optional[str]:
    if on and not (encode or decode):
        return "'model.generator.transition_alignment' is on but both encode_align and decode_align are off"
    return None


@relation("model.generator.randomness_anneal_start", "model.generator.randomness_anneal_end")
def _anneal_in_order(start: int, end: int) -> Optional[str]:
    if end < start:
        return f"'model.generator.randomness_anneal_end' ({end}) is before 'randomness_anneal_start' ({start})"
    return None


@relation("model.generator.guidance_window")
def _window_in_order(window: List[float]) -> Optional[str]:
    if window[1] < window[0]:
        return f"'model.generator.guidance_window' is {list(window)}: its end is before its start"
    return None


@relation("sampling.num_samples", "model.generator.condition_num_classes")
def _samples_per_class(samples: int, classes: int) -> Optional[str]:
    if samples % classes:
        return (f"'sampling.num_samples' ({samples}) is not a multiple of the {classes} classes "
                "('model.generator.condition_num_classes'): every class gets the same number of samples")
    return None


@relation("lr_scheduler.params.learning_rate", "optimizer.params.learning_rate")
def _one_learning_rate(scheduled: float, peak: float) -> Optional[str]:
    if scheduled != peak:
        return (f"'lr_scheduler.params.learning_rate' ({scheduled}) differs from 'optimizer.params.learning_rate' "
                f"({peak}); set one from the other: ${{optimizer.params.learning_rate}}")
    return None


def problems(config: DictConfig) -> List[str]:
    """Every value outside its key's domain, every name a registry lacks, and every relation that fails."""
    found, bad = [], set()
    for key, domain in DOMAINS.items():
        value = OmegaConf.select(config, key)
        problem = None if value is None else domain.problem(value)
        if problem:
            found.append(f"'{key}' {problem}")
            bad.add(key)
    for key, names in REGISTERED_CHOICES.items():
        value = OmegaConf.select(config, key)
        if names and value is not None and value not in names:
            found.append(f"'{key}' is '{value}', not one of {', '.join(sorted(names))}")
    for keys, test in RELATIONS:
        if not bad.intersection(keys):
            found.append(test(*(OmegaConf.select(config, key) for key in keys)))
    return [problem for problem in found if problem]


def check(config: DictConfig, source: str = "the config") -> DictConfig:
    """Every value that can be checked without reading a file: domains, registry names and relations. Every entry
    point runs it before it makes a folder or reads a weights or data file. The error has one line per problem."""
    found = problems(config)
    if found:
        raise ConfigError("\n".join(f"bad config value in {source}: {problem}" for problem in found))
    return config


def merged_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Schema defaults, then the YAML file at `path`, then `overrides` (["a.b=c", ...]), resolved; not checked."""
    config = OmegaConf.structured(ReARConfig)
    if path is not None:
        config = _merge(config, _load_yaml(path), path)
    return apply_overrides(config, overrides, path)


def apply_overrides(config: DictConfig, overrides: Sequence[str] = (), path: Optional[str] = None) -> DictConfig:
    """`config` (loaded from the YAML file `path`, if any) with `overrides` merged in and resolved; not checked
    (`load_config` checks the result, `with_overrides` is the checked form for a loaded config)."""
    config = _merge(config, parse_overrides(overrides), "the command line")
    try:
        OmegaConf.resolve(config)
    except OmegaConfBaseException as err:
        raise _as_config_error(err, path or "the command line") from None
    return config


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """`merged_config`, checked."""
    config = merged_config(path, overrides)
    return check(config, f"{path} and the command line" if overrides and path else path or "the command line")


def with_overrides(config: DictConfig, overrides: Sequence[str], source: str = "the command line") -> DictConfig:
    """A copy of a loaded `config` with `overrides` (["a.b=c", ...]) applied, checked as `load_config` checks."""
    return check(_merge(config, parse_overrides(overrides), source), source)


def split_cli(argv: Iterable[str]) -> Tuple[Optional[str], List[str]]:
    """`config=FILE.yaml a.b=c ...` → (FILE.yaml, ["a.b=c", ...])."""
    path, overrides = None, []
    for arg in argv:
        if arg.startswith("config="):
            path = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    return path, overrides


def config_from_cli(argv: Sequence[str]) -> DictConfig:
    """`config=FILE.yaml a.b=c ...` (the form every script takes) → the merged, checked config."""
    return load_config(*split_cli(argv))


def to_yaml(config: DictConfig) -> str:
    return OmegaConf.to_yaml(config)


def to_container(config: DictConfig) -> dict:
    """Plain dicts and lists (for trackers and JSON)."""
    return OmegaConf.to_container(config, resolve=True)


__all__ = [
    "ConfigError",
    "DOMAINS",
    "Domain",
    "RELATIONS",
    "ReARConfig",
    "apply_overrides",
    "canonical_choice",
    "check",
    "closest_key",
    "config_from_cli",
    "load_config",
    "merged_config",
    "model_settings",
    "paths_for_folder",
    "register_choice",
    "register_entry",
    "schema_fields",
    "schema_types",
    "split_cli",
    "to_container",
    "to_yaml",
    "validate",
    "with_overrides",
]
