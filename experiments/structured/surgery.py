"""Channel surgery: a physically smaller copy of a model without the dead channels.

:func:`remove_channels` returns a model of the same class with fewer channels:
slices of the producing layers' output axis, of the BatchNorm parameters and
statistics, and of the consuming layers' input axis (through a flatten for
LeNet-5's ``fc1``). Its outputs equal those of the gated model
(:class:`~experiments.structured.gating.GatedModel` with gates 0 on the removed
channels), and its MACs and parameters those that
:class:`~experiments.structured.counting.StructureCounter` predicts.

Example:
  >>> import numpy as np
  >>> from flax import nnx
  >>> from experiments.models.lenet import LeNet5
  >>> model = LeNet5(rngs=nnx.Rngs(0))
  >>> alive = {"conv1": np.arange(20) < 5, "conv2": np.arange(50) < 10,
  ...          "fc1": np.arange(500) < 100}
  >>> slim = remove_channels(model, alive)
  >>> slim.conv2.kernel.shape, slim.fc1.kernel.shape
  ((5, 5, 5, 10), (160, 100))
  >>> alive_widths(alive)
  {'conv1': 5, 'conv2': 10, 'fc1': 100}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from experiments.models.vgg import VGGCifar
from experiments.structured.plans import Plan, module_at, plan_for, site_widths


def _get_np(module: Any, name: str) -> np.ndarray:
  # Slicing on the host: an eager jnp gather would compile once per shape.
  return np.asarray(getattr(module, name)[...])


def _set(module: Any, name: str, value: Any) -> None:
  old = getattr(module, name)
  # device_put, not jnp.asarray: the latter compiles a copy per shape.
  setattr(module, name, type(old)(jax.device_put(np.asarray(value))))


def _slice_out(module: Any, idx: np.ndarray) -> None:
  k = len(idx)
  if isinstance(module, nnx.BatchNorm):
    for name in ("scale", "bias", "mean", "var"):
      if getattr(module, name, None) is not None:
        _set(module, name, _get_np(module, name)[idx])
    module.num_features = k
    return
  _set(module, "kernel", _get_np(module, "kernel")[..., idx])
  if module.bias is not None:
    _set(module, "bias", _get_np(module, "bias")[idx])
  module.out_features = k
  if isinstance(module, nnx.Conv):
    module.kernel_shape = tuple(module.kernel[...].shape)


def _slice_in(module: Any, idx: np.ndarray, spatial: int) -> None:
  kernel = _get_np(module, "kernel")
  if isinstance(module, nnx.Conv):
    if module.feature_group_count != 1:
      raise ValueError("grouped convolutions cannot be sliced on their input.")
    _set(module, "kernel", kernel[..., idx, :])
    module.in_features = len(idx)
    module.kernel_shape = tuple(module.kernel[...].shape)
    return
  cin, cout = kernel.shape
  channels = cin // spatial
  if channels * spatial != cin:
    raise ValueError(f"dense input of {cin} is not {spatial} positions x C.")
  new = kernel.reshape(spatial, channels, cout)[:, idx, :]
  _set(module, "kernel", new.reshape(spatial * len(idx), cout))
  module.in_features = spatial * len(idx)


def remove_channels(
  model: nnx.Module, alive: Mapping[str, Any], plan: Plan | None = None
) -> nnx.Module:
  """A physically smaller copy of ``model`` without the dead channels.

  Args:
    model: the full model (with the values to keep; gates are not applied:
      a channel with ``alive`` False is dropped, whatever its weights).
    alive: site name -> bool ``(C,)``; every site keeps at least one.
    plan: the model's plan (default :func:`plan_for`).

  Returns:
    A new model of the same class (``model`` is unchanged) whose outputs
    equal those of ``model`` gated by ``alive``.
  """
  plan = plan or plan_for(model)
  widths = site_widths(model, plan)
  new = nnx.clone(model)
  for s in plan.sites:
    a = np.asarray(alive[s.name], bool)
    if a.shape != (widths[s.name],):
      raise ValueError(f"alive[{s.name!r}] must have shape ({widths[s.name]},), got {a.shape}.")
    if not a.any():
      raise ValueError(f"site {s.name!r} would lose every channel.")
    idx = np.flatnonzero(a)
    for p in s.producers:
      _slice_out(module_at(new, p), idx)
    for p, spatial in s.consumers:
      _slice_in(module_at(new, p), idx, spatial)
  if isinstance(new, VGGCifar):
    widths_iter = iter(int(np.sum(alive[s.name])) for s in plan.sites)
    new.layout = tuple(item if item == "M" else next(widths_iter) for item in new.layout)
  return new


def alive_widths(alive: Mapping[str, Any]) -> dict[str, int]:
  """Site -> number of alive channels."""
  return {k: int(np.sum(v)) for k, v in alive.items()}
