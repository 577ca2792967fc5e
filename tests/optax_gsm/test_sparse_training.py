"""RigL and SET (optax_gsm.baselines.sparse_training): densities, drop/grow, transforms."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_gsm import baselines

LENET300 = {
  "fc1": {"kernel": jnp.zeros((784, 300)), "bias": jnp.zeros(300)},
  "fc2": {"kernel": jnp.zeros((300, 100)), "bias": jnp.zeros(100)},
  "fc3": {"kernel": jnp.zeros((100, 10)), "bias": jnp.zeros(10)},
}


# --- densities ------------------------------------------------------------------------


def test_erk_densities_of_lenet_300_100_by_hand():
  # Ratios (sum of dims / prod of dims): 1084/235200, 400/30000, 110/1000.
  # Density 0.1 keeps 26620 of 266200. With all three: eps = 26620 / (1084 +
  # 400 + 110) = 16.70, so fc3 would get 0.11 * 16.70 = 1.84 > 1: fc3 dense,
  # and eps = (26620 - 1000) / (1084 + 400) = 17.264 for fc1 and fc2.
  d = baselines.layer_densities(LENET300, 0.1)
  eps = 25620 / 1484
  assert d["fc3"]["kernel"] == 1.0
  assert d["fc1"]["kernel"] == pytest.approx(eps * 1084 / 235200, rel=1e-12)
  assert d["fc2"]["kernel"] == pytest.approx(eps * 400 / 30000, rel=1e-12)
  assert d["fc1"]["kernel"] == pytest.approx(0.079568, abs=1e-6)
  assert d["fc2"]["kernel"] == pytest.approx(0.230189, abs=1e-6)
  assert all(d[k]["bias"] == 1.0 for k in d)  # not eligible
  kept = sum(d[k]["kernel"] * LENET300[k]["kernel"].size for k in d)
  assert kept == pytest.approx(26620, rel=1e-12)
  # At 125x nothing is capped: eps = 2129.6 / 1594 for every layer.
  d = baselines.layer_densities(LENET300, 1 / 125)
  eps = 266200 / 125 / 1594
  assert d["fc3"]["kernel"] == pytest.approx(eps * 0.11, rel=1e-12)


def test_erk_counts_kernel_dimensions_and_caps_in_order():
  # A conv kernel (5, 5, 1, 20): ratio 31 / 500; a dense (500, 10): 510/5000.
  params = {
    "conv": jnp.zeros((5, 5, 1, 20)),
    "fc": jnp.zeros((500, 10)),
    "big": jnp.zeros((1000, 1000)),
  }
  d = baselines.layer_densities(params, 0.05)
  # Target 0.05 * 1,005,500 = 50275. Uncapped eps = 50275 / (31 + 510 + 2000)
  # = 19.79: conv 1.23 and fc 2.02 exceed 1, but only the largest ratio (fc)
  # is capped first; then eps = (50275 - 5000) / 2031 = 22.29 caps conv too.
  assert d["fc"] == 1.0 and d["conv"] == 1.0
  assert d["big"] == pytest.approx((50275 - 5000 - 500) / 1e6, rel=1e-9)
  uniform = baselines.layer_densities(params, 0.05, "uniform")
  assert set(jax.tree.leaves(uniform)) == {0.05}


def test_layer_densities_follow_where_and_full_density():
  params = {"w": jnp.zeros((4, 6)), "b": jnp.zeros(6)}
  d = baselines.layer_densities(params, 0.5, where={"w": True, "b": True})
  # ratios 10/24 and 6/6 = 1: eps = 15 / (10 + 6) -> b gets 0.9375.
  assert d["b"] == pytest.approx(15 / 16) and d["w"] == pytest.approx(15 / 16 * 10 / 24)
  assert jax.tree.leaves(baselines.layer_densities(params, 1.0)) == [1.0, 1.0]


@pytest.mark.parametrize(
  "density,err,match",
  [
    (0.0, ValueError, r"`density` must be in \(0, 1\].*0.0"),
    (1.5, ValueError, r"`density` must be in \(0, 1\].*1.5"),
    ("0.1", TypeError, r"`density` must be a number in \(0, 1\].*'0.1'"),
    (True, TypeError, r"`density` must be a number"),
  ],
)
def test_layer_densities_bad_density(density, err, match):
  with pytest.raises(err, match=match):
    baselines.layer_densities(LENET300, density)


def test_layer_densities_bad_distribution():
  with pytest.raises(
    ValueError,
    match=r"`distribution` must be one of \('erk', "
    r"'uniform'\), got 'er'",
  ):
    baselines.layer_densities(LENET300, 0.1, "er")


# --- density_prune --------------------------------------------------------------------


def test_density_prune_hits_num_nonzero_exactly_with_erk():
  params = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(p.size), p.shape), LENET300)
  for c in (10, 30, 60, 125):
    q = round(266200 / c)
    d = baselines.layer_densities(params, q / 266200)
    pruned, masks = baselines.density_prune(params, d, num_nonzero=q)
    counts = {k: int(masks[k]["kernel"].sum()) for k in masks}
    assert sum(counts.values()) == q
    for k in counts:  # each leaf within one of its exact share
      assert abs(counts[k] - d[k]["kernel"] * params[k]["kernel"].size) < 1
      assert bool(masks[k]["bias"].all())
      np.testing.assert_array_equal(pruned[k]["bias"], params[k]["bias"])
    # Magnitude: every kept entry of a leaf is at least every pruned one.
    w, m = np.abs(np.asarray(params["fc2"]["kernel"])), np.asarray(masks["fc2"]["kernel"])
    assert w[m].min() >= w[~m].max()
    assert int(sum(np.count_nonzero(pruned[k]["kernel"]) for k in pruned)) == q


def test_density_prune_random_is_a_function_of_the_key():
  params = {"w": jnp.ones((8, 8)), "v": jnp.ones((4, 4))}
  _, a = baselines.density_prune(params, 0.25, key=3)
  _, b = baselines.density_prune(params, 0.25, key=jax.random.key(3))
  _, c = baselines.density_prune(params, 0.25, key=4)
  np.testing.assert_array_equal(a["w"], b["w"])
  assert not np.array_equal(a["w"], c["w"])
  assert int(a["w"].sum()) == 16 and int(a["v"].sum()) == 4


def test_density_prune_bad_inputs():
  params = {"w": jnp.ones((4, 4)), "v": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match=r"`densities` must be one number or a pytree"):
    baselines.density_prune(params, {"w": 0.5})
  with pytest.raises(
    ValueError,
    match=r"`densities` must hold numbers in \[0, 1\]; "
    r"leaf 1 holds 1.5",
  ):
    baselines.density_prune(params, {"w": 1.5, "v": 0.5})
  with pytest.raises(
    ValueError,
    match=r"`num_nonzero`=12 does not match the densities, "
    r"which keep 5.0 of the 20",
  ):
    baselines.density_prune(params, 0.25, num_nonzero=12)
  with pytest.raises(TypeError, match=r"`num_nonzero` must be an int, got 5.0"):
    baselines.density_prune(params, 0.25, num_nonzero=5.0)
  with pytest.raises(TypeError, match=r"`key` must be an int seed or a PRNG key"):
    baselines.density_prune(params, 0.25, key=jnp.ones(3))


# --- drop_and_grow, worked by hand -------------------------------------------------------

# A 4x4 leaf, rows 0 and 1 active (flat indices 0..7), k = 2.
W44 = jnp.array(
  [[0.9, -0.05, 0.4, 0.3], [-0.7, 0.2, 0.01, -0.6], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
)
M44 = jnp.array([[True] * 4, [True] * 4, [False] * 4, [False] * 4])
G44 = jnp.array(
  [[10.0, 3.0, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1], [0.1, -2.0, 0.1, 0.1], [0.1, 0.1, 1.5, 0.1]]
)
# Drop the two smallest active |w|: index 6 (0.01) and 1 (0.05). Grow the two
# largest |g| outside the kept six: index 1 (3.0, the dropped one: it stays)
# and index 9 (2.0); index 14 (1.5) is third. Net: 6 out, 9 in.
WANT44 = np.array([[1, 1, 1, 1], [1, 1, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]], bool)


def test_drop_and_grow_by_hand():
  got = baselines.drop_and_grow(M44, jnp.abs(W44), jnp.abs(G44), 2)
  np.testing.assert_array_equal(got, WANT44)
  # k = 0 and k >= n: nothing / everything is re-chosen.
  np.testing.assert_array_equal(baselines.drop_and_grow(M44, jnp.abs(W44), jnp.abs(G44), 0), M44)
  all_new = baselines.drop_and_grow(M44, jnp.abs(W44), jnp.abs(G44), 99)
  assert int(all_new.sum()) == 8
  # The 8 largest |g| overall: 0, 1, 9, 14 and, of the 0.1 ties, 2, 3, 4, 5.
  np.testing.assert_array_equal(np.flatnonzero(all_new), [0, 1, 2, 3, 4, 5, 9, 14])


def test_drop_and_grow_ties_and_nans():
  mask = jnp.array([True, True, True, False, False, False])
  # Equal magnitudes: the lower index is kept, so index 2 is dropped; equal
  # gradients: the lower index grows (3). NaN ranks lowest: the NaN weight is
  # dropped, and the dropped entry (grow score 0) beats the NaN gradients.
  got = baselines.drop_and_grow(
    mask, jnp.array([1.0, 1.0, 1.0, 0, 0, 0]), jnp.array([0, 0, 0, 5.0, 5.0, 5.0]), 1
  )
  np.testing.assert_array_equal(np.flatnonzero(got), [0, 1, 3])
  got = baselines.drop_and_grow(
    mask,
    jnp.array([1.0, jnp.nan, 2.0, 0, 0, 0]),
    jnp.array([0, 0, 0, jnp.nan, jnp.nan, jnp.nan]),
    1,
  )
  np.testing.assert_array_equal(np.flatnonzero(got), [0, 1, 2])


def test_drop_and_grow_under_jit_with_traced_k():
  f = jax.jit(baselines.drop_and_grow)
  np.testing.assert_array_equal(f(M44, jnp.abs(W44), jnp.abs(G44), jnp.int32(2)), WANT44)


def test_drop_and_grow_bad_inputs():
  with pytest.raises(TypeError, match="`mask` must be a bool array, got dtype float32"):
    baselines.drop_and_grow(jnp.ones(3), jnp.ones(3), jnp.ones(3), 1)
  with pytest.raises(
    ValueError,
    match=r"`grow_scores` has shape \(2,\), but `mask` has "
    r"shape \(3,\)",
  ):
    baselines.drop_and_grow(jnp.ones(3, bool), jnp.ones(3), jnp.ones(2), 1)


# --- the transforms ----------------------------------------------------------------------


def _rigl_44(**kw):
  args = dict(update_interval=1, end_step=10, drop_fraction=0.25, decay="constant")
  args.update(kw)
  return baselines.rigl(optax.sgd(0.0, momentum=0.9), {"w": M44}, **args)


def test_rigl_update_by_hand():
  """The 4x4 case through the transform: lr 0, so |W + u| = |W|; k = 0.25 * 8."""
  tx = _rigl_44()
  params = {"w": W44}
  state = tx.init(params)
  # A stale momentum of 1 everywhere, to see which entries get reset.
  trace = {"w": jnp.ones((4, 4))}
  inner = state.inner_state
  state = state._replace(
    count=jnp.int32(1), inner_state=(inner[0]._replace(trace=trace),) + tuple(inner[1:])
  )
  updates, new = jax.jit(tx.update)({"w": G44}, state, params)
  np.testing.assert_array_equal(baselines.sparse_training_masks(new)["w"], WANT44)
  w = np.asarray(optax.apply_updates(params, updates)["w"])
  want_w = np.where(WANT44, np.asarray(W44), 0.0)
  want_w.flat[6] = 0.0  # dropped
  want_w.flat[9] = 0.0  # grown: starts at zero
  np.testing.assert_array_equal(w, want_w)
  assert w.flat[1] == np.float32(-0.05)  # dropped and regrown: kept as is
  # Momentum: 0.9 * 1 + masked gradient, zeroed where the mask changed (6, 9).
  want_trace = 0.9 + np.where(np.asarray(M44), np.asarray(G44), 0.0)
  want_trace.flat[6] = want_trace.flat[9] = 0.0
  np.testing.assert_allclose(new.inner_state[0].trace["w"], want_trace, rtol=1e-6)
  # Without the reset the buffers keep their values.
  _, kept = _rigl_44(reset_inner_state=False).update({"w": G44}, state, params)
  assert float(kept.inner_state[0].trace["w"][2, 1]) == pytest.approx(0.9)


def test_set_update_drops_by_magnitude_and_grows_at_random():
  tx = baselines.sparse_evolutionary_training(
    optax.sgd(0.0),
    {"w": M44},
    key=0,
    update_interval=1,
    end_step=10,
    drop_fraction=0.25,
    decay="constant",
  )
  params = {"w": W44}
  state = tx.init(params)._replace(count=jnp.int32(1))
  _, new = tx.update({"w": G44}, state, params)
  m = np.asarray(baselines.sparse_training_masks(new)["w"])
  kept = np.asarray(M44).copy()
  kept.flat[[1, 6]] = False
  assert m.sum() == 8 and (m >= kept).all()  # the six largest stay
  # The two grown are a function of (key, step, leaf): reproduced by hand.
  sub = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 1), 0)
  scores = np.array(jax.random.uniform(sub, (4, 4))).ravel()
  scores[kept.ravel()] = -1
  np.testing.assert_array_equal(np.flatnonzero(m & ~kept), np.sort(np.argsort(-scores)[:2]))


def test_schedule_cosine_decay_and_steps():
  """Updates at t = dT, 2 dT, ... < T_end only; k = floor(alpha/2 (1 + cos(pi t / T)) n)."""
  params = {"w": jnp.arange(1.0, 65.0).reshape(8, 8)}
  _, masks = baselines.density_prune(params, 0.5)  # 32 active: 33..64
  # Zero gradients on the active entries, so that a dropped entry is never
  # regrown at once and every swap is a real change.
  ramp = 1.0 + jnp.arange(64.0).reshape(8, 8)
  tx = baselines.rigl(optax.sgd(0.0), masks, update_interval=3, end_step=10, drop_fraction=0.5)
  update = jax.jit(tx.update)
  state = tx.init(params)
  for t in range(12):
    before = np.asarray(state.masks["w"])
    _, state = update({"w": jnp.where(state.masks["w"], 0.0, ramp)}, state, params)
    after = np.asarray(state.masks["w"])
    swapped = int((before & ~after).sum())
    want = math.floor(0.25 * (1 + math.cos(math.pi * t / 10)) * 32) if t in (3, 6, 9) else 0
    assert swapped == want, (t, swapped, want)
    assert after.sum() == 32
    params = jax.tree.map(lambda p, m: jnp.where(m, p, 0.0), params, state.masks)


def _check_exact(tx, params, grads_fn, steps):
  """Runs ``steps`` jitted updates; checks the per-leaf counts after every one."""
  state = tx.init(params)
  start = [int(m.sum()) for m in jax.tree.leaves(baselines.sparse_training_masks(state))]
  update = jax.jit(tx.update)
  history = []
  for t in range(steps):
    updates, state = update(grads_fn(t), state, params)
    params = optax.apply_updates(params, updates)
    masks = baselines.sparse_training_masks(state)
    for m, p, n in zip(jax.tree.leaves(masks), jax.tree.leaves(params), start):
      assert int(m.sum()) == n
      assert not np.asarray(p)[~np.asarray(m)].any()  # zero outside the mask
    history.append(jax.tree.map(np.asarray, masks))
  return history, params


@st.composite
def problems(draw):
  n_leaves = draw(st.integers(1, 3))
  shapes = [
    tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=3))) for _ in range(n_leaves)
  ]
  density = draw(st.floats(0.05, 1.0))
  seed = draw(st.integers(0, 2**16))
  interval = draw(st.integers(1, 3))
  fraction = draw(st.floats(0.0, 1.0))
  kind = draw(st.sampled_from(["rigl", "set"]))
  return shapes, density, seed, interval, fraction, kind


@hypothesis.settings(max_examples=6, deadline=None)
@hypothesis.given(problems())
def test_exact_counts_after_every_update(problem):
  shapes, density, seed, interval, fraction, kind = problem
  rng = np.random.default_rng(seed)
  params = {f"l{i}": jnp.asarray(rng.normal(size=s), jnp.float32) for i, s in enumerate(shapes)}
  where = {k: True for k in params}  # 1-D leaves too
  dens = baselines.layer_densities(params, density, where=where)
  params, masks = baselines.density_prune(params, dens, where=where)
  inner = optax.sgd(0.1, momentum=0.9)
  common = dict(update_interval=interval, end_step=7, drop_fraction=fraction, where=where)
  if kind == "rigl":
    tx = baselines.rigl(inner, masks, **common)
  else:
    tx = baselines.sparse_evolutionary_training(inner, masks, key=seed, **common)
  grads = [
    {k: jnp.asarray(rng.normal(size=np.shape(v)), jnp.float32) for k, v in params.items()}
    for _ in range(8)
  ]
  _check_exact(tx, params, lambda t: grads[t], 8)


def test_set_is_deterministic_given_its_key():
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (16, 16))}
  params, masks = baselines.density_prune(params, 0.2)
  grads = lambda t: {"w": jnp.full((16, 16), 0.01 * (t + 1))}  # noqa: E731

  def run(key):
    tx = baselines.sparse_evolutionary_training(
      optax.sgd(0.1, momentum=0.9), masks, key=key, update_interval=2, end_step=6
    )
    return _check_exact(tx, params, grads, 6)

  (h1, p1), (h2, p2), (h3, _) = run(7), run(jax.random.key(7)), run(8)
  for a, b in zip(h1, h2):
    np.testing.assert_array_equal(a["w"], b["w"])
  np.testing.assert_array_equal(p1["w"], p2["w"])
  assert not np.array_equal(h1[-1]["w"], h3[-1]["w"])
  assert not np.array_equal(h1[-1]["w"], np.asarray(masks["w"]))  # it did move


def test_jit_compiles_once_and_matches_eager():
  params = {"w": jax.random.normal(jax.random.PRNGKey(1), (6, 5)), "b": jnp.ones(5)}
  params, masks = baselines.density_prune(params, 0.4)
  tx = baselines.rigl(optax.sgd(0.1, momentum=0.9), masks, update_interval=1, end_step=3)
  grads = {"w": jnp.linspace(-1, 1, 30).reshape(6, 5), "b": jnp.ones(5)}
  traces = []

  def update(g, s, p):
    traces.append(1)
    return tx.update(g, s, p)

  jitted = jax.jit(update)
  s_jit = s_eager = tx.init(params)
  p_jit = p_eager = params
  for _ in range(3):
    u, s_jit = jitted(grads, s_jit, p_jit)
    p_jit = optax.apply_updates(p_jit, u)
    u, s_eager = tx.update(grads, s_eager, p_eager)
    p_eager = optax.apply_updates(p_eager, u)
  assert len(traces) == 1
  np.testing.assert_allclose(p_jit["w"], p_eager["w"], rtol=1e-6)
  np.testing.assert_array_equal(s_jit.masks["w"], s_eager.masks["w"])
  assert bool(s_jit.masks["b"].all())


def test_inject_hyperparams_and_tree_map_params():
  params = {"w": jax.random.normal(jax.random.PRNGKey(2), (5, 4)), "b": jnp.ones(4)}
  params, masks = baselines.density_prune(params, 0.5)
  tx = optax.inject_hyperparams(baselines.rigl, static_args=("decay",))(
    inner=optax.sgd(0.1, momentum=0.9),
    masks=masks,
    update_interval=1,
    end_step=4,
    drop_fraction=0.5,
  )
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update)
  for _ in range(3):
    _, state = update(grads, state, params)
  assert float(state.hyperparams["drop_fraction"]) == 0.5
  assert int(baselines.sparse_training_masks(state)["w"].sum()) == 10
  # tree_map_params maps the masks and the momentum, and nothing else.
  plain = baselines.rigl(optax.sgd(0.1, momentum=0.9), masks, update_interval=1, end_step=4)
  pstate = plain.init(params)
  mapped = optax.tree_utils.tree_map_params(
    plain, lambda v: jnp.zeros(v.shape, jnp.int8), pstate, transform_non_params=lambda v: v
  )
  assert mapped.masks["w"].dtype == jnp.int8
  assert mapped.inner_state[0].trace["w"].dtype == jnp.int8
  assert mapped.count.dtype == jnp.int32


def test_state_round_trips_through_orbax(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  params = {"w": jax.random.normal(jax.random.PRNGKey(3), (6, 6))}
  params, masks = baselines.density_prune(params, 0.3)
  tx = baselines.sparse_evolutionary_training(
    optax.sgd(0.1, momentum=0.9), masks, key=5, update_interval=1, end_step=6
  )
  grads = {"w": jnp.ones((6, 6))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(3):
    _, state = update(grads, state, params)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "state", state)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "state", target=tx.init(params))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype
  u1, s1 = update(grads, restored, params)
  u2, s2 = update(grads, state, params)
  np.testing.assert_array_equal(u1["w"], u2["w"])
  np.testing.assert_array_equal(s1.masks["w"], s2.masks["w"])


def test_adam_moments_are_reset_and_extra_args_pass_through():
  params = {"w": jax.random.normal(jax.random.PRNGKey(4), (4, 4))}
  params, masks = baselines.density_prune(params, 0.5)
  tx = baselines.rigl(optax.adam(1e-2), masks, update_interval=2, end_step=6, drop_fraction=0.5)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(3):
    g = {"w": jax.random.normal(jax.random.PRNGKey(10 + t), (4, 4))}
    before = state.masks["w"]
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  changed = np.asarray(before != state.masks["w"])
  assert changed.any()
  adam = state.inner_state[0]
  assert not np.asarray(adam.mu["w"])[changed].any()
  assert not np.asarray(adam.nu["w"])[changed].any()


@pytest.mark.parametrize(
  "kwargs,err,match",
  [
    (dict(inner="sgd"), TypeError, r"`inner` must be an optax.GradientTransformation.*'sgd'"),
    (dict(update_interval=0), ValueError, r"`update_interval` must be >= 1, got 0"),
    (dict(update_interval=1.5), TypeError, r"`update_interval` must be an int, got 1.5"),
    (dict(update_interval=True), TypeError, r"`update_interval` must be an int, got True"),
    (dict(end_step=-1), ValueError, r"`end_step` must be >= 0, got -1"),
    (dict(drop_fraction=1.5), ValueError, r"`drop_fraction` must be in \[0.0, 1.0\], got 1.5"),
    (dict(drop_fraction=lambda t: 0.3), TypeError, r"`drop_fraction` must be a number"),
    (
      dict(decay="linear"),
      ValueError,
      r"`decay` must be one of \('cosine', 'constant'\), "
      r"got 'linear'",
    ),
    (dict(reset_inner_state=1), TypeError, r"`reset_inner_state` must be a bool, got 1"),
    (dict(masks=None), TypeError, r"`masks` must be a pytree of bool arrays.*got None"),
  ],
)
def test_bad_arguments_raise_at_the_factory(kwargs, err, match):
  args = dict(inner=optax.sgd(0.1), masks={"w": M44}, end_step=10)
  args.update(kwargs)
  with pytest.raises(err, match=match):
    baselines.rigl(**args)


def test_bad_masks_key_and_missing_params():
  params = {"w": jnp.ones((4, 4))}
  with pytest.raises(
    ValueError,
    match=r"`masks` leaf 0 has shape \(2, 2\), but the "
    r"parameter has shape \(4, 4\)",
  ):
    baselines.rigl(optax.sgd(0.1), {"w": jnp.ones((2, 2), bool)}, end_step=5).init(params)
  with pytest.raises(
    TypeError,
    match=r"`masks` must hold bool arrays; leaf 0 has dtype "
    r"float32",
  ):
    baselines.rigl(optax.sgd(0.1), {"w": jnp.ones((4, 4))}, end_step=5).init(params)
  with pytest.raises(ValueError, match=r"`masks` must hold one bool array per leaf"):
    baselines.rigl(optax.sgd(0.1), {"w": M44, "v": M44}, end_step=5).init(params)
  with pytest.raises(TypeError, match=r"`key` must be an int seed or a PRNG key .*got None"):
    baselines.sparse_evolutionary_training(optax.sgd(0.1), {"w": M44}, key=None, end_step=5)
  with pytest.raises(TypeError, match=r"`key` must be an int seed or a PRNG key .*float32"):
    baselines.sparse_evolutionary_training(optax.sgd(0.1), {"w": M44}, key=jnp.ones(2), end_step=5)
  tx = baselines.rigl(optax.sgd(0.1), {"w": M44}, end_step=5)
  with pytest.raises(ValueError, match=r"rigl drops weights by magnitude.*needs params"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="no RigLState or SETState"):
    baselines.sparse_training_masks(optax.sgd(0.1).init(params))


def test_a_donating_step_leaves_the_callers_masks_alive():
  params = {"w": jnp.ones((4, 4))}
  tx = baselines.rigl(optax.sgd(0.1), {"w": M44}, end_step=5)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=(1,))
  step(params, tx.init(params), params)
  assert int(M44.sum()) == 8
