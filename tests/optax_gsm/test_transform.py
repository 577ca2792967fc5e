"""global_top_q and gsm against numpy references and the optax ecosystem."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gsm
from optax_gsm import transform

from tests.optax_gsm import reference


def make_problem(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  params = {
    "conv": {"kernel": rng.standard_normal((3, 3, 2, 4)), "bias": rng.standard_normal(4)},
    "dense": [rng.standard_normal((8, 5)), rng.standard_normal(5)],
    "head": (rng.standard_normal((5, 3)),),
  }
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  return params


def grads_like(params, seed):
  rng = np.random.default_rng(1000 + seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


@pytest.mark.parametrize("selection", ["threshold", "top_k", "auto"])
def test_global_top_q_matches_reference(selection):
  params = make_problem()
  grads = grads_like(params, 0)
  q = 40
  tx = optax_gsm.global_top_q(q, selection=selection)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)

  leaves_p, leaves_g = jax.tree.leaves(params), jax.tree.leaves(grads)
  flags = [p.ndim >= 2 for p in leaves_p]
  scores = [
    np.abs(np.asarray(g) * np.asarray(p)) for g, p, f in zip(leaves_g, leaves_p, flags) if f
  ]
  masks = iter(reference.ranked_selection(scores, q))
  for u, g, f in zip(jax.tree.leaves(updates), leaves_g, flags):
    want = np.where(next(masks), g, 0.0) if f else g
    np.testing.assert_array_equal(u, want)
  assert int(state.count) == 1 and int(state.num_nonzero) == q
  all_scores = np.sort(np.concatenate([s.ravel() for s in scores]))[::-1]
  assert float(state.threshold) == all_scores[q - 1]


def test_compression_gives_rounded_q():
  params = make_problem()
  n = optax_gsm.count_eligible(params)
  assert n == 3 * 3 * 2 * 4 + 8 * 5 + 5 * 3
  tx = optax_gsm.global_top_q(compression=7)
  updates, state = tx.update(grads_like(params, 1), tx.init(params), params)
  kept = sum(
    int(jnp.sum(u != 0))
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params))
    if p.ndim >= 2
  )
  assert kept == round(n / 7) == int(state.num_nonzero)


@pytest.mark.parametrize("metric", ["magnitude", "callable"])
def test_other_metrics(metric):
  params = make_problem()
  grads = grads_like(params, 2)
  fn = (lambda g, w: g**2) if metric == "callable" else metric
  tx = optax_gsm.global_top_q(10, metric=fn)
  updates, _ = tx.update(grads, tx.init(params), params)
  source = grads if metric == "callable" else params
  scores = [
    np.asarray(x) ** 2
    for x, p in zip(jax.tree.leaves(source), jax.tree.leaves(params))
    if p.ndim >= 2
  ]
  masks = iter(reference.ranked_selection(scores, 10))
  for u, g, p in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), jax.tree.leaves(params)):
    if p.ndim >= 2:
      np.testing.assert_array_equal(u, np.where(next(masks), g, 0.0))


def test_where_tree_and_callable():
  params = make_problem()
  grads = grads_like(params, 3)
  where = jax.tree.map(lambda p: p.shape == (8, 5), params)
  for w in (where, lambda p: where):
    tx = optax_gsm.global_top_q(5, where=w)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["head"][0], grads["head"][0])
    assert int(jnp.sum(updates["dense"][0] != 0)) == 5


@pytest.mark.parametrize("shrink", [None, optax_gsm.DEFAULT_UNSELECTED_SHRINK, 0.3])
def test_gsm_multi_step_matches_numpy_update_rule(shrink):
  """The default rule, the paper's (shrink None) and a strong shrink."""
  params = make_problem()
  grads_seq = [grads_like(params, s) for s in range(5)]
  lr, q, beta, eta = 0.05, 30, 0.9, 1e-2
  tx = optax_gsm.gsm(lr, num_nonzero=q, momentum=beta, weight_decay=eta, unselected_shrink=shrink)
  state = tx.init(params)
  p = params
  step = jax.jit(tx.update)
  for g in grads_seq:
    updates, state = step(g, state, p)
    p = optax.apply_updates(p, updates)

  flags = [x.ndim >= 2 for x in jax.tree.leaves(params)]
  # The mask at each step depends on the float32 params; run the reference
  # with masks recomputed from its own float64 trajectory.
  want, _ = reference.gsm_steps(
    [np.asarray(x) for x in jax.tree.leaves(params)],
    [[np.asarray(x) for x in jax.tree.leaves(g)] for g in grads_seq],
    lr=lr,
    q=q,
    momentum=beta,
    weight_decay=eta,
    eligible=flags,
    unselected_shrink=shrink or 0.0,
  )
  # Only eligible leaves get decay; others are plain momentum SGD.
  for got, w in zip(jax.tree.leaves(p), want):
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


