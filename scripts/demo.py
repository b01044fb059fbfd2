"""Generate a labelled grid of ImageNet classes with a released reAR generator, or with any config's generator.

    python scripts/demo.py --model reAR-S --classes 1 7 282 --out grid.png
    python scripts/demo.py config=configs/ar_b_alitok.yaml --generator alitok_b.bin --tokenizer AliTok.pth

Fetches the generator (Hugging Face Hub qyoo/reAR) and the MaskGIT-VQGAN tokenizer (fun-research/TiTok), or
reads local copies given with --generator PATH --tokenizer PATH. With `config=FILE` (any backbone) the weights are
--generator / --tokenizer, else the config's experiment.generator_checkpoint / tokenizer weights. Guidance,
temperature and top-k / top-p default to the model's released settings; `key.sub=value` overrides work as in every
script.
"""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a clone, uninstalled

from modeling import build_tokenizer, load_generator  # noqa: E402
from modeling.sampler import SamplingOptions, sample_images  # noqa: E402
from modeling.tokenizers import RELEASED_WEIGHTS, decoded_to_uint8  # noqa: E402
from utils.cli import Script, file_to_write, flag_parser, positive_int, run, torch_device  # noqa: E402
from utils.config import canonical_choice, check  # noqa: E402
from utils.errors import MissingWeightsError, UsageError  # noqa: E402
from utils.grids import class_caption, labelled_grid, save_png  # noqa: E402
from utils.weights import GENERATOR_FILENAMES, TOKENIZER_FILENAME, is_model_folder, resolve_weights  # noqa: E402

CONFIGS = {"reAR-S": "configs/rear_s.yaml", "reAR-B": "configs/rear_b.yaml", "reAR-L": "configs/rear_l.yaml"}

FLAGS = flag_parser()
FLAGS.add_argument("--model", choices=sorted(CONFIGS), default="reAR-S", help="released model (default reAR-S)")
FLAGS.add_argument("--classes", type=int, nargs="+", default=[1, 7, 282, 604, 724, 179, 751, 404, 850],
                   help="ImageNet class ids, one image each")
FLAGS.add_argument("--out", type=file_to_write, default="grid.png", help="the grid's PNG file")
FLAGS.add_argument("--generator", help="local generator weights (default: the released file of --model)")
FLAGS.add_argument("--tokenizer", help=f"local tokenizer weights, or a folder / Hub repo with config.json "
                                       f"(default: the released {TOKENIZER_FILENAME})")
FLAGS.add_argument("--seed", type=int, default=0, help="torch seed: the tokens of torch.manual_seed(seed); generate()")
FLAGS.add_argument("--guidance-scale", type=float, help="default: the model's released value")
FLAGS.add_argument("--guidance-scale-pow", type=float, help="default: the model's released value")
FLAGS.add_argument("--temperature", type=float, help="default: the model's released value")
FLAGS.add_argument("--top-k", type=int, help="keep the k most likely tokens")
FLAGS.add_argument("--top-p", type=float, help="keep the smallest set of tokens with this probability mass")
FLAGS.add_argument("--precision", choices=["fp32", "bf16"], help="bf16: CUDA only (default sampling.precision)")
FLAGS.add_argument("--columns", type=positive_int, default=8, help="images per row")
FLAGS.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda")

SCRIPT = Script(
    usage="python scripts/demo.py [config=FILE.yaml] [key.sub=value ...] [--model reAR-S] [--classes ...] "
          "[--out grid.png] [--generator PATH --tokenizer PATH]",
    summary="A labelled grid of ImageNet classes from a released reAR generator (weights from the Hub, or local), "
            "or from the generator of any config= (any backbone).",
    example="python scripts/demo.py --model reAR-S --classes 1 7 282 --out grid.png",
    sections=("sampling.guidance_scale", "sampling.guidance_scale_pow", "sampling.temperature", "sampling.top_k",
              "sampling.top_p", "sampling.precision"),
    flags=FLAGS,
    default_config=lambda flags: os.path.join(ROOT, CONFIGS[flags.model]),
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


def main(config, flags) -> None:
    num_classes = config.model.generator.condition_num_classes
    bad = [c for c in flags.classes if not 0 <= c < num_classes]
    if bad:
        raise UsageError(f"--classes: {bad[0]} is not a class id of this model (0..{num_classes - 1})")
    generator = flags.generator or config.experiment.generator_checkpoint
    if generator is None:  # --model names reAR's released files: the rar backbone's
        if config.model.generator.backbone != "rar":
            raise UsageError(f"this config's {config.model.generator.backbone} generator has no weights named: pass "
                             "--generator PATH (or experiment.generator_checkpoint=PATH)")
        generator = GENERATOR_FILENAMES[flags.model]
    for key in ("guidance_scale", "guidance_scale_pow", "temperature", "top_k", "top_p", "precision"):
        if getattr(flags, key) is not None:
            config.sampling[key] = getattr(flags, key)
    check(config, "the command line")  # the flags' values, as every other value
    vq = config.model.vq_model
    tokenizer = (flags.tokenizer or config.experiment.tokenizer_checkpoint or vq.pretrained_tokenizer_weight
                 or RELEASED_WEIGHTS.get(canonical_choice(config, "model.vq_model.model_type")))
    if tokenizer is None:
        raise UsageError(f"this config's {vq.model_type} tokenizer has no weights named: pass --tokenizer PATH "
                         "(or experiment.tokenizer_checkpoint=PATH)")
    generator_path, tokenizer_path = fetch_weights(generator, tokenizer)
    config.experiment.tokenizer_checkpoint = tokenizer_path
    device = torch.device(flags.device)
    tokenizer = build_tokenizer(config).to(device).eval()  # first: a config that does not describe it fails here
    generator = load_generator(config, generator_path).to(device)
    options = SamplingOptions.from_config(config)
    class_ids = torch.tensor(flags.classes, device=device)
    torch.manual_seed(flags.seed)  # as `torch.manual_seed(seed); generator.generate(...)` in a script
    images = decoded_to_uint8(sample_images(generator, tokenizer, class_ids, options), tokenizer)
    save_png(labelled_grid(images, [class_caption(c, num_classes) for c in flags.classes], flags.columns), flags.out)
    print(f"wrote {flags.out}: classes {flags.classes}, seed {flags.seed}, {options}")


if __name__ == "__main__":
    run(SCRIPT, main)
