"""Flax NNX and orbax: gsm as a drop-in optimizer with checkpointable state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import optax_gsm
from tests.optax_gsm import _compat


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(6, 16, rngs=rngs)
    self.norm = nnx.LayerNorm(16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.relu(self.norm(self.fc1(x))))


def loss_fn(model, x, y):
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def batch(seed):
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.standard_normal((32, 6)), jnp.float32),
    jnp.asarray(rng.integers(0, 3, 32)),
  )


def test_nnx_optimizer_trains_and_matches_functional_update():
  model = MLP(nnx.Rngs(0))
  q = 20
  tx = optax_gsm.gsm(0.1, num_nonzero=q, momentum=0.9)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  # The same steps done functionally on the pure param state.
  params = _compat.as_pure(nnx.state(model, nnx.Param))
  graphdef, _ = nnx.split(model, nnx.Param)
  fstate = tx.init(params)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss

  @jax.jit
  def functional_step(params, fstate, x, y):
    def f(p):
      return loss_fn(nnx.merge(graphdef, p), x, y)

    grads = jax.grad(f)(params)
    updates, fstate = tx.update(grads, fstate, params)
    return optax.apply_updates(params, updates), fstate

  losses = []
  for step in range(30):
    x, y = batch(step % 3)
    losses.append(float(train_step(model, optimizer, x, y)))
    params, fstate = functional_step(params, fstate, x, y)
  assert losses[-1] < losses[0]
  got = _compat.as_pure(nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Eligible leaves are the two kernels; LayerNorm scale and biases are not.
  flags = jax.tree.leaves(optax_gsm.default_where(params))
  assert sum(flags) == 2


def test_magnitude_prune_and_report_on_nnx_state():
  model = MLP(nnx.Rngs(1))
  params = _compat.as_pure(nnx.state(model, nnx.Param))
  pruned, _ = optax_gsm.magnitude_prune(params, compression=8)
  report = optax_gsm.sparsity_report(pruned)
  assert report.eligible.nonzeros == round((6 * 16 + 16 * 3) / 8)
  nnx.update(model, pruned)
  assert (
    int(jnp.sum(model.fc1.kernel[...] != 0)) + int(jnp.sum(model.fc2.kernel[...] != 0))
    == report.eligible.nonzeros
  )


def test_state_round_trips_through_orbax(tmp_path):
  params = {"w": jnp.ones((4, 4)), "layers": [jnp.ones((3, 2)), jnp.ones(2)]}
  tx = optax_gsm.gsm(optax.cosine_decay_schedule(0.1, 10), num_nonzero=5, score_momentum=0.9)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.arange(p.size, dtype=p.dtype).reshape(p.shape), params)
  for _ in range(3):
    _, state = tx.update(grads, state, params)

  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "state", state)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "state", target=tx.init(params))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype
  # Continuing from the restored state equals continuing from the original.
  u1, _ = tx.update(grads, restored, params)
  u2, _ = tx.update(grads, state, params)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_array_equal(a, b)
