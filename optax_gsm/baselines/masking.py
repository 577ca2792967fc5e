r"""Fixed-mask training: the retraining step shared by the pruning baselines.

After a pruning method has chosen a 0/1 mask :math:`M` (magnitude pruning,
L-OBS, saliency, lottery tickets, GSM tickets), the surviving weights are
retrained while the pruned ones stay exactly zero:

.. math::  W \leftarrow M \odot (W + u) \quad\text{i.e.}\quad
           u' = M \odot u - (1 - M) \odot W

where :math:`u` is whatever update the optimizer proposes.
:func:`masked_updates` is that rule as an optax transformation; chain it
**last**, after the learning rate, so that momentum and weight decay of the
pruned entries never reach the weights.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gsm import selection as selection_lib

PyTree = Any


class MaskedUpdatesState(NamedTuple):
  """State of :func:`masked_updates`.

  Attributes:
    masks: a pytree of bool arrays shaped like ``params`` (the masks given to
      :func:`masked_updates`, matched leaf by leaf and put in the structure
      of ``params``); False marks a pruned entry. Kept in the state (not in
      the closure) so that it is checkpointed with the optimizer and not
      baked into the compiled step as a constant; being params-shaped,
      ``optax.tree_utils.tree_map_params`` maps it like a momentum buffer.
  """

  masks: PyTree


def mask_leaves(masks: PyTree, params: PyTree, *, name: str = "masks") -> list[jax.Array]:
  """Matches a mask pytree to ``params`` leaf by leaf.

  ``masks`` may have the structure of ``params``, or be any pytree with the
  same leaves in the same order and shapes (for example the plain nested dict
  of an ``flax.nnx.State``, whose leaf order is the same).

  Args:
    masks: the mask pytree.
    params: the parameter pytree.
    name: the argument name used in error messages.

  Returns:
    A list of bool arrays, one per leaf of ``params``.

  Raises:
    ValueError: if the number of leaves or a shape differs.
    TypeError: if a mask leaf is not boolean.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'w': jnp.ones((2, 2)), 'b': jnp.ones(2)}
    >>> masks = {'w': jnp.eye(2, dtype=bool), 'b': jnp.ones(2, bool)}
    >>> [m.shape for m in mask_leaves(masks, params)]
    [(2,), (2, 2)]
  """
  param_leaves, treedef = jax.tree.flatten(params)
  try:
    leaves = treedef.flatten_up_to(masks)
  except (ValueError, TypeError):
    leaves = jax.tree.leaves(masks)
    if len(leaves) != len(param_leaves):
      raise ValueError(
        f"`{name}` must have one bool array per leaf of params: params have "
        f"{len(param_leaves)} leaves, `{name}` has {len(leaves)}."
      ) from None
  out = []
  for i, (m, p) in enumerate(zip(leaves, param_leaves)):
    m = jnp.asarray(m)
    if m.dtype != jnp.bool_:
      raise TypeError(f"`{name}` must hold bool arrays; leaf {i} has dtype {m.dtype}.")
    if m.shape != jnp.shape(p):
      raise ValueError(
        f"`{name}` leaf {i} has shape {m.shape}, but the parameter has shape {jnp.shape(p)}."
      )
    out.append(m)
  return out


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  r"""Returns :math:`M \odot W`: params with the pruned entries set to 0.

  Args:
    params: the parameter pytree.
    masks: bool arrays matching ``params`` (see :func:`mask_leaves`).

  Returns:
    A pytree like ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> p = {'w': jnp.array([1.0, -2.0, 3.0])}
    >>> apply_masks(p, {'w': jnp.array([True, False, True])})['w'].tolist()
    [1.0, 0.0, 3.0]
  """
  leaves, treedef = jax.tree.flatten(params)
  ms = mask_leaves(masks, params)
  return jax.tree.unflatten(
    treedef, [jnp.where(m, p, jnp.zeros([], p.dtype)) for p, m in zip(leaves, ms)]
  )


def masked_updates(
  masks: PyTree, *, zero_pruned: bool = True
) -> optax.GradientTransformationExtraArgs:
  r"""Keeps pruned weights fixed (at exactly zero) while the rest train.

  With ``zero_pruned=True`` (default) the update of a pruned entry is
  :math:`-W`, so after ``optax.apply_updates`` it is exactly ``0.0`` whatever
  it was before (:math:`w + (-w) = 0` exactly in IEEE arithmetic):

  .. math::  u' = M \odot u - (1 - M) \odot W

  With ``zero_pruned=False`` the update is :math:`M \odot u`: pruned entries
  keep their current values (``params`` is then not needed). This is the
  retraining step of Han et al. (2015) and of lottery tickets (Frankle and
  Carbin, 2019).

  Chain it last (after ``scale_by_learning_rate``), e.g.
  ``optax.chain(optax.sgd(1e-2, 0.9), masked_updates(masks))``.

  Args:
    masks: bool arrays matching ``params`` (see :func:`mask_leaves`); True
      keeps an entry trainable.
    zero_pruned: force pruned entries to exactly 0 (needs ``params`` in
      ``update``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`MaskedUpdatesState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> params = {'w': jnp.array([1.0, 2.0, 3.0])}
    >>> tx = optax.chain(optax.sgd(0.5),
    ...                  masked_updates({'w': jnp.array([True, False, True])}))
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.ones(3)}
    >>> updates, state = tx.update(grads, state, params)
    >>> optax.apply_updates(params, updates)['w'].tolist()
    [0.5, 0.0, 2.5]
  """
  if not isinstance(zero_pruned, bool):
    raise TypeError(f"`zero_pruned` must be a bool, got {zero_pruned!r}.")

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    if not leaves:
      # optax.tree_utils.tree_map_params calls init on a placeholder with
      # no leaves to find the params-shaped trees; nothing to match there
      # (update() refuses updates without leaves when `masks` has some).
      return MaskedUpdatesState(masks=jax.tree.map(lambda p: p, params))
    return MaskedUpdatesState(masks=jax.tree.unflatten(treedef, mask_leaves(masks, params)))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    leaves, treedef = jax.tree.flatten(updates)
    state_masks = jax.tree.leaves(state.masks)
    if not leaves and jax.tree.leaves(masks):
      raise ValueError(
        f"`masks` must have one bool array per leaf of params: the "
        f"updates have no leaves, `masks` has {len(jax.tree.leaves(masks))}."
      )
    if len(leaves) != len(state_masks):
      raise ValueError(
        f"updates have {len(leaves)} leaves but masked_updates was "
        f"initialised with {len(state_masks)}."
      )
    if zero_pruned:
      if params is None:
        raise ValueError(
          "masked_updates(zero_pruned=True) sets pruned weights to zero, so "
          "update() needs params: call tx.update(grads, state, params), or "
          "pass zero_pruned=False."
        )
      p_leaves = jax.tree.leaves(params)
      out = [jnp.where(m, u, -p.astype(u.dtype)) for u, p, m in zip(leaves, p_leaves, state_masks)]
    else:
      out = [jnp.where(m, u, jnp.zeros([], u.dtype)) for u, m in zip(leaves, state_masks)]
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@jax.jit
def _top_q_jit(scores: list, q: jax.Array) -> list:
  keys = [selection_lib.scores_to_keys(s) for s in scores]
  return selection_lib.top_q_keys(keys, q, method="threshold")[0]


def top_q_masks(scores: list, q: int) -> list:
  """Exact global top-Q masks of a list of float score arrays (jitted).

  Ties go to the lower global flat index, as in :func:`optax_gsm.top_q_keys`;
  Q is passed traced, so one compilation serves every Q for given shapes.

  Example:
    >>> import jax.numpy as jnp
    >>> [m.tolist() for m in top_q_masks([jnp.array([1.0, 3.0]),
    ...                                   jnp.array([3.0])], 2)]
    [[False, True], [True]]
  """
  scores = [jnp.asarray(s, jnp.float32) for s in scores]
  return _top_q_jit(scores, jnp.asarray(q, jnp.int32))


def count_kept(masks: PyTree, where: PyTree | None = None) -> int:
  """Number of True entries in ``masks`` (optionally only where ``where``).

  Args:
    masks: a pytree of bool arrays.
    where: optional pytree of Python bools with the structure of ``masks``;
      only leaves marked True are counted.

  Returns:
    The count as a Python int.

  Example:
    >>> import jax.numpy as jnp
    >>> count_kept({'a': jnp.array([True, False]), 'b': jnp.ones(3, bool)})
    4
  """
  leaves = jax.tree.leaves(masks)
  flags = [True] * len(leaves) if where is None else jax.tree.leaves(where)
  return int(sum(int(jnp.sum(m)) for m, f in zip(leaves, flags) if f))
