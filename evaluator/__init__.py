"""ADM-compatible evaluation (FID, sFID, Inception Score, precision, recall) in PyTorch, without TensorFlow, and
the measurements of generator–tokenizer consistency (consistency.py) and exposure bias (exposure.py).

npz.py streams the images, features.py runs the 2015 Inception graph, activations.py caches a batch's
features, metrics.py holds ADM's formulas and evaluation.py puts them together; `python -m evaluator`.
A model's whole evaluation (docs/evaluation.md): reconstruction.py measures a tokenizer (rFID, PSNR, SSIM, codebook
usage), guidance_search.py holds the grid and table of scripts/guidance_search.py, report.py puts a model's numbers
in one folder and compare.py sets such folders side by side.
"""

from utils.threads import use_thread_defaults

use_thread_defaults()  # `python -m evaluator...` imports this package first, before torch loads


def __getattr__(name: str):
    # `evaluate` loads on first use: the Inception code imports torchvision and torch-fidelity (seconds), which the
    # consistency and exposure commands do not need.
    if name in ("evaluate", "AdmScorer"):
        from evaluator import evaluation

        return getattr(evaluation, name)
    raise AttributeError(f"module 'evaluator' has no attribute '{name}'")


__all__ = ["AdmScorer", "evaluate"]
