"""The training loop: jitted NNX steps, evaluation, progress bars, checkpoints, resume.

Speed.  ``nnx.jit`` walks the module graph in Python on every call, which costs
more than a whole LeNet step on CPU.  :class:`Trainer` therefore splits the model
and the ``nnx.Optimizer`` into a static graph definition and pure array state
once, and jits a pure ``state -> state`` step that merges them inside (the
pattern of Flax's performance guide), donating the old state so parameters are
updated in place.  ``Trainer.benchmark_step`` compares both variants.

One step.  The gradient and the optimiser update of every training loop here
are those of :func:`make_train_step`: :class:`Trainer` runs its stateful form
on the model's ``nnx.Param`` arrays and its other state (BatchNorm statistics),
with the optax state and step count taken out of, and put back into, the
``nnx.Optimizer`` state, so checkpoints keep the ``nnx.Optimizer`` layout.

Checkpoints.  After every epoch an orbax ``CheckpointManager`` writes
``<ckpt_dir>/<epochs done>/`` with three items: ``model`` (parameters and
BatchNorm statistics), ``optimizer`` (step count and optimizer state: momentum,
GSM selection state) and ``meta`` (JSON: epochs done, per-epoch history, config,
accumulated wall time, and the data RNG state).  orbax writes into a temporary
directory and renames it when complete, so a process killed at any moment leaves
either the previous or the new checkpoint, never a torn one; only the last few are
kept.  A fourth item, ``integrity`` (JSON), holds the sha256 of the ``model``
and ``optimizer`` arrays (computed from the host numpy copies of exactly what
is saved) and of ``meta``, with the epoch and step: every restore recomputes
and compares them, and checks that the epoch stored in ``meta`` is the
checkpoint's step.  A corrupt or unverifiable latest checkpoint (flipped bytes,
a missing item, truncated metadata, a hand-edited epoch) is reported in one
line and the run falls back to the newest intact one (the newer, corrupt steps
are moved aside into ``<ckpt_dir>.corrupt/``, not deleted); with none intact
it stops with :class:`CheckpointCorruptError`.  It never trains on a
checkpoint that does not verify.  The data order of epoch ``e`` is a pure function of ``(seed, e)``
(:mod:`experiments.data`), so resuming from the checkpoint of epoch ``e`` replays
exactly the batches an uninterrupted run would have used and, with a
deterministic backend (XLA:CPU), the final parameters are bitwise identical.

Meshes.  With ``mesh=`` (:func:`make_training_mesh`, the ``--mesh`` flag of
:mod:`experiments.run`) the same jitted step runs SPMD on a
:class:`jax.sharding.Mesh` with axes ``data`` and/or ``model``: every batch is
sharded along ``data``, parameters and optimizer state are sharded FSDP-style
along ``model`` (:func:`optax_gsm.sharding.fsdp_partition_specs`; small leaves
and GSM's scalar state replicated) or replicated when there is no ``model``
axis.  The loss is still the mean over the global batch and GSM's selection
stays global, so a mesh changes the results only by float32 summation order.
Checkpoints hold global arrays: one written on any mesh (or none) restores on
any other, each leaf placed directly into the sharding of the restoring run.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import shutil
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import optax_gsm
from experiments.data import Pipeline, epoch_rng
from experiments.fileio import UsageError
from optax_gsm import sharding as gsm_sharding

# Exit status of a process stopped by ``stop_after_epoch`` (see :meth:`Trainer.fit`).
STOP_EXIT_CODE = 75


class CheckpointMismatchError(RuntimeError):
  """The checkpoint on disk was written by a different configuration."""


class CheckpointCorruptError(UsageError):
  """No checkpoint that verifies (or the requested one does not verify)."""


class _StepUnusable(Exception):
  """One checkpoint step failed verification; ``str()`` says what failed."""


# ``meta["integrity"]`` of checkpoints with an ``integrity`` item.
INTEGRITY_FORMAT = "sha256-v1"


# ------------------------------------------------------------------ meshes

# The mesh axes the training loop understands: the batch is split along DATA_AXIS,
# parameters and optimizer state along MODEL_AXIS.
DATA_AXIS = "data"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, MODEL_AXIS)


def make_training_mesh(spec: str) -> Mesh:
  """Builds the mesh of a ``--mesh`` value such as ``"data=4,model=2"``.

  Args:
    spec: ``name=size`` entries separated by commas, with names among
      :data:`MESH_AXES` (each at most once, in any order; one size may be
      ``-1`` for "the remaining devices").  The sizes must multiply to
      ``jax.device_count()``.

  Returns:
    A mesh over all devices (:func:`optax_gsm.sharding.make_mesh`).

  Raises:
    ValueError: a malformed spec, an axis other than ``data``/``model``, or a
      product of sizes that is not the device count; the message names the
      spec and says what is wrong.
  """
  shape = gsm_sharding.parse_mesh_shape(spec)
  unknown = [name for name in shape if name not in MESH_AXES]
  if unknown:
    raise ValueError(
      f"mesh shape {spec!r}: unknown axis {unknown[0]!r}; the training loop "
      f"shards the batch along {DATA_AXIS!r} and parameters/optimizer state "
      f"along {MODEL_AXIS!r}, so the axes must be among {MESH_AXES}"
    )
  return gsm_sharding.make_mesh(spec)


def data_axis_size(mesh: Mesh | None) -> int:
  """How many shards a batch is split into on ``mesh`` (1 without a mesh or ``data`` axis)."""
  if mesh is None:
    return 1
  return int(dict(mesh.shape).get(DATA_AXIS, 1))


def check_batch_size(batch_size: int, mesh: Mesh | None, what: str = "batch size") -> None:
  """Raises ``ValueError`` unless ``batch_size`` splits evenly along the ``data`` axis.

  JAX needs evenly divisible shardings, and an uneven split would change which
  examples a step averages over.
  """
  n = data_axis_size(mesh)
  if batch_size % n:
    raise ValueError(
      f"{what} {batch_size} is not divisible by the size {n} of mesh axis "
      f"{DATA_AXIS!r}: every device gets an equal slice of each batch"
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch (images, labels, masks): the leading axis along ``data``."""
  if DATA_AXIS in mesh.shape:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))
  return NamedSharding(mesh, PartitionSpec())


