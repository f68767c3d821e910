"""PyTorch checkpoint converter: forward parity against PyTorch twins of the
reference zoo, the reference key layouts of all 26 architectures, strict
errors, the orbax teacher checkpoint and the CLI.

The twins below are written from docs/method.md §7–8 (and the reference
PyTorch code they describe): they exist to produce state_dicts with the
reference zoo's real key names and shapes, and logits to compare against.
Their ``features`` methods transcribe mdistiller's ``forward`` (its
``(logits, feats)`` with ``feats``, ``preact_feats`` and ``pooled_feat``),
which the JAX models' ``features=True`` outputs must equal.
"""

import json
import os
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="the PyTorch converter tests need torch: "
    "pip install -e '.[torch]'")
import torch.nn.functional as F  # noqa: E402
from torch import nn as tnn  # noqa: E402

from slkd_jax import convert_torch as ct  # noqa: E402
from slkd_jax import models, torch_keys  # noqa: E402

NUM_CLASSES = 10  # not the default 100 / 1000: conversion must infer it

# ---------------------------------------------------------------------------
# PyTorch twins of the reference zoo (eval-mode forward only).


def _conv(cin, cout, k, stride=1, groups=1, bias=False):
  # Every conv of the zoo pads k // 2 (3x3: 1, 1x1: 0, 7x7: 3).
  return tnn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias)


def _bn(c):
  return tnn.BatchNorm2d(c)


def _stage_with_preact(stage, x):
  """Run a block Sequential as mdistiller's ``is_last`` blocks do: the last
  block also returns its pre-ReLU output."""
  for block in stage[:-1]:
    x = block(x)
  return stage[-1].forward_preact(x)


def _feats(feats, preact_feats, pooled):
  return {"feats": feats, "preact_feats": preact_feats, "pooled_feat": pooled}


