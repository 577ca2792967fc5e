"""Training pieces shared by the structured methods: optimiser, batches, evaluation.

Every training step of :mod:`experiments.structured` (dense pre-training, the
greedy methods' fine-tuning, AutoPrune, the GSM baseline) is built by
:func:`experiments.training.make_train_step` on
:meth:`~experiments.structured.gating.GatedModel.apply`; the functions here
are what they share around it.

Example:
  >>> from flax import nnx
  >>> from experiments.models.lenet import LeNet5
  >>> from experiments.structured.gating import GatedModel
  >>> gm = GatedModel(LeNet5(rngs=nnx.Rngs(0)))
  >>> x = jnp.ones((2, 28, 28, 1))
  >>> alive = {k: np.ones(c, bool) for k, c in gm.widths.items()}
  >>> max_output_difference(gm, gm.params, gm.rest, alive, gm, x)  # all alive
  0.0
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.structured.gating import GatedModel, gate_vectors
from experiments.structured.plans import Plan
from experiments.training import make_base_tx, make_train_step

PyTree = Any


def make_tx(
  learning_rate: float | optax.Schedule, *, momentum: float = 0.9, weight_decay: float = 5e-4
) -> optax.GradientTransformation:
  """Momentum SGD with weight decay on the kernels only.

  :func:`experiments.training.make_base_tx` with this module's defaults; the
  argument is called ``learning_rate`` so that ``optax.inject_hyperparams``
  can change it between the greedy methods' pruning and fine-tuning.
  """
  return make_base_tx(learning_rate, momentum=momentum, weight_decay=weight_decay)


def batches(pipeline: Any, start_epoch: int = 0, skip: int = 0) -> Iterator[Any]:
  """Endless training batches, epoch after epoch.

  Args:
    pipeline: the training pipeline (``pipeline.epoch(e)`` yields epoch e).
    start_epoch: the first epoch.
    skip: batches of ``start_epoch`` to leave out, so that
      ``batches(p, *divmod(step, p.steps_per_epoch))`` resumes at overall
      update ``step``.
  """
  epoch = start_epoch
  for i, b in enumerate(pipeline.epoch(epoch)):
    if i >= skip:
      yield b
  while True:
    epoch += 1
    for b in pipeline.epoch(epoch):
      yield b


def logits_fn(gm: GatedModel) -> Callable:
  """``f(params, rest, gates, x) -> logits`` in eval mode, jitted.

  Compiled once per :class:`GatedModel` and kept on it (so it dies with it);
  evaluation and the output comparisons share it.
  """
  fn = getattr(gm, "_logits_fn", None)
  if fn is None:
    fn = jax.jit(lambda params, rest, gates, x: gm.apply(params, rest, x, gates, train=False)[0])
    gm._logits_fn = fn  # pylint: disable=protected-access
  return fn


def evaluate(
  gm: GatedModel, params: PyTree, rest: Any, pipeline: Any, alive: Mapping[str, Any] | None = None
) -> dict[str, float]:
  """Loss and accuracy of the gated model (BatchNorm in eval mode).

  Unlike :func:`experiments.training.evaluate` (an NNX module), this takes the
  pure state of a :class:`GatedModel` and the alive channels, so that the
  greedy methods evaluate every snapshot without building a model. The sums
  are taken on the host in float64; padded examples (``mask == 0``) are left
  out.
  """
  fn = logits_fn(gm)
  gates = None if alive is None else gate_vectors(alive)
  loss = correct = count = 0.0
  for b in pipeline.epoch(0):
    logits = np.asarray(fn(params, rest, gates, b.image), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    label = np.asarray(b.label)
    mask = np.asarray(b.mask, np.float64)
    loss += float(np.sum(-logp[np.arange(len(label)), label] * mask))
    correct += float(np.sum((logits.argmax(-1) == label) * mask))
    count += float(mask.sum())
  return {"loss": loss / count, "acc": correct / count}


def max_output_difference(
  gm: GatedModel,
  params: PyTree,
  rest: Any,
  alive: Mapping[str, Any],
  slim: GatedModel,
  x: jax.Array,
) -> float:
  """max |gated model(x) - slim model(x)| (eval mode)."""
  masked = logits_fn(gm)(params, rest, gate_vectors(alive), x)
  out = logits_fn(slim)(slim.params, slim.rest, None, x)
  return float(jnp.max(jnp.abs(masked - out)))


def probe_inputs(test: Any | None, plan: Plan) -> jax.Array:
  """Inputs for output comparisons: the first test batch (its shape is
  already compiled for evaluation), or random images."""
  if test is not None:
    return jax.device_put(next(iter(test.epoch(0))).image)
  return jax.random.normal(jax.random.key(0), (4,) + plan.input_shape)


def train_dense(
  model: nnx.Module,
  train: Any,
  *,
  steps: int,
  lr: float = 0.01,
  momentum: float = 0.9,
  weight_decay: float = 5e-4,
  tx: optax.GradientTransformation | None = None,
  first_step: int = 0,
  log: Callable[[str], None] = print,
) -> nnx.Module:
  """Plain momentum-SGD training of ``model`` for ``steps`` updates.

  ``tx``, when given, replaces ``make_tx(lr, momentum, weight_decay)``;
  training reads ``train`` from overall update ``first_step`` on.
  """
  gm = GatedModel(model)
  if tx is None:
    tx = make_tx(lr, momentum=momentum, weight_decay=weight_decay)
  step = jax.jit(make_train_step(gm.apply, tx, stateful=True))
  params, rest, opt = gm.params, gm.rest, tx.init(gm.params)
  it = batches(train, *divmod(int(first_step), int(train.steps_per_epoch)))
  for i in range(steps):
    b = next(it)
    params, rest, opt, loss, _ = step(params, rest, opt, b.image, b.label)
    if (i + 1) % 500 == 0 or i + 1 == steps:
      log(f"  train step {i + 1}/{steps} loss {float(loss):.4f}")
  return gm.to_model(params, rest)


def model_accuracy(model: nnx.Module, pipeline: Any) -> float:
  """Accuracy of a plain NNX model (eval mode) on ``pipeline``."""
  gm = GatedModel(model)
  return evaluate(gm, gm.params, gm.rest, pipeline)["acc"]