def state_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree of model or optimizer state on ``mesh``.

  FSDP-style along ``model`` (:func:`optax_gsm.sharding.fsdp_partition_specs`:
  the largest divisible axis of every leaf of at least 2**14 entries), so the
  momentum of a weight is sharded exactly like the weight and scalars stay
  replicated; everything replicated when the mesh has no ``model`` axis.
  """
  if MODEL_AXIS in mesh.shape:
    specs = gsm_sharding.fsdp_partition_specs(tree, mesh, MODEL_AXIS)
    gsm_sharding.validate_partition_specs(tree, specs, mesh)
  else:
    specs = jax.tree.map(lambda _: PartitionSpec(), tree)
  return gsm_sharding.named_shardings(specs, mesh)


def mesh_record(mesh: Mesh, tree: Any | None = None) -> dict[str, Any]:
  """A JSON-ready description of ``mesh`` (for ``results.json``).

  Args:
    mesh: the training mesh.
    tree: optional model state; its leaves sharded over ``model`` are listed
      with their partition specs.

  Returns:
    ``{"shape": {axis: size}, "devices": n, "platform": ..., "batch_spec": [...],
    "sharded_leaves": {path: spec entries}}`` (the last only with ``tree``).
  """
  record: dict[str, Any] = {
    "shape": {str(k): int(v) for k, v in mesh.shape.items()},
    "devices": int(mesh.devices.size),
    "platform": str(mesh.devices.flat[0].platform),
    "batch_spec": [str(e) for e in batch_sharding(mesh).spec],
  }
  if tree is not None:
    shardings = jax.tree_util.tree_flatten_with_path(state_shardings(tree, mesh))[0]
    record["sharded_leaves"] = {
      jax.tree_util.keystr(path): [str(e) for e in sh.spec]
      for path, sh in shardings
      if any(e is not None for e in sh.spec)
    }
  return record


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def make_train_step(
  apply_fn: Callable[..., Any],
  tx: optax.GradientTransformation,
  *,
  loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy_loss,
  forward: Callable[[Any, Any], Any] | None = None,
  stateful: bool = False,
  return_logits: bool = False,
) -> Callable[..., tuple[Any, ...]]:
  r"""One optimiser update on the mean loss of a batch, as a pure function (jit it).

  The step minimises

  .. math:: L(\theta, u) = \frac{1}{N} \sum_{n=1}^{N}
            \ell\big(f(\phi(\theta); x_n, u), y_n\big)

  with ``tx`` (``updates, opt_state = tx.update(dL/dtheta, opt_state, params)``),
  where :math:`\phi` is ``forward`` (the identity by default) and :math:`u` are
  optional extra inputs of the model (channel gates, AutoPrune masks).  Their
  gradients :math:`\partial L / \partial u` come back beside the update, for the
  caller to use (gate statistics, a second optimiser): one value-and-gradient
  pass serves both.  Every training loop builds its step here: the functional
  ones (:func:`experiments.methods.common.train`, :mod:`experiments.structured`)
  directly, :class:`Trainer` (stateful, with ``return_logits=True``) inside its
  split/merge step on the NNX model and ``nnx.Optimizer`` state.

  Stateless (``stateful=False``): ``apply_fn(params, images, *inputs) -> logits``
  and ``step(params, opt_state, images, labels, *inputs) ->
  (params, opt_state, loss, input_grads)``.

  Stateful: ``apply_fn(params, state, images, *inputs) -> (logits, new_state)``
  (e.g. BatchNorm statistics in training mode) and ``step(params, state,
  opt_state, images, labels, *inputs) -> (params, new_state, opt_state, loss,
  input_grads)``.

  Args:
    apply_fn: the model as a pure function, as above.
    tx: the optimiser of ``params``; its ``update`` gets ``params``.
    loss_fn: per-example loss ``loss_fn(logits, labels) -> (N,)``; the step
      minimises its mean.
    forward: optional ``forward(params, opt_state) -> params``, the weights the
      model runs on (DNS: ``W * T`` with a straight-through gradient); the
      gradient is still taken with respect to ``params``.
    stateful: whether ``apply_fn`` carries state, as above.
    return_logits: also return the batch's logits (those the loss was computed
      from, before the update) as one more, last, element: ``(params,
      opt_state, loss, input_grads, logits)``, or ``(params, new_state,
      opt_state, loss, input_grads, logits)`` when stateful; for metrics such
      as the accuracy without a second forward pass.

  Returns:
    The step function (not jitted: callers add donation or wrap it in a larger
    jitted step).  ``input_grads`` holds one gradient per extra input, ``()``
    without any.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = optax.sgd(0.1)
    >>> step = jax.jit(make_train_step(lambda w, x: x @ w, tx))
    >>> w = jnp.zeros((2, 3))
    >>> w, opt_state, loss, _ = step(w, tx.init(w), jnp.ones((4, 2)),
    ...                              jnp.array([0, 1, 2, 0]))
    >>> round(float(loss), 4)  # log 3: all logits are equal at w = 0
    1.0986

    With ``return_logits=True`` the logits come last (here for a count of
    correct argmax predictions):

    >>> step = jax.jit(make_train_step(lambda w, x: x @ w, tx, return_logits=True))
    >>> w, x, y = jnp.eye(2, 3), jnp.eye(2), jnp.array([0, 1])
    >>> w, opt_state, loss, _, logits = step(w, tx.init(w), x, y)
    >>> logits.shape, int(jnp.sum(jnp.argmax(logits, -1) == y))
    ((2, 3), 2)
  """

  def step(params: Any, *args: Any) -> tuple[Any, ...]:
    if stateful:
      state, opt_state, images, labels, *inputs = args
    else:
      state = None
      opt_state, images, labels, *inputs = args

    def objective(p: Any, *inputs: Any) -> tuple[jax.Array, tuple[Any, Any]]:
      p_fwd = p if forward is None else forward(p, opt_state)
      if stateful:
        logits, new_state = apply_fn(p_fwd, state, images, *inputs)
      else:
        logits, new_state = apply_fn(p_fwd, images, *inputs), None
      return loss_fn(logits, labels).mean(), (new_state, logits)

    argnums = tuple(range(1 + len(inputs)))
    (loss, (new_state, logits)), grads = jax.value_and_grad(
      objective, argnums=argnums, has_aux=True
    )(params, *inputs)
    updates, opt_state = tx.update(grads[0], opt_state, params)
    params = optax.apply_updates(params, updates)
    out = (params, new_state, opt_state) if stateful else (params, opt_state)
    out += (loss, grads[1:])
    return out + (logits,) if return_logits else out

  return step


def param_dict(model: nnx.Module) -> dict[str, Any]:
  """The model's ``nnx.Param`` leaves as a nested dict of arrays.

  This is the pytree handed to ``optax_gsm.magnitude_prune`` and
  ``optax_gsm.sparsity_report``; its paths read like ``['blocks'][3]['conv1']['kernel']``.
  """
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def set_params(model: nnx.Module, params: Mapping[str, Any]) -> None:
  """Writes a nested dict produced by :func:`param_dict` back into ``model``."""
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)


@jax.jit
def _count_above(params: Any, threshold: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(number of eligible entries with |w| > threshold, number of eligible entries)."""
  flags = optax_gsm.default_where(params)
  above = jnp.zeros((), jnp.int32)
  total = 0
  for leaf, flag in zip(jax.tree.leaves(params), jax.tree.leaves(flags)):
    if flag:
      above = above + jnp.sum(jnp.abs(leaf) > threshold, dtype=jnp.int32)
      total += leaf.size
  return above, jnp.asarray(total, jnp.int32)


