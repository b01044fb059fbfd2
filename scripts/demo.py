"""Generate a labelled grid of ImageNet classes with a released reAR generator, or with any config's generator.

    python scripts/demo.py --model reAR-S --classes 1 7 282 --out grid.png
    python scripts/demo.py config=configs/ar_b_alitok.yaml --generator alitok_b.bin --tokenizer AliTok.pth
    python scripts/demo.py config=runs/rear_toy/config.yaml      # a run of yours: its config names its weights

Fetches the generator (Hugging Face Hub qyoo/reAR) and the MaskGIT-VQGAN tokenizer (fun-research/TiTok), or
reads local copies given with --generator PATH --tokenizer PATH. With `config=FILE` (any backbone) the weights are
--generator / --tokenizer, else the config's experiment.generator_checkpoint / tokenizer weights. Guidance,
temperature and top-k / top-p default to the model's released settings; `key.sub=value` overrides work as in every
script.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a clone, uninstalled
from utils.threads import use_thread_defaults  # noqa: E402

use_thread_defaults()  # before torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from modeling import build_tokenizer, load_generator  # noqa: E402
from modeling.sampler import Progress, SamplingOptions, sample  # noqa: E402
from modeling.tokenizers import decoded_to_uint8, tokenizer_weights  # noqa: E402
from utils.cli import Script, file_to_write, flag_parser, positive_int, run, torch_device  # noqa: E402
from utils.config import check  # noqa: E402
from utils.errors import MissingWeightsError, UsageError  # noqa: E402
from utils.grids import class_names, labelled_grid, save_png  # noqa: E402
from utils.weights import GENERATOR_FILENAMES, TOKENIZER_FILENAME, is_model_folder, resolve_weights  # noqa: E402

SAMPLING_FLAGS = ("guidance_scale", "guidance_scale_pow", "temperature", "top_k", "top_p", "precision")
CONFIGS = {"reAR-S": "configs/rear_s.yaml", "reAR-B": "configs/rear_b.yaml", "reAR-L": "configs/rear_l.yaml"}
IMAGENET_CLASSES = [1, 7, 282, 604, 724, 179, 751, 404, 850]  # the default grid of a 1000-class model
OTHER_CLASSES = 16  # the default grid of another model: its first classes, up to this many


def model_flags() -> argparse.ArgumentParser:
    """The flags of the weights, the device and the sampling settings: the demo's, and its page's (scripts/app.py)."""
    flags = flag_parser()
    flags.add_argument("--model", choices=sorted(CONFIGS),
                       help="released model (default: the released config's, or reAR-S without config=)")
    flags.add_argument("--classes", type=int, nargs="+",
                       help=f"class ids, one image each (default: {' '.join(map(str, IMAGENET_CLASSES))} for "
                            f"ImageNet; else the first {OTHER_CLASSES} classes)")
    flags.add_argument("--generator", help="local generator weights (default: the released file of --model)")
    flags.add_argument("--tokenizer", help=f"local tokenizer weights, or a folder / Hub repo with config.json "
                                           f"(default: the released {TOKENIZER_FILENAME})")
    flags.add_argument("--seed", type=int, default=0,
                       help="torch seed: the tokens of torch.manual_seed(seed); generate()")
    flags.add_argument("--guidance-scale", type=float, help="default: the model's released value")
    flags.add_argument("--guidance-scale-pow", type=float, help="default: the model's released value")
    flags.add_argument("--temperature", type=float, help="default: the model's released value")
    flags.add_argument("--top-k", type=int, help="keep the k most likely tokens")
    flags.add_argument("--top-p", type=float, help="keep the smallest set of tokens with this probability mass")
    flags.add_argument("--precision", choices=["fp32", "bf16"], help="bf16: CUDA only (default sampling.precision)")
    flags.add_argument("--columns", type=positive_int, default=8, help="images per row")
    flags.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu or cuda")
    return flags


FLAGS = model_flags()
FLAGS.add_argument("--out", type=file_to_write, default="grid.png", help="the grid's PNG file")

SCRIPT = Script(
    usage="python scripts/demo.py [config=FILE.yaml] [key.sub=value ...] [--model reAR-S] [--classes ...] "
          "[--out grid.png] [--generator PATH --tokenizer PATH]",
    summary="A labelled grid of ImageNet classes from a released reAR generator (weights from the Hub, or local), "
            "or from the generator of any config= (any backbone).",
    example="python scripts/demo.py --model reAR-S --classes 1 7 282 --out grid.png",
    sections=("sampling.guidance_scale", "sampling.guidance_scale_pow", "sampling.temperature", "sampling.top_k",
              "sampling.top_p", "sampling.precision"),
    flags=FLAGS,
    default_config=lambda flags: os.path.join(ROOT, CONFIGS[flags.model or "reAR-S"]),
)


def fetch_weights(generator: str, tokenizer: str) -> tuple[str, str]:
    """Local paths of both weight files; if either cannot be had, one error that names both and the way out."""
    paths, errors = [], []
    for what, name, flag in (("generator", generator, "--generator"), ("tokenizer", tokenizer, "--tokenizer")):
        if what == "tokenizer" and is_model_folder(name):  # config.json + weights (TiTok's Hub repos): the
            paths.append(name)                               # tokenizer's builder reads the folder
            continue
        try:
            paths.append(resolve_weights(name, local_option=f"{flag} PATH"))
        except MissingWeightsError as err:
            errors.append(f"{what}: {err}")
    if errors:
        raise MissingWeightsError("the demo needs two weight files; " + " | ".join(errors))
    return paths[0], paths[1]


def released_model(config, flags) -> Optional[str]:
    """The released model whose weights a config without its own stands for: --model, else the released config's."""
    if flags.model is not None:
        return flags.model
    return next((model for model, path in CONFIGS.items()
                 if os.path.splitext(os.path.basename(path))[0] == config.experiment.name), None)


