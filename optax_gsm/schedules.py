"""Schedules of the GSM target: start dense, reach the compression gradually."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import optax

from optax_gsm import _checks
from optax_gsm.baselines.magnitude import polynomial_sparsity_schedule


def compression_ramp(
  compression: float,
  transition_steps: int,
  *,
  power: float = 3.0,
  transition_begin: int = 0,
) -> optax.Schedule:
  r"""A ``compression`` schedule for :func:`optax_gsm.gsm` that starts dense.

  The sparsity :math:`s = 1 - 1/C` follows the polynomial schedule of gradual
  pruning (Zhu and Gupta, 2017) from 0 to :math:`s_f = 1 - 1/C_f`,

  .. math::

    s(t) = s_f \left(1 - \left(1 - \frac{\min(\max(t - t_0, 0), T)}{T}\right)^p\right),
    \qquad C(t) = \frac{1}{1 - s(t)},

  with :math:`T` = ``transition_steps``, :math:`t_0` = ``transition_begin`` and
  :math:`p` = ``power``. So :math:`C(t) = 1` (every weight selected: momentum
  SGD) until :math:`t_0`, and :math:`C(t) = C_f` from :math:`t_0 + T` on; in
  between ``gsm`` keeps :math:`Q(t) = \mathrm{round}(N / C(t)) = N/C_f + (N -
  N/C_f)(1 - (t - t_0)/T)^p` weights, rounded. The sparsity is
  :func:`optax_gsm.baselines.polynomial_sparsity_schedule`, the schedule of
  gradual magnitude pruning; no count of the weights is needed.

  Why: starting GSM at the final Q cuts the unselected weights off the loss
  from the first step. Ramping Q down over the first third of the GSM epochs
  (``power=3``) is the recipe of the project's reported rows; on LeNet-300-100
  at 60x it gave 98.23 +- 0.03% after the cut against 97.85 +- 0.10% with a
  constant Q, over 3 seeds (``docs/results/lossless_default.md``).

  Args:
    compression: the final compression ratio :math:`C_f`, a finite number
      >= 1 (1: never prune).
    transition_steps: :math:`T`, the steps over which C goes from 1 to
      :math:`C_f`; an int >= 1.
    power: :math:`p > 0`; 3 is the cubic schedule of gradual pruning (fast
      at first, slow near the end), 1 a linear ramp of the sparsity.
    transition_begin: :math:`t_0`, the steps at C = 1 before the ramp; an
      int >= 0.

  Returns:
    An ``optax.Schedule`` of the compression ratio: pass it as
    ``gsm(..., compression=...)`` or ``global_top_q(..., compression=...)``.

  Raises:
    TypeError: ``transition_steps`` or ``transition_begin`` is not an int.
    ValueError: an argument out of range.

  Example:
    >>> import optax_gsm
    >>> ramp = optax_gsm.compression_ramp(4.0, transition_steps=10)
    >>> [round(float(ramp(t)), 3) for t in (0, 5, 10, 20)]
    [1.0, 2.909, 4.0, 4.0]
    >>> tx = optax_gsm.gsm(0.1, compression=ramp)

  References:
    Zhu and Gupta, `To prune, or not to prune: exploring the efficacy of
    pruning for model compression <https://arxiv.org/abs/1710.01878>`_, 2017.
  """
  c = _checks.concrete(compression)
  if c is None or isinstance(compression, bool) or not math.isfinite(c) or c < 1:
    raise ValueError(
      f"`compression` must be a finite number >= 1 (the final C), got {compression!r}."
    )
  for name, value, lo in (
    ("transition_steps", transition_steps, 1),
    ("transition_begin", transition_begin, 0),
  ):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
      raise TypeError(f"`{name}` must be an int, got {value!r}.")
    if value < lo:
      raise ValueError(f"`{name}` must be >= {lo}, got {value!r}.")
  # The sparsity schedule of gradual magnitude pruning, the same function
  # (it checks `power`).
  sparsity = polynomial_sparsity_schedule(
    0.0,
    1.0 - 1.0 / c,
    begin_step=int(transition_begin),
    end_step=int(transition_begin) + int(transition_steps),
    power=power,
  )

  end = int(transition_begin) + int(transition_steps)

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    count = jnp.asarray(count)
    ramped = 1.0 / (1.0 - jnp.asarray(sparsity(count), jnp.float32))
    # From the end of the ramp on, C itself rather than 1 / (1 - s_f) in
    # float32, which can be a weight or two off N / C on large models.
    return jnp.where(count >= end, jnp.float32(c), ramped)

  return schedule
