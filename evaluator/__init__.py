"""ADM-compatible evaluation (FID, sFID, Inception Score, precision, recall) in PyTorch, without TensorFlow.

npz.py streams the images, features.py runs the 2015 Inception graph, activations.py caches a batch's
features, metrics.py holds ADM's formulas and evaluation.py puts them together; `python -m evaluator`.
"""
from evaluator.evaluation import evaluate

__all__ = ["evaluate"]
