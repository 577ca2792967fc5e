r"""AutoPrune (Xiao, Wang and Rajasekaran, NeurIPS 2019) as optax pieces.

The network uses :math:`W \odot h(M)` in place of :math:`W`
(:func:`apply_autoprune_masks`, built on :func:`~optax_gsm.structured.masked_weight`),
and the auxiliary parameters :math:`M` minimise

.. math::  L(W \odot h(M)) + \lambda \, R(M)

with the straight-through, sign-decoupled gradient of the loss and one of
these regularisers:

============== ============================== ===============================
``regularizer`` :math:`R`                      gradient used
============== ============================== ===============================
``"gate_l1"``  :math:`\sum h(m)` (kept count)  :math:`\tilde h'(m)` (the STE)
``"l1"``       :math:`\sum |m|`                :math:`\operatorname{sign}(m)`
``"l2"``       :math:`\frac12 \sum m^2`        :math:`m`
============== ============================== ===============================

``"gate_l1"`` (the default) penalises the number of kept weights through the
same surrogate slope as the loss; with the Softplus STE the pressure fades as
:math:`m` goes below 0, which lets useful weights climb back. :math:`W` is
trained with any optax optimiser on :math:`\partial L / \partial W = G \odot
h(M)`, so a pruned weight keeps its value (recoverable pruning).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optax_gsm import _checks
from optax_gsm.structured import ste as ste_lib

PyTree = Any
ScalarOrSchedule = Union[float, int, jax.Array, Callable[[Any], Any]]

#: The regularizers of the masks (``regularizer=``).
REGULARIZERS = ("gate_l1", "l1", "l2")


def mask_regularizer_grad(
  m: jax.Array,
  regularizer: str = "gate_l1",
  *,
  ste: str = "softplus",
  alpha: float = ste_lib.DEFAULT_ALPHA,
) -> jax.Array:
  r"""The gradient :math:`\partial R / \partial m` used for the masks.

  Args:
    m: auxiliary parameters.
    regularizer: ``"gate_l1"`` (:math:`\tilde h'(m)`), ``"l1"``
      (:math:`\operatorname{sign}(m)`) or ``"l2"`` (:math:`m`).
    ste: the surrogate of ``"gate_l1"`` (see
      :func:`~optax_gsm.structured.ste_derivative`).
    alpha: the LeakyReLU slope.

  Returns:
    An array shaped like ``m``.

  Example:
    >>> import jax.numpy as jnp
    >>> m = jnp.array([-1.0, 2.0])
    >>> mask_regularizer_grad(m, "gate_l1", ste="leaky_relu", alpha=0.5).tolist()
    [0.5, 1.0]
    >>> mask_regularizer_grad(m, "l1").tolist(), mask_regularizer_grad(m, "l2").tolist()
    ([-1.0, 1.0], [-1.0, 2.0])
  """
  _checks.check_choice("regularizer", regularizer, REGULARIZERS)
  m = jnp.asarray(m)
  if regularizer == "gate_l1":
    return ste_lib.ste_derivative(m, ste, alpha=alpha)
  if regularizer == "l1":
    return jnp.sign(m)
  return m


class AutoPruneRegularizerState(NamedTuple):
  """State of :func:`autoprune_regularizer`: the update count (int32)."""

  count: jax.Array


def autoprune_regularizer(
  strength: ScalarOrSchedule,
  *,
  regularizer: str = "gate_l1",
  ste: str = "softplus",
  alpha: float = ste_lib.DEFAULT_ALPHA,
) -> optax.GradientTransformationExtraArgs:
  r"""Adds :math:`\lambda \, \partial R / \partial M` to the mask gradients.

  .. math::  u = g + \lambda \, \partial R(M) / \partial M

  Apply it to the tree of auxiliary parameters :math:`M` only (for example
  with ``optax.partition`` when they live next to the weights), before the
  optimiser, e.g. ``optax.chain(autoprune_regularizer(1e-4), optax.sgd(0.1))``.

  Args:
    strength: :math:`\lambda \ge 0`, a number or an optax schedule.
    regularizer: ``"gate_l1"``, ``"l1"`` or ``"l2"`` (see the module
      docstring).
    ste: the surrogate slope of ``"gate_l1"``.
    alpha: the LeakyReLU slope.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``params`` (the masks).

  Example:
    >>> import jax.numpy as jnp
    >>> tx = autoprune_regularizer(0.5, regularizer="l2")
    >>> m = {'fc': jnp.array([2.0, -4.0])}
    >>> g = {'fc': jnp.array([1.0, 1.0])}
    >>> u, _ = tx.update(g, tx.init(m), m)
    >>> u['fc'].tolist()
    [2.0, -1.0]

  References:
    X. Xiao, Z. Wang, S. Rajasekaran. AutoPrune: Automatic Network Pruning
    by Regularizing Auxiliary Parameters. NeurIPS 2019.
    https://proceedings.neurips.cc/paper/2019/hash/4efc9e02abdab6b6166251918570a307-Abstract.html
  """
  _checks.check_choice("regularizer", regularizer, REGULARIZERS)
  _checks.check_choice("ste", ste, ste_lib.STE_KINDS)
  _checks.check_range("strength", strength, 0.0, math.inf, allow_schedule=True)
  ste_lib.ste_derivative(jnp.zeros(()), ste, alpha=alpha)  # validates alpha

  def init_fn(params):
    del params
    return AutoPruneRegularizerState(count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
        "autoprune_regularizer needs `params` (the masks M) in update(updates, state, params)."
      )
    lam = _checks.resolve_schedule(strength, state.count)

    def add(g, m):
      if g is None:
        return None
      reg = mask_regularizer_grad(m, regularizer, ste=ste, alpha=alpha)
      return (g + jnp.asarray(lam, g.dtype) * reg.astype(g.dtype)).astype(g.dtype)

    new = jax.tree.map(add, updates, params, is_leaf=lambda x: x is None)
    return new, AutoPruneRegularizerState(count=_checks.increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def autoprune_masks(
  learning_rate: ScalarOrSchedule,
  *,
  strength: ScalarOrSchedule,
  regularizer: str = "gate_l1",
  ste: str = "softplus",
  alpha: float = ste_lib.DEFAULT_ALPHA,
  momentum: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The optimiser of the masks: regulariser then (momentum) SGD.

  .. math::  M \leftarrow M - \eta \left(\widehat{\partial L / \partial M}
             + \lambda \, \partial R / \partial M\right)

  Args:
    learning_rate: :math:`\eta`, a number or a schedule.
    strength: :math:`\lambda`, see :func:`autoprune_regularizer`.
    regularizer: see :func:`autoprune_regularizer`.
    ste: see :func:`autoprune_regularizer`.
    alpha: see :func:`autoprune_regularizer`.
    momentum: optional SGD momentum.

  Returns:
    An optax transformation for the mask tree (``update`` needs ``params``).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> tx = autoprune_masks(1.0, strength=0.5, regularizer="l1")
    >>> m = jnp.array([0.25, -1.0])
    >>> u, _ = tx.update(jnp.zeros(2), tx.init(m), m)
    >>> optax.apply_updates(m, u).tolist()
    [-0.25, -0.5]

  References:
    X. Xiao, Z. Wang, S. Rajasekaran. AutoPrune: Automatic Network Pruning
    by Regularizing Auxiliary Parameters. NeurIPS 2019.
    https://proceedings.neurips.cc/paper/2019/hash/4efc9e02abdab6b6166251918570a307-Abstract.html
  """
  return optax.chain(
    autoprune_regularizer(strength, regularizer=regularizer, ste=ste, alpha=alpha),
    optax.sgd(learning_rate, momentum=momentum),
  )