def nonzero_by_magnitude(params: Any, threshold: float) -> tuple[int, int]:
  """``(count of eligible |w| > threshold, eligible count N)``."""
  above, total = _count_above(params, jnp.asarray(threshold, jnp.float32))
  return int(above), int(total)


_EVAL_STEPS: dict[Any, Callable[..., Any]] = {}


def evaluate(
  model: nnx.Module, pipeline: Pipeline, *, mesh: Mesh | None = None
) -> dict[str, float]:
  """Mean loss and accuracy of ``model`` over one pass of ``pipeline``.

  The model is put in eval mode (BatchNorm uses its running statistics) for the
  duration and back in train mode afterwards.  Padded examples (``mask == 0``)
  are excluded.  The jitted step is cached per graph definition, so repeated
  evaluations of a model do not recompile.

  Args:
    model: the model (not modified).
    pipeline: the evaluation pipeline; its last batch is padded to full size.
    mesh: optional mesh: each batch is then sharded along ``data`` and the
      model state placed as in training (:func:`state_shardings`; a no-op for
      a trainer's state, which is there already).  Padding stays masked, so
      the sums are those of one device up to float32 summation order.

  Returns:
    ``{"loss": ..., "acc": ..., "count": number of examples}``.

  Raises:
    ValueError: the batch size does not divide along the mesh's ``data`` axis.
  """
  if mesh is not None:
    check_batch_size(pipeline.batch_size, mesh, "evaluation batch size")
  model.eval()
  try:
    graphdef, state = nnx.split(model)
    batches: Iterable[Any] = ((b.image, b.label, b.mask) for b in pipeline.epoch(0))
    if mesh is not None:
      state = jax.device_put(state, state_shardings(state, mesh))
      sharding = batch_sharding(mesh)
      batches = (jax.device_put(batch, sharding) for batch in batches)
    step = _EVAL_STEPS.get(graphdef)
    if step is None:

      def eval_step(state: Any, images: Any, labels: Any, mask: Any) -> Any:
        logits = nnx.merge(graphdef, state)(images)
        loss = jnp.sum(cross_entropy_loss(logits, labels) * mask)
        correct = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
        return loss, correct, jnp.sum(mask)

      step = _EVAL_STEPS[graphdef] = jax.jit(eval_step)
    sums = [step(state, *batch) for batch in batches]
  finally:
    model.train()
  loss, correct, count = (float(sum(np.asarray(s[i]) for s in sums)) for i in range(3))
  return {"loss": loss / count, "acc": correct / count, "count": int(count)}


