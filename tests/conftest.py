import json
import os
from pathlib import Path

# Spinning OpenMP waiters make small CPU ops 10-50x slower when anything else shares the cores; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Tests never reach the network: a missing released file fails at once instead of after the Hub client's retries.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def golden():
    """The golden fixture: tiny random models and what the original implementation computes for them."""
    tensors = load_file(str(FIXTURES / "golden_tiny.safetensors"))
    meta = json.loads((FIXTURES / "golden_tiny.json").read_text())
    return meta, tensors


@pytest.fixture
def golden_generator(golden):
    """The golden fixture's tiny reAR, in eval mode (a fresh copy for each test)."""
    from modeling.rear import ReAR

    meta, tensors = golden
    model = ReAR(meta["generator_config"])
    model.load_state_dict(prefixed(tensors, "generator."), strict=True)
    return model.eval()


def prefixed(tensors, prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.fixture(autouse=True)
def _single_thread_determinism():
    torch.set_num_threads(2)
    yield


def load_script(name):
    """scripts/<name>.py as a module (scripts/ is not a package), registered like an imported one."""
    import importlib.util
    import sys

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, FIXTURES.parent.parent / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def server():
    """Runs the entry points as the user does, each in its own process (tests/script_runner.py)."""
    from script_runner import ScriptServer

    server = ScriptServer()
    yield server
    server.close()
