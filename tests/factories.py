"""`module:factory` models for the compile tests (importable because tests/ is on sys.path)."""

from __future__ import annotations

import torch

from compile.models import ModelSpec
from worker.manifest import Preprocess

SMALL = Preprocess(resize=32, crop=32, interpolation="bilinear", mean=(128.0,) * 3, std=(64.0,) * 3)


class Noisy(torch.nn.Module):
    """Adds fresh noise on every call: the compiled package cannot match eager, so a build must fail."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        return self.head(pooled) + 10 * torch.rand(pooled.shape[0], 4, device=x.device)


def tiny() -> ModelSpec:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                 torch.nn.Linear(8, 4))  # fmt: skip
    return ModelSpec("tiny", module, ["w", "x", "y", "z"], SMALL)


def noisy() -> ModelSpec:
    return ModelSpec("noisy", Noisy(), ["w", "x", "y", "z"], SMALL)


def not_a_model() -> str:
    return "a string"


def depthwise() -> ModelSpec:
    """A depthwise convolution, as in MobileNets and EfficientNets: ATen picks its CPU backend by
    batch size, which torch.export's shape guards can turn into a fixed batch."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.Conv2d(8, 8, 3, groups=8),
                                 torch.nn.Conv2d(8, 16, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                 torch.nn.Linear(16, 4))  # fmt: skip
    return ModelSpec("depthwise", module, ["w", "x", "y", "z"], SMALL)
