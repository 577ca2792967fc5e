"""Budget selection against a numpy reference, with exact large-cost sums."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_gsm import budget
from optax_gsm import selection

NAN_KEY = int(selection.NAN_KEY)


def reference_order(keys_list):
  """Global order: larger key first, ties by lower global flat index."""
  k = np.concatenate([np.asarray(x, np.int64).ravel() for x in keys_list])
  return np.lexsort((np.arange(k.size), -k)), k


def reference_budget(keys_list, costs_list, b):
  """Longest prefix of the order with total cost <= b (Python ints, exact)."""
  order, k = reference_order(keys_list)
  c = np.concatenate(
    [
      np.broadcast_to(np.asarray(c, np.int64), np.shape(kk)).ravel()
      for kk, c in zip(keys_list, costs_list)
    ]
  )
  # Costs are below 2**31 and there are far fewer than 2**32 entries, so the
  # int64 running totals are exact.
  csum = np.cumsum(c[order])
  taken = int(np.searchsorted(csum, min(b, 2**62), side="right"))
  sel = np.zeros(k.size, bool)
  sel[order[:taken]] = True
  if taken < k.size:
    sel &= k != NAN_KEY
  out, start = [], 0
  for kk in keys_list:
    out.append(sel[start : start + np.size(kk)].reshape(np.shape(kk)))
    start += np.size(kk)
  return out


def _flat(masks):
  return np.concatenate([np.asarray(m).ravel() for m in masks])


SHAPES = [(7,), (3, 4)]


@st.composite
def problems(draw):
  mode = draw(st.sampled_from(["small", "large", "unit"]))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  n_distinct = draw(st.sampled_from([1, 3, 50]))
  keys, costs = [], []
  for shape in SHAPES:
    scores = rng.integers(0, n_distinct, shape).astype(np.float32)
    if draw(st.booleans()):
      scores = scores * np.float32(rng.standard_normal())
    if mode == "small":
      c = rng.integers(1, 5, shape)
    elif mode == "large":
      c = rng.integers(2**30, 2**31, shape)
    else:
      c = np.ones(shape, np.int64)
    keys.append(np.asarray(budget.ratio_keys(scores, c)))
    costs.append(c.astype(np.int32))
  total = int(sum(c.astype(np.int64).sum() for c in costs))
  b = draw(st.one_of(st.integers(-3, total + 3), st.sampled_from([0, total, total - 1])))
  return keys, costs, b


_top_q = jax.jit(lambda keys, q: selection.top_q_keys(keys, q)[0])


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(problems())
def test_budget_matches_reference_and_properties(problem):
  keys, costs, b = problem
  masks, kth = budget.budget_top_keys(keys, costs, b)
  want = reference_budget(keys, costs, b)
  for m, w in zip(masks, want):
    np.testing.assert_array_equal(m, w)
  sel = _flat(masks)
  c = np.concatenate([x.ravel().astype(np.int64) for x in costs])
  chosen = int(c[sel].sum())
  assert chosen <= max(b, 0)
  order, k = reference_order(keys)
  taken = int(sel.sum())
  # The selection is a prefix of the order ...
  assert sel[order[:taken]].all()
  if taken < sel.size:
    # ... and the next entry would exceed the budget.
    assert chosen + int(c[order[taken]]) > b
    assert int(kth) == int(k[order[taken]])
  else:
    assert int(kth) == NAN_KEY
  if all((x == 1).all() for x in costs) and 0 <= b:
    # Unit costs: exactly the global top-Q with Q = budget.
    top = _top_q([jnp.asarray(x) for x in keys], b)
    for m, t in zip(masks, top):
      np.testing.assert_array_equal(m, t)


def test_multi_block_large_costs_exact():
  # 70,000 entries: three blocks of 2**15; totals around 2**46, far beyond
  # int32 and beyond float32's exact integers.
  rng = np.random.default_rng(0)
  scores = [
    rng.integers(0, 300, 70_000).astype(np.float32),
    rng.integers(0, 300, (5,)).astype(np.float32),
  ]
  costs = [rng.integers(1, 2**31, 70_000).astype(np.int32), np.full((5,), 2**31 - 1, np.int32)]
  keys = [np.asarray(budget.ratio_keys(s, c)) for s, c in zip(scores, costs)]
  order, _ = reference_order(keys)
  c = np.concatenate([x.astype(np.int64) for x in costs])
  csum = np.cumsum(c[order])
  assert csum[-1] > 2**45
  for b in [
    int(csum[20_000]),
    int(csum[20_000]) - 1,
    int(csum[69_999]),
    int(csum[-1]),
    int(csum[-1]) - 1,
    2**62,
  ]:
    masks, _ = budget.budget_top_keys(keys, costs, b)
    want = reference_budget(keys, costs, b)
    for m, w in zip(masks, want):
      np.testing.assert_array_equal(m, w)
    sel = _flat(masks)
    assert int(c[sel].sum()) <= b


def test_traced_and_python_budgets():
  rng = np.random.default_rng(1)
  scores = [
    rng.standard_normal((6, 5)).astype(np.float32) ** 2,
    rng.standard_normal(9).astype(np.float32) ** 2,
  ]
  costs = [np.int32(3), rng.integers(1, 10, 9).astype(np.int32)]
  keys = [budget.ratio_keys(s, c) for s, c in zip(scores, costs)]

  @jax.jit
  def select(b):
    return budget.budget_top_keys(keys, costs, b)[0]

  for b in [0, 1, 17, 40, 200]:
    want = reference_budget(keys, costs, b)
    for dtype in (jnp.int32, jnp.float32):
      got = select(jnp.asarray(b, dtype))
      for m, w in zip(got, want):
        np.testing.assert_array_equal(m, w)
  # A float budget means its floor; negative and NaN select nothing.
  np.testing.assert_array_equal(
    _flat(select(jnp.float32(17.9))), _flat(reference_budget(keys, costs, 17))
  )
  assert not _flat(select(jnp.float32(-5.0))).any()
  assert not _flat(select(jnp.float32(jnp.nan))).any()
  assert not _flat(select(jnp.int32(-5))).any()
  assert _flat(select(jnp.float32(jnp.inf))).all()
  # Traced uint32 and wide float budgets split into the same limbs.
  limbs = jax.jit(budget._budget_limbs)  # pylint: disable=protected-access
  assert [int(x) for x in limbs(jnp.uint32(2**32 - 1))] == [65535, 65535, 0]
  assert [int(x) for x in limbs(jnp.float32(3 * 2.0**40 + 2.0**20))] == [0, 16, 3 * 2**8]
  assert [int(x) for x in limbs(jnp.float16(1000.5))] == [1000, 0, 0]
  # Python budgets beyond int32.
  masks, _ = budget.budget_top_keys(keys, costs, 2**40)
  assert _flat(masks).all()
  masks, _ = budget.budget_top_keys(keys, costs, 17.5)
  np.testing.assert_array_equal(_flat(masks), _flat(reference_budget(keys, costs, 17)))


def test_nan_ratios_only_when_everything_fits():
  keys = [selection.scores_to_keys(jnp.array([jnp.nan, 2.0, 1.0, jnp.nan]))]
  costs = [np.array([1, 1, 1, 1], np.int32)]
  masks, _ = budget.budget_top_keys(keys, costs, 3)
  assert masks[0].tolist() == [False, True, True, False]
  masks, _ = budget.budget_top_keys(keys, costs, 4)
  assert masks[0].tolist() == [True, True, True, True]


def test_greedy_stops_at_first_entry_that_does_not_fit():
  # Ratios 5, 4, 3 with costs 1, 10, 1: budget 5 takes the first, then the
  # second would exceed; the prefix rule stops there (no skipping ahead).
  s = jnp.array([5.0, 40.0, 3.0])
  c = np.array([1, 10, 1], np.int32)
  masks = budget.budget_select([s], [c], 5)
  assert masks[0].tolist() == [True, False, False]
  assert budget.budget_select([s], [c], 11)[0].tolist() == [True, True, False]
  assert budget.budget_select([s], [c], 12)[0].tolist() == [True, True, True]


def test_ties_at_threshold_broken_by_global_index():
  s = [jnp.array([2.0, 1.0, 2.0]), jnp.array([[2.0, 2.0]])]
  c = [np.array([1, 1, 1], np.int32), np.int32(1)]
  masks = budget.budget_select(s, c, 3)
  assert masks[0].tolist() == [True, False, True]
  assert masks[1].tolist() == [[True, False]]
  # Ties whose costs differ: ratio 1 for all, take in index order.
  s = [jnp.array([3.0, 1.0, 2.0])]
  c = [np.array([3, 1, 2], np.int32)]
  assert budget.budget_select(s, c, 4)[0].tolist() == [True, True, False]
  assert budget.budget_select(s, c, 5)[0].tolist() == [True, True, False]


def test_ratio_keys_match_numpy_float32_division():
  rng = np.random.default_rng(2)
  s = rng.standard_normal(1000).astype(np.float32) ** 2
  c = rng.integers(1, 2**31, 1000).astype(np.int32)
  want = (s / c.astype(np.float32)).astype(np.float32)
  np.testing.assert_array_equal(budget.ratio_keys(s, c), selection.scores_to_keys(want))


def test_ratio_keys_correctly_rounded_for_scalar_and_constant_costs():
  # XLA turns x / broadcast(c) and x / constant into x * (1 / c), one ulp
  # off for about half of the ratios; equal ratios from a scalar-cost leaf
  # and an array-cost leaf must still get equal keys.
  rng = np.random.default_rng(4)
  s = rng.integers(0, 10_000, 5000).astype(np.float32)
  c = rng.integers(1, 100, 5000).astype(np.int32)
  want = selection.scores_to_keys(s / c.astype(np.float32))
  for seven in (np.int32(7), 7, np.full(5000, 7, np.int32)):
    want7 = selection.scores_to_keys(s / np.float32(7))
    np.testing.assert_array_equal(budget.ratio_keys(s, seven), want7)
    np.testing.assert_array_equal(jax.jit(lambda x: budget.ratio_keys(x, seven))(s), want7)
    np.testing.assert_array_equal(jax.jit(budget.ratio_keys)(s, jnp.asarray(seven)), want7)
  np.testing.assert_array_equal(jax.jit(lambda x: budget.ratio_keys(x, c))(s), want)


def test_argument_errors():
  k = [jnp.zeros(3, jnp.int32)]
  with pytest.raises(TypeError, match="integer array"):
    budget.budget_top_keys(k, [np.ones(3, np.float32)], 1)
  with pytest.raises(ValueError, match=r"must be in \[1, 2147483647\]"):
    budget.budget_top_keys(k, [np.array([1, 0, 1])], 1)
  with pytest.raises(ValueError, match="one array per key array"):
    budget.budget_top_keys(k, [], 1)
  with pytest.raises(ValueError, match="does not broadcast"):
    budget.budget_top_keys(k, [np.ones(4, np.int32)], 1)
  with pytest.raises(TypeError, match="int32"):
    budget.budget_top_keys([jnp.zeros(3)], [np.ones(3, np.int32)], 1)
  with pytest.raises(ValueError, match="nan"):
    budget.budget_top_keys(k, [np.ones(3, np.int32)], float("nan"))
  with pytest.raises(TypeError, match="budget"):
    budget.budget_top_keys(k, [np.ones(3, np.int32)], True)


def test_cost_trees_and_totals():
  params = {
    "conv": jnp.ones((3, 3, 2, 4)),
    "b": jnp.ones(4),
    "fc": jnp.ones((8, 2), jnp.bfloat16),
    "big": jnp.ones((300, 300)),
  }
  costs = budget.cost_tree(params, {"conv": 25, "b": None, "fc": 1, "big": 1})
  assert costs["conv"].dtype == np.int32 and (costs["conv"] == 25).all()
  assert (costs["b"] == 0).all()
  assert budget.total_cost(costs) == 72 * 25 + 16 + 90_000
  masks = jax.tree.map(lambda c: np.arange(c.size).reshape(c.shape) % 2 == 0, costs)
  assert budget.total_cost(costs, masks) == 36 * 25 + 8 + 45_000
  by_name = budget.cost_tree(params, lambda path, leaf: 7 if "conv" in path else 1)
  assert (by_name["conv"] == 7).all() and (by_name["big"] == 1).all()
  nbytes = budget.bytes_cost_tree(params)
  assert int(nbytes["conv"].max()) == 6 and int(nbytes["fc"].max()) == 4
  assert int(nbytes["big"].max()) == 6 and int(nbytes["b"].max()) == 0
  with pytest.raises(ValueError, match=r"cost 0; .* \[1, 2147483647\]"):
    budget.cost_tree(params, {"conv": 0, "b": 0, "fc": 1, "big": 1})
  with pytest.raises(ValueError, match="one int per leaf"):
    budget.cost_tree(params, {"conv": 1})


def test_budget_prune_against_reference():
  rng = np.random.default_rng(3)
  params = {
    "conv": jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32),
    "bias": jnp.asarray(rng.standard_normal(4), jnp.float32),
    "fc": jnp.asarray(rng.standard_normal((8, 5)), jnp.bfloat16),
  }
  costs = budget.cost_tree(params, {"conv": 16, "bias": 0, "fc": 1})
  b = 400
  pruned, masks = budget.budget_prune(params, costs, b)
  keys = [
    np.asarray(budget.ratio_keys(jnp.abs(params[n].astype(jnp.float32)), costs[n]))
    for n in ("conv", "fc")
  ]
  want = reference_budget(keys, [costs["conv"], costs["fc"]], b)
  np.testing.assert_array_equal(masks["conv"], want[0])
  np.testing.assert_array_equal(masks["fc"], want[1])
  assert masks["bias"].all()
  np.testing.assert_array_equal(pruned["bias"], params["bias"])
  assert pruned["fc"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(pruned["conv"], np.where(want[0], params["conv"], 0))
  assert budget.total_cost(costs, masks) <= b


def test_budget_prune_by_magnitude_against_reference():
  """``rank="magnitude"``: the longest prefix of the |w| order under the
  budget (what follows a budgeted GSM run), not the |w| / cost order."""
  rng = np.random.default_rng(5)
  params = {
    "conv": jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32),
    "fc": jnp.asarray(0.1 * rng.standard_normal((8, 5)), jnp.float32),
  }
  costs = budget.cost_tree(params, {"conv": 16, "fc": 1})
  for b in (0, 15, 16, 300, 10_000):
    _, masks = budget.budget_prune(params, costs, b, rank="magnitude")
    keys = [np.asarray(selection.scores_to_keys(jnp.abs(params[n]))) for n in ("conv", "fc")]
    want = reference_budget(keys, [costs["conv"], costs["fc"]], b)
    np.testing.assert_array_equal(masks["conv"], want[0])
    np.testing.assert_array_equal(masks["fc"], want[1])
  # The two orders differ here: by ratio the cheap small fc weights go first.
  _, by_ratio = budget.budget_prune(params, costs, 300)
  _, by_size = budget.budget_prune(params, costs, 300, rank="magnitude")
  assert by_ratio["fc"].sum() > by_size["fc"].sum()
  with pytest.raises(ValueError, match="`rank` must be 'ratio'"):
    budget.budget_prune(params, costs, 300, rank="size")