class TBasicBlock(tnn.Module):
  """RepDistiller resnet.py / torchvision BasicBlock (post-activation)."""
  expansion = 1

  def __init__(self, cin, planes, stride, shortcut="downsample"):
    super().__init__()
    self.conv1, self.bn1 = _conv(cin, planes, 3, stride), _bn(planes)
    self.conv2, self.bn2 = _conv(planes, planes, 3), _bn(planes)
    self.sc = None
    if stride != 1 or cin != planes:
      self.sc = shortcut
      setattr(self, shortcut, tnn.Sequential(_conv(cin, planes, 1, stride),
                                             _bn(planes)))

  def forward_preact(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    preact = out + (getattr(self, self.sc)(x) if self.sc else x)
    return F.relu(preact), preact

  def forward(self, x):
    return self.forward_preact(x)[0]


class TBottleneck(tnn.Module):
  """torchvision / RepDistiller resnetv2 Bottleneck, stride on the 3x3."""
  expansion = 4

  def __init__(self, cin, planes, stride, shortcut="downsample"):
    super().__init__()
    out = 4 * planes
    self.conv1, self.bn1 = _conv(cin, planes, 1), _bn(planes)
    self.conv2, self.bn2 = _conv(planes, planes, 3, stride), _bn(planes)
    self.conv3, self.bn3 = _conv(planes, out, 1), _bn(out)
    self.sc = None
    if stride != 1 or cin != out:
      self.sc = shortcut
      setattr(self, shortcut, tnn.Sequential(_conv(cin, out, 1, stride),
                                             _bn(out)))

  def forward_preact(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    preact = out + (getattr(self, self.sc)(x) if self.sc else x)
    return F.relu(preact), preact

  def forward(self, x):
    return self.forward_preact(x)[0]


class TResNet(tnn.Module):
  """CIFAR ResNets (3 stages), RepDistiller's ResNet50 and torchvision's
  ImageNet ResNets: stem, ``layer{k}`` Sequentials, global pool, classifier.
  """

  def __init__(self, block, stages, widths, stem, imagenet=False,
               classifier="fc", shortcut="downsample", num_classes=10):
    super().__init__()
    self.imagenet, self.classifier, self.num_stages = (imagenet, classifier,
                                                       len(stages))
    self.conv1 = _conv(3, stem, 7 if imagenet else 3, 2 if imagenet else 1)
    self.bn1 = _bn(stem)
    cin = stem
    for s, (n, planes) in enumerate(zip(stages, widths)):
      blocks = []
      for i in range(n):
        blocks.append(block(cin, planes, 2 if s > 0 and i == 0 else 1,
                            shortcut))
        cin = planes * block.expansion
      setattr(self, f"layer{s + 1}", tnn.Sequential(*blocks))
    setattr(self, classifier, tnn.Linear(cin, num_classes))

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    if self.imagenet:
      x = F.max_pool2d(x, 3, 2, 1)
    for s in range(self.num_stages):
      x = getattr(self, f"layer{s + 1}")(x)
    return getattr(self, self.classifier)(x.mean((2, 3)))

  def features(self, x):
    """mdistiller cifar/resnet.py, cifar/resnetv2.py, imagenet/resnet.py."""
    stem = self.bn1(self.conv1(x))
    # mdistiller's ImageNet ResNet keeps ``stem`` as preact_feats[0] but then
    # applies an in-place ReLU to it: the tensor it returns is post-ReLU.
    x = F.relu(stem, inplace=True)
    feats, preacts = [x], [stem if self.imagenet else x]
    if self.imagenet:
      x = F.max_pool2d(x, 3, 2, 1)
    for s in range(self.num_stages):
      x, preact = _stage_with_preact(getattr(self, f"layer{s + 1}"), x)
      feats.append(x)
      preacts.append(preact)
    pooled = x.mean((2, 3))
    return (getattr(self, self.classifier)(pooled),
            _feats(feats, preacts, pooled))


class TWideBlock(tnn.Module):
  """RepDistiller wrn.py BasicBlock: pre-activation; with in != out the
  activated input feeds both conv1 and the 1x1 ``convShortcut``."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1, self.conv1 = _bn(cin), _conv(cin, cout, 3, stride)
    self.bn2, self.conv2 = _bn(cout), _conv(cout, cout, 3)
    self.equal = cin == cout
    self.convShortcut = None if self.equal else _conv(cin, cout, 1, stride)

  def forward(self, x):
    act = F.relu(self.bn1(x))
    out = self.conv2(F.relu(self.bn2(self.conv1(act))))
    return (x if self.equal else self.convShortcut(act)) + out


class TNetworkBlock(tnn.Module):

  def __init__(self, n, cin, cout, stride):
    super().__init__()
    self.layer = tnn.Sequential(*[
        TWideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
        for i in range(n)])

  def forward(self, x):
    return self.layer(x)


class TWRN(tnn.Module):

  def __init__(self, depth, k, num_classes=10):
    super().__init__()
    n, w = (depth - 4) // 6, (16, 16 * k, 32 * k, 64 * k)
    self.conv1 = _conv(3, 16, 3)
    self.block1 = TNetworkBlock(n, w[0], w[1], 1)
    self.block2 = TNetworkBlock(n, w[1], w[2], 2)
    self.block3 = TNetworkBlock(n, w[2], w[3], 2)
    self.bn1, self.fc = _bn(w[3]), tnn.Linear(w[3], num_classes)

  def forward(self, x):
    x = self.block3(self.block2(self.block1(self.conv1(x))))
    return self.fc(F.relu(self.bn1(x)).mean((2, 3)))

  def features(self, x):
    """mdistiller cifar/wrn.py: raw group outputs; their preacts re-apply
    the BN that activates each one next."""
    f0 = self.conv1(x)
    f1 = self.block1(f0)
    f2 = self.block2(f1)
    f3 = self.block3(f2)
    pooled = F.relu(self.bn1(f3)).mean((2, 3))
    preacts = [f0, self.block2.layer[0].bn1(f1), self.block3.layer[0].bn1(f2),
               self.bn1(f3)]
    return self.fc(pooled), _feats([f0, f1, f2, f3], preacts, pooled)


VGG_CONVS = {"vgg8": (1, 1, 1, 1, 1), "vgg11": (1, 1, 2, 2, 2),
             "vgg13": (2, 2, 2, 2, 2), "vgg16": (2, 2, 3, 3, 3),
             "vgg19": (2, 2, 4, 4, 4)}


class TVGG(tnn.Module):
  """RepDistiller vgg.py with BN: ``block{i}`` = [conv(bias), BN, ReLU]*,
  last ReLU dropped (applied in forward); pools after blocks 0-2 at 32 px."""

  def __init__(self, convs, num_classes=10):
    super().__init__()
    cin = 3
    for b, (n, width) in enumerate(zip(convs, (64, 128, 256, 512, 512))):
      layers = []
      for _ in range(n):
        layers += [_conv(cin, width, 3, bias=True), _bn(width), tnn.ReLU()]
        cin = width
      setattr(self, f"block{b}", tnn.Sequential(*layers[:-1]))
    self.classifier = tnn.Linear(512, num_classes)

  def forward(self, x):
    return self.features(x)[0]

  def features(self, x):
    """mdistiller cifar/vgg.py: f0..f4 post-ReLU; preacts are the block
    outputs (whose last ReLU is dropped), except f0 itself."""
    h, feats, preacts = x.shape[2], [], []
    for b in range(5):
      preact = getattr(self, f"block{b}")(x)
      x = F.relu(preact)
      feats.append(x)
      preacts.append(x if b == 0 else preact)
      if b < 3 or (b == 3 and h == 64):
        x = F.max_pool2d(x, 2, 2)
    pooled = x.mean((2, 3))
    return self.classifier(pooled), _feats(feats, preacts, pooled)


def _conv_bn_relu(cin, cout, k, stride=1, groups=1, relu=True):
  layers = [_conv(cin, cout, k, stride, groups), _bn(cout)]
  return layers + [tnn.ReLU()] if relu else layers


class TInvertedResidual(tnn.Module):
  """RepDistiller mobilenetv2.py: ``conv`` = pw(0,1,2) dw(3,4,5) pw(6,7)."""

  def __init__(self, cin, cout, stride, t):
    super().__init__()
    hidden = cin * t
    self.res = stride == 1 and cin == cout
    self.conv = tnn.Sequential(
        *_conv_bn_relu(cin, hidden, 1),
        *_conv_bn_relu(hidden, hidden, 3, stride, hidden),
        *_conv_bn_relu(hidden, cout, 1, relu=False))

  def forward(self, x):
    return x + self.conv(x) if self.res else self.conv(x)


class TMobileNetV2(tnn.Module):
  """RepDistiller ``mobile_half``: stem s2 3->16, blocks (reference settings),
  1x1 head 160->1280, ``classifier.0``."""

  def __init__(self, num_classes=10):
    super().__init__()
    setting = ((1, 8, 1, 1), (6, 12, 2, 1), (6, 16, 3, 2), (6, 32, 4, 2),
               (6, 48, 3, 1), (6, 80, 3, 2), (6, 160, 1, 1))
    self.conv1 = tnn.Sequential(*_conv_bn_relu(3, 16, 3, 2))
    cin, stages = 16, []
    for t, c, n, s in setting:
      stages.append(tnn.Sequential(*[
          TInvertedResidual(cin if i == 0 else c, c, s if i == 0 else 1, t)
          for i in range(n)]))
      cin = c
    self.blocks = tnn.ModuleList(stages)
    self.conv2 = tnn.Sequential(*_conv_bn_relu(160, 1280, 1))
    self.classifier = tnn.Sequential(tnn.Linear(1280, num_classes))

  def forward(self, x):
    x = self.conv1(x)
    for stage in self.blocks:
      x = stage(x)
    return self.classifier(self.conv2(x).mean((2, 3)))

  def features(self, x):
    """mdistiller cifar/mobilenetv2.py: f0 and the outputs of block groups
    1, 2, 4, 6; it returns no ``preact_feats``."""
    x = self.conv1(x)
    feats = [x]
    for s, stage in enumerate(self.blocks):
      x = stage(x)
      if s in (1, 2, 4, 6):
        feats.append(x)
    pooled = self.conv2(x).mean((2, 3))
    return self.classifier(pooled), {"feats": feats, "pooled_feat": pooled}


def _shuffle(x, g):
  n, c, h, w = x.shape
  return x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


class TShuffleV1Unit(tnn.Module):
  """RepDistiller ShuffleNetv1.py Bottleneck (groups 3)."""

  def __init__(self, cin, cout, stride, groups=3):
    super().__init__()
    mid, self.stride = cout // 4, stride
    self.g = 1 if cin == 24 else groups
    self.conv1, self.bn1 = _conv(cin, mid, 1, groups=self.g), _bn(mid)
    self.conv2, self.bn2 = _conv(mid, mid, 3, stride, mid), _bn(mid)
    self.conv3, self.bn3 = _conv(mid, cout, 1, groups=groups), _bn(cout)

  def forward_preact(self, x):
    out = _shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.stride == 2:  # AvgPool2d counts the padding: always / 9
      preact = torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1)
    else:
      preact = out + x
    return F.relu(preact), preact

  def forward(self, x):
    return self.forward_preact(x)[0]


class TShuffleV1(tnn.Module):

  def __init__(self, num_classes=10):
    super().__init__()
    self.conv1, self.bn1 = _conv(3, 24, 1), _bn(24)
    cin = 24
    for k, (cout, n) in enumerate(zip((240, 480, 960), (4, 8, 4))):
      units = []
      for i in range(n):
        units.append(TShuffleV1Unit(cin, cout - (cin if i == 0 else 0),
                                    2 if i == 0 else 1))
        cin = cout
      setattr(self, f"layer{k + 1}", tnn.Sequential(*units))
    self.linear = tnn.Linear(960, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    return self.linear(x.mean((2, 3)))

  def features(self, x):
    """mdistiller cifar/ShuffleNetv1.py."""
    x = F.relu(self.bn1(self.conv1(x)))
    feats, preacts = [x], [x]
    for k in (1, 2, 3):
      x, preact = _stage_with_preact(getattr(self, f"layer{k}"), x)
      feats.append(x)
      preacts.append(preact)
    pooled = x.mean((2, 3))
    return self.linear(pooled), _feats(feats, preacts, pooled)


class TShuffleV2Down(tnn.Module):
  """RepDistiller ShuffleNetv2.py DownBlock: left conv1-2, right conv3-5."""

  def __init__(self, cin, cout):
    super().__init__()
    mid = cout // 2
    self.conv1, self.bn1 = _conv(cin, cin, 3, 2, cin), _bn(cin)
    self.conv2, self.bn2 = _conv(cin, mid, 1), _bn(mid)
    self.conv3, self.bn3 = _conv(cin, mid, 1), _bn(mid)
    self.conv4, self.bn4 = _conv(mid, mid, 3, 2, mid), _bn(mid)
    self.conv5, self.bn5 = _conv(mid, mid, 1), _bn(mid)

  def forward(self, x):
    left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
    right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
    right = F.relu(self.bn5(self.conv5(right)))
    return _shuffle(torch.cat([left, right], 1), 2)


class TShuffleV2Basic(tnn.Module):

  def __init__(self, channels):
    super().__init__()
    c = channels // 2
    self.conv1, self.bn1 = _conv(c, c, 1), _bn(c)
    self.conv2, self.bn2 = _conv(c, c, 3, 1, c), _bn(c)
    self.conv3, self.bn3 = _conv(c, c, 1), _bn(c)

  def forward_preact(self, x):
    # mdistiller's preact: [kept, bn3 output] concatenated, not shuffled.
    c = x.shape[1] // 2
    out = F.relu(self.bn1(self.conv1(x[:, c:])))
    preact = self.bn3(self.conv3(self.bn2(self.conv2(out))))
    out = _shuffle(torch.cat([x[:, :c], F.relu(preact)], 1), 2)
    return out, torch.cat([x[:, :c], preact], 1)

  def forward(self, x):
    return self.forward_preact(x)[0]


class TShuffleV2(tnn.Module):

  def __init__(self, num_classes=10):
    super().__init__()
    self.conv1, self.bn1 = _conv(3, 24, 1), _bn(24)
    cin = 24
    for k, (cout, n) in enumerate(zip((116, 232, 464), (3, 7, 3))):
      setattr(self, f"layer{k + 1}", tnn.Sequential(
          TShuffleV2Down(cin, cout), *[TShuffleV2Basic(cout)
                                       for _ in range(n)]))
      cin = cout
    self.conv2, self.bn2 = _conv(464, 1024, 1), _bn(1024)
    self.linear = tnn.Linear(1024, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    x = F.relu(self.bn2(self.conv2(x)))
    return self.linear(x.mean((2, 3)))

  def features(self, x):
    """mdistiller cifar/ShuffleNetv2.py: no head map among the feats."""
    x = F.relu(self.bn1(self.conv1(x)))
    feats, preacts = [x], [x]
    for k in (1, 2, 3):
      x, preact = _stage_with_preact(getattr(self, f"layer{k}"), x)
      feats.append(x)
      preacts.append(preact)
    pooled = F.relu(self.bn2(self.conv2(x))).mean((2, 3))
    return self.linear(pooled), _feats(feats, preacts, pooled)


MOBILENETV1_LAYERS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1),
                      (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
                      (512, 1), (1024, 2), (1024, 1))


class TMobileNetV1(tnn.Module):
  """mdistiller imagenet MobileNetV1: one ``model`` Sequential of a conv_bn
  stem and 13 conv_dw blocks (dw 0,1,2 + pw 3,4,5), then ``fc``. The
  reference's AvgPool2d(7) is global at 224 px; the twin pools globally so
  that it runs on small test inputs."""

  def __init__(self, num_classes=10):
    super().__init__()
    layers, cin = [tnn.Sequential(*_conv_bn_relu(3, 32, 3, 2))], 32
    for cout, stride in MOBILENETV1_LAYERS:
      layers.append(tnn.Sequential(*_conv_bn_relu(cin, cin, 3, stride, cin),
                                   *_conv_bn_relu(cin, cout, 1)))
      cin = cout
    self.model = tnn.Sequential(*layers)
    self.fc = tnn.Linear(1024, num_classes)

  def forward(self, x):
    return self.fc(self.model(x).mean((2, 3)))

  def features(self, x):
    """mdistiller imagenet/mobilenetv1.py: layers 3, 5, 11, 13 without their
    last ReLU are the preacts; no stem entry."""
    m = self.model
    feat1 = m[3][:-1](m[0:3](x))
    feat2 = m[5][:-1](m[4:5](F.relu(feat1)))
    feat3 = m[11][:-1](m[6:11](F.relu(feat2)))
    feat4 = m[13][:-1](m[12:13](F.relu(feat3)))
    preacts = [feat1, feat2, feat3, feat4]
    pooled = F.relu(feat4).mean((2, 3))
    return self.fc(pooled), _feats([F.relu(f) for f in preacts], preacts,
                                   pooled)


TWINS = {
    "resnet8": lambda: TResNet(TBasicBlock, (1, 1, 1), (16, 32, 64), 16),
    "resnet8x4": lambda: TResNet(TBasicBlock, (1, 1, 1), (64, 128, 256), 32),
    "ResNet50": lambda: TResNet(TBottleneck, (3, 4, 6, 3),
                                (64, 128, 256, 512), 64,
                                classifier="linear", shortcut="shortcut"),
    "wrn_16_2": lambda: TWRN(16, 2),
    "vgg8": lambda: TVGG(VGG_CONVS["vgg8"]),
    "MobileNetV2": TMobileNetV2,
    "ShuffleV1": TShuffleV1,
    "ShuffleV2": TShuffleV2,
    "imagenet_resnet18": lambda: TResNet(TBasicBlock, (2, 2, 2, 2),
                                         (64, 128, 256, 512), 64,
                                         imagenet=True),
    "imagenet_resnet50": lambda: TResNet(TBottleneck, (3, 4, 6, 3),
                                         (64, 128, 256, 512), 64,
                                         imagenet=True),
    "imagenet_mobilenetv1": TMobileNetV1,
}


def _image_size(arch):
  # ImageNet models pool globally, so 64 px exercises every layer cheaply.
  return 32 if models.info(arch).image_size == 32 else 64


def make_twin(arch, seed=0):
  """A twin with random weights, affine BN params and running statistics.

  The running statistics come from a train-mode pass over a calibration
  batch (cumulative average: exactly that batch's mean and unbiased
  variance), so every BN holds non-trivial mean/var and activations stay
  O(1) through deep nets, which keeps an absolute 1e-4 on the logits
  meaningful.
  """
  torch.manual_seed(seed)
  net = TWINS[arch]()
  size = _image_size(arch)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, tnn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
        m.momentum = None
        m.reset_running_stats()
    net.train()
    net(torch.randn(4, 3, size, size))
  return net.eval()


@pytest.fixture(scope="module")
def resnet8_twin():
  return make_twin("resnet8")


def _jax_logits(arch, variables, x_nchw):
  model = models.create(arch, NUM_CLASSES)
  x = jnp.asarray(x_nchw.numpy().transpose(0, 2, 3, 1))
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, x))


# ---------------------------------------------------------------------------
# Forward parity.


@pytest.mark.parametrize("arch", sorted(TWINS))
def test_forward_parity_with_pytorch_twin(arch):
  net = make_twin(arch)
  state_dict = net.state_dict()
  # The twins' keys are the reference zoo's (checked for every arch below).
  assert set(state_dict) == reference_keys(arch)
  variables = ct.convert_state_dict(arch, state_dict)
  size = _image_size(arch)
  torch.manual_seed(1)
  x = torch.randn(2, 3, size, size)
  with torch.no_grad():
    expected = net(x).numpy()
  got = _jax_logits(arch, variables, x)
  assert got.shape == (2, NUM_CLASSES)
  # Guard against a vacuous comparison (e.g. constant logits).
  assert np.std(expected) > 1e-2
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
  # Same predictions, hence the same accuracy on the same images.
  np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))


def _nhwc(t):
  t = t.numpy()
  return t.transpose(0, 2, 3, 1) if t.ndim == 4 else t


@pytest.fixture
def one_torch_thread():
  """Float64 convolutions with several torch threads on a shared 2-core
  machine mostly spin (seconds per grouped conv instead of milliseconds)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", sorted(TWINS))
def test_features_match_pytorch_twin(arch, one_torch_thread):
  """``features=True`` returns mdistiller's feats, preact_feats and
  pooled_feat (NHWC), value for value, from the converted twin weights.

  In float64 on both sides, so that rounding (~1e-5 of the scale after 50
  float32 layers) cannot hide a real difference such as a missing ReLU or
  a feature taken one layer early.
  """
  net = make_twin(arch).double()
  variables = ct.convert_state_dict(arch, net.state_dict(), dtype=np.float64)
  size = _image_size(arch)
  torch.manual_seed(1)
  x = torch.randn(2, 3, size, size, dtype=torch.float64)
  with torch.no_grad():
    logits, expected = net.features(x)
    # The transcribed mdistiller forward is the twin's own network.
    np.testing.assert_allclose(logits, net(x), rtol=0, atol=1e-12)
  # mdistiller's MobileNetV2 returns no preact_feats; ours repeats feats.
  expected.setdefault("preact_feats", expected["feats"])
  model = models.create(arch, NUM_CLASSES, dtype=jnp.float64)
  with jax.enable_x64(True):
    out = jax.jit(lambda v, x: model.apply(v, x, train=False, features=True))(
        variables, jnp.asarray(_nhwc(x)))
  assert isinstance(out, models.Outputs)
  pairs = [("logits", out.logits, logits),
           ("pooled_feat", out.pooled_feat, expected["pooled_feat"])]
  for key in ("feats", "preact_feats"):
    assert len(getattr(out, key)) == len(expected[key]), key
    pairs += [(f"{key}[{i}]", got, want) for i, (got, want) in
              enumerate(zip(getattr(out, key), expected[key]))]
  for key, got, want in pairs:
    want = _nhwc(want)
    assert got.shape == want.shape and got.dtype == np.float64, key
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * scale,
                               err_msg=key)


# ---------------------------------------------------------------------------
# Every registered architecture: the reference key layout (docs/method.md §8),
# mapped both ways.


def _c(name, bias=False):
  return [f"{name}.weight"] + ([f"{name}.bias"] if bias else [])


def _b(name):
  return [f"{name}.{leaf}" for leaf in ("weight", "bias", "running_mean",
                                        "running_var", "num_batches_tracked")]


def _l(name):
  return [f"{name}.weight", f"{name}.bias"]


def reference_keys(arch):
  """The state_dict keys of the reference PyTorch model, from docs/method.md."""
  keys = []
  if m := re.fullmatch(r"resnet(\d+)(x4)?", arch):
    n, wide = (int(m[1]) - 2) // 6, bool(m[2])
    keys += _c("conv1") + _b("bn1")
    for s in range(3):
      for i in range(n):
        p = f"layer{s + 1}.{i}"
        keys += _c(f"{p}.conv1") + _b(f"{p}.bn1") + _c(f"{p}.conv2")
        keys += _b(f"{p}.bn2")
        if i == 0 and (s > 0 or wide):  # x4: the first block goes 32 -> 64
          keys += _c(f"{p}.downsample.0") + _b(f"{p}.downsample.1")
    keys += _l("fc")
  elif arch == "ResNet50" or arch.startswith("imagenet_resnet"):
    stages = (2, 2, 2, 2) if arch.endswith("18") else (3, 4, 6, 3)
    bottleneck = arch.endswith("50")
    shortcut = "shortcut" if arch == "ResNet50" else "downsample"
    keys += _c("conv1") + _b("bn1")
    for s, n in enumerate(stages):
      for i in range(n):
        p = f"layer{s + 1}.{i}"
        for j in range(1, 4 if bottleneck else 3):
          keys += _c(f"{p}.conv{j}") + _b(f"{p}.bn{j}")
        if i == 0 and (s > 0 or bottleneck):
          keys += _c(f"{p}.{shortcut}.0") + _b(f"{p}.{shortcut}.1")
    keys += _l("linear" if arch == "ResNet50" else "fc")
  elif m := re.fullmatch(r"wrn_(\d+)_(\d+)", arch):
    n, k = (int(m[1]) - 4) // 6, int(m[2])
    widths = (16, 16 * k, 32 * k, 64 * k)
    keys += _c("conv1")
    for g in range(3):
      for i in range(n):
        p = f"block{g + 1}.layer.{i}"
        keys += _b(f"{p}.bn1") + _c(f"{p}.conv1") + _b(f"{p}.bn2")
        keys += _c(f"{p}.conv2")
        if i == 0 and widths[g] != widths[g + 1]:
          keys += _c(f"{p}.convShortcut")
    keys += _b("bn1") + _l("fc")
  elif arch in VGG_CONVS:
    for b, n in enumerate(VGG_CONVS[arch]):
      for k in range(n):
        keys += _c(f"block{b}.{3 * k}", bias=True) + _b(f"block{b}.{3 * k + 1}")
    keys += _l("classifier")
  elif arch == "MobileNetV2":
    keys += _c("conv1.0") + _b("conv1.1")
    for s, n in enumerate((1, 2, 3, 4, 3, 3, 1)):
      for i in range(n):
        for conv, bn in ((0, 1), (3, 4), (6, 7)):
          keys += _c(f"blocks.{s}.{i}.conv.{conv}")
          keys += _b(f"blocks.{s}.{i}.conv.{bn}")
    keys += _c("conv2.0") + _b("conv2.1") + _l("classifier.0")
  elif arch == "ShuffleV1":
    keys += _c("conv1") + _b("bn1")
    for s, n in enumerate((4, 8, 4)):
      for i in range(n):
        for j in (1, 2, 3):
          keys += _c(f"layer{s + 1}.{i}.conv{j}") + _b(f"layer{s + 1}.{i}.bn{j}")
    keys += _l("linear")
  elif arch == "ShuffleV2":
    keys += _c("conv1") + _b("bn1")
    for s, n in enumerate((3, 7, 3)):
      for i in range(n + 1):
        for j in range(1, 6 if i == 0 else 4):
          keys += _c(f"layer{s + 1}.{i}.conv{j}") + _b(f"layer{s + 1}.{i}.bn{j}")
    keys += _c("conv2") + _b("bn2") + _l("linear")
  elif m := re.fullmatch(r"(teskd_)?cifar_resnet(18|34)", arch):
    keys += _c("conv1") + _b("bn1")
    for s, n in enumerate((2, 2, 2, 2) if m[2] == "18" else (3, 4, 6, 3)):
      for i in range(n):
        p = f"layer{s + 1}.{i}"
        keys += _c(f"{p}.conv1") + _b(f"{p}.bn1") + _c(f"{p}.conv2")
        keys += _b(f"{p}.bn2")
        if i == 0 and s > 0:
          keys += _c(f"{p}.downsample.0") + _b(f"{p}.downsample.1")
    keys += _l("fc")
    if m[1]:  # TESKD's top-down path and heads (models/resnet_our.py)
      for i in range(4):
        keys += _c(f"laterals.{i}.0") + _b(f"laterals.{i}.1")
      for k in range(3):
        keys += _c(f"upsample.{k}.1") + _b(f"upsample.{k}.2")
      for k in (1, 2, 3):  # attribute fuse_k: read as fuse.k (canonical)
        keys += _c(f"fuse.{k}.0") + _b(f"fuse.{k}.1")
      for j in (1, 2, 3):
        keys += _c(f"downsample{j}.0", bias=True) + _b(f"downsample{j}.1")
        keys += _c(f"downsample{j}.3", bias=True) + _b(f"downsample{j}.4")
        keys += _l(f"fc_b{j}")
  elif arch == "imagenet_mobilenetv1":
    keys += _c("model.0.0") + _b("model.0.1")
    for i in range(1, 14):
      for conv, bn in ((0, 1), (3, 4)):
        keys += _c(f"model.{i}.{conv}") + _b(f"model.{i}.{bn}")
    keys += _l("fc")
  else:
    raise AssertionError(f"no reference key layout for {arch!r} in the test")
  assert len(keys) == len(set(keys))
  return set(keys)


def to_torch_state_dict(variables):
  """Flax variables → a PyTorch-layout state_dict (the converter inverted,
  written independently of it: ``_N`` suffixes become ``.N`` segments)."""
  params = torch_keys.flatten(variables["params"])
  stats = torch_keys.flatten(variables.get("batch_stats", {}))
  sd = {}
  for path, value in params.items():
    module = ".".join(re.sub(r"_(\d+)", r".\1", seg) for seg in path[:-1])
    leaf = path[-1]
    if leaf == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      leaf = "weight"
    elif leaf == "scale":
      leaf = "weight"
    sd[f"{module}.{leaf}"] = torch.from_numpy(np.ascontiguousarray(value))
  for path, value in stats.items():
    module = ".".join(re.sub(r"_(\d+)", r".\1", seg) for seg in path[:-1])
    leaf = {"mean": "running_mean", "var": "running_var"}[path[-1]]
    sd[f"{module}.{leaf}"] = torch.from_numpy(value)
    sd[f"{module}.num_batches_tracked"] = torch.tensor(7)
  return sd


@pytest.mark.parametrize("arch", models.available())
def test_reference_layout_round_trip(arch):
  rng = np.random.default_rng(0)
  num_classes = 7
  abstract = ct.abstract_variables(arch, num_classes)
  variables = jax.tree.map(
      lambda s: rng.standard_normal(s.shape, dtype=np.float32), abstract)
  sd = to_torch_state_dict(variables)
  assert set(sd) == reference_keys(arch)
  back = ct.convert_state_dict(arch, sd)  # num_classes inferred: 7
  assert set(back) == set(variables)
  assert jax.tree.structure(back) == jax.tree.structure(variables)
  for (path, a), b in zip(jax.tree.leaves_with_path(variables),
                          jax.tree.leaves(back)):
    assert b.dtype == np.float32, path
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_flax_path_to_torch_module_path():
  assert ct.torch_module_path(("layer1_0", "downsample_1")) == \
      "layer1.0.downsample.1"
  assert ct.torch_module_path(("blocks_2_1", "conv_0")) == "blocks.2.1.conv.0"
  assert ct.torch_module_path(("block1", "layer_0", "convShortcut")) == \
      "block1.layer.0.convShortcut"
  assert ct.torch_module_path(("model_0_1",)) == "model.0.1"
  assert ct.torch_module_path(("classifier_0",)) == "classifier.0"


# ---------------------------------------------------------------------------
# Checkpoint layouts and strictness.


def _assert_same_variables(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_checkpoint_dict_and_dataparallel_prefix(resnet8_twin):
  sd = resnet8_twin.state_dict()
  raw = ct.convert_state_dict("resnet8", sd)
  # mdistiller's layout: {'model': state_dict, ...} plus training metadata;
  # DataParallel adds 'module.'.
  wrapped = {"model": {f"module.{k}": v for k, v in sd.items()},
             "epoch": 240, "best_acc": torch.tensor(72.34),
             "optimizer": {"state": {}, "param_groups": []}}
  _assert_same_variables(ct.convert_state_dict("resnet8", wrapped), raw)
  for key in ("state_dict", "net"):
    _assert_same_variables(ct.convert_state_dict("resnet8", {key: sd}), raw)
  # numpy values work as well as tensors.
  numpy_sd = {k: v.numpy() for k, v in sd.items()}
  _assert_same_variables(ct.convert_state_dict("resnet8", numpy_sd), raw)
  assert ct.convert_state_dict("resnet8", sd, num_classes=NUM_CLASSES)


def test_strict_errors_name_every_problem(resnet8_twin):
  sd = dict(resnet8_twin.state_dict())
  del sd["layer2.0.downsample.0.weight"]
  sd["layer9.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
  sd["layer1.0.bn2.running_var"] = torch.ones(17)
  with pytest.raises(ValueError) as info:
    ct.convert_state_dict("resnet8", sd)
  msg = str(info.value)
  assert "missing keys (1)" in msg
  assert "layer2.0.downsample.0.weight (32, 16, 1, 1)" in msg
  assert "unexpected keys (1)" in msg and "layer9.0.conv1.weight" in msg
  assert "shape mismatches (1)" in msg
  assert "layer1.0.bn2.running_var: expected (16,), got (17,)" in msg


def test_stray_num_batches_tracked_is_unexpected(resnet8_twin):
  sd = dict(resnet8_twin.state_dict())
  sd["fc.num_batches_tracked"] = torch.tensor(1)  # fc is no BatchNorm
  with pytest.raises(ValueError, match=r"(?s)unexpected keys.*fc.num_batches_tracked"):
    ct.convert_state_dict("resnet8", sd)


def test_wrong_arch_and_wrong_num_classes(resnet8_twin):
  sd = resnet8_twin.state_dict()
  with pytest.raises(ValueError, match="is 'resnet14' the architecture"):
    ct.convert_state_dict("resnet14", {k: v for k, v in sd.items()
                                       if not k.startswith("layer")})
  with pytest.raises(ValueError, match=r"fc.weight: expected \(100, 64\), "
                     r"got \(10, 64\)"):
    ct.convert_state_dict("resnet8", sd, num_classes=100)
  with pytest.raises(ValueError, match="unknown model"):
    ct.convert_state_dict("resnet9", sd)
  with pytest.raises(ValueError, match="no tensors"):
    ct.convert_state_dict("resnet8", {"epoch": 3})


# ---------------------------------------------------------------------------
# Orbax teacher checkpoints.


def test_save_and_load_converted_round_trip(tmp_path, resnet8_twin):
  variables = ct.convert_state_dict("resnet8", resnet8_twin.state_dict())
  out = ct.save_teacher(variables, str(tmp_path / "t"), "resnet8",
                        source="twin.pth")
  loaded, meta = ct.load_converted(out, arch="resnet8",
                                 num_classes=NUM_CLASSES)
  _assert_same_variables(loaded, variables)
  assert meta["arch"] == "resnet8" and meta["num_classes"] == NUM_CLASSES
  assert meta["source"] == "twin.pth"
  assert meta["num_params"] == models.count_params(variables["params"])
  loaded, _ = ct.load_converted(out)  # arch from the metadata
  _assert_same_variables(loaded, variables)
  with pytest.raises(ValueError, match=r"(?s)holds a 'resnet8'.*'resnet20'"):
    ct.load_converted(out, arch="resnet20")
  with pytest.raises(ValueError, match="10 classes, but 100"):
    ct.load_converted(out, num_classes=100)
  with pytest.raises(FileExistsError, match="--force"):
    ct.save_teacher(variables, out, "resnet8")
  ct.save_teacher(variables, out, "resnet8", overwrite=True)
  with pytest.raises(ValueError, match="does not match 'resnet14'"):
    ct.save_teacher(variables, str(tmp_path / "u"), "resnet14")


def test_load_converted_converts_pth_on_the_fly(tmp_path, resnet8_twin):
  sd = resnet8_twin.state_dict()
  path = str(tmp_path / "ckpt_epoch_240.pth")
  torch.save({"model": sd, "epoch": 240, "best_acc": torch.tensor(1.0)}, path)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # weights_only=True suffices here
    variables, meta = ct.load_converted(path, arch="resnet8")
  _assert_same_variables(variables, ct.convert_state_dict("resnet8", sd))
  assert meta["num_classes"] == NUM_CLASSES
  assert meta["source"] == os.path.abspath(path)
  with pytest.raises(ValueError, match="needs the architecture"):
    ct.load_converted(path)
  with pytest.raises(ValueError, match="has 10 classes, expected 100|"
                     r"expected \(100, 64\)"):
    ct.load_converted(path, arch="resnet8", num_classes=100)


def test_pickled_extras_fall_back_with_warning(tmp_path, resnet8_twin):
  path = str(tmp_path / "old.pth")
  # A numpy scalar is refused by torch.load(weights_only=True).
  torch.save({"model": resnet8_twin.state_dict(),
              "best_acc": np.float64(72.3)}, path)
  with pytest.warns(UserWarning, match="weights_only=False"):
    variables, _ = ct.load_converted(path, arch="resnet8")
  assert "params" in variables
  with pytest.raises(ValueError, match="weights_only=True"):
    ct.load_torch_checkpoint(path, allow_pickle=False)


def test_unreadable_pth_gives_clear_error(tmp_path):
  path = tmp_path / "broken.pth"
  path.write_bytes(b"not a checkpoint" * 8)
  with pytest.raises(ValueError, match=r"(?s)cannot read .* as a PyTorch checkpoint"):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      ct.load_converted(str(path), arch="resnet8")


def test_missing_or_corrupt_teacher_checkpoint(tmp_path, resnet8_twin):
  with pytest.raises(ct.ConversionError,
                     match="python -m slkd_jax.convert_torch"):
    ct.load_converted(str(tmp_path / "nowhere"), arch="resnet8")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match=r"(?s)not a teacher checkpoint.*convert_torch"):
    ct.load_converted(str(empty))

  variables = ct.convert_state_dict("resnet8", resnet8_twin.state_dict())
  out = ct.save_teacher(variables, str(tmp_path / "t"), "resnet8")
  # Damage the array data: every file of the orbax checkpoint truncated.
  for root, _, files in os.walk(os.path.join(out, ct.VARIABLES_DIR)):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\0")
  with pytest.raises(ValueError, match=r"(?s)missing or corrupt.*convert_torch"):
    ct.load_converted(out)

  with open(os.path.join(out, ct.METADATA_FILE), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="teacher.json is corrupt"):
    ct.load_converted(out)


# ---------------------------------------------------------------------------
# CLI.


def test_cli_converts_and_reports(tmp_path, resnet8_twin, capsys):
  pth = str(tmp_path / "ckpt_epoch_240.pth")
  torch.save({"model": resnet8_twin.state_dict()}, pth)
  out = str(tmp_path / "teachers" / "resnet8")
  assert ct.main(["--arch", "resnet8", "--checkpoint", pth, "--out", out]) == 0
  printed = capsys.readouterr().out
  count = models.count_params(
      ct.abstract_variables("resnet8", NUM_CLASSES)["params"])
  assert f"{count:,} parameters" in printed and out in printed
  with open(os.path.join(out, ct.METADATA_FILE)) as f:
    assert json.load(f)["source"] == os.path.abspath(pth)
  variables, _ = ct.load_converted(out, arch="resnet8")
  _assert_same_variables(
      variables, ct.convert_state_dict("resnet8", resnet8_twin.state_dict()))
  # A second run refuses to overwrite; errors go to stderr with status 2
  # (every command's status for a user error: slkd_jax.cli; it was 1).
  assert ct.main(["--arch", "resnet8", "--checkpoint", pth, "--out", out]) == 2
  assert "--force" in capsys.readouterr().err


def test_cli_entry_point(tmp_path, resnet8_twin):
  pth = str(tmp_path / "t.pth")
  torch.save(resnet8_twin.state_dict(), pth)
  out = str(tmp_path / "t")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "slkd_jax.convert_torch", "--arch", "resnet8",
       "--checkpoint", pth, "--out", out, "--num-classes", str(NUM_CLASSES)],
      capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "wrote teacher checkpoint" in proc.stdout
  assert os.path.isfile(os.path.join(out, ct.METADATA_FILE))
