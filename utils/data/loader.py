"""Training batches from one of three sources, chosen by the config:

- `dataset.name: toy`: the built-in toy images (`utils/data/toy.py`), tokenized once in memory;
- `dataset.params.pretokenization`: a pre-tokenized JSONL file (`utils/data/pretokenized.py`), memory-mapped;
- `dataset.params.train_shards_path_or_url`: ImageNet WebDataset shards, decoded and transformed as the original
  release does (bicubic resize of the shorter edge, center or random crop, random flip) and tokenized on the fly
  by the frozen tokenizer (batches hold images; the training step encodes them).

Token data is read in a resumable order: the global stream of samples visits a seeded permutation of the data
set per pass, and a run at position p (samples consumed so far, saved in the checkpoint) continues from p. Each
micro-step takes the next processes x per-GPU samples of the stream; process r reads its r-th slice of them. An
optimizer step therefore trains on the same samples however its global batch is split into processes, micro-batches
and accumulation steps, and a run resumed on another number of processes with the same global batch
(`training.global_batch_size`) continues the same stream from the same position.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from utils.data.images import decode_problem, load_rgb, training_transform
from utils.data.pretokenized import TokenDataset, open_pretokenized
from utils.data.toy import encode_images, toy_images
from utils.errors import DataError
from utils.preemption import keep_worker_through_stop_signals


class ResumableSampler:
    """Batches of indices for one process; pass p over the data follows `randperm(n)` seeded by (seed, p)."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, start: int = 0):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed, self.start = rank, world_size, seed, start
        self._pass, self._order = -1, None

    def order(self, data_pass: int) -> torch.Tensor:
        if data_pass != self._pass:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + data_pass)
            self._pass, self._order = data_pass, torch.randperm(self.num_samples, generator=g)
        return self._order

    def indices(self, start: int, count: int) -> List[int]:
        """Sample indices at stream positions start .. start+count-1."""
        out = []
        while count:
            data_pass, offset = divmod(start, self.num_samples)
            take = min(count, self.num_samples - offset)
            out += self.order(data_pass)[offset : offset + take].tolist()
            start, count = start + take, count - take
        return out

    def __iter__(self) -> Iterator[List[int]]:
        position = self.start
        global_batch = self.batch_size * self.world_size
        while True:
            yield self.indices(position + self.rank * self.batch_size, self.batch_size)
            position += global_batch


def keep_batch(batch):
    """`TokenDataset.__getitems__` already returns the collated batch."""
    return batch


def token_loader(dataset: TokenDataset, config, rank: int, world_size: int, start: int,
                 batch_size: Optional[int] = None) -> DataLoader:
    """Batches of `batch_size` (default training.per_gpu_batch_size) from stream position `start`."""
    params = config.dataset.params
    sampler = ResumableSampler(
        len(dataset), batch_size or config.training.per_gpu_batch_size, rank, world_size, config.training.seed, start
    )
    workers = params.num_workers_per_gpu
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=keep_batch,
        num_workers=workers,
        pin_memory=params.pin_memory and torch.cuda.is_available(),
        persistent_workers=params.persistent_workers and workers > 0,
        worker_init_fn=keep_worker_through_stop_signals,
    )


def toy_token_dataset(config, tokenizer) -> TokenDataset:
    """The toy images of `dataset.toy`, tokenized by `tokenizer` (seconds on a CPU)."""
    toy = config.dataset.toy
    images, labels = toy_images(toy.num_images, toy.num_classes, toy.image_size, toy.seed)
    tokens = encode_images(tokenizer, images)
    return TokenDataset(tokens.numpy().astype("uint16"), labels.numpy().astype("int32"))


def expand_shards(pattern: str, source: str = "dataset.params.train_shards_path_or_url") -> List[str]:
    """The shard list of a brace pattern; local shards must exist (`source`: where the pattern was given)."""
    import braceexpand

    urls = [u for part in pattern.split("::") for u in braceexpand.braceexpand(part)]
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(urls)} training shards not found, e.g. {missing[0]} ({source})"
        )
    return urls


def class_label(data) -> int:
    return int(data.decode() if isinstance(data, bytes) else data)


