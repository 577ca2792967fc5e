r"""Binary masks with straight-through gradient estimates (AutoPrune).

AutoPrune (Xiao, Wang and Rajasekaran, NeurIPS 2019) multiplies each weight
(or each neuron / filter) by a binary gate of an auxiliary parameter
:math:`m`:

.. math::  \tilde w = w \, h(m), \qquad h(m) = \mathbb{1}[m > 0].

:math:`h` has zero derivative almost everywhere, so :math:`m` is trained with
a straight-through estimate (STE) :math:`\tilde h'(m)` taken from a smooth
surrogate of the step:

=============== ========================= ===============================
``ste``         surrogate                 :math:`\tilde h'(m)`
=============== ========================= ===============================
``"softplus"``  :math:`\log(1 + e^m)`     :math:`\sigma(m)`
``"leaky_relu"`` :math:`\max(m, \alpha m)` :math:`1` if :math:`m > 0` else
                                          :math:`\alpha`
``"linear"``    :math:`m`                 :math:`1`
=============== ========================= ===============================

and, the point of the paper's "sensitivity decoupling", the chain rule uses
:math:`\operatorname{sign}(w)` in place of :math:`w`:

.. math::
   \frac{\partial L}{\partial m} :=
   \frac{\partial L}{\partial \tilde w}\,\operatorname{sign}(w)\,\tilde h'(m),
   \qquad
   \frac{\partial L}{\partial w} = \frac{\partial L}{\partial \tilde w}\, h(m),

so the update of :math:`m` does not scale with :math:`|w|` (small weights are
not doomed for being small), while a pruned weight (:math:`h(m) = 0`) gets no
loss gradient and keeps its value: pruning is recoverable when :math:`m`
climbs back above 0.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.core  # jax.core.Tracer (pyright needs the submodule imported)
import jax.numpy as jnp

#: The straight-through estimates of the hard gate's derivative (``ste=``).
STE_KINDS = ("softplus", "leaky_relu", "linear")

# tf.nn.leaky_relu's default slope; the AutoPrune authors' code is TensorFlow.
DEFAULT_ALPHA = 0.2


def _check_ste(ste: Any, alpha: Any) -> float:
  if ste not in STE_KINDS:
    raise ValueError(f"`ste` must be one of {STE_KINDS}, got {ste!r}.")
  if isinstance(alpha, jax.core.Tracer):
    raise TypeError(
      "`alpha` must be a Python number (a static argument of the "
      "straight-through gradient), got a traced value; with "
      "optax.inject_hyperparams pass static_args=('alpha',)."
    )
  try:
    alpha = float(alpha)
  except (TypeError, ValueError):
    raise TypeError(f"`alpha` must be a number, got {alpha!r}.") from None
  if not math.isfinite(alpha) or alpha < 0:
    raise ValueError(
      f"`alpha` (the LeakyReLU slope for m <= 0) must be a finite number >= 0, got {alpha!r}."
    )
  return alpha


def binary_step(m: jax.Array) -> jax.Array:
  """The hard gate :math:`h(m) = 1[m > 0]`, in the dtype of ``m``.

  Args:
    m: auxiliary parameters.

  Returns:
    Zeros and ones shaped like ``m``.

  Example:
    >>> import jax.numpy as jnp
    >>> binary_step(jnp.array([-1.0, 0.0, 0.5])).tolist()
    [0.0, 0.0, 1.0]
  """
  m = jnp.asarray(m)
  return (m > 0).astype(m.dtype)


def ste_derivative(
  m: jax.Array, ste: str = "softplus", *, alpha: float = DEFAULT_ALPHA
) -> jax.Array:
  r"""The straight-through estimate :math:`\tilde h'(m)` of the step's slope.

  Args:
    m: auxiliary parameters.
    ste: ``"softplus"`` (:math:`\sigma(m)`), ``"leaky_relu"`` (1 for
      :math:`m > 0`, else ``alpha``) or ``"linear"`` (1).
    alpha: the LeakyReLU slope for :math:`m \le 0`.

  Returns:
    An array shaped like ``m``.

  Example:
    >>> import jax.numpy as jnp
    >>> m = jnp.array([-2.0, 0.0, 3.0])
    >>> [round(v, 4) for v in ste_derivative(m, "softplus").tolist()]
    [0.1192, 0.5, 0.9526]
    >>> ste_derivative(m, "leaky_relu", alpha=0.1).tolist()
    [0.1, 0.1, 1.0]
    >>> ste_derivative(m, "linear").tolist()
    [1.0, 1.0, 1.0]
  """
  alpha = _check_ste(ste, alpha)
  m = jnp.asarray(m)
  if ste == "softplus":
    return jax.nn.sigmoid(m)
  if ste == "leaky_relu":
    return jnp.where(m > 0, jnp.ones_like(m), jnp.full_like(m, alpha))
  return jnp.ones_like(m)


# --------------------------------------------------------------------------
# The gate alone: forward h(m), backward g * h~'(m).


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _binary_gate(m, ste, alpha):
  return binary_step(m)


def _binary_gate_fwd(m, ste, alpha):
  return binary_step(m), m


def _binary_gate_bwd(ste, alpha, m, g):
  return (g * ste_derivative(m, ste, alpha=alpha),)


_binary_gate.defvjp(_binary_gate_fwd, _binary_gate_bwd)


def binary_gate(m: jax.Array, ste: str = "softplus", *, alpha: float = DEFAULT_ALPHA) -> jax.Array:
  r"""The hard gate :math:`h(m)` with a straight-through gradient.

  Forward :math:`h(m) = 1[m > 0]`; backward
  :math:`\partial L / \partial m = \partial L / \partial h \cdot
  \tilde h'(m)` (see :func:`ste_derivative`). Use :func:`masked_weight` to
  gate weights with AutoPrune's sign-decoupled rule.

  Args:
    m: auxiliary parameters.
    ste: ``"softplus"``, ``"leaky_relu"`` or ``"linear"``.
    alpha: the LeakyReLU slope for :math:`m \le 0`.

  Returns:
    Zeros and ones shaped like ``m``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> m = jnp.array([-1.0, 2.0])
    >>> binary_gate(m).tolist()
    [0.0, 1.0]
    >>> jax.grad(lambda m: jnp.sum(3.0 * binary_gate(m, "linear")))(m).tolist()
    [3.0, 3.0]
  """
  alpha = _check_ste(ste, alpha)
  return _binary_gate(jnp.asarray(m), ste, alpha)


# --------------------------------------------------------------------------
# Gated weights: forward w * h(m), AutoPrune's backward.


def _broadcast_mask(m: jax.Array, ndim: int) -> jax.Array:
  """Reshapes a per-output-channel mask to broadcast along the last axis."""
  return m.reshape((1,) * (ndim - m.ndim) + m.shape)


def _reduce_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums ``x`` over the leading axes that a broadcast mask did not have."""
  lead = x.ndim - len(shape)
  return jnp.sum(x, axis=tuple(range(lead))) if lead else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _masked_weight(w, m, ste, alpha, decouple):
  return w * _broadcast_mask(binary_step(m).astype(w.dtype), w.ndim)


