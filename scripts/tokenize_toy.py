"""Held-out toy data, pre-tokenized: fresh toy images (another seed than training's) through a toy run's tokenizer,
as JSON Lines in the format of scripts/pretokenization.py, for `python -m evaluator.exposure` and
`python -m evaluator.consistency --reference`.

    python scripts/tokenize_toy.py config=runs/rear_toy/config.yaml \\
        experiment.tokenizer_checkpoint=runs/rear_toy/tokenizer.safetensors --output runs/rear_toy/held_out.jsonl
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled
from utils.threads import use_thread_defaults  # noqa: E402

use_thread_defaults()  # before torch loads

from modeling import build_tokenizer  # noqa: E402
from utils.cli import Script, file_to_write, flag_parser, positive_int, run  # noqa: E402
from utils.data.toy import HELD_OUT_SEED_OFFSET, encode_images, toy_images  # noqa: E402
from utils.errors import UsageError  # noqa: E402
from utils.files import atomic_open  # noqa: E402


FLAGS = flag_parser()
FLAGS.add_argument("--output", type=file_to_write, required=True, help="the JSON Lines file to write")
FLAGS.add_argument("--num-images", type=positive_int, default=1000, help="images to draw (default 1000)")
FLAGS.add_argument("--seed", type=int, default=None,
                   help=f"seed of the images (default: dataset.toy.seed + {HELD_OUT_SEED_OFFSET})")

SCRIPT = Script(
    usage="python scripts/tokenize_toy.py config=RUN/config.yaml "
          "experiment.tokenizer_checkpoint=RUN/tokenizer.safetensors --output FILE.jsonl [--num-images N] [--seed S]",
    summary="Draw held-out toy images (a seed training does not use) and tokenize them with a toy run's tokenizer "
            'into JSON Lines, one {"class_id": int, "tokens": [...]} a line.',
    example="python scripts/tokenize_toy.py config=runs/rear_toy/config.yaml "
            "experiment.tokenizer_checkpoint=runs/rear_toy/tokenizer.safetensors --output runs/rear_toy/held_out.jsonl",
    sections=("experiment.tokenizer_checkpoint", "dataset.toy"),
    flags=FLAGS,
)


def main(config, flags) -> None:
    if config.dataset.name != "toy":
        raise UsageError(f"dataset.name is '{config.dataset.name}': this script draws the toy data set; "
                         "pre-tokenize other images with scripts/pretokenization.py")
    toy = config.dataset.toy
    seed = toy.seed + HELD_OUT_SEED_OFFSET if flags.seed is None else flags.seed
    if seed == toy.seed:
        raise UsageError(f"--seed {seed} is dataset.toy.seed, the training images' seed: choose another")
    tokenizer = build_tokenizer(config).eval()
    images, labels = toy_images(flags.num_images, toy.num_classes, toy.image_size, seed)
    tokens = encode_images(tokenizer, images, batch_size=256).tolist()
    with atomic_open(flags.output) as out:
        for class_id, row in zip(labels.tolist(), tokens):
            out.write(json.dumps({"class_id": class_id, "tokens": row}) + "\n")
    print(f"wrote {flags.output}: {flags.num_images} toy images (seed {seed}), {len(tokens[0])} tokens each")


if __name__ == "__main__":
    run(SCRIPT, main)
