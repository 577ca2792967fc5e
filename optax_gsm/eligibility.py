"""Which parameters take part in the global top-Q selection.

A leaf is *eligible* when it is scored, ranked and masked by the selection.
By default, eligible leaves are floating-point arrays with ``ndim >= 2``:
conv kernels and dense matrices (the classifier included), but not biases or
normalisation scales. This matches the authors' reference implementation of
GSM, which prunes kernels only.

A ``where`` argument overrides the default. It is either a pytree of Python
bools shaped like the params, or a callable ``params -> that pytree``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp

PyTree = Any
Where = Union[None, PyTree, Callable[[PyTree], PyTree]]


def default_where(params: PyTree) -> PyTree:
  """Marks the leaves that GSM prunes by default: float arrays with ndim >= 2.

  Args:
    params: a pytree of arrays (nested dicts, lists, tuples, Flax NNX state).

  Returns:
    A pytree of Python bools with the structure of ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'dense': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)}}
    >>> default_where(params)
    {'dense': {'bias': False, 'kernel': True}}
  """
  def eligible(leaf) -> bool:
    return (jnp.ndim(leaf) >= 2
            and jnp.issubdtype(jnp.result_type(leaf), jnp.floating))
  return jax.tree.map(eligible, params)


def resolve_where(where: Where, params: PyTree) -> list[bool]:
  """Validates ``where`` against ``params`` and returns one bool per leaf.

  The list is in ``jax.tree.leaves(params)`` order, which is the fixed leaf
  order used for deterministic tie-breaking.

  Args:
    where: None (the default rule), a pytree of bools shaped like ``params``,
      or a callable returning one.
    params: the parameter pytree.

  Returns:
    A list of Python bools, one per leaf of ``params``.

  Raises:
    ValueError: if the structure of ``where`` does not match ``params`` or no
      leaf is eligible.
    TypeError: if an eligible leaf is not a floating-point array, or a flag is
      not a bool.
  """
  if where is None:
    flags_tree = default_where(params)
  elif callable(where):
    flags_tree = where(params)
  else:
    flags_tree = where

  param_leaves, param_def = jax.tree.flatten(params)
  try:
    flags = param_def.flatten_up_to(flags_tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "`where` must be a pytree of bools with the same structure as params "
        f"(or a callable returning one); params have structure {param_def}, "
        f"got where={_short(flags_tree)}. Details: {e}") from None

  out = []
  for path_leaf, flag in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], flags):
    path, leaf = path_leaf
    if not isinstance(flag, (bool, jnp.bool_)) and not (
        hasattr(flag, "dtype") and flag.dtype == bool and jnp.ndim(flag) == 0):
      raise TypeError(
          f"`where` must hold one Python bool per leaf; at "
          f"{jax.tree_util.keystr(path)} got {_short(flag)} "
          f"of type {type(flag).__name__}.")
    flag = bool(flag)
    if flag and not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(
          f"`where` marks leaf {jax.tree_util.keystr(path)} eligible, but it "
          f"has dtype {jnp.result_type(leaf)}; only floating-point leaves can "
          "be pruned. Mark it False in `where`.")
    out.append(flag)

  if param_leaves and not any(out):
    raise ValueError(
        "No eligible leaf: `where` marks no parameter for selection (the "
        "default marks float arrays with ndim >= 2). Pass a `where` that marks "
        "at least one floating-point leaf.")
  if not param_leaves:
    raise ValueError("params has no leaves, so there is nothing to select.")
  return out


def where_tree(where: Where, params: PyTree) -> PyTree:
  """Like :func:`resolve_where` but returns a pytree of bools like params."""
  flags = resolve_where(where, params)
  return jax.tree.unflatten(jax.tree.structure(params), flags)


def count_eligible(params: PyTree, where: Where = None) -> int:
  """Number of scalar entries in the eligible leaves of ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> count_eligible({'w': jnp.ones((3, 4)), 'b': jnp.ones(4)})
    12
  """
  flags = resolve_where(where, params)
  # math.prod of the shape also serves jax.ShapeDtypeStruct leaves.
  return sum(math.prod(jnp.shape(leaf))
             for leaf, f in zip(jax.tree.leaves(params), flags) if f)


def _short(x: Any, limit: int = 120) -> str:
  text = repr(x)
  return text if len(text) <= limit else text[:limit] + "..."
