"""Exact global top-Q selection over a list of score arrays.

Every backend here computes the same mask. The order it ranks by is total and
deterministic:

1. a larger score ranks first;
2. among equal scores, the lower *global flat index* ranks first. The global
   index of an entry is its row-major index inside its leaf, offset by the
   sizes of the leaves before it in ``jax.tree.leaves`` order;
3. NaN ranks below every number and is never selected unless ``Q >= N``, in
   which case everything is selected (so that ``compression=1`` is exactly
   momentum SGD, NaNs included);
4. ``-0.0`` and ``+0.0`` are the same score.

The selected set is the first ``Q`` entries in that order.

Scores are compared as int32 *keys*: the IEEE-754 bit pattern of a float32
orders like the float itself once negative values have their magnitude bits
flipped, so an exact search over keys needs no sorting and no floating-point
comparisons of nearly equal numbers.

Backends:

* ``"top_k"``: :func:`jax.lax.top_k` over the concatenated keys (stable, so
  ties go to the lower index). The reference; it sorts, and on CPU it is very
  slow for millions of entries. It needs a concrete Q; under a traced Q (a
  schedule, :func:`optax.inject_hyperparams`) it ranks with a stable sort.
* ``"threshold"``: finds the Q-th largest key bit by bit from the most
  significant bit (a radix descent: 32 counting passes, never a sort), then
  breaks ties at the threshold by global index with a second radix descent
  over indices (only when the ties at the threshold are not all taken).
  Works per leaf, so the scores are never concatenated, communicates only
  scalar counts on a mesh, and accepts a traced Q.
* ``"search"``: an interpolation search on counts, 8 thresholds per
  counting pass, typically 3 to 6 passes instead of 32, warm-started by
  :func:`optax_gsm.global_top_q` from the previous step's threshold; see
  :mod:`optax_gsm.fast_select`. Accepts a traced Q; never concatenates or
  sorts the scores.
* ``"auto"``: the fastest exact backend for the platform (``"search"``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from optax_gsm import fast_select

Array = jax.Array

SELECTIONS = ("auto", "search", "threshold", "top_k")

# The key that NaN maps to: below the key of -inf.
NAN_KEY = jnp.iinfo(jnp.int32).min


def scores_to_keys(scores: Array) -> Array:
  """Maps float scores to int32 keys that sort like the scores.

  Args:
    scores: a floating-point array (any float dtype; it is widened to float32,
      which is exact for bfloat16 and float16).

  Returns:
    An int32 array of the same shape. ``a > b`` for scores iff
    ``key(a) > key(b)``; ``key(-0.0) == key(0.0) == 0``; NaN maps to
    ``NAN_KEY``, the smallest int32.

  Example:
    >>> import jax.numpy as jnp
    >>> keys = scores_to_keys(jnp.array([1.0, -1.0, 0.0, -0.0, jnp.nan]))
    >>> [int(k) for k in keys]
    [1065353216, -1065353217, 0, 0, -2147483648]
  """
  s = jnp.asarray(scores)
  if s.dtype == jnp.float64:
    # Keys are 32-bit; float64 scores are rounded to float32, which keeps the
    # order up to ties between values that round together.
    s = s.astype(jnp.float32)
  s = s.astype(jnp.float32)
  bits = lax.bitcast_convert_type(s, jnp.int32)
  # Negative floats order in reverse of their bit patterns; flipping the
  # magnitude bits restores the order and maps -0.0 (0x80000000) to -1.
  keys = jnp.where(bits >= 0, bits, bits ^ jnp.int32(0x7FFFFFFF))
  keys = jnp.where(keys == -1, 0, keys)
  return jnp.where(jnp.isnan(s), NAN_KEY, keys)


def keys_to_scores(keys: Array) -> Array:
  """Inverse of :func:`scores_to_keys` (NaN keys map to NaN)."""
  bits = jnp.where(keys >= 0, keys, keys ^ jnp.int32(0x7FFFFFFF))
  out = lax.bitcast_convert_type(bits, jnp.float32)
  return jnp.where(keys == NAN_KEY, jnp.nan, out)


def top_q_keys(keys: Sequence[Array], q, *, method: str = "threshold") -> tuple[list[Array], Array]:
  """Selects the Q largest keys across all arrays together.

  Args:
    keys: int32 key arrays (see :func:`scores_to_keys`), in the fixed leaf
      order that breaks ties.
    q: the number to select, a Python int or an int scalar (may be traced).
      It is clipped to ``[0, N]``.
    method: ``"search"``, ``"threshold"`` or ``"top_k"`` (``"auto"`` is
      ``"search"``).

  Returns:
    ``(masks, kth_key)``: boolean arrays shaped like ``keys`` with exactly
    ``min(Q, N)`` True entries (fewer if some non-selected-by-rule NaNs would
    be needed, see the module docstring), and the key of the Q-th largest
    entry (``NAN_KEY`` when ``Q == 0``).

  Example:
    >>> import jax.numpy as jnp
    >>> k = scores_to_keys(jnp.array([3.0, 1.0, 3.0, 2.0]))
    >>> masks, _ = top_q_keys([k], 2)
    >>> masks[0].tolist()
    [True, False, True, False]
    >>> masks, _ = top_q_keys([k[:2], k[2:]], 1, method="top_k")
    >>> [m.tolist() for m in masks]
    [[True, False], [False, False]]
  """
  keys = [jnp.asarray(k) for k in keys]
  for k in keys:
    if k.dtype != jnp.int32:
      raise TypeError(f"keys must be int32 arrays, got dtype {k.dtype}.")
  n = sum(int(k.size) for k in keys)
  q = jnp.clip(jnp.asarray(q, jnp.int32), 0, n)
  if method in ("auto", "search"):
    masks, kth = fast_select.select(lambda ks, i: ks[i], keys, [k.shape for k in keys], q)
  elif method == "threshold":
    masks, kth = _threshold_select(keys, q)
  elif method == "top_k":
    masks, kth = _top_k_select(keys, q)
  else:
    raise ValueError(f"method must be 'search', 'threshold' or 'top_k', got {method!r}.")
  # NaN is never selected unless everything is.
  everything = q >= n
  masks = [m & ((k != NAN_KEY) | everything) for m, k in zip(masks, keys)]
  return masks, kth


def _count_ge(keys: Sequence[Array], t: Array) -> Array:
  total = jnp.int32(0)
  for k in keys:
    total = total + jnp.sum(k >= t, dtype=jnp.int32)
  return total


def kth_largest_key(keys: Sequence[Array], q: Array) -> Array:
  """The Q-th largest key (1-based) across ``keys``, found without sorting.

  The answer is the largest ``t`` with ``count(key >= t) >= Q``. It is built
  one bit at a time from the most significant bit, in the unsigned order of
  ``key ^ 0x80000000``: 32 counting passes over the keys.
  Returns ``NAN_KEY`` when ``Q <= 0``.
  """
  sign = jnp.int32(-(2**31))

  def body(i, prefix_u):
    # prefix_u holds the answer's top i bits in the unsigned domain (stored in
    # an int32 register); try setting the next bit.
    bit = lax.shift_left(jnp.int32(1), jnp.int32(31) - i)
    cand_u = prefix_u | bit
    cand = cand_u ^ sign  # back to the signed key domain
    ok = _count_ge(keys, cand) >= q
    return jnp.where(ok, cand_u, prefix_u)

  # int32 bounds: with jax_enable_x64 Python ints would make an int64 counter.
  prefix_u = lax.fori_loop(jnp.int32(0), jnp.int32(32), body, jnp.int32(0))
  return jnp.where(q > 0, prefix_u ^ sign, NAN_KEY)


def _threshold_select(keys, q):
  kth = kth_largest_key(keys, q)
  n_greater = jnp.int32(0)
  n_equal = jnp.int32(0)
  for k in keys:
    n_greater = n_greater + jnp.sum(k > kth, dtype=jnp.int32)
    n_equal = n_equal + jnp.sum(k == kth, dtype=jnp.int32)
  take = q - n_greater  # how many entries equal to kth are selected

  def all_ties():
    return [k >= kth for k in keys]

  def first_ties():
    # Ties are taken in global flat index order. The index of the take-th tie
    # is found by a radix descent over global indices (counting passes, so
    # per-leaf sums: scalar all-reduces on a mesh), not by a cumsum over the
    # flattened leaf, which XLA can only partition by all-gathering the leaf.
    index, offset = [], 0
    for k in keys:
      index.append(_global_index(k.shape, offset))
      offset += k.size
    nbits = max(1, (offset - 1).bit_length())

    def body(i, last):
      # The largest c with #(ties with index < c) < take is the take-th
      # tie's index; build it from the most significant bit.
      cand = last | lax.shift_left(jnp.int32(1), jnp.int32(nbits - 1) - i)
      count = jnp.int32(0)
      for k, idx in zip(keys, index):
        count = count + jnp.sum((k == kth) & (idx < cand), dtype=jnp.int32)
      return jnp.where(count < take, cand, last)

    last = lax.fori_loop(jnp.int32(0), jnp.int32(nbits), body, jnp.int32(0))
    return [(k > kth) | ((k == kth) & (idx <= last)) for k, idx in zip(keys, index)]

  masks = lax.cond(take == n_equal, all_ties, first_ties)
  return [m & (q > 0) for m in masks], kth


def _global_index(shape: tuple, offset: int) -> Array:
  """Row-major flat index of every entry of a leaf, plus ``offset`` (int32)."""
  idx = jnp.full(shape, offset, jnp.int32)
  stride = 1
  for d in reversed(range(len(shape))):
    idx = idx + lax.broadcasted_iota(jnp.int32, shape, d) * stride
    stride *= shape[d]
  return idx


def _top_k_select(keys, q):
  flat = jnp.concatenate([k.reshape(-1) for k in keys])
  n = flat.shape[0]
  try:
    q_static = int(q)
  except (jax.errors.ConcretizationTypeError, TypeError):
    q_static = None
  if q_static is not None:
    if q_static == 0:
      sel = jnp.zeros((n,), bool)
      kth = jnp.int32(NAN_KEY)
    else:
      values, idx = lax.top_k(flat, q_static)
      sel = jnp.zeros((n,), bool).at[idx].set(True)
      kth = values[-1]
  else:
    # A traced Q cannot size top_k's output; rank everything with a stable
    # sort on descending key, which orders ties by index exactly as top_k.
    order = jnp.argsort(_descending(flat), stable=True)
    rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    sel = rank < q
    sorted_keys = flat[order]
    kth = jnp.where(q > 0, sorted_keys[jnp.maximum(q - 1, 0)], NAN_KEY)
  masks, start = [], 0
  for k in keys:
    masks.append(sel[start : start + k.size].reshape(k.shape))
    start += k.size
  return masks, kth


def _descending(keys: Array) -> Array:
  # Bitwise NOT reverses int32 order without the overflow of negating INT_MIN.
  return ~keys