@dataclasses.dataclass
class EpochStats:
  """Metrics of one epoch, as stored in the history."""

  epoch: int
  train_loss: float
  train_acc: float
  test_loss: float | None
  test_acc: float | None
  lr: float
  nonzero_ratio: float
  nonzero_count: int
  train_seconds: float
  eval_seconds: float
  images_per_s: float
  test_acc_after_cut: float | None = None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class Trainer:
  """Trains an NNX model with an optax transformation, epoch by epoch.

  Args:
    model: the model; it is trained in place (call :meth:`sync` to read it).
    tx: the optax transformation of the ``nnx.Param`` leaves (``optax_gsm.gsm``
      needs ``params`` in ``update``; :func:`make_train_step` passes them).
    lr_schedule: the learning-rate schedule inside ``tx``, for display only.
    nonzero_threshold: see ``ExperimentConfig.nonzero_threshold``.
    num_nonzero: Q shown in the progress bar (``None`` for dense training).
    eval_cut: with ``num_nonzero``, also evaluate the test set after a global
      magnitude cut to Q at every evaluation (``test_acc_after_cut`` in the
      history): the accuracy the prune phase would report if training ended
      there.  It costs one more test pass per epoch and leaves the training
      state untouched.
    name: phase name shown in progress bars.
    mesh: optional mesh (:func:`make_training_mesh`): batches are sharded along
      ``data``, the model and optimizer state as by :func:`state_shardings`,
      and the step is jitted with those shardings.  ``None``: one device.
  """

  def __init__(
    self,
    model: nnx.Module,
    tx: optax.GradientTransformation,
    *,
    lr_schedule: Callable[[int], Any],
    nonzero_threshold: float = 1e-4,
    num_nonzero: int | None = None,
    eval_cut: bool = False,
    name: str = "train",
    mesh: Mesh | None = None,
  ):
    if eval_cut and num_nonzero is None:
      raise ValueError("eval_cut=True needs num_nonzero (the Q to cut to); got num_nonzero=None")
    self.model = model
    self.eval_cut = eval_cut
    self.optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    self.lr_schedule = lr_schedule
    self.nonzero_threshold = float(nonzero_threshold)
    self.num_nonzero = num_nonzero
    self.name = name
    self.mesh = mesh
    self.batch_sharding: NamedSharding | None = None
    model.train()
    self._model_def, model_state = nnx.split(model)
    self._opt_def, opt_state = nnx.split(self.optimizer)
    # The gradient and the update: the functional step every loop shares.
    self._update = make_train_step(self._apply, tx, stateful=True, return_logits=True)
    if mesh is None:
      self.model_state, self.opt_state = _commit(model_state), _commit(opt_state)
      self._train_step = jax.jit(self._step, donate_argnums=(0, 1))
    else:
      self.batch_sharding = batch_sharding(mesh)
      self._model_sh = state_shardings(model_state, mesh)
      self._opt_sh = state_shardings(opt_state, mesh)
      self.model_state = jax.device_put(model_state, self._model_sh)
      self.opt_state = jax.device_put(opt_state, self._opt_sh)
      # Fixed in and out shardings: every step sees the same layouts (one
      # compilation), and the donated buffers are reused in place.
      replicated = NamedSharding(mesh, PartitionSpec())
      self._train_step = jax.jit(
        self._step,
        donate_argnums=(0, 1),
        in_shardings=(self._model_sh, self._opt_sh, self.batch_sharding, self.batch_sharding),
        out_shardings=(self._model_sh, self._opt_sh, replicated),
      )
      # The model and optimizer objects now read the placed copies.
      nnx.update(model, self.model_state)
      nnx.update(self.optimizer, self.opt_state)
    self._stale = False  # whether self.model lags behind the donated state

  # ------------------------------------------------------------------ steps

  def _apply(self, params: Any, rest: Any, images: jax.Array) -> tuple[jax.Array, Any]:
    """``(logits, new rest)``: the model on pure ``nnx.Param`` and other state.

    Merging pure arrays makes fresh Variables at the current trace level, so
    BatchNorm may update its statistics inside the gradient's trace.
    """
    model = nnx.merge(self._model_def, params, rest)
    logits = model(images)
    return logits, nnx.as_pure(nnx.state(model, nnx.Param, ...)[1])

  def _step(
    self, model_state: Any, opt_state: Any, images: jax.Array, labels: jax.Array
  ) -> tuple[Any, Any, dict[str, jax.Array]]:
    """One step on the split state: :func:`make_train_step` between NNX states.

    The model state is split into its ``nnx.Param`` arrays (what ``tx``
    updates, as ``nnx.Optimizer.update`` passes them) and the rest (BatchNorm
    statistics, updated by the forward pass); the optax state comes out of the
    optimizer state.  The results go back into the same ``nnx.State``
    structures, and the step count is incremented as ``nnx.Optimizer.update``
    does, so the checkpointed layout is that of ``nnx.split(model)`` and
    ``nnx.split(optimizer)``.
    """
    params, rest = nnx.split_state(model_state, nnx.Param, ...)
    optimizer = nnx.merge(self._opt_def, opt_state)
    new_params, new_rest, new_opt_state, loss, _, logits = self._update(
      nnx.as_pure(params), nnx.as_pure(rest), nnx.as_pure(optimizer.opt_state), images, labels
    )
    model = nnx.merge(self._model_def, model_state)
    nnx.update(model, new_params, new_rest)
    nnx.update(optimizer.opt_state, nnx.state(new_opt_state))
    optimizer.step[...] += 1
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    return nnx.state(model), nnx.state(optimizer), {"loss": loss, "correct": correct}

  def train_step(self, images: Any, labels: Any) -> dict[str, jax.Array]:
    """One optimisation step on a batch; returns device scalars (no sync)."""
    self.model_state, self.opt_state, metrics = self._train_step(
      self.model_state, self.opt_state, images, labels
    )
    self._stale = True
    return metrics

  def sync(self) -> nnx.Module:
    """Writes the functional state back into ``self.model`` / ``self.optimizer``."""
    if self._stale:
      nnx.update(self.model, self.model_state)
      nnx.update(self.optimizer, self.opt_state)
      self._stale = False
    return self.model

  def load_state(self, model_state: Any, opt_state: Any | None = None) -> None:
    """Replaces the training state (used when restoring checkpoints).

    On a mesh the arrays are placed into the trainer's shardings (a no-op
    for arrays that orbax already restored there).
    """
    if self.mesh is None:
      self.model_state = _commit(model_state)
      if opt_state is not None:
        self.opt_state = _commit(opt_state)
    else:
      self.model_state = jax.device_put(model_state, self._model_sh)
      if opt_state is not None:
        self.opt_state = jax.device_put(opt_state, self._opt_sh)
    self._stale = True
    self.sync()

  @property
  def step(self) -> int:
    """Number of optimisation steps taken so far."""
    return int(nnx.merge(self._opt_def, self.opt_state).step[...])

  def params(self) -> dict[str, Any]:
    """Current parameters as a nested dict (see :func:`param_dict`)."""
    return param_dict(self.sync())

  def evaluate(self, pipeline: Pipeline) -> dict[str, float]:
    """Loss and accuracy over a whole evaluation pipeline (BatchNorm in eval mode)."""
    return evaluate(self.sync(), pipeline, mesh=self.mesh)

  def evaluate_cut(self, pipeline: Pipeline) -> dict[str, float]:
    """Like :meth:`evaluate`, for a copy of the model cut to the ``num_nonzero`` largest |w|."""
    if self.num_nonzero is None:
      raise ValueError("evaluate_cut needs the trainer's num_nonzero; got None")
    model = nnx.clone(self.sync())
    pruned, _ = optax_gsm.magnitude_prune(param_dict(model), num_nonzero=self.num_nonzero)
    set_params(model, pruned)
    return evaluate(model, pipeline, mesh=self.mesh)

  def nonzero(self) -> tuple[int, int]:
    """``(eligible weights with |w| > nonzero_threshold, eligible count)``."""
    params = nnx.to_pure_dict(nnx.filter_state(self.model_state, nnx.Param))
    return nonzero_by_magnitude(params, self.nonzero_threshold)

  def benchmark_step(self, images: Any, labels: Any, *, steps: int = 20) -> dict[str, float]:
    """Seconds per step of the split/merge + ``jax.jit`` step vs ``nnx.jit``.

    Both variants run the same step (:meth:`_step`, i.e. :func:`make_train_step`);
    the ``nnx.jit`` one takes the model and optimizer objects, so the difference
    is the cost of ``nnx.jit`` walking the module graph on every call.  Runs on
    copies of the model and optimizer, so the training state is untouched.  Both
    variants are compiled (and warmed up) before timing.
    """
    self.sync()
    if self.batch_sharding is not None:
      images, labels = jax.device_put((images, labels), self.batch_sharding)
    model = nnx.clone(self.model)
    optimizer = nnx.clone(self.optimizer)

    @nnx.jit
    def nnx_step(model: nnx.Module, optimizer: nnx.Optimizer, x: Any, y: Any) -> Any:
      model_state, opt_state, metrics = self._step(nnx.state(model), nnx.state(optimizer), x, y)
      nnx.update(model, model_state)
      nnx.update(optimizer, opt_state)
      return metrics["loss"]

    # Copies: the fast step donates its inputs, which must not be the buffers
    # that the training state (shared by the clones) still uses.
    ms = _commit(jax.tree.map(jnp.copy, nnx.split(model)[1]))
    os_ = _commit(jax.tree.map(jnp.copy, nnx.split(optimizer)[1]))
    fast = jax.jit(self._step, donate_argnums=(0, 1))
    # Two warm-up calls each: the second call's inputs are the first call's
    # outputs, whose committed-ness may differ and trigger one more compile.
    for _ in range(2):
      ms, os_, m = fast(ms, os_, images, labels)
      jax.block_until_ready(m)
      nnx_step(model, optimizer, images, labels).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(steps):
      ms, os_, m = fast(ms, os_, images, labels)
    jax.block_until_ready(m)
    t1 = time.perf_counter()
    for _ in range(steps):
      loss = nnx_step(model, optimizer, images, labels)
    loss.block_until_ready()
    t2 = time.perf_counter()
    return {"split_merge_jit_s": (t1 - t0) / steps, "nnx_jit_s": (t2 - t1) / steps}

  # ------------------------------------------------------------------ loop

  def fit(
    self,
    train: Pipeline,
    test: Pipeline | None,
    *,
    epochs: int,
    ckpt_dir: str | os.PathLike[str],
    resume: bool = False,
    seed: int = 0,
    config: Mapping[str, Any] | None = None,
    keep_checkpoints: int = 3,
    log_every: int = 50,
    eval_every: int = 1,
    stop_after_epoch: int | None = None,
    progress: bool | None = None,
    on_epoch_end: Callable[[list[dict[str, Any]]], None] | None = None,
  ) -> dict[str, Any]:
    """Trains until ``epochs`` epochs are done, checkpointing after each.

    Args:
      train, test: input pipelines (``test`` may be ``None``).
      epochs: total epochs of the phase.
      ckpt_dir: directory of this phase's checkpoints.
      resume: continue from the latest checkpoint in ``ckpt_dir``.  Without it,
        an existing checkpoint is an error (nothing is silently overwritten).
      seed: the data seed; recorded and checked on resume.
      config: JSON-ready configuration, stored in checkpoints; resuming with a
        different one raises :class:`CheckpointMismatchError`.
      keep_checkpoints: checkpoints to keep.
      log_every: steps between progress-bar refreshes (each syncs the device).
      eval_every: evaluate every this many epochs (and after the last).
      stop_after_epoch: for crash tests: once the checkpoint of this epoch is
        on disk, run half of the next epoch and end the process abruptly with
        ``os._exit(STOP_EXIT_CODE)`` (no clean-up, like a kill).
      progress: show tqdm bars; default: only when stderr is a terminal.
      on_epoch_end: called with the history after each epoch's checkpoint.

    Returns:
      ``{"history": [...], "wall_seconds": ..., "resumed_from": epoch or None,
      "final": {...last epoch...}}``.
    """
    from tqdm.auto import tqdm

    ckpt_dir = Path(ckpt_dir).absolute()
    manager = ocp.CheckpointManager(
      ckpt_dir,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep_checkpoints,
        create=True,
        # Synchronous saves: the checkpoint of epoch e is complete on disk
        # before epoch e + 1 starts (needed by stop_after_epoch and makes
        # "what survives a crash" obvious).  Saving is fast next to an epoch.
        enable_async_checkpointing=False,
        # Remove the temporary folder of a save that a crash interrupted.
        cleanup_tmp_directories=True,
      ),
    )
    history: list[dict[str, Any]] = []
    start_epoch = 0
    wall_before = 0.0
    resumed_from = None
    config = dict(config or {})
    latest = manager.latest_step()
    if latest is not None:
      if not resume:
        manager.close()
        raise FileExistsError(
          f"{ckpt_dir} already holds checkpoints (epoch {latest}); pass --resume "
          f"to continue that run, or choose another --out / delete the folder"
        )

      def check_meta(meta: dict[str, Any]) -> None:
        _check_same_config(meta.get("config", {}), config, ckpt_dir)
        if meta.get("rng", {}).get("data_seed") != seed:
          raise CheckpointMismatchError(
            f"{ckpt_dir} was written with data seed {meta.get('rng', {}).get('data_seed')}, "
            f"not {seed}"
          )

      try:
        restored_step, meta = self._restore(manager, ckpt_dir, check_meta)
      except BaseException:
        manager.close()
        raise
      history = list(meta["history"])
      start_epoch = int(meta["epoch"])
      wall_before = float(meta.get("wall_seconds", 0.0))
      resumed_from = start_epoch
      print(
        f"[{self.name}] resumed from {ckpt_dir / str(restored_step)} (epoch {start_epoch})",
        flush=True,
      )

    show = progress if progress is not None else sys.stderr.isatty()
    if self.mesh is not None:
      check_batch_size(train.batch_size, self.mesh, "training batch size")
    steps = train.steps_per_epoch
    wall_start = time.perf_counter()
    for epoch in range(start_epoch, epochs):
      bar = tqdm(
        total=steps,
        desc=f"{self.name} {epoch + 1}/{epochs}",
        disable=not show,
        leave=False,
        mininterval=0.5,
        dynamic_ncols=True,
      )
      pending: list[dict[str, jax.Array]] = []
      loss_sum, correct_sum, seen = 0.0, 0.0, 0
      stop_at = steps // 2 if stop_after_epoch is not None and epoch == stop_after_epoch else None
      t0 = time.perf_counter()
      batches = prefetch_to_device(train.epoch(epoch), sharding=self.batch_sharding)
      for i, (images, labels) in enumerate(batches):
        if stop_at is not None and i == stop_at:
          _abort(f"[{self.name}] stop_after_epoch={stop_after_epoch}: exiting in epoch {epoch + 1}")
        pending.append(self.train_step(images, labels))
        if len(pending) >= log_every or i == steps - 1:
          got = jax.device_get(pending)
          loss_sum += sum(float(m["loss"]) for m in got) * train.batch_size
          correct_sum += sum(float(m["correct"]) for m in got)
          seen += len(got) * train.batch_size
          bar.update(len(pending))
          pending = []
          if show:
            bar.set_postfix_str(self._postfix(loss_sum / seen, correct_sum / seen))
      bar.close()
      train_seconds = time.perf_counter() - t0
      t1 = time.perf_counter()
      test_metrics = cut_metrics = None
      if test is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
        test_metrics = self.evaluate(test)
        if self.eval_cut:
          cut_metrics = self.evaluate_cut(test)
      eval_seconds = time.perf_counter() - t1
      nz, n = self.nonzero()
      stats = EpochStats(
        epoch=epoch + 1,
        train_loss=loss_sum / max(seen, 1),
        train_acc=correct_sum / max(seen, 1),
        test_loss=None if test_metrics is None else test_metrics["loss"],
        test_acc=None if test_metrics is None else test_metrics["acc"],
        lr=float(self.lr_schedule(max(self.step - 1, 0))),
        nonzero_ratio=nz / n,
        nonzero_count=nz,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        images_per_s=seen / train_seconds if train_seconds > 0 else float("nan"),
        test_acc_after_cut=None if cut_metrics is None else cut_metrics["acc"],
      )
      history.append(stats.to_dict())
      print(self._summary(stats, epochs), flush=True)
      meta = {
        "phase": self.name,
        "epoch": epoch + 1,
        "step": self.step,
        "history": history,
        "config": config,
        "wall_seconds": wall_before + time.perf_counter() - wall_start,
        # Every random choice of an epoch derives from (seed, epoch), so this
        # *is* the complete RNG state of the run at this point.
        "rng": {
          "data_seed": seed,
          "next_epoch": epoch + 1,
          "numpy_bit_generator": epoch_rng(seed, epoch + 1).bit_generator.state,
        },
      }
      self._save(manager, epoch + 1, meta)
      if on_epoch_end is not None:
        on_epoch_end(history)
      if stop_after_epoch is not None and epoch + 1 == stop_after_epoch and epoch + 1 == epochs:
        _abort(f"[{self.name}] stop_after_epoch={stop_after_epoch}: exiting after the last epoch")
    manager.close()
    self.sync()
    return {
      "history": history,
      "wall_seconds": wall_before + time.perf_counter() - wall_start,
      "resumed_from": resumed_from,
      "final": history[-1] if history else {},
      "steps_per_epoch": steps,
    }

  # ------------------------------------------------------------ internals

  def _postfix(self, loss: float, acc: float) -> str:
    nz, n = self.nonzero()
    text = (
      f"loss={loss:.4f} acc={100 * acc:.2f}% lr={float(self.lr_schedule(max(self.step - 1, 0))):.2e} "
      f"nz(|w|>{self.nonzero_threshold:g})={100 * nz / n:.2f}%"
    )
    if self.num_nonzero is not None:
      text += f" Q={self.num_nonzero} ({100 * self.num_nonzero / n:.2f}%)"
    return text

  def _summary(self, s: EpochStats, epochs: int) -> str:
    test = (
      "" if s.test_acc is None else f" test_loss={s.test_loss:.4f} test_acc={100 * s.test_acc:.2f}%"
    )
    q = "" if self.num_nonzero is None else f" Q={self.num_nonzero}"
    if s.test_acc_after_cut is not None:
      test += f" after_cut={100 * s.test_acc_after_cut:.2f}%"
    return (
      f"[{self.name}] epoch {s.epoch}/{epochs} loss={s.train_loss:.4f} "
      f"acc={100 * s.train_acc:.2f}%{test} lr={s.lr:.2e} "
      f"nz(|w|>{self.nonzero_threshold:g})={100 * s.nonzero_ratio:.3f}%{q} "
      f"{s.images_per_s:.0f} img/s"
    )

  def _save(self, manager: ocp.CheckpointManager, step: int, meta: dict[str, Any]) -> None:
    meta = {**meta, "integrity": INTEGRITY_FORMAT}
    integrity = {
      "format": INTEGRITY_FORMAT,
      "epoch": int(step),
      "step": int(meta["step"]),
      "sha256": {
        "model": tree_sha256(self.model_state),
        "optimizer": tree_sha256(self.opt_state),
        "meta": meta_sha256(meta),
      },
    }
    manager.save(
      step,
      args=ocp.args.Composite(
        model=ocp.args.StandardSave(self.model_state),
        optimizer=ocp.args.StandardSave(self.opt_state),
        meta=ocp.args.JsonSave(meta),
        integrity=ocp.args.JsonSave(integrity),
      ),
    )
    manager.wait_until_finished()

  def _restore(
    self,
    manager: ocp.CheckpointManager,
    ckpt_dir: Path,
    check_meta: Callable[[dict[str, Any]], None] | None = None,
  ) -> tuple[int, dict[str, Any]]:
    """Restores the newest checkpoint that verifies; moves newer, corrupt ones aside.

    Args:
      manager: the phase's checkpoint manager.
      ckpt_dir: its directory.
      check_meta: called with each candidate's verified meta before its
        arrays are read (configuration checks; its errors propagate).

    Returns:
      ``(step, meta)`` of the restored checkpoint.

    Raises:
      CheckpointCorruptError: no checkpoint verifies.
    """
    failures: list[str] = []
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        meta = _verified_meta(manager, ckpt_dir, step, self.name)
        if check_meta is not None:
          check_meta(meta)
        restored = _verified_arrays(
          manager,
          ckpt_dir,
          step,
          meta,
          {"model": _abstract(self.model_state), "optimizer": _abstract(self.opt_state)},
        )
        if "step" in meta and int(
          np.asarray(nnx.merge(self._opt_def, restored["optimizer"]).step[...])
        ) != int(meta["step"]):
          raise _StepUnusable(
            f"its optimizer step count differs from the step {meta['step']} recorded in its meta"
          )
      except _StepUnusable as e:
        failures.append(f"step {step}: {e}")
        print(
          f"[{self.name}] warning: checkpoint {ckpt_dir / str(step)} is unusable: {e}", flush=True
        )
        continue
      self.load_state(restored["model"], restored["optimizer"])
      newer = [s for s in manager.all_steps() if s > step]
      if newer:
        for s in sorted(newer):
          where = _move_aside(ckpt_dir, s)
          print(
            f"[{self.name}] moved the unusable checkpoint {ckpt_dir / str(s)} to {where}; "
            f"continuing from step {step}",
            flush=True,
          )
        manager.reload()
      return step, meta
    raise CheckpointCorruptError(
      f"no intact checkpoint in {ckpt_dir}: "
      + "; ".join(failures)
      + ". Nothing was changed; move the folder away to start this phase over"
    )


