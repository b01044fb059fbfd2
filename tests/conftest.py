import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def golden():
    """The golden fixture: tiny random models and what the original implementation computes for them."""
    tensors = load_file(str(FIXTURES / "golden_tiny.safetensors"))
    meta = json.loads((FIXTURES / "golden_tiny.json").read_text())
    return meta, tensors


def prefixed(tensors, prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.fixture(autouse=True)
def _single_thread_determinism():
    torch.set_num_threads(2)
    yield
