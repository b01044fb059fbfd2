"""The paper in code: backbones (`rear.py` and `backbones/`), tokenizers (`tokenizers/`), reAR's method
(`objective.py`, attached through `generator.py`) and sampling (`sampler.py`, `fast_sampler.py`)."""

from .backbones import BACKBONES, build_generator, load_generator, register_backbone
from .tokenizers import TOKENIZERS, build_tokenizer, register_tokenizer

__all__ = ["BACKBONES", "TOKENIZERS", "build_generator", "build_tokenizer", "load_generator", "register_backbone",
           "register_tokenizer"]