def prefetch_to_device(
  batches: Iterable[Any], size: int = 2, *, sharding: NamedSharding | None = None
) -> Iterator[tuple[jax.Array, jax.Array]]:
  """Yields ``(images, labels)`` already on the device, ``size`` batches ahead.

  ``jax.device_put`` is asynchronous, so the copy of the next batches overlaps
  the running step instead of delaying its start (matters on accelerators).

  Args:
    batches: an iterable of :class:`experiments.data.Batch`.
    size: how many batches to keep in flight.
    sharding: where to put each array (e.g. :func:`batch_sharding`); default the
      default device.
  """
  queue: collections.deque[tuple[jax.Array, jax.Array]] = collections.deque()
  for batch in batches:
    if sharding is None:
      queue.append(jax.device_put((batch.image, batch.label)))
    else:
      queue.append(jax.device_put((batch.image, batch.label), sharding))
    if len(queue) >= size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def _commit(tree: Any) -> Any:
  """Commits every array to its current sharding.

  ``jax.jit`` keys its cache on whether inputs are committed to a device.  Fresh
  scalars such as ``nnx.Optimizer.step`` are uncommitted while the step's outputs
  (and orbax-restored arrays) are committed, so without this the first two steps
  compiled the train step twice (~5 s of CPU time for LeNet-300 with GSM).
  """
  return jax.tree.map(lambda x: jax.device_put(x, x.sharding), tree)


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing ``tree``, as restore targets."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
    tree,
  )


