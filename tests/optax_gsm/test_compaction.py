"""optax_gsm.compaction: dead-unit tests, constant folding and the COO product."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_gsm import compaction as cl


def test_unread_and_unfed_on_conv_and_flattened_kernels():
  k = np.zeros((3, 3, 4, 5))
  k[1, 2, 0, 3] = 1.0
  k[0, 0, 2, 1] = -2.0
  assert cl.unread_inputs(k).tolist() == [False, True, False, True]
  assert cl.unfed_outputs(k).tolist() == [True, False, True, False, True]
  # A dense layer after an NHWC flatten of 6 positions x 3 channels.
  d = np.zeros((6 * 3, 2))
  d[4 * 3 + 1, 0] = 0.5
  assert cl.unread_inputs(d, spatial=6).tolist() == [True, False, True]
  with pytest.raises(ValueError, match="`spatial`=4 does not divide the kernel's 18 inputs"):
    cl.unread_inputs(d, spatial=4)
  with pytest.raises(ValueError, match="`spatial` must be a positive integer, got 0"):
    cl.unread_inputs(d, spatial=0)
  with pytest.raises(ValueError, match="`kernel` must have at least 2 dimensions"):
    cl.unfed_outputs(np.ones(3))


def test_fold_equals_a_constant_input_through_a_valid_conv_after_flatten():
  rng = np.random.default_rng(0)
  values = np.array([0.0, 1.5, 0.0, -0.25], np.float32)  # channels 1 and 3 constant
  # VALID 3x3 convolution on a 6x6 map.
  k = rng.standard_normal((3, 3, 4, 5)).astype(np.float32)
  b = rng.standard_normal(5).astype(np.float32)
  x = rng.standard_normal((2, 6, 6, 4)).astype(np.float32)
  x[..., 1], x[..., 3] = values[1], values[3]
  conv = lambda x, k: jax.lax.conv_general_dilated(
    x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  want = conv(x, k) + b
  keep = [0, 2]
  got = conv(x[..., keep], k[:, :, keep]) + cl.fold_constant_inputs(k, b, values)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # A dense layer on the NHWC flatten of that map (36 positions x 4 channels).
  d = rng.standard_normal((36 * 4, 3)).astype(np.float32)
  want = x.reshape(2, -1) @ d
  view = d.reshape(36, 4, 3)[:, keep].reshape(-1, 3)
  got = x[..., keep].reshape(2, -1) @ view + cl.fold_constant_inputs(d, None, values, spatial=36)
  np.testing.assert_allclose(got, want, atol=1e-4)
  with pytest.raises(ValueError, match=r"`values` must have shape \(4,\)"):
    cl.fold_constant_inputs(k, b, np.zeros(3))
  with pytest.raises(ValueError, match=r"`bias` must have shape \(5,\)"):
    cl.fold_constant_inputs(k, np.zeros(4), values)


def test_batch_norm_constant_matches_flax_in_eval_mode():
  from flax import nnx

  rng = np.random.default_rng(1)
  bn = nnx.BatchNorm(6, epsilon=1e-5, use_running_average=True, rngs=nnx.Rngs(0))
  stats = {k: rng.standard_normal(6).astype(np.float32) for k in ("mean", "scale", "bias")}
  stats["var"] = rng.uniform(0.1, 2, 6).astype(np.float32)
  for name, value in stats.items():
    getattr(bn, name)[...] = jnp.asarray(value)
  x = rng.standard_normal(6).astype(np.float32)
  want = np.asarray(bn(jnp.asarray(x)[None]))[0]
  got = cl.batch_norm_constant(x, epsilon=1e-5, **stats)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"`var` must have the shape of `mean` \(6,\)"):
    cl.batch_norm_constant(x, mean=stats["mean"], var=np.ones(5), epsilon=1e-5)


@pytest.mark.parametrize("density", [0.0, 0.02, 0.3, 1.0])
def test_coo_matmul_equals_the_dense_product(density):
  rng = np.random.default_rng(2)
  k = (rng.standard_normal((40, 7)) * (rng.random((40, 7)) < density)).astype(np.float32)
  x = rng.standard_normal((3, 5, 40)).astype(np.float32)
  rows, cols, values = cl.coo_kernel(k)
  assert len(values) == np.count_nonzero(k)
  got = jax.jit(cl.coo_matmul, static_argnums=4)(jnp.asarray(x), rows, cols, values, 7)
  assert got.shape == (3, 5, 7)
  np.testing.assert_allclose(got, x @ k, atol=1e-5)
  with pytest.raises(ValueError, match="`kernel` must be 2-D"):
    cl.coo_kernel(np.ones((2, 2, 2)))
