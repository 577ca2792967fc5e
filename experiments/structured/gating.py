r"""Gated forward passes: channel gates on the unmodified zoo models.

A gate multiplies the output of a layer's last linear or normalisation op
(``conv1``/``conv2``/``fc1`` of LeNet-5, the BatchNorm of each VGG block,
``bn1`` of each ResNet basic block), before its ReLU. A gate of 0 therefore
makes the next layer see exact zeros, the same as removing the channel, and a
gate of 1 gives :math:`\gamma \partial L/\partial\gamma = \sum_m z \, \partial
L/\partial z = \sum_m a \, \partial L/\partial a` for the post-ReLU map
:math:`a = \mathrm{relu}(z)` (they differ only where :math:`z \le 0`, where
:math:`a = 0`).

How gates get in.  The model classes are not edited and no class is patched:
:func:`gates_on` swaps, on one model *instance*, each gated sub-module for a
small :class:`GatePoint` module that calls it and multiplies its output by the
gate (``optax_gsm.structured.apply_gate``), and swaps the originals back when
the block ends. The swap touches only that instance's attributes, so other
models, other threads and the classes themselves never see it; :class:`GatedModel`
applies it to a copy merged inside each traced call. Flax NNX has no
method interception (``intercept_methods`` is Linen-only, checked on flax
0.12), hence the swap. Outputs are those of the plain forward pass followed by
the same multiplication, so they are bitwise the ones of a model with the
multiplication written into its ``__call__``.

Per-example gate gradients come from one backward pass with gates of shape
``(N, C)``. For models without BatchNorm in training mode this equals the
per-example gradient of each example's own loss (:func:`per_example_gate_grads`
checks it against ``jax.vmap``); with BatchNorm in training mode it is the
gradient of the batch loss with respect to each example's map, which is what
hooks on activations compute in the reference implementations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from optax_gsm import structured as st
from experiments.structured.plans import Plan, module_at, plan_for, site_widths
from experiments.training import cross_entropy_loss

PyTree = Any


class GatePoint(nnx.Module):
  """Stands in for a gated sub-module during one call: ``gate * inner(x)``.

  Args:
    inner: the sub-module it replaces (called with the same arguments).
    gate: ``(C,)`` or ``(N, C)``, or None to leave the output as it is.
    record: called with the output shape at every call.
  """

  def __init__(self, inner: nnx.Module, gate: Any, record: Callable[[tuple[int, ...]], None]):
    self.inner = inner
    self.gate = gate
    self.record = record

  def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
    out = self.inner(*args, **kwargs)
    self.record(tuple(out.shape))
    return out if self.gate is None else st.apply_gate(out, self.gate)


def _child(parent: Any, key: Any) -> Any:
  return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set_child(parent: Any, key: Any, value: Any) -> None:
  if isinstance(key, int):
    parent[key] = value
  else:
    setattr(parent, key, value)


@contextlib.contextmanager
def gates_on(
  model: nnx.Module, plan: Plan, gates: Mapping[str, Any] | None
) -> Iterator[dict[str, tuple]]:
  """Multiplies the gated modules' outputs by ``gates`` inside the block.

  Each site's module is replaced on ``model`` (this instance only) by a
  :class:`GatePoint` for the duration of the block and put back afterwards,
  also when the block raises. NNX only lets a module be changed at the trace
  level it was created at, so ``model`` should be merged inside the traced
  function that calls it, as :meth:`GatedModel.apply` does.

  Args:
    model: the (merged) model that will be called.
    plan: its structure plan.
    gates: site name -> gate ``(C,)`` or ``(N, C)``; missing sites are not
      gated (their output shapes are still recorded).

  Yields:
    A dict filled, as the model is called, with site name -> output shape.

  Example:
    >>> from experiments.models.lenet import LeNet5
    >>> model = LeNet5(rngs=nnx.Rngs(0))
    >>> plan = plan_for(model)
    >>> x = jnp.ones((2, 28, 28, 1))
    >>> off = {"fc1": jnp.zeros(500)}     # every fc1 neuron off
    >>> with gates_on(model, plan, off) as shapes:
    ...   logits = model(x)
    >>> shapes["conv2"], bool(jnp.allclose(logits, model.fc2.bias[...]))
    ((2, 8, 8, 50), True)
    >>> type(model.fc1).__name__          # the model is back as it was
    'Linear'
  """
  shapes: dict[str, tuple] = {}
  swapped: list[tuple[Any, Any, nnx.Module]] = []
  try:
    for s in plan.sites:
      parent = module_at(model, s.gate_module[:-1])
      key = s.gate_module[-1]
      inner = _child(parent, key)
      gate = None if gates is None else gates.get(s.name)
      record = lambda shape, name=s.name: shapes.__setitem__(name, shape)
      _set_child(parent, key, GatePoint(inner, gate, record))
      swapped.append((parent, key, inner))
    yield shapes
  finally:
    for parent, key, inner in reversed(swapped):
      _set_child(parent, key, inner)


def gate_vectors(alive: Mapping[str, Any]) -> dict:
  """Site -> float32 gate ``(C,)`` on the device: 1 alive, 0 removed."""
  return {k: jax.device_put(np.asarray(v, np.float32)) for k, v in alive.items()}


class GatedModel:
  """A pure-function view of an NNX model with channel gates.

  ``params`` are a nested dict (``nnx.to_pure_dict`` of the ``nnx.Param``
  state; optax-ready), ``rest`` the other state (BatchNorm statistics).

  Args:
    model: a model supported by :func:`plan_for`; it is left in train mode.
    plan: its plan (default :func:`plan_for`).

  Example:
    >>> from experiments.models.lenet import LeNet5
    >>> gm = GatedModel(LeNet5(rngs=nnx.Rngs(0)))
    >>> gm.widths, gm.spatial
    ({'conv1': 20, 'conv2': 50, 'fc1': 500}, {'conv1': 576, 'conv2': 64, 'fc1': 1})
    >>> logits, rest = gm.apply(gm.params, gm.rest, jnp.ones((2, 28, 28, 1)),
    ...                         {"conv1": jnp.zeros(20)}, train=False)
    >>> logits.shape
    (2, 10)
  """

  def __init__(self, model: nnx.Module, plan: Plan | None = None):
    self.plan = plan or plan_for(model)
    model.eval()
    self._eval_def = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    self._train_def, params, self.rest = nnx.split(model, nnx.Param, ...)
    self._template = params
    self.params = nnx.to_pure_dict(params)
    self.widths = site_widths(model, self.plan)
    self.has_batch_stats = bool(jax.tree.leaves(self.rest))
    x = jax.ShapeDtypeStruct((1,) + self.plan.input_shape, jnp.float32)
    shapes = {}

    def trace(params, rest, x):
      m = self._merge(params, rest, train=False)
      with gates_on(m, self.plan, None) as recorded:
        out = m(x)
      shapes.update(recorded)
      return out

    jax.eval_shape(trace, self.params, self.rest, x)
    # M of Molchanov et al. (2017): positions per map of each site.
    self.spatial = {k: int(np.prod(v[1:-1], dtype=np.int64)) for k, v in shapes.items()}

  def _merge(self, params: PyTree, rest: Any, *, train: bool) -> nnx.Module:
    state = jax.tree.map(lambda x: x, self._template)
    nnx.replace_by_pure_dict(state, params)
    # Fresh Variables at the current trace level: BatchNorm mutates its
    # statistics, which NNX forbids on Variables made at an outer level
    # (e.g. ``rest`` passed into a jit and used inside a grad).
    rest = jax.tree.map(lambda x: x, rest)
    return nnx.merge(self._train_def if train else self._eval_def, state, rest)

  def apply(
    self,
    params: PyTree,
    rest: Any,
    x: jax.Array,
    gates: Mapping[str, Any] | None = None,
    *,
    train: bool = True,
  ) -> tuple[jax.Array, Any]:
    """``(logits, new rest)`` of the gated model (pure, jit-able)."""
    m = self._merge(params, rest, train=train)
    with gates_on(m, self.plan, gates):
      logits = m(x)
    return logits, nnx.split(m, nnx.Param, ...)[2]

  def to_model(self, params: PyTree | None = None, rest: Any = None) -> nnx.Module:
    """A new NNX model holding ``params`` and ``rest`` (train mode)."""
    params = self.params if params is None else params
    rest = self.rest if rest is None else rest
    return self._merge(params, rest, train=True)


def per_example_gate_grads(
  gm: GatedModel,
  params: PyTree,
  rest: Any,
  x: jax.Array,
  y: jax.Array,
  gate_values: Mapping[str, jax.Array] | None = None,
  *,
  method: str = "batched",
  train: bool = False,
) -> dict:
  r""":math:`\partial L_n / \partial \gamma_{nk}` for each example and map.

  Args:
    gm: the gated model.
    params, rest: its state.
    x, y: a batch.
    gate_values: site -> gate values ``(C,)`` (default: ones).
    method: ``"batched"`` (one backward pass of the summed loss with gates
      ``(N, C)``) or ``"vmap"`` (``jax.vmap`` of the gradient of each
      example's loss; BatchNorm must then be in eval mode).
    train: BatchNorm mode for ``"batched"``.

  Returns:
    Site -> ``(N, C)``.
  """
  if method not in ("batched", "vmap"):
    raise ValueError(f"`method` must be 'batched' or 'vmap', got {method!r}.")
  vals = gate_values or {k: jnp.ones((c,), jnp.float32) for k, c in gm.widths.items()}
  n = x.shape[0]
  if method == "batched":
    gates = {k: jnp.broadcast_to(v, (n,) + v.shape) for k, v in vals.items()}

    def total(gates):
      logits, _ = gm.apply(params, rest, x, gates, train=train)
      return jnp.sum(cross_entropy_loss(logits, y))

    return jax.grad(total)(gates)
  if train and gm.has_batch_stats:
    raise ValueError(
      "method='vmap' needs BatchNorm in eval mode (train=False):"
      " a batch of one has no batch statistics."
    )

  def single(xi, yi):
    def loss(gates):
      logits, _ = gm.apply(params, rest, xi[None], gates, train=False)
      return cross_entropy_loss(logits, yi[None])[0]

    return jax.grad(loss)(dict(vals))

  return jax.vmap(single)(x, y)
