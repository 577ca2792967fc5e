r"""Lottery tickets (Frankle and Carbin, ICLR 2019) and GSM tickets.

"The Lottery Ticket Hypothesis": a dense network, trained and pruned, contains
a sparse subnetwork that, reset to its *original initial* weights
:math:`W_0` and trained alone, matches the dense accuracy. Iterative
magnitude pruning (IMP) finds it:

1. train from :math:`W_0`, getting :math:`W_T`;
2. keep the largest :math:`|W_T|` among the surviving weights, going from
   :math:`Q_{r-1}` to :math:`Q_r` kept weights (:func:`imp_masks`);
3. rewind: :math:`W \leftarrow M_r \odot W_0` (:func:`rewind`); repeat from 1
   with the mask fixed (:func:`optax_gsm.baselines.masking.masked_updates`).

The counts :math:`Q_r` decrease geometrically to the target
(:func:`ticket_schedule`). Pruning here is global over the eligible leaves
(as in Frankle et al.'s later work for deeper networks; the 2019 paper prunes
LeNet per layer at a fixed rate).

A **GSM ticket** takes the mask that GSM training ends with (its global
top-Q magnitude cut), applies it to :math:`W_0` with :func:`rewind`, and
retrains with the mask fixed: the same two calls, with the mask from GSM
instead of from IMP.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optax_gsm import eligibility
from optax_gsm.baselines import masking

PyTree = Any


def rewind(init_params: PyTree, masks: PyTree) -> PyTree:
  r"""The ticket's starting point :math:`M \odot W_0`.

  Args:
    init_params: the initial weights :math:`W_0` (before any training).
    masks: bool arrays matching ``init_params`` (True keeps a weight).

  Returns:
    A pytree like ``init_params``.

  Example:
    >>> import jax.numpy as jnp
    >>> w0 = {'w': jnp.array([0.3, -0.1, 0.2])}
    >>> rewind(w0, {'w': jnp.array([False, True, True])})['w'].tolist()
    [0.0, -0.1, 0.2]

  References:
    J. Frankle, M. Carbin. The Lottery Ticket Hypothesis: Finding Sparse,
    Trainable Neural Networks. ICLR 2019. https://arxiv.org/abs/1803.03635
  """
  return masking.apply_masks(init_params, masks)


def ticket_schedule(num_eligible: int, num_nonzero: int, rounds: int) -> list[int]:
  r"""Kept counts :math:`Q_r = \mathrm{round}(N (Q/N)^{r/R})`, :math:`r = 1..R`.

  Each round removes the same fraction of the surviving weights,
  :math:`1 - (Q/N)^{1/R}`; the last count is exactly Q.

  Args:
    num_eligible: N.
    num_nonzero: the final Q, ``1 <= Q <= N``.
    rounds: R >= 1.

  Returns:
    ``[Q_1, ..., Q_R]``, non-increasing, ending with Q.

  Example:
    >>> ticket_schedule(1000, 10, 2)
    [100, 10]

  References:
    J. Frankle, M. Carbin. The Lottery Ticket Hypothesis: Finding Sparse,
    Trainable Neural Networks. ICLR 2019. https://arxiv.org/abs/1803.03635
  """
  for name, v in (("num_eligible", num_eligible), ("num_nonzero", num_nonzero), ("rounds", rounds)):
    if isinstance(v, bool) or not isinstance(v, int):
      raise TypeError(f"`{name}` must be an int, got {v!r}.")
  if rounds < 1:
    raise ValueError(f"`rounds` must be >= 1, got {rounds}.")
  if not 1 <= num_nonzero <= num_eligible:
    raise ValueError(
      f"`num_nonzero` must be in [1, num_eligible={num_eligible}], got {num_nonzero}."
    )
  ratio = num_nonzero / num_eligible
  out = [int(round(num_eligible * ratio ** (r / rounds))) for r in range(1, rounds)]
  out.append(num_nonzero)
  # Rounding can never make a later round keep more than an earlier one.
  for i in range(1, len(out)):
    out[i] = min(out[i], out[i - 1])
  return out


def imp_masks(
  params: PyTree, masks: PyTree, num_nonzero: int, *, where: eligibility.Where = None
) -> PyTree:
  """One IMP pruning step: the ``num_nonzero`` largest :math:`|w|` among survivors.

  Args:
    params: the trained weights :math:`W_T`.
    masks: the current masks (True = surviving), matching ``params``.
    num_nonzero: how many eligible weights to keep; at most the number that
      survive now.
    where: eligible leaves (see :func:`optax_gsm.global_top_q`).

  Returns:
    New masks (a subset of ``masks`` with exactly ``num_nonzero`` True over
    the eligible leaves; all True elsewhere), shaped like ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> w = {'w': jnp.array([[5.0, -4.0], [3.0, 0.5]])}
    >>> m = {'w': jnp.array([[False, True], [True, True]])}
    >>> imp_masks(w, m, 2)['w'].tolist()      # 5.0 was already pruned
    [[False, True], [True, False]]

  References:
    J. Frankle, M. Carbin. The Lottery Ticket Hypothesis: Finding Sparse,
    Trainable Neural Networks. ICLR 2019. https://arxiv.org/abs/1803.03635
  """
  leaves, treedef = jax.tree.flatten(params)
  ms = masking.mask_leaves(masks, params)
  flags = eligibility.resolve_where(where, params)
  idx = [i for i, f in enumerate(flags) if f]
  alive = sum(int(jnp.sum(ms[i])) for i in idx)
  if isinstance(num_nonzero, bool) or not isinstance(num_nonzero, int):
    raise TypeError(f"`num_nonzero` must be an int, got {num_nonzero!r}.")
  if not 1 <= num_nonzero <= alive:
    raise ValueError(
      f"`num_nonzero` must be in [1, {alive}] (the eligible weights that "
      f"survive so far), got {num_nonzero}."
    )
  # Pruned entries score -1, below every magnitude, so they stay pruned.
  sel = masking.top_q_masks(
    [jnp.where(ms[i], jnp.abs(jnp.asarray(leaves[i], jnp.float32)), -1.0) for i in idx], num_nonzero
  )
  out = [jnp.ones(jnp.shape(l), bool) for l in leaves]
  for i, m in zip(idx, sel):
    out[i] = m & ms[i]
  return jax.tree.unflatten(treedef, out)
