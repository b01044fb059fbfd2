"""Pre-tokenize ImageNet (an image folder or WebDataset shards) into JSON Lines for training.

    torchrun --nproc_per_node=8 scripts/pretokenization.py config=configs/rear_s.yaml \\
        --data imagenet/train --output maskgitvq.jsonl --augment ten_crop

One line per crop: {"class_id": int, "tokens": [int × N]}. Augmentations (all deterministic, so a rerun writes the
same bytes): `center` (ADM center crop, 1 line an image), `flip` (it and its mirror image, 2 lines) or `ten_crop`
(RAR's public `maskgitvq.jsonl`: ADM crop to 1.1×size, four corners + center and their flips, 10 lines).
Each process writes its share of the images to OUTPUT.part-<rank>-of-<world>, flushed after every batch; an
interrupted run started again with the same command and number of processes skips what its parts already hold.
When every part is complete, rank 0 merges them into OUTPUT (written to a temporary name, then renamed).
The tokenizer and crop size come from the config (`model.vq_model.*`, `dataset.preprocessing.crop_size`).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from typing import Iterator, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled
from utils.threads import use_thread_defaults  # noqa: E402

use_thread_defaults()  # before torch loads

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from modeling import build_tokenizer  # noqa: E402
from utils.cli import Script, file_to_write, flag_parser, non_negative_int, positive_int, run  # noqa: E402
from utils.config import to_container  # noqa: E402
from utils.data.images import (  # noqa: E402
    center_crop_arr,
    decode_problem,
    list_image_folder,
    load_rgb,
    ten_crops,
    to_tensor,
)
from utils.data.loader import expand_shards  # noqa: E402
from utils.errors import DataError, OutputError  # noqa: E402
from utils.files import (  # noqa: E402
    atomic_open,
    changed_settings,
    read_record,
    remove_temporaries_of,
    write_json,
    writing,
)
from utils.weights import describe_file  # noqa: E402

CROPS_PER_IMAGE = {"center": 1, "flip": 2, "ten_crop": 10}


FLAGS = flag_parser()
FLAGS.add_argument("--data", required=True, help="image folder (root/<class>/<image>) or a shard pattern (.tar)")
FLAGS.add_argument("--output", type=file_to_write, required=True, help="the JSON Lines file to write")
FLAGS.add_argument("--augment", choices=sorted(CROPS_PER_IMAGE), default="ten_crop", help="crops per image")
FLAGS.add_argument("--batch_size", type=positive_int, default=64, help="images per tokenizer batch and process")
FLAGS.add_argument("--num_workers", type=non_negative_int, default=8,
                   help="image-decoding workers per process (folders; 0: in the main process)")

SCRIPT = Script(
    usage="torchrun --nproc_per_node=K scripts/pretokenization.py config=FILE.yaml --data DIR_OR_SHARDS "
          "--output FILE.jsonl [--augment ten_crop|flip|center] [key.sub=value ...]   (or plain python)",
    summary="Pre-tokenize ImageNet (a class-folder tree or WebDataset shards) into JSON Lines with the config's "
            "frozen tokenizer; resumable, several processes merge into one file.",
    example="python scripts/pretokenization.py config=configs/rear_s.yaml --data imagenet/train "
            "--output data/maskgitvq.jsonl --augment ten_crop",
    sections=("model.vq_model", "experiment.tokenizer_checkpoint", "dataset.preprocessing.crop_size"),
    flags=FLAGS,
)


def crops(image, size: int, augment: str) -> torch.Tensor:
    """(crops, 3, size, size) in [0, 1] for one PIL image."""
    if augment == "ten_crop":
        return torch.stack([to_tensor(c) for c in ten_crops(image, size)])
    center = to_tensor(center_crop_arr(image, size))
    return torch.stack([center, center.flip(-1)]) if augment == "flip" else center[None]


class FolderImages(torch.utils.data.Dataset):
    def __init__(self, items, size: int, augment: str):
        self.items, self.size, self.augment = items, size, augment

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, label = self.items[index]
        with open(path, "rb") as f:
            data = f.read()
        try:
            return crops(load_rgb(data), self.size, self.augment), label
        except Exception as err:  # a corrupt or truncated image: name it, whatever the decoder raised
            raise DataError(f"{path}: cannot decode the image ({decode_problem(err)})") from None


class ShardImages(torch.utils.data.IterableDataset):
    """This process's shards, read in order, after skipping the first `skip` samples."""

    def __init__(self, shards, size: int, augment: str, skip: int):
        self.shards, self.size, self.augment, self.skip = shards, size, augment, skip

    def __iter__(self) -> Iterator:
        import webdataset as wds

        samples = wds.DataPipeline(wds.SimpleShardList(self.shards), wds.tarfile_to_samples())
        for index, sample in enumerate(samples):
            if index >= self.skip:
                yield self.decode(sample)

    def decode(self, sample):
        try:
            image_key = next(k for k in ("jpg", "png", "jpeg", "webp") if k in sample)
            return crops(load_rgb(sample[image_key]), self.size, self.augment), int(sample["cls"])
        except Exception as err:  # a corrupt member: name the shard and the key, whatever the decoder raised
            raise DataError(f"shard {sample.get('__url__', '?')} member {sample.get('__key__', '?')}: cannot decode "
                            f"({decode_problem(err)})") from None