def test_unselected_decay_matches_reference():
  params = make_problem()
  grads_seq = [grads_like(params, s) for s in range(3)]
  tx = optax_gsm.gsm(
    0.1,
    num_nonzero=20,
    momentum=0.5,
    weight_decay=1e-3,
    unselected_decay=0.05,
    unselected_shrink=None,
  )
  state, p = tx.init(params), params
  for g in grads_seq:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  flags = [x.ndim >= 2 for x in jax.tree.leaves(params)]
  want, _ = reference.gsm_steps(
    [np.asarray(x) for x in jax.tree.leaves(params)],
    [[np.asarray(x) for x in jax.tree.leaves(g)] for g in grads_seq],
    lr=0.1,
    q=20,
    momentum=0.5,
    weight_decay=1e-3,
    eligible=flags,
    unselected_decay=0.05,
  )
  for got, w in zip(jax.tree.leaves(p), want):
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


def test_score_momentum_ranks_by_running_average():
  w = {"w": jnp.array([[1.0, 1.0, 1.0]])}
  tx = optax_gsm.global_top_q(1, score_momentum=0.5)
  state = tx.init(w)
  # Step 1 scores [4, 3, 0]; step 2 scores [0, 2, 5].
  # Averages: [2, 1.5, 0] then [1, 1.75, 2.5] -> entry 2 wins step 2.
  u, state = tx.update({"w": jnp.array([[4.0, 3.0, 0.0]])}, state, w)
  np.testing.assert_array_equal(u["w"], [[4.0, 0.0, 0.0]])
  u, state = tx.update({"w": jnp.array([[0.0, 2.0, 5.0]])}, state, w)
  np.testing.assert_array_equal(u["w"], [[0.0, 0.0, 5.0]])
  np.testing.assert_allclose(state.score_ema["w"], [[1.0, 1.75, 2.5]])
  # With m = 0.9 the averages after scores [4, 3, 0] then [0, 2, 3] are
  # [0.36, 0.47, 0.3]: entry 1 wins, where the raw step-2 scores pick entry 2.
  tx = optax_gsm.global_top_q(1, score_momentum=0.9)
  state = tx.init(w)
  _, state = tx.update({"w": jnp.array([[4.0, 3.0, 0.0]])}, state, w)
  u, _ = tx.update({"w": jnp.array([[0.0, 2.0, 3.0]])}, state, w)
  np.testing.assert_array_equal(u["w"], [[0.0, 2.0, 0.0]])


