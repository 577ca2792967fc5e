"""LeNet-300-100 and LeNet-5 (Caffe variant) for 28x28 grey-scale inputs.

Both follow the versions used by Han et al. (2015) and by the GSM authors' code
(``base_model/lenet5.py`` in DingXiaoH/GSM-SGD):

* LeNet-300-100: 784-300-100-10 MLP with ReLU; 266,200 kernel weights
  (the paper's "267K" counts biases too: 266,610 parameters in total).
* LeNet-5 (Caffe): conv 20@5x5 - maxpool 2 - conv 50@5x5 - maxpool 2 - fc 500 -
  fc 10 with VALID convolutions and ReLU after both convolutions and after fc500;
  430,500 kernel weights (431K in total with biases).

Inputs are NHWC float arrays, ``(batch, 28, 28, 1)``.
"""

from __future__ import annotations

import jax
from flax import nnx

from experiments.models.common import lecun_normal


class LeNet300100(nnx.Module):
  """Three-layer perceptron 784-300-100-10 with ReLU activations."""

  def __init__(self, *, rngs: nnx.Rngs, num_classes: int = 10, in_features: int = 28 * 28):
    self.fc1 = nnx.Linear(in_features, 300, kernel_init=lecun_normal, rngs=rngs)
    self.fc2 = nnx.Linear(300, 100, kernel_init=lecun_normal, rngs=rngs)
    self.fc3 = nnx.Linear(100, num_classes, kernel_init=lecun_normal, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps images ``(N, H, W, C)`` (or already flat ``(N, D)``) to logits."""
    x = x.reshape((x.shape[0], -1))
    x = nnx.relu(self.fc1(x))
    x = nnx.relu(self.fc2(x))
    return self.fc3(x)


class LeNet5(nnx.Module):
  """Caffe's LeNet-5: two VALID 5x5 convolutions with max-pooling and two FC layers."""

  def __init__(self, *, rngs: nnx.Rngs, num_classes: int = 10, in_channels: int = 1):
    self.conv1 = nnx.Conv(
      in_channels, 20, (5, 5), padding="VALID", kernel_init=lecun_normal, rngs=rngs
    )
    self.conv2 = nnx.Conv(20, 50, (5, 5), padding="VALID", kernel_init=lecun_normal, rngs=rngs)
    # 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4, so 4 * 4 * 50 = 800 features.
    self.fc1 = nnx.Linear(4 * 4 * 50, 500, kernel_init=lecun_normal, rngs=rngs)
    self.fc2 = nnx.Linear(500, num_classes, kernel_init=lecun_normal, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps ``(N, 28, 28, C)`` images to logits."""
    x = nnx.relu(self.conv1(x))
    x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = nnx.relu(self.conv2(x))
    x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nnx.relu(self.fc1(x))
    return self.fc2(x)


def lenet_300_100(*, rngs: nnx.Rngs, num_classes: int = 10) -> LeNet300100:
  """Registry constructor for :class:`LeNet300100`."""
  return LeNet300100(rngs=rngs, num_classes=num_classes)


def lenet5(*, rngs: nnx.Rngs, num_classes: int = 10, in_channels: int = 1) -> LeNet5:
  """Registry constructor for :class:`LeNet5`."""
  return LeNet5(rngs=rngs, num_classes=num_classes, in_channels=in_channels)
