"""``compression_ramp``: values against a numpy rendering of Zhu and Gupta's
schedule, its edges, and its argument checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_gsm


def reference(c_final: float, steps: int, power: float, begin: int, t: int) -> float:
  """C(t) = 1 / (1 - s(t)), s(t) = s_f (1 - (1 - clip(t - t0, 0, T) / T)^p), in float64."""
  frac = min(max(t - begin, 0), steps) / steps
  s = (1.0 - 1.0 / c_final) * (1.0 - (1.0 - frac) ** power)
  return 1.0 / (1.0 - s)


@settings(max_examples=60, deadline=None)
@given(
  c_final=st.floats(1.0, 1000.0),
  steps=st.integers(1, 5000),
  power=st.floats(0.25, 6.0),
  begin=st.integers(0, 100),
  t=st.integers(0, 6000),
)
def test_matches_numpy_reference(c_final, steps, power, begin, t):
  ramp = optax_gsm.compression_ramp(c_final, steps, power=power, transition_begin=begin)
  got = float(ramp(t))
  # float32 sparsity: 1 - s >= 1 / C_f carries a relative error of about
  # C_f * 2^-24.
  np.testing.assert_allclose(got, reference(c_final, steps, power, begin, t), rtol=1e-4 * c_final)


def test_edges_exact():
  ramp = optax_gsm.compression_ramp(60, 100)
  assert float(ramp(0)) == 1.0
  # From the end of the ramp on, C itself (as gsm would take a constant C).
  assert float(ramp(100)) == float(ramp(10**6)) == float(np.float32(60.0))
  odd = optax_gsm.compression_ramp(25_557_032 / 2_555_703, 7)
  assert float(odd(jnp.int32(7))) == float(np.float32(25_557_032 / 2_555_703))
  # Monotone: Q never grows back.
  values = np.asarray(jax.vmap(ramp)(jnp.arange(0, 120)))
  assert np.all(np.diff(values) >= 0)
  # C_f = 1 never prunes.
  assert float(optax_gsm.compression_ramp(1, 10)(5)) == 1.0


def test_jits_and_injects():
  ramp = optax_gsm.compression_ramp(8.0, 4)
  np.testing.assert_allclose(
    float(jax.jit(ramp)(jnp.int32(2))), reference(8.0, 4, 3.0, 0, 2), rtol=1e-6
  )
  tx = optax.inject_hyperparams(optax_gsm.gsm)(learning_rate=0.1, compression=ramp)
  params = {"w": jnp.ones((4, 4))}
  state = tx.init(params)
  _, state = jax.jit(tx.update)({"w": jnp.ones((4, 4))}, state, params)
  assert int(state.inner_state[0].num_nonzero) == 16  # C(0) = 1


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"compression": 0.5, "transition_steps": 10}, ValueError, "`compression`.*>= 1"),
    ({"compression": float("nan"), "transition_steps": 10}, ValueError, "`compression`"),
    ({"compression": float("inf"), "transition_steps": 10}, ValueError, "`compression`"),
    ({"compression": True, "transition_steps": 10}, ValueError, "`compression`"),
    ({"compression": "10", "transition_steps": 10}, ValueError, "`compression`"),
    ({"compression": 10, "transition_steps": 0}, ValueError, "`transition_steps` must be >= 1"),
    ({"compression": 10, "transition_steps": 2.5}, TypeError, "`transition_steps` must be an int"),
    (
      {"compression": 10, "transition_steps": 5, "transition_begin": -1},
      ValueError,
      "`transition_begin` must be >= 0",
    ),
    ({"compression": 10, "transition_steps": 5, "power": 0}, ValueError, "`power`"),
    ({"compression": 10, "transition_steps": 5, "power": float("nan")}, ValueError, "`power`"),
  ],
)
def test_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    optax_gsm.compression_ramp(**kwargs)