def _masked_weight_fwd(w, m, ste, alpha, decouple):
  return _masked_weight(w, m, ste, alpha, decouple), (w, m)


def _masked_weight_bwd(ste, alpha, decouple, res, g):
  w, m = res
  gate = _broadcast_mask(binary_step(m).astype(g.dtype), w.ndim)
  grad_w = g * gate
  # sign(w) instead of w: the update of m must not depend on |w|.
  factor = jnp.sign(w) if decouple else w
  grad_m = _reduce_to(g * factor, m.shape).astype(m.dtype)
  grad_m = grad_m * ste_derivative(m, ste, alpha=alpha)
  return grad_w, grad_m


_masked_weight.defvjp(_masked_weight_fwd, _masked_weight_bwd)


def masked_weight(
  w: jax.Array,
  m: jax.Array,
  ste: str = "softplus",
  *,
  alpha: float = DEFAULT_ALPHA,
  decouple: bool = True,
) -> jax.Array:
  r"""AutoPrune's gated weight :math:`\tilde w = w \, h(m)`.

  Forward :math:`w \, h(m)` with :math:`h(m) = 1[m > 0]`. Backward, with
  :math:`G = \partial L / \partial \tilde w`:

  .. math::
     \frac{\partial L}{\partial w} = G \, h(m), \qquad
     \frac{\partial L}{\partial m} = \sum_{\text{shared}}
       G \, \operatorname{sign}(w) \; \tilde h'(m)

  where the sum runs over the entries that share one :math:`m` (none when
  ``m`` is shaped like ``w``; the leading axes when ``m`` has one entry per
  output channel, the last axis of ``w``: a neuron or filter mask).

  Args:
    w: weights (any shape).
    m: auxiliary parameters, shaped like ``w`` (unstructured) or like
      ``w.shape[-1:]`` (one per output neuron / filter; it also fits a bias).
    ste: ``"softplus"``, ``"leaky_relu"`` or ``"linear"``: the surrogate
      slope :math:`\tilde h'` (see :func:`ste_derivative`).
    alpha: the LeakyReLU slope for :math:`m \le 0`.
    decouple: use :math:`\operatorname{sign}(w)` in the chain rule (the
      paper); False uses :math:`w` (the ordinary STE chain rule), for
      ablations.

  Returns:
    The gated weights, shaped like ``w``.

  Raises:
    ValueError: if ``m`` is neither shaped like ``w`` nor like its last axis.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> w = jnp.array([[0.5, -2.0], [4.0, 1.0]])
    >>> m = jnp.array([[1.0, -1.0], [1.0, 1.0]])
    >>> masked_weight(w, m).tolist()
    [[0.5, -0.0], [4.0, 1.0]]
    >>> g_w, g_m = jax.grad(lambda w, m: jnp.sum(masked_weight(w, m, "linear")),
    ...                     argnums=(0, 1))(w, m)
    >>> g_w.tolist()   # the pruned weight gets no gradient and keeps its value
    [[1.0, 0.0], [1.0, 1.0]]
    >>> g_m.tolist()   # sign(w) * 1, whatever |w|
    [[1.0, -1.0], [1.0, 1.0]]

  References:
    X. Xiao, Z. Wang, S. Rajasekaran. AutoPrune: Automatic Network Pruning
    by Regularizing Auxiliary Parameters. NeurIPS 2019.
    https://proceedings.neurips.cc/paper/2019/hash/4efc9e02abdab6b6166251918570a307-Abstract.html
  """
  alpha = _check_ste(ste, alpha)
  if not isinstance(decouple, bool):
    raise TypeError(f"`decouple` must be a bool, got {decouple!r}.")
  w = jnp.asarray(w)
  m = jnp.asarray(m)
  if m.shape != w.shape and not (m.ndim == 1 and w.ndim >= 1 and m.shape == w.shape[-1:]):
    raise ValueError(
      f"`m` must be shaped like `w` {w.shape} (one mask per weight) or like "
      f"its last axis {w.shape[-1:]} (one per output channel), got "
      f"{m.shape}."
    )
  return _masked_weight(w, m, ste, alpha, decouple)
