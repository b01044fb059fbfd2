"""Model weights: `.safetensors` or `.bin` (weights-only), local paths or the Hugging Face Hub.

Released weights:
- generators on the Hub repo `qyoo/reAR`: `reAR-S.safetensors`, `reAR-B.safetensors`, `reAR-L.safetensors`;
- the tokenizer on `fun-research/TiTok`: `maskgit-vqgan-imagenet-f16-256.bin`.
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional

import torch
from torch import nn

REAR_HUB_REPO = "qyoo/reAR"
TOKENIZER_HUB_REPO = "fun-research/TiTok"
TOKENIZER_FILENAME = "maskgit-vqgan-imagenet-f16-256.bin"
GENERATOR_FILENAMES = {
    "reAR-S": "reAR-S.safetensors",
    "reAR-B": "reAR-B.safetensors",
    "reAR-L": "reAR-L.safetensors",
}

# Known published files, so that a missing one says where to get it.
PUBLISHED = {name: REAR_HUB_REPO for name in GENERATOR_FILENAMES.values()} | {TOKENIZER_FILENAME: TOKENIZER_HUB_REPO}


def published_at(path: str) -> str:
    repo = PUBLISHED.get(os.path.basename(path))
    if repo is None:
        return ""
    return f"; the released file is published on the Hugging Face Hub as {repo}/{os.path.basename(path)}"


def load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a torch `.bin`/`.pt`/`.pth` file, loaded weights-only."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}{published_at(path)}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return dict(state)


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
    """`module.load_state_dict(state_dict, strict=True)` with an error that lists every offending key."""
    problems = describe_mismatch(module, state_dict)
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise ValueError(f"{what} does not fit the model ({len(problems)} problems):\n  {shown}{more}")
    module.load_state_dict(state_dict, strict=True)
    return module


def resolve_weights(path_or_name: str, hub_repo: Optional[str] = None) -> str:
    """A local path as is; otherwise the file `path_or_name` fetched from `hub_repo` on the Hugging Face Hub.

    Offline, a file that is neither local nor in the Hub cache is an error that names the file, the repo and
    how to pass a local path instead.
    """
    if os.path.isfile(path_or_name):
        return path_or_name
    repo = hub_repo or PUBLISHED.get(os.path.basename(path_or_name))
    if repo is None:
        raise FileNotFoundError(f"checkpoint not found: {path_or_name}")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=repo, filename=os.path.basename(path_or_name))
    except Exception as err:  # offline, no such repo or file, or an HTTP error: all end the same way
        raise FileNotFoundError(
            f"checkpoint not found: {path_or_name} is not a local file, and "
            f"{os.path.basename(path_or_name)} could not be fetched from the Hugging Face Hub ({repo}): "
            f"{type(err).__name__}: {err}. Download it where you have internet and pass its local path."
        ) from None
