"""Tokenizer reconstruction, as the tokenizer papers report it: encode and decode a set of images with any tokenizer
of the registry and measure what comes back.

- rFID (and the other ADM numbers) of the reconstructions against a reference batch: `--reference REF.npz`, or
  `--write-reference REF.npz` to write it first from the same images (ADM's centre crop, the bytes the tokenizer
  sees), as ReTok's and LlamaGen's `val_ddp.py` write theirs;
- PSNR and SSIM per image on the 8-bit images (scikit-image's `peak_signal_noise_ratio` and `structural_similarity`,
  data range 255, SSIM over the colour channels), averaged over the images as GigaTok and LlamaGen do. A tokenizer
  that gives an image back exactly has PSNR ∞ for it;
- codebook usage (the share of the codebook's codes that the images' tokens use) and perplexity (exp of the entropy
  of the codes' frequencies: V for codes used equally, 1 for one code).
The reconstructions are the bytes the sampler would save for those tokens (`decoded_to_uint8`), written as an ADM
.npz (`arr_0`, plus `tokens` and `labels`). A tokenizer that decodes prefixes (ReTok) is measured at each k of
`--prefixes`, from its first k tokens.

    python -m evaluator.reconstruction config=configs/rear_s.yaml --data imagenet/val --output runs/recon/maskgit \\
        --write-reference data/val_256.npz

Images: an image folder (root/<class>/<image>, ImageNet's val layout), WebDataset shards (a .tar brace pattern), an
.npz of uint8 images (`arr_0`, e.g. a reference batch), or `toy` (the toy set, a held-out seed).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn
from tqdm.auto import tqdm

from evaluator.measurement import add_inception_flags, resolve_device
from evaluator.npz import NpzImages
from evaluator.token_sets import evenly_spaced
from evaluator.toy import toy_uint8_images
from modeling import build_tokenizer
from modeling.tokenizers import decoded_to_uint8, decodes_prefixes
from utils import grids
from utils.cli import Script, flag_parser, non_negative_int, positive_int, run, torch_device
from utils.config import canonical_choice
from utils.data.images import center_crop_arr, decode_problem, list_image_folder, load_rgb
from utils.data.loader import class_label, expand_shards
from utils.data.toy import HELD_OUT_SEED_OFFSET
from utils.errors import DataError, OutputError, UsageError
from utils.fid_samples.run import save_shard, write_npz_from_shards
from utils.files import atomic_open, write_json

ImageBatches = Iterator[Tuple[np.ndarray, np.ndarray]]  # uint8 (B, H, W, 3) images and int64 (B,) labels
TOY_IMAGES = 1000


def prefixes_argument(text: str) -> Tuple[int, ...]:
    """'32,64,256' → (32, 64, 256): distinct token counts, increasing."""
    try:
        counts = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of token counts, e.g. 32,64,256")
    if counts[0] < 1:
        raise argparse.ArgumentTypeError(f"token counts must be at least 1, got {text}")
    return tuple(counts)


FLAGS = flag_parser()
FLAGS.add_argument("--data", required=True,
                   help="images: a folder root/<class>/<image>, shards (.tar pattern), an .npz (arr_0) or 'toy'")
FLAGS.add_argument("--output", required=True, help="folder for reconstruction.{json,md,png} and the .npz files")
FLAGS.add_argument("--limit", type=positive_int, default=None,
                   help=f"use this many images, evenly spaced (shards: the first ones; toy: default {TOY_IMAGES})")
FLAGS.add_argument("--reference", default=None, help="reference batch .npz for rFID")
FLAGS.add_argument("--write-reference", default=None,
                   help="write the centre-cropped input images to this .npz first, and use it as the reference")
FLAGS.add_argument("--prefixes", type=prefixes_argument, default=None,
                   help="a prefix tokenizer (retok): measure the first k tokens for each k, e.g. 32,64,128,256")
FLAGS.add_argument("--seed", type=int, default=None,
                   help=f"--data toy: seed of the images (default dataset.toy.seed + {HELD_OUT_SEED_OFFSET})")
FLAGS.add_argument("--batch-size", type=positive_int, default=64, help="images per tokenizer and Inception batch")
FLAGS.add_argument("--num-workers", type=non_negative_int, default=4, help="image-decoding workers (image folders)")
FLAGS.add_argument("--device", type=torch_device, default=None, help="torch device (default: cuda if available)")
add_inception_flags(FLAGS, "rFID")

SCRIPT = Script(
    usage="python -m evaluator.reconstruction config=FILE.yaml [experiment.tokenizer_checkpoint=W] --data IMAGES "
          "--output DIR [--reference REF.npz | --write-reference REF.npz] [--prefixes 32,64,256] [--limit N]",
    summary="Encode and decode IMAGES with the config's tokenizer: rFID against a reference batch (which it can "
            "write from the same images, ADM's centre crop), PSNR, SSIM, codebook usage and perplexity; the "
            "reconstructions as ADM .npz files; for a prefix tokenizer (ReTok) at each k of --prefixes.",
    example="python -m evaluator.reconstruction config=configs/rear_s.yaml --data imagenet/val "
            "--output runs/recon/maskgit --write-reference data/val_256.npz",
    sections=("model.vq_model.model_type", "model.vq_model.pretrained_tokenizer_weight",
              "experiment.tokenizer_checkpoint", "dataset.toy"),
    flags=FLAGS,
)


# ----------------------------------------------------------------------------------------- the images
class CenterCrops(torch.utils.data.Dataset):
    """(path, label) items → ADM centre crops as uint8 (size, size, 3) arrays."""

    def __init__(self, items: List[Tuple[str, int]], size: int):
        self.items, self.size = items, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        try:
            with open(path, "rb") as f:
                return np.array(center_crop_arr(load_rgb(f.read()), self.size)), label  # writable, for torch
        except Exception as err:  # a corrupt or truncated image: name it, whatever the decoder raised
            raise DataError(f"{path}: cannot decode the image ({decode_problem(err)})") from None


def folder_batches(root: str, size: int, batch_size: int, limit: Optional[int], workers: int):
    items = list_image_folder(root)[0]
    items = [items[i] for i in evenly_spaced(len(items), limit)]
    loader = torch.utils.data.DataLoader(CenterCrops(items, size), batch_size=batch_size, num_workers=workers)
    return ((images.numpy(), labels.numpy()) for images, labels in loader), len(items)


def shard_batches(shards: List[str], size: int, batch_size: int, limit: Optional[int]) -> ImageBatches:
    import webdataset as wds

    samples = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples())
    images, labels = [], []
    for sample in samples:
        where = f"shard {sample.get('__url__', '?')} member {sample.get('__key__', '?')}"
        key = next((k for k in ("jpg", "png", "jpeg", "webp") if k in sample), None)
        if key is None:
            raise DataError(f"{where}: no image (keys: {sorted(k for k in sample if not k.startswith('__'))})")
        try:
            images.append(np.asarray(center_crop_arr(load_rgb(sample[key]), size)))
        except Exception as err:  # a corrupt member: name the shard and the key, whatever the decoder raised
            raise DataError(f"{where}: cannot decode ({decode_problem(err)})") from None
        labels.append(class_label(sample["cls"]) if "cls" in sample else 0)
        if len(images) == batch_size or len(labels) == limit:
            yield np.stack(images), np.array(labels, dtype=np.int64)
            limit = None if limit is None else limit - len(labels)
            images, labels = [], []
            if limit == 0:
                return
    if images:
        yield np.stack(images), np.array(labels, dtype=np.int64)


def npz_batches(path: str, size: int, batch_size: int, limit: Optional[int]):
    images = NpzImages(path)
    if images.shape[1:3] != (size, size):
        raise DataError(f"{path} holds {images.shape[1]}x{images.shape[2]} images; the tokenizer takes {size}x{size}")
    with np.load(path) as npz:
        labels = npz["labels"].astype(np.int64) if "labels" in npz.files else np.zeros(len(images), np.int64)
    keep = evenly_spaced(len(images), limit)

    def batches() -> ImageBatches:
        start = 0
        for batch in images.select(keep, batch_size):
            yield batch, labels[keep[start : start + len(batch)]]
            start += len(batch)

    return batches(), len(keep)


def toy_batches(config, size: int, batch_size: int, limit: Optional[int], seed: Optional[int]):
    toy = config.dataset.toy
    if toy.image_size != size:
        raise DataError(f"dataset.toy.image_size is {toy.image_size} but the tokenizer takes {size}x{size} images")
    seed = toy.seed + HELD_OUT_SEED_OFFSET if seed is None else seed
    images, labels = toy_uint8_images(limit or TOY_IMAGES, toy, seed)
    batches = ((images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(images), batch_size))
    return batches, len(images)


def image_batches(config, flags, size: int):
    """(batches of uint8 images and labels, how many images or None) of --data, centre-cropped to `size`."""
    data, bs, limit = flags.data, flags.batch_size, flags.limit
    if data == "toy":
        return toy_batches(config, size, bs, limit, flags.seed)
    if os.path.isdir(data):
        return folder_batches(data, size, bs, limit, flags.num_workers)
    if data.endswith(".npz"):
        return npz_batches(data, size, bs, limit)
    if ".tar" in data:
        return shard_batches(expand_shards(data, "--data"), size, bs, limit), limit  # missing shards fail now
    raise DataError(f"--data {data}: not an image folder, an .npz, a .tar shard pattern or 'toy'")


# ----------------------------------------------------------------------------------------- the measurement
class Scores:
    """Per-image PSNR and SSIM and the code counts of one token count k."""

    def __init__(self, codebook_size: int):
        self.psnr: List[float] = []
        self.ssim: List[float] = []
        self.counts = np.zeros(codebook_size, np.int64)

    def add(self, originals: np.ndarray, reconstructions: np.ndarray, tokens: np.ndarray) -> None:
        for original, reconstruction in zip(originals, reconstructions):
            with np.errstate(divide="ignore"):  # an exact reconstruction: PSNR ∞
                self.psnr.append(float(peak_signal_noise_ratio(original, reconstruction, data_range=255)))
            self.ssim.append(float(structural_similarity(original, reconstruction, data_range=255, channel_axis=-1)))
        self.counts += np.bincount(tokens.reshape(-1), minlength=len(self.counts))

    def summary(self) -> dict:
        share = self.counts[self.counts > 0] / self.counts.sum()
        return {
            "num_images": len(self.psnr),
            "psnr": float(np.mean(self.psnr)),
            "ssim": float(np.mean(self.ssim)),
            "exact_images": int(np.sum(np.isinf(self.psnr))),
            "codes_used": int((self.counts > 0).sum()),
            "codebook_usage": float((self.counts > 0).mean()),
            "perplexity": float(np.exp(-(share * np.log(share)).sum())),
        }


def npz_name(k: int, num_tokens: int) -> str:
    return "reconstructions.npz" if k == num_tokens else f"reconstructions_k{k}.npz"


@torch.no_grad()
def reconstruct(tokenizer: nn.Module, batches: ImageBatches, prefixes: List[int], device: torch.device,
                shard_dir: str, total: Optional[int] = None, write_reference: bool = False):
    """Encode each batch, decode the first k tokens for every k of `prefixes`, score the 8-bit reconstructions and
    save them (and, with `write_reference`, the inputs) as shards under `shard_dir`/<k> (`reference`).
    Returns the scores by k and the first batch's rows (inputs, then the reconstructions by k) for a grid."""
    scores = {k: Scores(tokenizer.codebook_size) for k in prefixes}
    for name in [*map(str, prefixes), *(["reference"] if write_reference else [])]:
        os.makedirs(os.path.join(shard_dir, name))
    first_rows = []
    progress = tqdm(total=total, unit="img", desc="reconstructing")
    for index, (images, labels) in enumerate(batches):
        tokens = tokenizer.encode(torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255)
        if write_reference:
            save_shard(os.path.join(shard_dir, "reference", f"batch_{index:06d}.npz"),
                       {"arr_0": images, "tokens": tokens.to("cpu", torch.int32).numpy(), "labels": labels})
        rows = [images]
        for k in prefixes:
            first = tokens[:, :k]
            decoded = decoded_to_uint8(tokenizer.decode_tokens(first), tokenizer)
            first = first.to("cpu", torch.int32).numpy()
            scores[k].add(images, decoded, first)
            save_shard(os.path.join(shard_dir, str(k), f"batch_{index:06d}.npz"),
                       {"arr_0": decoded, "tokens": first, "labels": labels})
            rows.append(decoded)
        first_rows = first_rows or rows
        progress.update(len(images))
    progress.close()
    if not first_rows:
        raise DataError("no images to reconstruct")
    return scores, first_rows


