"""layer_sensitivity on a hand-built model whose layers matter very unequally."""

import json

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import optax_gsm
from optax_gsm import sensitivity


def _model():
  """y = x @ (A + B + C) + bias on the 4 unit vectors x.

  |A| is in [1, 2], |B| in [0.1, 0.2], |C| in [0.01, 0.02]: pruning A hurts
  by orders of magnitude more than pruning B, and B more than C.
  """
  rng = np.random.default_rng(0)

  def layer(lo, hi):
    mag = rng.uniform(lo, hi, (4, 3))
    return jnp.asarray(mag * rng.choice([-1.0, 1.0], (4, 3)), jnp.float32)

  params = {"a": layer(1, 2), "b": layer(0.1, 0.2), "c": layer(0.01, 0.02), "bias": jnp.ones(3)}
  x = jnp.eye(4)

  @jax.jit
  def apply(p):
    return x @ (p["a"] + p["b"] + p["c"]) + p["bias"]

  reference = apply(params)

  def eval_fn(p):
    # Higher is better: minus the squared error to the unpruned outputs.
    return float(-jnp.sum((apply(p) - reference) ** 2))

  return params, apply, eval_fn


def test_layer_sensitivity_finds_the_layer_that_matters():
  params, _, eval_fn = _model()
  res = sensitivity.layer_sensitivity(
    params, eval_fn, ratios=(0.5, 0.7, 0.9), gsm_params=params, num_nonzero=16
  )
  assert [layer.path for layer in res.layers] == ["['a']", "['b']", "['c']"]
  assert res.baseline == 0.0
  a, b, c = res.layers
  for j in range(3):
    assert a.drops[j] > 10 * b.drops[j] > 100 * c.drops[j] > 0
  for layer in res.layers:
    assert list(layer.drops) == sorted(layer.drops)  # more pruned, worse
    assert layer.size == 12
  # The drop is exactly the squared magnitude of what was removed.
  removed = np.sort(np.abs(np.asarray(params["a"])).ravel())[:6]
  assert a.drops[0] == pytest.approx(float(np.sum(removed**2)), rel=1e-5)
  # GSM's signal: Q=16 keeps all of A and the 4 largest of B.
  assert (a.nonzero_ratio, b.nonzero_ratio, c.nonzero_ratio) == (1.0, 4 / 12, 0.0)
  assert res.spearman == {"nonzero_ratio": 1.0}


def test_selection_counts_from_a_short_gsm_run():
  params, apply, eval_fn = _model()
  target = apply(params) * 1.5

  def loss(p):
    return jnp.sum((apply(p) - target) ** 2)

  top_q = optax_gsm.global_top_q(16)
  tx = optax.chain(top_q, optax.sgd(0.01))
  state = tx.init(params)
  q_state = top_q.init(params)

  @jax.jit
  def step(p, state, q_state):
    grads = jax.grad(loss)(p)
    selected, q_state = top_q.update(grads, q_state, p)
    mask = {k: (v != 0) if k != "bias" else jnp.zeros(3, bool) for k, v in selected.items()}
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state, q_state, mask

  p = params
  masks = []
  for _ in range(5):
    p, state, q_state, mask = step(p, state, q_state)
    masks.append(mask)
  counts = sensitivity.accumulate_selection_counts(masks)
  assert int(sum(np.sum(counts[k]) for k in "abc")) == 5 * 16
  res = sensitivity.layer_sensitivity(params, eval_fn, ratios=(0.5,), selection_counts=counts)
  a, b, c = res.layers
  assert a.selection_share > b.selection_share > c.selection_share
  assert a.selection_share + b.selection_share + c.selection_share == (pytest.approx(1.0))
  # Density: the layer's selections per weight relative to the average.
  assert a.selection_density == pytest.approx(3 * a.selection_share)
  assert res.spearman["selection_density"] == 1.0
  assert res.spearman["selection_share"] == 1.0
  assert "nonzero_ratio" not in res.spearman


def test_eval_calls_edge_ratios_and_where():
  params, _, eval_fn = _model()
  calls = []

  def counting(p):
    calls.append(p)
    return eval_fn(p)

  res = sensitivity.layer_sensitivity(
    params, counting, ratios=(0.0, 1.0), where={"a": True, "b": False, "c": True, "bias": False}
  )
  assert len(calls) == 1 + 2 * 2
  assert [layer.path for layer in res.layers] == ["['a']", "['c']"]
  assert res.layers[0].drops[0] == 0.0
  # Ratio 1 removes the whole leaf, the others are untouched.
  assert not np.asarray(calls[2]["a"]).any()
  np.testing.assert_array_equal(calls[2]["b"], params["b"])
  np.testing.assert_array_equal(calls[0]["a"], params["a"])  # restored


def test_prunes_by_magnitude_with_index_tie_break():
  params = {"w": jnp.array([[1.0, -1.0], [1.0, 3.0]])}
  seen = []
  sensitivity.layer_sensitivity(
    params, lambda p: seen.append(np.asarray(p["w"])) or 0.0, ratios=(0.5,)
  )
  # Two of the three tied 1.0s must go: the ones with the higher index.
  np.testing.assert_array_equal(seen[1], [[1.0, 0.0], [0.0, 3.0]])


