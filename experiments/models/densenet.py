"""DenseNet-40 (k=12) for CIFAR, Huang et al. (2017), the variant without bottleneck
or compression ("DenseNet (L=40, k=12)", 1.0M parameters).

Layout: 3x3 conv (16 channels) - dense block - transition - dense block - transition
- dense block - BN-ReLU - global average pool - fc.  Each dense block has
``(depth - 4) / 3 = 12`` composite layers BN-ReLU-conv3x3 producing ``k`` new channels
that are concatenated to the input; a transition is BN-ReLU-conv1x1 (channels kept)
followed by 2x2 average pooling.  Eligible (kernel) weights: 1,001,616.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.models.common import lecun_normal
from experiments.models.resnet import batch_norm, conv


class DenseLayer(nnx.Module):
  """BN-ReLU-conv3x3 producing ``growth`` channels appended to the input."""

  def __init__(self, cin: int, growth: int, *, rngs: nnx.Rngs):
    self.bn = batch_norm(cin, rngs=rngs)
    self.conv = conv(cin, growth, 3, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(nnx.relu(self.bn(x)))
    return jnp.concatenate([x, y], axis=-1)


class Transition(nnx.Module):
  """BN-ReLU-conv1x1 followed by 2x2 average pooling (halves the resolution)."""

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
    self.bn = batch_norm(cin, rngs=rngs)
    self.conv = conv(cin, cout, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(nnx.relu(self.bn(x)))
    return nnx.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nnx.Module):
  """DenseNet for 32x32 inputs with three dense blocks of equal depth."""

  def __init__(
    self,
    depth: int = 40,
    growth: int = 12,
    *,
    rngs: nnx.Rngs,
    num_classes: int = 10,
    initial_channels: int = 16,
  ):
    if (depth - 4) % 3:
      raise ValueError(f"DenseNet depth must be 3n+4, got {depth}")
    n = (depth - 4) // 3
    self.stem = conv(3, initial_channels, 3, rngs=rngs)
    layers: list[nnx.Module] = []
    c = initial_channels
    for block in range(3):
      for _ in range(n):
        layers.append(DenseLayer(c, growth, rngs=rngs))
        c += growth
      if block < 2:
        layers.append(Transition(c, c, rngs=rngs))
    self.layers = nnx.List(layers)
    self.final_bn = batch_norm(c, rngs=rngs)
    self.fc = nnx.Linear(c, num_classes, kernel_init=lecun_normal, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.stem(x)
    for layer in self.layers:
      x = layer(x)
    x = nnx.relu(self.final_bn(x))
    x = jnp.mean(x, axis=(1, 2))
    return self.fc(x)


def densenet40(*, rngs: nnx.Rngs, num_classes: int = 10) -> DenseNet:
  """Registry constructor: DenseNet-40 with growth rate 12."""
  return DenseNet(40, 12, rngs=rngs, num_classes=num_classes)
