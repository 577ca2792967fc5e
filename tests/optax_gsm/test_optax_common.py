"""optax's common-test harness over every transformation the library exports.

In the style of optax's ``contrib/_common_test.py`` and ``_src/alias_test.py``:
one list of cases (a factory, small valid arguments, the arguments that
``optax.inject_hyperparams`` must treat as static) and, for each case, the
checks optax runs on its own optimizers: jit of init/update without
recompilation, ``inject_hyperparams``, ``MultiSteps``, ``apply_if_finite``,
``tree_map_params``, dtype and structure stability of the state in
``lax.scan`` (float16, bfloat16, float32, and float64 with x64 on), zero-size
and scalar leaves, and convergence on a quadratic.

Known defects are marked ``xfail(strict=True)`` with the defect named, so
that they fail (and get un-marked) once fixed.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

try:
  from optax._src import test_utils
except ImportError:  # optax < 0.2.5, the oldest supported (setup.cfg)
  from tests.optax_gsm import _optax_test_utils as test_utils

import optax_gsm
from optax_gsm import baselines
from optax_gsm import structured
from tests.optax_gsm._compat import enable_x64


@dataclasses.dataclass(frozen=True)
class Case:
  """A transformation under test.

  Attributes:
    name: the test id.
    factory: the exported factory.
    kwargs: ``params -> kwargs`` (most ignore params; ``masked_updates``
      needs masks shaped like them).
    static_args: the arguments ``inject_hyperparams`` must not inject.
    pre_sgd: chain ``optax.sgd(0.1)`` before it (the transforms that expect
      to see updates rather than gradients: masking, scheduled pruning).
  """

  name: str
  factory: Callable[..., Any]
  kwargs: Callable[[Any], dict]
  static_args: tuple = ()
  pre_sgd: bool = False

  def make(self, params, inject=False):
    kwargs = self.kwargs(params)
    if inject:
      tx = optax.inject_hyperparams(self.factory, static_args=self.static_args)(**kwargs)
    else:
      tx = self.factory(**kwargs)
    if self.pre_sgd:
      tx = optax.chain(optax.sgd(0.1), tx)
    return tx

  def __repr__(self):
    return self.name


def _ones_masks(params):
  return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)


CASES = (
  Case(
    "gsm",
    optax_gsm.gsm,
    lambda p: dict(learning_rate=0.1, compression=2, momentum=0.9, weight_decay=1e-3),
  ),
  Case(
    "gsm_paper_rule_score_momentum",
    optax_gsm.gsm,
    lambda p: dict(
      learning_rate=0.1,
      num_nonzero=5,
      momentum=0.9,
      score_momentum=0.5,
      unselected_shrink=None,
      selection="threshold",
    ),
  ),
  Case(
    "gsm_budget",
    optax_gsm.gsm,
    lambda p: dict(learning_rate=0.1, budget=24, momentum=0.9, costs=optax_gsm.bytes_cost_tree),
    static_args=("costs",),
  ),
  Case("global_top_q", optax_gsm.global_top_q, lambda p: dict(num_nonzero=5)),
  Case(
    "global_top_q_callable_where_metric",
    optax_gsm.global_top_q,
    lambda p: dict(
      compression=2.0,
      selection="top_k",
      where=optax_gsm.default_where,
      metric=lambda g, w: jnp.abs(w),
    ),
    static_args=("where", "metric"),
  ),
  Case(
    "dynamic_network_surgery",
    baselines.dynamic_network_surgery,
    lambda p: dict(c_rate=0.0, stop_step=100),
    # Python numbers by design (the mask schedule and the init-time
    # thresholds), as optax's harness lists its uninjectable ones.
    static_args=("c_rate", "gamma", "power", "stop_step", "seed", "low", "high"),
  ),
  Case(
    "scheduled_magnitude_prune",
    baselines.scheduled_magnitude_prune,
    lambda p: dict(sparsity=lambda t: 0.25, frequency=2),
    static_args=("sparsity", "frequency", "begin_step", "end_step"),
    pre_sgd=True,
  ),
  Case(
    "masked_updates", baselines.masked_updates, lambda p: dict(masks=_ones_masks(p)), pre_sgd=True
  ),
  Case(
    "autoprune_regularizer",
    structured.autoprune_regularizer,
    lambda p: dict(strength=1e-2, regularizer="l2"),
    static_args=("alpha",),
  ),
  Case(
    "autoprune_masks",
    structured.autoprune_masks,
    lambda p: dict(learning_rate=0.1, strength=1e-2, momentum=0.9),
    static_args=("alpha", "momentum"),
  ),
)
TOP_Q = (
  "gsm",
  "gsm_paper_rule_score_momentum",
  "gsm_budget",
  "global_top_q",
  "global_top_q_callable_where_metric",
)


def _params(dtype=jnp.float32):
  return {
    "w": jnp.asarray(np.linspace(-1.0, 1.2, 12).reshape(3, 4), dtype),
    "b": jnp.asarray([0.5, -0.25, 1.0, 2.0], dtype),
  }


def _grads(params, scale=1.0):
  return jax.tree.map(lambda p: (scale * (p - 0.3)).astype(p.dtype), params)


def _step(tx):
  def step(params, state):
    updates, state = tx.update(_grads(params), state, params)
    return optax.apply_updates(params, updates), state

  return step


def _xfail_if(case_names, reason):
  def mark(case):
    if case.name in case_names:
      return pytest.param(case, marks=pytest.mark.xfail(strict=True, reason=reason))
    return case

  return [mark(c) for c in CASES]


# --- jit ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_jit_init_update_and_no_recompilation(case):
  params = _params()
  tx = case.make(params)
  step = jax.jit(_step(tx))
  state = jax.jit(tx.init)(params)
  eager_params, eager_state = _step(tx)(params, tx.init(params))
  new_params, new_state = step(params, state)
  test_utils.assert_trees_all_close(new_params, eager_params, rtol=1e-6)
  test_utils.assert_trees_all_equal_structs(new_state, eager_state)
  with test_utils.log_compilations() as logs:
    step(new_params, new_state)
  assert not logs, "update recompiles on its second call"


# --- inject_hyperparams --------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_inject_hyperparams_matches_plain(case):
  params = _params()
  tx = case.make(params)
  tx_inject = case.make(params, inject=True)
  grads = _grads(params)
  updates, state = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
  state_inject = jax.jit(tx_inject.init)(params)
  updates_inject, new_inject = jax.jit(tx_inject.update)(grads, state_inject, params)
  test_utils.assert_trees_all_close(updates_inject, updates, rtol=1e-5)
  if case.pre_sgd:  # chain(sgd, inject_hyperparams(factory)(...))
    inner, state = new_inject[1].inner_state, state[1]
  else:
    inner = new_inject.inner_state
  test_utils.assert_trees_all_close(inner, state, rtol=1e-5, atol=1e-7)


# --- MultiSteps ------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("dtype", ["bfloat16"])  # float32: apply_if_finite
def test_multi_steps(case, dtype):
  params = _params(dtype)
  tx = case.make(params)
  multi = optax.MultiSteps(tx, every_k_schedule=2)
  state = jax.jit(multi.init)(params)
  update = jax.jit(multi.update)
  g = _grads(params)
  # 2 g then 0: their mean is g, and every step of MultiSteps' running mean
  # (2 g, then 2 g + (0 - 2 g) / 2) is exact in bfloat16 with any XLA. A
  # mean of 1 g, 2 g, 3 g divides by 3, which older XLA rounds differently,
  # and GSM's selection is a discrete function of the gradient.
  updates, state = update(jax.tree.map(lambda x: 2 * x, g), state, params)
  test_utils.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  updates, state = update(jax.tree.map(jnp.zeros_like, g), state, params)
  # The second call applies the inner update to the mean gradient, g.
  want, _ = tx.update(g, tx.init(params), params)
  test_utils.assert_trees_all_equal_dtypes(updates, params)
  tol = 1e-2 if dtype == "bfloat16" else 1e-6
  test_utils.assert_trees_all_close(updates, want, rtol=tol, atol=tol)


# --- apply_if_finite ------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_apply_if_finite_skips_a_non_finite_step(case):
  params = _params()
  tx = case.make(params)
  safe = optax.apply_if_finite(tx, max_consecutive_errors=3)
  update = jax.jit(safe.update)
  state0 = safe.init(params)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), _grads(params))
  updates, state1 = update(bad, state0, params)
  test_utils.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert int(state1.notfinite_count) == 1
  assert not bool(state1.last_finite)
  test_utils.assert_trees_all_equal(state1.inner_state, state0.inner_state)
  # The next finite step is the step the inner transformation takes alone.
  updates, state2 = update(_grads(params), state1, params)
  want, want_state = tx.update(_grads(params), tx.init(params), params)
  test_utils.assert_trees_all_close(updates, want, rtol=1e-6)
  test_utils.assert_trees_all_close(state2.inner_state, want_state, rtol=1e-6)
  assert int(state2.notfinite_count) == 0


# --- tree_map_params --------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_tree_map_params(case):
  params = _params()
  tx = case.make(params)
  state = jax.jit(_step(tx))(params, tx.init(params))[1]
  same = optax.tree_utils.tree_map_params(tx, lambda v: v, state)
  test_utils.assert_trees_all_equal(same, state)
  # A change of the params-shaped buffers reaches every one of them, and
  # only them.
  doubled = optax.tree_utils.tree_map_params(
    tx,
    lambda v: v * 2 if jnp.issubdtype(v.dtype, jnp.floating) else v,
    state,
    transform_non_params=lambda v: v,
  )
  test_utils.assert_trees_all_equal_structs(doubled, state)


# --- dtype and structure stability -------------------------------------------------------


def _scan_steps(tx, params, n=3):
  state = tx.init(params)

  def body(carry, _):
    p, s = carry
    p, s = _step(tx)(p, s)
    return (p, s), None

  (params, new_state), _ = jax.lax.scan(body, (params, state), length=n)
  return state, params, new_state


@pytest.mark.parametrize("case", CASES, ids=repr)
# float32 (and float64): test_state_dtype_stable_with_float64_params_under_x64.
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_state_dtype_and_structure_stable_in_scan(case, dtype):
  params = _params(dtype)
  tx = case.make(params)
  # lax.scan itself refuses a state whose structure or dtypes change.
  state, new_params, new_state = _scan_steps(tx, params)
  test_utils.assert_trees_all_equal_dtypes(new_params, params)
  test_utils.assert_trees_all_equal_dtypes(new_state, state)
  test_utils.assert_trees_all_equal_shapes(new_state, state)
  test_utils.assert_tree_all_finite(new_params)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_state_dtype_stable_with_float64_params_under_x64(case):
  with enable_x64(True):
    params = _params(jnp.float64)
    tx = case.make(params)
    state, new_params, new_state = _scan_steps(tx, params)
    test_utils.assert_trees_all_equal_dtypes(new_params, params)
    test_utils.assert_trees_all_equal_dtypes(new_state, state)
  # The float32 run: stable too, and equal to float32 precision.
  if case.name == "gsm_budget":
    return  # bytes_cost_tree prices a float64 entry higher
  params32 = _params(jnp.float32)
  state32, new32, new_state32 = _scan_steps(case.make(params32), params32)
  test_utils.assert_trees_all_equal_dtypes(new_state32, state32)
  test_utils.assert_trees_all_close(
    jax.tree.map(lambda x: np.asarray(x, np.float32), new_params), new32, rtol=1e-5, atol=1e-6
  )


# --- zero-size and scalar leaves -------------------------------------------------------


def _odd_params():
  return {
    "w": jnp.asarray(np.linspace(-1.0, 1.2, 12).reshape(3, 4), jnp.float32),
    "empty": jnp.zeros((0, 4), jnp.float32),
    "scalar": jnp.asarray(0.7, jnp.float32),
  }


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_zero_size_and_scalar_leaves(case):
  params = _odd_params()
  tx = case.make(params)
  new_params, state = jax.jit(_step(tx))(params, tx.init(params))
  assert new_params["empty"].shape == (0, 4)
  assert new_params["scalar"].shape == ()
  test_utils.assert_tree_all_finite(new_params)
  # The zero-size leaf changes nothing: the same step without it.
  rest = {"w": params["w"], "scalar": params["scalar"]}
  tx_rest = case.make(rest)
  want, _ = jax.jit(_step(tx_rest))(rest, tx_rest.init(rest))
  test_utils.assert_trees_all_close(
    {"w": new_params["w"], "scalar": new_params["scalar"]}, want, rtol=1e-6
  )


def test_zero_size_leaf_at_compression_1():
  params = _odd_params()
  tx = optax_gsm.gsm(0.1, compression=1)
  jax.jit(_step(tx))(params, tx.init(params))


# --- convergence --------------------------------------------------------------------


def _quadratic():
  target = {
    "w": jnp.asarray(np.linspace(-2.0, 2.0, 12).reshape(3, 4), jnp.float32),
    "b": jnp.asarray([1.0, -1.0, 0.5, 0.0], jnp.float32),
  }
  params = jax.tree.map(jnp.zeros_like, target)

  def loss(p):
    return sum(jnp.sum((p[k] - target[k]) ** 2) for k in p) / 2

  return params, target, loss


def _run(tx, params, loss, steps=200):
  def body(carry, _):
    p, s = carry
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return (optax.apply_updates(p, updates), s), None

  (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), length=steps)
  return params


@pytest.mark.parametrize("nesterov", [False, True])
def test_gsm_at_compression_1_is_sgd_momentum_with_weight_decay(nesterov):
  params, target, loss = _quadratic()
  lr, beta, wd = 0.05, 0.9, 1e-2
  tx = optax_gsm.gsm(lr, compression=1, momentum=beta, weight_decay=wd, nesterov=nesterov)
  mask = {"w": True, "b": False}  # the default eligible leaves
  ref = optax.chain(
    optax.add_decayed_weights(wd, mask=mask), optax.sgd(lr, momentum=beta, nesterov=nesterov)
  )
  got = jax.jit(lambda p: _run(tx, p, loss))(params)
  want = jax.jit(lambda p: _run(ref, p, loss))(params)
  test_utils.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  # Both reach the minimum of the decayed quadratic: w* = t / (1 + wd).
  test_utils.assert_trees_all_close(got, {"w": target["w"] / (1 + wd), "b": target["b"]}, atol=1e-4)


def test_global_top_q_at_compression_1_is_the_identity():
  params, _, loss = _quadratic()
  tx = optax.chain(optax_gsm.global_top_q(compression=1), optax.sgd(0.1, 0.5))
  ref = optax.sgd(0.1, 0.5)
  test_utils.assert_trees_all_close(
    jax.jit(lambda p: _run(tx, p, loss, 50))(params),
    jax.jit(lambda p: _run(ref, p, loss, 50))(params),
    rtol=1e-6,
  )


@pytest.mark.parametrize("case", [c for c in CASES if c.name not in TOP_Q], ids=repr)
def test_baselines_converge_on_a_quadratic_when_nothing_is_pruned(case):
  # With nothing to prune (dns's thresholds at 0 prune nothing here since
  # every weight moves away from 0), the transformations leave sgd intact.
  params, target, loss = _quadratic()
  kwargs = case.kwargs(params)
  if case.name == "scheduled_magnitude_prune":
    kwargs["sparsity"] = lambda t: 0.0
  if case.name.startswith("autoprune"):
    kwargs["strength"] = 0.0
  tx = case.factory(**kwargs)
  if case.name != "autoprune_masks":
    tx = (
      optax.chain(optax.sgd(0.1, 0.5), tx)
      if case.pre_sgd
      else (optax.chain(tx, optax.sgd(0.1, 0.5)))
    )
  got = jax.jit(lambda p: _run(tx, p, loss, 150))(params)
  test_utils.assert_trees_all_close(got, target, atol=1e-3)
