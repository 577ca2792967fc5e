"""The pruning baselines against hand-worked cases and numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gsm
from optax_gsm import baselines
from optax_gsm.baselines import lobs

from tests.optax_gsm import reference


# ------------------------------------------------------------------ masking


def _masks_like(rng, params, keep=0.3):
  return jax.tree.map(
    lambda p: jnp.asarray(rng.random(p.shape) < keep) if p.ndim >= 2 else jnp.ones(p.shape, bool),
    params,
  )


def test_fixed_mask_retraining_keeps_pruned_weights_exactly_zero():
  rng = np.random.default_rng(0)
  params = {
    "w": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32),
    "b": jnp.asarray(rng.standard_normal(5), jnp.float32),
  }
  masks = _masks_like(rng, params)
  # Momentum and weight decay of pruned entries must never reach the weights;
  # the starting values are NOT zero, masked_updates zeroes them at step 1.
  inner = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, 0.9))
  tx = optax.chain(inner, baselines.masked_updates(masks))
  state, ref_state = tx.init(params), inner.init(params)
  p, ref = params, params
  for _ in range(5):
    g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
    ru, ref_state = inner.update(g, ref_state, ref)
    ref = optax.apply_updates(ref, ru)
    w = np.asarray(p["w"])
    assert np.all(w[~np.asarray(masks["w"])] == 0.0)
    # Kept entries follow exactly the unmasked optimizer (updates are
    # elementwise, so the mask cannot leak into them).
    np.testing.assert_array_equal(
      w[np.asarray(masks["w"])], np.asarray(ref["w"])[np.asarray(masks["w"])]
    )
  np.testing.assert_array_equal(p["b"], ref["b"])


def test_masked_updates_without_zeroing_and_errors():
  params = {"w": jnp.array([[1.0, 2.0]])}
  masks = {"w": jnp.array([[True, False]])}
  tx = baselines.masked_updates(masks, zero_pruned=False)
  u, _ = tx.update({"w": jnp.ones((1, 2))}, tx.init(params))
  np.testing.assert_array_equal(u["w"], [[1.0, 0.0]])
  tx = baselines.masked_updates(masks)
  with pytest.raises(ValueError, match="needs params"):
    tx.update({"w": jnp.ones((1, 2))}, tx.init(params))
  with pytest.raises(TypeError, match="bool"):
    baselines.masked_updates({"w": jnp.ones((1, 2))}).init(params)
  with pytest.raises(ValueError, match="shape"):
    baselines.masked_updates({"w": jnp.ones((2, 1), bool)}).init(params)
  with pytest.raises(ValueError, match="one bool array per leaf"):
    baselines.masked_updates([jnp.ones((1, 2), bool)] * 2).init(params)


def test_masked_updates_in_nnx_optimizer_with_plain_dict_masks():
  from flax import nnx

  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  pruned, masks = optax_gsm.magnitude_prune(params, 5)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, pruned)
  nnx.update(model, state)
  opt = nnx.Optimizer(
    model, optax.chain(optax.sgd(0.1), baselines.masked_updates(masks)), wrt=nnx.Param
  )
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 4))) ** 2))(model)
  opt.update(model, grads)
  kernel = np.asarray(model.kernel[...])
  assert np.count_nonzero(kernel) == 5
  assert np.all(kernel[~np.asarray(masks["kernel"])] == 0.0)


# ------------------------------------------------------------------ magnitude


def test_polynomial_schedule_matches_hand_computed_values():
  s = baselines.polynomial_sparsity_schedule(0.1, 0.9, begin_step=10, end_step=110, power=3)
  # s_f + (s_i - s_f) (1 - (t - 10) / 100)^3
  want = {
    0: 0.1,
    10: 0.1,
    35: 0.9 - 0.8 * 0.75**3,
    60: 0.9 - 0.8 * 0.125,
    85: 0.9 - 0.8 * 0.25**3,
    110: 0.9,
    1000: 0.9,
  }
  for t, v in want.items():
    assert float(s(t)) == pytest.approx(v, abs=1e-6), t
  assert float(jax.jit(s)(jnp.int32(60))) == pytest.approx(0.8, abs=1e-6)
  with pytest.raises(ValueError, match="end_step"):
    baselines.polynomial_sparsity_schedule(0.0, 0.5, 5, 5)
  with pytest.raises(ValueError, match="final_sparsity"):
    baselines.polynomial_sparsity_schedule(0.5, 0.2, 0, 5)
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    baselines.polynomial_sparsity_schedule(0.0, 1.0, 0, 5)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_scheduled_prune_steps_counts_and_zeros(scope):
  rng = np.random.default_rng(1)
  params = {
    "a": jnp.asarray(rng.standard_normal((10, 8)), jnp.float32),
    "b": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32),
    "bias": jnp.ones(8),
  }
  sched = baselines.polynomial_sparsity_schedule(0.0, 0.75, 0, 7)
  tx = optax.chain(
    optax.sgd(0.01, 0.9),
    baselines.scheduled_magnitude_prune(sched, frequency=3, begin_step=0, end_step=7, scope=scope),
  )
  state = jax.jit(tx.init)(params)
  update = jax.jit(tx.update)
  p = params
  kept_before = 100
  for t in range(10):
    g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    u, state = update(g, state, p)
    p = optax.apply_updates(p, u)
    masks = baselines.scheduled_masks(state, p)
    kept = int(masks["a"].sum() + masks["b"].sum())
    nonzero = int(np.count_nonzero(p["a"]) + np.count_nonzero(p["b"]))
    assert nonzero == kept  # pruned entries are exactly zero
    assert kept <= kept_before  # masks only shrink
    kept_before = kept
    s = float(sched(t))
    if t in (0, 3, 6, 7):  # every 3 steps from 0, and end_step
      if scope == "global":
        assert kept == 100 - round(s * 100)
      else:
        assert int(masks["a"].sum()) == 80 - round(s * 80)
        assert int(masks["b"].sum()) == 20 - round(s * 20)
  assert kept == 25 if scope == "global" else kept == 20 + 5
  np.testing.assert_array_equal(masks["bias"], True)


def test_scheduled_prune_ranks_by_magnitude_after_the_step():
  params = {"w": jnp.array([[1.0, -4.0], [3.0, 2.0]])}
  tx = baselines.scheduled_magnitude_prune(lambda t: 0.5, frequency=1)
  # The update makes w[0, 0] the largest: ranking uses W + u.
  u, _ = tx.update({"w": jnp.array([[9.0, 0.0], [0.0, 0.0]])}, tx.init(params), params)
  new = optax.apply_updates(params, u)
  np.testing.assert_array_equal(new["w"], [[10.0, -4.0], [0.0, 0.0]])


def test_layerwise_threshold_prune_matches_numpy():
  rng = np.random.default_rng(2)
  params = {
    "a": jnp.asarray(rng.standard_normal((30, 20)), jnp.float32),
    "b": jnp.asarray(3 * rng.standard_normal((5, 5, 2, 3)), jnp.float32),
    "bias": jnp.ones(3),
  }
  pruned, masks = baselines.layerwise_threshold_prune(params, 0.7)
  for k in ("a", "b"):
    w = np.asarray(params[k], np.float64)
    want = np.abs(w) >= 0.7 * w.std()
    np.testing.assert_array_equal(masks[k], want)
    np.testing.assert_array_equal(pruned[k], np.where(want, params[k], 0.0))
  np.testing.assert_array_equal(pruned["bias"], params["bias"])
  with pytest.raises(ValueError, match="quality"):
    baselines.layerwise_threshold_prune(params, -1.0)


# ------------------------------------------------------------------ DNS


def test_dns_hysteresis_band_keeps_state():
  t = 2.0  # band [1.8, 2.2]
  w = jnp.array([1.0, 1.79, 1.8, 2.0, 2.2, 2.21, 3.0])
  on = jnp.ones(7, bool)
  off = jnp.zeros(7, bool)
  # From 1: only |w| < 0.9 t is cut.
  np.testing.assert_array_equal(baselines.dns_update_masks(on, w, t), [0, 0, 1, 1, 1, 1, 1])
  # From 0: only |w| > 1.1 t is spliced back.
  np.testing.assert_array_equal(baselines.dns_update_masks(off, -w, t), [0, 0, 0, 0, 0, 1, 1])


def test_dns_thresholds_match_numpy_and_transform_follows_rule():
  rng = np.random.default_rng(3)
  params = {
    "a": jnp.asarray(rng.standard_normal((20, 10)), jnp.float32),
    "b": jnp.asarray(rng.standard_normal((10, 4)), jnp.float32),
    "bias": jnp.zeros(4),
  }
  got = baselines.dns_thresholds(params, [0.5, -0.2])
  for g, k, c in zip(got, ("a", "b"), (0.5, -0.2)):
    a = np.abs(np.asarray(params[k], np.float64))
    assert float(g) == pytest.approx(max(a.mean() + c * a.std(), 0), rel=1e-5)

  tx = baselines.dynamic_network_surgery(0.3, gamma=0.0, stop_step=2)
  update = jax.jit(tx.update)
  state = tx.init(params)
  t_a = float(state.thresholds[0])
  grads = jax.tree.map(jnp.ones_like, params)
  u, state = update(grads, state, params)
  # Splicing: the gradient of every weight passes through.
  for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(x, y)
  m = baselines.dns_masks(state, params)
  np.testing.assert_array_equal(m["a"], np.abs(params["a"]) >= 0.9 * t_a)
  np.testing.assert_array_equal(m["bias"], True)
  # Step 1 (gamma = 0: probability 1): a pruned weight grown above 1.1 t is
  # spliced back; a pruned and a kept weight moved into the band keep state.
  a = np.asarray(params["a"]).copy()
  off = np.argwhere(~np.asarray(m["a"]))
  on = np.argwhere(np.asarray(m["a"]))
  a[tuple(off[0])] = 1.2 * t_a
  a[tuple(off[1])] = 1.0 * t_a
  a[tuple(on[0])] = -1.0 * t_a
  moved = dict(params, a=jnp.asarray(a))
  _, state = update(grads, state, moved)
  m1 = np.asarray(baselines.dns_masks(state, moved)["a"])
  assert m1[tuple(off[0])] and not m1[tuple(off[1])] and m1[tuple(on[0])]
  # From stop_step on, masks are frozen.
  _, state2 = update(grads, state, dict(params, a=jnp.zeros_like(params["a"])))
  np.testing.assert_array_equal(baselines.dns_masks(state2, params)["a"], m1)


def test_dns_update_probability_decays():
  params = {"w": jnp.ones((3, 3))}
  # (1 + gamma k)^-power with gamma huge: only the first step (k = 0) prunes.
  tx = baselines.dynamic_network_surgery(0.0, gamma=1e9, power=1.0, seed=0)
  state = tx.init(params)
  _, state = tx.update(params, state, params)
  assert bool(baselines.dns_masks(state, params)["w"].all())  # |w| = t: kept
  for _ in range(5):
    _, state = tx.update(params, state, {"w": jnp.zeros((3, 3))})
  assert bool(baselines.dns_masks(state, params)["w"].all())
  assert int(state.count) == 6


def test_surgery_forward_is_straight_through():
  p = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
  m = {"w": jnp.array([[True, False], [False, True]])}
  x = jnp.array([1.0, 10.0])

  def loss(p):
    return jnp.sum(x @ baselines.surgery_forward(p, m)["w"])

  assert float(loss(p)) == pytest.approx(1.0 * 1 + 10.0 * 4)
  # dL/dW = dL/d(W*T): every entry, pruned or not, gets x_i.
  np.testing.assert_array_equal(jax.grad(loss)(p)["w"], [[1.0, 1.0], [10.0, 10.0]])


# ------------------------------------------- params-shaped mask states


# {'b', 'v', 'w'}: leaf order b, v, w; v and w eligible (ndim >= 2).
_MAP_PARAMS = {
  "w": jnp.array([[0.1, -2.0], [3.0, 0.2]]),
  "v": jnp.array([[1.0, 3.0]]),
  "b": jnp.array([0.5, -1.0]),
}
_SPECS = {"w": "spec w", "v": "spec v", "b": "spec b"}


def _dns_one_step():
  # c = 0.5 on v (|v|: mean 2, std 1, t = 2.5), c = 0 on w (t = mean |w| =
  # 1.325); the first step always prunes |x| < 0.9 t: v 1.0, w 0.1 and 0.2.
  tx = baselines.dynamic_network_surgery([0.5, 0.0])
  state = tx.init(_MAP_PARAMS)
  _, state = tx.update(jax.tree.map(jnp.ones_like, _MAP_PARAMS), state, _MAP_PARAMS)
  return tx, state, state


def _scheduled_one_step():
  # sgd(0) leaves W + u = W; half of the 6 eligible entries by magnitude
  # (-2, 3, 3) are kept; b is not eligible.
  tx = optax.chain(
    optax.sgd(0.0),
    baselines.scheduled_magnitude_prune(
      lambda t: 0.5, frequency=1, where={"w": True, "v": True, "b": False}
    ),
  )
  state = tx.init(_MAP_PARAMS)
  _, state = tx.update(jax.tree.map(jnp.ones_like, _MAP_PARAMS), state, _MAP_PARAMS)
  return tx, state, state[1]


_MASKS = {
  "w": jnp.array([[False, True], [True, False]]),
  "v": jnp.array([[False, True]]),
  "b": jnp.array([True, True]),
}


def _masked_one_step():
  tx = optax.chain(
    optax.sgd(0.5),
    baselines.masked_updates({"w": _MASKS["w"], "v": _MASKS["v"], "b": jnp.array([True, False])}),
  )
  state = tx.init(_MAP_PARAMS)
  _, state = tx.update(jax.tree.map(jnp.ones_like, _MAP_PARAMS), state, _MAP_PARAMS)
  return tx, state, state[1]


_MASK_STATES = {
  "dns": (_dns_one_step, _MASKS),
  "scheduled": (_scheduled_one_step, _MASKS),
  "masked_updates": (_masked_one_step, dict(_MASKS, b=jnp.array([True, False]))),
}


@pytest.mark.parametrize("name", list(_MASK_STATES))
def test_mask_states_are_params_shaped_and_tree_map_params_maps_them(name):
  make, want = _MASK_STATES[name]
  tx, state, sub = make()
  # Every leaf of params has its mask, in the structure of params.
  assert jax.tree.structure(sub.masks) == jax.tree.structure(_MAP_PARAMS)
  for k in _MAP_PARAMS:
    np.testing.assert_array_equal(sub.masks[k], want[k])
    assert sub.masks[k].dtype == jnp.bool_
  # tree_map_params reaches the masks (and only the params-shaped trees).
  flipped = optax.tree_utils.tree_map_params(tx, lambda m: ~m, state)
  flipped_sub = flipped if name == "dns" else flipped[1]
  for k in _MAP_PARAMS:
    np.testing.assert_array_equal(flipped_sub.masks[k], ~np.asarray(want[k]))
  for field in sub._fields:
    if field != "masks":
      np.testing.assert_array_equal(getattr(flipped_sub, field), getattr(sub, field))
  # The partition-spec pattern of optax's docstring: a params-shaped `rest`
  # goes to the masks, everything else to transform_non_params.
  specs = optax.tree_utils.tree_map_params(
    tx, lambda _, spec: spec, state, _SPECS, transform_non_params=lambda _: None
  )
  spec_sub = specs if name == "dns" else specs[1]
  assert spec_sub.masks == _SPECS
  assert all(getattr(spec_sub, f) is None for f in sub._fields if f != "masks")


def test_dns_state_holds_one_threshold_per_eligible_leaf():
  _, state, _ = _dns_one_step()
  # Leaf order (b, v, w): v then w.
  assert state.thresholds.shape == (2,) and state.thresholds.dtype == jnp.float32
  np.testing.assert_allclose(state.thresholds, [2.5, 1.325], rtol=1e-6)
  assert int(state.count) == 1


def test_mask_states_round_trip_through_orbax(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  made = {name: make() for name, (make, _) in _MASK_STATES.items()}
  states = {name: m[1] for name, m in made.items()}
  targets = {name: m[0].init(_MAP_PARAMS) for name, m in made.items()}
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "state", states)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "state", target=targets)
  assert jax.tree.structure(restored) == jax.tree.structure(states)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(states)):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype
  # The restored states continue exactly like the originals.
  grads = jax.tree.map(lambda p: 2.0 * jnp.ones_like(p), _MAP_PARAMS)
  for name, (tx, state, _) in made.items():
    u1, s1 = tx.update(grads, restored[name], _MAP_PARAMS)
    u2, s2 = tx.update(grads, state, _MAP_PARAMS)
    for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2))):
      np.testing.assert_array_equal(a, b)


def test_mask_readers_refuse_a_state_without_every_leaf():
  # The layout before the masks became params-shaped: only eligible leaves.
  old_dns = baselines.DNSState(
    count=jnp.zeros([], jnp.int32),
    key=jax.random.PRNGKey(0),
    thresholds=(jnp.float32(2.5), jnp.float32(1.325)),
    masks=(_MASKS["v"], _MASKS["w"]),
  )
  with pytest.raises(ValueError, match="holds 2 masks but params have 3"):
    baselines.dns_masks(old_dns, _MAP_PARAMS)
  old_sched = baselines.ScheduledPruneState(
    count=jnp.zeros([], jnp.int32), masks=(_MASKS["v"], _MASKS["w"])
  )
  with pytest.raises(ValueError, match="re-initialise"):
    baselines.scheduled_masks(old_sched, _MAP_PARAMS)
  tx = baselines.scheduled_magnitude_prune(lambda t: 0.5, frequency=1)
  with pytest.raises(ValueError, match="ScheduledPruneState holds 2 masks"):
    tx.update(_MAP_PARAMS, old_sched, _MAP_PARAMS)


def test_masked_updates_without_param_leaves_is_refused_at_update():
  tx = baselines.masked_updates({"w": jnp.ones(2, bool)})
  state = tx.init({})  # as optax's leafless tree_map_params placeholder
  with pytest.raises(ValueError, match="one bool array per leaf"):
    tx.update({}, state, {})


# ------------------------------------------------------------------ L-OBS


def _constrained_lstsq(x, w, removed):
  """argmin ||X (w - v)||^2 s.t. v[removed] = 0, by numpy least squares."""
  keep = np.setdiff1d(np.arange(w.size), removed)
  v = np.zeros_like(w)
  v[keep] = np.linalg.lstsq(x[:, keep], x @ w, rcond=None)[0]
  return v


def test_obs_correction_is_the_constrained_least_squares_minimiser():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((40, 6))
  w = rng.standard_normal(6)
  h = baselines.layer_hessian(x)
  hinv = np.linalg.inv(h)
  for q in range(6):
    got = lobs.obs_correction(w, hinv, q)
    np.testing.assert_allclose(got, _constrained_lstsq(x, w, [q]), atol=1e-10)
    # The sensitivity is the error it causes: 1/2 (w - w')^T H (w - w').
    d = got - w
    assert lobs.obs_sensitivity(w[:, None], hinv)[q, 0] == pytest.approx(0.5 * d @ h @ d, rel=1e-9)


@pytest.mark.parametrize("mode", ["joint", "sequential"])
def test_lobs_layer_one_removed_weight(mode):
  rng = np.random.default_rng(5)
  x = rng.standard_normal((50, 7))
  w = rng.standard_normal((7, 3))
  new, mask, _ = baselines.lobs_prune_layer(
    w, baselines.layer_hessian(x), w.size - 1, damping=0.0, mode=mode
  )
  hinv = np.linalg.inv(baselines.layer_hessian(x))
  sens = w**2 / (2 * np.diag(hinv)[:, None])
  q, j = np.unravel_index(np.argmin(sens), sens.shape)
  assert not mask[q, j] and mask.sum() == w.size - 1
  want = w.copy()
  want[:, j] = _constrained_lstsq(x, w[:, j], [q])
  np.testing.assert_allclose(new, want, atol=1e-10)


@pytest.mark.parametrize("num_keep", [3, 30])  # both solve paths
def test_lobs_layer_joint_many_removed_with_bias(num_keep):
  rng = np.random.default_rng(6)
  x = rng.standard_normal((200, 12)) + 0.5
  w = rng.standard_normal((12, 4))
  b = rng.standard_normal(4)
  h = baselines.layer_hessian(x, with_bias=True)
  new, mask, new_b = baselines.lobs_prune_layer(w, h, num_keep, bias=b, damping=0.0)
  assert mask.sum() == num_keep and np.count_nonzero(new) == num_keep
  xa = np.concatenate([x, np.ones((200, 1))], axis=1)
  for j in range(4):
    removed = np.flatnonzero(~mask[:, j])
    want = _constrained_lstsq(xa, np.append(w[:, j], b[j]), removed)
    np.testing.assert_allclose(np.append(new[:, j], new_b[j]), want, atol=1e-8)


def test_lobs_prune_allocations_and_exact_count():
  rng = np.random.default_rng(7)
  kernels = {"a": rng.standard_normal((8, 5)), "b": 3 * rng.standard_normal((5, 2))}
  hess = {
    "a": baselines.layer_hessian(rng.standard_normal((30, 8))),
    "b": baselines.layer_hessian(rng.standard_normal((30, 5))),
  }
  out = baselines.lobs_prune(kernels, hess, 12)
  mag = reference.ranked_selection([np.abs(kernels["a"]), np.abs(kernels["b"])], 12)
  assert out["a"]["num_keep"] == mag[0].sum() and out["b"]["num_keep"] == mag[1].sum()
  out = baselines.lobs_prune(kernels, hess, 12, allocation={"a": 10, "b": 2})
  assert [int(out[k]["mask"].sum()) for k in "ab"] == [10, 2]
  out = baselines.lobs_prune(kernels, hess, 12, allocation="sensitivity")
  assert sum(int(out[k]["mask"].sum()) for k in "ab") == 12
  with pytest.raises(ValueError, match="sum to"):
    baselines.lobs_prune(kernels, hess, 12, allocation={"a": 1, "b": 2})
  with pytest.raises(ValueError, match="allocation"):
    baselines.lobs_prune(kernels, hess, 12, allocation="random")
  with pytest.raises(ValueError, match="hessian"):
    baselines.lobs_prune_layer(kernels["a"], hess["b"], 3)


def test_conv_patches_turn_a_conv_into_a_matmul():
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.standard_normal((2, 9, 8, 3)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 2, 3, 4)), jnp.float32)
  for strides, padding in (((1, 1), "VALID"), ((2, 1), "SAME")):
    y = jax.lax.conv_general_dilated(
      x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    rows = baselines.conv_patches(x, k.shape, strides=strides, padding=padding)
    np.testing.assert_allclose(rows @ k.reshape(-1, 4), y.reshape(-1, 4), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ saliency


@pytest.mark.parametrize("mode", ["sum_abs", "abs_sum"])
def test_saliency_accumulation_and_prune_match_numpy(mode):
  rng = np.random.default_rng(9)
  params = {
    "a": jnp.asarray(rng.standard_normal((6, 7)), jnp.float32),
    "b": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
    "bias": jnp.ones(4),
  }
  grads = [
    jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    for _ in range(3)
  ]
  acc = baselines.init_saliency(params)
  step = jax.jit(lambda s, g, p: baselines.accumulate_saliency(s, g, p, mode=mode))
  for g in grads:
    acc = step(acc, g, params)
  want = {}
  for k in ("a", "b"):
    prods = [np.asarray(g[k], np.float64) * np.asarray(params[k], np.float64) for g in grads]
    want[k] = sum(np.abs(p) for p in prods) if mode == "sum_abs" else sum(prods)
    np.testing.assert_allclose(acc[k], want[k], rtol=1e-5, atol=1e-6)
  pruned, masks = baselines.saliency_prune(params, acc, 15)
  ref = reference.ranked_selection([np.abs(acc["a"]), np.abs(acc["b"])], 15)
  np.testing.assert_array_equal(masks["a"], ref[0])
  np.testing.assert_array_equal(masks["b"], ref[1])
  assert optax_gsm.sparsity_report(pruned).eligible.nonzeros == 15
  np.testing.assert_array_equal(masks["bias"], True)
  with pytest.raises(ValueError, match="mode"):
    baselines.accumulate_saliency(acc, grads[0], params, mode="mean")


# ------------------------------------------------------------------ lottery


def test_lottery_rewind_imp_and_schedule():
  rng = np.random.default_rng(10)
  w0 = {"a": jnp.asarray(rng.standard_normal((10, 10)), jnp.float32), "bias": jnp.ones(10)}
  trained = jax.tree.map(lambda x: x + jnp.asarray(rng.standard_normal(x.shape), jnp.float32), w0)
  full = jax.tree.map(lambda x: jnp.ones(x.shape, bool), w0)
  sched = baselines.ticket_schedule(100, 10, 3)
  assert sched == [46, 22, 10]
  m1 = baselines.imp_masks(trained, full, sched[0])
  np.testing.assert_array_equal(m1["a"], reference.ranked_selection([np.abs(trained["a"])], 46)[0])
  m2 = baselines.imp_masks(trained, m1, sched[1])
  assert int(m2["a"].sum()) == 22 and not np.any(np.asarray(m2["a"]) & ~np.asarray(m1["a"]))
  ticket = baselines.rewind(w0, m2)
  np.testing.assert_array_equal(ticket["a"], np.where(m2["a"], w0["a"], 0.0))
  np.testing.assert_array_equal(ticket["bias"], w0["bias"])
  with pytest.raises(ValueError, match="survive"):
    baselines.imp_masks(trained, m2, 23)
  with pytest.raises(ValueError, match="rounds"):
    baselines.ticket_schedule(100, 10, 0)
