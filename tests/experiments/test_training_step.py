"""``Trainer._step`` is :func:`make_train_step` between NNX states (issue 19).

The reference below is the NNX step that ``Trainer`` had before it was built on
``make_train_step`` (``nnx.merge`` + ``nnx.value_and_grad`` +
``nnx.Optimizer.update``), kept here verbatim.  Both are jitted the same way
(donating the state) and run a few steps from the same state on the same
batches; on XLA:CPU the parameters, BatchNorm statistics, optimizer state
(step count included) and metrics agree bit for bit, for a model without
BatchNorm (LeNet-5) and one with (ResNet-8), with momentum SGD and with GSM.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_gsm
from experiments.models import get_model
from experiments.models.resnet import CifarResNet
from experiments.training import Trainer, cross_entropy_loss, param_dict


def reference_step(model_def, opt_def, model_state, opt_state, images, labels):
  """The former ``Trainer._step``: NNX's own gradient and optimizer update."""
  model = nnx.merge(model_def, model_state)
  optimizer = nnx.merge(opt_def, opt_state)

  def loss_fn(model):
    logits = model(images)
    return cross_entropy_loss(logits, labels).mean(), logits

  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  correct = jnp.sum(jnp.argmax(logits, -1) == labels)
  return nnx.state(model), nnx.state(optimizer), {"loss": loss, "correct": correct}


MODELS = {
  "lenet5": (lambda: get_model("lenet5", rngs=nnx.Rngs(0)), (28, 28, 1)),
  "resnet8_batchnorm": (lambda: CifarResNet(8, rngs=nnx.Rngs(0)), (32, 32, 3)),
}

TXS = {
  "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
  "gsm": lambda: optax_gsm.gsm(0.05, compression=10.0, momentum=0.98, weight_decay=5e-4),
}


def batches(shape, n, *, batch_size=8, seed=0):
  rng = np.random.default_rng(seed)
  return [
    (
      jnp.asarray(rng.normal(size=(batch_size,) + shape), jnp.float32),
      jnp.asarray(rng.integers(0, 10, size=batch_size), jnp.int32),
    )
    for _ in range(n)
  ]


def assert_trees_equal(got, want, what):
  assert jax.tree.structure(got) == jax.tree.structure(want), what
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype, f"{what}{jax.tree_util.keystr(path)}"
    np.testing.assert_array_equal(a, b, err_msg=f"{what}{jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("tx_name", sorted(TXS))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_trainer_step_is_the_former_nnx_step_bit_for_bit(model_name, tx_name):
  make_model, shape = MODELS[model_name]
  trainer = Trainer(make_model(), TXS[tx_name](), lr_schedule=optax.constant_schedule(0.05))
  has_batch_stats = bool(jax.tree.leaves(nnx.state(trainer.model, nnx.BatchStat)))
  assert has_batch_stats == (model_name == "resnet8_batchnorm")
  # The reference runs on copies (the trainer's step donates its inputs).
  ref_step = jax.jit(
    lambda ms, os_, x, y: reference_step(trainer._model_def, trainer._opt_def, ms, os_, x, y),
    donate_argnums=(0, 1),
  )
  ms = jax.tree.map(jnp.copy, trainer.model_state)
  os_ = jax.tree.map(jnp.copy, trainer.opt_state)
  before = jax.tree.map(np.asarray, trainer.model_state)
  for images, labels in batches(shape, 4):
    got = trainer.train_step(images, labels)
    ms, os_, want = ref_step(ms, os_, images, labels)
    assert_trees_equal(got, want, "metrics")
  assert_trees_equal(trainer.model_state, ms, "model_state")
  assert_trees_equal(trainer.opt_state, os_, "opt_state")
  assert trainer.step == 4
  # The steps did something: parameters and (with BatchNorm) statistics moved.
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, trainer.model_state)
  params, stats, _ = nnx.split_state(moved, nnx.Param, nnx.BatchStat, ...)
  assert any(jax.tree.leaves(params))
  assert all(jax.tree.leaves(stats))


def test_trainer_state_keeps_the_nnx_layout(tmp_path: Path):
  """The checkpointed trees are still ``nnx.split(model)`` and ``nnx.split(optimizer)``."""
  model = CifarResNet(8, rngs=nnx.Rngs(0))
  model.train()
  tx = optax.sgd(0.05, momentum=0.9)
  want_model = nnx.split(model)[1]
  want_opt = nnx.split(nnx.Optimizer(model, tx, wrt=nnx.Param))[1]
  trainer = Trainer(model, tx, lr_schedule=optax.constant_schedule(0.05))
  for images, labels in batches((32, 32, 3), 2):
    trainer.train_step(images, labels)
  assert jax.tree.structure(trainer.model_state) == jax.tree.structure(want_model)
  assert jax.tree.structure(trainer.opt_state) == jax.tree.structure(want_opt)
  assert trainer.opt_state["step"][...].dtype == want_opt["step"][...].dtype
  trainer.sync()
  assert int(trainer.optimizer.step[...]) == 2
  assert param_dict(trainer.model).keys() == param_dict(model).keys()


def test_benchmark_step_runs_both_variants():
  trainer = Trainer(
    get_model("lenet5", rngs=nnx.Rngs(0)),
    optax.sgd(0.05, momentum=0.9),
    lr_schedule=optax.constant_schedule(0.05),
  )
  images, labels = batches((28, 28, 1), 1)[0]
  before = jax.tree.map(np.asarray, trainer.model_state)
  timing = trainer.benchmark_step(images, labels, steps=2)
  assert set(timing) == {"split_merge_jit_s", "nnx_jit_s"}
  assert all(t > 0 for t in timing.values())
  assert_trees_equal(trainer.model_state, before, "model_state")  # untouched
  assert trainer.step == 0