_COSMETIC_KEYS = {"log_every", "keep_checkpoints", "description", "quick", "paper"}


def _check_same_config(saved: Mapping[str, Any], current: Mapping[str, Any], where: Path) -> None:
  """Raises when a resumed run's configuration differs from the checkpoint's."""
  if not saved or not current:
    return
  diffs = [
    k
    for k in sorted(set(saved) | set(current))
    if k not in _COSMETIC_KEYS and saved.get(k) != current.get(k)
  ]
  if diffs:
    lines = [f"  {k}: checkpoint {saved.get(k)!r} != now {current.get(k)!r}" for k in diffs]
    raise CheckpointMismatchError(
      f"cannot resume from {where}: the configuration differs:\n" + "\n".join(lines)
    )


def _abort(message: str) -> None:
  """Ends the process immediately, like a crash: no atexit, no buffers beyond ours."""
  print(message, flush=True)
  sys.stderr.flush()
  os._exit(STOP_EXIT_CODE)


def tree_sha256(tree: Any) -> str:
  """sha256 of a pytree's arrays: dtype, shape and bytes of every leaf, in leaf order.

  Computed from host numpy copies (``jax.device_get``), so a sharded global
  array and its restored copy on another mesh hash alike.
  """
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    h.update(f"{a.dtype.str}{a.shape};".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def meta_sha256(meta: Mapping[str, Any]) -> str:
  """sha256 of a checkpoint's meta dict as JSON (keys sorted; tuples as lists)."""
  canonical = json.loads(json.dumps(meta))
  return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def _verified_meta(
  manager: ocp.CheckpointManager, ckpt_dir: Path, step: int, name: str
) -> dict[str, Any]:
  """The ``meta`` of checkpoint ``step`` after its JSON checks.

  Checks that ``meta`` (and ``integrity``) can be read, that the epoch stored
  in ``meta`` (and in ``integrity``) is ``step``, and that ``meta`` matches its
  sha256.  A checkpoint written before checksums existed (no ``integrity``
  item and no ``meta["integrity"]``) passes with a note.

  Raises:
    _StepUnusable: what failed.
  """
  step_dir = ckpt_dir / str(step)
  has_integrity = (step_dir / "integrity").exists()
  items = {"meta": ocp.args.JsonRestore()}
  if has_integrity:
    items["integrity"] = ocp.args.JsonRestore()
  try:
    got = manager.restore(step, args=ocp.args.Composite(**items))
    meta = dict(got["meta"])
  except Exception as e:  # orbax raises many types for a missing or torn item
    raise _StepUnusable(
      f"its meta data cannot be read ({type(e).__name__}: {_first_line(e)})"
    ) from None
  if meta.get("epoch") != step:
    raise _StepUnusable(f"its meta records epoch {meta.get('epoch')!r}, not its step {step}")
  if not has_integrity:
    if meta.get("integrity"):
      raise _StepUnusable("its 'integrity' item (the checksums) is missing")
    print(
      f"[{name}] note: checkpoint {step_dir} predates checksums; its arrays are not verified",
      flush=True,
    )
    return meta
  integrity = got["integrity"]
  try:
    if integrity["format"] != INTEGRITY_FORMAT:
      raise _StepUnusable(f"its checksums have the unknown format {integrity['format']!r}")
    if integrity["epoch"] != step or integrity["step"] != meta.get("step"):
      raise _StepUnusable(
        f"its checksums are of epoch {integrity['epoch']} / step {integrity['step']}, but it is "
        f"step {step} and its meta records step {meta.get('step')!r}"
      )
    want = integrity["sha256"]["meta"]
  except (KeyError, TypeError) as e:
    raise _StepUnusable(f"its 'integrity' item is malformed ({type(e).__name__}: {e})") from None
  got_sha = meta_sha256(meta)
  if got_sha != want:
    raise _StepUnusable(
      f"its meta does not match its sha256 (stored {want[:12]}, read {got_sha[:12]})"
    )
  return meta


def _verified_arrays(
  manager: ocp.CheckpointManager,
  ckpt_dir: Path,
  step: int,
  meta: Mapping[str, Any],
  targets: Mapping[str, Any],
) -> dict[str, Any]:
  """Restores the array items ``targets`` (name -> abstract tree) of ``step`` and verifies them.

  Raises:
    _StepUnusable: an item cannot be read or does not match its sha256.
  """
  step_dir = ckpt_dir / str(step)
  for item in targets:
    if not (step_dir / item).is_dir():
      raise _StepUnusable(f"its {item!r} item is missing")
  try:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(**{item: ocp.args.StandardRestore(t) for item, t in targets.items()}),
    )
  except Exception as e:  # corrupt data, metadata or a missing file inside an item
    raise _StepUnusable(
      f"its {'/'.join(targets)} data cannot be read ({type(e).__name__}: {_first_line(e)})"
    ) from None
  if meta.get("integrity"):
    integrity = manager.restore(step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore()))[
      "integrity"
    ]
    for item in targets:
      want = integrity.get("sha256", {}).get(item)
      got = tree_sha256(restored[item])
      if want != got:
        raise _StepUnusable(
          f"its {item!r} arrays do not match their sha256 (stored {str(want)[:12]}, read {got[:12]})"
        )
  return dict(restored)


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0][:300] if text else ""