@pytest.mark.parametrize("nesterov", [False, True])
def test_compression_one_is_sgd_with_weight_decay(nesterov):
  params = make_problem()
  lr = optax.piecewise_constant_schedule(0.1, {2: 0.1})
  tx = optax_gsm.gsm(lr, compression=1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
  ref = optax.chain(
    optax.add_decayed_weights(5e-4, mask=optax_gsm.default_where),
    optax.sgd(lr, momentum=0.9, nesterov=nesterov),
  )
  p1 = p2 = params
  s1, s2 = tx.init(params), ref.init(params)
  for step in range(4):
    g = grads_like(params, step)
    u1, s1 = jax.jit(tx.update)(g, s1, p1)
    u2, s2 = jax.jit(ref.update)(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _q_per_step(tx, params, steps: int) -> list[int]:
  """The Q that a gsm ``tx`` selects at each of its first ``steps`` steps."""
  state = tx.init(params)
  step = jax.jit(tx.update)
  seen = []
  for s in range(steps):
    _, state = step(grads_like(params, s), state, params)
    seen.append(int(state[0].num_nonzero))
  return seen


def test_num_nonzero_schedule_and_traced_q():
  params = make_problem()
  n = optax_gsm.count_eligible(params)
  schedule = optax.linear_schedule(n, 10, transition_steps=3)
  tx = optax_gsm.gsm(0.01, num_nonzero=schedule, selection="threshold")
  seen = _q_per_step(tx, params, 5)
  assert seen == [n, round(n - (n - 10) / 3), round(n - 2 * (n - 10) / 3), 10, 10]


def test_compression_ramp_q_per_step_by_hand():
  """``compression_ramp`` in ``gsm`` (README, "Starting dense"). By hand,
  N = 1024, C = 10, T = 4 steps: the sparsity 0.9 (1 - (1 - t/4)^3) is 0,
  0.5203125, 0.7875, 0.8859375, 0.9, so Q = round(1024 (1 - s)) = 1024,
  491.2 -> 491, 217.6 -> 218, 116.8 -> 117, 102.4 -> 102, and 102 from then
  on; with transition_begin=2, two dense steps first."""
  params = {"w": jnp.ones((32, 32), jnp.float32), "b": jnp.zeros((32,), jnp.float32)}
  ramp = optax_gsm.compression_ramp(10, transition_steps=4)
  assert _q_per_step(optax_gsm.gsm(0.01, compression=ramp), params, 6) == [
    1024,
    491,
    218,
    117,
    102,
    102,
  ]
  late = optax_gsm.compression_ramp(10, transition_steps=4, transition_begin=2)
  assert _q_per_step(optax_gsm.gsm(0.01, compression=late), params, 7) == [
    1024,
    1024,
    1024,
    491,
    218,
    117,
    102,
  ]


def test_inject_hyperparams():
  params = make_problem()
  tx = optax.inject_hyperparams(optax_gsm.gsm)(learning_rate=0.1, num_nonzero=25, momentum=0.9)
  state = tx.init(params)
  step = jax.jit(tx.update)
  updates, state = step(grads_like(params, 0), state, params)
  assert int(state.inner_state[0].num_nonzero) == 25
  state.hyperparams["num_nonzero"] = jnp.asarray(7)
  state.hyperparams["learning_rate"] = jnp.asarray(0.5)
  _, state = step(grads_like(params, 1), state, params)
  assert int(state.inner_state[0].num_nonzero) == 7
  plain = optax_gsm.gsm(0.1, num_nonzero=25, momentum=0.9)
  want, _ = plain.update(grads_like(params, 0), plain.init(params), params)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_multi_steps_accumulates_before_selecting():
  params = make_problem()
  g1, g2 = grads_like(params, 0), grads_like(params, 1)
  tx = optax.MultiSteps(optax_gsm.gsm(0.1, num_nonzero=12), every_k_schedule=2)
  state = tx.init(params)
  u, state = tx.update(g1, state, params)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
  u, state = tx.update(g2, state, params)
  direct = optax_gsm.gsm(0.1, num_nonzero=12)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  want, _ = direct.update(mean, direct.init(params), params)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_apply_if_finite_skips_nan_step():
  params = make_problem()
  tx = optax.apply_if_finite(optax_gsm.gsm(0.1, num_nonzero=12), 3)
  state = tx.init(params)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads_like(params, 0))
  u, state = tx.update(bad, state, params)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
  assert int(state.notfinite_count) == 1
  u, state = tx.update(grads_like(params, 1), state, params)
  assert int(state.notfinite_count) == 0
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(u))


def test_bfloat16_leaves():
  params = make_problem(dtype=jnp.bfloat16)
  grads = grads_like(params, 4)
  tx = optax_gsm.gsm(0.1, num_nonzero=17)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == jnp.bfloat16
  gtq = optax_gsm.global_top_q(17)
  masked, _ = gtq.update(grads, gtq.init(params), params)
  scores = [
    np.abs(np.asarray(g, np.float32) * np.asarray(p, np.float32))
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params))
    if p.ndim >= 2
  ]
  masks = iter(reference.ranked_selection(scores, 17))
  for u, g, p in zip(jax.tree.leaves(masked), jax.tree.leaves(grads), jax.tree.leaves(params)):
    if p.ndim >= 2:
      np.testing.assert_array_equal(
        np.asarray(u, np.float32), np.where(next(masks), np.asarray(g, np.float32), 0)
      )