def merge(shard_dir: str, name: str, path: str) -> None:
    """Shards `shard_dir`/`name`/* → the .npz at `path` (written atomically)."""
    folder = os.path.join(shard_dir, name)
    write_npz_from_shards(path, [os.path.join(folder, f) for f in sorted(os.listdir(folder))])


def comparison_grid(rows: List[np.ndarray], prefixes: List[int], columns: int = 8):
    """A row of input images, then a row of their reconstructions for each k (the first `columns` images)."""
    rows = [row[:columns] for row in rows]
    stacked = torch.from_numpy(np.concatenate(rows)).permute(0, 3, 1, 2).float() / 255
    return grids.labelled_rows(stacked, ["input", *[f"{k} tokens" for k in prefixes]], len(rows[0]),
                               scale=max(1, 128 // rows[0].shape[1]))


def markdown(results: dict) -> List[str]:
    rfid = "rFID" in results["by_prefix"][0]
    lines = [f"Reconstruction by the {results['tokenizer']} tokenizer ({results['tokenizer_checkpoint']}) of "
             f"{results['num_images']} images of {results['data']}"
             + (f"; rFID against {results['reference']}" if rfid else "") + ".", "",
             "![inputs and reconstructions](reconstruction.png)", "",
             "| tokens | " + ("rFID | " if rfid else "") + "PSNR | SSIM | codebook usage | perplexity | file |",
             "| --- |" + (" --- |" if rfid else "") + " --- | --- | --- | --- | --- |"]
    for entry in results["by_prefix"]:
        psnr = "∞" if math.isinf(entry["psnr"]) else f"{entry['psnr']:.2f}"
        lines.append(f"| {entry['k']} | " + (f"{entry['rFID']:.4f} | " if rfid else "") +
                     f"{psnr} | {entry['ssim']:.4f} | {entry['codebook_usage']:.4f} ({entry['codes_used']} of "
                     f"{results['codebook_size']}) | {entry['perplexity']:.2f} | {entry['npz']} |")
    return lines


def check_flags(config, flags) -> None:
    """Bad flags fail before the tokenizer loads or any file is written."""
    if flags.reference and flags.write_reference:
        raise UsageError("give --reference (an existing batch) or --write-reference (written from --data), not both")
    if flags.reference:
        NpzImages(flags.reference)
    if flags.write_reference and os.path.exists(flags.write_reference):
        raise OutputError(f"--write-reference {flags.write_reference} exists: pass it as --reference, or delete it")
    if flags.prefixes and not decodes_prefixes(config):
        raise UsageError(f"--prefixes: the {config.model.vq_model.model_type} tokenizer decodes all its tokens only; "
                         "prefixes are for tokenizers that decode the first k of them (retok)")
    if flags.data != "toy" and not os.path.exists(flags.data) and ".tar" not in flags.data:
        raise DataError(f"--data {flags.data}: no such file or folder")


def main(config, flags) -> dict:
    check_flags(config, flags)
    device = resolve_device(flags.device)
    tokenizer = build_tokenizer(config).to(device).eval()
    size, n = tokenizer.image_size, tokenizer.num_tokens
    prefixes = list(flags.prefixes or (n,))
    if prefixes[-1] > n:
        raise UsageError(f"--prefixes {','.join(map(str, prefixes))}: the tokenizer has {n} tokens")
    batches, total = image_batches(config, flags, size)
    out = flags.output
    shard_dir = os.path.join(out, "shards")
    shutil.rmtree(shard_dir, ignore_errors=True)  # of a run that was interrupted
    made = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    try:
        scores, first_rows = reconstruct(tokenizer, batches, prefixes, device, shard_dir, total,
                                         bool(flags.write_reference))
    except BaseException:  # a bad image met on the way: nothing is left behind
        shutil.rmtree(shard_dir, ignore_errors=True)
        if made and not os.listdir(out):
            os.rmdir(out)
        raise
    reference = flags.reference
    if flags.write_reference:
        os.makedirs(os.path.dirname(os.path.abspath(flags.write_reference)), exist_ok=True)
        merge(shard_dir, "reference", flags.write_reference)
        reference = flags.write_reference
        print(f"wrote {reference}: the {scores[prefixes[0]].summary()['num_images']} centre-cropped input images "
              "(arr_0), their tokens and labels")
    for k in prefixes:
        merge(shard_dir, str(k), os.path.join(out, npz_name(k, n)))
    shutil.rmtree(shard_dir)
    results = {"tokenizer": canonical_choice(config, "model.vq_model.model_type"),
               "tokenizer_checkpoint": config.experiment.tokenizer_checkpoint
               or config.model.vq_model.pretrained_tokenizer_weight, "data": flags.data, "image_size": size,
               "num_tokens": n, "codebook_size": tokenizer.codebook_size, "reference": reference,
               "num_images": scores[prefixes[0]].summary()["num_images"],
               "by_prefix": [{"k": k, "npz": npz_name(k, n), **scores[k].summary()} for k in prefixes]}
    if reference:
        from evaluator.evaluation import AdmScorer

        scorer = AdmScorer(reference, flags.batch_size, str(device), flags.inception_weights, flags.allow_few_samples)
        for entry in results["by_prefix"]:
            metrics = scorer(os.path.join(out, entry["npz"]))
            entry.update({"rFID": metrics.pop("FID"), **metrics})
    grids.save_png(comparison_grid(first_rows, prefixes), os.path.join(out, "reconstruction.png"))
    write_json(os.path.join(out, "reconstruction.json"), results)
    with atomic_open(os.path.join(out, "reconstruction.md")) as f:
        f.write("\n".join(markdown(results)) + "\n")
    for entry in results["by_prefix"]:
        print(f"{entry['k']} tokens: " + (f"rFID {entry['rFID']:.4f}, " if "rFID" in entry else "") +
              f"PSNR {entry['psnr']:.2f}, SSIM {entry['ssim']:.4f}, codebook usage {entry['codebook_usage']:.4f}, "
              f"perplexity {entry['perplexity']:.2f}")
    print(f"wrote {os.path.join(out, 'reconstruction.json')}, reconstruction.md, reconstruction.png and "
          + ", ".join(entry["npz"] for entry in results["by_prefix"]))
    return results


if __name__ == "__main__":
    run(SCRIPT, main)
