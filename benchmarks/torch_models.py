"""Compact PyTorch twins of the networks the step benchmarks pair up.

The PyTorch side of ``benchmarks/torch_reference.py`` must run the same
networks as the JAX side, as the reference code (RepDistiller / mdistiller /
torchvision) writes them: NCHW, ``nn.Conv2d`` / ``nn.BatchNorm2d`` modules,
eval-mode teacher. Topologies follow docs/method.md §7, and the parameter
counts equal the table of docs/method.md §7 (``tests/test_benchmarks.py`` asserts it), so
both sides do the same arithmetic. torchvision is not a dependency, hence the
ImageNet ResNets are written here too.

Only what the benchmark pairs need: CIFAR ResNets (basic block, x4 widths),
RepDistiller's ResNet50 (CIFAR bottleneck), WRN, VGG (BN), MobileNetV2 ×0.5
and torchvision's ResNet18/34. Weights are He-normal (fan_out) for convs like
the reference; the values do not change the timing.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
import torch.nn.functional as F


def _conv(cin: int, cout: int, k: int, stride: int = 1, bias: bool = False,
          groups: int = 1) -> nn.Conv2d:
  """A conv with PyTorch's symmetric padding k // 2 (what the zoos use)."""
  return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias)


def _he_init(model: nn.Module) -> nn.Module:
  """He normal (fan_out) convs, BN γ = 1 / β = 0, as the reference zoos."""
  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      if m.bias is not None:
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
      nn.init.ones_(m.weight)
      nn.init.zeros_(m.bias)
  return model