def test_nan_gradient_entries_are_never_selected():
  params = {"w": jnp.ones((2, 3))}
  grads = {"w": jnp.array([[jnp.nan, 1.0, 2.0], [3.0, jnp.nan, 0.5]])}
  tx = optax_gsm.global_top_q(3)
  u, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(u["w"], [[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])


def test_state_is_namedtuple_of_arrays_and_jittable_init():
  params = make_problem()
  tx = optax_gsm.gsm(0.1, compression=4, score_momentum=0.5)
  state = jax.jit(tx.init)(params)
  assert isinstance(state[0], optax_gsm.GlobalTopQState)
  for leaf in jax.tree.leaves(state):
    assert isinstance(leaf, jax.Array)


def test_auto_never_picks_top_k():
  assert transform.resolve_selection("auto") != "top_k"


def test_non_finite_score_never_enters_the_score_average():
  w = {"w": jnp.array([[1.0, 1.0, 1.0]])}
  tx = optax_gsm.global_top_q(1, score_momentum=0.5)
  state = tx.init(w)
  # Step 1 scores [4, 2, 0]: averages [2, 1, 0]. Step 2 has a NaN and an
  # inf: those entries keep 2 and 1, entry 2 averages to 3 and wins.
  _, state = tx.update({"w": jnp.array([[4.0, 2.0, 0.0]])}, state, w)
  u, state = tx.update({"w": jnp.array([[jnp.nan, jnp.inf, 6.0]])}, state, w)
  np.testing.assert_array_equal(state.score_ema["w"], [[2.0, 1.0, 3.0]])
  np.testing.assert_array_equal(u["w"], [[0.0, 0.0, 6.0]])
  # Finite again: [0, 4, 0] gives [1, 2.5, 1.5]; the average recovered.
  u, state = tx.update({"w": jnp.array([[0.0, 4.0, 0.0]])}, state, w)
  np.testing.assert_array_equal(state.score_ema["w"], [[1.0, 2.5, 1.5]])
  np.testing.assert_array_equal(u["w"], [[0.0, 4.0, 0.0]])


@pytest.mark.parametrize("score_momentum", [None, 0.9])
@pytest.mark.parametrize("shrink", [None, optax_gsm.DEFAULT_UNSELECTED_SHRINK])
def test_tree_map_params_maps_the_params_shaped_state(score_momentum, shrink):
  params = make_problem()
  tx = optax_gsm.gsm(0.1, compression=4, score_momentum=score_momentum, unselected_shrink=shrink)
  state = tx.init(params)
  mapped = optax.tree_utils.tree_map_params(
    tx, lambda p: jnp.full(p.shape, 7.0), state, transform_non_params=lambda v: v
  )
  # The momentum buffer and (with score momentum) the score average.
  trace_state = mapped[2]
  for leaf in jax.tree.leaves(trace_state.trace):
    np.testing.assert_array_equal(leaf, 7.0)
  ema = mapped[0].score_ema
  if score_momentum is None:
    assert ema == ()
  else:
    assert jax.tree.structure(ema) == jax.tree.structure(params)
    for leaf in jax.tree.leaves(ema):
      np.testing.assert_array_equal(leaf, 7.0)
  assert int(mapped[0].count) == 0


@pytest.mark.parametrize(
  "make",
  [
    lambda: optax_gsm.gsm(0.1, compression=7),
    lambda: optax_gsm.gsm(
      optax.cosine_decay_schedule(0.1, 10),
      compression=7,
      unselected_shrink=None,
      score_momentum=0.5,
    ),
    lambda: optax_gsm.global_top_q(compression=lambda step: 7 + step),
  ],
  ids=["gsm", "gsm paper rule, schedules", "global_top_q, schedule"],
)
def test_eager_and_jitted_updates_are_identical(make):
  params = make_problem()
  tx = make()
  eager_state = jit_state = tx.init(params)
  eager_params = jit_params = params
  step = jax.jit(tx.update)
  for s in range(3):
    g = grads_like(params, s)
    eager_u, eager_state = tx.update(g, eager_state, eager_params)
    jit_u, jit_state = step(g, jit_state, jit_params)
    for a, b in zip(jax.tree.leaves((eager_u, eager_state)), jax.tree.leaves((jit_u, jit_state))):
      np.testing.assert_array_equal(a, b)
    eager_params = optax.apply_updates(eager_params, eager_u)
    jit_params = optax.apply_updates(jit_params, jit_u)
