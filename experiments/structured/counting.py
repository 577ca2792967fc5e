"""Counting MACs and parameters, with channels gated off or sliced away.

:class:`StructureCounter` reports the MACs and parameters of a model
analytically, as a function of which channels are alive (what the greedy
methods need after every removal); :func:`count_structure` measures a (sliced)
model with :func:`experiments.flops.dense_macs` and
:func:`experiments.models.param_counts`. For a model cut by
:func:`~experiments.structured.surgery.remove_channels` the two agree.

Example:
  >>> import numpy as np
  >>> from flax import nnx
  >>> from experiments.models.lenet import LeNet5
  >>> model = LeNet5(rngs=nnx.Rngs(0))
  >>> counter = StructureCounter(model)
  >>> counter.dense_macs, counter.dense_params
  (2293000, 431080)
  >>> alive = {k: np.arange(c) < c // 2 for k, c in counter.widths.items()}
  >>> counter.count(alive)        # half of every layer's channels
  (646500, 109295)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from experiments import flops as flops_lib
from experiments.models import param_counts
from experiments.structured.plans import ModulePath, Plan, plan_for, site_widths


@dataclasses.dataclass(frozen=True)
class _Layer:
  path: ModulePath
  kind: str  # "conv", "dense", "bn" or "other"
  uses: int  # kernel-entry uses per example (MACs per entry)
  ksize: int  # prod(kernel spatial dims)
  cin: int
  cout: int
  has_bias: bool
  in_site: str | None
  in_mult: int
  out_site: str | None
  other_params: int = 0


def _layers(model: nnx.Module, plan: Plan) -> list[_Layer]:
  uses = flops_lib.kernel_uses(model, (1,) + plan.input_shape)
  in_site, out_site = {}, {}
  for s in plan.sites:
    for p in s.producers:
      out_site[tuple(p)] = s.name
    for p, mult in s.consumers:
      in_site[tuple(p)] = (s.name, mult)
  layers = []
  for path, node in nnx.iter_graph(model):
    path = tuple(path)
    if isinstance(node, (nnx.Conv, nnx.Linear)):
      k = node.kernel[...].shape
      isite, mult = in_site.get(path, (None, 1))
      layers.append(
        _Layer(
          path,
          "conv" if isinstance(node, nnx.Conv) else "dense",
          uses[path],
          int(np.prod(k[:-2], dtype=np.int64)),
          k[-2],
          k[-1],
          node.bias is not None,
          isite,
          mult,
          out_site.get(path),
        )
      )
    elif isinstance(node, nnx.BatchNorm):
      n_par = int(node.scale is not None) + int(node.bias is not None)
      layers.append(
        _Layer(
          path, "bn", 0, 0, 0, int(node.num_features), False, None, 1, out_site.get(path), n_par
        )
      )
  return layers


class StructureCounter:
  """MACs and parameters of a model as a function of the alive channels.

  MACs are those of the Conv / Linear kernels per example (as
  :func:`experiments.flops.dense_macs`); parameters are all ``nnx.Param``
  entries (as ``param_counts(model)["total"]``).

  Args:
    model: the full (unsliced) model.
    plan: its plan.
  """

  def __init__(self, model: nnx.Module, plan: Plan | None = None):
    self.plan = plan or plan_for(model)
    self.layers = _layers(model, self.plan)
    self.widths = site_widths(model, self.plan)
    full = {k: np.ones(c, bool) for k, c in self.widths.items()}
    counted = self._count(full)[1]
    # Params outside the counted layers (none in the supported models).
    self._extra = param_counts(model)["total"] - counted
    self.dense_macs, self.dense_params = self.count(full)

  def _alive_n(self, alive, site, default):
    return int(np.sum(alive[site])) if site is not None else default

  def _count(self, alive: Mapping[str, Any]) -> tuple[int, int]:
    macs = params = 0
    for l in self.layers:
      cout = self._alive_n(alive, l.out_site, l.cout)
      if l.kind == "bn":
        params += l.other_params * cout
        continue
      cin = self._alive_n(alive, l.in_site, 0) * l.in_mult if l.in_site is not None else l.cin
      macs += l.uses * l.ksize * cin * cout
      params += l.ksize * cin * cout + (cout if l.has_bias else 0)
    return macs, params

  def count(self, alive: Mapping[str, Any]) -> tuple[int, int]:
    """``(MACs per example, parameters)`` with only ``alive`` channels."""
    macs, params = self._count(alive)
    return macs, params + getattr(self, "_extra", 0)

  def removal_macs(self, alive: Mapping[str, Any]) -> dict[str, int]:
    """MACs saved by removing one more channel, per site."""
    saved = {k: 0 for k in self.widths}
    for l in self.layers:
      if l.kind == "bn":
        continue
      cin = self._alive_n(alive, l.in_site, 0) * l.in_mult if l.in_site is not None else l.cin
      cout = self._alive_n(alive, l.out_site, l.cout)
      if l.out_site is not None:
        saved[l.out_site] += l.uses * l.ksize * cin
      if l.in_site is not None:
        saved[l.in_site] += l.uses * l.ksize * l.in_mult * cout
    return saved


def count_structure(model: nnx.Module, input_shape: Sequence[int] | None = None) -> dict:
  """MACs and parameters of a (possibly sliced) model, measured on it.

  Uses :func:`experiments.flops.dense_macs` and
  :func:`experiments.models.param_counts`.
  """
  plan_shape = plan_for(model, input_shape).input_shape
  return {
    "macs": int(flops_lib.dense_macs(model, (1,) + plan_shape)),
    "params": int(param_counts(model)["total"]),
  }
