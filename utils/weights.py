"""Model weights: `.safetensors`, `.bin`, `.pt`, `.pth` (weights-only, never unpickling code), from local paths or
from where they are published (the Hugging Face Hub), loaded strictly with errors that name the problem.

Every released file this project loads is listed in `PUBLISHED` with its source, full URL and size, so that a
missing one says where to get it and how to pass a local copy. Offline, a lookup fails within seconds.
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import re
import socket
import zipfile
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from utils.errors import MissingWeightsError, WeightsError

HUB = "https://huggingface.co"


@dataclass(frozen=True)
class Published:
    """Where a released file is: a Hub repo (downloaded on demand) or a page to download it from by hand."""

    repo: Optional[str]  # Hugging Face Hub repo, or None when published elsewhere
    size: str  # as published (≈ from the parameter count where the page gives none)
    page: Optional[str] = None  # download page when not on the Hub
    what: str = ""

    def url(self, filename: str) -> str:
        return f"{HUB}/{self.repo}/resolve/main/{filename}" if self.repo else str(self.page)


PUBLISHED: Dict[str, Published] = {
    "reAR-S.safetensors": Published("qyoo/reAR", "≈0.92 GB (230.99M float32 parameters)", what="reAR-S generator"),
    "reAR-B.safetensors": Published("qyoo/reAR", "≈1.09 GB (273.52M float32 parameters)", what="reAR-B generator"),
    "reAR-L.safetensors": Published("qyoo/reAR", "≈1.90 GB (475.31M float32 parameters)", what="reAR-L generator"),
    "maskgit-vqgan-imagenet-f16-256.bin": Published(
        "fun-research/TiTok", "≈0.22 GB (54.5M float32 parameters)", what="MaskGIT-VQGAN tokenizer"
    ),
    # the other tokenizers (modeling/tokenizers/)
    "tokenizer_titok_l32.bin": Published("fun-research/TiTok", "≈2.56 GB (641.1M float32 parameters)",
                                         what="TiTok-L-32"),
    "tokenizer_titok_b64.bin": Published("fun-research/TiTok", "≈0.82 GB (204.8M float32 parameters)",
                                         what="TiTok-B-64"),
    "tokenizer_titok_s128.bin": Published("fun-research/TiTok", "≈0.33 GB (83.7M float32 parameters)",
                                          what="TiTok-S-128"),
    "vqgan_plus_12bit.bin": Published("markweber/vqgan_plus_12bit", "≈0.22 GB (55.0M float32 parameters)",
                                      what="VQGAN+ 12-bit (MaskBit)"),
    "vqgan_plus_paper.bin": Published("markweber/vqgan_plus_paper", "size not listed here",
                                      what="VQGAN+ 10-bit, the MaskBit paper's (file name inferred, unverified)"),
    "AliTok.pth": Published(None, "≈1.56 GB (389.9M float32 parameters)",
                            "https://drive.google.com/file/d/1Rir4QEJ_HTvZkhcnw9MTfWlSFemcGVIW/view",
                            what="AliTok tokenizer (Google Drive, linked from github.com/ali-vilab/alitok)"),
    "VQ_SB256_e250.pt": Published(None, "≥0.93 GB (232.8M float32 values, a training checkpoint)",
                                  "https://drive.google.com/drive/folders/1Qne5GwCILuJVH_fqQSN2MQFK7YF82UAn",
                                  what="ReTok VQ_SB256 tokenizer (Google Drive folder, linked from github.com/zfu006/ReTok)"),
    # the other backbones (modeling/backbones/)
    **{f"alitok_{size}.bin": Published(None, gb, f"https://drive.google.com/file/d/{drive_id}/view",
                                       what=f"AliTok-{size.upper()} AR generator (Google Drive, linked from "
                                            "github.com/ali-vilab/alitok)")
       for size, gb, drive_id in (("b", "≈0.71 GB (177.0M float32 parameters)", "1PNVX9wqePxRjuOKpt4iw6CpIYLlyJWlX"),
                                  ("l", "≈1.27 GB (317.9M float32 parameters)", "1tmwAa724pNY4FgUsLne2VJVGoK_TBuMa"),
                                  ("xl", "≈2.65 GB (662.1M float32 parameters)", "1Vu0UsQfqzZ8HMKFqE2tIGdAcJ6zPXvFd"))},
    "GPT_XL256_e300_VQ_SB.pt": Published(None, "≥3.1 GB (775.0M float32 parameters, a training checkpoint)",
                                         "https://drive.google.com/drive/folders/1Qne5GwCILuJVH_fqQSN2MQFK7YF82UAn",
                                         what="ReTok's GPT-XL generator (Google Drive folder, zfu006/ReTok)"),
}
GENERATOR_FILENAMES = {"reAR-S": "reAR-S.safetensors", "reAR-B": "reAR-B.safetensors", "reAR-L": "reAR-L.safetensors"}
TOKENIZER_FILENAME = "maskgit-vqgan-imagenet-f16-256.bin"
HUB_PROBE_TIMEOUT_S = 3.0
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def where_published(path: str) -> str:
    """'; published as <url> (<size>)' for a known file, else ''."""
    name = os.path.basename(path)
    entry = PUBLISHED.get(name)
    if entry is None:
        return ""
    source = f"the Hugging Face Hub repo {entry.repo}" if entry.repo else "a download page, not on the Hub (download it by hand)"
    return f"; the released file is published on {source}: {entry.url(name)} ({entry.size})"


def describe_file(path: Optional[str]) -> Optional[str]:
    """`path` with its size when it is a local file (how a sampling folder records which weights made it)."""
    if path and os.path.isfile(path):
        return f"{path} ({os.path.getsize(path)} bytes)"
    return path


# ----------------------------------------------------------------------------------------- reading a file
def load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a torch `.bin`/`.pt`/`.pth` file, loaded weights-only."""
    if os.path.isdir(path):
        raise WeightsError(f"{path} is a folder, not a weights file")
    if not os.path.isfile(path):
        raise MissingWeightsError(f"weights file not found: {path}{where_published(path)}")
    if os.path.getsize(path) == 0:
        raise WeightsError(f"weights file {path} is empty (0 bytes): an interrupted download? fetch it again"
                           f"{where_published(path)}")
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    with open(path, "rb") as f:
        start = f.read(4)
    zip_format = start == b"PK\x03\x04"
    if not zip_format and not start.startswith(b"\x80"):  # torch.save writes a zip (before torch 1.6: a pickle)
        raise WeightsError(f"{path} is not a weights file: neither a .safetensors file nor one torch.save writes "
                           f"(it begins with {start!r})")
    try:
        # Training checkpoints of some originals also pickle the run's argparse.Namespace (a bag of plain values).
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = _torch_load(path, zip_format)
    except pickle.UnpicklingError as err:
        # weights_only refuses any pickled object that is not a tensor or a plain container: such a file could run
        # code when loaded, so it is refused here too, whatever it holds.
        # torch's own message advises weights_only=False, which would run the object: only its finding is kept.
        found = re.search(r"unsupported (GLOBAL [\w.]+|[^\n.]+)", str(err), re.IGNORECASE)
        detail = found.group(1) if found else "not a plain state dict"
        raise WeightsError(
            f"refusing to load {path} for safety: it holds pickled Python objects other than tensors "
            f"({detail}); only weights-only files are loaded. If you made this file, "
            "save its state dict instead (torch.save(model.state_dict(), path) or a .safetensors file)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise WeightsError(f"weights file {path} is unreadable (truncated or corrupt?): "
                           f"{first_sentence(err)}{where_published(path)}") from None
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return dict(state)


