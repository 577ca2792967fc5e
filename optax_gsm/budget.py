r"""Budgets instead of compression ratios: select weights by score per unit cost.

Every eligible weight :math:`i` has a score :math:`s_i` and a positive integer
cost :math:`c_i` (the multiply-accumulates it takes part in, or the bytes it
takes in a sparse file). Given a budget :math:`B`, the weights are ordered by

1. a larger ratio :math:`r_i = s_i / c_i` first (computed in float32:
   ``float32(s) / float32(c)``, correctly rounded, so costs above
   :math:`2^{24}` are rounded to float32 in the ratio only);
2. among equal ratios, the lower *global flat index* first (leaf order of
   ``jax.tree.leaves``, then row-major), exactly as in
   :mod:`optax_gsm.selection`;
3. NaN ratios last; they are never selected unless everything fits.

and the selection is the **longest prefix of that order whose total cost is at
most** :math:`B`. It is exact and deterministic, and found without sorting:

* the ratio threshold :math:`t^*` is the largest int32 ratio key with
  :math:`\sum_{r_i \ge t^*} c_i > B`, built bit by bit from the most
  significant bit (32 passes that each sum the costs above a candidate, like
  :func:`optax_gsm.selection.kth_largest_key` counts);
* every weight with a ratio above :math:`t^*` is selected (their total is at
  most :math:`B`), and the weights tied at :math:`t^*` are taken in global
  index order while the running total stays within :math:`B` (see the two
  layouts below).

**Exactness.** Costs are int32 in :math:`[1, 2^{31})`. Sums of costs are
carried exactly in 16-bit limbs held in int32 (no float, no int64): in the
``"concat"`` layout, per block of :math:`2^{15}` entries the low and high 16
bits of the costs are summed separately (each sum fits in int32), the block
sums are normalised into three 16-bit limbs, and those are summed across
blocks; in the ``"per_leaf"`` layout every reduction of a leaf stays below
:math:`2^{31}` by the choice of its limbs, and the per-leaf sums are
multiplied out and added as 16-bit limbs. This is exact for up to
:math:`2^{30}` entries in all (a larger selection raises ``ValueError``), so
every total is below :math:`2^{61}` (its top limb below :math:`2^{29}`) and
every count and flat index fits int32, with or without ``jax_enable_x64``.
Budgets may be Python ints of any size up to :math:`2^{62}`, or traced
integer or float scalars (a float budget :math:`B` means
:math:`\lfloor B \rfloor`).

**Two layouts, one result.** The same selection is computed in one of two
ways (:data:`LAYOUT`; the masks are identical bit for bit):

* ``"concat"`` concatenates the eligible leaves into one vector (one copy
  of the keys and of the costs) and sums it in blocks, with prefix sums
  for the ties. The program is the same size for any number of leaves, but
  on a mesh the concatenation gathers every leaf onto every device.
* ``"per_leaf"`` sums every leaf where it is and adds the per-leaf sums:
  a leaf of one cost (what :func:`eligible_costs` makes of a uniform leaf)
  takes a count times its cost; a leaf of varying costs is summed in limbs
  narrow enough that one int32 reduction of the whole leaf is exact
  (:math:`w`-bit limbs with :math:`n (2^w - 1) < 2^{31}`: two of 16 bits up
  to :math:`2^{15}` entries, four of 8 bits up to :math:`2^{23}`). The ties
  at :math:`t^*` are cut without a prefix sum: the per-leaf totals of the
  tied costs, summed over the leaves in order, tell which leaf holds the
  cut, and inside it a bit-by-bit search over the flat index finds the
  largest index whose earlier ties still fit. Every step is elementwise, a
  reduction of a leaf or arithmetic on a few scalars per leaf, so XLA's
  SPMD partitioner keeps each leaf where it is and all-reduces a few int32
  per leaf and pass (see ``tests/optax_gsm/test_distributed.py``). The
  program grows with the number of leaves.
* ``"auto"`` (the default) takes ``"per_leaf"`` when the keys are on a mesh
  of more than one device, and on one device when every leaf has one cost:
  a pass is then a count per leaf, and at ResNet-50 shapes the step runs in
  0.56x the time of ``"concat"`` with a third of its temporary memory, for
  about twice the compile time. With costs that vary within a leaf on one
  device it takes ``"concat"``, which reads less per pass (two 16-bit limbs
  instead of up to four): there ``"per_leaf"`` steps about 2x slower.
  Measured in ``benchmarks/RESULTS.md``.

Cost trees (pytrees of int32 arrays shaped like the params, 0 on leaves that
are not eligible) come from :func:`cost_tree` and :func:`bytes_cost_tree`;
``experiments/flops.py`` builds the FLOPs cost tree of a Flax model.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.core  # jax.core.Tracer (pyright needs the submodule imported)
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_gsm import _checks
from optax_gsm import eligibility
from optax_gsm import selection as selection_lib
from optax_gsm import sharding
from optax_gsm.fast_select import _flat_index  # the count search's row-major index

Array = jax.Array
PyTree = Any

# Entries per block of the exact limb sums: a block sum of 16-bit limbs
# stays below 2**31.
_BLOCK = 2**15
_MAX_COST = 2**31 - 1
_MAX_BUDGET = 2**62 - 1
_MASK16 = 0xFFFF
# Sums over at most 2**15 blocks of 16-bit limbs stay below 2**31.
_MAX_ENTRIES = _BLOCK * 2**15

Limbs = tuple[Array, Array, Array]

# How the selection is laid out (see the module docstring and _select_impl):
# "per_leaf" sums every leaf where it is (what partitions on a mesh);
# "concat" concatenates the leaves first (one copy of keys and costs);
# "auto" picks per_leaf on a mesh or when every leaf has one cost, else
# concat. The masks are the same bit for bit.
LAYOUTS = ("auto", "per_leaf", "concat")
LAYOUT = "auto"


# --------------------------------------------------------------------------
# Cost trees.


def cost_tree(
  params: PyTree,
  per_entry: Union[PyTree, Callable[[str, Any], int]],
  *,
  where: eligibility.Where = None,
) -> PyTree:
  """A cost pytree: every entry of an eligible leaf costs that leaf's value.

  Args:
    params: the parameter pytree.
    per_entry: the cost of one entry of each leaf: a pytree of ints shaped
      like ``params`` (one int per leaf; values on leaves that are not
      eligible are ignored), or a callable ``(keystr, leaf) -> int`` (called
      on the eligible leaves only).
    where: the eligible leaves; see :func:`optax_gsm.global_top_q`.

  Returns:
    A pytree of int32 numpy arrays shaped like ``params``: the leaf's cost on
    eligible leaves, 0 elsewhere.

  Raises:
    ValueError: if an eligible leaf's cost is not in ``[1, 2**31)``.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'conv': jnp.ones((3, 3, 1, 2)), 'b': jnp.ones(2)}
    >>> costs = cost_tree(params, {'conv': 64, 'b': 0})
    >>> int(costs['conv'][0, 0, 0, 0]), int(costs['b'].sum())
    (64, 0)
  """
  flags = eligibility.resolve_where(where, params)
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  if callable(per_entry):
    values = [
      per_entry(jax.tree_util.keystr(p), leaf) if flag else 0
      for (p, leaf), flag in zip(path_leaves, flags)
    ]
  else:
    try:
      values = treedef.flatten_up_to(per_entry)
    except (ValueError, TypeError) as e:
      raise ValueError(
        f"`per_entry` must hold one int per leaf of params (or be a callable); details: {e}"
      ) from None
  out = []
  for (path, leaf), value, flag in zip(path_leaves, values, flags):
    shape = np.shape(leaf)
    if not flag:
      out.append(np.zeros(shape, np.int32))
      continue
    c = _checks.concrete(value)
    if c is None or float(c) != int(c) or not 1 <= int(c) <= _MAX_COST:
      raise ValueError(
        f"`per_entry` gives leaf {jax.tree_util.keystr(path)} the cost "
        f"{value!r}; an eligible entry's cost must be an integer in "
        f"[1, {_MAX_COST}]."
      )
    out.append(np.full(shape, int(c), np.int32))
  return jax.tree.unflatten(treedef, out)


def bytes_cost_tree(params: PyTree, *, where: eligibility.Where = None) -> PyTree:
  """Bytes per non-zero in the index encodings of the sparse file.

  An entry costs its value bytes plus 2 index bytes: a uint16 index in the
  ``coo`` encoding (leaves of at most 65,536 entries) or in the ``csr``
  encoding (larger leaves). A budget in bytes then bounds the payload of the
  sparse file up to a fixed part per leaf (the csr row offsets, the ``.npy``
  and zip headers); leaves that :func:`~optax_gsm.sparse_io.save_sparse`
  stores with a bitmask or densely only get smaller.

  Example:
    >>> import jax.numpy as jnp
    >>> costs = bytes_cost_tree({'a': jnp.ones((4, 4)),
    ...                          'b': jnp.ones((300, 300), jnp.bfloat16)})
    >>> int(costs['a'][0, 0]), int(costs['b'][0, 0])
    (6, 4)
  """

  def per_entry(_, leaf):
    return np.dtype(jnp.result_type(leaf)).itemsize + 2

  return cost_tree(params, per_entry, where=where)


def total_cost(costs: PyTree, masks: Optional[PyTree] = None) -> int:
  """The exact total cost of the selected entries, as a Python int.

  Args:
    costs: a cost pytree (concrete integer arrays).
    masks: optional pytree of bools shaped like ``costs`` (the selected or
      non-zero entries); default: every entry.

  Example:
    >>> import numpy as np
    >>> total_cost({'w': np.array([3, 4])}, {'w': np.array([True, False])})
    3
  """
  leaves, treedef = jax.tree.flatten(costs)
  mask_leaves = [None] * len(leaves) if masks is None else treedef.flatten_up_to(masks)
  total = 0
  for c, m in zip(leaves, mask_leaves):
    c = np.asarray(jax.device_get(c)).astype(np.int64)
    if m is not None:
      c = np.where(np.asarray(jax.device_get(m)), c, 0)
    total += int(c.sum(dtype=np.int64))
  return total


# --------------------------------------------------------------------------
# Selection.


def ratio_keys(scores: Array, costs: Array) -> Array:
  """int32 keys of ``float32(scores) / float32(costs)`` (see :mod:`selection`).

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_gsm.selection import scores_to_keys
    >>> k = ratio_keys(jnp.array([6.0, 1.0]), jnp.array([3, 1]))
    >>> bool((k == scores_to_keys(jnp.array([2.0, 1.0]))).all())
    True
    >>> # Correctly rounded also for a scalar cost (not 6 * (1 / 7)):
    >>> int(ratio_keys(jnp.array([6.0]), 7)[0]) == int(
    ...     scores_to_keys(jnp.float32(6.0) / jnp.array([7.0]))[0])
    True
  """
  s = jnp.asarray(scores).astype(jnp.float32)
  c = jnp.asarray(costs).astype(jnp.float32)
  c = jnp.broadcast_to(c, jnp.broadcast_shapes(s.shape, c.shape))
  # XLA rewrites a division by a broadcast or a constant into a
  # multiplication by the reciprocal, which is off by one ulp for about half
  # of the ratios (6 / 7 vs 6 * (1 / 7)) and would order equal ratios of
  # different leaves by their rounding. The barrier keeps a true division,
  # which is correctly rounded.
  return selection_lib.scores_to_keys(s / lax.optimization_barrier(c))


def budget_top_keys(
  keys: Sequence[Array], costs: Sequence[Array], budget
) -> tuple[list[Array], Array]:
  r"""Selects the longest prefix of the key order whose total cost fits the budget.

  The order is: larger key first, ties by lower global flat index (leaf
  order, then row-major), ``NAN_KEY`` last. With keys of the ratios
  :math:`s_i / c_i` (:func:`ratio_keys`) this is the greedy knapsack order.
  Found without sorting (see the module docstring); exact for any budget.

  Args:
    keys: int32 key arrays, in the fixed leaf order that breaks ties.
    costs: integer cost arrays broadcastable to the shapes of ``keys``, with
      values in ``[1, 2**31)`` (checked when concrete).
    budget: the budget :math:`B`: a Python int (up to :math:`2^{62}`), or an
      integer or float scalar (may be traced; a float means
      :math:`\lfloor B \rfloor`). A negative budget selects nothing.

  Returns:
    ``(masks, threshold_key)``: boolean arrays shaped like ``keys`` whose
    selected entries have total cost :math:`\le B`, such that the next entry
    in the order (if any) would exceed :math:`B`; and the key :math:`t^*`
    of the first entry that does not fit (``NAN_KEY`` when everything fits).
    Entries with key ``NAN_KEY`` are selected only when everything fits.

  Example:
    >>> import jax.numpy as jnp
    >>> k = ratio_keys(jnp.array([9.0, 4.0, 3.0, 8.0]), jnp.array([3, 1, 1, 4]))
    >>> masks, _ = budget_top_keys([k], [jnp.array([3, 1, 1, 4])], 5)
    >>> masks[0].tolist()   # ratios 3, 4, 3, 2: take 4 (1), 3 (3), 3 (1)
    [True, True, True, False]
    >>> masks, _ = budget_top_keys([k], [jnp.array([3, 1, 1, 4])], 3)
    >>> masks[0].tolist()   # 4 (1) fits, 3 (cost 3) would exceed: stop
    [False, True, False, False]
  """
  keys = [jnp.asarray(k) for k in keys]
  for k in keys:
    if k.dtype != jnp.int32:
      raise TypeError(f"`keys` must be int32 arrays, got dtype {k.dtype}.")
  costs = _check_costs(costs, [k.shape for k in keys])
  masks, kth = _budget_select(tuple(keys), costs, _budget_limbs(budget), layout=LAYOUT)
  return list(masks), kth


def _check_costs(costs: Sequence[Any], shapes: Sequence[tuple]) -> tuple:
  """Checks dtypes, shapes and (when concrete) values of the costs."""
  if len(costs) != len(shapes):
    raise ValueError(
      f"`costs` must have one array per key array: got {len(costs)} cost "
      f"arrays for {len(shapes)} key arrays."
    )
  out = []
  for i, (c, shape) in enumerate(zip(costs, shapes)):
    if not isinstance(c, jax.core.Tracer):
      c = np.asarray(jax.device_get(c))
    if not jnp.issubdtype(c.dtype, jnp.integer):
      raise TypeError(f"`costs[{i}]` must be an integer array, got dtype {c.dtype}.")
    try:
      if np.broadcast_shapes(np.shape(c), shape) != tuple(shape):
        raise ValueError
    except ValueError:
      raise ValueError(
        f"`costs[{i}]` of shape {np.shape(c)} does not broadcast to the key shape {shape}."
      ) from None
    if isinstance(c, np.ndarray) and c.size:
      lo, hi = int(c.min()), int(c.max())
      if lo < 1 or hi > _MAX_COST:
        raise ValueError(f"`costs[{i}]` must be in [1, {_MAX_COST}], got values in [{lo}, {hi}].")
      c = c.astype(np.int32)
    out.append(c)
  return tuple(out)


def budget_select(scores: Sequence[Array], costs: Sequence[Array], budget) -> list[Array]:
  """Masks of the entries with the best score per unit cost within a budget.

  :func:`ratio_keys` then :func:`budget_top_keys`.

  Example:
    >>> import jax.numpy as jnp
    >>> budget_select([jnp.array([1.0, 5.0, 2.0])], [jnp.array([1, 10, 1])],
    ...               2)[0].tolist()
    [True, False, True]
  """
  scores = tuple(jnp.asarray(s) for s in scores)
  costs = _check_costs(costs, [s.shape for s in scores])
  masks, _ = _ratio_select(scores, costs, _budget_limbs(budget), layout=LAYOUT)
  return list(masks)


def budget_prune(
  params: PyTree,
  costs: PyTree,
  budget,
  *,
  where: eligibility.Where = None,
  rank: str = "ratio",
) -> tuple[PyTree, PyTree]:
  r"""Keeps the eligible weights of largest :math:`|w| / c` (or :math:`|w|`) within a budget.

  The budgeted counterpart of :func:`optax_gsm.magnitude_prune`: the kept
  set is the longest prefix of the :math:`|w_i| / c_i` order (``rank=
  "ratio"``) or of the :math:`|w_i|` order (``rank="magnitude"``), ties by
  lower global index, whose total cost is at most ``budget``.

  Which order: ``"ratio"`` is the greedy knapsack rule for a one-shot cut of
  a dense model. After training with ``gsm(budget=..., costs=...)``, whose
  selection already traded score against cost, use ``"magnitude"``: the
  weights GSM kept are the large ones, and dividing by the cost again would
  rank a barely decayed cheap weight above a trained expensive one (for
  example a dense weight of 1e-3 above a conv weight of 0.3 that costs 576).

  Args:
    params: the parameter pytree.
    costs: a cost pytree shaped like ``params`` (see :func:`cost_tree`);
      only its eligible leaves are used.
    budget: the budget; see :func:`budget_top_keys`.
    where: the eligible leaves; see :func:`optax_gsm.global_top_q`.
    rank: ``"ratio"`` (:math:`|w| / c`) or ``"magnitude"`` (:math:`|w|`).

  Returns:
    ``(pruned_params, masks)`` as :func:`optax_gsm.magnitude_prune`.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'conv': jnp.array([[3.0, 1.0]]),
    ...           'fc': jnp.array([[2.0, 0.5]])}
    >>> costs = {'conv': jnp.array([[4, 4]]), 'fc': jnp.array([[1, 1]])}
    >>> pruned, _ = budget_prune(params, costs, 5)  # ratios .75 .25 | 2 .5
    >>> pruned['conv'].tolist(), pruned['fc'].tolist()
    ([[3.0, 0.0]], [[2.0, 0.0]])
    >>> pruned, _ = budget_prune(params, costs, 5, rank="magnitude")  # 3 2 1
    >>> pruned['conv'].tolist(), pruned['fc'].tolist()  # 3 (4) + 2 (1) = 5
    ([[3.0, 0.0]], [[2.0, 0.0]])
    >>> pruned, _ = budget_prune(params, costs, 4, rank="magnitude")
    >>> pruned['conv'].tolist(), pruned['fc'].tolist()  # 3 fits, 2 does not
    ([[3.0, 0.0]], [[0.0, 0.0]])
  """
  if rank not in ("ratio", "magnitude"):
    raise ValueError(f"`rank` must be 'ratio' (|w| / cost) or 'magnitude' (|w|), got {rank!r}.")
  leaves, treedef = jax.tree.flatten(params)
  flags = eligibility.resolve_where(where, params)
  cost_leaves = cost_leaves_like(costs, params)
  idx = [i for i, f in enumerate(flags) if f]
  eligible = tuple(jnp.asarray(leaves[i]) for i in idx)
  cost_eligible = _check_costs([cost_leaves[i] for i in idx], [x.shape for x in eligible])
  sel, pruned_eligible = _prune(
    eligible, cost_eligible, _budget_limbs(budget), by_magnitude=rank == "magnitude", layout=LAYOUT
  )
  masks = [jnp.ones(jnp.shape(leaf), bool) for leaf in leaves]
  pruned = list(leaves)
  for i, m, p in zip(idx, sel, pruned_eligible):
    masks[i], pruned[i] = m, p
  return jax.tree.unflatten(treedef, pruned), jax.tree.unflatten(treedef, masks)


def _path_key(path) -> tuple:
  """A leaf path without the ``.value`` level of Flax NNX variables."""
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
      continue
    out.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return tuple(out)


def cost_leaves_like(costs: PyTree, params: PyTree) -> list:
  """The leaves of ``costs`` in the leaf order of ``params``.

  ``costs`` must have the structure of ``params`` (its values at leaves that
  are not eligible may be anything, ``None`` included), or the same leaves at
  the same paths up to the ``.value`` level of Flax NNX variables: a cost
  tree built from ``nnx.state(model, nnx.Param)`` then serves the plain-array
  params that ``nnx.Optimizer`` passes to ``update``.

  Raises:
    ValueError: naming both structures when neither matches.

  Example:
    >>> import jax.numpy as jnp
    >>> cost_leaves_like({'b': None, 'w': 4},
    ...                  {'w': jnp.ones(2), 'b': jnp.ones(1)})
    [None, 4]
  """
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  try:
    return treedef.flatten_up_to(costs)
  except (ValueError, TypeError) as e:
    detail = str(e)
  cost_paths = jax.tree_util.tree_flatten_with_path(costs)[0]
  if [_path_key(p) for p, _ in cost_paths] == [_path_key(p) for p, _ in path_leaves]:
    return [c for _, c in cost_paths]
  text = repr(costs)
  text = text if len(text) <= 200 else text[:200] + "..."
  diff = eligibility.structure_difference(params, costs, "costs")
  hint = ""
  if isinstance(costs, (jax.Array, np.ndarray)) and len(path_leaves) != 1:
    # What a callable `costs` gives when optax.inject_hyperparams calls it
    # as a schedule on the step count.
    hint = " " + eligibility.static_args_hint("costs")
  raise ValueError(
    "`costs` must be a pytree with the structure of params (one integer "
    f"array per leaf, shaped like it); got costs={text}: "
    f"{diff or detail[:300]}.{hint}"
  )


def eligible_costs(costs: PyTree, params: PyTree, flags: Sequence[bool]) -> tuple:
  """Checked costs of the eligible leaves, in leaf order.

  Args:
    costs: a cost pytree (see :func:`cost_leaves_like`).
    params: the parameter pytree.
    flags: one bool per leaf of ``params`` (the eligible leaves).

  Returns:
    One int32 array per eligible leaf, broadcastable to its shape: a scalar
    when every entry of the leaf costs the same (so that a jitted update
    embeds one number rather than a whole constant array). Traced costs
    cannot be checked; they are clipped to ``[1, 2**31)``.

  Raises:
    TypeError: if an eligible leaf's costs are not integers.
    ValueError: if the structure does not match, a shape does not broadcast
      to the leaf's shape, or a concrete cost is outside ``[1, 2**31)``.
  """
  path_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  out = []
  for (path, leaf), c, flag in zip(path_leaves, cost_leaves_like(costs, params), flags):
    if not flag:
      continue
    name = jax.tree_util.keystr(path)
    if c is None:
      raise TypeError(
        f"`costs` has None at the eligible leaf {name}; give its entries "
        "integer costs in [1, 2**31) (see optax_gsm.budget.cost_tree)."
      )
    if isinstance(c, jax.core.Tracer):
      if not jnp.issubdtype(c.dtype, jnp.integer):
        raise TypeError(f"`costs` at {name} must be integers, got dtype {c.dtype}.")
    else:
      c = np.asarray(jax.device_get(c))
      if not np.issubdtype(c.dtype, np.integer):
        raise TypeError(
          f"`costs` at {name} must be integers (the cost of each entry), got dtype {c.dtype}."
        )
    shape = tuple(np.shape(leaf))
    try:
      ok = np.broadcast_shapes(np.shape(c), shape) == shape
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(
        f"`costs` at {name} has shape {np.shape(c)}, which does not "
        f"broadcast to the leaf's shape {shape}."
      )
    if isinstance(c, jax.core.Tracer):
      c = jnp.clip(c, 1, _MAX_COST).astype(jnp.int32)
    elif c.size:
      lo, hi = int(c.min()), int(c.max())
      if lo < 1 or hi > _MAX_COST:
        raise ValueError(
          f"`costs` at the eligible leaf {name} must be in [1, {_MAX_COST}]"
          f", got values in [{lo}, {hi}]."
        )
      c = np.int32(lo) if lo == hi else c.astype(np.int32)
    out.append(c)
  return tuple(out)


# --------------------------------------------------------------------------
# Exact integer sums in 16-bit limbs.


# The shift of a limb, int32 so that lax shifts of int32 limbs keep their
# dtype under jax_enable_x64 (a Python 16 would be an int64 there).
_SHIFT16 = np.int32(16)


def _norm(l0: Array, l1: Array, l2: Array) -> Limbs:
  """Carries so that l0, l1 are in [0, 2**16) (all limbs non-negative)."""
  l1 = l1 + lax.shift_right_arithmetic(l0, _SHIFT16)
  l0 = l0 & _MASK16
  l2 = l2 + lax.shift_right_arithmetic(l1, _SHIFT16)
  l1 = l1 & _MASK16
  return l0, l1, l2


def _add(a: Limbs, b: Limbs) -> Limbs:
  return _norm(a[0] + b[0], a[1] + b[1], a[2] + b[2])


def _sub(a: Limbs, b: Limbs) -> Limbs:
  """``a - b`` for normalised ``a >= b`` (borrows via arithmetic shifts)."""
  d0 = a[0] - b[0]
  d1 = a[1] - b[1] + lax.shift_right_arithmetic(d0, _SHIFT16)
  d2 = a[2] - b[2] + lax.shift_right_arithmetic(d1, _SHIFT16)
  return d0 & _MASK16, d1 & _MASK16, d2


def _gt(a: Limbs, b: Limbs) -> Array:
  return (a[2] > b[2]) | ((a[2] == b[2]) & ((a[1] > b[1]) | ((a[1] == b[1]) & (a[0] > b[0]))))


def _block_limbs(s_lo: Array, s_hi: Array) -> Limbs:
  """Limbs of ``s_hi * 2**16 + s_lo`` for 0 <= s_lo, s_hi < 2**31."""
  t = s_hi + lax.shift_right_logical(s_lo, _SHIFT16)
  return s_lo & _MASK16, t & _MASK16, lax.shift_right_logical(t, _SHIFT16)


def _zero() -> Limbs:
  z = jnp.int32(0)
  return z, z, z


def _budget_limbs(budget) -> Limbs:
  """The budget, floored and clipped to [0, 2**62), as three int32 limbs."""
  if isinstance(budget, bool):
    raise TypeError(f"`budget` must be a number, got {budget!r}.")
  value = budget if isinstance(budget, int) else _checks.concrete(budget)
  if value is not None:
    if isinstance(value, float):
      if math.isnan(value):
        raise ValueError("`budget` must be a number, got nan.")
      value = min(max(value, 0.0), float(_MAX_BUDGET))
      value = math.floor(value)
    b = min(max(int(value), 0), _MAX_BUDGET)
    return (jnp.int32(b & _MASK16), jnp.int32((b >> 16) & _MASK16), jnp.int32(b >> 32))
  b = jnp.asarray(budget)
  if b.shape != ():
    raise ValueError(f"`budget` must be a scalar, got shape {b.shape}.")
  if jnp.issubdtype(b.dtype, jnp.integer):
    b = jnp.maximum(b, 0)
    if b.dtype.itemsize <= 4:
      u = b.astype(jnp.uint32)
      return ((u & _MASK16).astype(jnp.int32), (u >> 16).astype(jnp.int32), jnp.int32(0))
    b = jnp.minimum(b, _MAX_BUDGET)
    return (
      (b & _MASK16).astype(jnp.int32),
      ((b >> 16) & _MASK16).astype(jnp.int32),
      (b >> 32).astype(jnp.int32),
    )
  if not jnp.issubdtype(b.dtype, jnp.floating):
    raise TypeError(f"`budget` must be an int or a float, got dtype {b.dtype}.")
  b = b.astype(jnp.promote_types(b.dtype, jnp.float32))
  # Floats: floor, then split with exact power-of-two divisions (every
  # remainder has fewer significant bits than the float, so it is exact).
  b = jnp.floor(jnp.clip(jnp.nan_to_num(b, nan=0.0), 0.0, 2.0**61))
  hi = jnp.floor(b / 2.0**32)
  rem = b - hi * 2.0**32
  mid = jnp.floor(rem / 2.0**16)
  low = rem - mid * 2.0**16
  return low.astype(jnp.int32), mid.astype(jnp.int32), hi.astype(jnp.int32)


def _blocked(x: Array, fill) -> Array:
  """Flattens, pads to whole blocks and reshapes to ``(blocks, block)``."""
  flat = x.reshape(-1)
  n = flat.shape[0]
  block = min(n, _BLOCK)
  m = -(-n // block)
  pad = m * block - n
  if pad:
    flat = jnp.concatenate([flat, jnp.full((pad,), fill, flat.dtype)])
  return flat.reshape(m, block)


# `layout` is a static argument (the caller reads LAYOUT at call time), so
# that changing LAYOUT does not reuse a program traced in the other layout.


@functools.partial(jax.jit, static_argnames="layout")
def _budget_select(keys: tuple, costs: tuple, budget: Limbs, layout: str):
  return _select_impl(keys, costs, budget, layout=layout)


@functools.partial(jax.jit, static_argnames="layout")
def _ratio_select(scores: tuple, costs: tuple, budget: Limbs, layout: str):
  keys = tuple(ratio_keys(s, c) for s, c in zip(scores, costs))
  return _select_impl(keys, costs, budget, layout=layout)


@functools.partial(jax.jit, static_argnames=("by_magnitude", "layout"))
def _prune(leaves: tuple, costs: tuple, budget: Limbs, by_magnitude: bool, layout: str):
  scores = tuple(jnp.abs(leaf.astype(jnp.float32)) for leaf in leaves)
  if by_magnitude:
    keys = tuple(selection_lib.scores_to_keys(x) for x in scores)
    masks, _ = _select_impl(keys, costs, budget, layout=layout)
  else:
    masks, _ = _ratio_select(scores, costs, budget, layout=layout)
  pruned = tuple(jnp.where(m, leaf, jnp.zeros([], leaf.dtype)) for m, leaf in zip(masks, leaves))
  return masks, pruned


@functools.partial(jax.jit, static_argnames="layout")
def _budget_select_stats(keys: tuple, costs: tuple, budget: Limbs, layout: str):
  return _select_impl(keys, costs, budget, stats=True, layout=layout)


def top_keys_with_stats(
  keys: Sequence[Array], costs: Sequence[Array], budget
) -> tuple[list[Array], Array, Array, Array]:
  """:func:`budget_top_keys` plus the smallest selected key and the count.

  Used by :func:`optax_gsm.global_top_q`; both statistics come from the
  mask in the same program (a reduction of each leaf, or of the
  concatenated mask in the ``"concat"`` layout).

  Returns:
    ``(masks, threshold_key, min_selected_key, num_selected)``: the first two
    as :func:`budget_top_keys`; the smallest key among the selected entries
    (``2**31 - 1`` when nothing is selected) and how many are selected
    (int32).

  Example:
    >>> import jax.numpy as jnp
    >>> k = ratio_keys(jnp.array([9.0, 4.0, 3.0, 8.0]), jnp.array([3, 1, 1, 4]))
    >>> masks, _, low, count = top_keys_with_stats(
    ...     [k], [jnp.array([3, 1, 1, 4])], 5)
    >>> int(count), bool(low == ratio_keys(jnp.array(3.0), 1))
    (3, True)
  """
  keys = [jnp.asarray(k) for k in keys]
  for k in keys:
    if k.dtype != jnp.int32:
      raise TypeError(f"`keys` must be int32 arrays, got dtype {k.dtype}.")
  costs = _check_costs(costs, [k.shape for k in keys])
  masks, kth, low, count = _budget_select_stats(
    tuple(keys), costs, _budget_limbs(budget), layout=LAYOUT
  )
  return list(masks), kth, low, count


def _select_impl(
  keys: tuple, costs: tuple, budget: Limbs, stats: bool = False, layout: Optional[str] = None
) -> tuple[Any, ...]:
  """The selection, in the ``layout`` given or :data:`LAYOUT`.

  With ``stats`` also returns the smallest selected key and the number
  selected. Both layouts give bit-identical results.
  """
  layout = LAYOUT if layout is None else layout
  if layout not in LAYOUTS:
    raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}.")
  nan_key = jnp.int32(selection_lib.NAN_KEY)
  big_key = jnp.int32(jnp.iinfo(jnp.int32).max)
  shapes = [k.shape for k in keys]
  n = sum(math.prod(shape) for shape in shapes)
  if n == 0:
    masks = tuple(jnp.zeros(shape, bool) for shape in shapes)
    if stats:
      return masks, nan_key, big_key, jnp.int32(0)
    return masks, nan_key
  if n > _MAX_ENTRIES:
    raise ValueError(f"budget selection supports up to {_MAX_ENTRIES} entries in all, got {n}.")
  if layout == "auto":
    one_cost = all(math.prod(np.shape(c)) == 1 for c in costs)
    layout = "per_leaf" if one_cost or sharding.on_mesh(keys + tuple(costs)) else "concat"
  if layout == "per_leaf":
    return _select_per_leaf(keys, costs, budget, stats)
  return _select_concat(keys, costs, budget, stats)


def _select_concat(keys: tuple, costs: tuple, budget: Limbs, stats: bool) -> tuple[Any, ...]:
  """The selection over the concatenated leaves (in global index order).

  Concatenating keeps the compiled program the same size whatever the number
  of leaves; it costs one copy of the keys and of the costs, and on a mesh
  the concatenation gathers every leaf onto every device.
  """
  nan_key = jnp.int32(selection_lib.NAN_KEY)
  big_key = jnp.int32(jnp.iinfo(jnp.int32).max)
  shapes = [k.shape for k in keys]
  sizes = [math.prod(shape) for shape in shapes]
  n = sum(sizes)
  flat_k = jnp.concatenate([k.reshape(-1) for k in keys])
  flat_c = jnp.concatenate(
    [jnp.broadcast_to(c, k.shape).astype(jnp.int32).reshape(-1) for k, c in zip(keys, costs)]
  )
  # (blocks, block) layout; padding entries cost 0, so they change no sum.
  k2 = _blocked(flat_k, selection_lib.NAN_KEY)
  lo = _blocked(flat_c & _MASK16, 0)
  hi = _blocked(lax.shift_right_logical(flat_c, _SHIFT16), 0)

  def cost_where(sel) -> Limbs:
    s_lo = jnp.sum(jnp.where(sel, lo, 0), axis=1, dtype=jnp.int32)
    s_hi = jnp.sum(jnp.where(sel, hi, 0), axis=1, dtype=jnp.int32)
    return _norm(*(jnp.sum(x, dtype=jnp.int32) for x in _block_limbs(s_lo, s_hi)))

  sign = jnp.int32(-(2**31))

  def body(i, prefix_u):
    bit = lax.shift_left(jnp.int32(1), jnp.int32(31) - i)
    cand_u = prefix_u | bit
    over = _gt(cost_where(k2 >= (cand_u ^ sign)), budget)
    return jnp.where(over, cand_u, prefix_u)

  kth = lax.fori_loop(0, 32, body, jnp.int32(0)) ^ sign
  over = _gt(cost_where(k2 >= kth), budget)
  # Budget left after every entry above the threshold (their total fits).
  remaining = _sub(budget, cost_where(k2 > kth))

  # Inclusive running cost of the ties in index order: within the block,
  # plus the blocks before.
  tie = k2 == kth
  c_lo = jnp.where(tie, lo, 0)
  c_hi = jnp.where(tie, hi, 0)
  within = _block_limbs(
    jnp.cumsum(c_lo, axis=1, dtype=jnp.int32), jnp.cumsum(c_hi, axis=1, dtype=jnp.int32)
  )
  blocks = _block_limbs(
    jnp.sum(c_lo, axis=1, dtype=jnp.int32), jnp.sum(c_hi, axis=1, dtype=jnp.int32)
  )
  offset = _norm(*(jnp.cumsum(x, dtype=jnp.int32) - x for x in blocks))
  running = _add(within, (offset[0][:, None], offset[1][:, None], offset[2][:, None]))
  fits = ~_gt(running, remaining)
  mask = ((k2 > kth) | (tie & fits)).reshape(-1)[:n]
  # Everything fits: select all, NaN included; else NaN is never selected.
  mask = jnp.where(over, mask & (flat_k != nan_key), True)
  # Materialise the mask once: otherwise XLA may fuse the prefix sums that
  # produce it into every consumer (each leaf's update, counts), recomputing
  # them several times per step.
  mask = lax.optimization_barrier(mask)
  out, start = [], 0
  for shape, size in zip(shapes, sizes):
    out.append(mask[start : start + size].reshape(shape))
    start += size
  kth = jnp.where(over, kth, nan_key)
  if stats:
    low = jnp.min(jnp.where(mask, flat_k, big_key))
    return tuple(out), kth, low, jnp.sum(mask, dtype=jnp.int32)
  return tuple(out), kth


# --------------------------------------------------------------------------
# The per-leaf layout: exact sums per leaf, nothing concatenated.
#
# A sum of costs is a sum of *terms* s * m with int32 0 <= s, m < 2**31: per
# leaf of one cost (what eligible_costs makes of a uniform leaf) the count s
# of the entries where the predicate holds times the cost m; per leaf of
# varying costs the sums s_j of its limbs (_limb_plan) times m_j = 2**(w j).
# The terms of all leaves form a small (leaves, J) matrix; the products are
# taken in 16-bit limbs elementwise and summed by reductions, so the program
# holds a fixed number of scalar-limb operations whatever the number of
# leaves (a chain of per-leaf limb additions grows the program, and XLA's
# fusion of its shared subexpressions made it grow much faster).


def _limb_plan(n: int) -> tuple[int, int]:
  r"""``(width, count)``: the limbs in which the costs of an ``n``-entry leaf are summed.

  A sum over the whole leaf of a ``width``-bit limb is below
  :math:`n (2^w - 1) \le 2^{31} - 1`, so one int32 reduction of the leaf is
  exact however XLA splits it (per device, then an all-reduce). ``count``
  limbs of ``width`` bits cover the 31 bits of a cost: 2 limbs of 16 bits up
  to :math:`2^{15}` entries, 3 of 11 bits up to about :math:`2^{20}`, 4 of 8
  bits up to :math:`2^{23}`, and so on down to 31 limbs of one bit at
  :math:`2^{30}`.
  """
  width = 16
  while width > 1 and n * (2**width - 1) > _MAX_COST:
    width -= 1
  count = -(-31 // width)
  return -(-31 // count), count


def _mul(a: Array, b: Array) -> Limbs:
  """Elementwise limbs of ``a * b`` for int32 ``0 <= a, b < 2**31``.

  In 16-bit halves: the low halves' product (below 2**32) is taken in
  uint32, the cross products (below 2**31) and the high one in int32. The
  product is below 2**62, so its top limb is below 2**30.
  """
  a0, a1 = a & _MASK16, lax.shift_right_logical(a, _SHIFT16)
  b0, b1 = b & _MASK16, lax.shift_right_logical(b, _SHIFT16)
  p = a0.astype(jnp.uint32) * b0.astype(jnp.uint32)
  p0 = (p & np.uint32(_MASK16)).astype(jnp.int32)
  p1 = lax.shift_right_logical(p, np.uint32(16)).astype(jnp.int32)
  x, y = a0 * b1, a1 * b0
  l1 = p1 + (x & _MASK16) + (y & _MASK16)
  l2 = lax.shift_right_logical(x, _SHIFT16) + lax.shift_right_logical(y, _SHIFT16) + a1 * b1
  return _norm(p0, l1, l2)


def _total(limbs: Limbs) -> Limbs:
  """Exact sum of all entries of normalised limb arrays.

  Low and middle limbs are below 2**16, so a sum of up to 2**15 of them fits
  int32 (longer inputs are summed in blocks); the top limbs sum to at most
  the total divided by 2**32, below 2**29 for any total below 2**61.
  """
  flat = [x.reshape(-1) for x in limbs]
  if flat[0].shape[0] > _BLOCK:
    blocks = [_blocked(x, 0) for x in flat]
    flat = [x.reshape(-1) for x in _norm(*(jnp.sum(x, axis=1, dtype=jnp.int32) for x in blocks))]
  return _norm(*(jnp.sum(x, dtype=jnp.int32) for x in flat))


class _Leaves:
  """The keys and costs of the leaves, and how their costs are summed.

  ``mult`` is the ``(leaves, J)`` int32 matrix of the multipliers of
  :meth:`terms`: ``[c, 0, ...]`` for a leaf of one cost ``c``,
  ``[1, 2**w, 2**(2 w), ..., 0, ...]`` for a leaf summed in ``w``-bit limbs.
  """

  def __init__(self, keys: tuple, costs: tuple):
    self.keys = keys
    self.costs, self.plans = [], []
    for k, c in zip(keys, costs):
      c = jnp.asarray(c)
      if math.prod(c.shape) == 1:
        self.costs.append(c.reshape(()).astype(jnp.int32))
        self.plans.append(None)
      else:
        self.costs.append(c.astype(jnp.int32))
        self.plans.append(_limb_plan(k.size))
    self.width = max([1] + [p[1] for p in self.plans if p is not None])
    rows = []
    for c, plan in zip(self.costs, self.plans):
      if plan is None:
        row = [c] + [jnp.int32(0)] * (self.width - 1)
      else:
        w, count = plan
        row = [jnp.int32(2 ** (w * j)) for j in range(count)]
        row += [jnp.int32(0)] * (self.width - count)
      rows.append(jnp.stack(row))
    self.mult = jnp.stack(rows)

  def terms(self, l: int, sel: Array) -> Array:
    """The ``(J,)`` int32 terms of leaf ``l`` where ``sel``: each one exact
    reduction of the leaf (elementwise, then a sum)."""
    k, c, plan = self.keys[l], self.costs[l], self.plans[l]
    zero = jnp.int32(0)
    if k.size == 0:
      out = []
    elif plan is None:
      out = [jnp.sum(sel, dtype=jnp.int32)]
    else:
      # All limbs in one reduction over a leading axis of `count` limbs (one
      # program per leaf rather than `count`; a trailing limb axis ran
      # slower on XLA:CPU and was hoisted out of the search loop as a
      # `count`-fold copy of the costs).
      w, count = plan
      shifts = np.arange(count, dtype=np.int32) * np.int32(w)
      masks = np.array([2**w - 1] * (count - 1) + [-1], np.int32)
      c = jnp.broadcast_to(c, k.shape)[None]
      lead = (count,) + (1,) * k.ndim
      parts = jnp.right_shift(c, shifts.reshape(lead)) & masks.reshape(lead)  # costs are >= 0
      sums = jnp.sum(
        jnp.where(sel[None], parts, 0), axis=tuple(range(1, k.ndim + 1)), dtype=jnp.int32
      )
      out = [sums[j] for j in range(count)]
    return jnp.stack(out + [zero] * (self.width - len(out)))

  def per_leaf(self, pred) -> Limbs:
    """``(leaves,)`` limb arrays: the cost of the entries of each leaf where
    ``pred(keys)``."""
    s = jnp.stack([self.terms(l, pred(k)) for l, k in enumerate(self.keys)])
    return _norm(*(jnp.sum(x, axis=1, dtype=jnp.int32) for x in _mul(s, self.mult)))

  def total(self, pred) -> Limbs:
    """The cost of all entries where ``pred(keys)``."""
    s = jnp.stack([self.terms(l, pred(k)) for l, k in enumerate(self.keys)])
    return _total(_mul(s, self.mult))

  def leaf_total(self, l: int, sel: Array) -> Limbs:
    """The cost of the entries of leaf ``l`` where ``sel``."""
    return _total(_mul(self.terms(l, sel), self.mult[l]))


def _at(limbs: Limbs, i) -> Limbs:
  """Entry ``i`` of limb arrays."""
  return limbs[0][i], limbs[1][i], limbs[2][i]


def _select_per_leaf(keys: tuple, costs: tuple, budget: Limbs, stats: bool) -> tuple[Any, ...]:
  r"""The selection with per-leaf sums: what partitions on a mesh.

  The same selection as :func:`_select_concat`, computed without a
  concatenated or full-size intermediate other than elementwise ones:

  * every sum of costs is a sum over leaves of exact reductions of each leaf
    (a reduction per shard and a scalar all-reduce when it is sharded),
    added as 16-bit limbs (see :class:`_Leaves`);
  * the threshold :math:`t^*` is found by the same 32 passes;
  * the ties at :math:`t^*`: with :math:`T_l` the cost of the ties in leaf
    :math:`l` and :math:`P_l = \sum_{j<l} T_j`, the ties of leaf :math:`l`
    are all taken while :math:`P_l + T_l \le R` (:math:`R`: the budget left
    after the entries above :math:`t^*`); the first leaf :math:`l^*` with
    :math:`P_{l^*} + T_{l^*} > R` holds the cut, and no tie after it is
    taken. Inside :math:`l^*` the running cost of the tie of flat index
    :math:`i` is :math:`P_{l^*} + f(i + 1)`, with :math:`f(c)` the cost of
    the ties of index :math:`< c`, nondecreasing in :math:`c`; so that tie is
    taken iff :math:`i < c^*`, :math:`c^* = \max\{c : f(c) \le R - P_{l^*}\}`,
    which is built bit by bit from the most significant bit (one exact
    reduction of that leaf per bit, in a :func:`jax.lax.switch` on
    :math:`l^*`) instead of a prefix sum.

  The masks are then elementwise in the keys, the flat index and a few
  scalars, so they fuse into their consumers.
  """
  nan_key = jnp.int32(selection_lib.NAN_KEY)
  big_key = jnp.int32(jnp.iinfo(jnp.int32).max)
  leaves = _Leaves(keys, costs)
  sign = jnp.int32(-(2**31))

  def body(i, prefix_u):
    bit = lax.shift_left(jnp.int32(1), jnp.int32(31) - i)
    cand_u = prefix_u | bit
    cand = cand_u ^ sign
    over = _gt(leaves.total(lambda k: k >= cand), budget)
    return jnp.where(over, cand_u, prefix_u)

  kth = lax.fori_loop(jnp.int32(0), jnp.int32(32), body, jnp.int32(0)) ^ sign
  above = leaves.total(lambda k: k > kth)
  ties = leaves.per_leaf(lambda k: k == kth)
  upto = lax.associative_scan(_add, ties)
  # cost(k >= kth) = cost(k > kth) + the cost of all ties.
  over = _gt(_add(above, _at(upto, -1)), budget)
  remaining = _sub(budget, above)

  # The leaf that holds the cut, and the budget left for its ties. The
  # inclusive prefix sums over leaves are nondecreasing, so the leaves whose
  # prefix fits come first and `cut` counts them.
  num = len(keys)
  fits = ~_gt(upto, remaining)  # (leaves,) against scalars
  cut = jnp.sum(fits, dtype=jnp.int32)
  at = jnp.minimum(cut, num - 1)
  # Where cut < num: the ties before the cut leaf cost upto - ties <= R.
  before = _sub(_at(upto, at), _at(ties, at))
  left = _sub(remaining, before)

  def cut_search(l):
    k = keys[l]
    nbits = max(1, int(k.size).bit_length())

    def branch(left):
      idx = _flat_index(k.shape)
      tie = k == kth

      def step(i, prefix):
        cand = prefix | lax.shift_left(jnp.int32(1), jnp.int32(nbits - 1) - i)
        fits = ~_gt(leaves.leaf_total(l, tie & (idx < cand)), left)
        return jnp.where(fits, cand, prefix)

      return lax.fori_loop(jnp.int32(0), jnp.int32(nbits), step, jnp.int32(0))

    return branch

  branches = [cut_search(l) for l in range(num)] + [lambda left: jnp.int32(0)]
  first_out = lax.switch(cut, branches, left)

  masks, lows, counts = [], [], []
  for l, k in enumerate(keys):
    limit = jnp.where(cut > l, jnp.int32(k.size), jnp.where(cut == l, first_out, 0))
    m = (k > kth) | ((k == kth) & (_flat_index(k.shape) < limit))
    # Everything fits: select all, NaN included; else NaN is never selected.
    m = jnp.where(over, m & (k != nan_key), True)
    masks.append(m)
    if stats and k.size:
      # Both statistics of the leaf in one (variadic) reduction: a smaller
      # program than two; on a mesh XLA all-gathers the per-device pairs.
      low_l, count_l = lax.reduce(
        (jnp.where(m, k, big_key), m.astype(jnp.int32)),
        (big_key, jnp.int32(0)),
        lambda a, b: (jnp.minimum(a[0], b[0]), a[1] + b[1]),
        tuple(range(k.ndim)),
      )
      lows.append(low_l)
      counts.append(count_l)
  kth = jnp.where(over, kth, nan_key)
  if stats:
    low = jnp.min(jnp.stack(lows)) if lows else big_key
    count = jnp.sum(jnp.stack(counts), dtype=jnp.int32) if counts else jnp.int32(0)
    return tuple(masks), kth, low, count
  return tuple(masks), kth
