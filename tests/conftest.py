import json
import os
from pathlib import Path

from utils.threads import use_thread_defaults  # noqa: E402

use_thread_defaults()  # as every entry point does, before torch loads

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


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """A weights file in the released layout with random values: the real file cannot be downloaded here."""
    directory = tmp_path_factory.mktemp("inception")
    torch.save({}, directory / "empty.pth")
    torch.manual_seed(0)
    # torch-fidelity always loads a state dict; skipping that leaves the module's random initialisation.
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
        net = FeatureExtractorInceptionV3("inception", ["2048"],
                                          feature_extractor_weights_path=str(directory / "empty.pth"))
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            # He initialisation keeps activations O(1) through the network; the default one shrinks them to ~1e-8.
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = directory / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return str(path)


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


# Markers: `slow` tests run by default (the whole suite stays within CI's 10 minutes); `cuda` tests need a GPU,
# `campaign` tests are the long fault campaigns, `fuzz` the whole sweep of hostile values through every entry point,
# `cluster` tests launch several processes or simulated nodes with torchrun / accelerate, and `registry` tests run
# built-in models through the whole path of tests/test_bring_your_own.py: those are deselected unless asked for
# with -m (e.g. -m cuda).
OPT_IN_MARKERS = ("cuda", "campaign", "fuzz", "cluster", "registry")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores (still run by default)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; run with `python -m pytest -m cuda tests`")
    config.addinivalue_line("markers", "campaign: a long fault campaign; run with `python -m pytest -m campaign tests`")
    config.addinivalue_line("markers", "cluster: several processes or simulated nodes under torchrun / accelerate "
                            "launch (gloo on CPUs); run with `python -m pytest -m cluster tests`")
    config.addinivalue_line("markers", "registry: every built-in backbone and tokenizer through the whole path of "
                                       "tests/test_bring_your_own.py; run with `python -m pytest -m registry tests`")
    config.addinivalue_line("markers", "fuzz: every hostile value of every key through every entry point; run with "
                                       "`python -m pytest -m fuzz tests/test_fuzz.py`")


def pytest_collection_modifyitems(config, items):
    if config.getoption("-m"):
        return  # the marker expression chooses
    opt_in = [item for item in items if any(item.get_closest_marker(m) for m in OPT_IN_MARKERS)]
    if opt_in:
        config.hook.pytest_deselected(items=opt_in)
        items[:] = [item for item in items if item not in opt_in]
