"""Exact global top-Q selection in a few counting passes (the ``"search"`` backend).

The selected set is exactly the one of :func:`optax_gsm.selection.top_q_keys`
(larger key first, ties by lower global flat index, NaN last): only the way
the Q-th largest key is found differs.

How:

* A *counting pass* counts, for 8 candidate thresholds at once, how many keys
  are ``>=`` each. Every leaf is split into rows of up to 32 keys (on one
  device the flattened leaf, on a mesh its last axis, so that no row
  straddles a shard); one XLA loop fusion compares each row against the 8 thresholds and writes
  the 8 per-row counts packed into two int32 (multi-threaded, vectorised
  across the thresholds), and a small second reduction adds those up per
  leaf. On XLA:CPU this is ~5x faster than one ``jnp.sum(keys >= t)``, which
  it computes through a full-size temporary and a single-threaded tree of
  reduce-windows, and it counts 8 thresholds for the price of ~1.5.
* The passes run an *interpolation search* for the Q-th key: the bracket
  ``[lo, hi)`` with ``count(>= lo) >= Q > count(>= hi)`` is narrowed around
  the linear interpolation of the counts, with the 8 thresholds at 1/4, 1, 3
  and 12 standard deviations of the count noise on either side, which
  typically shrinks the number of keys left in the bracket from ``b`` to
  about ``sqrt(b)`` per pass. Safeguards keep it exact and bounded on any
  input: galloping while a side of the bracket is open, an evenly spaced
  pass whenever a pass did not shrink the bracket well, and a pass that
  enumerates the last <= 9 keys.
* On one device, for models of at least :data:`COLLECT_MIN` keys, the
  search over the model stops as soon as the bracket holds at most a few
  thousand keys (:data:`COLLECT_ROWS`; for GSM in the steady state, after
  the first pass). Each pass also writes the 8 counts of
  every row of 32 keys (packed, 1 byte per 4 keys), and the state keeps each
  row's counts at both ends of the bracket: the rows whose counts differ
  hold the bracket's keys. Those rows are listed in order (a popcount prefix
  sum and binary searches, :func:`_set_bits`), gathered (XLA computes the
  keys of the gathered rows only), the bracket's keys among them listed in
  global order, and the search ends over that short list. When the bracket
  is one key wide with more ties than that, the rows' tie counts give the row
  of the cut, and only that row is gathered.
* It starts from a *hint*: for GSM, the previous step's threshold moved by
  its recent drift, with the recent spread of that drift as the scale, kept
  in the optimizer state (the score distribution moves slowly, so the first
  pass usually brackets the answer within a few thousand keys).
* Without a hint (the first step, :func:`optax_gsm.magnitude_prune`), or
  when the first pass shows the hint far off (one side of the bracket still
  open), the next thresholds come from a *sample*: every 257th key or so
  (a prime stride, at most ~2**17 keys), sorted, read at the sample ranks
  of the Q-th key plus 1/4 to 12 binomial spreads. The sample is computed
  only then (inside a :func:`jax.lax.cond`) and only for models of at least
  :data:`SAMPLE_MIN` keys on one device; smaller ones, and any on a mesh
  (where the sample would be gathered), start at ``2**-20`` and gallop.
* On a mesh (where the gathers would cross devices) the passes go on to the
  end. When the search stops on ``count(>= lo) == Q`` with a bracket wider
  than a key, one masked-min pass (over the leaves with keys in the bracket,
  a :func:`jax.lax.cond` skipping the others) gives the exact Q-th key. Ties
  at the threshold are broken by global flat index: the per-leaf counts at
  the bracket ends tell which leaf holds the cut, and a 9-way search over
  the flat index of that leaf only (a :func:`jax.lax.switch` inside the
  loop) finds it.
* Keys are a function of the caller's operands (for GSM, of the gradient and
  the weights), recomputed inside every pass, so nothing of the size of the
  model is materialised besides the packed per-row counts (1 byte per 4
  keys) and, on one device, each row's counts at the bracket's ends (2
  bytes per 32 keys). The masks are elementwise expressions of the keys and a few
  scalars (materialised as control-flow outputs, so that XLA does not
  recompute them per entry), so they fuse into the consumer (the momentum
  update).

Each leaf's share of the ties at the cut reaches the masks as a run-time
scalar (an output of a :func:`jax.lax.cond`), not as an
expression of the leaf's number: then the fused update is the same
computation for every leaf of one shape, as are the passes, and XLA:CPU
compiles it once and reuses it, so the build time grows with the number of
leaf shapes more than with the number of leaves.

On a mesh, every step is an elementwise operation, a reduction, a slice and
split of a leaf's last axis, or arithmetic on small replicated arrays, which
XLA's SPMD partitioner handles without gathering a leaf: per pass, a sharded
model all-reduces a few int32 per leaf. Nothing is concatenated or sorted.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_gsm import sharding

Array = jax.Array

M = 8  # thresholds per counting pass
W = 32  # keys per row of a counting pass
WALK_TIES = 2  # a cut at one of the first WALK_TIES ties: min-index passes
SKIP_MIN = 1 << 15  # leaves at least this large are skipped when idle
COLLECT_ROWS = 1 << 14  # at most this many rows of keys are collected (and 1/8 of all rows)
COLLECT_ROWS_MIN = 64  # ... or this many, in a small model
COLLECT_MIN = 1 << 16  # fewer keys than this: no collecting (a pass costs little, the build more)
GATHER_ROWS = 256  # rows gathered per step of the collecting loop

NAN_KEY = np.int32(np.iinfo(np.int32).min)
_INT_MAX = np.int32(np.iinfo(np.int32).max)
# The largest key of a score (+inf) is 0x7F800000; nothing is >= TOP_KEY.
TOP_KEY = np.int32(0x7F800001)
_SIGN = np.uint32(0x80000000)
_TOP_U = np.uint32(int(TOP_KEY) ^ 0x80000000)

# Offsets of the 8 thresholds around the estimate, in standard deviations.
_SYM = np.array([-12.0, -3.0, -1.0, -0.25, 0.25, 1.0, 3.0, 12.0], np.float32)
# While one side of the bracket is open: gallop away from the known bound,
# starting at the reach of the last pattern.
_GALLOP = np.array([0.5, 2.0, 8.0, 32.0, 128.0, 512.0, 2048.0, 8192.0], np.float32)
_GALLOP_GROWTH = np.float32(24.0)
_F_MAX = np.float32(4.0e9)

# Pass modes.
_INTERP, _UP, _DOWN, _EVEN = 0, 1, 2, 3

_DEBUG = False


class SearchInfo(NamedTuple):
  """Diagnostics of one selection (int32 scalars)."""

  key_passes: jax.Array  # counting passes over all leaves to find the key
  min_pass: jax.Array  # 1 if a masked-min pass fixed the exact key
  tie_passes: jax.Array  # passes over one leaf for the tie-break
  buffer_passes: jax.Array  # counting passes over the collected keys (0: none collected)


def _to_u(k):
  return lax.bitcast_convert_type(k, jnp.uint32) ^ _SIGN


def _to_i(u):
  return lax.bitcast_convert_type(u ^ _SIGN, jnp.int32)


# --- blocked views ------------------------------------------------------------


# Row widths that XLA:CPU compiles to its fastest counting loops (measured
# with jax 0.10: 32, 24, 25, 26, 27 within 10% of each other; 28 to 31 and
# 16 to 23 ~1.5-2x slower per key, narrower rows slower still).
_FAST_WIDTHS = (32, 24, 25, 26, 27)


def _row_width(d: int) -> Optional[int]:
  """Keys per row for a last axis of size ``d``: a fast width that divides
  ``d``, else its largest divisor in [4, 32] (None: no such divisor)."""
  for r in _FAST_WIDTHS:
    if d % r == 0:
      return r
  for r in range(min(W, d), 3, -1):
    if d % r == 0:
      return r
  return None


def _blocks(x: Array):
  """Views ``x`` as ``(main, rest)``, one of them None.

  ``main`` splits the last axis into rows of :func:`_row_width` keys (32
  when it divides the axis). Rows never straddle a shard of that axis when
  its shards are a multiple of the row width, and every other axis keeps
  its sharding. Without a usable row width (a last axis below 4 or with no
  divisor in [4, 32]), ``rest`` is ``x`` itself, reduced as a whole (slower
  on CPU, still partitionable).
  """
  if x.ndim == 0:
    x = x.reshape(1)
  d = x.shape[-1]
  r = _row_width(d)
  if r is None:
    return None, x
  return x.reshape(x.shape[:-1] + (d // r, r)), None


def _flat_index(shape) -> Array:
  """Row-major flat index of every entry of an array of ``shape`` (int32)."""
  idx = jnp.zeros(shape, jnp.int32)
  stride = 1
  for d in reversed(range(len(shape))):
    if shape[d] > 1:
      idx = idx + lax.broadcasted_iota(jnp.int32, shape, d) * np.int32(stride)
    stride *= shape[d]
  return idx


def _blocked_index(x: Array):
  """The flat index of ``x``'s entries, blocked like :func:`_blocks`."""
  return _blocks(_flat_index(x.shape))


