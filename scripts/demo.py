"""Generate a labelled grid of ImageNet classes with a released reAR generator.

    python scripts/demo.py --model reAR-S --classes 1 7 282 --out grid.png

Fetches the generator (Hugging Face Hub qyoo/reAR) and the MaskGIT-VQGAN tokenizer (fun-research/TiTok), or
reads local copies given with --generator PATH --tokenizer PATH. Guidance, temperature and top-k / top-p default
to the model's released settings.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a clone, uninstalled

from utils.weights import GENERATOR_FILENAMES, PUBLISHED, TOKENIZER_FILENAME, resolve_weights  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.image_grid import class_caption, labelled_grid  # noqa: E402
from utils.sampling import SamplingOptions, load_models, sample_images  # noqa: E402

CONFIGS = {"reAR-S": "configs/rear_s.yaml", "reAR-B": "configs/rear_b.yaml", "reAR-L": "configs/rear_l.yaml"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), default="reAR-S")
    parser.add_argument("--classes", type=int, nargs="+", default=[1, 7, 282, 604, 724, 179, 751, 404, 850])
    parser.add_argument("--out", default="grid.png")
    parser.add_argument("--generator", help="local generator weights (default: the released file of --model)")
    parser.add_argument("--tokenizer", help=f"local tokenizer weights (default: the released {TOKENIZER_FILENAME})")
    parser.add_argument("--config", help="config YAML (default: the one of --model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--guidance-scale-pow", type=float)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, CUDA only")
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def fetch_weights(generator: str, tokenizer: str) -> tuple[str, str]:
    """Local paths of both weight files; if either cannot be had, one error that names both and the way out."""
    paths, errors = [], []
    for what, name in (("generator", generator), ("tokenizer", tokenizer)):
        try:
            paths.append(resolve_weights(name))
        except FileNotFoundError as err:
            errors.append(f"  {what}: {err}")
    if errors:
        names = [os.path.basename(n) for n in (generator, tokenizer)]
        sources = ", ".join(f"{name} ({PUBLISHED.get(name, 'local file')})" for name in names)
        raise SystemExit(
            f"The demo needs two weight files: {sources}.\n" + "\n".join(errors) + "\n"
            "Without access to the Hugging Face Hub, download both elsewhere and pass their local paths: "
            "--generator PATH --tokenizer PATH"
        )
    return paths[0], paths[1]


def main(argv=None) -> None:
    args = parse_args(argv)
    config = load_config(args.config or os.path.join(ROOT, CONFIGS[args.model]))
    generator_path, tokenizer_path = fetch_weights(
        args.generator or GENERATOR_FILENAMES[args.model],
        args.tokenizer or config.model.vq_model.pretrained_tokenizer_weight or TOKENIZER_FILENAME,
    )
    config.experiment.generator_checkpoint = generator_path
    config.experiment.tokenizer_checkpoint = tokenizer_path
    for key in ("guidance_scale", "guidance_scale_pow", "temperature", "top_k", "top_p"):
        config.sampling[key] = getattr(args, key)
    device = torch.device(args.device)
    generator, tokenizer = load_models(config, device)
    options = SamplingOptions.from_config(config)
    torch.manual_seed(args.seed)  # as `torch.manual_seed(seed); generator.generate(...)` in a script
    images = sample_images(generator, tokenizer, torch.tensor(args.classes, device=device), options, args.precision)
    num_classes = config.model.generator.condition_num_classes
    grid = labelled_grid(images, [class_caption(c, num_classes) for c in args.classes], args.columns)
    grid.save(args.out)
    print(f"wrote {args.out}: classes {args.classes}, seed {args.seed}, {options}")


if __name__ == "__main__":
    main()