class BasicBlock(nn.Module):
  """Post-activation basic block; 1×1 conv + BN shortcut when the shape
  changes (CIFAR ResNets and torchvision ResNet18/34)."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = _conv(cin, cout, 3, stride)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = _conv(cout, cout, 3)
    self.bn2 = nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(_conv(cin, cout, 1, stride),
                                      nn.BatchNorm2d(cout))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    shortcut = x if self.downsample is None else self.downsample(x)
    return F.relu(out + shortcut)


class Bottleneck(nn.Module):
  """1×1 → 3×3 (stride) → 1×1 ×4 bottleneck (RepDistiller's ResNet50)."""

  def __init__(self, cin: int, planes: int, stride: int):
    super().__init__()
    cout = planes * 4
    self.conv1 = _conv(cin, planes, 1)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv(planes, planes, 3, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = _conv(planes, cout, 1)
    self.bn3 = nn.BatchNorm2d(cout)
    self.shortcut = nn.Sequential()
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(_conv(cin, cout, 1, stride),
                                    nn.BatchNorm2d(cout))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
  """RepDistiller's resnet{8..110}(x4): 3×3 stem, three stages of
  n = (depth − 2) / 6 basic blocks, global pool, fc."""

  def __init__(self, depth: int, widths: Sequence[int], num_classes: int):
    super().__init__()
    n = (depth - 2) // 6
    self.conv1 = _conv(3, widths[0], 3)
    self.bn1 = nn.BatchNorm2d(widths[0])
    blocks, cin = [], widths[0]
    for stage, cout in enumerate(widths[1:]):
      for i in range(n):
        blocks.append(BasicBlock(cin, cout, 2 if stage and i == 0 else 1))
        cin = cout
    self.blocks = nn.Sequential(*blocks)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.blocks(F.relu(self.bn1(self.conv1(x))))
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ResNet(nn.Module):
  """Four-stage ResNets: torchvision's ImageNet ResNet18/34 (7×7/2 stem +
  max-pool) and RepDistiller's CIFAR ResNet50 (3×3/1 stem, no pool)."""

  def __init__(self, block: Callable[..., nn.Module], stages: Sequence[int],
               num_classes: int, imagenet_stem: bool):
    super().__init__()
    expansion = 4 if block is Bottleneck else 1
    if imagenet_stem:
      self.stem = nn.Sequential(_conv(3, 64, 7, 2), nn.BatchNorm2d(64),
                                nn.ReLU(inplace=True),
                                nn.MaxPool2d(3, 2, 1))
    else:
      self.stem = nn.Sequential(_conv(3, 64, 3), nn.BatchNorm2d(64),
                                nn.ReLU(inplace=True))
    layers, cin = [], 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), stages)):
      for j in range(n):
        stride = 2 if i and j == 0 else 1
        if block is Bottleneck:
          layers.append(Bottleneck(cin, planes, stride))
        else:
          layers.append(BasicBlock(cin, planes, stride))
        cin = planes * expansion
    self.layers = nn.Sequential(*layers)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.layers(self.stem(x))
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class WideBlock(nn.Module):
  """Pre-activation WRN block; when in ≠ out the 1×1 shortcut conv (no BN)
  takes the activated input, as the reference does."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = _conv(cin, cout, 3, stride)
    self.bn2 = nn.BatchNorm2d(cout)
    self.conv2 = _conv(cout, cout, 3)
    self.shortcut = None if cin == cout else _conv(cin, cout, 1, stride)

  def forward(self, x):
    act = F.relu(self.bn1(x))
    out = self.conv2(F.relu(self.bn2(self.conv1(act))))
    return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
  """wrn_{depth}_{k}: stem conv (no BN), three stages of (depth − 4) / 6
  blocks with 16k / 32k / 64k channels, final BN + ReLU, pool, fc."""

  def __init__(self, depth: int, widen: int, num_classes: int):
    super().__init__()
    n = (depth - 4) // 6
    widths = (16, 16 * widen, 32 * widen, 64 * widen)
    self.conv1 = _conv(3, 16, 3)
    blocks, cin = [], 16
    for stage, cout in enumerate(widths[1:]):
      for i in range(n):
        blocks.append(WideBlock(cin, cout, 2 if stage and i == 0 else 1))
        cin = cout
    self.blocks = nn.Sequential(*blocks)
    self.bn = nn.BatchNorm2d(cin)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = F.relu(self.bn(self.blocks(self.conv1(x))))
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


_VGG_CONVS = {"vgg8": (1, 1, 1, 1, 1), "vgg11": (1, 1, 2, 2, 2),
              "vgg13": (2, 2, 2, 2, 2), "vgg16": (2, 2, 3, 3, 3),
              "vgg19": (2, 2, 4, 4, 4)}


class VGG(nn.Module):
  """RepDistiller's VGG (BN): conv3×3 with bias + BN + ReLU, 2×2 max-pool
  after blocks 0–2 (block 3's pool only applies to 64×64 inputs), global
  pool, Linear 512 → C."""

  def __init__(self, convs: Sequence[int], num_classes: int):
    super().__init__()
    layers, cin = [], 3
    for block, (width, n) in enumerate(zip((64, 128, 256, 512, 512), convs)):
      for _ in range(n):
        layers += [_conv(cin, width, 3, bias=True), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
        cin = width
      if block < 3:
        layers.append(nn.MaxPool2d(2))
    self.features = nn.Sequential(*layers)
    self.classifier = nn.Linear(512, num_classes)

  def forward(self, x):
    x = self.features(x)
    return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
  """1×1 expand (kept at t = 1) + BN + ReLU → depthwise 3×3 + BN + ReLU →
  1×1 project + BN; identity residual iff stride 1 and in = out."""

  def __init__(self, cin: int, cout: int, stride: int, expansion: int):
    super().__init__()
    hidden = cin * expansion
    self.residual = stride == 1 and cin == cout
    self.conv = nn.Sequential(
        _conv(cin, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
        _conv(hidden, hidden, 3, stride, groups=hidden),
        nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
        _conv(hidden, cout, 1), nn.BatchNorm2d(cout))

  def forward(self, x):
    return x + self.conv(x) if self.residual else self.conv(x)


# (t, c, n, s), widths already halved (RepDistiller's mobile_half).
_MV2_HALF = ((1, 8, 1, 1), (6, 12, 2, 1), (6, 16, 3, 2), (6, 32, 4, 2),
             (6, 48, 3, 1), (6, 80, 3, 2), (6, 160, 1, 1))


class MobileNetV2Half(nn.Module):
  """RepDistiller's MobileNetV2 ×0.5 for CIFAR: stride-2 stem 3 → 16, ReLU,
  1×1 head 160 → 1280 + BN + ReLU, pool, Linear (N(0, 0.01))."""

  def __init__(self, num_classes: int):
    super().__init__()
    layers, cin = [_conv(3, 16, 3, 2), nn.BatchNorm2d(16),
                   nn.ReLU(inplace=True)], 16
    for t, c, n, s in _MV2_HALF:
      for i in range(n):
        layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
        cin = c
    layers += [_conv(cin, 1280, 1), nn.BatchNorm2d(1280),
               nn.ReLU(inplace=True)]
    self.features = nn.Sequential(*layers)
    self.classifier = nn.Linear(1280, num_classes)
    nn.init.normal_(self.classifier.weight, 0, 0.01)
    nn.init.zeros_(self.classifier.bias)

  def forward(self, x):
    x = self.features(x)
    return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _builders() -> dict[str, Callable[[int], nn.Module]]:
  b: dict[str, Callable[[int], nn.Module]] = {}
  for depth in (8, 14, 20, 32, 44, 56, 110):
    b[f"resnet{depth}"] = (lambda c, d=depth:
                           CifarResNet(d, (16, 16, 32, 64), c))
  b["resnet8x4"] = lambda c: CifarResNet(8, (32, 64, 128, 256), c)
  b["resnet32x4"] = lambda c: CifarResNet(32, (32, 64, 128, 256), c)
  for depth, widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    b[f"wrn_{depth}_{widen}"] = (lambda c, d=depth, w=widen:
                                 WideResNet(d, w, c))
  for name, convs in _VGG_CONVS.items():
    b[name] = lambda c, v=convs: VGG(v, c)
  b["MobileNetV2"] = MobileNetV2Half
  b["ResNet50"] = lambda c: ResNet(Bottleneck, (3, 4, 6, 3), c, False)
  b["imagenet_resnet18"] = lambda c: ResNet(BasicBlock, (2, 2, 2, 2), c, True)
  b["imagenet_resnet34"] = lambda c: ResNet(BasicBlock, (3, 4, 6, 3), c, True)
  return b


BUILDERS = _builders()

# docs/method.md §7 (100 classes; ImageNet models 1000): what create() must
# build, checked by tests/test_benchmarks.py.
REFERENCE_PARAM_COUNTS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324,
    "resnet32": 472_756, "resnet44": 667_188, "resnet56": 861_620,
    "resnet110": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156, "vgg8": 3_965_028, "vgg11": 9_277_284,
    "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692,
    "MobileNetV2": 812_836, "ResNet50": 23_705_252,
    "imagenet_resnet18": 11_689_512, "imagenet_resnet34": 21_797_672,
}


def create(name: str, num_classes: int | None = None) -> nn.Module:
  """The PyTorch twin of the slkd_jax model ``name`` (same registry names;
  default classes: 1000 for ``imagenet_*``, else 100)."""
  if name not in BUILDERS:
    raise ValueError(f"no PyTorch twin for {name!r}; available: "
                     f"{', '.join(sorted(BUILDERS))}")
  if num_classes is None:
    num_classes = 1000 if name.startswith("imagenet_") else 100
  return _he_init(BUILDERS[name](num_classes))


def num_params(model: nn.Module) -> int:
  """Trainable parameter count (BN running statistics excluded)."""
  return sum(p.numel() for p in model.parameters())
