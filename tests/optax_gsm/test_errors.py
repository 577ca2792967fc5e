"""Bad input gets a clear error when the transformation is built or at init."""

import jax.numpy as jnp
import pytest

import optax_gsm

PARAMS = {"w": jnp.ones((4, 5)), "v": jnp.ones((2, 3)), "b": jnp.ones(5)}
N = 26


@pytest.mark.parametrize("kwargs", [{}, {"num_nonzero": 3, "compression": 2}])
def test_both_or_neither_target(kwargs):
  with pytest.raises(ValueError, match="exactly one of `num_nonzero`"):
    optax_gsm.gsm(0.1, **kwargs)
  with pytest.raises(ValueError, match="exactly one of `num_nonzero`"):
    optax_gsm.global_top_q(**kwargs)
  with pytest.raises(ValueError, match="exactly one of `num_nonzero`"):
    optax_gsm.magnitude_prune(PARAMS, **kwargs)


@pytest.mark.parametrize("q", [0, -5])
def test_nonpositive_q_at_build(q):
  with pytest.raises(ValueError, match=rf"num_nonzero.*got {q}"):
    optax_gsm.gsm(0.1, num_nonzero=q)


def test_q_above_eligible_count_names_the_counts():
  tx = optax_gsm.gsm(0.1, num_nonzero=27)
  with pytest.raises(ValueError, match=r"Q=27.*26 eligible"):
    tx.init(PARAMS)
  with pytest.raises(ValueError, match=r"Q=27.*N_eligible=26"):
    optax_gsm.magnitude_prune(PARAMS, 27)


def test_schedule_q_checked_at_init():
  tx = optax_gsm.gsm(0.1, num_nonzero=lambda step: 100 - step)
  with pytest.raises(ValueError, match="Q=100"):
    tx.init(PARAMS)


@pytest.mark.parametrize("c", [0.5, 0, -2, float("nan"), float("inf")])
def test_compression_below_one(c):
  with pytest.raises(ValueError, match=r"`compression` must be a finite ratio >= 1"):
    optax_gsm.gsm(0.1, compression=c)


def test_compression_that_rounds_to_zero():
  tx = optax_gsm.global_top_q(compression=1000)
  with pytest.raises(ValueError, match=r"compression=1000.*Q=0"):
    tx.init(PARAMS)


def test_fractional_q():
  with pytest.raises(TypeError, match="whole number"):
    optax_gsm.global_top_q(2.5)


def test_no_eligible_leaf():
  tx = optax_gsm.gsm(0.1, num_nonzero=1)
  with pytest.raises(ValueError, match="No eligible leaf"):
    tx.init({"b": jnp.ones(3), "c": jnp.ones(4)})
  with pytest.raises(ValueError, match="No eligible leaf"):
    optax_gsm.sparsity_report(PARAMS, where={"w": False, "v": False, "b": False})


def test_integer_leaf_marked_eligible():
  params = {"w": jnp.ones((3, 3)), "steps": jnp.zeros((2, 2), jnp.int32)}
  tx = optax_gsm.global_top_q(2, where={"w": True, "steps": True})
  with pytest.raises(TypeError, match=r"\['steps'\].*int32"):
    tx.init(params)
  # The default rule leaves integer leaves out.
  assert optax_gsm.default_where(params) == {"w": True, "steps": False}


def test_where_structure_mismatch():
  tx = optax_gsm.global_top_q(2, where={"w": True})
  with pytest.raises(ValueError, match="same structure as params"):
    tx.init(PARAMS)
  tx = optax_gsm.global_top_q(2, where=lambda p: [True, False, True])
  with pytest.raises(ValueError, match="same structure as params"):
    tx.init(PARAMS)


def test_where_with_non_bool_flag():
  tx = optax_gsm.global_top_q(2, where={"w": "yes", "v": True, "b": False})
  with pytest.raises(TypeError, match=r"one Python bool per leaf.*\['w'\]"):
    tx.init(PARAMS)


