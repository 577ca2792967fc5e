"""The two layouts of the budget selection give the same masks, bit for bit.

``"per_leaf"`` (exact sums per leaf, the cut among ties found by a search
over the flat index of one leaf) and ``"concat"`` (one concatenated vector,
block sums and prefix sums) against each other and against the numpy
reference of ``test_budget``: ties, NaN scores, costs up to ``2**31 - 1``,
leaves of one cost and of varying costs, empty and 0-d leaves, and budgets
of 0, exactly fitting a prefix, one short of it, and beyond the total.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_gsm import budget
from optax_gsm import selection
from optax_gsm import sharding

from tests.optax_gsm._compat import enable_x64
from tests.optax_gsm.test_budget import reference_budget
from tests.optax_gsm.test_budget import reference_order

NAN_KEY = int(selection.NAN_KEY)
MAX_COST = 2**31 - 1


@functools.lru_cache(maxsize=None)
def _select(layout: str):
  return jax.jit(functools.partial(budget._select_impl, stats=True, layout=layout))


def select(keys, costs, b, layout):
  """(masks, kth, min selected key, count) as numpy, in ``layout``."""
  out = _select(layout)(
    tuple(jnp.asarray(k) for k in keys),
    tuple(jnp.asarray(c) for c in costs),
    budget._budget_limbs(b),
  )
  masks, kth, low, count = jax.device_get(out)
  return [np.asarray(m) for m in masks], int(kth), int(low), int(count)


def check_layouts(keys, costs, b):
  """Both layouts give the reference masks, the same threshold and stats."""
  want = reference_budget(keys, costs, b)
  got = {layout: select(keys, costs, b, layout) for layout in ("per_leaf", "concat")}
  for layout, (masks, *_) in got.items():
    for i, (m, w) in enumerate(zip(masks, want)):
      np.testing.assert_array_equal(m, w, err_msg=f"{layout} leaf {i} budget {b}")
  assert got["per_leaf"][1:] == got["concat"][1:], (b, got["per_leaf"][1:], got["concat"][1:])
  # The statistics are those of the reference selection.
  sel = np.concatenate([w.ravel() for w in want]).astype(bool)
  k = np.concatenate([np.asarray(x).ravel() for x in keys])
  _, kth, low, count = got["per_leaf"]
  assert count == int(sel.sum())
  assert low == (int(k[sel].min()) if sel.any() else 2**31 - 1)
  order, _ = reference_order(keys)
  taken = int(sel.sum())
  assert kth == (int(k[order[taken]]) if taken < k.size else NAN_KEY)
  return want


# Leaf shapes: a 0-d leaf and an empty one among them. The cost kinds of
# the leaves come in a few patterns, so that few programs are compiled.
SHAPES = [(7,), (3, 4), (), (0,), (2, 3, 5)]
PATTERNS = {
  "one cost each": ("scalar",) * 5,
  "varying": ("array",) * 5,
  "mixed": ("array", "scalar", "array", "scalar", "scalar"),
}


@st.composite
def problems(draw):
  pattern = PATTERNS[draw(st.sampled_from(sorted(PATTERNS)))]
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  scale = draw(st.sampled_from(["small", "large", "max", "unit"]))
  n_distinct = draw(st.sampled_from([1, 2, 5, 1000]))
  nan = draw(st.booleans())
  keys, costs = [], []
  for shape, kind in zip(SHAPES, pattern):
    scores = rng.integers(0, n_distinct, shape).astype(np.float32)
    if draw(st.booleans()):
      scores = scores * np.float32(rng.standard_normal())
    if nan and scores.size:
      scores.flat[rng.integers(0, scores.size)] = np.nan
    c_shape = () if kind == "scalar" else shape
    if scale == "small":
      c = rng.integers(1, 5, c_shape)
    elif scale == "large":
      c = rng.integers(2**30, 2**31, c_shape)
    elif scale == "max":  # at and next to the largest cost
      c = MAX_COST - rng.integers(0, 3, c_shape)
    else:
      c = np.ones(c_shape, np.int64)
    c = np.asarray(c, np.int32)
    keys.append(np.asarray(budget.ratio_keys(scores, c)))
    costs.append(c)
  full = [np.broadcast_to(c, np.shape(k)).astype(np.int64) for k, c in zip(keys, costs)]
  total = int(sum(c.sum() for c in full))
  order, _ = reference_order(keys)
  csum = np.cumsum(np.concatenate([c.ravel() for c in full])[order])
  exact = int(csum[draw(st.integers(0, csum.size - 1))])  # fits a prefix exactly
  b = draw(
    st.one_of(
      st.sampled_from([0, -1, 1, total, total - 1, total + 1, 2**62, exact, exact - 1, exact + 1]),
      st.integers(0, total + 3),
    )
  )
  return keys, costs, b


@hypothesis.settings(max_examples=80, deadline=None)
@hypothesis.given(problems())
def test_layouts_match_reference(problem):
  keys, costs, b = problem
  check_layouts(keys, costs, b)


def test_ties_across_leaves_with_different_costs():
  # Ratio 1 everywhere: the ties are taken in global index order across
  # leaves of one cost and of varying costs; budgets cut inside every leaf.
  scores = [np.full(5, 3.0, np.float32), np.array([[2.0, 7.0], [1.0, 4.0]], np.float32)]
  costs = [np.int32(3), np.array([[2, 7], [1, 4]], np.int32)]
  keys = [np.asarray(budget.ratio_keys(s, c)) for s, c in zip(scores, costs)]
  for b in range(0, 31):
    check_layouts(keys, costs, b)


def test_nan_only_when_everything_fits():
  keys = [np.asarray(selection.scores_to_keys(jnp.array([np.nan, 2.0, 1.0, np.nan])))]
  for costs in ([np.int32(2)], [np.array([2, 2, 2, 2], np.int32)]):
    assert check_layouts(keys, costs, 7)[0].tolist() == [False, True, True, False]
    assert check_layouts(keys, costs, 8)[0].all()


@pytest.mark.parametrize("n, limbs", [(40_000, 3), (1_100_000, 4)])
def test_large_leaves_in_several_limbs_are_exact(n, limbs):
  """A leaf above 2**15 entries with costs near 2**31 is summed in 3 or 4
  limbs; the cut falls inside thousands of ties of that leaf, and totals
  reach ~2**51."""
  assert budget._limb_plan(n)[1] == limbs
  rng = np.random.default_rng(n)
  scores = [
    rng.integers(0, 4, n).astype(np.float32),
    rng.integers(0, 4, (3, 5)).astype(np.float32),
  ]
  costs = [rng.integers(2**31 - 8, 2**31, n).astype(np.int32), np.int32(MAX_COST)]
  # Ratios tie wherever score and cost do: few costs, few scores.
  keys = [np.asarray(budget.ratio_keys(s, c)) for s, c in zip(scores, costs)]
  order, _ = reference_order(keys)
  full = np.concatenate([costs[0].astype(np.int64), np.full(15, MAX_COST, np.int64)])
  csum = np.cumsum(full[order])
  for j in (0, n // 3, n // 2 + 7, n - 2, n + 14):
    for b in (int(csum[j]), int(csum[j]) - 1):
      check_layouts(keys, costs, b)


def test_limb_plan_keeps_every_reduction_below_2_31():
  for n in (1, 2, 1000, 2**15, 2**15 + 1, 2**20, 2**20 + 513, 2**23, 2**23 + 1, 2**27, 2**30):
    width, count = budget._limb_plan(n)
    assert n * (2**width - 1) <= MAX_COST, n
    assert width * count >= 31, n
    assert count == -(-31 // width)
  assert budget._limb_plan(2**15) == (16, 2)
  assert budget._limb_plan(2**23) == (8, 4)


def test_limb_products_and_totals_are_exact():
  rng = np.random.default_rng(0)
  edge = np.array([0, 1, 2, 2**15, 2**16 - 1, 2**16, 2**30, MAX_COST - 1, MAX_COST], np.int64)
  a = np.concatenate([np.repeat(edge, edge.size), rng.integers(0, 2**31, 500)])
  b = np.concatenate([np.tile(edge, edge.size), rng.integers(0, 2**31, 500)])
  l0, l1, l2 = jax.device_get(
    jax.jit(budget._mul)(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))
  )
  assert (l0 < 2**16).all() and (l1 < 2**16).all() and (l2 < 2**30).all()
  got = [int(x) + (int(y) << 16) + (int(z) << 32) for x, y, z in zip(l0, l1, l2)]
  assert got == [int(x) * int(y) for x, y in zip(a, b)]
  # A sum of 70,000 products (blocked above 2**15 terms), near 2**60: the
  # totals of a selection stay below 2**61.
  a = rng.integers(0, 2**13, 70_000)
  b = rng.integers(0, 2**31, 70_000)
  total = jax.jit(lambda a, b: budget._total(budget._mul(a, b)))(
    jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32)
  )
  t0, t1, t2 = (int(x) for x in total)
  assert t0 + (t1 << 16) + (t2 << 32) == sum(int(x) * int(y) for x, y in zip(a, b))


def _eqns(jaxpr):
  """Every equation of a jaxpr, those of loops, conds and calls included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for j in v if isinstance(v, (tuple, list)) else (v,):
        j = getattr(j, "jaxpr", j)  # a ClosedJaxpr's Jaxpr
        if hasattr(j, "eqns"):
          yield from _eqns(j)


