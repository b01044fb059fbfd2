"""Pack an ImageNet folder into WebDataset tar shards (keys `jpg`/`png` + `cls`), the layout training reads.

    python scripts/convert_imagenet_to_wds.py --imagenet_dir /data/imagenet --output_dir imagenet_sharded

Each split (default train and val) must be in the class-folder layout root/<split>/<synset>/<image> (for val, move
the images into synset folders first, e.g. with the usual `valprep.sh`); labels are the sorted synset indices.
Image bytes are stored as they are, not re-encoded. The train split is shuffled (seeded) so that every shard mixes
classes. With the default 5,065 images a shard, ImageNet gives OUTPUT_DIR/train/imagenet-train-{0000..0252}.tar and
OUTPUT_DIR/val/imagenet-val-{0000..0009}.tar, the patterns in configs/.
"""

from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled
from utils.threads import use_thread_defaults  # noqa: E402

use_thread_defaults()  # before torch loads

from tqdm.auto import tqdm  # noqa: E402

from utils.cli import Script, flag_parser, positive_int, run  # noqa: E402
from utils.data.images import list_image_folder  # noqa: E402
from utils.files import atomic_path, remove_temporaries_of  # noqa: E402


def write_split(root: str, split: str, output_dir: str, maxcount: int, seed: int) -> int:
    import webdataset as wds

    items, _ = list_image_folder(os.path.join(root, split))
    if split == "train":
        random.Random(seed).shuffle(items)
    final = os.path.join(output_dir, split)
    os.makedirs(output_dir, exist_ok=True)
    remove_temporaries_of(final)  # of a run killed while writing this split
    # The split's folder appears complete or not at all: a killed run leaves no truncated shard to train on.
    with atomic_path(final) as tmp:
        os.makedirs(tmp)
        pattern = os.path.join(tmp, f"imagenet-{split}-%04d.tar")
        with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
            for index, (path, label) in enumerate(tqdm(items, desc=split, unit="img")):
                key = "png" if path.lower().endswith(".png") else "jpg"
                with open(path, "rb") as f:
                    sink.write({"__key__": f"{split}_{index:08d}", key: f.read(), "cls": label})
    return len(items)


FLAGS = flag_parser()
FLAGS.add_argument("--imagenet_dir", required=True, help="folder holding <split>/<synset>/<image>")
FLAGS.add_argument("--output_dir", required=True, help="where <split>/imagenet-<split>-NNNN.tar go")
FLAGS.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to convert")
FLAGS.add_argument("--maxcount", type=positive_int, default=5065, help="images a shard")
FLAGS.add_argument("--seed", type=int, default=0, help="shuffle of the train split")

SCRIPT = Script(
    usage="python scripts/convert_imagenet_to_wds.py --imagenet_dir DIR --output_dir OUT [--splits train val]",
    summary="Pack an ImageNet class-folder tree into WebDataset tar shards (keys jpg/png + cls), the layout that "
            "training on shards reads.",
    example="python scripts/convert_imagenet_to_wds.py --imagenet_dir /data/imagenet --output_dir imagenet_sharded",
    flags=FLAGS,
    takes_config=False,
)


def main(config, args) -> None:
    for split in args.splits:
        if os.path.isdir(os.path.join(args.output_dir, split)):
            print(f"{os.path.join(args.output_dir, split)} exists: kept (delete it to convert {split} again)")
            continue
        count = write_split(args.imagenet_dir, split, args.output_dir, args.maxcount, args.seed)
        shards = -(-count // args.maxcount)
        print(f"{split}: {count} images in {shards} shards under {os.path.join(args.output_dir, split)}")


if __name__ == "__main__":
    run(SCRIPT, main)
