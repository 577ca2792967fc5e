"""A small VGG-style network for CIFAR (conv3x3-BN-ReLU stacks with max-pooling).

Not one of the paper's benchmarks; it is a cheap, BatchNorm-using convolutional
model for quick experiments.  The default layout
``(64, 64, "M", 128, 128, "M", 256, 256, "M")`` followed by global average pooling
and a linear classifier has 1,146,560 eligible weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.models.common import lecun_normal
from experiments.models.resnet import batch_norm, conv

DEFAULT_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, "M")


class ConvBNReLU(nnx.Module):
  """conv3x3 - BatchNorm - ReLU."""

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
    self.conv = conv(cin, cout, 3, rngs=rngs)
    self.bn = batch_norm(cout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.relu(self.bn(self.conv(x)))


class VGGCifar(nnx.Module):
  """VGG-like CIFAR classifier; ``"M"`` entries in ``layout`` are 2x2 max-pools."""

  def __init__(
    self,
    layout: Sequence[int | str] = DEFAULT_LAYOUT,
    *,
    rngs: nnx.Rngs,
    num_classes: int = 10,
    in_channels: int = 3,
  ):
    self.layout = tuple(layout)
    convs = []
    c = in_channels
    for item in self.layout:
      if item == "M":
        continue
      convs.append(ConvBNReLU(c, int(item), rngs=rngs))
      c = int(item)
    self.convs = nnx.List(convs)
    self.fc = nnx.Linear(c, num_classes, kernel_init=lecun_normal, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    convs = iter(self.convs)
    for item in self.layout:
      if item == "M":
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
      else:
        x = next(convs)(x)
    x = jnp.mean(x, axis=(1, 2))
    return self.fc(x)


def vgg_cifar(
  *,
  rngs: nnx.Rngs,
  num_classes: int = 10,
  layout: Sequence[int | str] = DEFAULT_LAYOUT,
) -> VGGCifar:
  """Registry constructor for :class:`VGGCifar`."""
  return VGGCifar(layout, rngs=rngs, num_classes=num_classes)
