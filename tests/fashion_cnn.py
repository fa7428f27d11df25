"""A small CNN for Fashion-MNIST, as a `module:factory` for `python -m compile build fashion_cnn:make_model`.

It takes 3 x 28 x 28 inputs in 0..1 (kiln always decodes to RGB; a greyscale image becomes three equal
channels), so the package is built with `--mean 0 0 0 --std 255 255 255`.
"""

from __future__ import annotations

import torch
from torch import nn

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def make_model() -> nn.Module:
    """The untrained network: 3 x 28 x 28 -> 10 logits."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 14 x 14
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 7 x 7
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, len(CLASSES)),
    )


def train(images: torch.Tensor, labels: torch.Tensor, epochs: int = 2, batch: int = 128, seed: int = 0) -> nn.Module:
    """Train `make_model()` on uint8 greyscale N x 28 x 28 images (scaled to 0..1, replicated to RGB)."""
    torch.manual_seed(seed)
    model = make_model()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch):
            index = order[start : start + batch]
            x = (images[index].float() / 255.0).unsqueeze(1).expand(-1, 3, -1, -1)
            loss = nn.functional.cross_entropy(model(x), labels[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()
