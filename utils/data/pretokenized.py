"""Pre-tokenized training data: JSON Lines converted once into memory-mapped arrays, read at random.

Input: one image a line, `{"class_id": int, "tokens": [int × N]}` (tokens may be nested lists), e.g. the
public RAR `maskgitvq.jsonl` (≈12.8M lines, ten crops of every ImageNet train image). The file is streamed line by
line into
    tokens.u16      uint16 (num_rows, N), row-major
    class_ids.i32   int32 (num_rows,)
    meta.json       num_rows, N, the largest ids (and the lines they are on), the source's identity
in a cache directory named after the source and a key of its size, modification time and first/last MiB, so an
edited file is converted again. The directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from utils.errors import DataError
from utils.files import atomic_path

FORMAT_VERSION = 1
CHUNK_ROWS = 65_536


def source_key(path: str) -> str:
    """Identity of a file's contents for the cache: size, mtime and its first and last MiB."""
    stat = os.stat(path)
    digest = hashlib.sha1(f"{FORMAT_VERSION}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(stat.st_size - (1 << 20), 0))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def cache_path(path: str, cache_dir: Optional[str] = None) -> str:
    root = cache_dir or os.path.dirname(os.path.abspath(path))
    return os.path.join(root, f"{os.path.basename(path)}.{source_key(path)}.cache")


def parse_line(line: bytes, path: str, line_number: int, seq_len: Optional[int]) -> tuple[int, np.ndarray]:
    where = f"{path}:{line_number}"
    try:
        record = json.loads(line.rstrip(b"\r\n"))  # so that a JSON error's "line 1 column N" is this line's
        class_id, tokens = record["class_id"], np.asarray(record["tokens"]).reshape(-1)
    except (ValueError, KeyError, TypeError) as err:  # bad JSON or UTF-8, missing keys, ragged nested lists
        expected = '{"class_id": int, "tokens": [int, ...]}'
        raise DataError(f"{where}: corrupt line, expected {expected} ({err})") from None
    if not isinstance(class_id, int) or isinstance(class_id, bool) or class_id < 0:
        raise DataError(f"{where}: class_id must be a non-negative integer, got {class_id!r}")
    if tokens.dtype.kind not in "iu":
        raise DataError(f"{where}: tokens must be integers, got dtype {tokens.dtype}")
    if seq_len is not None and len(tokens) != seq_len:
        raise DataError(f"{where}: {len(tokens)} tokens, but the first line has {seq_len}")
    if len(tokens) and (tokens.min() < 0 or tokens.max() > np.iinfo(np.uint16).max):
        raise DataError(f"{where}: token ids must be in [0, 65535], got [{tokens.min()}, {tokens.max()}]")
    return class_id, tokens


def convert_jsonl(path: str, directory: str) -> None:
    """Stream `path` into the arrays of `directory`, created atomically: on any error nothing is left behind."""
    try:
        with atomic_path(directory) as tmp:
            os.makedirs(tmp)
            meta = write_arrays(path, tmp)
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=2)
    except OSError:
        if not os.path.isdir(directory):  # else another process finished the same conversion first
            raise


def write_arrays(path: str, tmp: str) -> Dict:
    """The conversion proper: tokens.u16 and class_ids.i32 in `tmp`; returns the metadata."""
    seq_len, rows = None, 0
    max_class = max_token = (-1, 0)  # (value, line)
    tokens_chunk, classes_chunk = [], []
    with open(path, "rb") as src, open(os.path.join(tmp, "tokens.u16"), "wb") as tok_out, open(
        os.path.join(tmp, "class_ids.i32"), "wb"
    ) as cls_out:

        def flush():
            tok_out.write(np.stack(tokens_chunk).astype(np.uint16).tobytes())
            cls_out.write(np.asarray(classes_chunk, dtype=np.int32).tobytes())
            tokens_chunk.clear(), classes_chunk.clear()

        name = os.path.basename(path)
        progress = tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=f"converting {name}")
        for line_number, line in enumerate(src, 1):
            progress.update(len(line))
            if not line.strip():
                continue
            class_id, tokens = parse_line(line, path, line_number, seq_len)
            seq_len = len(tokens)
            max_class = max(max_class, (class_id, line_number), key=lambda v: v[0])
            if seq_len:
                max_token = max(max_token, (int(tokens.max()), line_number), key=lambda v: v[0])
            tokens_chunk.append(tokens)
            classes_chunk.append(class_id)
            rows += 1
            if len(tokens_chunk) == CHUNK_ROWS:
                flush()
        if tokens_chunk:
            flush()
        progress.close()
    if rows == 0:
        raise DataError(f"{path} holds no lines of data")
    return {
        "format": FORMAT_VERSION,
        "source": os.path.abspath(path),
        "num_rows": rows,
        "seq_len": seq_len,
        "max_class_id": max_class[0],
        "max_class_id_line": max_class[1],
        "max_token_id": max_token[0],
        "max_token_id_line": max_token[1],
    }


