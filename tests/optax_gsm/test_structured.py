"""optax_gsm.structured: STE rules, AutoPrune masks, gate criteria vs numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_gsm import structured as st


def sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------
# Straight-through estimates, worked by hand.

W = np.array([[0.5, -2.0], [4.0, -0.25]], np.float32)
M = np.array([[1.0, -1.0], [-0.5, 2.0]], np.float32)
C = np.array([[1.0, 2.0], [-3.0, 0.5]], np.float32)  # dL/d(w~) for L = sum(C w~)

# h(M) = [[1, 0], [0, 1]]; sign(W) = [[1, -1], [1, -1]]; C * sign(W):
C_SIGN = [[1.0, -2.0], [-3.0, -0.5]]
HAND_SLOPES = {
  "softplus": [[sigmoid(1.0), sigmoid(-1.0)], [sigmoid(-0.5), sigmoid(2.0)]],
  "leaky_relu": [[1.0, 0.2], [0.2, 1.0]],
  "linear": [[1.0, 1.0], [1.0, 1.0]],
}


def grads(ste, decouple=True, alpha=0.2, m=M):
  f = lambda w, m: jnp.sum(
    jnp.asarray(C) * st.masked_weight(w, m, ste, alpha=alpha, decouple=decouple)
  )
  return jax.grad(f, argnums=(0, 1))(jnp.asarray(W), jnp.asarray(m))


@pytest.mark.parametrize("ste", ["softplus", "leaky_relu", "linear"])
def test_masked_weight_update_rule_by_hand(ste):
  out = st.masked_weight(W, M, ste)
  np.testing.assert_array_equal(out, [[0.5, 0.0], [0.0, -0.25]])
  g_w, g_m = grads(ste)
  # W: the loss gradient through the gate only; the pruned entries get 0.
  np.testing.assert_array_equal(g_w, [[1.0, 0.0], [0.0, 0.5]])
  # M: C * sign(W) * h~'(M), independent of |W|.
  expected = np.array(C_SIGN) * np.array(HAND_SLOPES[ste])
  np.testing.assert_allclose(g_m, expected, rtol=1e-6)


@pytest.mark.parametrize("ste", ["softplus", "leaky_relu", "linear"])
def test_masked_weight_without_decoupling_uses_w(ste):
  _, g_m = grads(ste, decouple=False)
  np.testing.assert_allclose(g_m, C * W * np.array(HAND_SLOPES[ste]), rtol=1e-6)


def test_leaky_relu_slope_and_zero_boundary():
  m = jnp.array([0.0, -3.0, 1e-3])
  np.testing.assert_array_equal(st.binary_step(m), [0.0, 0.0, 1.0])
  np.testing.assert_allclose(st.ste_derivative(m, "leaky_relu", alpha=0.05), [0.05, 0.05, 1.0])
  g = jax.grad(lambda m: jnp.sum(st.binary_gate(m, "softplus")))(m)
  np.testing.assert_allclose(g, [0.5, sigmoid(-3.0), sigmoid(1e-3)], rtol=1e-6)


def test_per_channel_mask_sums_over_the_channel():
  w = jnp.array([[1.0, -2.0, 3.0], [-4.0, 5.0, 0.0]])  # (in=2, out=3)
  m = jnp.array([0.5, -1.0, 2.0])  # one per output
  c = jnp.array([[1.0, 1.0, 2.0], [3.0, -1.0, 1.0]])
  out = st.masked_weight(w, m, "linear")
  np.testing.assert_array_equal(out, [[1.0, 0.0, 3.0], [-4.0, 0.0, 0.0]])
  g_w, g_m = jax.grad(lambda w, m: jnp.sum(c * st.masked_weight(w, m, "linear")), argnums=(0, 1))(
    w, m
  )
  # column j: sum_i c_ij sign(w_ij); sign(0) = 0.
  np.testing.assert_allclose(g_m, [1 * 1 + 3 * -1, 1 * -1 + -1 * 1, 2 * 1 + 0])
  np.testing.assert_array_equal(g_w, [[1.0, 0.0, 2.0], [3.0, 0.0, 1.0]])


def test_pruned_weight_keeps_its_value_and_recovers():
  """Recoverable pruning: a pruned weight is untouched; raising m restores it."""
  params = {"w": jnp.array([[2.0, -3.0]])}
  masks = {"w": jnp.array([[1.0, -0.05]])}
  tx = optax.sgd(0.1)
  mtx = st.autoprune_masks(1.0, strength=0.0, ste="linear")
  opt, mopt = tx.init(params), mtx.init(masks)
  x = jnp.array([[1.0], [1.0]])

  # The loss wants the second weight back: L = (y - x (w~)_1)^2 with y = -3.
  def loss(p, m):
    w = st.apply_autoprune_masks(p, m, ste="linear")["w"]
    return jnp.sum((jnp.array([[-3.0]]) - x @ w[:, 1:]) ** 2)

  gp, gm = jax.grad(loss, argnums=(0, 1))(params, masks)
  assert float(gp["w"][0, 1]) == 0.0
  u, opt = tx.update(gp, opt, params)
  params = optax.apply_updates(params, u)
  u, mopt = mtx.update(gm, mopt, masks)
  masks = optax.apply_updates(masks, u)
  assert float(params["w"][0, 1]) == -3.0  # value kept
  assert float(masks["w"][0, 1]) > 0  # gate reopened
  np.testing.assert_array_equal(st.apply_autoprune_masks(params, masks)["w"], [[2.0, -3.0]])


def test_masked_weight_errors():
  with pytest.raises(ValueError, match="`m` must be shaped like `w`"):
    st.masked_weight(jnp.ones((2, 3)), jnp.ones(2))
  with pytest.raises(ValueError, match="`ste` must be one of"):
    st.masked_weight(jnp.ones(2), jnp.ones(2), "relu")
  with pytest.raises(ValueError, match="`alpha`"):
    st.ste_derivative(jnp.ones(2), "leaky_relu", alpha=-1.0)
  with pytest.raises(TypeError, match="`decouple` must be a bool"):
    st.masked_weight(jnp.ones(2), jnp.ones(2), decouple="yes")
  with pytest.raises(TypeError, match="static_args"):
    jax.jit(lambda a: st.masked_weight(jnp.ones(2), jnp.ones(2), alpha=a))(0.1)


# --------------------------------------------------------------------------
# The mask optimiser.


@pytest.mark.parametrize(
  "regularizer,ste,expected",
  [
    ("gate_l1", "softplus", [sigmoid(-1.0), sigmoid(2.0)]),
    ("gate_l1", "leaky_relu", [0.2, 1.0]),
    ("gate_l1", "linear", [1.0, 1.0]),
    ("l1", "softplus", [-1.0, 1.0]),
    ("l2", "softplus", [-1.0, 2.0]),
  ],
)
def test_regularizer_gradients(regularizer, ste, expected):
  m = {"a": jnp.array([-1.0, 2.0]), "b": None}
  tx = st.autoprune_regularizer(0.5, regularizer=regularizer, ste=ste)
  g = {"a": jnp.array([1.0, -1.0]), "b": None}
  u, state = tx.update(g, tx.init(m), m)
  np.testing.assert_allclose(u["a"], np.array([1.0, -1.0]) + 0.5 * np.array(expected), rtol=1e-6)
  assert u["b"] is None and int(state.count) == 1


def test_regularizer_schedule_and_jit():
  tx = st.autoprune_regularizer(lambda count: 0.1 * (count + 1), regularizer="l2")
  m = jnp.array([1.0])
  state = tx.init(m)
  update = jax.jit(tx.update)
  u1, state = update(jnp.zeros(1), state, m)
  u2, state = update(jnp.zeros(1), state, m)
  np.testing.assert_allclose([u1[0], u2[0]], [0.1, 0.2], rtol=1e-6)


def test_regularizer_errors():
  with pytest.raises(ValueError, match="`regularizer` must be one of"):
    st.autoprune_regularizer(1.0, regularizer="l0")
  with pytest.raises(ValueError, match="`strength` must be in"):
    st.autoprune_regularizer(-1.0)
  with pytest.raises(TypeError, match="`strength` must be a scalar"):
    st.autoprune_regularizer("big")
  tx = st.autoprune_regularizer(1.0)
  with pytest.raises(ValueError, match="needs `params`"):
    tx.update(jnp.ones(1), tx.init(jnp.ones(1)))


def test_init_and_apply_masks_tree():
  params = {"conv": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.ones(2)}}
  masks = st.init_masks(params, 0.5)
  assert masks["conv"]["bias"] is None
  assert masks["conv"]["kernel"].shape == (3, 3, 1, 2)
  masks["conv"]["kernel"] = masks["conv"]["kernel"].at[0, 0, 0, 1].set(-1.0)
  out = st.apply_autoprune_masks(params, masks)
  assert float(jnp.sum(out["conv"]["kernel"])) == 17.0
  np.testing.assert_array_equal(out["conv"]["bias"], params["conv"]["bias"])


# --------------------------------------------------------------------------
# Criteria of a tiny conv net against a numpy forward / backward pass.
#
# x (N, 5, 5, 1) -> conv 3x3 VALID, 3 maps, bias -> relu -> gate -> spatial
# mean -> dense (3 -> 2) -> softmax cross-entropy.


def tiny_net_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "k": rng.standard_normal((3, 3, 1, 3)).astype(np.float32),
    "b": rng.standard_normal(3).astype(np.float32) * 0.1,
    "w": rng.standard_normal((3, 2)).astype(np.float32),
    "c": rng.standard_normal(2).astype(np.float32),
  }


def numpy_tiny_net(p, x, y):
  """(activations a (N,3,3,3), dL_n/da, per-example G_nk) by hand."""
  n = x.shape[0]
  z = np.zeros((n, 3, 3, 3))
  for i in range(3):
    for j in range(3):
      patch = x[:, i : i + 3, j : j + 3, :]  # (N, 3, 3, 1)
      z[:, i, j, :] = np.einsum("nhwc,hwco->no", patch, p["k"]) + p["b"]
  a = np.maximum(z, 0)
  pooled = a.mean(axis=(1, 2))  # (N, 3)
  logits = pooled @ p["w"] + p["c"]
  prob = np.exp(logits - logits.max(1, keepdims=True))
  prob /= prob.sum(1, keepdims=True)
  d_logits = prob - np.eye(2)[y]  # dL_n/dlogits
  d_pooled = d_logits @ p["w"].T
  d_a = np.broadcast_to(d_pooled[:, None, None, :] / 9.0, a.shape)
  g = (a * d_a).sum(axis=(1, 2))  # (N, 3)
  return a, d_a, g


def jax_tiny_net(p, x, gate):
  z = jax.lax.conv_general_dilated(
    x, p["k"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  a = st.apply_gate(jax.nn.relu(z + p["b"]), gate)
  return a.mean(axis=(1, 2)) @ p["w"] + p["c"]


def tiny_batch(seed, n=6):
  rng = np.random.default_rng(100 + seed)
  return (rng.standard_normal((n, 5, 5, 1)).astype(np.float32), rng.integers(0, 2, n))


def jax_gate_grads(p, x, y):
  def total(gate):
    logits = jax_tiny_net(p, jnp.asarray(x), gate)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)))

  return jax.grad(total)(jnp.ones((x.shape[0], 3)))


def test_gate_gradient_equals_numpy_activation_criterion():
  p = tiny_net_params()
  x, y = tiny_batch(0)
  a, d_a, g_np = numpy_tiny_net(p, x.astype(np.float64), y)
  g = jax_gate_grads(p, x, y)
  np.testing.assert_allclose(g, g_np, rtol=1e-4, atol=1e-6)
  # The direct definition from activations gives the same numbers.
  np.testing.assert_allclose(st.per_example_from_activations(a, d_a), g_np, rtol=1e-5, atol=1e-7)


def test_criteria_match_numpy_formulas():
  p = tiny_net_params(1)
  stats = st.init_gate_stats({"conv": 3})
  all_g, batch_means = [], []
  accumulate = jax.jit(st.accumulate_gate_stats)
  for seed, n in ((1, 6), (2, 4)):
    x, y = tiny_batch(seed, n)
    g_np = numpy_tiny_net(p, x.astype(np.float64), y)[2]
    all_g.append(g_np)
    batch_means.append(g_np.mean(0))
    stats = accumulate(stats, {"conv": jax_gate_grads(p, x, y)})
  g = np.concatenate(all_g)  # (10, 3)
  taylor = np.abs(g).mean(0) / 9.0  # M = 3 x 3
  np.testing.assert_allclose(st.taylor_first_order(stats, {"conv": 9})["conv"], taylor, rtol=1e-4)
  np.testing.assert_allclose(
    st.taylor_gate(stats)["conv"], np.mean(np.square(batch_means), 0), rtol=1e-4
  )
  np.testing.assert_allclose(st.fisher(stats)["conv"], (g**2).sum(0) / (2 * len(g)), rtol=1e-4)
  normed = st.l2_normalize({"conv": taylor})["conv"]
  np.testing.assert_allclose(normed, taylor / np.linalg.norm(taylor), rtol=1e-5)


def test_accumulate_with_gates_of_zero_ignores_removed_maps():
  stats = st.init_gate_stats({"a": 2})
  stats = st.accumulate_gate_stats(
    stats, {"a": jnp.array([[1.0, 5.0]])}, {"a": jnp.array([1.0, 0.0])}
  )
  assert st.fisher(stats)["a"].tolist() == [0.5, 0.0]


def test_lowest_ranked_and_cost_adjustment():
  scores = {"a": np.array([0.3, 0.2, np.nan]), "b": np.array([0.25, 0.1])}
  alive = {"a": np.array([True, True, False]), "b": np.array([True, True])}
  assert st.lowest_ranked(scores, alive) == ("b", 1)
  # The FLOPs term makes layer a's maps cheaper to lose.
  adj = st.cost_adjusted(scores, {"a": 0.1, "b": 0.0}, 1.0)
  assert st.lowest_ranked(adj, alive) == ("a", 1)
  # b keeps its last map; a NaN score of an alive map ranks lowest.
  alive_b1 = {"a": np.array([True, True, True]), "b": np.array([True, False])}
  assert st.lowest_ranked(scores, alive_b1) == ("a", 2)
  with pytest.raises(ValueError, match="nothing left to remove"):
    st.lowest_ranked({"b": np.ones(2)}, {"b": np.array([True, False])})
  with pytest.raises(ValueError, match="`min_alive`"):
    st.lowest_ranked(scores, alive, min_alive=0)


def test_l2_normalize_ignores_removed_maps():
  out = st.l2_normalize({"a": jnp.array([3.0, 4.0, 100.0])}, {"a": jnp.array([True, True, False])})
  np.testing.assert_allclose(out["a"][:2], [0.6, 0.8], rtol=1e-6)


def test_criteria_errors():
  with pytest.raises(ValueError, match="positive int"):
    st.init_gate_stats({"a": 0})
  stats = st.init_gate_stats({"a": 2})
  with pytest.raises(ValueError, match=r"must have shape \(N, 2\)"):
    st.accumulate_gate_stats(stats, {"a": jnp.ones((3, 4))})
  with pytest.raises(ValueError, match="has layers"):
    st.accumulate_gate_stats(stats, {"b": jnp.ones((3, 2))})
  with pytest.raises(ValueError, match="`costs` lacks"):
    st.cost_adjusted({"a": jnp.ones(2)}, {}, 1.0)
  with pytest.raises(ValueError, match="`gate` must have shape"):
    st.apply_gate(jnp.ones((2, 4, 4, 3)), jnp.ones(4))
