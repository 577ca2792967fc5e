"""The models and data of the structured-pruning programs.

Example:
  >>> build_model("resnet8").blocks[0].conv1.kernel.shape
  (3, 3, 16, 16)
  >>> dataset_of("lenet5"), dataset_of("vgg_small")
  ('mnist', 'cifar10')
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from experiments import data
from experiments.models import get_model
from experiments.models.resnet import CifarResNet

# The models :func:`build_model` and :func:`~experiments.structured.plans.plan_for`
# support.
MODEL_NAMES = ("lenet5", "lenet_300_100", "vgg_small", "vgg_cifar", "resnet56", "resnet8")

# A small VGG-like CIFAR net (CI-sized; the registry default is 1.1M weights).
VGG_SMALL_LAYOUT = (16, 16, "M", 32, 32, "M", 64, "M")


def build_model(name: str, *, seed: int = 0) -> nnx.Module:
  """``lenet5``, ``lenet_300_100``, ``vgg_small``, ``vgg_cifar``,
  ``resnet56`` or ``resnet8`` (the same CIFAR ResNet with one block per
  stage, for CI)."""
  rngs = nnx.Rngs(seed)
  if name == "vgg_small":
    return get_model("vgg_cifar", rngs=rngs, layout=VGG_SMALL_LAYOUT)
  if name == "resnet8":
    return CifarResNet(8, rngs=rngs)
  return get_model(name, rngs=rngs)


def dataset_of(model_name: str) -> str:
  """The dataset a model of :data:`MODEL_NAMES` is trained on."""
  return "mnist" if model_name.startswith("lenet") else "cifar10"


def load_pipelines(
  dataset: str,
  *,
  batch_size: int,
  seed: int = 0,
  data_dir: str | None = None,
  subset: int | None = None,
  builder: Any = None,
) -> tuple[Any, Any]:
  """``(train, test)`` pipelines from :func:`experiments.data.load_splits`.

  Evaluation uses batches of 500, or of 100 on a ``subset`` of the training
  set, with a sixth as many test examples (at least 100).
  """
  return data.load_splits(
    dataset,
    batch_size=batch_size,
    eval_batch_size=500 if not subset else 100,
    seed=seed,
    data_dir=data_dir,
    subset=subset,
    eval_subset=None if not subset else max(100, subset // 6),
    builder=builder,
  )