def _packed_rows(mains, pred_fn: Callable[..., Array], m: int) -> tuple[Array, Array]:
  """Per-row counts of ``pred_fn`` over row-blocked operands, packed, and their sums.

  Returns ``(packed, counts)``: ``(..., m / 4)`` int32 with the count of
  threshold ``j`` of each row in byte ``j % 4`` of column ``j // 4``, and the
  ``(m,)`` totals.
  """
  pred = pred_fn(*[a[..., None] for a in mains])  # (..., W, m)
  per_row = jnp.sum(pred, axis=-2, dtype=jnp.int32)  # (..., m), <= W
  # Four per-row counts (<= 32) are packed into the bytes of one int32,
  # which quarters what the pass writes. The barrier keeps XLA from
  # merging this sum with the next into one that it would run
  # single-threaded through a full-size temporary.
  shifts = np.arange(4, dtype=np.int32) * 8
  packed = jnp.sum(
    per_row.reshape(per_row.shape[:-1] + (m // 4, 4)) << shifts, axis=-1, dtype=jnp.int32
  )  # (..., m / 4)
  packed = lax.optimization_barrier(packed)
  # Unpacked straight to (..., m): a (m/4, 4) sum reshaped to (m,) would
  # put a reshape after every leaf's sum, and XLA's simplifier then moves
  # those reshapes through the chain of additions over the leaves one
  # addition per round, never reaching its fixed point (two pipelines of
  # 25 rounds: over 1 s of the ResNet-50-shaped build).
  fields = (jnp.repeat(packed, 4, axis=-1) >> np.tile(shifts, m // 4)) & 255  # (..., m)
  per = jnp.sum(fields, axis=tuple(range(fields.ndim - 1)), dtype=jnp.int32)
  return packed, per


def _count(parts, pred_fn: Callable[..., Array], m: int) -> Array:
  """(m,) int32 counts of ``pred_fn`` over blocked operands.

  ``parts`` is a list of ``(main, rest)`` pairs (one per operand, blocked by
  :func:`_blocks`); ``pred_fn(*operands)`` broadcasts them against a trailing
  axis of ``m`` thresholds.
  """
  mains = [p[0] for p in parts]
  rests = [p[1] for p in parts]
  total = jnp.zeros((m,), jnp.int32)
  if mains[0] is not None:
    total = total + _packed_rows(mains, pred_fn, m)[1]
  if rests[0] is not None:
    pred = pred_fn(*[a[..., None] for a in rests])  # (..., r, m)
    axes = tuple(range(pred.ndim - 1))
    total = total + jnp.sum(pred, axis=axes, dtype=jnp.int32)
  return total


# The passes over one leaf, jitted so that leaves of one shape share one
# trace and one lowered function (XLA inlines them: the program is the same).


@jax.jit
def _count_ge(keys: Array, ts: Array) -> Array:
  """(M,) counts of ``keys >= ts[j]``."""
  return _count([_blocks(keys)], lambda a: a >= ts, M)


def _flat_width(size: int) -> int:
  """Keys per row of a flattened leaf of ``size`` keys (one device): a width of
  :func:`_row_width` for ``size``, else its largest divisor below 4."""
  r = _row_width(size)
  return r if r is not None else max(d for d in (1, 2, 3) if size % d == 0)


@functools.partial(jax.jit, static_argnums=2)
def _count_ge_rows(keys: Array, ts: Array, width: int) -> tuple[Array, Array]:
  """Per-row counts (packed, see :func:`_packed_rows`) and (M,) counts of ``keys >= ts[j]``,
  over the flattened keys in rows of ``width`` (:func:`_flat_width`)."""
  return _packed_rows([keys.reshape(-1, width)], lambda a: a >= ts, M)


def _row_count(packed: Array, j: Array) -> Array:
  """Per-row counts (uint8) at threshold ``j`` (a traced index) from :func:`_count_ge_rows`."""
  # Static columns and a select rather than a dynamic slice of the column:
  # XLA:CPU vectorises the former, not the latter.
  word = packed[:, 0]
  for col in range(1, packed.shape[1]):
    word = jnp.where(j // 4 == col, packed[:, col], word)
  return ((word >> ((j % 4) * 8)) & 255).astype(jnp.uint8)


@jax.jit
def _count_ties_below(keys: Array, kth: Array, ps: Array) -> Array:
  """(M,) counts of the entries equal to ``kth`` with flat index ``< ps[j]``."""
  return _count([_blocks(keys), _blocked_index(keys)], lambda kk, ii: (kk == kth) & (ii < ps), M)


def _min(parts, value_fn: Callable[..., Array]) -> Array:
  """Min over blocked operands of ``value_fn(*operands)`` (an int32 array)."""
  mains = [p[0] for p in parts]
  rests = [p[1] for p in parts]
  out = jnp.asarray(_INT_MAX)
  if mains[0] is not None:
    per_row = jnp.min(value_fn(*mains), axis=-1)
    per_row = lax.optimization_barrier(per_row)
    out = jnp.minimum(out, jnp.min(per_row))
  if rests[0] is not None:
    out = jnp.minimum(out, jnp.min(value_fn(*rests)))
  return out


@jax.jit
def _min_at_least(keys: Array, lo: Array) -> Array:
  """The smallest key ``>= lo`` (``_INT_MAX`` if none)."""
  return _min([_blocks(keys)], lambda a: jnp.where(a >= lo, a, _INT_MAX))


@jax.jit
def _next_tie(keys: Array, kth: Array, cur: Array) -> Array:
  """The smallest flat index ``> cur`` of an entry equal to ``kth`` (``_INT_MAX`` if none)."""
  return _min(
    [_blocks(keys), _blocked_index(keys)],
    lambda kk, ii: jnp.where((kk == kth) & (ii > cur), ii, _INT_MAX),
  )


# --- the search for the Q-th key ----------------------------------------------


def _thresholds(lo, hi, center, sigma, mode):
  """8 thresholds (uint32, nondecreasing) strictly inside ``(lo, hi)``."""
  width = hi - lo  # >= 2
  inner = width - np.uint32(1)  # offsets 1 .. inner
  j = jnp.arange(1, M + 1, dtype=jnp.uint32)
  enum = jnp.minimum(j, inner)  # the last few keys
  # Evenly spaced: j * width / 9, without overflow.
  q9, r9 = width // np.uint32(M + 1), width % np.uint32(M + 1)
  even = jnp.clip(j * q9 + (j * r9) // np.uint32(M + 1), np.uint32(1), inner)
  # Around the centre.
  pat = jnp.where(
    mode == _UP,
    jnp.asarray(_GALLOP),
    jnp.where(mode == _DOWN, -jnp.asarray(_GALLOP[::-1]), jnp.asarray(_SYM)),
  )
  off = jnp.clip(sigma * pat, -_F_MAX, _F_MAX)
  c = jnp.clip(center - lo, np.uint32(1), inner)  # centre, offset from lo
  up = jnp.floor(jnp.maximum(off, 0.0)).astype(jnp.uint32)
  dn = jnp.floor(jnp.maximum(-off, 0.0)).astype(jnp.uint32)
  plus = c + jnp.minimum(up, inner - c)  # capped at inner
  minus = c - jnp.minimum(dn, c - np.uint32(1))  # floored at 1
  around = jnp.where(off >= 0, plus, minus)
  offs = jnp.where(width <= np.uint32(M + 1), enum, jnp.where(mode == _EVEN, even, around))
  return lo + offs


class _S(NamedTuple):
  lo: Array  # uint32: count(>= lo) >= q
  hi: Array  # uint32: count(>= hi) < q
  c_lo: Array  # int32
  c_hi: Array  # int32
  leaf_lo: Array  # (K,) int32 count(>= lo) per leaf
  leaf_hi: Array  # (K,) int32 count(>= hi) per leaf
  sigma: Array  # float32, the spread used for the next thresholds
  ts: Array  # (M,) int32 keys: the thresholds of the next pass
  passes: Array  # int32
  sampled: Array  # bool: the sample's thresholds have been used
  resample: Array  # bool: the next pass takes the sample's thresholds instead of ``ts``
  row_lo: Any  # (R,) uint8 count(>= lo) per row of the flattened leaves (or ())
  row_hi: Any  # (R,) uint8 count(>= hi) per row (or ())


def _next_guess(lo, hi, c_lo, c_hi, sigma, q, prev_width, prev_nb):
  """Centre, spread and mode of the next pass, from the current bracket."""
  width = hi - lo
  nb = c_lo - c_hi  # keys in [lo, hi), >= 1
  need = q - c_hi  # 1 .. nb
  lo_open = lo == np.uint32(0)
  hi_open = hi == _TOP_U
  nb_f = nb.astype(jnp.float32)
  frac = need.astype(jnp.float32) / nb_f
  width_f = width.astype(jnp.float32)
  est = jnp.clip(width_f * (1.0 - frac), 1.0, _F_MAX)
  center_interp = lo + est.astype(jnp.uint32)
  sd = jnp.sqrt(jnp.maximum(nb_f * frac * (1.0 - frac), 1.0))
  sigma_interp = jnp.maximum(sd * width_f / nb_f, 0.5)
  # A pass that shrank neither the width nor the count by 4x: go even.
  slow = (width > prev_width // np.uint32(4)) & (nb > prev_nb // 4) & ~lo_open & ~hi_open
  mode = jnp.where(hi_open, _UP, jnp.where(lo_open, _DOWN, jnp.where(slow, _EVEN, _INTERP)))
  grow = jnp.minimum(sigma * _GALLOP_GROWTH, _F_MAX)
  center = jnp.where(hi_open, lo, jnp.where(lo_open, hi, center_interp))
  sigma = jnp.where(hi_open | lo_open, grow, sigma_interp)
  return center, sigma, mode.astype(jnp.int32)


def _search_key(
  count_pass,
  num_leaves: int,
  leaf_sizes,
  n: int,
  q,
  center,
  sigma,
  sample_pass=None,
  cold=None,
  rows0=None,
  collect_max=None,
):
  """Interpolation search for the Q-th largest key (``q`` in [1, n]).

  ``count_pass(ts, token, leaf_lo, leaf_hi)`` returns the ``(K, M)``
  counts per leaf and, with ``rows0`` (the keys per row of the flattened
  leaves), the packed per-row counts (:func:`_count_ge_rows`; else ``()``):
  the state then keeps each row's counts at both ends of the bracket. With
  ``collect_max``, the search stops as soon as the bracket holds at most
  ``collect_max`` keys (or only one key value), for the caller to collect
  them; else when ``count(>= lo) == q`` or the bracket is one key wide.

  ``sample_pass(lo, hi, token)``, if given, returns 8 thresholds inside
  ``(lo, hi)`` read off a sorted sample of the keys (:func:`_sample_thresholds`);
  they replace the first pass's pattern when ``cold`` (no hint), and the
  galloping once, the first time a pass leaves one side of the bracket open
  (the hint was far off).
  """
  lo0, hi0 = jnp.uint32(0), jnp.asarray(_TOP_U)
  # The thresholds of a pass are computed at the end of the previous one
  # and carried in the loop state: computed in the pass itself, XLA would
  # fuse their scalar arithmetic into the counting loops, once per key.
  ts0 = _to_i(_thresholds(lo0, hi0, center, sigma, jnp.int32(_INTERP)))
  sampled0 = jnp.bool_(False)
  if sample_pass is not None:
    sampled0 = jnp.asarray(cold, bool)
  s0 = _S(
    lo=lo0,
    hi=hi0,
    c_lo=jnp.int32(n),
    c_hi=jnp.int32(0),
    leaf_lo=leaf_sizes,
    leaf_hi=jnp.zeros((num_leaves,), jnp.int32),
    sigma=sigma,
    ts=ts0,
    passes=jnp.int32(0),
    sampled=sampled0,
    resample=sampled0,
    row_lo=() if rows0 is None else rows0,
    row_hi=() if rows0 is None else jnp.zeros_like(rows0),
  )

  def cond(s):
    wide = s.hi - s.lo > np.uint32(1)
    if collect_max is not None:
      return wide & (s.c_lo - s.c_hi > collect_max)
    return wide & (s.c_lo != q)

  def body(s):
    ts_i = s.ts
    if sample_pass is not None:
      # The sample's thresholds, at the start of the pass that uses them, so
      # that the sample is traced (and compiled) once. (A cond output is
      # materialised: the thresholds stay out of the counting loops.)
      guess = sample_pass  # (a name the closure can capture without None)
      ts_i = lax.cond(
        s.resample,
        lambda: guess(s.lo, jnp.maximum(s.hi, s.lo + np.uint32(2)), s.passes),
        lambda: s.ts,
      )
    ts = _to_u(ts_i)
    per_leaf, packed = count_pass(ts_i, s.passes, s.leaf_lo, s.leaf_hi)  # (K, M)

    def row_counts(j):
      # Every row's count at threshold j, leaf by leaf (fused into the concatenation).
      return jnp.concatenate([_row_count(p, j) for p in packed])

    counts = jnp.sum(per_leaf, axis=0, dtype=jnp.int32)  # nonincreasing
    n_ok = jnp.sum(counts >= q, dtype=jnp.int32)  # a prefix of the 8
    i_lo = jnp.maximum(n_ok - 1, 0)
    i_hi = jnp.minimum(n_ok, M - 1)
    new_lo = n_ok > 0
    new_hi = n_ok < M
    lo = jnp.where(new_lo, ts[i_lo], s.lo)
    c_lo = jnp.where(new_lo, counts[i_lo], s.c_lo)
    hi = jnp.where(new_hi, ts[i_hi], s.hi)
    c_hi = jnp.where(new_hi, counts[i_hi], s.c_hi)
    center, sigma, mode = _next_guess(lo, hi, c_lo, c_hi, s.sigma, q, s.hi - s.lo, s.c_lo - s.c_hi)
    # Thresholds of the next pass (unused if the loop stops): keep them
    # inside (lo, hi), which needs hi - lo >= 2.
    safe_hi = jnp.maximum(hi, lo + np.uint32(2))
    nxt = _to_i(_thresholds(lo, safe_hi, center, sigma, mode))
    sampled, resample = s.sampled, jnp.bool_(False)
    if sample_pass is not None:
      # A side still open after a pass: the hint was far off. Rather than
      # gallop (up to ~8 passes over the model), take the sample's guess once.
      resample = ((mode == _UP) | (mode == _DOWN)) & ~s.sampled
      sampled = sampled | resample
    if _DEBUG:
      jax.debug.print(
        "pass {p} active {a} ts {t} counts-q {c} -> lo {lo} hi {hi} nb {nb} "
        "need {nd} next mode {m}",
        p=s.passes + 1,
        m=mode,
        t=ts_i,
        c=counts - q,
        a=jnp.sum(jnp.where(s.leaf_lo != s.leaf_hi, leaf_sizes, 0)) / n,
        lo=_to_i(lo),
        hi=_to_i(hi),
        nb=c_lo - c_hi,
        nd=q - c_hi,
      )
    return _S(
      lo=lo,
      hi=hi,
      c_lo=c_lo,
      c_hi=c_hi,
      leaf_lo=jnp.where(new_lo, per_leaf[:, i_lo], s.leaf_lo),
      leaf_hi=jnp.where(new_hi, per_leaf[:, i_hi], s.leaf_hi),
      sigma=sigma,
      ts=nxt,
      passes=s.passes + 1,
      sampled=sampled,
      resample=resample,
      row_lo=s.row_lo if rows0 is None else jnp.where(new_lo, row_counts(i_lo), s.row_lo),
      row_hi=s.row_hi if rows0 is None else jnp.where(new_hi, row_counts(i_hi), s.row_hi),
    )

  return lax.while_loop(cond, body, s0)


# --- a sampled guess, for a search without a usable hint ----------------------

SAMPLE_MIN = 1 << 16  # fewer keys than this: no sample (galloping costs little)
_SAMPLE_SIZE = 1 << 17  # about at most this many keys in a sample
_SAMPLE_STRIDE = 257  # at least every 257th key


def _is_prime(k: int) -> bool:
  return k >= 2 and all(k % d for d in range(2, math.isqrt(k) + 1))


def _sample_stride(n: int) -> int:
  """Every how many keys the sample takes one: a prime >= 257 and >= n / 2**17.

  Prime, so that the stride does not fall in step with the channel counts
  of a flattened kernel and sample the same few channels.
  """
  stride = max(_SAMPLE_STRIDE, -(-n // _SAMPLE_SIZE))
  while not _is_prime(stride):
    stride += 1
  return stride


def _sample_thresholds(sorted_keys: Array, lo, hi, q, n: int) -> Array:
  r"""8 thresholds (uint32, nondecreasing, inside ``[lo + 1, hi - 1]``) from a sample.

  With :math:`m` sample keys sorted ascending and :math:`p = q / n`, about
  :math:`pm` of them lie above the Q-th key of the whole, with a binomial
  spread :math:`\sigma = \sqrt{m p (1 - p)}`: the thresholds are the sample
  keys at :math:`m - pm` plus 1/4, 1, 3 and 12 spreads either side (the
  pattern of an interpolation pass), clipped into the bracket.
  """
  m = sorted_keys.shape[0]
  p = q.astype(jnp.float32) / np.float32(n)
  sd = jnp.sqrt(np.float32(m) * p * (1.0 - p)) + 1.0
  pos = jnp.round(np.float32(m) * (1.0 - p) + jnp.asarray(_SYM) * sd)
  pos = jnp.clip(pos, 0, m - 1).astype(jnp.int32)
  t = _to_u(sorted_keys[pos])
  return jnp.clip(t, lo + np.uint32(1), hi - np.uint32(1))


# --- public entry point ---------------------------------------------------------


def _cold_center_sigma():
  """Start of a search without a hint: the key of 2**-20, spread ~2 octaves.

  Only the first pass depends on it: a miss gallops outward (24x further
  per pass), so any answer is bracketed within ~4 passes.
  """
  center = _to_u(jnp.int32(np.float32(2.0**-20).view(np.int32)))
  return center, jnp.float32(2 * 2**23 / 12.0)


def _words(flags: Array) -> Array:
  """Bit ``j`` of word ``b``: ``flags[32 b + j]`` (``flags`` bool, a multiple of 32 long)."""
  bits = flags.reshape(-1, 32).astype(jnp.uint32) << jnp.arange(32, dtype=jnp.uint32)
  return jnp.sum(bits, axis=1, dtype=jnp.uint32)


def _set_bits(words: Array, cap: int) -> tuple[Array, Array]:
  """Where the first ``cap`` set bits of ``words`` (see :func:`_words`) are.

  Returns ``(index, ok)``, each ``(cap,)``: the flat index (``32 b + j``) of
  the ``k``-th set bit in order, and whether there is a ``k``-th. The word of
  each comes from a binary search over the words' running popcounts, the bit
  from a binary search over the popcounts of the word's low bits (5 steps):
  nothing of the size of ``words`` but one prefix sum, no scan over bits.
  """
  per_word = lax.population_count(words).astype(jnp.int32)
  ends = jnp.cumsum(per_word, dtype=jnp.int32)
  rank = jnp.arange(1, cap + 1, dtype=jnp.int32)
  word = jnp.searchsorted(ends, rank, side="left").astype(jnp.int32)
  word = jnp.minimum(word, words.shape[0] - 1)
  r = rank - (ends[word] - per_word[word])  # the r-th set bit of its word
  bits = words[word]
  pos = jnp.zeros((cap,), jnp.int32)
  for step in (16, 8, 4, 2, 1):
    low = (jnp.uint32(1) << (pos + step).astype(jnp.uint32)) - jnp.uint32(1)
    below = lax.population_count(bits & low).astype(jnp.int32)
    pos = jnp.where(below < r, pos + step, pos)
  return word * 32 + pos, rank <= ends[-1]


def _tie_row(row_ties: Array, take: Array) -> tuple[Array, Array]:
  """The row that holds the ``take``-th tie, and the ties in the rows before it.

  ``row_ties`` (uint8, a multiple of 32 long) counts the ties per row: a
  prefix sum over blocks of 32 rows and a binary search give the block, a
  prefix sum within it the row.
  """
  per = row_ties.reshape(-1, 32).astype(jnp.int32)
  per_block = jnp.sum(per, axis=1, dtype=jnp.int32)
  ends = jnp.cumsum(per_block, dtype=jnp.int32)
  block = jnp.searchsorted(ends, take, side="left").astype(jnp.int32)
  block = jnp.minimum(block, per.shape[0] - 1)
  within = jnp.cumsum(per[block], dtype=jnp.int32) + (ends[block] - per_block[block])
  lane = jnp.sum(within < take, dtype=jnp.int32)
  return block * 32 + lane, within[lane] - per[block, lane]


def _tie_limits(cut: Array, cut_leaf: Array, num_leaves: int) -> tuple[Array, ...]:
  """Per leaf, the largest flat index whose ties are selected: all of them
  before the cut leaf, up to ``cut`` in it, none after it."""
  return tuple(
    jnp.where(i < cut_leaf, _INT_MAX, jnp.where(i == cut_leaf, cut, jnp.int32(-1)))
    for i in range(num_leaves)
  )


def _finish_in_buffer(key_fn, leaf_rows, widths, s: _S, q, cap: int, tied):
  """The Q-th key and the tie limits, from the keys of the bracket, collected.

  The search stopped with at most ``cap`` keys in the bracket ``[lo, hi)``,
  or with a bracket one key wide (``lo`` is the Q-th key) and more ties.

  * In the first case, a row of the flattened leaves holds keys of the
    bracket iff its counts at the two ends differ. Those rows (at most
    ``cap``) are listed in global order (:func:`_set_bits`) and their keys
    gathered (a loop over runs of :data:`GATHER_ROWS` rows of one leaf; XLA
    computes only the gathered keys). The keys of the bracket among them are
    listed in order the same way, and :func:`select` over that list gives
    the ``(q - c_hi)``-th key of the bracket. The list keeps the global order
    of the keys, so its tie-break is the global one: its last selected tie
    gives the leaf and the flat index of the cut.
  * In the second, the per-row counts of ties give the row of the cut
    (:func:`_tie_row`); only that row is gathered, and the same selection
    over its ties gives the cut.

  Returns ``(kth, min_pass, tie_passes, buffer_passes, limits)``.
  """
  num_leaves = len(leaf_rows)
  row_off = np.cumsum([0] + leaf_rows).astype(np.int32)
  total_rows = int(row_off[-1])
  offsets = jnp.asarray(row_off)  # each leaf's first row, then total_rows
  pad = -total_rows % 32
  row_lo = jnp.pad(s.row_lo, (0, pad))
  row_hi = jnp.pad(s.row_hi, (0, pad))

  many_ties = s.c_lo - s.c_hi > cap  # then hi == lo + 1
  need = q - s.c_hi

  def cut_row():
    row, before = _tie_row(row_lo - row_hi, need)
    return jnp.arange(total_rows + pad, dtype=jnp.int32) == row, need - before

  flags, need = lax.cond(many_ties, cut_row, lambda: (row_lo != row_hi, need))
  slot_rows, slot_ok = _set_bits(_words(flags), cap)
  num_active = jnp.sum(slot_ok, dtype=jnp.int32)
  # Past the last active row: total_rows, padded so that every run of
  # GATHER_ROWS slots is in bounds (and the list stays sorted).
  slot_rows = jnp.concatenate(
    [jnp.where(slot_ok, slot_rows, total_rows), jnp.full((GATHER_ROWS,), total_rows, jnp.int32)]
  )
  starts = jnp.searchsorted(slot_rows, offsets, side="left").astype(jnp.int32)

  def gather_leaf(i, local, ops):
    # Rows `local` of leaf i's keys, padded to 32 lanes. XLA fuses the key
    # computation into the gather: only the gathered rows are computed.
    w = widths[i]
    keys = key_fn(ops, i).reshape(-1, w)[jnp.clip(local, 0, leaf_rows[i] - 1)]
    return jnp.pad(keys, ((0, 0), (0, 32 - w)), constant_values=NAN_KEY)

  branches = [functools.partial(gather_leaf, i) for i in range(num_leaves)]
  leaf_ends = offsets[1:]
  row_w = jnp.asarray(np.array(widths, np.int32))
  lanes = jnp.arange(32, dtype=jnp.int32)

  def gather_run(c):
    # Slots [p, p + GATHER_ROWS) cut at the end of the leaf of slot p; the
    # next run overwrites the slots past it.
    p, buf, ok = c
    i = jnp.sum(leaf_ends <= slot_rows[p], dtype=jnp.int32)
    end = starts[i + 1]
    local = lax.dynamic_slice_in_dim(slot_rows, p, GATHER_ROWS) - offsets[i]
    keys = lax.switch(i, branches, local, tied(p))
    u = _to_u(keys)
    slot_in = (p + jnp.arange(GATHER_ROWS, dtype=jnp.int32) < end)[:, None]
    run_ok = slot_in & (lanes < row_w[i]) & (u >= s.lo) & (u < s.hi)
    buf = lax.dynamic_update_slice(buf, keys, (p, jnp.int32(0)))
    ok = lax.dynamic_update_slice(ok, run_ok, (p, jnp.int32(0)))
    return jnp.minimum(p + GATHER_ROWS, end), buf, ok

  buf0 = jnp.full((cap + GATHER_ROWS, 32), NAN_KEY, jnp.int32)
  ok0 = jnp.zeros((cap + GATHER_ROWS, 32), bool)
  _, buf, ok = lax.while_loop(lambda c: c[0] < num_active, gather_run, (jnp.int32(0), buf0, ok0))
  # The keys of the bracket, in order.
  at, key_ok = _set_bits(_words(ok[:cap].reshape(-1)), cap)
  keys = buf[:cap].reshape(-1)[at]
  # A NaN key of the list is one to take (select() would leave it out):
  # NAN_KEY + 1, which no score maps to, keeps it below every other key and
  # above the list's padding.
  keys = jnp.where(key_ok, jnp.where(keys == NAN_KEY, NAN_KEY + 1, keys), NAN_KEY)

  # The need-th key of the list, from a hint at the interpolation of the bracket.
  center, sigma, _ = _next_guess(
    s.lo, s.hi, s.c_lo, s.c_hi, s.sigma, q, s.hi - s.lo, s.c_lo - s.c_hi
  )
  (mask,), kth, info = select(
    lambda k, _: k,
    keys,
    [keys.shape],
    need,
    hint=_to_i(center),
    sigma=sigma,
    return_info=True,
    collect=False,
  )
  # The last selected tie: every tie before it in global order is selected.
  # (The list's padding comes after its keys, so it is never selected.)
  last = at[jnp.max(jnp.where(mask & (keys == kth), jnp.arange(cap, dtype=jnp.int32), 0))]
  kth = jnp.where(kth == NAN_KEY + 1, NAN_KEY, kth)
  row = slot_rows[last // 32]
  cut_leaf = jnp.sum(leaf_ends <= row, dtype=jnp.int32)
  cut = (row - offsets[cut_leaf]) * row_w[cut_leaf] + last % 32
  limits = _tie_limits(cut, cut_leaf, num_leaves)
  return kth, info.min_pass, info.tie_passes, info.key_passes, limits


def select(
  key_fn: Callable[[Any, int], Array],
  operands: Any,
  shapes: Sequence[Sequence[int]],
  q,
  *,
  hint: Optional[Array] = None,
  sigma: Optional[Array] = None,
  return_info: bool = False,
  collect: bool = True,
) -> tuple[Any, ...]:
  """Exact top-Q masks over the keys ``key_fn(operands, i)``, ``i < len(shapes)``.

  Args:
    key_fn: ``(operands, i) -> int32 keys of leaf i`` (see
      :func:`optax_gsm.selection.scores_to_keys`), in the leaf order that
      breaks ties. It is called inside every pass, so XLA fuses the key
      computation (for GSM: ``|g * w|``) into the pass instead of keeping a
      copy of all keys.
    operands: a pytree of arrays that ``key_fn`` reads.
    shapes: the shape of each leaf's keys.
    q: the number to select (int or traced int scalar); clipped to [0, N].
    hint: optional int32 scalar key near the answer (for GSM, the previous
      Q-th key plus its drift). A bad hint costs passes, never exactness.
      None or ``NAN_KEY``: no hint (the search starts near 2**-20).
    sigma: optional float32 scalar, the expected distance (in keys) between
      the hint and the answer; default 4096.
    return_info: also return a :class:`SearchInfo`.
    collect: once a pass leaves at most :data:`COLLECT_ROWS` keys (and at
      most one per 8 rows of keys) between the bracket's ends, gather them and
      end the search over them (on one device, for at least
      :data:`COLLECT_MIN` keys). False: counting passes over the leaves to
      the end. The masks are the same.

  Returns:
    ``(masks, kth)`` (and ``info``): boolean masks shaped like the keys, with
    the same entries selected as ``top_q_keys(keys, q, method="top_k")``,
    and the Q-th largest key (``NAN_KEY`` when Q == 0).
  """
  shapes = [tuple(int(d) for d in s) for s in shapes]
  sizes = [math.prod(s) for s in shapes]
  if 0 in sizes and any(sizes):
    # A zero-size leaf holds no key: it selects nothing and shifts no global
    # index, so the search runs over the other leaves only (a reduction
    # such as the masked min has no identity over an empty leaf).
    full = [i for i, size in enumerate(sizes) if size]
    out = select(
      lambda ops, j: key_fn(ops, full[j]),
      operands,
      [shapes[i] for i in full],
      q,
      hint=hint,
      sigma=sigma,
      return_info=return_info,
      collect=collect,
    )
    it = iter(out[0])
    masks = [next(it) if size else jnp.zeros(s, bool) for s, size in zip(shapes, sizes)]
    return (masks,) + tuple(out[1:])
  n = sum(sizes)
  q = jnp.clip(jnp.asarray(q, jnp.int32), 0, n)
  if n == 0:
    masks = [jnp.zeros(s, bool) for s in shapes]
    out = (masks, jnp.int32(NAN_KEY))
    return out + (SearchInfo(*(jnp.int32(0),) * 4),) if return_info else out
  q1 = jnp.maximum(q, 1)  # Q = 0 is masked at the end

  def tied(token):
    # Ties the operands to a loop counter, so that XLA recomputes the keys
    # inside each pass rather than hoisting a copy of every leaf's keys out
    # of the loop (which would cost memory and, on CPU, more time).
    return lax.optimization_barrier((operands, token))[0]

  def keys_at(i, ops=None):
    return key_fn(operands if ops is None else ops, i)

  num_leaves = len(shapes)
  on_mesh = sharding.on_mesh(jax.tree.leaves(operands))
  # On one device, once a pass leaves few keys in the bracket they are
  # collected (gathering the rows of the flattened leaves that hold them,
  # which the pass's per-row counts tell) and the search ends over those:
  # one pass over the model in the steady state. (On a mesh the rows would
  # be gathered across devices: there the passes go on.)
  collect = collect and not on_mesh and n >= COLLECT_MIN
  widths = [_flat_width(size) for size in sizes]
  leaf_sizes = jnp.asarray(np.array(sizes, np.int32))

  def count_pass(ts, token, leaf_lo, leaf_hi):
    # A leaf with no key in the bracket [lo, hi) has the same
    # count at every threshold inside it: skip reading it (after the first
    # passes, most hold none of the few keys left in the bracket).
    ops = tied(token)
    if collect:
      return count_rows_pass(ts, ops)
    rows = []
    for i in range(num_leaves):
      count_leaf = functools.partial(lambda i, ops: _count_ge(keys_at(i, ops), ts), i, ops)
      if sizes[i] < SKIP_MIN:  # not worth a branch
        rows.append(count_leaf())
        continue
      rows.append(
        lax.cond(
          leaf_lo[i] != leaf_hi[i],
          count_leaf,
          lambda i=i: jnp.full((M,), leaf_hi[i], jnp.int32),
        )
      )
    return jnp.stack(rows), ()

  def count_rows_pass(ts, ops):
    # The same pass, keeping the per-row counts of every leaf in one array.
    # No leaf is skipped: the search stops once few keys are left in the
    # bracket, before most leaves hold none.
    packed, counts = zip(
      *[_count_ge_rows(keys_at(i, ops), ts, widths[i]) for i in range(num_leaves)]
    )
    return jnp.stack(counts), packed

  # -- the Q-th key.
  cold_center, cold_sigma = _cold_center_sigma()
  if hint is None:
    center, sig = cold_center, cold_sigma
  else:
    hint = jnp.asarray(hint, jnp.int32)
    sig0 = (
      jnp.float32(4096.0) if sigma is None else jnp.maximum(jnp.asarray(sigma, jnp.float32), 0.5)
    )
    no_hint = hint == NAN_KEY
    center = jnp.where(no_hint, cold_center, _to_u(hint))
    sig = jnp.where(no_hint, cold_sigma, sig0)
  stride = _sample_stride(n)
  sampled_leaves = [i for i in range(num_leaves) if sizes[i] > stride // 2]
  sample_pass: Optional[Callable[..., Array]] = None
  # On a mesh the sample would be gathered onto every device (a strided
  # slice of each shard, concatenated and sorted): there a cold start
  # gallops, and every pass stays a few all-reduced counts.
  if n >= SAMPLE_MIN and sampled_leaves and not on_mesh:

    def sample_thresholds(lo, hi, token):
      # Every stride-th key of every leaf (a strided slice of the key
      # computation: only the sampled keys are computed), sorted.
      ops = tied(token)
      parts = [keys_at(i, ops).reshape(-1)[stride // 2 :: stride] for i in sampled_leaves]
      sample = jnp.sort(jnp.concatenate(parts) if len(parts) > 1 else parts[0])
      return _to_i(_sample_thresholds(sample, lo, hi, q1, n))

    sample_pass = sample_thresholds

  cold = jnp.bool_(True) if hint is None else (hint == NAN_KEY)
  # Rows of keys per flattened leaf (one device: see _flat_width).
  leaf_rows = [size // w for size, w in zip(sizes, widths)]
  total_rows = sum(leaf_rows) if collect else 0
  # At most this many keys (so rows) are collected: a small share of the model.
  cap = max(min(COLLECT_ROWS, total_rows // 8), min(total_rows, COLLECT_ROWS_MIN))
  cap = -(-cap // 32) * 32  # whole rows of 32 (in the list of collected keys)
  rows0 = None
  if collect:
    # count(>= 0) per row: all its keys.
    rows0 = jnp.concatenate([jnp.full((r,), w, jnp.uint8) for r, w in zip(leaf_rows, widths)])
  s = _search_key(
    count_pass,
    num_leaves,
    leaf_sizes,
    n,
    q1,
    center,
    sig,
    sample_pass,
    cold,
    rows0=rows0,
    collect_max=cap if collect else None,
  )

  def from_passes():
    # The search's own end: the Q-th key is lo, or the smallest key >= lo;
    # ties cut by passes over the leaf that holds the cut.
    # When the search stopped on count(>= lo) == q with a bracket wider than
    # one key, the Q-th key is the smallest key >= lo: one masked-min pass.
    def masked_min():
      # The smallest key >= lo is in [lo, hi): only leaves with keys there.
      lo = _to_i(s.lo)
      out = jnp.asarray(_INT_MAX)
      for i in range(num_leaves):
        leaf_min = functools.partial(lambda i: _min_at_least(keys_at(i), lo), i)
        if sizes[i] < SKIP_MIN:
          out = jnp.minimum(out, leaf_min())
          continue
        out = jnp.minimum(
          out, lax.cond(s.leaf_lo[i] != s.leaf_hi[i], leaf_min, lambda: jnp.asarray(_INT_MAX))
        )
      return out

    need_min = s.hi - s.lo > np.uint32(1)  # then c_lo == q
    # (A cond output is materialised: computed outside, XLA would fuse the
    # scalar arithmetic into the elementwise masks below, once per entry.)
    kth = lax.cond(need_min, masked_min, lambda: _to_i(s.lo))

    # -- ties: more keys equal kth than are needed (count(>= kth) > q). Take
    # the first ones in global index order: the per-leaf counts at the bracket
    # ends give the leaf of the cut; passes over that leaf only give the index
    # (1 or 2 masked-min passes, or a 9-way search over its flat index).
    ties = s.leaf_lo - s.leaf_hi  # per leaf, keys == kth
    take = q1 - s.c_hi
    cum = jnp.cumsum(ties, dtype=jnp.int32)
    need_tie = (s.c_lo > q1) & (kth != NAN_KEY)
    cut_leaf = jnp.where(need_tie, jnp.sum(cum < take, dtype=jnp.int32), jnp.int32(num_leaves))
    pick = jnp.minimum(cut_leaf, num_leaves - 1)
    t_local = take - (cum - ties)[pick]
    size_local = leaf_sizes[pick]

    def probes(lo, hi):
      width = jnp.maximum(hi - lo, 2)
      j = jnp.arange(1, M + 1, dtype=jnp.int32)
      return lo + jnp.clip(
        j * (width // (M + 1)) + (j * (width % (M + 1))) // (M + 1), 1, width - 1
      )

    # The branches below take the operands as arguments rather than closing
    # over them: closed-over, every branch would carry all the others'
    # operands too (JAX merges the branches' constants), which costs tracing
    # time quadratic in the number of leaves.
    def tie_count(i, ops, ps):
      k = keys_at(i, ops)
      return _count_ties_below(k, kth, ps)

    def tie_body(c):
      # Invariant: #(ties with index < lo) < t <= #(ties with index < hi); the
      # probes of a pass are computed by the previous one (see _search_key).
      lo, hi, ps, passes = c
      branches = [functools.partial(tie_count, i) for i in range(num_leaves)]
      cnt = lax.switch(pick, branches, tied(passes), ps)
      below = jnp.sum(cnt < t_local, dtype=jnp.int32)  # a prefix
      lo2 = jnp.where(below > 0, ps[jnp.maximum(below - 1, 0)], lo)
      hi2 = jnp.where(below < M, ps[jnp.minimum(below, M - 1)], hi)
      return lo2, hi2, probes(lo2, hi2), passes + 1

    def radix():
      lo, _, _, passes = lax.while_loop(
        lambda c: c[1] - c[0] > 1,
        tie_body,
        (jnp.int32(0), size_local, probes(jnp.int32(0), size_local), jnp.int32(0)),
      )
      return lo, passes

    def next_tie(i, ops, cur):
      # The smallest index > cur of an entry equal to kth (one 1-lane pass).
      k = keys_at(i, ops)
      return _next_tie(k, kth, cur)

    def walk():
      # The usual case: the cut is at the first or second tie of the leaf.
      def body(c):
        cur, passes = c
        branches = [functools.partial(next_tie, i) for i in range(num_leaves)]
        return lax.switch(pick, branches, tied(passes), cur), passes + 1

      return lax.while_loop(lambda c: c[1] < t_local, body, (jnp.int32(-1), jnp.int32(0)))

    def tie_search():
      cut, passes = lax.cond(t_local <= WALK_TIES, walk, radix)
      return passes, _tie_limits(cut, cut_leaf, num_leaves)

    # The cond's outputs are materialised scalars (see kth above); in the
    # masks below, the per-leaf limits are then run-time scalars rather than
    # expressions of the leaf's number, so that the fused update is the same
    # computation for every leaf of one shape, which XLA compiles once.
    tie_passes, limits = lax.cond(
      need_tie, tie_search, lambda: (jnp.int32(0), (jnp.asarray(_INT_MAX),) * num_leaves)
    )
    return kth, need_min.astype(jnp.int32), tie_passes, jnp.int32(0), limits

  def from_buffer():
    return _finish_in_buffer(key_fn, leaf_rows, widths, s, q1, cap, tied)

  if collect:
    # The outputs of a cond are materialised: else XLA would fuse the scalar
    # arithmetic of the limits into each leaf's masks, once per entry and
    # with the leaf's number in it (no kernel shared between leaves of one
    # shape). (The predicate is always true, but neither JAX nor XLA can
    # tell: a loop's output.)
    kth, min_pass, tie_passes, buffer_passes, limits = lax.cond(
      s.passes >= 0,
      from_buffer,
      lambda: (jnp.int32(NAN_KEY),) + (jnp.int32(0),) * 3 + ((jnp.int32(-1),) * num_leaves,),
    )
  else:
    kth, min_pass, tie_passes, buffer_passes, limits = from_passes()
  q_pos, everything = q > 0, q >= n

  # -- masks: elementwise in the keys, fused into whatever consumes them.
  masks = []
  for i, shape in enumerate(shapes):
    k = keys_at(i)
    tie_ok = _flat_index(shape) <= limits[i]
    sel = (k > kth) | ((k == kth) & tie_ok)
    masks.append(sel & q_pos & ((k != NAN_KEY) | everything))
  kth = jnp.where(q > 0, kth, NAN_KEY)
  if return_info:
    info = SearchInfo(
      key_passes=s.passes,
      min_pass=min_pass,
      tie_passes=tie_passes,
      buffer_passes=buffer_passes,
    )
    return masks, kth, info
  return masks, kth


class WarmStart(NamedTuple):
  """Where the next search starts: ``hint`` key and its uncertainty."""

  hint: jax.Array  # int32 key (NAN_KEY: no hint)
  sigma: jax.Array  # float32, in keys


def _key_distance(a, b):
  """``b - a`` in the (unsigned) key order, as float32."""
  ua, ub = _to_u(a), _to_u(b)
  return jnp.where(ub >= ua, (ub - ua).astype(jnp.float32), -(ua - ub).astype(jnp.float32))


def warm_start(threshold_key, drift, spread, valid) -> WarmStart:
  """The hint for this step: the last threshold key moved by its drift.

  Args:
    threshold_key: the last step's Q-th key (int32).
    drift: float32, the recent mean step-to-step change of that key.
    spread: float32, the recent mean deviation of the change from ``drift``.
    valid: bool scalar, False on the first step (no last threshold yet).
  """
  threshold_key = jnp.asarray(threshold_key, jnp.int32)
  ok = valid & (threshold_key != NAN_KEY)
  u = _to_u(threshold_key)
  d = jnp.clip(jnp.round(drift), -(2.0**30), 2.0**30).astype(jnp.int32)
  up = lax.bitcast_convert_type(jnp.maximum(d, 0), jnp.uint32)
  dn = lax.bitcast_convert_type(jnp.maximum(-d, 0), jnp.uint32)
  u = jnp.clip(u, np.uint32(1), _TOP_U - np.uint32(1))
  u = jnp.where(
    d >= 0, u + jnp.minimum(up, _TOP_U - np.uint32(1) - u), u - jnp.minimum(dn, u - np.uint32(1))
  )
  hint = jnp.where(ok, _to_i(u), NAN_KEY)
  return WarmStart(hint=hint, sigma=jnp.maximum(spread, 64.0))


def update_drift(prev_key, new_key, drift, spread, valid):
  """Exponential averages of the step-to-step change of the threshold key.

  Returns the new ``(drift, spread)``; see :func:`warm_start`.
  """
  ok = valid & (prev_key != NAN_KEY) & (new_key != NAN_KEY)
  delta = _key_distance(prev_key, new_key)
  new_drift = 0.5 * drift + 0.5 * delta
  new_spread = 0.5 * spread + 0.5 * jnp.abs(delta - drift)
  return (
    jnp.where(ok, new_drift, 0.0).astype(jnp.float32),
    jnp.where(ok, new_spread, spread).astype(jnp.float32),
  )