def init_masks(
  params: PyTree,
  value: float = 1.0,
  *,
  where: Optional[Callable[[PyTree], PyTree]] = None,
  scale_by_magnitude: bool = False,
) -> PyTree:
  r"""Auxiliary parameters shaped like the eligible leaves.

  By default every :math:`m` starts at ``value``. With
  ``scale_by_magnitude``, :math:`m_0 = \text{value} \cdot |w| /
  \overline{|w|}` (the mean over the leaf), so that under the uniform
  regulariser pressure the small weights close first; the updates of
  :math:`m` still do not depend on :math:`|w|`. (An option for short
  budgets; the paper's masks start uniform.)

  Args:
    params: the weights.
    value: the initial :math:`m` (> 0 keeps every weight at first).
    where: the leaves to mask (a callable ``params -> pytree of bools``);
      default: floating-point leaves with ``ndim >= 2`` (kernels).
    scale_by_magnitude: see above.

  Returns:
    A pytree shaped like ``params`` with float32 masks on the chosen leaves
    and None elsewhere (the input of :func:`apply_autoprune_masks`).

  Example:
    >>> import jax.numpy as jnp
    >>> masks = init_masks({'w': jnp.ones((2, 2)), 'b': jnp.ones(2)})
    >>> masks['b'] is None, masks['w'].tolist()
    (True, [[1.0, 1.0], [1.0, 1.0]])
    >>> init_masks({'w': jnp.array([1.0, -3.0])}, 0.5,
    ...            where=lambda p: {'w': True},
    ...            scale_by_magnitude=True)['w'].tolist()
    [0.25, 0.75]
  """
  from optax_gsm import eligibility  # pylint: disable=import-outside-toplevel

  flags = (where or eligibility.default_where)(params)

  def init(p, f):
    if not f:
      return None
    if not scale_by_magnitude:
      return jnp.full(jnp.shape(p), value, jnp.float32)
    a = jnp.abs(jnp.asarray(p, jnp.float32))
    mean = jnp.mean(a)
    return value * a / jnp.where(mean > 0, mean, 1.0)

  return jax.tree.map(init, params, flags)


def apply_autoprune_masks(
  params: PyTree,
  masks: PyTree,
  *,
  ste: str = "softplus",
  alpha: float = ste_lib.DEFAULT_ALPHA,
  decouple: bool = True,
) -> PyTree:
  r"""The weights the network uses: :math:`W \odot h(M)` leaf by leaf.

  Args:
    params: the weights.
    masks: a pytree like ``params`` with None on unmasked leaves and, on
      masked ones, :math:`M` shaped like the leaf or like its last axis (see
      :func:`~optax_gsm.structured.masked_weight`).
    ste: the surrogate slope of the backward pass.
    alpha: the LeakyReLU slope.
    decouple: AutoPrune's :math:`\operatorname{sign}(W)` chain rule.

  Returns:
    ``params`` with the masked leaves gated (differentiable in both trees).

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'w': jnp.array([[1., 2.], [3., 4.]]), 'b': jnp.ones(2)}
    >>> masks = {'w': jnp.array([[1., -1.], [-1., 1.]]), 'b': None}
    >>> apply_autoprune_masks(params, masks)['w'].tolist()
    [[1.0, 0.0], [0.0, 4.0]]
  """

  def gate(m, w):
    if m is None:
      return w
    return ste_lib.masked_weight(w, m, ste, alpha=alpha, decouple=decouple)

  return jax.tree.map(gate, masks, params, is_leaf=lambda x: x is None)