class TokenDataset(torch.utils.data.Dataset):
    """Token sequences (N, L) and class ids (N,), in memory or memory-mapped; `__getitems__` reads a batch at once.

    Memory maps are opened lazily in each process, so DataLoader workers share the page cache, not copies.
    """

    def __init__(self, tokens=None, class_ids=None, directory: Optional[str] = None, meta: Optional[Dict] = None):
        self.directory, self.meta = directory, meta
        self._tokens, self._class_ids = tokens, class_ids
        self.num_rows = len(class_ids) if class_ids is not None else meta["num_rows"]

    def arrays(self):
        if self._tokens is None:
            n, length = self.meta["num_rows"], self.meta["seq_len"]
            self._tokens = np.memmap(os.path.join(self.directory, "tokens.u16"), np.uint16, "r", shape=(n, length))
            self._class_ids = np.memmap(os.path.join(self.directory, "class_ids.i32"), np.int32, "r", shape=(n,))
        return self._tokens, self._class_ids

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.directory is not None:
            state["_tokens"] = state["_class_ids"] = None
        return state

    def __len__(self) -> int:
        return self.num_rows

    def __getitems__(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        tokens, class_ids = self.arrays()
        indices = np.asarray(indices)
        return {
            "tokens": torch.from_numpy(tokens[indices].astype(np.int64)),
            "class_ids": torch.from_numpy(class_ids[indices].astype(np.int64)),
        }

    @property
    def seq_len(self) -> int:
        return self.arrays()[0].shape[1]

    def check(self, num_classes: int, codebook_size: int, seq_len: int, source: str, prefix: bool = False) -> None:
        """Every class id < num_classes, token id < codebook_size, and sequences of `seq_len` tokens (with `prefix`,
        at least `seq_len`: a generator over the first tokens of a tokenizer that decodes prefixes)."""
        if self.meta is not None:
            largest_class, class_line = self.meta["max_class_id"], f"line {self.meta['max_class_id_line']}"
            largest_token, token_line = self.meta["max_token_id"], f"line {self.meta['max_token_id_line']}"
        else:
            tokens, class_ids = self.arrays()
            largest_class, class_line = int(class_ids.max()), f"row {int(class_ids.argmax())}"
            largest_token, token_line = int(tokens.max()), f"row {int(tokens.max(1).argmax())}"
        if largest_class >= num_classes:
            raise DataError(f"{source} {class_line}: class id {largest_class} >= num_classes {num_classes}")
        if largest_token >= codebook_size:
            raise DataError(f"{source} {token_line}: token id {largest_token} >= codebook size {codebook_size}")
        if self.seq_len < seq_len or (self.seq_len > seq_len and not prefix):
            raise DataError(f"{source}: {self.seq_len} tokens a line, but model.generator.image_seq_len is {seq_len}")


def open_pretokenized(path: str, cache_dir: Optional[str] = None) -> TokenDataset:
    """The dataset of a pre-tokenized JSONL file, converting it into the cache first if needed."""
    if not os.path.isfile(path):
        raise DataError(f"pre-tokenized data not found: {path} (dataset.params.pretokenization)")
    directory = cache_path(path, cache_dir)
    if not os.path.isdir(directory):
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        convert_jsonl(path, directory)
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    return TokenDataset(directory=directory, meta=meta)
