r"""One-shot global saliency pruning by the first-order Taylor score.

The control experiment for GSM: GSM ranks weights by
:math:`T = |\partial L/\partial w \cdot w|` *at every step while training*;
here the same score, accumulated over a few batches of a trained model,
chooses the Q weights to keep **once** (as in Molchanov et al., ICLR 2017,
for filters, and SNIP, Lee et al., ICLR 2019, at initialisation):

.. math::

   S = \sum_{b=1}^{B} \left| g_b \odot w \right| \quad (\texttt{"sum_abs"})
   \qquad\text{or}\qquad
   S = \Big| \Big(\sum_{b=1}^{B} g_b\Big) \odot w \Big| \quad
   (\texttt{"abs_sum"})

with :math:`g_b` the loss gradient of batch :math:`b`. The first is the mean
per-step GSM score; the second the Taylor estimate of the change of the
average loss. The kept set is the exact global top-Q of :math:`S` over all
eligible leaves (ties to the lower global index, as everywhere in
``optax_gsm``). Comparing this (plus retraining with a fixed mask) with GSM
separates what the metric buys from what GSM's training dynamics buy.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from optax_gsm import _checks
from optax_gsm import eligibility
from optax_gsm.baselines import masking

PyTree = Any

MODES = ("sum_abs", "abs_sum")


def init_saliency(params: PyTree) -> PyTree:
  """Zero accumulators shaped like ``params`` (float32).

  Example:
    >>> import jax.numpy as jnp
    >>> init_saliency({'w': jnp.ones((2, 2))})['w'].tolist()
    [[0.0, 0.0], [0.0, 0.0]]
  """
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)


def accumulate_saliency(
  scores: PyTree, grads: PyTree, params: PyTree, *, mode: str = "sum_abs"
) -> PyTree:
  r"""Adds one batch to the saliency: :math:`S \mathrel{+}= |g \odot w|` (or :math:`g \odot w`).

  Pure and jit-able. With ``mode="abs_sum"`` the signed products are summed
  and :func:`saliency_prune` takes the absolute value at the end.

  Args:
    scores: the running sums (from :func:`init_saliency`).
    grads: this batch's gradients, shaped like ``params``.
    params: the weights :math:`w`.
    mode: ``"sum_abs"`` or ``"abs_sum"``.

  Returns:
    The new sums.

  Example:
    >>> import jax.numpy as jnp
    >>> p = {'w': jnp.array([1.0, -2.0])}
    >>> s = init_saliency(p)
    >>> s = accumulate_saliency(s, {'w': jnp.array([3.0, 1.0])}, p)
    >>> s = accumulate_saliency(s, {'w': jnp.array([-3.0, 1.0])}, p)
    >>> s['w'].tolist()
    [6.0, 4.0]
  """
  _checks.check_choice("mode", mode, MODES)
  if mode == "sum_abs":
    f = lambda s, g, w: s + jnp.abs(g.astype(jnp.float32) * w.astype(jnp.float32))
  else:
    f = lambda s, g, w: s + g.astype(jnp.float32) * w.astype(jnp.float32)
  return jax.tree.map(f, scores, grads, params)


def saliency_prune(
  params: PyTree,
  scores: PyTree,
  num_nonzero: Optional[int] = None,
  *,
  compression: Optional[float] = None,
  where: eligibility.Where = None,
) -> tuple[PyTree, PyTree]:
  r"""Keeps the Q eligible weights of largest :math:`|S|` globally, zeroes the rest.

  Args:
    params: the parameter pytree.
    scores: the saliency sums, shaped like ``params``.
    num_nonzero: Q.
    compression: alternatively C, with ``Q = round(N_eligible / C)``.
    where: eligible leaves (see :func:`optax_gsm.global_top_q`).

  Returns:
    ``(pruned_params, masks)``; masks have exactly Q True entries over the
    eligible leaves and are all True elsewhere.

  Example:
    >>> import jax.numpy as jnp
    >>> p = {'w': jnp.array([[1.0, 5.0], [2.0, 3.0]]), 'b': jnp.ones(2)}
    >>> s = {'w': jnp.array([[4.0, 1.0], [0.0, 4.0]]), 'b': jnp.zeros(2)}
    >>> pruned, masks = saliency_prune(p, s, 2)
    >>> pruned['w'].tolist()           # ties at 4.0: both kept
    [[1.0, 0.0], [0.0, 3.0]]

  References:
    * P. Molchanov, S. Tyree, T. Karras, T. Aila, J. Kautz. Pruning
      Convolutional Neural Networks for Resource Efficient Inference.
      ICLR 2017. https://arxiv.org/abs/1611.06440
    * N. Lee, T. Ajanthan, P. H. S. Torr. SNIP: Single-shot Network Pruning
      based on Connection Sensitivity. ICLR 2019.
      https://arxiv.org/abs/1810.02340
  """
  _checks.check_target(num_nonzero, compression)
  if callable(num_nonzero) or callable(compression):
    raise TypeError(
      "saliency_prune takes a number, not a schedule, for `num_nonzero` / `compression`."
    )
  leaves, treedef = jax.tree.flatten(params)
  flags = eligibility.resolve_where(where, params)
  try:
    s_leaves = treedef.flatten_up_to(scores)
  except (ValueError, TypeError) as e:
    raise ValueError(f"`scores` must have the structure of params: {e}") from None
  n = sum(int(jnp.size(l)) for l, f in zip(leaves, flags) if f)
  q = _checks.static_q(num_nonzero, compression, n)
  idx = [i for i, f in enumerate(flags) if f]
  for i in idx:
    if jnp.shape(s_leaves[i]) != jnp.shape(leaves[i]):
      raise ValueError(
        f"`scores` leaf {i} has shape {jnp.shape(s_leaves[i])}, the "
        f"parameter {jnp.shape(leaves[i])}."
      )
  sel = masking.top_q_masks([jnp.abs(jnp.asarray(s_leaves[i], jnp.float32)) for i in idx], q)
  masks = [jnp.ones(jnp.shape(l), bool) for l in leaves]
  for i, m in zip(idx, sel):
    masks[i] = m
  pruned = [
    jnp.where(m, l, jnp.zeros([], l.dtype)) if f else l for l, m, f in zip(leaves, masks, flags)
  ]
  return jax.tree.unflatten(treedef, pruned), jax.tree.unflatten(treedef, masks)
