"""Token sequences to measure, read from the files the project writes.

- `.npz` from the 50k sampler (`scripts/sample_imagenet_rear.py`): its `tokens` (N, L) and `labels` (N,) members
  (its images, `arr_0`, are not read);
- `.npy`: a token array (N, L) alone;
- `.jsonl`: pre-tokenized data (`scripts/pretokenization.py`, or `scripts/tokenize_toy.py`), read through the same
  memory-mapped cache training uses.
`limit` keeps an evenly spaced subset: the sampler's files are ordered by class and a ten-crop file by image, so
the first rows would be a few classes or a few images.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from typing import Optional

import numpy as np

from utils.data.pretokenized import open_pretokenized
from utils.errors import DataError
from utils.files import not_a_file

FORMATS = ".npz (tokens, labels), .npy (tokens) or .jsonl (pre-tokenized)"


@dataclass
class TokenSet:
    tokens: np.ndarray  # (N, L) int64
    labels: Optional[np.ndarray]  # (N,) int64 class ids, None when the file has none
    source: str

    def __len__(self) -> int:
        return len(self.tokens)

    def check(self, codebook_size: int, seq_len: int, num_classes: Optional[int] = None,
              prefixes: bool = False) -> None:
        """Sequences of `seq_len` ids (with `prefixes`, 1 to `seq_len`) in [0, codebook_size), and labels in
        [0, num_classes) when it is given."""
        length = self.tokens.shape[1]
        if prefixes and not 1 <= length <= seq_len:
            raise DataError(f"{self.source}: {length} tokens a sequence, but the tokenizer decodes the first 1 to "
                            f"{seq_len} of its tokens")
        if not prefixes and length != seq_len:
            raise DataError(f"{self.source}: {length} tokens a sequence, but the model has {seq_len}")
        low, high = int(self.tokens.min()), int(self.tokens.max())
        if low < 0 or high >= codebook_size:
            raise DataError(f"{self.source}: token ids in [{low}, {high}], outside the codebook [0, {codebook_size})")
        if num_classes is None:
            return
        if self.labels is None:
            raise DataError(f"{self.source} has no class labels; use a .jsonl file or a sampler .npz")
        if self.labels.min() < 0 or self.labels.max() >= num_classes:
            raise DataError(f"{self.source}: class ids in [{self.labels.min()}, {self.labels.max()}], "
                            f"outside [0, {num_classes})")


def evenly_spaced(count: int, limit: Optional[int]) -> np.ndarray:
    """`limit` distinct indices spread evenly over [0, count) (all of them without a limit)."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.arange(limit) * count // limit


def read_arrays(path: str):
    """(tokens, labels or None) of a token file, as they are stored."""
    if path.endswith(".jsonl"):
        tokens, labels = open_pretokenized(path).arrays()
        return tokens, labels
    try:
        loaded = np.load(path)
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable {FORMATS} file ({err})") from None
    if isinstance(loaded, np.ndarray):
        return loaded, None
    with loaded:
        if "tokens" not in loaded.files:
            raise DataError(f"{path} has no 'tokens' array (it holds {loaded.files}): sample it with "
                            "scripts/sample_imagenet_rear.py, which writes tokens and labels beside arr_0")
        return loaded["tokens"], loaded["labels"] if "labels" in loaded.files else None


def load_token_set(path: str, limit: Optional[int] = None) -> TokenSet:
    """The sequences (and class labels) in `path`, or an evenly spaced `limit` of them."""
    if not_a_file(path):
        raise DataError(f"{path}: {not_a_file(path)} (expected {FORMATS})")
    if not path.endswith((".npz", ".npy", ".jsonl")):
        raise DataError(f"{path}: expected {FORMATS}")
    tokens, labels = read_arrays(path)
    if tokens.ndim != 2 or tokens.dtype.kind not in "iu" or len(tokens) == 0:
        raise DataError(f"{path}: tokens must be a non-empty integer array (N, L), got {tokens.dtype} {tokens.shape}")
    if labels is not None and labels.shape != (len(tokens),):
        raise DataError(f"{path}: {labels.shape} labels for {len(tokens)} token sequences")
    keep = evenly_spaced(len(tokens), limit)
    return TokenSet(
        tokens=np.asarray(tokens[keep], dtype=np.int64),
        labels=None if labels is None else np.asarray(labels[keep], dtype=np.int64),
        source=path,
    )


__all__ = ["TokenSet", "evenly_spaced", "load_token_set"]
