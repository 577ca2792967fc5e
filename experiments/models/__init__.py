"""Model registry: ``get_model(name, rngs=..., num_classes=...)``.

>>> from flax import nnx
>>> from experiments.models import get_model, param_counts
>>> model = get_model("lenet_300_100", rngs=nnx.Rngs(0))
>>> param_counts(model)
{'total': 266610, 'eligible': 266200}

Every model takes NHWC images and returns logits.  Models with BatchNorm start in
training mode; call ``model.eval()`` before evaluation and ``model.train()`` to go
back (NNX sets ``use_running_average`` on every BatchNorm).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax import nnx

from experiments.models.common import eligible_mask, is_eligible, param_counts
from experiments.models.densenet import DenseNet, densenet40
from experiments.models.lenet import LeNet5, LeNet300100, lenet5, lenet_300_100
from experiments.models.resnet import CifarResNet, ImageNetResNet, resnet50, resnet56
from experiments.models.vgg import VGGCifar, vgg_cifar

__all__ = [
  "MODELS",
  "ModelSpec",
  "CifarResNet",
  "DenseNet",
  "ImageNetResNet",
  "LeNet300100",
  "LeNet5",
  "VGGCifar",
  "eligible_mask",
  "get_model",
  "is_eligible",
  "model_names",
  "param_counts",
]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the registry knows about a model family.

  Attributes:
    constructor: ``f(*, rngs, num_classes, **kwargs) -> nnx.Module``.
    input_shape: default ``(H, W, C)`` of one example.
    num_classes: default number of classes.
    paper_params: the parameter count the GSM paper quotes for the model (used by
      the tests to check the architecture); ``None`` when not in the paper.
    has_batch_norm: whether train/eval mode changes the forward pass.
  """

  constructor: Callable[..., nnx.Module]
  input_shape: tuple[int, int, int]
  num_classes: int
  paper_params: float | None
  has_batch_norm: bool
  description: str


MODELS: dict[str, ModelSpec] = {
  "lenet_300_100": ModelSpec(
    lenet_300_100, (28, 28, 1), 10, 267e3, False, "MLP 784-300-100-10 (MNIST)"
  ),
  "lenet5": ModelSpec(
    lenet5, (28, 28, 1), 10, 431e3, False, "Caffe LeNet-5: conv20-conv50-fc500-fc10"
  ),
  "resnet56": ModelSpec(
    resnet56, (32, 32, 3), 10, 0.85e6, True, "CIFAR ResNet-56, option-A shortcuts"
  ),
  "densenet40": ModelSpec(densenet40, (32, 32, 3), 10, 1.0e6, True, "CIFAR DenseNet-40, k=12"),
  "resnet50": ModelSpec(resnet50, (224, 224, 3), 1000, 25.5e6, True, "ImageNet ResNet-50 (v1.5)"),
  "vgg_cifar": ModelSpec(
    vgg_cifar, (32, 32, 3), 10, None, True, "small VGG-like CIFAR net with BN"
  ),
}

# Accepted aliases (the paper and the authors' code use these spellings).
_ALIASES = {"lenet300": "lenet_300_100", "lenet_300": "lenet_300_100", "lenet-5": "lenet5"}


def model_names() -> list[str]:
  """Names accepted by :func:`get_model` (aliases excluded)."""
  return sorted(MODELS)


def get_spec(name: str) -> ModelSpec:
  """The :class:`ModelSpec` of ``name`` (aliases accepted)."""
  key = _ALIASES.get(name, name)
  try:
    return MODELS[key]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(model_names())}") from None


def get_model(
  name: str, *, rngs: nnx.Rngs, num_classes: int | None = None, **kwargs: Any
) -> nnx.Module:
  """Builds model ``name`` with freshly initialised parameters.

  Args:
    name: a key of :data:`MODELS` (or an alias such as ``"lenet300"``).
    rngs: NNX random streams used for initialisation.
    num_classes: output classes; defaults to the model's usual dataset.
    **kwargs: forwarded to the family constructor (e.g. ``shortcut="B"`` for
      ``resnet56``, ``layout=...`` for ``vgg_cifar``).
  """
  spec = get_spec(name)
  return spec.constructor(
    rngs=rngs,
    num_classes=spec.num_classes if num_classes is None else num_classes,
    **kwargs,
  )