def _torch_load(path: str, zip_format: bool):
    """Memory-mapped where the file allows it (a training checkpoint's optimizer state is then never read)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zip_format)


def _load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"weights file {path} is unreadable (truncated or corrupt?): "
                           f"{first_sentence(err)}{where_published(path)}") from None


def first_sentence(err: BaseException) -> str:
    """A library's error without the paragraphs of advice that follow its finding."""
    return str(err).splitlines()[0].split(". ")[0].rstrip(".")


def unwrap(state: Dict, keys: Sequence[str], path: str) -> Dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint: the first of `keys` it holds (e.g. "ema", "model"), else the file
    itself when it is a plain state dict."""
    for key in keys:
        if isinstance(state.get(key), Mapping):
            return dict(state[key])
    if all(isinstance(v, torch.Tensor) for v in state.values()):
        return state
    raise WeightsError(f"{path} holds none of {list(keys)} and is not a plain state dict (keys: {sorted(state)[:8]})")


def is_model_folder(path_or_name: str) -> bool:
    """A local folder, or a Hub model repo id ("owner/name", no weights-file suffix) that is not a local path:
    a checkpoint published as config.json + weights rather than as one file."""
    if os.path.isdir(path_or_name):
        return True
    return (
        not os.path.exists(path_or_name)
        and path_or_name.count("/") == 1
        and not path_or_name.startswith((".", "/"))
        and not path_or_name.endswith(WEIGHT_SUFFIXES)
    )


# ----------------------------------------------------------------------------------------- fitting a model
def describe_mismatch(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Every way `state_dict` fails to fit `module`: missing and unexpected keys, and shape mismatches."""
    expected = module.state_dict()
    problems = [f"missing key: {k}" for k in expected if k not in state_dict]
    problems += [f"unexpected key: {k}" for k in state_dict if k not in expected]
    problems += [
        f"shape mismatch: {k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    return problems


def load_checked(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "checkpoint") -> nn.Module:
    """`module.load_state_dict(state_dict, strict=True)` with one error that counts and shows the offending keys."""
    problems = describe_mismatch(module, state_dict)
    if problems:
        shown = "; ".join(problems[:3])
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise WeightsError(f"{what} does not fit the model ({count}: {shown}{more}): "
                           "are the config's sizes those of the checkpoint?")
    module.load_state_dict(state_dict, strict=True)
    return module


# ----------------------------------------------------------------------------------------- finding a file
@functools.lru_cache(maxsize=None)
def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hub answers at all (one TCP connection), so that offline a lookup fails at once instead of
    after the download client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", HUB).split("://")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_weights(path_or_name: str, hub_repo: Optional[str] = None, local_option: str = "") -> str:
    """A local path as is; otherwise the released file `path_or_name` from the Hub cache or the Hub.

    A file that is neither local nor obtainable is an error that names the file, where it is published (URL and
    size) and how to pass a local copy (`local_option`, e.g. "experiment.generator_checkpoint=PATH")."""
    if os.path.isfile(path_or_name):
        return path_or_name
    if os.path.isdir(path_or_name):
        raise WeightsError(f"{path_or_name} is a folder, not a weights file"
                           + (f"; pass the file with {local_option}" if local_option else ""))
    name = os.path.basename(path_or_name)
    entry = PUBLISHED.get(name)
    repo = hub_repo or (entry.repo if entry else None)
    how = f"pass a local copy with {local_option}" if local_option else "pass the path of a local copy"
    if repo is None:
        raise MissingWeightsError(f"weights file not found: {path_or_name}{where_published(path_or_name)}; {how}")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id=repo, filename=name)
    if isinstance(cached, str):
        return cached
    reason = "the Hugging Face Hub cannot be reached (offline?)"
    if hub_reachable():
        try:
            return hf_hub_download(repo_id=repo, filename=name)
        except Exception as err:  # no such repo or file, or an HTTP error: all end the same way
            reason = f"fetching it from the Hub failed ({type(err).__name__}: {str(err).splitlines()[0]})"
    url = entry.url(name) if entry else f"{HUB}/{repo}/resolve/main/{name}"
    size = f" ({entry.size})" if entry else ""
    raise MissingWeightsError(
        f"weights file not found: {path_or_name} is not a local file and {reason}; download {url}{size} "
        f"where you have internet and {how}"
    )


__all__ = [
    "GENERATOR_FILENAMES",
    "is_model_folder",
    "unwrap",
    "PUBLISHED",
    "Published",
    "TOKENIZER_FILENAME",
    "describe_file",
    "describe_mismatch",
    "load_checked",
    "load_state_dict_file",
    "resolve_weights",
    "where_published",
]
