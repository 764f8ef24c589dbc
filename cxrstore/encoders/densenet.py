"""DenseNet-BC in plain PyTorch, with torchxrayvision's module and state-dict names.

An equivalent of ``torchxrayvision.models.DenseNet`` (itself torchvision's
``densenet.py`` with a variable number of input channels, one by default) without
torchvision. The module names are the published ones, so a torchxrayvision state dict
loads with ``strict=True``::

    features.conv0, features.norm0,
    features.denseblock{b}.denselayer{l}.{norm1, conv1, norm2, conv2},
    features.transition{b}.{norm, conv},
    features.norm5, classifier

Computation, as published (inference; dropout is off at ``drop_rate=0`` and in eval):

- stem: 7x7 convolution stride 2 (no bias), BatchNorm, ReLU, 3x3 max-pool stride 2;
- dense layer: BatchNorm, ReLU, 1x1 convolution to ``bn_size * growth_rate``,
  BatchNorm, ReLU, 3x3 convolution to ``growth_rate``; its output is concatenated to
  its input along the channels;
- transition (between blocks): BatchNorm, ReLU, 1x1 convolution halving the
  channels, 2x2 average pooling;
- ``features`` ends with BatchNorm ``norm5`` (no ReLU);
- :meth:`DenseNet.features2`: ``relu(features(x))``, global average pooling,
  flattened: ``(n, num_features)`` (1024 for DenseNet121); the published
  ``forward`` applies ``classifier`` to it.

The published ``features2`` also resizes inputs that are not 224x224 (bilinear) and
prints a warning when the input does not look scaled to [-1024, 1024]; this module
does neither: callers give it 224x224 inputs in that range (see
:mod:`cxrstore.encoders.xrv`).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DENSENET121",
    "DenseNet",
    "arch_from_state_dict",
]

#: DenseNet121 as torchxrayvision builds it (``get_densenet_params("densenet121")``,
#: ``in_channels=1``, 18 pathologies for ``densenet121-res224-all``).
DENSENET121: dict[str, Any] = {
    "growth_rate": 32,
    "block_config": [6, 12, 24, 16],
    "num_init_features": 64,
    "bn_size": 4,
    "in_channels": 1,
    "num_classes": 18,
}


class _DenseLayer(nn.Sequential):
    """BN-ReLU-Conv1x1-BN-ReLU-Conv3x3, output concatenated to the input."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.add_module("norm1", nn.BatchNorm2d(num_input_features))
        self.add_module("relu1", nn.ReLU(inplace=True))
        self.add_module("conv1", nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False))
        self.add_module("norm2", nn.BatchNorm2d(bn_size * growth_rate))
        self.add_module("relu2", nn.ReLU(inplace=True))
        self.add_module("conv2", nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # relu1 is in place but acts on norm1's output, never on x itself
        return torch.cat([x, super().forward(x)], 1)


class _DenseBlock(nn.Sequential):
    """``num_layers`` dense layers, each seeing all earlier outputs."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size)
            self.add_module(f"denselayer{i + 1}", layer)


class _Transition(nn.Sequential):
    """BN-ReLU-Conv1x1-AvgPool2x2 between dense blocks."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(num_input_features))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class DenseNet(nn.Module):
    """torchxrayvision's DenseNet (inference), module names as published.

    Parameters
    ----------
    growth_rate : int
        Channels each dense layer adds (``k`` in the paper).
    block_config : sequence of int
        Dense layers per block.
    num_init_features : int
        Channels of the stem convolution.
    bn_size : int
        Bottleneck width factor (``bn_size * growth_rate`` channels).
    in_channels : int
        Input channels (1 for torchxrayvision).
    num_classes : int
        Outputs of ``classifier`` (18 for the published ``-all`` weights).

    Attributes
    ----------
    num_features : int
        Width of :meth:`features2` (1024 for DenseNet121).
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        in_channels: int = 1,
        num_classes: int = 18,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                ]
            )
        )
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers=num_layers, num_input_features=num_features, bn_size=bn_size, growth_rate=growth_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(num_features, num_features // 2))
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        self.num_features = num_features
        # the published initialisation (only matters for stand-ins; real weights replace it)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def features2(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(features(x))``, global average pooled: ``(n, num_features)``."""
        features = self.features(x)
        out = F.relu(features, inplace=True)
        return F.adaptive_avg_pool2d(out, (1, 1)).view(features.size(0), -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``classifier`` (no sigmoid, no operating-point normalisation)."""
        return self.classifier(self.features2(x))


# -- architecture from a state dict ------------------------------------------------------
_BLOCK = re.compile(r"^features\.denseblock(\d+)\.denselayer(\d+)\.")


def arch_from_state_dict(shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """The constructor arguments of :class:`DenseNet` that a state dict was made with.

    Parameters
    ----------
    shapes : mapping
        State-dict key to tensor shape (tensors themselves work too: anything whose
        value has a ``shape`` or is a sequence of ints).

    Returns
    -------
    dict
        ``growth_rate, block_config, num_init_features, bn_size, in_channels,
        num_classes``.

    Raises
    ------
    KeyError
        Naming the key needed to infer a size when it is absent (the caller turns it
        into a message naming the file).
    ValueError
        When the sizes found are inconsistent (e.g. a bottleneck that is not a
        multiple of the growth rate).
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise KeyError(key)
        v = shapes[key]
        return tuple(int(s) for s in (v.shape if hasattr(v, "shape") else v))

    conv0 = shape("features.conv0.weight")
    if len(conv0) != 4:
        raise ValueError(f"features.conv0.weight has shape {conv0}; expected 4 dimensions")
    layers: dict[int, int] = {}
    for key in shapes:
        m = _BLOCK.match(key)
        if m:
            b, n = int(m.group(1)), int(m.group(2))
            layers[b] = max(layers.get(b, 0), n)
    if not layers:
        raise KeyError("features.denseblock1.denselayer1.conv2.weight")
    blocks = sorted(layers)
    if blocks != list(range(1, len(blocks) + 1)):
        raise ValueError(f"dense blocks are not numbered 1..n: found {blocks}")
    conv2 = shape("features.denseblock1.denselayer1.conv2.weight")
    conv1 = shape("features.denseblock1.denselayer1.conv1.weight")
    growth = conv2[0]
    if growth < 1 or conv1[0] % growth:
        raise ValueError(f"bottleneck width {conv1[0]} is not a multiple of the growth rate {growth}")
    classifier = shape("classifier.weight")
    return {
        "growth_rate": growth,
        "block_config": [layers[b] for b in blocks],
        "num_init_features": conv0[0],
        "bn_size": conv1[0] // growth,
        "in_channels": conv0[1],
        "num_classes": classifier[0],
    }

