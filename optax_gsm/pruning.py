"""The final step of GSM: keep the Q largest magnitudes, zero the rest."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from optax_gsm import _checks
from optax_gsm import eligibility
from optax_gsm import selection as selection_lib

PyTree = Any


def magnitude_prune(
  params: PyTree,
  num_nonzero: Optional[int] = None,
  *,
  compression: Optional[float] = None,
  where: eligibility.Where = None,
  selection: str = "auto",
) -> tuple[PyTree, PyTree]:
  r"""Keeps the Q eligible entries of largest :math:`|w|` globally, zeroes the rest.

  This is how GSM ends: no fine-tuning, just a global magnitude cut of the
  eligible leaves. Ties are broken exactly as in :func:`global_top_q` (lower
  global flat index first), so exactly Q entries are kept. Leaves that are not
  eligible are returned unchanged.

  Args:
    params: the parameter pytree.
    num_nonzero: Q, the number of eligible entries to keep.
    compression: alternatively C, with ``Q = round(N_eligible / C)``.
    where: the eligible leaves; see :func:`global_top_q`.
    selection: the selection backend; see :func:`global_top_q`.

  Returns:
    ``(pruned_params, masks)``: ``masks`` is a pytree of bool arrays shaped
    like ``params``; it is all True on leaves that are not eligible, and has
    exactly Q True entries over the eligible leaves.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'w': jnp.array([[0.5, -3.0], [2.0, 0.1]]), 'b': jnp.ones(2)}
    >>> pruned, masks = magnitude_prune(params, 2)
    >>> pruned['w'].tolist()
    [[0.0, -3.0], [2.0, 0.0]]
    >>> pruned['b'].tolist()
    [1.0, 1.0]

  References:
    X. Ding, G. Ding, X. Zhou, Y. Guo, J. Han, J. Liu. Global Sparse
    Momentum SGD for Pruning Very Deep Neural Networks. NeurIPS 2019.
    https://arxiv.org/abs/1909.12778
  """
  _checks.check_target(num_nonzero, compression)
  _checks.check_choice("selection", selection, selection_lib.SELECTIONS)
  if callable(num_nonzero) or callable(compression):
    raise TypeError(
      "magnitude_prune takes a number, not a schedule, for `num_nonzero` / `compression`."
    )
  leaves, treedef = jax.tree.flatten(params)
  flags = eligibility.resolve_where(where, params)
  n = sum(int(leaf.size) for leaf, f in zip(leaves, flags) if f)
  q = _checks.static_q(num_nonzero, compression, n)
  method = "search" if selection == "auto" else selection
  eligible_leaves = [leaf for leaf, f in zip(leaves, flags) if f]
  eligible_masks = _prune_masks(eligible_leaves, q, method)
  it = iter(eligible_masks)
  masks = [next(it) if f else jnp.ones(jnp.shape(leaf), bool) for leaf, f in zip(leaves, flags)]
  pruned = [
    jnp.where(m, leaf, jnp.zeros([], leaf.dtype)) if f else leaf
    for leaf, m, f in zip(leaves, masks, flags)
  ]
  return jax.tree.unflatten(treedef, pruned), jax.tree.unflatten(treedef, masks)


def _prune_masks(leaves, q: int, method: str):
  @jax.jit
  def run(leaves):
    keys = [selection_lib.scores_to_keys(jnp.abs(leaf.astype(jnp.float32))) for leaf in leaves]
    return selection_lib.top_q_keys(keys, q, method=method)[0]

  return run(leaves)