class DecodeSample:
    """A shard member → (image tensor, class id), or None (with a warning naming the shard and the key) when the
    member cannot be decoded: one corrupt JPEG does not stop an 8-GPU run, and is not skipped silently. A class id
    the model does not have stops the run (the labels, not one member, are wrong)."""

    def __init__(self, transform, num_classes: int):
        self.transform, self.num_classes = transform, num_classes

    def __call__(self, sample: Dict) -> Optional[Tuple[torch.Tensor, int]]:
        where = f"shard {sample.get('__url__', '?')} member {sample.get('__key__', '?')}"
        image_key = next((k for k in ("jpg", "png", "jpeg", "webp") if k in sample), None)
        try:
            if image_key is None or "cls" not in sample:
                raise DataError(f"no image or no 'cls' (keys: {sorted(k for k in sample if not k.startswith('__'))})")
            image, label = self.transform(load_rgb(sample[image_key])), class_label(sample["cls"])
        except Exception as err:  # a corrupt or truncated member: every decoder error counts
            warnings.warn(f"skipping {where}: {decode_problem(err)}", stacklevel=1)
            return None
        if not 0 <= label < self.num_classes:
            raise DataError(f"{where}: class id {label}, outside [0, {self.num_classes}) "
                            "(model.generator.condition_num_classes)")
        return image, label


def decodable(samples: Iterator[Optional[Tuple]]) -> Iterator[Tuple]:
    return (sample for sample in samples if sample is not None)


def shard_loader(config, step: int, rank: int = 0, batch_size: Optional[int] = None) -> DataLoader:
    """An endless stream of image batches from the shards, resampled per worker and process.

    Streaming shards cannot seek, so a resumed run is not a replay: its stream is seeded with the step it resumes
    from, so that it reads fresh samples rather than the beginning of the old stream again. The workers' random crops
    and flips are seeded per process too (every process starts from the same training seed).
    """
    import webdataset as wds

    params, pre = config.dataset.params, config.dataset.preprocessing
    seed = config.training.seed * 1_000_003 + step
    pipeline = wds.DataPipeline(
        wds.ResampledShards(expand_shards(params.train_shards_path_or_url), seed=seed, deterministic=True),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(params.shuffle_buffer_size, seed=seed),
        wds.map(DecodeSample(training_transform(pre), config.model.generator.condition_num_classes)),
        decodable,
        wds.batched(batch_size or config.training.per_gpu_batch_size, partial=False),
    )
    workers = params.num_workers_per_gpu
    return DataLoader(
        pipeline,
        batch_size=None,
        num_workers=workers,
        pin_memory=params.pin_memory and torch.cuda.is_available(),
        persistent_workers=params.persistent_workers and workers > 0,
        generator=torch.Generator().manual_seed(seed * 1_000_003 + rank),
        worker_init_fn=keep_worker_through_stop_signals,
    )


def as_batch(batch) -> Dict[str, torch.Tensor]:
    """Token batches as they are; image batches from shards as a dict."""
    if isinstance(batch, dict):
        return batch
    images, class_ids = batch
    return {"images": images, "class_ids": torch.as_tensor(class_ids)}


def training_dataset(config, tokenizer) -> TokenDataset | None:
    """The token data set of the config (checked against the model), or None when training reads shards."""
    g, params = config.model.generator, config.dataset.params
    if config.dataset.name == "toy":
        dataset, source = toy_token_dataset(config, tokenizer), "the toy data set"
    elif params.pretokenization:
        dataset = open_pretokenized(params.pretokenization, params.pretokenized_cache_dir)
        source = params.pretokenization
    elif params.train_shards_path_or_url:
        expand_shards(params.train_shards_path_or_url)  # missing shards stop the run before its folder is made
        return None
    else:
        raise DataError(
            "no training data: set dataset.params.pretokenization (a JSONL file) or "
            "dataset.params.train_shards_path_or_url (WebDataset shards), or dataset.name=toy"
        )
    dataset.check(g.condition_num_classes, config.model.vq_model.codebook_size, g.image_seq_len, source,
                  prefix=getattr(tokenizer, "decodes_prefixes", False))
    return dataset


def batches(config, dataset: TokenDataset | None, rank: int, world_size: int, samples_seen: int, step: int,
            batch_size: Optional[int] = None):
    """Endless iterator of batches ({"tokens" or "images", "class_ids"}) of `batch_size` samples (default
    training.per_gpu_batch_size) from the data position of the run."""
    loader = (
        shard_loader(config, step, rank, batch_size)
        if dataset is None
        else token_loader(dataset, config, rank, world_size, samples_seen, batch_size)
    )
    return map(as_batch, loader)