def _move_aside(ckpt_dir: Path, step: int) -> Path:
  """Moves checkpoint ``step`` out of ``ckpt_dir`` into ``<ckpt_dir>.corrupt/`` (never deletes)."""
  graveyard = ckpt_dir.parent / f"{ckpt_dir.name}.corrupt"
  graveyard.mkdir(parents=True, exist_ok=True)
  target, n = graveyard / str(step), 1
  while target.exists():
    n += 1
    target = graveyard / f"{step}-{n}"
  shutil.move(str(ckpt_dir / str(step)), str(target))
  return target


def restore_model_state(
  ckpt_dir: str | os.PathLike[str], model: nnx.Module, *, step: int | None = None
) -> dict[str, Any]:
  """Loads the ``model`` item of a phase checkpoint into ``model``, verified.

  The model arrays and the meta are checked against the checkpoint's
  checksums (see the module docstring).  Without ``step``, a latest
  checkpoint that does not verify is reported and the newest one that does
  is loaded (its ``meta["epoch"]`` says which).

  Args:
    ckpt_dir: a phase checkpoint directory written by :meth:`Trainer.fit`.
    model: a model of the same architecture; updated in place.
    step: which checkpoint (epochs done); default the newest intact one.

  Returns:
    The checkpoint's ``meta`` dict.

  Raises:
    FileNotFoundError: no checkpoint in ``ckpt_dir``.
    CheckpointCorruptError: no checkpoint verifies, or ``step`` does not.
  """
  ckpt_dir = Path(ckpt_dir).absolute()
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f"no checkpoint directory {ckpt_dir}")
  with ocp.CheckpointManager(
    ckpt_dir, options=ocp.CheckpointManagerOptions(create=False)
  ) as manager:
    steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    if not steps or (step is not None and step not in manager.all_steps()):
      raise FileNotFoundError(
        f"no checkpoint{'' if step is None else f' of step {step}'} in {ckpt_dir}"
      )
    _, state = nnx.split(model)
    failures = []
    for s in steps:
      try:
        meta = _verified_meta(manager, ckpt_dir, s, "restore")
        restored = _verified_arrays(manager, ckpt_dir, s, meta, {"model": _abstract(state)})
      except _StepUnusable as e:
        failures.append(f"step {s}: {e}")
        print(f"[restore] warning: checkpoint {ckpt_dir / str(s)} is unusable: {e}", flush=True)
        continue
      nnx.update(model, restored["model"])
      return meta
  raise CheckpointCorruptError(f"no intact checkpoint in {ckpt_dir}: " + "; ".join(failures))


