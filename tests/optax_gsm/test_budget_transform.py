"""global_top_q / gsm with a budget: references, count equivalence, errors."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_gsm
from optax_gsm import budget as budget_lib

# Two eligible leaves and one that is not (the bias): N = 24 + 15 = 39.
SHAPES = {"conv": (2, 3, 4), "fc": (5, 3), "bias": (3,)}
ELIGIBLE = ("conv", "fc")  # leaf order of jax.tree.leaves: bias, conv, fc
N = 39
BACKENDS = ("threshold", "top_k", "search", "auto")


def tie_heavy(seed, nan=False):
  """Integer-valued params and grads: many equal scores |g w|, zeros too."""
  rng = np.random.default_rng(seed)
  params = {k: jnp.asarray(rng.integers(-3, 4, s), jnp.float32) for k, s in SHAPES.items()}
  grads = {k: rng.integers(-4, 5, s).astype(np.float32) for k, s in SHAPES.items()}
  if nan:
    grads["conv"][0, 1, :2] = np.nan
    grads["fc"][4, 2] = np.nan
  return params, jax.tree.map(jnp.asarray, grads)


def unit_costs(params):
  return jax.tree.map(lambda p: np.ones(p.shape, np.int32), params)


def random_costs(rng, high):
  return {k: rng.integers(1, high, s).astype(np.int32) for k, s in SHAPES.items()}


def reference_mask(scores, costs, b):
  """float64 ratios, sorted (larger first, ties by global index, NaN last);
  the longest prefix whose cost is <= b; NaN only when everything fits."""
  s = np.concatenate([np.asarray(scores[k], np.float64).ravel() for k in ELIGIBLE])
  c = np.concatenate([np.broadcast_to(costs[k], SHAPES[k]).ravel() for k in ELIGIBLE]).astype(
    np.int64
  )
  r = s / c
  nan = np.isnan(r)
  order = np.lexsort((np.arange(r.size), -np.where(nan, 0.0, r), nan))
  taken = int(np.searchsorted(np.cumsum(c[order]), b, side="right"))
  sel = np.zeros(r.size, bool)
  sel[order[:taken]] = True
  if taken < r.size:
    sel &= ~nan
  out, start = {}, 0
  for k in ELIGIBLE:
    size = int(np.prod(SHAPES[k]))
    out[k] = sel[start : start + size].reshape(SHAPES[k])
    start += size
  return out, order, c, taken


# --------------------------------------------------------------------------
# (a) Unit costs and budget = Q select exactly what num_nonzero=Q selects.


@pytest.mark.parametrize("selection", BACKENDS)
@pytest.mark.parametrize("nan", [False, True])
def test_unit_costs_equal_count_target(selection, nan):
  params, grads = tie_heavy(0, nan=nan)
  costs = unit_costs(params)
  for q in (1, 7, 20, 33, 36, N):
    count = optax_gsm.global_top_q(q, selection=selection)
    by_budget = optax_gsm.global_top_q(budget=q, costs=costs)
    u1, s1 = jax.jit(count.update)(grads, count.init(params), params)
    u2, s2 = jax.jit(by_budget.update)(grads, by_budget.init(params), params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_array_equal(a, b)
    # num_nonzero: Q for the count; the number selected for the budget. They
    # differ only when NaN scores are left out (Q > number of finite scores).
    selected = sum(int(jnp.sum(u2[k] != 0)) for k in ELIGIBLE)
    assert int(s2.num_nonzero) <= int(s1.num_nonzero) == q
    if not nan:
      assert int(s2.num_nonzero) == q
    assert selected <= int(s2.num_nonzero)
    np.testing.assert_array_equal(s1.threshold, s2.threshold)


def test_unit_costs_budget_above_n_keeps_everything():
  params, grads = tie_heavy(1, nan=True)
  tx = optax_gsm.global_top_q(budget=10**15, costs=unit_costs(params))
  updates, state = tx.update(grads, tx.init(params), params)
  for k in SHAPES:
    np.testing.assert_array_equal(updates[k], grads[k])
  assert int(state.num_nonzero) == N


@pytest.mark.parametrize("selection", ["threshold", "auto"])
def test_unit_costs_gsm_steps_equal_count_target(selection):
  """gsm end to end, with unselected_decay and score_momentum."""
  params, _ = tie_heavy(2)
  kwargs = dict(momentum=0.9, weight_decay=1e-3, unselected_decay=1e-2, score_momentum=0.5)
  count = optax_gsm.gsm(0.05, num_nonzero=12, selection=selection, **kwargs)
  by_budget = optax_gsm.gsm(0.05, budget=12, costs=unit_costs(params), **kwargs)
  out = []
  for tx in (count, by_budget):
    p, state = params, tx.init(params)
    step = jax.jit(tx.update)
    for t in range(4):
      _, g = tie_heavy(10 + t)
      updates, state = step(g, state, p)
      p = optax.apply_updates(p, updates)
    out.append((p, state))
  (p1, s1), (p2, s2) = out
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(a, b)
  # Same selection state (the drift of the "search" warm start is not kept
  # with a budget) and the same momentum.
  for field in ("count", "num_nonzero", "threshold", "score_ema"):
    for a, b in zip(jax.tree.leaves(getattr(s1[0], field)), jax.tree.leaves(getattr(s2[0], field))):
      np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(s1[1:]), jax.tree.leaves(s2[1:])):
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# (b) + (c) Non-uniform costs against numpy, and the budget property.


@st.composite
def problems(draw):
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  exact = draw(st.booleans())
  nan = draw(st.booleans())
  if exact:
    # Integer scores <= 12 and costs <= 8: distinct ratios differ by far
    # more than float32's rounding, so float64 and float32 orders agree.
    params, grads = tie_heavy(seed, nan=nan)
    costs = random_costs(rng, 9)
  else:
    params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
    grads = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
    costs = random_costs(rng, draw(st.sampled_from([3, 100, 2**31])))
  if draw(st.booleans()):  # one cost per leaf, broadcast
    costs["fc"] = np.int32(rng.integers(1, 9))
  total = sum(int(np.broadcast_to(costs[k], SHAPES[k]).astype(np.int64).sum()) for k in ELIGIBLE)
  b = draw(st.one_of(st.integers(0, total + 2), st.sampled_from([0, total - 1, total])))
  decay = draw(st.sampled_from([None, 0.25]))
  return params, grads, costs, max(b, 0), exact, decay


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(problems())
def test_budget_mask_matches_numpy_reference(problem):
  params, grads, costs, b, exact, decay = problem
  tx = optax_gsm.global_top_q(budget=b, costs=costs, unselected_decay=decay)
  updates, state = tx.update(grads, tx.init(params), params)

  scores = {k: np.abs(np.asarray(grads[k]) * np.asarray(params[k])) for k in ELIGIBLE}
  if exact:
    want, order, c, _ = reference_mask(scores, costs, b)
  else:
    # The transform's own float32 ratios, ranked by numpy.
    r32 = {
      k: (scores[k] / np.broadcast_to(costs[k], SHAPES[k]).astype(np.float32)).astype(np.float32)
      for k in ELIGIBLE
    }
    want, order, c, _ = reference_mask(r32, {k: np.int32(1) for k in ELIGIBLE}, 0)  # order only
    c = np.concatenate([np.broadcast_to(costs[k], SHAPES[k]).ravel() for k in ELIGIBLE]).astype(
      np.int64
    )
    r = np.concatenate([r32[k].ravel() for k in ELIGIBLE])
    taken = int(np.searchsorted(np.cumsum(c[order]), b, side="right"))
    sel = np.zeros(r.size, bool)
    sel[order[:taken]] = True
    if taken < r.size:
      sel &= ~np.isnan(r)
    want = {"conv": sel[:24].reshape(SHAPES["conv"]), "fc": sel[24:].reshape(SHAPES["fc"])}
  for k in ELIGIBLE:
    g, w = np.asarray(grads[k]), np.asarray(params[k])
    expect = np.where(want[k], g, 0.0)
    if decay is not None:
      expect = expect + np.where(want[k], 0.0, decay * w)
    np.testing.assert_array_equal(updates[k], expect.astype(np.float32))
  np.testing.assert_array_equal(updates["bias"], grads["bias"])

  # (c) The selected cost fits the budget; the next weight in the order
  # would not; the selection is a prefix of the order. NaN ratios come last
  # and are left out unless everything fits.
  sel = np.concatenate([want[k].ravel() for k in ELIGIBLE])
  nan = np.isnan(np.concatenate([scores[k].ravel() for k in ELIGIBLE]))
  chosen = int(c[sel].sum())
  assert chosen <= b
  assert int(state.num_nonzero) == int(sel.sum())
  taken = int(sel.sum())
  if taken < sel.size:
    assert sel[order[:taken]].all()
    if nan[order[taken]]:
      assert sel[~nan].all() and not sel[nan].any()
    else:
      assert chosen + int(c[order[taken]]) > b
  masks = {k: jnp.asarray(want[k]) for k in ELIGIBLE}
  assert (
    budget_lib.total_cost({k: np.broadcast_to(costs[k], SHAPES[k]) for k in ELIGIBLE}, masks)
    == chosen
  )


def test_large_budget_beyond_int32_is_exact():
  rng = np.random.default_rng(5)
  params, grads = tie_heavy(5)
  costs = {k: rng.integers(2**30, 2**31, s).astype(np.int32) for k, s in SHAPES.items()}
  scores = {k: np.abs(np.asarray(grads[k]) * np.asarray(params[k])) for k in ELIGIBLE}
  _, order, c, _ = reference_mask(scores, costs, 0)
  csum = np.cumsum(c[order])
  for b in (int(csum[10]), int(csum[10]) - 1, int(csum[30]) + 5):
    assert b > 2**33
    tx = optax_gsm.global_top_q(budget=b, costs=costs)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    want, *_ = reference_mask(scores, costs, b)
    for k in ELIGIBLE:
      np.testing.assert_array_equal(updates[k] != 0, want[k] & (grads[k] != 0))


# --------------------------------------------------------------------------
# (d) jit, gsm end to end, schedules, inject_hyperparams, callables, NNX.


def test_gsm_end_to_end_respects_budget_every_step():
  rng = np.random.default_rng(3)
  params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
  costs = random_costs(rng, 50)
  full = {k: np.broadcast_to(costs[k], SHAPES[k]) for k in ELIGIBLE}
  budgets = optax.linear_schedule(400, 120, 3)
  tx = optax_gsm.gsm(0.05, budget=budgets, costs=costs, momentum=0.9, unselected_decay=1e-2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t in range(5):
    g = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
    scores = {k: np.abs(np.asarray(g[k]) * np.asarray(params[k])) for k in ELIGIBLE}
    r32 = {k: (scores[k] / full[k].astype(np.float32)).astype(np.float32) for k in ELIGIBLE}
    updates, state = step(g, state, params)
    inner = state[0]
    b = int(budgets(t))
    # The masks of this step, recomputed from the ratio order.
    masks, _ = budget_lib.budget_top_keys(
      [budget_lib.ratio_keys(scores[k], costs[k]) for k in ELIGIBLE],
      [costs[k] for k in ELIGIBLE],
      b,
    )
    got = dict(zip(ELIGIBLE, masks))
    cost = budget_lib.total_cost(full, got)
    assert cost <= b and int(inner.num_nonzero) == sum(int(m.sum()) for m in masks)
    # The threshold is the smallest selected ratio.
    smallest = min(float(r32[k][np.asarray(got[k])].min()) for k in ELIGIBLE)
    assert float(inner.threshold) == smallest
    params = optax.apply_updates(params, updates)
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))


def test_inject_hyperparams_changes_the_budget():
  params, grads = tie_heavy(4)
  costs = random_costs(np.random.default_rng(4), 6)
  tx = optax.inject_hyperparams(optax_gsm.global_top_q)(budget=60, costs=costs)
  state = tx.init(params)
  step = jax.jit(tx.update)
  u60, state = step(grads, state, params)
  state.hyperparams["budget"] = jnp.asarray(17)
  u17, state = step(grads, state, params)
  for b, got in ((60, u60), (17, u17)):
    plain = optax_gsm.global_top_q(budget=b, costs=costs)
    want, _ = plain.update(grads, plain.init(params), params)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(x, y)
  # A float budget means its floor; a callable `costs` is a static argument.
  tx = optax.inject_hyperparams(optax_gsm.global_top_q, static_args=("costs",))(
    budget=17.9, costs=lambda p: costs
  )
  got, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(u17)):
    np.testing.assert_array_equal(x, y)


def test_callable_and_traced_costs_under_jit():
  params, grads = tie_heavy(6)
  # bytes_cost_tree needs only shapes and dtypes: concrete under jit.
  tx = optax_gsm.global_top_q(budget=100, costs=optax_gsm.bytes_cost_tree)
  state = jax.jit(tx.init)(params)
  u1, s1 = jax.jit(tx.update)(grads, state, params)
  six = {k: np.int32(6) for k in SHAPES}
  ref = optax_gsm.global_top_q(budget=100, costs=six)
  u2, _ = ref.update(grads, ref.init(params), params)
  for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_array_equal(x, y)
  assert int(s1.num_nonzero) == 100 // 6
  # Costs computed with jnp from the (traced) params: same answer.
  traced = optax_gsm.global_top_q(
    budget=100, costs=lambda p: jax.tree.map(lambda x: jnp.full(x.shape, 6, jnp.int32), p)
  )
  u3, _ = jax.jit(traced.update)(grads, traced.init(params), params)
  for x, y in zip(jax.tree.leaves(u3), jax.tree.leaves(u2)):
    np.testing.assert_array_equal(x, y)


def test_nnx_optimizer_with_a_cost_tree_of_nnx_state():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(6, 4, rngs=rngs)
      self.b = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.b(nnx.relu(self.a(x)))

  model = Net(nnx.Rngs(0))
  # Built from nnx.state(model, nnx.Param): Param nodes around each leaf,
  # while nnx.Optimizer hands update() plain arrays.
  costs = budget_lib.cost_tree(
    nnx.state(model, nnx.Param), lambda path, leaf: 3 if "'a'" in path else 1
  )
  opt = nnx.Optimizer(model, optax_gsm.gsm(0.1, budget=20, costs=costs), wrt=nnx.Param)
  x = jnp.ones((3, 6))

  @nnx.jit
  def train_step(model, opt):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    opt.update(model, grads)

  train_step(model, opt)
  inner = opt.opt_state[0]
  assert 1 <= int(inner.num_nonzero[...]) <= 20


# --------------------------------------------------------------------------
# (e) Bad input.


PARAMS, _ = tie_heavy(0)
COSTS = unit_costs(PARAMS)


@pytest.mark.parametrize("factory", [optax_gsm.global_top_q, lambda **kw: optax_gsm.gsm(0.1, **kw)])
def test_target_errors_at_build(factory):
  three = "exactly one of `num_nonzero`.*`compression`.*`budget`"
  with pytest.raises(ValueError, match=three):
    factory(num_nonzero=3, budget=5, costs=COSTS)
  with pytest.raises(ValueError, match=three):
    factory(compression=3, budget=5, costs=COSTS)
  with pytest.raises(ValueError, match="exactly one of `num_nonzero`"):
    factory()
  with pytest.raises(ValueError, match=r"`budget=5` needs `costs`"):
    factory(budget=5)
  with pytest.raises(ValueError, match="`costs` is only used with `budget`"):
    factory(num_nonzero=3, costs=COSTS)
  with pytest.raises(ValueError, match=r"`budget` must be >= 0.*got -1"):
    factory(budget=-1, costs=COSTS)
  with pytest.raises(ValueError, match=r"`budget` must be a number >= 0.*nan"):
    factory(budget=float("nan"), costs=COSTS)
  with pytest.raises(TypeError, match="`budget` must be a number.*True"):
    factory(budget=True, costs=COSTS)
  with pytest.raises(TypeError, match="`budget` must be a number.*'ten'"):
    factory(budget="ten", costs=COSTS)
  with pytest.raises(TypeError, match=r"`budget` must be a number.*array"):
    factory(budget=np.array([1, 2]), costs=COSTS)
  with pytest.raises(ValueError, match="selection='top_k' applies to"):
    factory(budget=5, costs=COSTS, selection="top_k")


def _bad(**changes):
  costs = dict(COSTS)
  costs.update(changes)
  return costs


@pytest.mark.parametrize(
  "costs, error, match",
  [
    ({"conv": COSTS["conv"]}, ValueError, "`costs` must be a pytree with the structure of params"),
    (
      _bad(conv=COSTS["conv"].astype(np.float32)),
      TypeError,
      r"`costs` at \['conv'\] must be integers.*float32",
    ),
    (
      _bad(fc=np.zeros(SHAPES["fc"], np.int32)),
      ValueError,
      r"eligible leaf \['fc'\] must be in \[1, 2147483647\], got values in "
      r"\[0, 0\]",
    ),
    (
      _bad(fc=-np.ones(SHAPES["fc"], np.int32)),
      ValueError,
      r"\['fc'\] must be in \[1, 2147483647\]",
    ),
    (
      _bad(fc=np.full(SHAPES["fc"], 2**31, np.int64)),
      ValueError,
      r"got values in \[2147483648, 2147483648\]",
    ),
    (
      _bad(conv=np.ones((3, 4, 2), np.int32)),
      ValueError,
      r"\['conv'\] has shape \(3, 4, 2\), which does not broadcast to the "
      r"leaf's shape \(2, 3, 4\)",
    ),
    (_bad(fc=None), TypeError, r"None at the eligible leaf \['fc'\]"),
    (_bad(bias=None), None, None),  # not eligible: ignored
    (_bad(bias=np.zeros(7, np.float32)), None, None),
    (lambda p: None, ValueError, "got costs=None"),
  ],
)
def test_cost_errors_at_init(costs, error, match):
  tx = optax_gsm.global_top_q(budget=5, costs=costs)
  if error is None:
    tx.init(PARAMS)
    return
  with pytest.raises(error, match=match):
    tx.init(PARAMS)


def test_budget_schedule_checked_at_init():
  tx = optax_gsm.gsm(0.1, budget=lambda step: step - 3, costs=COSTS)
  with pytest.raises(
    ValueError,
    match=r"`budget` \(at step 0\) must be >= 0"
    r".*got -3",
  ):
    tx.init(PARAMS)
