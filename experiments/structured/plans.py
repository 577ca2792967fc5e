"""Structure plans: which channels of a model can go, and which tensors hold them.

A :class:`Plan` lists the prunable :class:`Site` s of a supported model (one per
layer whose output channels may be removed) and the shape of one input example.
Everything else in :mod:`experiments.structured` (gates, counting, surgery, the
methods) reads the model through its plan.

Example:
  >>> from flax import nnx
  >>> from experiments.models.lenet import LeNet5
  >>> plan = plan_for(LeNet5(rngs=nnx.Rngs(0)))
  >>> plan.names, plan.input_shape
  (('conv1', 'conv2', 'fc1'), (28, 28, 1))
  >>> plan.sites[1].consumers  # fc1 reads conv2's maps through a 4x4 flatten
  ((('fc1',), 16),)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from flax import nnx

from experiments.models.lenet import LeNet5, LeNet300100
from experiments.models.resnet import CifarResNet
from experiments.models.vgg import VGGCifar

ModulePath = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Site:
  """A prunable set of channels.

  Attributes:
    name: the layer name used in gates, scores and widths (``"conv1"``,
      ``"convs.3"``, ``"blocks.10"``).
    gate_module: path of the module whose output the gate multiplies.
    producers: modules whose output axis (the last axis of every parameter
      and BatchNorm statistic) holds these channels.
    consumers: ``(module path, spatial)`` of the modules that read them; the
      input axis of the kernel is sliced, in blocks of ``spatial`` positions
      for a dense layer after a flatten (NHWC flatten: index ``s * C + c``).
  """

  name: str
  gate_module: ModulePath
  producers: tuple[ModulePath, ...]
  consumers: tuple[tuple[ModulePath, int], ...]


@dataclasses.dataclass(frozen=True)
class Plan:
  """The prunable sites of a model and the shape of one input example."""

  sites: tuple[Site, ...]
  input_shape: tuple[int, int, int]

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(s.name for s in self.sites)


def module_at(model: nnx.Module, path: ModulePath) -> Any:
  """The sub-module at ``path`` (attribute names and list indices)."""
  node = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def plan_for(model: nnx.Module, input_shape: Sequence[int] | None = None) -> Plan:
  """The structure plan of a supported model.

  Supported: :class:`~experiments.models.lenet.LeNet5` (sites ``conv1``,
  ``conv2``, ``fc1``), ``LeNet300100`` (``fc1``, ``fc2``),
  :class:`~experiments.models.vgg.VGGCifar` (every conv block) and
  :class:`~experiments.models.resnet.CifarResNet` (the inner channels of
  every basic block: ``conv1``'s output, read by ``conv2``; the block outputs
  are tied by the residual sums and stay).

  Args:
    model: the model.
    input_shape: ``(H, W, C)`` of one example; default: the model's usual.

  Raises:
    TypeError: for other model classes.
  """
  if isinstance(model, LeNet5):
    spatial = model.fc1.in_features // model.conv2.out_features
    sites = (
      Site("conv1", ("conv1",), (("conv1",),), ((("conv2",), 1),)),
      Site("conv2", ("conv2",), (("conv2",),), ((("fc1",), spatial),)),
      Site("fc1", ("fc1",), (("fc1",),), ((("fc2",), 1),)),
    )
    default = (28, 28, model.conv1.in_features)
  elif isinstance(model, LeNet300100):
    sites = (
      Site("fc1", ("fc1",), (("fc1",),), ((("fc2",), 1),)),
      Site("fc2", ("fc2",), (("fc2",),), ((("fc3",), 1),)),
    )
    default = (28, 28, 1)
  elif isinstance(model, VGGCifar):
    n = len(model.convs)
    sites = []
    for i in range(n):
      nxt = (("convs", i + 1, "conv"), 1) if i + 1 < n else (("fc",), 1)
      sites.append(
        Site(f"convs.{i}", ("convs", i, "bn"), (("convs", i, "conv"), ("convs", i, "bn")), (nxt,))
      )
    sites = tuple(sites)
    default = (32, 32, model.convs[0].conv.in_features)
  elif isinstance(model, CifarResNet):
    sites = tuple(
      Site(
        f"blocks.{i}",
        ("blocks", i, "bn1"),
        (("blocks", i, "conv1"), ("blocks", i, "bn1")),
        ((("blocks", i, "conv2"), 1),),
      )
      for i in range(len(model.blocks))
    )
    default = (32, 32, 3)
  else:
    raise TypeError(
      f"No structure plan for {type(model).__name__}; supported: LeNet5, "
      "LeNet300100, VGGCifar, CifarResNet."
    )
  shape = tuple(int(d) for d in (input_shape or default))
  if len(shape) != 3:
    raise ValueError(f"`input_shape` must be (H, W, C), got {input_shape!r}.")
  return Plan(sites, shape)


def _out_features(module: Any) -> int:
  if isinstance(module, nnx.BatchNorm):
    return int(module.num_features)
  return int(module.out_features)


def site_widths(model: nnx.Module, plan: Plan) -> dict[str, int]:
  """Channels per site of the (unsliced) model."""
  return {s.name: _out_features(module_at(model, s.gate_module)) for s in plan.sites}