def checkpoint_epoch(ckpt_dir: str | os.PathLike[str]) -> int | None:
  """Epochs done by the newest checkpoint in ``ckpt_dir`` whose meta verifies.

  A newer checkpoint whose meta cannot be read, records another epoch than its
  step or does not match its checksum is reported and skipped (its arrays are
  verified when they are restored, by :func:`restore_model_state`).

  Returns:
    The epoch, or ``None`` when there is no checkpoint at all.

  Raises:
    CheckpointCorruptError: there are checkpoints but none verifies.
  """
  ckpt_dir = Path(ckpt_dir).absolute()
  if not ckpt_dir.is_dir():
    return None
  with ocp.CheckpointManager(
    ckpt_dir, options=ocp.CheckpointManagerOptions(create=False)
  ) as manager:
    failures = []
    steps = sorted(manager.all_steps(), reverse=True)
    for s in steps:
      try:
        _verified_meta(manager, ckpt_dir, s, "restore")
      except _StepUnusable as e:
        failures.append(f"step {s}: {e}")
        print(f"[restore] warning: checkpoint {ckpt_dir / str(s)} is unusable: {e}", flush=True)
        continue
      return s
  if not steps:
    return None
  raise CheckpointCorruptError(f"no intact checkpoint in {ckpt_dir}: " + "; ".join(failures))


def make_base_tx(
  schedule: optax.Schedule, *, momentum: float, weight_decay: float
) -> optax.GradientTransformation:
  """Dense base training: momentum SGD with weight decay on the kernels only.

  ``add_decayed_weights`` before ``sgd`` gives PyTorch's ``SGD(weight_decay=...)``
  update ``v <- m v + (g + wd w); w <- w - lr v``.  The decay mask is the GSM
  eligibility rule, matching the reference code's ``weight_decay_bias=0``.
  """
  return optax.chain(
    optax.add_decayed_weights(weight_decay, mask=optax_gsm.default_where),
    optax.sgd(schedule, momentum=momentum),
  )


def make_gsm_tx(
  schedule: optax.Schedule,
  *,
  num_nonzero: int | None = None,
  momentum: float,
  weight_decay: float,
  **kwargs: Any,
) -> optax.GradientTransformation:
  """GSM: ``optax_gsm.gsm(schedule, num_nonzero=Q, ...)``.

  ``kwargs`` go to ``optax_gsm.gsm`` (a config's ``gsm_rule(steps_per_epoch)``
  gives the rule's); for a budget instead of Q, pass
  ``num_nonzero=None, budget=B, costs=cost_tree`` (e.g. the FLOPs costs of
  :func:`experiments.flops.flops_cost_tree`; see :mod:`experiments.budget_gsm`).
  """
  return optax_gsm.gsm(
    schedule, num_nonzero=num_nonzero, momentum=momentum, weight_decay=weight_decay, **kwargs
  )


def magnitude_histogram(params: Any, *, bins: np.ndarray | None = None) -> dict[str, Any]:
  """Histogram of log10|w| over the eligible weights (exact zeros counted apart).

  Returns:
    ``{"edges": log-spaced bin edges, "counts": [...], "zeros": int,
    "min_nonzero": float, "max": float}``.
  """
  flags = optax_gsm.default_where(params)
  values = np.concatenate(
    [
      np.abs(np.asarray(leaf, np.float64)).ravel()
      for leaf, flag in zip(jax.tree.leaves(params), jax.tree.leaves(flags))
      if flag
    ]
  )
  nonzero = values[values > 0]
  if bins is None:
    lo = math.floor(np.log10(nonzero.min())) if nonzero.size else -8
    hi = math.ceil(np.log10(values.max())) if nonzero.size else 0
    bins = np.logspace(lo, hi, 8 * (hi - lo) + 1)
  counts, edges = np.histogram(nonzero, bins=bins)
  return {
    "edges": edges.tolist(),
    "counts": counts.tolist(),
    "zeros": int(values.size - nonzero.size),
    "min_nonzero": float(nonzero.min()) if nonzero.size else 0.0,
    "max": float(values.max()) if values.size else 0.0,
  }


def qth_largest_magnitude(params: Any, q: int) -> float:
  """The Q-th largest |w| among eligible weights: the magnitude-pruning threshold."""
  flags = optax_gsm.default_where(params)
  values = np.concatenate(
    [
      np.abs(np.asarray(leaf)).ravel()
      for leaf, flag in zip(jax.tree.leaves(params), jax.tree.leaves(flags))
      if flag
    ]
  )
  q = int(min(max(q, 1), values.size))
  return float(np.partition(values, values.size - q)[values.size - q])