def set_sampling(config, values: dict, source: str):
    """`config` with the sampling settings in `values` (None: keep the config's), checked as every value is."""
    for key, value in values.items():
        if value is not None:
            config.sampling[key] = value
    return check(config, source)


def load_models(config, flags) -> tuple[nn.Module, nn.Module]:
    """The generator and the tokenizer the demo samples with, on --device, in eval mode: the files of --generator /
    --tokenizer, else the config's, else the released ones (fetched); a missing file is one error naming both."""
    generator = flags.generator or config.experiment.generator_checkpoint
    if generator is None:  # reAR's released configs name the released files: the rar backbone's
        model = released_model(config, flags) if config.model.generator.backbone == "rar" else None
        if model is None:
            raise UsageError(f"this config's {config.model.generator.backbone} generator has no weights named: pass "
                             "--generator PATH (or experiment.generator_checkpoint=PATH)")
        generator = GENERATOR_FILENAMES[model]
    tokenizer = flags.tokenizer or tokenizer_weights(config)
    if tokenizer is None:
        raise UsageError(f"this config's {config.model.vq_model.model_type} tokenizer has no weights named: pass "
                         "--tokenizer PATH (or experiment.tokenizer_checkpoint=PATH)")
    generator_path, tokenizer_path = fetch_weights(generator, tokenizer)
    config.experiment.tokenizer_checkpoint = tokenizer_path
    device = torch.device(flags.device)
    tokenizer = build_tokenizer(config).to(device).eval()  # first: a config that does not describe it fails here
    return load_generator(config, generator_path).to(device), tokenizer


def draw(generator: nn.Module, tokenizer: nn.Module, config, classes: Sequence[int], seed: int, columns: int,
         progress: Optional[Progress] = None) -> tuple[torch.Tensor, np.ndarray, Image.Image]:
    """Tokens (B, N), images uint8 (B, H, W, 3) and their labelled grid for the class ids `classes`, sampled with
    the config's settings after `torch.manual_seed(seed)`."""
    options = SamplingOptions.from_config(config)
    class_ids = torch.tensor(list(classes), device=next(generator.parameters()).device)
    torch.manual_seed(seed)  # as `torch.manual_seed(seed); generator.generate(...)` in a script
    tokens, decoded = sample(generator, tokenizer, class_ids, options, progress=progress)
    images = decoded_to_uint8(decoded.float(), tokenizer)
    names = class_names(config)
    return tokens, images, labelled_grid(images, [names[c] for c in classes], columns)


def chosen_classes(config, flags) -> list[int]:
    """--classes, checked against the model's labels; by default nine ImageNet classes, or the first ones."""
    num_classes = config.model.generator.condition_num_classes
    if flags.classes is None:
        return IMAGENET_CLASSES if num_classes == 1000 else list(range(min(num_classes, OTHER_CLASSES)))
    bad = [c for c in flags.classes if not 0 <= c < num_classes]
    if bad:
        raise UsageError(f"--classes: {bad[0]} is not a class id of this model (0..{num_classes - 1})")
    return flags.classes


def apply_flags(config, flags):
    """The config with the sampling flags' values, checked."""
    return set_sampling(config, {key: getattr(flags, key) for key in SAMPLING_FLAGS}, "the command line")


def main(config, flags) -> None:
    classes = chosen_classes(config, flags)
    apply_flags(config, flags)
    generator, tokenizer = load_models(config, flags)
    _, _, grid = draw(generator, tokenizer, config, classes, flags.seed, flags.columns)
    save_png(grid, flags.out)
    print(f"wrote {flags.out}: classes {classes}, seed {flags.seed}, {SamplingOptions.from_config(config)}")


if __name__ == "__main__":
    run(SCRIPT, main)