def test_per_leaf_program_concatenates_and_scans_nothing_large():
  """The per-leaf program has no concatenation, prefix sum, sort or pad
  larger than the (leaves, limbs) matrix of per-leaf terms: nothing the
  size of a leaf is assembled (what would gather leaves on a mesh)."""
  shapes = [(64, 50), (3, 3, 8, 16), (100,)]
  rng = np.random.default_rng(1)
  keys = tuple(jnp.zeros(s, jnp.int32) for s in shapes)
  for costs in (
    tuple(np.int32(i + 2) for i in range(3)),
    tuple(rng.integers(1, 2**31, s).astype(np.int32) for s in shapes),
  ):
    small = 64 * len(shapes)
    for layout, expect_large in (("per_leaf", False), ("concat", True)):
      jaxpr = jax.make_jaxpr(functools.partial(budget._select_impl, stats=True, layout=layout))(
        keys, costs, budget._budget_limbs(100)
      )
      large = [
        e.primitive.name
        for e in _eqns(jaxpr.jaxpr)
        if e.primitive.name in ("concatenate", "cumsum", "sort", "pad")
        and any(int(np.prod(v.aval.shape)) > small for v in e.outvars)
      ]
      assert bool(large) == expect_large, (layout, large)


def test_auto_layout_choice(monkeypatch):
  """``"auto"``: per-leaf when every leaf has one cost (or on a mesh),
  concatenated for varying costs on one device; the same masks either way."""
  used = []
  for name in ("_select_per_leaf", "_select_concat"):
    real = getattr(budget, name)
    monkeypatch.setattr(
      budget,
      name,
      functools.partial(lambda real, name, *a: used.append(name) or real(*a), real, name),
    )
  keys = [np.asarray(budget.ratio_keys(np.arange(6, dtype=np.float32), np.int32(2)))]
  masks, _ = budget.budget_top_keys(keys, [np.int32(2)], 5)
  assert used[-1] == "_select_per_leaf"
  masks2, _ = budget.budget_top_keys(keys, [np.array([2, 2, 2, 2, 2, 3], np.int32)], 5)
  assert used[-1] == "_select_concat"
  np.testing.assert_array_equal(masks[0], masks2[0])
  assert not sharding.on_mesh((jnp.zeros(3), np.zeros(3), 3))
  with pytest.raises(ValueError, match="`layout` must be one of"):
    budget._select_impl(
      (jnp.zeros(2, jnp.int32),), (np.int32(1),), budget._budget_limbs(1), layout="x"
    )


def test_layouts_agree_under_x64():
  rng = np.random.default_rng(7)
  scores = [rng.integers(0, 3, (6, 5)).astype(np.float32), rng.integers(0, 3, 9).astype(np.float32)]
  for costs in (
    [np.int32(3), rng.integers(1, 2**31, 9).astype(np.int32)],
    [rng.integers(2**30, 2**31, (6, 5)).astype(np.int32), np.int32(MAX_COST)],
  ):
    keys = [np.asarray(budget.ratio_keys(s, c)) for s, c in zip(scores, costs)]
    want = [reference_budget(keys, costs, b) for b in (0, 2**32 + 5, 2**34)]
    with enable_x64(True):
      for layout in ("per_leaf", "concat"):
        for b, w in zip((0, 2**32 + 5, 2**34), want):
          out = jax.jit(functools.partial(budget._select_impl, layout=layout))(
            tuple(map(jnp.asarray, keys)), tuple(map(jnp.asarray, costs)), budget._budget_limbs(b)
          )
          assert out[1].dtype == jnp.int32
          for m, x in zip(out[0], w):
            np.testing.assert_array_equal(m, x)