def test_result_json_and_table():
  params, _, eval_fn = _model()
  counts = jax.tree.map(lambda x: np.ones(x.shape, np.int32), params)
  res = sensitivity.layer_sensitivity(
    params, eval_fn, ratios=(0.5, 0.9), gsm_params=params, compression=3, selection_counts=counts
  )
  d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
  assert d["ratios"] == [0.5, 0.9]
  assert d["layers"][0]["path"] == "['a']"
  assert set(d["layers"][0]) >= {
    "drops",
    "accuracies",
    "mean_drop",
    "nonzero_ratio",
    "selection_share",
    "selection_density",
    "size",
  }
  # Uniform counts: every layer's density is 1, so rho is undefined.
  assert d["spearman"]["selection_density"] is None
  assert np.isnan(res.spearman["selection_density"])
  # Q = 36 / 3 = 12 keeps all of A and nothing of B and C: the tie between
  # B and C gets average ranks, rho = 1.5 / sqrt(2 * 1.5).
  assert d["spearman"]["nonzero_ratio"] == pytest.approx(np.sqrt(3) / 2)
  text = str(res)
  for s in (
    "['a']",
    "drop@0.5",
    "drop@0.9",
    "nonzero_ratio",
    "spearman(mean drop, nonzero_ratio) = +0.866",
    "baseline",
  ):
    assert s in text
  assert json.loads(res.to_json())["baseline"] == 0.0


def test_argument_errors():
  params, _, eval_fn = _model()
  with pytest.raises(ValueError, match=r"fractions in \[0, 1\], got 1.5"):
    sensitivity.layer_sensitivity(params, eval_fn, ratios=(0.5, 1.5))
  with pytest.raises(TypeError, match="numbers"):
    sensitivity.layer_sensitivity(params, eval_fn, ratios=("half",))
  with pytest.raises(ValueError, match="at least one"):
    sensitivity.layer_sensitivity(params, eval_fn, ratios=())
  with pytest.raises(ValueError, match="gsm_params"):
    sensitivity.layer_sensitivity(params, eval_fn, compression=4)
  with pytest.raises(TypeError, match="eval_fn"):
    sensitivity.layer_sensitivity(params, "accuracy")
  with pytest.raises(TypeError, match="scalar number"):
    sensitivity.layer_sensitivity(params, lambda p: [1.0, 2.0])
  bad = dict(params, a=jnp.ones((3, 4)))
  with pytest.raises(ValueError, match=r"shape \(3, 4\) at \['a'\]"):
    sensitivity.layer_sensitivity(params, eval_fn, selection_counts=bad)
  with pytest.raises(ValueError, match="structure of params"):
    sensitivity.layer_sensitivity(params, eval_fn, gsm_params={"a": 1})


def test_accumulate_selection_counts():
  m1 = {"w": np.array([True, False]), "v": [np.array([[True]])]}
  m2 = {"w": jnp.array([True, True]), "v": [jnp.array([[False]])]}
  counts = sensitivity.accumulate_selection_counts([m1, m2])
  assert counts["w"].tolist() == [2, 1] and counts["v"][0].tolist() == [[1]]
  assert counts["w"].dtype == np.int32
  more = sensitivity.accumulate_selection_counts(iter([m1]), initial=counts)
  assert more["w"].tolist() == [3, 1]
  with pytest.raises(ValueError, match="at least one mask"):
    sensitivity.accumulate_selection_counts([])
  with pytest.raises(ValueError, match="mask 1 does not match"):
    sensitivity.accumulate_selection_counts([m1, {"w": m1["w"]}])


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(
  st.integers(2, 12).flatmap(
    lambda n: st.tuples(
      st.lists(st.integers(0, 4), min_size=n, max_size=n),
      st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=n, max_size=n),
    )
  )
)
def test_spearman_and_ranks_match_scipy(xy):
  x, y = xy
  np.testing.assert_array_equal(sensitivity.rankdata(x), scipy.stats.rankdata(x))
  got = sensitivity.spearman(x, y)
  if len(set(x)) < 2 or len(set(y)) < 2:
    assert np.isnan(got)
    return
  want = scipy.stats.spearmanr(x, y).statistic
  assert got == pytest.approx(want, abs=1e-12)


def test_spearman_errors():
  with pytest.raises(ValueError, match="same length"):
    sensitivity.spearman([1, 2], [1, 2, 3])
  with pytest.raises(ValueError, match="NaN"):
    sensitivity.spearman([1, float("nan")], [1, 2])
  assert np.isnan(sensitivity.spearman([1], [2]))


def test_plot(tmp_path):
  pytest.importorskip("matplotlib")
  from experiments import sensitivity_plot  # pylint: disable=import-outside-toplevel

  params, _, eval_fn = _model()
  counts = jax.tree.map(lambda x: np.arange(x.size).reshape(x.shape), params)
  res = sensitivity.layer_sensitivity(
    params, eval_fn, gsm_params=params, num_nonzero=16, selection_counts=counts
  )
  fig = sensitivity_plot.plot_sensitivity(res, tmp_path / "s.png", title="toy")
  assert (tmp_path / "s.png").stat().st_size > 1000
  ax = fig.axes[0]
  assert len(ax.patches) == 3 * 3  # 3 layers x 3 ratios
  assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
  assert len(fig.axes[1].lines) == 2  # non-zero ratio, selection density
  fig2 = sensitivity_plot.plot_sensitivity(json.loads(res.to_json()), tmp_path / "s.pdf")
  assert (tmp_path / "s.pdf").exists() and len(fig2.axes) == 2
