"""Autoregressive backbones, chosen by `model.generator.backbone`; reAR's method attaches to any of them.

A backbone is a `modeling.generator.Generator` subclass built from the whole config. A new one is one module and
one `@register_backbone(name)` line; `build_generator(config)` builds the configured one, after refusing settings
the backbone cannot serve (RAR's random order, the mask token). The contract in full: docs/models.md.
"""

from __future__ import annotations

from typing import Callable, Dict, Type

from utils.config import canonical_choice, register_entry
from utils.errors import ConfigError

from ..generator import Generator
from ..rear import ReAR

BACKBONES: Dict[str, Type[Generator]] = {}


def register_backbone(name: str) -> Callable[[Type[Generator]], Type[Generator]]:
    return lambda cls: register_entry(BACKBONES, "model.generator.backbone", "backbone", name, cls)


register_backbone("rar")(ReAR)

# The other backbones register themselves (and their originals' guidance schedules) when imported.
from . import alitok_ar, gpt1d  # noqa: E402,F401


def backbone_class(config) -> Type[Generator]:
    name = canonical_choice(config, "model.generator.backbone")
    if name not in BACKBONES:
        raise ConfigError(f"'model.generator.backbone' is '{name}', not one of {', '.join(sorted(BACKBONES))}")
    cls = BACKBONES[name]
    if config.model.generator.order == "random" and not cls.supports_orders:
        raise ConfigError(f"'model.generator.order' is 'random' (RAR), which the '{name}' backbone does not support")
    if config.model.generator.perturb_mode == "mask" and not cls.has_mask_token:
        raise ConfigError(f"'model.generator.perturb_mode' is 'mask', but the '{name}' backbone has no mask token (its "
                          "token table holds the V image tokens only, as its released weights do); use 'switch'")
    return cls


def build_generator(config) -> Generator:
    """The configured backbone, with reAR's alignment heads when `transition_alignment` is on (random weights)."""
    return backbone_class(config)(config)


def load_generator(config, path: str) -> Generator:
    """The configured backbone with the weights at `path` (local, or a released name), in eval mode."""
    return backbone_class(config).from_pretrained(config, path)


__all__ = ["BACKBONES", "build_generator", "load_generator", "register_backbone"]