def resume_part(path: str, lines_per_image: int) -> int:
    """Images already in a part file; a torn last image (or line) is cut off so the file ends on an image."""
    if not os.path.isfile(path):
        return 0
    images = lines = offset = keep = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            lines, offset = lines + 1, offset + len(line)
            if lines % lines_per_image == 0:
                images, keep = images + 1, offset
    if os.path.getsize(path) != keep:
        with open(path, "r+b") as f:
            f.truncate(keep)
    return images


def settings_of(config, args) -> dict:
    """What the lines of a part depend on (the tokenizer weights by path and size): a resumed part must not mix
    the tokens of two tokenizers, or of two data sets."""
    weights = config.experiment.tokenizer_checkpoint or config.model.vq_model.pretrained_tokenizer_weight
    return {"data": os.path.abspath(args.data), "augment": args.augment,
            "crop_size": config.dataset.preprocessing.crop_size, "tokenizer": to_container(config.model.vq_model),
            "tokenizer_checkpoint": describe_file(weights)}


def record_path(part: str) -> str:
    return part + ".settings.json"


def check_settings(part: str, settings: dict) -> None:
    """A part that already holds images must have been made with `settings`: else its lines and the new ones
    would end up in one file."""
    try:
        recorded = read_record(record_path(part))
    except (OSError, ValueError):
        raise OutputError(f"{part} holds images but no readable record of the settings that made them "
                          f"({record_path(part)}); delete it to tokenize again") from None
    changes = changed_settings(recorded, settings)
    if changes:
        raise OutputError(f"{part} holds images made with other settings ({changes}); rerun with those, "
                          "or delete it (and its .settings.json) to tokenize again")


def merge_parts(parts: List[str], output: str) -> None:
    with atomic_open(output, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
    for part in parts:
        for leftover in (part, part + ".done", record_path(part)):
            os.remove(leftover)


def main(config, args) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    parts = [f"{args.output}.part-{r}-of-{world}" for r in range(world)]
    if os.path.isfile(args.output) and not any(os.path.exists(p) for p in parts):
        print(f"{args.output} is already complete; delete it to tokenize again")
        return
    if world > 1:  # long timeout: ranks finish their shares at different times, then wait for the merge
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=6))
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    size, per_image = config.dataset.preprocessing.crop_size, CROPS_PER_IMAGE[args.augment]
    part = parts[rank]

    complete = os.path.isfile(part + ".done")
    done = None if complete else resume_part(part, per_image)
    settings = settings_of(config, args)
    if complete or done:
        check_settings(part, settings)
    if not complete:
        # The tokenizer and the images are found before anything is written.
        tokenizer = build_tokenizer(config).to(device)
        if os.path.isdir(args.data):
            items = list_image_folder(args.data)[0][rank::world]
            dataset, total, workers = FolderImages(items[done:], size, args.augment), len(items), args.num_workers
        elif ".tar" in args.data:  # read in order by this process alone, so that a resumed run counts what to skip
            shards = expand_shards(args.data, "--data")[rank::world]
            dataset, total, workers = ShardImages(shards, size, args.augment, done), None, 0
        else:
            raise DataError(f"--data {args.data}: no such image folder (root/<class>/<image>) or .tar shard pattern")
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=workers)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        remove_temporaries_of(record_path(part))  # of a killed run
        write_json(record_path(part), settings)  # the same, or those of a part with no images yet
        try:
            with writing(part), open(part, "a") as out, torch.no_grad(), tqdm(
                total=total, initial=done, unit="img", disable=rank != 0, desc="pre-tokenizing"
            ) as progress:
                for images, labels in loader:
                    tokens = tokenizer.encode(images.flatten(0, 1).to(device)).cpu().tolist()
                    classes = labels.repeat_interleave(per_image).tolist()
                    out.write("".join(json.dumps({"class_id": c, "tokens": t}) + "\n"
                                      for c, t in zip(classes, tokens)))
                    out.flush()
                    progress.update(len(labels))
        except BaseException:
            if not os.path.isfile(part) or os.path.getsize(part) == 0:  # failed before its first images:
                for leftover in (part, record_path(part)):  # leave nothing behind
                    if os.path.exists(leftover):
                        os.remove(leftover)
            raise
        open(part + ".done", "w").close()
    if world > 1:
        dist.barrier()
    if rank == 0:
        remove_temporaries_of(args.output)  # of a run killed while merging
        merge_parts(parts, args.output)
        print(f"wrote {args.output}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run(SCRIPT, main)
