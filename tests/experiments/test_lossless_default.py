"""The default ``optax_gsm.gsm(...)`` call keeps GSM's promise on real MNIST.

A user's Flax NNX program, ``optax.sgd`` swapped for ``optax_gsm.gsm`` and
nothing else: LeNet-300-100 from scratch, 2 epochs, compression 10, then the
magnitude cut to Q with no fine-tuning. With the default rule the cut is
lossless; with the paper's literal rule (``unselected_shrink=None``) it is not.
"""

from __future__ import annotations

import numpy as np
import pytest

EPOCHS, BATCH, COMPRESSION, LR = 2, 128, 10, 0.05


def _train_and_cut(unselected_shrink, x, y, xt, yt):
  import optax
  from flax import nnx

  import optax_gsm
  from experiments.models import get_model
  from experiments.training import param_dict, set_params

  model = get_model("lenet_300_100", rngs=nnx.Rngs(0))
  tx = optax_gsm.gsm(LR, compression=COMPRESSION, momentum=0.9, unselected_shrink=unselected_shrink)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, images, labels):
    def loss_fn(model):
      logits = model(images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = nnx.grad(loss_fn)(model)
    optimizer.update(model, grads)

  @nnx.jit
  def accuracy(model, images, labels):
    return (model(images).argmax(-1) == labels).mean()

  rng = np.random.default_rng(0)
  for _ in range(EPOCHS):
    order = rng.permutation(len(x))
    for i in range(len(x) // BATCH):
      idx = order[i * BATCH : (i + 1) * BATCH]
      step(model, optimizer, x[idx], y[idx])
  before = 100 * float(accuracy(model, xt, yt))
  pruned, _ = optax_gsm.magnitude_prune(param_dict(model), compression=COMPRESSION)
  set_params(model, pruned)
  after = 100 * float(accuracy(model, xt, yt))
  return before, after


@pytest.fixture(scope="module")
def mnist(mnist_builder, split_arrays):
  x, y = split_arrays(mnist_builder, "train")
  xt, yt = split_arrays(mnist_builder, "test")
  return (
    x.astype(np.float32) / 255,
    y.astype(np.int32),
    xt.astype(np.float32) / 255,
    yt.astype(np.int32),
  )


def test_default_gsm_is_lossless_where_the_paper_rule_is_not(mnist):
  import optax_gsm

  # Measured (Intel Xeon, jax 0.10.2): default 96.00 -> 96.01, paper's rule
  # 96.41 -> 93.37.
  default_before, default_after = _train_and_cut(optax_gsm.DEFAULT_UNSELECTED_SHRINK, *mnist)
  paper_before, paper_after = _train_and_cut(None, *mnist)
  print(
    f"default {default_before:.2f} -> {default_after:.2f}; "
    f"paper {paper_before:.2f} -> {paper_after:.2f}"
  )
  assert abs(default_after - default_before) <= 0.05
  assert default_after >= 95.5
  assert paper_before - paper_after >= 1.0
  assert default_after > paper_after + 1.0
