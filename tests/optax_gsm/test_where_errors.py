"""Errors for a `where` (or `costs`) that does not fit the params (issue 17).

C: a callable `where` / `costs` given to ``optax.inject_hyperparams`` without
``static_args`` is called as a schedule on the step count; the error must
say to pass it in ``static_args``. D: a `where` of the wrong structure on a
Flax NNX state must name the first differing key path, not print a PyTreeDef
of Flax internals.
"""

import re

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import optax_gsm
from optax_gsm import eligibility

PARAMS = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
STATIC = re.escape('static_args=("where",)')


# --- C: callables under optax.inject_hyperparams ------------------------------


@pytest.mark.parametrize(
  "factory,kwargs",
  [
    (optax_gsm.global_top_q, {"num_nonzero": 3}),
    (optax_gsm.gsm, {"learning_rate": 0.1, "num_nonzero": 3}),
  ],
)
def test_callable_where_under_inject_hyperparams_names_static_args(factory, kwargs):
  where = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  tx = optax.inject_hyperparams(factory)(where=where, **kwargs)
  with pytest.raises(ValueError, match=STATIC) as info:
    tx.init(PARAMS)
  # It says what arrived: the callable's value on the step count.
  assert "got False" in str(info.value)
  assert "PyTreeDef" not in str(info.value)
  # The advice works: the same call with static_args runs, and equals the
  # transformation without inject_hyperparams.
  tx = optax.inject_hyperparams(factory, static_args=("where",))(where=where, **kwargs)
  ref = factory(where=where, **kwargs)
  grads = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4)}
  u, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(PARAMS), PARAMS)
  u_ref, _ = ref.update(grads, ref.init(PARAMS), PARAMS)
  assert jax.tree.map(lambda a, b: bool(jnp.all(a == b)), u, u_ref) == {"w": True, "b": True}


def test_default_where_function_under_inject_hyperparams():
  tx = optax.inject_hyperparams(optax_gsm.global_top_q)(
    num_nonzero=3, where=optax_gsm.default_where
  )
  with pytest.raises(ValueError, match=STATIC):
    tx.init(PARAMS)


def test_traced_where_flag_names_static_args():
  def update(flag):
    return eligibility.resolve_where({"w": flag, "b": False}, PARAMS)

  with pytest.raises(TypeError, match=r"traced value at \['w'\].*" + STATIC):
    jax.jit(update)(jnp.bool_(True))


def test_array_where_names_static_args():
  with pytest.raises(ValueError, match=STATIC):
    eligibility.resolve_where(jnp.bool_(True), PARAMS)


def test_callable_costs_under_inject_hyperparams_names_static_args():
  costs = lambda p: jax.tree.map(lambda x: jnp.ones(x.shape, jnp.int32), p)
  tx = optax.inject_hyperparams(optax_gsm.global_top_q)(budget=3, costs=costs)
  with pytest.raises(ValueError, match=re.escape('static_args=("costs",)')) as info:
    tx.init(PARAMS)
  assert "PyTreeDef" not in str(info.value)
  tx = optax.inject_hyperparams(optax_gsm.global_top_q, static_args=("costs",))(
    budget=3, costs=costs
  )
  _, state = tx.update(PARAMS, tx.init(PARAMS), PARAMS)
  assert int(state.inner_state.num_nonzero) == 3


def test_library_cost_function_under_inject_hyperparams_names_static_args():
  # bytes_cost_tree(count) resolves `where` on the step count itself.
  tx = optax.inject_hyperparams(optax_gsm.global_top_q)(budget=30, costs=optax_gsm.bytes_cost_tree)
  with pytest.raises(
    ValueError,
    match=r"a step count\..*static_args=\("
    r'"where", "costs", "metric"\)',
  ):
    tx.init(PARAMS)


def test_static_args_hint_text():
  assert eligibility.static_args_hint("metric") == (
    "Under optax.inject_hyperparams a callable `metric` is taken for a "
    "schedule and called with the step count: pass it via "
    'optax.inject_hyperparams(factory, static_args=("metric",)).'
  )


# --- D: wrong structure on an NNX state -----------------------------------------


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(6, 16, rngs=rngs)
    self.norm = nnx.LayerNorm(16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 3, rngs=rngs)


def _state():
  return nnx.state(MLP(nnx.Rngs(0)), nnx.Param)


def _where_error(where, params):
  with pytest.raises(ValueError) as info:
    optax_gsm.count_eligible(params, where)
  text = str(info.value)
  assert "PyTreeDef" not in text and "\n" not in text
  assert len(text) < 700
  return text


def test_nnx_where_missing_leaf_names_path():
  state = _state()
  where = jax.tree.map(lambda x: x.ndim >= 2, state)
  assert optax_gsm.count_eligible(state, where) == 6 * 16 + 16 * 3
  del where["fc2"]["bias"]
  text = _where_error(where, state)
  assert "`where` lacks ['fc2']['bias'], which params have" in text, text


def test_nnx_where_renamed_module_names_path():
  state = _state()
  flags = jax.tree.map(lambda x: x.ndim >= 2, nnx.to_pure_dict(state))
  flags["fc3"] = flags.pop("fc2")
  where = nnx.State(flags)
  text = _where_error(where, state)
  assert "`where` lacks ['fc2'], which params have" in text, text


def test_nnx_where_plain_dict_names_node_type():
  state = _state()
  where = jax.tree.map(lambda x: x.ndim >= 2, nnx.to_pure_dict(state))
  text = _where_error(where, state)
  assert (
    "at the root params have a State with 3 children "
    "[['fc1'], ['fc2'], ['norm']], `where` has a dict"
  ) in text, text
  assert "(a different node type)" in text


def test_nnx_where_bool_instead_of_variable_names_path():
  state = _state()
  flags = jax.tree.map(lambda x: x.ndim >= 2, nnx.to_pure_dict(state))
  text = _where_error(nnx.State(flags), state)
  assert (
    "at ['fc1']['bias'] params have a Param with 1 child [.value], `where` has False" in text
  ), text


def test_structure_difference_on_plain_pytrees():
  diff = eligibility.structure_difference
  assert diff({"a": [1, 2]}, {"a": [True, False]}, "where") is None
  assert diff({"a": [1, 2]}, {"a": (True, False)}, "where") == (
    "at ['a'] params have a list with 2 children [[0], [1]], `where` has a "
    "tuple with 2 children [[0], [1]] (a different node type)"
  )
  assert diff({"a": (1, 2)}, {"a": (True, False, True)}, "where") == (
    "`where` has ['a'][2], which params lack"
  )
  assert diff({"a": 1}, {"a": True, "b": True}, "where") == ("`where` has ['b'], which params lack")
  assert diff({"a": 1, "b": {"c": 2}}, {"a": True, "b": False}, "costs") == (
    "at ['b'] params have a dict with 1 child [['c']], `costs` has False"
  )
