"""ResNets: ResNet-56 for CIFAR (He et al. 2016, Sec. 4.2) and ResNet-50 for ImageNet.

ResNet-56 (CIFAR)
  3x3 conv (16) - 3 stages x 9 basic blocks (16, 32, 64 channels; stride 2 at the
  start of stages 2 and 3) - global average pool - fc.  ``shortcut="A"`` (default,
  as in the original CIFAR ResNets) uses parameter-free identity shortcuts that
  subsample spatially and zero-pad the new channels; ``shortcut="B"`` uses 1x1
  projection convolutions + BatchNorm where the shape changes.
  Eligible (kernel) weights: 848,944 with option A, 851,504 with option B (0.85M).

ResNet-50 (ImageNet)
  The torchvision / "v1.5" layout: 7x7/2 stem, 3x3/2 max-pool, bottleneck stages of
  3, 4, 6, 3 blocks (stride in the 3x3 convolution), projection shortcuts,
  global average pool, fc 1000.  Eligible weights: 25,502,912 (25.5M).

All convolutions feeding a BatchNorm have no bias.  Inputs are NHWC.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.models.common import he_normal_fan_out, lecun_normal, same_padding

# PyTorch's BatchNorm momentum=0.1 corresponds to flax momentum=0.9 (flax keeps
# ``momentum * running + (1 - momentum) * batch``).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv(cin: int, cout: int, k: int, *, stride: int = 1, rngs: nnx.Rngs) -> nnx.Conv:
  """Bias-free ``k x k`` convolution with symmetric padding and He init."""
  return nnx.Conv(
    cin,
    cout,
    (k, k),
    strides=(stride, stride),
    padding=same_padding(k),
    use_bias=False,
    kernel_init=he_normal_fan_out,
    rngs=rngs,
  )


def batch_norm(c: int, *, rngs: nnx.Rngs, zero_init: bool = False) -> nnx.BatchNorm:
  """BatchNorm with PyTorch-equivalent momentum/epsilon.

  ``zero_init`` starts the scale at zero (Goyal et al. 2017), which makes every
  residual block the identity at initialisation.
  """
  return nnx.BatchNorm(
    c,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    scale_init=nnx.initializers.zeros if zero_init else nnx.initializers.ones,
    rngs=rngs,
  )


class BasicBlock(nnx.Module):
  """Two 3x3 conv-BN layers with a residual connection (CIFAR ResNets)."""

  def __init__(
    self,
    cin: int,
    cout: int,
    stride: int,
    *,
    shortcut: Literal["A", "B"],
    rngs: nnx.Rngs,
  ):
    self.conv1 = conv(cin, cout, 3, stride=stride, rngs=rngs)
    self.bn1 = batch_norm(cout, rngs=rngs)
    self.conv2 = conv(cout, cout, 3, rngs=rngs)
    self.bn2 = batch_norm(cout, rngs=rngs)
    self.stride = stride
    self.pad_channels = cout - cin
    self.needs_projection = shortcut == "B" and (stride != 1 or cin != cout)
    if self.needs_projection:
      self.proj_conv = conv(cin, cout, 1, stride=stride, rngs=rngs)
      self.proj_bn = batch_norm(cout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.needs_projection:
      s = self.proj_bn(self.proj_conv(x))
    else:
      # Option A: parameter-free shortcut.  Subsample by the stride and pad the
      # extra channels with zeros (half before, half after, as in the
      # reference implementation of He et al.).
      s = x[:, :: self.stride, :: self.stride, :] if self.stride != 1 else x
      if self.pad_channels:
        before = self.pad_channels // 2
        after = self.pad_channels - before
        s = jnp.pad(s, ((0, 0), (0, 0), (0, 0), (before, after)))
    return nnx.relu(y + s)


class CifarResNet(nnx.Module):
  """ResNet-(6n+2) for 32x32 inputs with three stages of ``n`` basic blocks."""

  def __init__(
    self,
    depth: int = 56,
    *,
    rngs: nnx.Rngs,
    num_classes: int = 10,
    widths: tuple[int, int, int] = (16, 32, 64),
    shortcut: Literal["A", "B"] = "A",
  ):
    if (depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    if shortcut not in ("A", "B"):
      raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
    n = (depth - 2) // 6
    self.stem_conv = conv(3, widths[0], 3, rngs=rngs)
    self.stem_bn = batch_norm(widths[0], rngs=rngs)
    blocks = []
    cin = widths[0]
    for stage, width in enumerate(widths):
      for i in range(n):
        stride = 2 if stage > 0 and i == 0 else 1
        blocks.append(BasicBlock(cin, width, stride, shortcut=shortcut, rngs=rngs))
        cin = width
    self.blocks = nnx.List(blocks)
    self.fc = nnx.Linear(cin, num_classes, kernel_init=lecun_normal, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.stem_bn(self.stem_conv(x)))
    for block in self.blocks:
      x = block(x)
    x = jnp.mean(x, axis=(1, 2))
    return self.fc(x)


class Bottleneck(nnx.Module):
  """1x1 reduce - 3x3 (strided) - 1x1 expand bottleneck block of ResNet-50."""

  expansion = 4

  def __init__(
    self,
    cin: int,
    width: int,
    stride: int,
    *,
    rngs: nnx.Rngs,
    zero_init_residual: bool = False,
  ):
    cout = width * self.expansion
    self.conv1 = conv(cin, width, 1, rngs=rngs)
    self.bn1 = batch_norm(width, rngs=rngs)
    self.conv2 = conv(width, width, 3, stride=stride, rngs=rngs)
    self.bn2 = batch_norm(width, rngs=rngs)
    self.conv3 = conv(width, cout, 1, rngs=rngs)
    self.bn3 = batch_norm(cout, rngs=rngs, zero_init=zero_init_residual)
    self.needs_projection = stride != 1 or cin != cout
    if self.needs_projection:
      self.proj_conv = conv(cin, cout, 1, stride=stride, rngs=rngs)
      self.proj_bn = batch_norm(cout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    s = self.proj_bn(self.proj_conv(x)) if self.needs_projection else x
    return nnx.relu(y + s)


class ImageNetResNet(nnx.Module):
  """Bottleneck ResNet for ImageNet-sized inputs (works at any resolution >= 32)."""

  def __init__(
    self,
    stage_sizes: tuple[int, ...] = (3, 4, 6, 3),
    *,
    rngs: nnx.Rngs,
    num_classes: int = 1000,
    zero_init_residual: bool = False,
  ):
    self.stem_conv = nnx.Conv(
      3,
      64,
      (7, 7),
      strides=(2, 2),
      padding=same_padding(7),
      use_bias=False,
      kernel_init=he_normal_fan_out,
      rngs=rngs,
    )
    self.stem_bn = batch_norm(64, rngs=rngs)
    blocks = []
    cin = 64
    for stage, size in enumerate(stage_sizes):
      width = 64 * 2**stage
      for i in range(size):
        stride = 2 if stage > 0 and i == 0 else 1
        blocks.append(
          Bottleneck(
            cin,
            width,
            stride,
            rngs=rngs,
            zero_init_residual=zero_init_residual,
          )
        )
        cin = width * Bottleneck.expansion
    self.blocks = nnx.List(blocks)
    self.fc = nnx.Linear(cin, num_classes, kernel_init=lecun_normal, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.stem_bn(self.stem_conv(x)))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for block in self.blocks:
      x = block(x)
    x = jnp.mean(x, axis=(1, 2))
    return self.fc(x)


def resnet56(
  *, rngs: nnx.Rngs, num_classes: int = 10, shortcut: Literal["A", "B"] = "A"
) -> CifarResNet:
  """Registry constructor: ResNet-56 for CIFAR."""
  return CifarResNet(56, rngs=rngs, num_classes=num_classes, shortcut=shortcut)


def resnet50(
  *, rngs: nnx.Rngs, num_classes: int = 1000, zero_init_residual: bool = False
) -> ImageNetResNet:
  """Registry constructor: ResNet-50 for ImageNet."""
  return ImageNetResNet(
    (3, 4, 6, 3),
    rngs=rngs,
    num_classes=num_classes,
    zero_init_residual=zero_init_residual,
  )