def test_bad_choices_and_ranges():
  with pytest.raises(ValueError, match="`selection` must be one of"):
    optax_gsm.gsm(0.1, num_nonzero=2, selection="heap")
  with pytest.raises(ValueError, match="`metric` must be one of"):
    optax_gsm.global_top_q(2, metric="fisher")
  with pytest.raises(ValueError, match=r"`momentum` must be in \[0.0, 1.0\]"):
    optax_gsm.gsm(0.1, num_nonzero=2, momentum=1.5)
  with pytest.raises(ValueError, match="`weight_decay` must be in"):
    optax_gsm.gsm(0.1, num_nonzero=2, weight_decay=-1e-4)
  with pytest.raises(ValueError, match="`learning_rate` must be in"):
    optax_gsm.gsm(-0.1, num_nonzero=2)
  with pytest.raises(ValueError, match="`score_momentum` must be in"):
    optax_gsm.gsm(0.1, num_nonzero=2, score_momentum=2.0)
  with pytest.raises(TypeError, match="`num_nonzero` must be an int"):
    optax_gsm.gsm(0.1, num_nonzero="10")


def test_update_without_params():
  tx = optax_gsm.global_top_q(2)
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(PARAMS, state)


def test_metric_with_wrong_shape():
  tx = optax_gsm.global_top_q(2, metric=lambda g, w: jnp.sum(g))
  with pytest.raises(ValueError, match="one score per weight"):
    tx.update(PARAMS, tx.init(PARAMS), PARAMS)


@pytest.mark.parametrize(
  "kwargs, error, pattern",
  [
    ({"num_nonzero": True}, TypeError, "`num_nonzero` must be a number, got the bool True"),
    ({"compression": True}, TypeError, "`compression` must be a number, got the bool True"),
    (
      {"compression": 2, "score_momentum": 1.0},
      ValueError,
      r"`score_momentum` must be in \[0.0, 1.0\), got 1.0",
    ),
    (
      {"compression": 2, "unselected_decay": float("inf")},
      ValueError,
      r"`unselected_decay` must be in \[0.0, inf\), got inf",
    ),
    (
      {"compression": 2, "unselected_shrink": 1.0},
      ValueError,
      r"`unselected_shrink` must be in \[0.0, 1.0\), got 1.0",
    ),
    (
      {"compression": 2, "unselected_shrink": -1e-3},
      ValueError,
      r"`unselected_shrink` must be in \[0.0, 1.0\), got -0.001",
    ),
    ({"compression": 2, "momentum": True}, TypeError, "`momentum` must be a number, got the bool"),
  ],
)
def test_out_of_range_hyperparameters_at_build(kwargs, error, pattern):
  with pytest.raises(error, match=pattern):
    optax_gsm.gsm(0.1, **kwargs)


@pytest.mark.parametrize(
  "kwargs, pattern",
  [
    ({"compression": lambda step: 0.0}, r"gives C=0.0 at step 0"),
    ({"compression": lambda step: jnp.nan}, r"gives C=nan at step 0"),
    ({"num_nonzero": lambda step: 0}, r"gives Q=0 at step 0"),
    ({"num_nonzero": lambda step: jnp.nan}, r"gives Q=nan at step 0"),
  ],
)
def test_schedule_target_out_of_range_at_init(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    optax_gsm.gsm(0.1, **kwargs).init(PARAMS)


def test_schedule_target_out_of_range_later():
  """Eagerly a bad step raises; under jit it keeps the previous Q."""
  import jax  # pylint: disable=g-import-not-at-top

  schedule = lambda step: jnp.where(step >= 1, 0.0, 2.0)
  grads = {k: jnp.ones_like(v) for k, v in PARAMS.items()}
  tx = optax_gsm.global_top_q(compression=schedule)
  state = tx.init(PARAMS)
  _, state = tx.update(grads, state, PARAMS)
  with pytest.raises(ValueError, match=r"gives C=0.0 at step 1"):
    tx.update(grads, state, PARAMS)
  step = jax.jit(tx.update)
  state = tx.init(PARAMS)
  for _ in range(3):
    updates, state = step(grads, state, PARAMS)
    assert int(state.num_nonzero) == 13  # round(26 / 2), kept
    assert int(sum(jnp.sum(updates[k] != 0) for k in ("w", "v"))) == 13


def test_callable_metric_under_inject_hyperparams_names_static_args():
  import optax  # pylint: disable=g-import-not-at-top

  tx = optax.inject_hyperparams(optax_gsm.global_top_q)(compression=2.0, metric=lambda score: score)
  with pytest.raises(
    TypeError,
    match=r"`metric` must be one of .* got an array\. "
    r"Under optax.inject_hyperparams .*static_args",
  ):
    tx.init(PARAMS)
