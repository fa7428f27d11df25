"""Which model to compile: a built-in name, a torchvision architecture, or `module:factory`.

Each resolves to a `ModelSpec`: the module, its class labels and its preprocessing.
"""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torchvision
from torchvision.models._meta import _IMAGENET_CATEGORIES

from compile.efficientnet_lite0 import build_efficientnet_lite0
from compile.weights import read_state_dict
from worker.manifest import IMAGENET_PREPROCESS, Preprocess

log = logging.getLogger(__name__)

DEFAULT_MODEL = "efficientnet_lite0"

# The shipped Lite0 weights expect RGB 0..255 mapped by (x - 127) / 128, bicubic resizing.
LITE0_PREPROCESS = Preprocess(resize=256, crop=224, interpolation="bicubic", mean=(127.0,) * 3, std=(128.0,) * 3)


class ModelError(ValueError):
    """The model named on the command line cannot be built."""


@dataclass(frozen=True)
class ModelSpec:
    """A model ready to compile. A `module:factory` may return one to give labels and
    preprocessing along with the module."""

    name: str
    module: torch.nn.Module
    labels: list[str]
    preprocess: Preprocess
    weights_source: str = "factory"


def torchvision_classifiers() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def load_state_dict(module: torch.nn.Module, weights: str | Path) -> None:
    """Load a state_dict file into `module`. Raises ValueError for a file that is not one, and
    ModelError for weights that do not fit."""
    state = read_state_dict(weights)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise ModelError(f"weights {weights} do not fit the model: {e}") from e


def resolve_model(name: str, weights: str | None = None) -> ModelSpec:
    """Build the model that `name` denotes, with its weights, in eval mode."""
    if name == DEFAULT_MODEL:
        module = build_efficientnet_lite0(weights)
        spec = ModelSpec(name, module, list(_IMAGENET_CATEGORIES), LITE0_PREPROCESS, weights or "shipped")
    elif ":" in name:
        spec = _from_factory(name, weights)
    elif name in torchvision_classifiers():
        with torch.random.fork_rng(devices=[]):  # the same random weights on every build
            torch.manual_seed(0)
            module = torchvision.models.get_model(name, weights=None)
        if weights:
            load_state_dict(module, weights)
        else:
            log.warning(
                "\n!!! %s has RANDOM weights: its predictions are meaningless. "
                "Pass --weights FILE (a state_dict) for a real model. !!!\n",
                name,
            )
        spec = ModelSpec(name, module, list(_IMAGENET_CATEGORIES), IMAGENET_PREPROCESS, weights or "random")
    else:
        raise ModelError(
            f"unknown model {name!r}: use {DEFAULT_MODEL}, a torchvision classifier "
            f"(e.g. resnet18, mobilenet_v3_small; `python -m compile models` lists them), "
            "or package.module:factory"
        )
    spec.module.eval()
    return spec


def _from_factory(target: str, weights: str | None) -> ModelSpec:
    module_name, _, attr = target.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` would, so a local module is found
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ModelError(f"cannot import {target}: {e}") from e
    made = factory()
    if isinstance(made, ModelSpec):
        spec = replace(made, name=made.name or target)
    elif isinstance(made, torch.nn.Module):
        spec = ModelSpec(target, made, [], IMAGENET_PREPROCESS)
    else:
        raise ModelError(f"{target} returned {type(made).__name__}, not an nn.Module or compile.models.ModelSpec")
    if weights:
        load_state_dict(spec.module, weights)
        spec = replace(spec, weights_source=weights)
    return spec
