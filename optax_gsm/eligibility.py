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
from typing import Any, Callable, Optional, Union

import jax
import jax.core  # jax.core.Tracer (pyright needs the submodule imported)
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
    return jnp.ndim(leaf) >= 2 and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)

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
    where_desc = _short(flags_tree)
    if callable(where):
      where_desc = f"a callable returning {where_desc}"
    diff = structure_difference(params, flags_tree, "where")
    hint = ""
    if _is_leaf(flags_tree) and len(param_leaves) != 1:
      hint = " " + static_args_hint("where")
    raise ValueError(
      "`where` must be a pytree of bools with the same structure as params "
      f"(or a callable returning one); got {where_desc}: "
      f"{diff or _short(str(e), 300)}.{hint}"
    ) from None

  out = []
  for path_leaf, flag in zip(jax.tree_util.tree_flatten_with_path(params)[0], flags):
    path, leaf = path_leaf
    if isinstance(flag, jax.core.Tracer):
      raise TypeError(
        f"`where` holds a traced value at {jax.tree_util.keystr(path)}: "
        "eligibility must be known when the update is traced. " + static_args_hint("where")
      )
    if not isinstance(flag, (bool, jnp.bool_)) and not (
      hasattr(flag, "dtype") and flag.dtype == bool and jnp.ndim(flag) == 0
    ):
      raise TypeError(
        f"`where` must hold one Python bool per leaf; at "
        f"{jax.tree_util.keystr(path)} got {_short(flag)} "
        f"of type {type(flag).__name__}."
      )
    flag = bool(flag)
    if flag and not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(
        f"`where` marks leaf {jax.tree_util.keystr(path)} eligible, but it "
        f"has dtype {jnp.result_type(leaf)}; only floating-point leaves can "
        "be pruned. Mark it False in `where`."
      )
    out.append(flag)

  if param_leaves and not any(out):
    hint = ""
    if _looks_like_step_count(params):
      hint = f" The params here are {_short(params)}, a step count. " + static_args_hint(
        "where", "costs", "metric"
      )
    raise ValueError(
      "No eligible leaf: `where` marks no parameter for selection (the "
      "default marks float arrays with ndim >= 2). Pass a `where` that marks "
      f"at least one floating-point leaf.{hint}"
    )
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
  return sum(math.prod(jnp.shape(leaf)) for leaf, f in zip(jax.tree.leaves(params), flags) if f)


def static_args_hint(*names: str) -> str:
  """The advice for a callable argument that optax took for a schedule.

  Args:
    names: the arguments concerned (``"where"``, ``"costs"``, ``"metric"``).

  Returns:
    A sentence naming ``static_args`` of :func:`optax.inject_hyperparams`.
  """
  listed = " / ".join(f"`{n}`" for n in names)
  static = ", ".join(f'"{n}"' for n in names) + ("," if len(names) == 1 else "")
  return (
    f"Under optax.inject_hyperparams a callable {listed} is taken for "
    "a schedule and called with the step count: pass it via "
    f"optax.inject_hyperparams(factory, static_args=({static}))."
  )


def structure_difference(params: PyTree, other: PyTree, name: str) -> Optional[str]:
  """Describes the first place where ``other`` does not fit ``params``.

  ``other`` fits when it has the node structure of ``params`` down to the
  leaves of ``params`` (anything may sit at a leaf position), which is what
  ``PyTreeDef.flatten_up_to`` accepts.

  Args:
    params: the reference pytree.
    other: the pytree shaped by the user (``where``, ``costs``).
    name: how to call ``other`` in the description.

  Returns:
    None if ``other`` fits, else a short description naming the first
    differing key path (``jax.tree_util.keystr``).
  """
  return _difference(params, other, (), name)


def _is_leaf(tree: Any) -> bool:
  return jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(tree))


def _children(tree: Any) -> tuple[type, list]:
  """The node type of ``tree`` and its ``(key, child)`` pairs, one level."""
  data = _one_level(tree).node_data()
  kind = type(tree) if data is None else data[0]
  pairs = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is not tree)[0]
  return kind, [(p[-1], c) for p, c in pairs]


def _describe(tree: Any) -> str:
  if _is_leaf(tree):
    return _short(tree, 60)
  kind, pairs = _children(tree)
  keys = [jax.tree_util.keystr((k,)) for k, _ in pairs]
  shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
  count = f"{len(keys)} child" + ("" if len(keys) == 1 else "ren")
  return f"a {kind.__name__} with {count} [{shown}]"


def _difference(a: Any, b: Any, path: tuple, name: str) -> Optional[str]:
  where_at = jax.tree_util.keystr(path) or "the root"
  if _is_leaf(a):
    return None
  if _is_leaf(b) or b is None:
    return f"at {where_at} params have {_describe(a)}, `{name}` has {_describe(b)}"
  kind_a, pairs_a = _children(a)
  kind_b, pairs_b = _children(b)
  if kind_a is not kind_b:
    return (
      f"at {where_at} params have {_describe(a)}, `{name}` has "
      f"{_describe(b)} (a different node type)"
    )
  keys_a = [jax.tree_util.keystr((k,)) for k, _ in pairs_a]
  keys_b = [jax.tree_util.keystr((k,)) for k, _ in pairs_b]
  if keys_a != keys_b:
    at = jax.tree_util.keystr(path)
    missing = [k for k in keys_a if k not in keys_b]
    extra = [k for k in keys_b if k not in keys_a]
    if missing:
      return f"`{name}` lacks {at}{missing[0]}, which params have"
    if extra:
      return f"`{name}` has {at}{extra[0]}, which params lack"
    return f"at {where_at} `{name}` has the keys of params in another order: {', '.join(keys_b)}"
  for (key, ca), (_, cb) in zip(pairs_a, pairs_b):
    diff = _difference(ca, cb, path + (key,), name)
    if diff is not None:
      return diff
  if _one_level(a) == _one_level(b):
    return None
  # The children match but the nodes do not (say, different auxiliary data).
  return (
    f"at {where_at} params and `{name}` have nodes of type "
    f"{kind_a.__name__} that differ in their metadata"
  )


def _one_level(tree: Any):
  return jax.tree_util.tree_structure(tree, is_leaf=lambda x: x is not tree)


def _looks_like_step_count(params: Any) -> bool:
  """True for a lone integer scalar: what optax passes to a schedule."""
  leaves = jax.tree.leaves(params)
  return (
    len(leaves) == 1
    and leaves[0] is params
    and jnp.ndim(params) == 0
    and jnp.issubdtype(jnp.result_type(params), jnp.integer)
  )


def _short(x: Any, limit: int = 120) -> str:
  text = " ".join(repr(x).split())  # one line (NNX states print on many)
  return text if len(text) <= limit else text[:limit] + "..."
