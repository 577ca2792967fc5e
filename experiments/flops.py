"""FLOPs cost trees for Flax NNX models (for :mod:`optax_gsm.budget`).

The cost of a kernel entry is the number of multiply-accumulates (MACs) it
takes part in for one example: ``H_out * W_out`` for an entry of a 2-D
convolution kernel (``prod(spatial output dims)`` in general, whatever the
stride, padding, dilation or feature groups), and 1 for a dense kernel
applied to a feature vector. Biases and other parameters cost 0 and are not
eligible.

The output shapes come from tracing the forward pass abstractly
(:func:`jax.eval_shape`, no arithmetic) on a copy of the model, with
``nnx.Conv.__call__`` and ``nnx.Linear.__call__`` intercepted to record each
layer's output shape. For a layer whose output has shape
``(batch, *positions, features)``, each kernel entry is used
``prod(positions)`` times per example; a layer called several times (weight
sharing) sums its calls.

The model may be abstract, ``nnx.eval_shape(lambda: Model(rngs=...))``: no
weights are allocated or initialised, so this is cheap for any model size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from optax_gsm import budget as budget_lib
from optax_gsm import eligibility

PyTree = Any

# Layers whose kernel entries are each used prod(output positions) times.
INTERCEPTED = (nnx.Conv, nnx.Linear)


@contextlib.contextmanager
def _record_outputs(paths: dict[int, tuple], records: dict[tuple, list]):
  """Patches ``__call__`` of :data:`INTERCEPTED` to record output shapes."""
  originals = {cls: cls.__dict__["__call__"] for cls in INTERCEPTED}

  def wrap(original):
    def __call__(self, *args, **kwargs):
      out = original(self, *args, **kwargs)
      path = paths.get(id(self))
      if path is not None:
        records.setdefault(path, []).append(tuple(out.shape))
      return out

    return __call__

  try:
    for cls, original in originals.items():
      cls.__call__ = wrap(original)
    yield
  finally:
    for cls, original in originals.items():
      cls.__call__ = original


def kernel_uses(
  model: nnx.Module, input_shape: Sequence[int], *, dtype: Any = jnp.float32
) -> dict[tuple, int]:
  """How many times each entry of each Conv/Linear kernel is used per example.

  Args:
    model: a Flax NNX model; it is not modified (the trace runs on a copy).
    input_shape: the input shape, batch first, e.g. ``(1, 32, 32, 3)``.
    dtype: the input dtype.

  Returns:
    ``{module path: uses}``, the path as in ``nnx.iter_graph`` (a tuple of
    attribute names and indices).
  """
  input_shape = tuple(int(d) for d in input_shape)
  if not input_shape or input_shape[0] < 1:
    raise ValueError(f"`input_shape` must start with a batch size >= 1, got {input_shape!r}.")
  graphdef, state = nnx.split(model)
  paths: dict[int, tuple] = {}
  records: dict[tuple, list] = {}

  def forward(state, x):
    m = nnx.merge(graphdef, state)
    paths.clear()
    for path, node in nnx.iter_graph(m):
      if isinstance(node, INTERCEPTED):
        paths[id(node)] = tuple(path)
    return m(x)

  with _record_outputs(paths, records):
    jax.eval_shape(forward, state, jax.ShapeDtypeStruct(input_shape, dtype))
  batch = input_shape[0]
  uses = {}
  for path, shapes in records.items():
    total = 0
    for shape in shapes:
      if len(shape) < 2 or shape[0] != batch:
        raise ValueError(
          f"layer {path} returned shape {shape}; expected (batch={batch}, ..., features)."
        )
      total += int(np.prod(shape[1:-1], dtype=np.int64))
    uses[path] = total
  return uses


def flops_cost_tree(
  model: nnx.Module,
  input_shape: Sequence[int],
  *,
  dtype: Any = jnp.float32,
  where: eligibility.Where = None,
  default_cost: Optional[int] = None,
) -> PyTree:
  """Per-weight MAC costs shaped like ``nnx.state(model, nnx.Param)``.

  Args:
    model: a Flax NNX model.
    input_shape: the input shape, batch first (costs are per example).
    dtype: the input dtype.
    where: the eligible leaves of ``nnx.state(model, nnx.Param)``; default:
      floating-point leaves with ``ndim >= 2``.
    default_cost: the cost of an eligible leaf that is not the kernel of a
      traced ``nnx.Conv`` / ``nnx.Linear`` call; None raises instead.

  Returns:
    A pytree of int32 numpy arrays with the structure of
    ``nnx.state(model, nnx.Param)``: each eligible kernel entry's MACs, 0 on
    the other leaves. ``optax_gsm.budget.total_cost(costs)`` is the dense
    model's MAC count over the eligible kernels.

  Raises:
    ValueError: if an eligible leaf is not a traced kernel and
      ``default_cost`` is None, or a kernel is never used by the forward pass.
  """
  params = nnx.state(model, nnx.Param)
  uses = kernel_uses(model, input_shape, dtype=dtype)
  missing = []

  def per_entry(keystr: str, leaf, path) -> int:
    keys = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)
    if keys and keys[-1] == "value":  # the Variable's own level
      keys = keys[:-1]
    if keys and keys[-1] == "kernel" and keys[:-1] in uses:
      value = uses[keys[:-1]]
      if value < 1:
        raise ValueError(
          f"kernel {keystr} is used {value} times per example "
          "by the traced forward pass; its cost must be >= 1."
        )
      return value
    if default_cost is None:
      missing.append(keystr)
      return 1
    return default_cost

  path_of = {jax.tree_util.keystr(p): p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  costs = budget_lib.cost_tree(
    params, lambda keystr, leaf: per_entry(keystr, leaf, path_of[keystr]), where=where
  )
  if missing:
    raise ValueError(
      f"No FLOPs rule for the eligible leaves {missing}: they are not the "
      "kernel of an nnx.Conv or nnx.Linear called by the forward pass. Pass "
      "`default_cost` or a `where` that excludes them."
    )
  return costs


# The name the issue uses.
conv_flops_costs = flops_cost_tree


def dense_macs(model: nnx.Module, input_shape: Sequence[int], **kwargs) -> int:
  """MACs of the eligible kernels of the dense model, per example.

  Example:
    >>> from flax import nnx
    >>> from experiments.models.lenet import LeNet5
    >>> dense_macs(LeNet5(rngs=nnx.Rngs(0)), (1, 28, 28, 1))
    2293000
  """
  return budget_lib.total_cost(flops_cost_tree(model, input_shape, **kwargs))
