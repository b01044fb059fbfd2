"""ADM-compatible evaluation (FID, sFID, Inception Score, precision, recall) in PyTorch, without TensorFlow, and
the measurements of generator–tokenizer consistency (consistency.py) and exposure bias (exposure.py).

npz.py streams the images, features.py runs the 2015 Inception graph, activations.py caches a batch's
features, metrics.py holds ADM's formulas and evaluation.py puts them together; `python -m evaluator`.
"""

from utils.threads import use_thread_defaults

use_thread_defaults()  # `python -m evaluator...` imports this package first, before torch loads


def __getattr__(name: str):
    # `evaluate` loads on first use: the Inception code imports torchvision and torch-fidelity (seconds), which the
    # consistency and exposure commands do not need.
    if name == "evaluate":
        from evaluator.evaluation import evaluate

        return evaluate
    raise AttributeError(f"module 'evaluator' has no attribute '{name}'")


__all__ = ["evaluate"]
