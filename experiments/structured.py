r"""Structured pruning experiments: Taylor, Fisher and AutoPrune on NNX models.

Three procedures, built on :mod:`optax_gsm.structured`:

* **Taylor feature-map pruning** (Molchanov et al., ICLR 2017;
  ``criterion="taylor"``) and its gate variant (Molchanov et al., CVPR 2019;
  ``criterion="taylor_gate"``), and **Fisher pruning** (Theis et al. 2018;
  ``criterion="fisher"``), all by :func:`greedy_prune`: fine-tune a few
  updates while accumulating per-example gate gradients, remove the globally
  lowest-ranked feature map (its gate goes to 0), repeat until each FLOPs (or
  parameter) target is met; then fine-tune a snapshot at each target and cut
  the removed channels out for real (:func:`remove_channels`).
* **AutoPrune** (Xiao et al., NeurIPS 2019) by :func:`autoprune`:
  unstructured (one mask parameter per weight) or structured (one per
  neuron / filter), with the Softplus, LeakyReLU or linear straight-through
  estimate.
* :func:`gsm_baseline`: GSM (``optax_gsm.gsm``) at a given number of
  non-zero weights, for comparison.

Gates.  A gate multiplies the output of a layer's last linear or
normalisation op (``conv1``/``conv2``/``fc1`` of LeNet-5, the BatchNorm of
each VGG block, ``bn1`` of each ResNet basic block), before its ReLU. A gate
of 0 therefore makes the next layer see exact zeros, the same as removing
the channel, and a gate of 1 gives
:math:`\gamma \partial L/\partial\gamma = \sum_m z \, \partial L/\partial z =
\sum_m a \, \partial L/\partial a` for the post-ReLU map :math:`a =
\mathrm{relu}(z)` (they differ only where :math:`z \le 0`, where
:math:`a = 0`). Gates are inserted without editing the model classes: while a
gated forward pass is traced, ``__call__`` of ``nnx.Conv``, ``nnx.Linear`` and
``nnx.BatchNorm`` is wrapped to multiply the output of the gated module
instances (as :mod:`experiments.flops` records shapes). This is not thread
safe against other code patching those classes at the same time.

Per-example gate gradients come from one backward pass with gates of shape
``(N, C)``. For models without BatchNorm in training mode this equals the
per-example gradient of each example's own loss (:func:`per_example_gate_grads`
checks it against ``jax.vmap``); with BatchNorm in training mode it is the
gradient of the batch loss with respect to each example's map, which is what
hooks on activations compute in the reference implementations.

Surgery.  :func:`remove_channels` returns a physically smaller copy of the
model (same classes, fewer channels: slices of the producing layers' output
axis, BatchNorm parameters and statistics, and the consuming layers' input
axis, through a flatten for LeNet-5's ``fc1``); its outputs equal the gated
model's. :func:`count_structure` reports MACs and parameters of a gated model
analytically; for a sliced model it agrees with
:func:`experiments.flops.dense_macs` and
:func:`experiments.models.param_counts`.

Command line (results go to ``runs/structured/``, git-ignored, unless ``--out``
names a JSON file; its folder's lock file ``.<name>.lock`` is held while the
command runs, see :func:`experiments.fileio.lock_output`)::

  python -m experiments.structured pretrain --model lenet5
  python -m experiments.structured taylor --model lenet5
  python -m experiments.structured fisher --model lenet5
  python -m experiments.structured autoprune --model lenet5 --ste softplus
  python -m experiments.structured gsm --model lenet5 --num-nonzero 1400
  python -m experiments.structured taylor --model vgg_small --dataset cifar10 --mock 64
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_gsm
from optax_gsm import structured as st
from optax_gsm.selection import scores_to_keys
from experiments import flops as flops_lib
from experiments.data import DATASETS
from experiments.fileio import atomic_write_text, lock_output, run_command
from experiments.models import get_model, param_counts
from experiments.models.lenet import LeNet5, LeNet300100
from experiments.models.resnet import CifarResNet
from experiments.models.vgg import VGGCifar

ModulePath = tuple[Any, ...]
PyTree = Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "runs" / "structured"
# The models :func:`build_model` and :func:`plan_for` support.
MODEL_NAMES = ("lenet5", "lenet_300_100", "vgg_small", "vgg_cifar", "resnet56",
               "resnet8")
WORK_DIR_ENV = "OPTAX_GSM_STRUCTURED_WORK"
CRITERIA = ("taylor", "taylor_gate", "fisher")

# A small VGG-like CIFAR net (CI-sized; the registry default is 1.1M weights).
VGG_SMALL_LAYOUT = (16, 16, "M", 32, 32, "M", 64, "M")


# --------------------------------------------------------------------------
# Structure plans: which channels can go and which tensors they live in.


@dataclasses.dataclass(frozen=True)
class Site:
  """A prunable set of channels.

  Attributes:
    name: the layer name used in gates, scores and widths (``"conv1"``,
      ``"convs.3"``, ``"blocks.10"``).
    gate_module: path of the module whose output the gate multiplies.
    producers: modules whose output axis (the last axis of every parameter
      and BatchNorm statistic) holds these channels.
    consumers: ``(module path, spatial)`` of the modules that read them; the
      input axis of the kernel is sliced, in blocks of ``spatial`` positions
      for a dense layer after a flatten (NHWC flatten: index ``s * C + c``).
  """
  name: str
  gate_module: ModulePath
  producers: tuple[ModulePath, ...]
  consumers: tuple[tuple[ModulePath, int], ...]


@dataclasses.dataclass(frozen=True)
class Plan:
  """The prunable sites of a model and the shape of one input example."""
  sites: tuple[Site, ...]
  input_shape: tuple[int, int, int]

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(s.name for s in self.sites)


def module_at(model: nnx.Module, path: ModulePath) -> Any:
  """The sub-module at ``path`` (attribute names and list indices)."""
  node = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def plan_for(model: nnx.Module,
             input_shape: Sequence[int] | None = None) -> Plan:
  """The structure plan of a supported model.

  Supported: :class:`~experiments.models.lenet.LeNet5` (sites ``conv1``,
  ``conv2``, ``fc1``), ``LeNet300100`` (``fc1``, ``fc2``),
  :class:`~experiments.models.vgg.VGGCifar` (every conv block) and
  :class:`~experiments.models.resnet.CifarResNet` (the inner channels of
  every basic block: ``conv1``'s output, read by ``conv2``; the block outputs
  are tied by the residual sums and stay).

  Args:
    model: the model.
    input_shape: ``(H, W, C)`` of one example; default: the model's usual.

  Raises:
    TypeError: for other model classes.
  """
  if isinstance(model, LeNet5):
    spatial = model.fc1.in_features // model.conv2.out_features
    sites = (
        Site("conv1", ("conv1",), (("conv1",),), ((("conv2",), 1),)),
        Site("conv2", ("conv2",), (("conv2",),), ((("fc1",), spatial),)),
        Site("fc1", ("fc1",), (("fc1",),), ((("fc2",), 1),)),
    )
    default = (28, 28, model.conv1.in_features)
  elif isinstance(model, LeNet300100):
    sites = (Site("fc1", ("fc1",), (("fc1",),), ((("fc2",), 1),)),
             Site("fc2", ("fc2",), (("fc2",),), ((("fc3",), 1),)))
    default = (28, 28, 1)
  elif isinstance(model, VGGCifar):
    n = len(model.convs)
    sites = []
    for i in range(n):
      nxt = (("convs", i + 1, "conv"), 1) if i + 1 < n else (("fc",), 1)
      sites.append(Site(f"convs.{i}", ("convs", i, "bn"),
                        (("convs", i, "conv"), ("convs", i, "bn")), (nxt,)))
    sites = tuple(sites)
    default = (32, 32, model.convs[0].conv.in_features)
  elif isinstance(model, CifarResNet):
    sites = tuple(
        Site(f"blocks.{i}", ("blocks", i, "bn1"),
             (("blocks", i, "conv1"), ("blocks", i, "bn1")),
             ((("blocks", i, "conv2"), 1),))
        for i in range(len(model.blocks)))
    default = (32, 32, 3)
  else:
    raise TypeError(
        f"No structure plan for {type(model).__name__}; supported: LeNet5, "
        "LeNet300100, VGGCifar, CifarResNet.")
  shape = tuple(int(d) for d in (input_shape or default))
  if len(shape) != 3:
    raise ValueError(f"`input_shape` must be (H, W, C), got {input_shape!r}.")
  return Plan(sites, shape)


def _out_features(module: Any) -> int:
  if isinstance(module, nnx.BatchNorm):
    return int(module.num_features)
  return int(module.out_features)


def site_widths(model: nnx.Module, plan: Plan) -> dict[str, int]:
  """Channels per site of the (unsliced) model."""
  return {s.name: _out_features(module_at(model, s.gate_module))
          for s in plan.sites}


# --------------------------------------------------------------------------
# Gated forward passes.

_GATED_CLASSES = (nnx.Conv, nnx.Linear, nnx.BatchNorm)
_ACTIVE: dict[int, Any] = {}       # id(module) -> gate array (or None)
_RECORD: dict[int, tuple] = {}     # id(module) -> output shape
_PATCH = {"depth": 0, "originals": {}}


def _install_patch() -> None:
  if _PATCH["depth"] == 0:
    originals = {cls: cls.__dict__["__call__"] for cls in _GATED_CLASSES}

    def wrap(original):
      def __call__(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        key = id(self)
        if key in _ACTIVE:
          _RECORD[key] = tuple(out.shape)
          gate = _ACTIVE[key]
          if gate is not None:
            out = st.apply_gate(out, gate)
        return out
      return __call__

    for cls, original in originals.items():
      cls.__call__ = wrap(original)
    _PATCH["originals"] = originals
  _PATCH["depth"] += 1


def _remove_patch() -> None:
  _PATCH["depth"] -= 1
  if _PATCH["depth"] == 0:
    for cls, original in _PATCH["originals"].items():
      cls.__call__ = original
    _PATCH["originals"] = {}


@contextlib.contextmanager
def gates_on(model: nnx.Module, plan: Plan,
             gates: Mapping[str, Any] | None) -> Iterator[dict[str, tuple]]:
  """Multiplies the gated modules' outputs by ``gates`` inside the block.

  Args:
    model: the (merged) model that will be called.
    plan: its structure plan.
    gates: site name -> gate ``(C,)`` or ``(N, C)``; missing sites are not
      gated (their output shapes are still recorded).

  Yields:
    A dict filled, after the call, with site name -> output shape.
  """
  ids = {}
  for s in plan.sites:
    module = module_at(model, s.gate_module)
    ids[s.name] = id(module)
    _ACTIVE[id(module)] = None if gates is None else gates.get(s.name)
  shapes: dict[str, tuple] = {}
  _install_patch()
  try:
    yield shapes
  finally:
    _remove_patch()
    for name, key in ids.items():
      if key in _RECORD:
        shapes[name] = _RECORD.pop(key)
      _ACTIVE.pop(key, None)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


class GatedModel:
  """A pure-function view of an NNX model with channel gates.

  ``params`` are a nested dict (``nnx.to_pure_dict`` of the ``nnx.Param``
  state; optax-ready), ``rest`` the other state (BatchNorm statistics).

  Args:
    model: a model supported by :func:`plan_for`; it is left in train mode.
    plan: its plan (default :func:`plan_for`).
  """

  def __init__(self, model: nnx.Module, plan: Plan | None = None):
    self.plan = plan or plan_for(model)
    model.eval()
    self._eval_def = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    self._train_def, params, self.rest = nnx.split(model, nnx.Param, ...)
    self._template = params
    self.params = nnx.to_pure_dict(params)
    self.widths = site_widths(model, self.plan)
    self.has_batch_stats = bool(jax.tree.leaves(self.rest))
    x = jax.ShapeDtypeStruct((1,) + self.plan.input_shape, jnp.float32)
    shapes = {}

    def trace(params, rest, x):
      m = self._merge(params, rest, train=False)
      with gates_on(m, self.plan, None) as recorded:
        out = m(x)
      shapes.update(recorded)
      return out

    jax.eval_shape(trace, self.params, self.rest, x)
    # M of Molchanov et al. (2017): positions per map of each site.
    self.spatial = {k: int(np.prod(v[1:-1], dtype=np.int64))
                    for k, v in shapes.items()}

  def _merge(self, params: PyTree, rest: Any, *, train: bool) -> nnx.Module:
    state = jax.tree.map(lambda x: x, self._template)
    nnx.replace_by_pure_dict(state, params)
    # Fresh Variables at the current trace level: BatchNorm mutates its
    # statistics, which NNX forbids on Variables made at an outer level
    # (e.g. ``rest`` passed into a jit and used inside a grad).
    rest = jax.tree.map(lambda x: x, rest)
    return nnx.merge(self._train_def if train else self._eval_def, state, rest)

  def apply(self, params: PyTree, rest: Any, x: jax.Array,
            gates: Mapping[str, Any] | None = None, *,
            train: bool = True) -> tuple[jax.Array, Any]:
    """``(logits, new rest)`` of the gated model (pure, jit-able)."""
    m = self._merge(params, rest, train=train)
    with gates_on(m, self.plan, gates):
      logits = m(x)
    return logits, nnx.split(m, nnx.Param, ...)[2]

  def to_model(self, params: PyTree | None = None,
               rest: Any = None) -> nnx.Module:
    """A new NNX model holding ``params`` and ``rest`` (train mode)."""
    params = self.params if params is None else params
    rest = self.rest if rest is None else rest
    return self._merge(params, rest, train=True)


def per_example_gate_grads(gm: GatedModel, params: PyTree, rest: Any,
                           x: jax.Array, y: jax.Array,
                           gate_values: Mapping[str, jax.Array] | None = None,
                           *, method: str = "batched",
                           train: bool = False) -> dict:
  r""":math:`\partial L_n / \partial \gamma_{nk}` for each example and map.

  Args:
    gm: the gated model.
    params, rest: its state.
    x, y: a batch.
    gate_values: site -> gate values ``(C,)`` (default: ones).
    method: ``"batched"`` (one backward pass of the summed loss with gates
      ``(N, C)``) or ``"vmap"`` (``jax.vmap`` of the gradient of each
      example's loss; BatchNorm must then be in eval mode).
    train: BatchNorm mode for ``"batched"``.

  Returns:
    Site -> ``(N, C)``.
  """
  if method not in ("batched", "vmap"):
    raise ValueError(f"`method` must be 'batched' or 'vmap', got {method!r}.")
  vals = gate_values or {k: jnp.ones((c,), jnp.float32)
                         for k, c in gm.widths.items()}
  n = x.shape[0]
  if method == "batched":
    gates = {k: jnp.broadcast_to(v, (n,) + v.shape) for k, v in vals.items()}

    def total(gates):
      logits, _ = gm.apply(params, rest, x, gates, train=train)
      return jnp.sum(cross_entropy(logits, y))
    return jax.grad(total)(gates)
  if train and gm.has_batch_stats:
    raise ValueError("method='vmap' needs BatchNorm in eval mode (train=False):"
                     " a batch of one has no batch statistics.")

  def single(xi, yi):
    def loss(gates):
      logits, _ = gm.apply(params, rest, xi[None], gates, train=False)
      return cross_entropy(logits, yi[None])[0]
    return jax.grad(loss)(dict(vals))
  return jax.vmap(single)(x, y)


# --------------------------------------------------------------------------
# Counting MACs and parameters, with channels gated off or sliced away.


@dataclasses.dataclass(frozen=True)
class _Layer:
  path: ModulePath
  kind: str            # "conv", "dense", "bn" or "other"
  uses: int            # kernel-entry uses per example (MACs per entry)
  ksize: int           # prod(kernel spatial dims)
  cin: int
  cout: int
  has_bias: bool
  in_site: str | None
  in_mult: int
  out_site: str | None
  other_params: int = 0


def _layers(model: nnx.Module, plan: Plan) -> list[_Layer]:
  uses = flops_lib.kernel_uses(model, (1,) + plan.input_shape)
  in_site, out_site = {}, {}
  for s in plan.sites:
    for p in s.producers:
      out_site[tuple(p)] = s.name
    for p, mult in s.consumers:
      in_site[tuple(p)] = (s.name, mult)
  layers = []
  for path, node in nnx.iter_graph(model):
    path = tuple(path)
    if isinstance(node, (nnx.Conv, nnx.Linear)):
      k = node.kernel[...].shape
      isite, mult = in_site.get(path, (None, 1))
      layers.append(_Layer(path, "conv" if isinstance(node, nnx.Conv)
                           else "dense", uses[path],
                           int(np.prod(k[:-2], dtype=np.int64)), k[-2], k[-1],
                           node.bias is not None, isite, mult,
                           out_site.get(path)))
    elif isinstance(node, nnx.BatchNorm):
      n_par = int(node.scale is not None) + int(node.bias is not None)
      layers.append(_Layer(path, "bn", 0, 0, 0, int(node.num_features), False,
                           None, 1, out_site.get(path), n_par))
  return layers


class StructureCounter:
  """MACs and parameters of a model as a function of the alive channels.

  MACs are those of the Conv / Linear kernels per example (as
  :func:`experiments.flops.dense_macs`); parameters are all ``nnx.Param``
  entries (as ``param_counts(model)["total"]``).

  Args:
    model: the full (unsliced) model.
    plan: its plan.
  """

  def __init__(self, model: nnx.Module, plan: Plan | None = None):
    self.plan = plan or plan_for(model)
    self.layers = _layers(model, self.plan)
    self.widths = site_widths(model, self.plan)
    full = {k: np.ones(c, bool) for k, c in self.widths.items()}
    counted = self._count(full)[1]
    # Params outside the counted layers (none in the supported models).
    self._extra = param_counts(model)["total"] - counted
    self.dense_macs, self.dense_params = self.count(full)

  def _alive_n(self, alive, site, default):
    return int(np.sum(alive[site])) if site is not None else default

  def _count(self, alive: Mapping[str, Any]) -> tuple[int, int]:
    macs = params = 0
    for l in self.layers:
      cout = self._alive_n(alive, l.out_site, l.cout)
      if l.kind == "bn":
        params += l.other_params * cout
        continue
      cin = (self._alive_n(alive, l.in_site, 0) * l.in_mult
             if l.in_site is not None else l.cin)
      macs += l.uses * l.ksize * cin * cout
      params += l.ksize * cin * cout + (cout if l.has_bias else 0)
    return macs, params

  def count(self, alive: Mapping[str, Any]) -> tuple[int, int]:
    """``(MACs per example, parameters)`` with only ``alive`` channels."""
    macs, params = self._count(alive)
    return macs, params + getattr(self, "_extra", 0)

  def removal_macs(self, alive: Mapping[str, Any]) -> dict[str, int]:
    """MACs saved by removing one more channel, per site."""
    saved = {k: 0 for k in self.widths}
    for l in self.layers:
      if l.kind == "bn":
        continue
      cin = (self._alive_n(alive, l.in_site, 0) * l.in_mult
             if l.in_site is not None else l.cin)
      cout = self._alive_n(alive, l.out_site, l.cout)
      if l.out_site is not None:
        saved[l.out_site] += l.uses * l.ksize * cin
      if l.in_site is not None:
        saved[l.in_site] += l.uses * l.ksize * l.in_mult * cout
    return saved


def count_structure(model: nnx.Module,
                    input_shape: Sequence[int] | None = None) -> dict:
  """MACs and parameters of a (possibly sliced) model, measured on it.

  Uses :func:`experiments.flops.dense_macs` and
  :func:`experiments.models.param_counts`.
  """
  plan_shape = plan_for(model, input_shape).input_shape
  return {"macs": int(flops_lib.dense_macs(model, (1,) + plan_shape)),
          "params": int(param_counts(model)["total"])}


# --------------------------------------------------------------------------
# Surgery.


def _get_np(module: Any, name: str) -> np.ndarray:
  # Slicing on the host: an eager jnp gather would compile once per shape.
  return np.asarray(getattr(module, name)[...])


def _set(module: Any, name: str, value: Any) -> None:
  old = getattr(module, name)
  # device_put, not jnp.asarray: the latter compiles a copy per shape.
  setattr(module, name, type(old)(jax.device_put(np.asarray(value))))


def _slice_out(module: Any, idx: np.ndarray) -> None:
  k = len(idx)
  if isinstance(module, nnx.BatchNorm):
    for name in ("scale", "bias", "mean", "var"):
      if getattr(module, name, None) is not None:
        _set(module, name, _get_np(module, name)[idx])
    module.num_features = k
    return
  _set(module, "kernel", _get_np(module, "kernel")[..., idx])
  if module.bias is not None:
    _set(module, "bias", _get_np(module, "bias")[idx])
  module.out_features = k
  if isinstance(module, nnx.Conv):
    module.kernel_shape = tuple(module.kernel[...].shape)


def _slice_in(module: Any, idx: np.ndarray, spatial: int) -> None:
  kernel = _get_np(module, "kernel")
  if isinstance(module, nnx.Conv):
    if module.feature_group_count != 1:
      raise ValueError("grouped convolutions cannot be sliced on their input.")
    _set(module, "kernel", kernel[..., idx, :])
    module.in_features = len(idx)
    module.kernel_shape = tuple(module.kernel[...].shape)
    return
  cin, cout = kernel.shape
  channels = cin // spatial
  if channels * spatial != cin:
    raise ValueError(f"dense input of {cin} is not {spatial} positions x C.")
  new = kernel.reshape(spatial, channels, cout)[:, idx, :]
  _set(module, "kernel", new.reshape(spatial * len(idx), cout))
  module.in_features = spatial * len(idx)


def remove_channels(model: nnx.Module, alive: Mapping[str, Any],
                    plan: Plan | None = None) -> nnx.Module:
  """A physically smaller copy of ``model`` without the dead channels.

  Args:
    model: the full model (with the values to keep; gates are not applied:
      a channel with ``alive`` False is dropped, whatever its weights).
    alive: site name -> bool ``(C,)``; every site keeps at least one.
    plan: the model's plan (default :func:`plan_for`).

  Returns:
    A new model of the same class (``model`` is unchanged) whose outputs
    equal those of ``model`` gated by ``alive``.
  """
  plan = plan or plan_for(model)
  widths = site_widths(model, plan)
  new = nnx.clone(model)
  for s in plan.sites:
    a = np.asarray(alive[s.name], bool)
    if a.shape != (widths[s.name],):
      raise ValueError(f"alive[{s.name!r}] must have shape "
                       f"({widths[s.name]},), got {a.shape}.")
    if not a.any():
      raise ValueError(f"site {s.name!r} would lose every channel.")
    idx = np.flatnonzero(a)
    for p in s.producers:
      _slice_out(module_at(new, p), idx)
    for p, spatial in s.consumers:
      _slice_in(module_at(new, p), idx, spatial)
  if isinstance(new, VGGCifar):
    widths_iter = iter(int(np.sum(alive[s.name])) for s in plan.sites)
    new.layout = tuple(item if item == "M" else next(widths_iter)
                       for item in new.layout)
  return new


def alive_widths(alive: Mapping[str, Any]) -> dict[str, int]:
  return {k: int(np.sum(v)) for k, v in alive.items()}


# --------------------------------------------------------------------------
# Training pieces.


def make_tx(learning_rate: float | optax.Schedule, *, momentum: float = 0.9,
            weight_decay: float = 5e-4) -> optax.GradientTransformation:
  """Momentum SGD with weight decay on the kernels only."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=optax_gsm.default_where),
      optax.sgd(learning_rate, momentum=momentum))


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


def _gate_vectors(alive: Mapping[str, Any]) -> dict:
  return {k: jax.device_put(np.asarray(v, np.float32)) for k, v in alive.items()}


def logits_fn(gm: GatedModel) -> Callable:
  """``f(params, rest, gates, x) -> logits`` in eval mode, jitted.

  Compiled once per :class:`GatedModel` and kept on it (so it dies with it);
  evaluation and the output comparisons share it.
  """
  fn = getattr(gm, "_logits_fn", None)
  if fn is None:
    fn = jax.jit(lambda params, rest, gates, x: gm.apply(
        params, rest, x, gates, train=False)[0])
    gm._logits_fn = fn  # pylint: disable=protected-access
  return fn


def evaluate(gm: GatedModel, params: PyTree, rest: Any, pipeline: Any,
             alive: Mapping[str, Any] | None = None) -> dict[str, float]:
  """Loss and accuracy of the gated model (BatchNorm in eval mode)."""
  fn = logits_fn(gm)
  gates = None if alive is None else _gate_vectors(alive)
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


def max_output_difference(gm: GatedModel, params: PyTree, rest: Any,
                          alive: Mapping[str, Any], slim: GatedModel,
                          x: jax.Array) -> float:
  """max |gated model(x) - slim model(x)| (eval mode)."""
  masked = logits_fn(gm)(params, rest, _gate_vectors(alive), x)
  out = logits_fn(slim)(slim.params, slim.rest, None, x)
  return float(jnp.max(jnp.abs(masked - out)))


def train_dense(model: nnx.Module, train: Any, *, steps: int,
                lr: float = 0.01, momentum: float = 0.9,
                weight_decay: float = 5e-4,
                tx: optax.GradientTransformation | None = None,
                first_step: int = 0,
                log: Callable[[str], None] = print) -> nnx.Module:
  """Plain momentum-SGD training of ``model`` for ``steps`` updates.

  ``tx``, when given, replaces ``make_tx(lr, momentum, weight_decay)``;
  training reads ``train`` from overall update ``first_step`` on.
  """
  gm = GatedModel(model)
  if tx is None:
    tx = make_tx(lr, momentum=momentum, weight_decay=weight_decay)

  @jax.jit
  def step(params, rest, opt, x, y):
    def loss_fn(params):
      logits, new_rest = gm.apply(params, rest, x, None, train=True)
      return cross_entropy(logits, y).mean(), new_rest
    (loss, rest), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), rest, opt, loss

  params, rest, opt = gm.params, gm.rest, tx.init(gm.params)
  it = batches(train, *divmod(int(first_step), int(train.steps_per_epoch)))
  for i in range(steps):
    b = next(it)
    params, rest, opt, loss = step(params, rest, opt, b.image, b.label)
    if (i + 1) % 500 == 0 or i + 1 == steps:
      log(f"  train step {i + 1}/{steps} loss {float(loss):.4f}")
  return gm.to_model(params, rest)


# --------------------------------------------------------------------------
# Greedy removal: Taylor (2017), gate Taylor (2019), Fisher (2018).


@dataclasses.dataclass
class GreedyConfig:
  """Settings of :func:`greedy_prune`.

  Attributes:
    criterion: ``"taylor"`` (Molchanov 2017), ``"taylor_gate"`` (Molchanov
      2019) or ``"fisher"`` (Theis 2018).
    flops_targets: remaining-MACs fractions at which to snapshot, e.g.
      ``(0.5, 0.25, 0.1)``; pruning stops at the smallest.
    param_targets: alternatively (or also) remaining-parameter fractions.
    steps_per_removal: fine-tuning updates between two removals (their gate
      gradients are the criterion's data).
    cost_weight: :math:`\\lambda` (Taylor) / :math:`\\beta` (Fisher) of the
      FLOPs term, per fraction of the dense model's MACs saved.
    normalize: L2-normalise scores within each layer; None: True for
      ``"taylor"`` (the paper), False otherwise.
    lr, momentum, weight_decay: the fine-tuning optimiser.
    finetune_steps: updates after reaching each target, before surgery.
    finetune_lr: their learning rate (default ``lr``).
    max_removals: a safety stop.
  """
  criterion: str = "taylor"
  flops_targets: tuple[float, ...] = (0.5, 0.25, 0.1)
  param_targets: tuple[float, ...] = ()
  steps_per_removal: int = 10
  cost_weight: float = 0.0
  normalize: bool | None = None
  lr: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  finetune_steps: int = 500
  finetune_lr: float | None = None
  max_removals: int = 100_000

  def __post_init__(self) -> None:
    if self.criterion not in CRITERIA:
      raise ValueError(f"`criterion` must be one of {CRITERIA}, got "
                       f"{self.criterion!r}.")
    for name in ("flops_targets", "param_targets"):
      for t in getattr(self, name):
        if not 0 < t <= 1:
          raise ValueError(f"`{name}` must hold fractions in (0, 1], got {t!r}.")
    if not self.flops_targets and not self.param_targets:
      raise ValueError("give at least one of `flops_targets`, `param_targets`.")
    if self.steps_per_removal < 1:
      raise ValueError(f"`steps_per_removal` must be >= 1, got "
                       f"{self.steps_per_removal!r}.")


def _scores(criterion: str, stats: st.GateStats, spatial: Mapping[str, int],
            normalize: bool, alive: Mapping[str, Any]) -> dict:
  if criterion == "taylor":
    s = st.taylor_first_order(stats, spatial)
  elif criterion == "taylor_gate":
    s = st.taylor_gate(stats)
  else:
    s = st.fisher(stats)
  return st.l2_normalize(s, alive) if normalize else s


def _make_finetune_step(gm: GatedModel, tx: optax.GradientTransformation,
                        collect: bool) -> Callable:
  def step(params, rest, opt, stats, gate_vec, x, y):
    n = x.shape[0]
    gates = {k: jnp.broadcast_to(v, (n,) + v.shape) for k, v in
             gate_vec.items()}

    def loss_fn(params, gates):
      logits, new_rest = gm.apply(params, rest, x, gates, train=True)
      return cross_entropy(logits, y).mean(), (new_rest, logits)

    (loss, (rest, logits)), (gp, gg) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, gates)
    if collect:
      # The gradient of the mean loss is 1/N of the per-example one.
      stats = st.accumulate_gate_stats(
          stats, {k: v * n for k, v in gg.items()}, gate_vec)
    u, opt = tx.update(gp, opt, params)
    params = optax.apply_updates(params, u)
    return params, rest, opt, stats, loss
  return jax.jit(step)


def _finetune(step, tx, gm, params, rest, alive, train_it, *, steps, lr):
  """``steps`` updates with the gates fixed, from a fresh optimiser state."""
  opt = tx.init(params)
  # The same compiled step as the pruning loop; only the learning rate differs.
  opt.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
  stats = st.init_gate_stats(gm.widths)
  gate_vec = _gate_vectors(alive)
  for _ in range(steps):
    b = next(train_it)
    params, rest, opt, stats, _ = step(params, rest, opt, stats, gate_vec,
                                       b.image, b.label)
  return params, rest


def greedy_prune(model: nnx.Module, train: Any, test: Any | None,
                 config: GreedyConfig, *, seed: int = 0,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
  """Removes feature maps one at a time by a gate-gradient criterion.

  Loop: ``steps_per_removal`` fine-tuning updates, accumulating the
  per-example gate gradients; score every alive map (criterion, optional
  per-layer L2 normalisation, minus ``cost_weight`` x the fraction of the
  dense MACs it would save); zero the gate of the lowest. At each target,
  the state is kept; afterwards each kept state is fine-tuned for
  ``finetune_steps`` and cut into a smaller model.

  Args:
    model: the trained model (unchanged).
    train: training pipeline (``.epoch(e)`` yields batches).
    test: evaluation pipeline or None.
    config: the settings.
    seed: first training epoch index of the data order (reproducibility).
    log: progress printer.

  Returns:
    A JSON-ready dict: the settings, the dense counts and accuracy, the
    removal trajectory and one entry per target (MACs, params, widths,
    accuracy before / after fine-tuning, the sliced model's accuracy and its
    largest output difference from the gated model), plus ``"models"``:
    target -> the sliced ``nnx.Module`` (not JSON; popped by the CLI).
  """
  t0 = time.perf_counter()
  plan = plan_for(model)
  gm = GatedModel(model, plan)
  counter = StructureCounter(model, plan)
  normalize = (config.criterion == "taylor" if config.normalize is None
               else config.normalize)
  tx = optax.inject_hyperparams(
      make_tx, static_args=("momentum", "weight_decay"))(
          learning_rate=config.lr, momentum=config.momentum,
          weight_decay=config.weight_decay)
  step = _make_finetune_step(gm, tx, collect=True)

  @jax.jit
  def score_fn(stats, alive, costs):
    scores = _scores(config.criterion, stats, gm.spatial, normalize, alive)
    if config.cost_weight:
      scores = st.cost_adjusted(scores, costs, config.cost_weight)
    return scores

  params, rest, opt = gm.params, gm.rest, tx.init(gm.params)
  alive = {k: np.ones(c, bool) for k, c in gm.widths.items()}
  train_it = batches(train, seed)
  targets = sorted([("flops", t) for t in config.flops_targets]
                   + [("params", t) for t in config.param_targets],
                   key=lambda x: -x[1])
  pending = list(targets)
  snapshots = []
  trajectory = []
  dense_acc = evaluate(gm, params, rest, test)["acc"] if test else None
  log(f"[{config.criterion}] dense: {counter.dense_macs} MACs, "
      f"{counter.dense_params} params, acc {dense_acc}")
  removals = 0
  while pending and removals < config.max_removals:
    stats = st.init_gate_stats(gm.widths)
    gate_vec = _gate_vectors(alive)
    for _ in range(config.steps_per_removal):
      b = next(train_it)
      params, rest, opt, stats, loss = step(params, rest, opt, stats,
                                            gate_vec, b.image, b.label)
    # FLOPs saved by removing one more map of each layer, as a fraction.
    costs = {k: np.float32(v / counter.dense_macs)
             for k, v in counter.removal_macs(alive).items()}
    scores = score_fn(stats, {k: jax.device_put(v) for k, v in alive.items()},
                      costs)
    try:
      name, idx = st.lowest_ranked(jax.device_get(scores), alive)
    except ValueError:
      log("  nothing left to remove")
      break
    alive[name][idx] = False
    removals += 1
    macs, n_params = counter.count(alive)
    trajectory.append([name, idx, macs, n_params])
    while pending:
      kind, t = pending[0]
      frac = (macs / counter.dense_macs if kind == "flops"
              else n_params / counter.dense_params)
      if frac > t:
        break
      pending.pop(0)
      snapshots.append((kind, t, params, rest, {k: v.copy() for k, v in
                                                alive.items()}, removals))
      log(f"  reached {kind} {t:.0%} after {removals} removals "
          f"(loss {float(loss):.3f}): widths {alive_widths(alive)}")
  prune_seconds = time.perf_counter() - t0
  levels = []
  models = {}
  for kind, t, p, r, a, n_removed in snapshots:
    t1 = time.perf_counter()
    before = evaluate(gm, p, r, test, a)["acc"] if test else None
    p, r = _finetune(step, tx, gm, p, r, a, train_it,
                     steps=config.finetune_steps,
                     lr=config.finetune_lr or config.lr)
    after = evaluate(gm, p, r, test, a)["acc"] if test else None
    slim = remove_channels(gm.to_model(p, r), a, plan)
    slim_gm = GatedModel(slim, plan_for(slim, plan.input_shape))
    measured = count_structure(slim, plan.input_shape)
    diff = max_output_difference(gm, p, r, a, slim_gm, _probe(test, plan))
    slim_acc = (evaluate(slim_gm, slim_gm.params, slim_gm.rest, test)["acc"]
                if test else None)
    macs, n_params = counter.count(a)
    level = {
        "target": f"{kind} {t:g}", "removals": n_removed,
        "macs": macs, "params": n_params,
        "macs_fraction": macs / counter.dense_macs,
        "params_fraction": n_params / counter.dense_params,
        "measured_macs": measured["macs"], "measured_params": measured["params"],
        "widths": alive_widths(a),
        "acc_before_finetune": before, "acc": after, "slim_acc": slim_acc,
        "max_abs_output_diff": diff,
        "finetune_seconds": time.perf_counter() - t1,
    }
    levels.append(level)
    models[level["target"]] = slim
    log(f"  {level['target']}: MACs {macs} ({macs / counter.dense_macs:.1%}), "
        f"params {n_params}, acc {before} -> {after} (slim {slim_acc}), "
        f"|diff| {diff:.2e}")
  return {
      "method": config.criterion, "config": dataclasses.asdict(config),
      "normalize": normalize,
      "dense_macs": counter.dense_macs, "dense_params": counter.dense_params,
      "dense_acc": dense_acc, "widths": gm.widths,
      "levels": levels, "trajectory": trajectory,
      "prune_seconds": prune_seconds, "models": models,
  }


def _probe(test: Any | None, plan: Plan) -> jax.Array:
  """Inputs for output comparisons: the first test batch (its shape is
  already compiled for evaluation), or random images."""
  if test is not None:
    return jax.device_put(next(iter(test.epoch(0))).image)
  return jax.random.normal(jax.random.key(0), (4,) + plan.input_shape)


def model_accuracy(model: nnx.Module, pipeline: Any) -> float:
  """Accuracy of a plain NNX model (eval mode) on ``pipeline``."""
  gm = GatedModel(model)
  return evaluate(gm, gm.params, gm.rest, pipeline)["acc"]


# --------------------------------------------------------------------------
# AutoPrune.


@dataclasses.dataclass
class AutoPruneConfig:
  """Settings of :func:`autoprune`.

  Attributes:
    structured: one mask per neuron / filter (the gated module's output
      channels) instead of one per weight.
    ste: ``"softplus"``, ``"leaky_relu"`` or ``"linear"``.
    alpha: LeakyReLU slope.
    regularizer: ``"gate_l1"``, ``"l1"`` or ``"l2"`` on the masks.
    strength: :math:`\\lambda` of the regulariser.
    mask_lr: learning rate of the masks (plain SGD).
    mask_init: initial :math:`m` (> 0: every weight kept at first).
    decouple: AutoPrune's sign(W) chain rule (False: the ordinary W).
    lr, momentum, weight_decay: the weights' optimiser (no decay by default:
      it would shrink pruned weights and hinder their recovery).
    steps: training updates.
    mask_steps: the masks train during the first ``mask_steps`` updates
      (default: all); then they are frozen and the weights fine-tune with
      the learning rate ``lr * finetune_lr_factor``.
    finetune_lr_factor: see ``mask_steps``.
    eval_every: evaluate every this many updates (0: only at the end).
  """
  structured: bool = False
  ste: str = "softplus"
  alpha: float = 0.2
  regularizer: str = "gate_l1"
  strength: float = 1e-3
  mask_lr: float = 1.0
  mask_init: float = 0.05
  decouple: bool = True
  lr: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 0.0
  steps: int = 2000
  mask_steps: int | None = None
  finetune_lr_factor: float = 0.1
  eval_every: int = 0

  def __post_init__(self) -> None:
    if self.mask_steps is not None and not 0 <= self.mask_steps <= self.steps:
      raise ValueError(f"`mask_steps` must be in [0, steps={self.steps}], got "
                       f"{self.mask_steps!r}.")
    if self.ste not in st.STE_KINDS:
      raise ValueError(f"`ste` must be one of {st.STE_KINDS}, got {self.ste!r}.")
    if self.regularizer not in st.REGULARIZERS:
      raise ValueError(f"`regularizer` must be one of {st.REGULARIZERS}, got "
                       f"{self.regularizer!r}.")


def _site_leaves(plan: Plan, params: PyTree) -> dict[str, list[tuple]]:
  """Site -> paths (into the pure params dict) of the gated module's params.

  Masking a Conv/Linear's kernel and bias (or a BatchNorm's scale and bias)
  by h(m) per output channel multiplies the module's output by h(m).
  """
  out = {}
  for s in plan.sites:
    node = params
    for k in s.gate_module:
      node = node[k]
    out[s.name] = [s.gate_module + (leaf,) for leaf in
                   ("kernel", "scale", "bias") if leaf in node]
  return out


def _replace(tree: dict, path: tuple, value: Any) -> dict:
  if len(path) == 1:
    new = dict(tree)
    new[path[0]] = value
    return new
  new = dict(tree)
  new[path[0]] = _replace(tree[path[0]], path[1:], value)
  return new


def _get(tree: Any, path: tuple) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def site_masked_params(params: PyTree, masks: Mapping[str, jax.Array],
                       leaves: Mapping[str, list[tuple]], *, ste: str,
                       alpha: float, decouple: bool) -> PyTree:
  """The params with each site's module gated by ``h(m)`` per channel."""
  out = params
  for name, paths in leaves.items():
    for path in paths:
      out = _replace(out, path, st.masked_weight(
          _get(params, path), masks[name], ste, alpha=alpha,
          decouple=decouple))
  return out


def autoprune(model: nnx.Module, train: Any, test: Any | None,
              config: AutoPruneConfig, *, seed: int = 0,
              log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains weights and AutoPrune masks jointly; returns the pruned result.

  Unstructured: one :math:`m` per kernel entry (all Conv / Linear kernels,
  the classifier included); the result is the sparse model
  :math:`W \\odot h(M)`. Structured: one :math:`m` per channel of each plan
  site; the result is also cut into a smaller model.

  Returns:
    A JSON-ready dict (``"model"`` holds the pruned ``nnx.Module``: sparse
    for unstructured, sliced for structured; popped by the CLI).
  """
  t0 = time.perf_counter()
  plan = plan_for(model)
  gm = GatedModel(model, plan)
  counter = StructureCounter(model, plan)
  params, rest = gm.params, gm.rest
  common = dict(ste=config.ste, alpha=config.alpha, decouple=config.decouple)
  if config.structured:
    leaves = _site_leaves(plan, params)
    masks = {k: jax.device_put(np.full((c,), config.mask_init, np.float32))
             for k, c in gm.widths.items()}
    effective = lambda p, m: site_masked_params(p, m, leaves, **common)
  else:
    masks = st.init_masks(params, config.mask_init)
    effective = lambda p, m: st.apply_autoprune_masks(p, m, **common)
  mask_steps = config.steps if config.mask_steps is None else config.mask_steps
  # After mask_steps: masks frozen (learning rate 0), weights fine-tuned.
  lr_w = optax.piecewise_constant_schedule(
      config.lr, {mask_steps: config.finetune_lr_factor})
  lr_m = optax.piecewise_constant_schedule(config.mask_lr, {mask_steps: 0.0})
  tx_w = make_tx(lr_w, momentum=config.momentum,
                 weight_decay=config.weight_decay)
  tx_m = st.autoprune_masks(lr_m, strength=config.strength,
                            regularizer=config.regularizer, ste=config.ste,
                            alpha=config.alpha)

  @jax.jit
  def step(params, masks, rest, opt_w, opt_m, x, y):
    def loss_fn(params, masks):
      logits, new_rest = gm.apply(effective(params, masks), rest, x, None,
                                  train=True)
      return cross_entropy(logits, y).mean(), new_rest
    (loss, rest), (gp, gmask) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, masks)
    u, opt_w = tx_w.update(gp, opt_w, params)
    params = optax.apply_updates(params, u)
    u, opt_m = tx_m.update(gmask, opt_m, masks)
    masks = optax.apply_updates(masks, u)
    return params, masks, rest, opt_w, opt_m, loss

  eff_jit = jax.jit(effective)
  kept_fn = jax.jit(lambda m: sum(jnp.sum(x > 0) for x in jax.tree.leaves(m)))
  n_masks = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(masks))
  opt_w, opt_m = tx_w.init(params), tx_m.init(masks)
  it = batches(train, seed)
  history = []
  dense_acc = evaluate(gm, params, rest, test)["acc"] if test else None
  tag = f"autoprune{'-structured' if config.structured else ''}/{config.ste}"
  log(f"[{tag}] dense acc {dense_acc}, {n_masks} masks")
  for i in range(config.steps):
    b = next(it)
    params, masks, rest, opt_w, opt_m, loss = step(
        params, masks, rest, opt_w, opt_m, b.image, b.label)
    last = i + 1 == config.steps
    if (config.eval_every and (i + 1) % config.eval_every == 0) or last:
      kept = int(kept_fn(masks))
      acc = (evaluate(gm, eff_jit(params, masks), rest, test)["acc"]
             if test else None)
      history.append({"step": i + 1, "loss": float(loss), "kept": kept,
                      "acc": acc})
      log(f"  step {i + 1}: loss {float(loss):.4f}, kept {kept}/{n_masks} "
          f"({n_masks / max(kept, 1):.1f}x), acc {acc}")
  final = eff_jit(params, masks)
  result = {"method": tag, "config": dataclasses.asdict(config),
            "dense_macs": counter.dense_macs,
            "dense_params": counter.dense_params, "dense_acc": dense_acc,
            "history": history}
  if config.structured:
    alive = {k: np.asarray(v) > 0 for k, v in masks.items()}
    for k, v in alive.items():
      if not v.any():   # keep the best channel of an emptied layer
        v[int(np.argmax(np.asarray(masks[k])))] = True
    slim = remove_channels(gm.to_model(final, rest), alive, plan)
    slim_gm = GatedModel(slim, plan_for(slim, plan.input_shape))
    macs, n_params = counter.count(alive)
    result.update({
        "widths": alive_widths(alive), "macs": macs, "params": n_params,
        "macs_fraction": macs / counter.dense_macs,
        "params_fraction": n_params / counter.dense_params,
        "measured": count_structure(slim, plan.input_shape),
        "acc": evaluate(gm, final, rest, test, alive)["acc"] if test else None,
        "slim_acc": (evaluate(slim_gm, slim_gm.params, slim_gm.rest,
                              test)["acc"] if test else None),
        "max_abs_output_diff": max_output_difference(
            gm, final, rest, alive, slim_gm, _probe(test, plan)),
    })
    result["model"] = slim
  else:
    sparse = gm.to_model(final, rest)
    costs = flops_lib.flops_cost_tree(sparse, (1,) + plan.input_shape)
    p = nnx.to_pure_dict(nnx.state(sparse, nnx.Param))
    flags = optax_gsm.default_where(p)
    nnz = sparse_macs = 0
    n_elig = 0
    for leaf, cost, flag in zip(jax.tree.leaves(p),
                                jax.tree.leaves(nnx.to_pure_dict(costs)),
                                jax.tree.leaves(flags)):
      if flag:
        nz = np.asarray(leaf) != 0
        nnz += int(nz.sum())
        n_elig += nz.size
        sparse_macs += int(np.sum(np.asarray(cost, np.int64) * nz))
    result.update({
        "nonzero": nnz, "eligible": n_elig, "compression": n_elig / max(nnz, 1),
        "sparse_macs": sparse_macs,
        "macs_fraction": sparse_macs / counter.dense_macs,
        "acc": evaluate(gm, final, rest, test)["acc"] if test else None,
    })
    result["model"] = sparse
  result["seconds"] = time.perf_counter() - t0
  return result


def autoprune_to_count(apply: Callable[[PyTree, jax.Array], jax.Array],
                       params: PyTree, train: Any, *, num_nonzero: int,
                       steps: int, mask_fraction: float = 0.7,
                       ste: str = "softplus", strength: float = 1e-4,
                       mask_lr: float = 0.1, mask_init: float = 1.0,
                       lr: float = 0.01, momentum: float = 0.9,
                       adjust_every: int | None = None, first_epoch: int = 0,
                       scale_by_magnitude: bool = True,
                       log: Callable[[str], None] = print
                       ) -> tuple[PyTree, dict[str, Any]]:
  """Unstructured AutoPrune that ends with exactly ``num_nonzero`` weights.

  For comparison tables at a fixed weight count Q. AutoPrune itself has no
  count target (:math:`\\lambda` sets the trade-off), so here
  :math:`\\lambda` is steered: every ``adjust_every`` updates it is multiplied
  by 1.5 while more than Q masks are open and divided by 1.5 otherwise (an
  addition to the paper, through ``optax.inject_hyperparams``). After
  ``mask_fraction`` of the updates, the Q weights with the largest
  :math:`m` (ties to the lower flat index) are kept, the masks are frozen and
  the kept weights fine-tune.

  Args:
    apply: ``apply(params, images) -> logits`` (pure).
    params: the starting weights (a nested dict).
    train: the training pipeline.
    num_nonzero: Q.
    steps: total updates.
    mask_fraction: share of the updates during which the masks train.
    ste, strength, mask_lr, mask_init: AutoPrune's settings
      (``strength`` is the starting :math:`\\lambda`).
    lr, momentum: the weights' SGD (no weight decay: pruned weights keep
      their values).
    adjust_every: the controller's period (default ``steps // 50``).
    first_epoch: data epoch to start at.
    scale_by_magnitude: start the masks at ``mask_init * |w| / mean|w|``
      per leaf (see :func:`optax_gsm.structured.init_masks`), so that a short
      budget degrades gracefully towards magnitude pruning rather than to an
      arbitrary cut among equal masks.
    log: progress printer.

  Returns:
    ``(pruned params with exactly Q non-zero eligible entries unless some
    kept weights are exactly 0, info dict)``.
  """
  masks = st.init_masks(params, mask_init,
                        scale_by_magnitude=scale_by_magnitude)
  n_masks = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(masks))
  if not 1 <= num_nonzero <= n_masks:
    raise ValueError(f"`num_nonzero` must be in [1, {n_masks}], got "
                     f"{num_nonzero!r}.")
  mask_steps = int(round(steps * mask_fraction))
  adjust_every = adjust_every or max(1, steps // 50)
  tx_w = optax.sgd(lr, momentum=momentum)
  # alpha must stay a Python number: it is a static argument of the STE.
  tx_m = optax.inject_hyperparams(st.autoprune_masks, static_args=("alpha",))(
      learning_rate=mask_lr, strength=strength, ste=ste)

  @jax.jit
  def step(params, masks, opt_w, opt_m, x, y, train_masks):
    def loss_fn(params, masks):
      eff = st.apply_autoprune_masks(params, masks, ste=ste)
      return cross_entropy(apply(eff, x), y).mean()
    loss, (gp, gm) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, masks)
    u, opt_w = tx_w.update(gp, opt_w, params)
    params = optax.apply_updates(params, u)
    u, new_opt_m = tx_m.update(gm, opt_m, masks)
    new_masks = optax.apply_updates(masks, u)
    masks = jax.tree.map(lambda a, b: jnp.where(train_masks, a, b),
                         new_masks, masks)
    return params, masks, opt_w, new_opt_m, loss

  kept_fn = jax.jit(lambda m: sum(jnp.sum(x > 0) for x in jax.tree.leaves(m)))
  opt_w, opt_m = tx_w.init(params), tx_m.init(masks)
  it = batches(train, first_epoch)
  history = []
  for i in range(steps):
    if i == mask_steps:
      # The final cut: exactly Q masks open (by the largest m), then frozen.
      leaves, treedef = jax.tree.flatten(masks)
      keep, _ = optax_gsm.top_q_keys(
          [scores_to_keys(x) for x in leaves], num_nonzero)
      masks = jax.tree.unflatten(
          treedef, [jnp.where(k, 1.0, -1.0) for k in keep])
    b = next(it)
    params, masks, opt_w, opt_m, loss = step(
        params, masks, opt_w, opt_m, b.image, b.label, i < mask_steps)
    if i < mask_steps and (i + 1) % adjust_every == 0:
      kept = int(kept_fn(masks))
      lam = float(opt_m.hyperparams["strength"])
      lam = lam * 1.5 if kept > num_nonzero else lam / 1.5
      opt_m.hyperparams["strength"] = jnp.asarray(lam, jnp.float32)
      history.append({"step": i + 1, "kept": kept, "strength": lam,
                      "loss": float(loss)})
  final = jax.jit(lambda p, m: st.apply_autoprune_masks(p, m, ste=ste))(params, masks)
  info = {"kept_before_cut": history[-1]["kept"] if history else n_masks,
          "final_strength": float(opt_m.hyperparams["strength"]),
          "mask_steps": mask_steps, "history": history}
  log(f"  [autoprune] kept {info['kept_before_cut']} masks before the cut to "
      f"Q={num_nonzero}; final lambda {info['final_strength']:.2e}")
  return final, info


# --------------------------------------------------------------------------
# GSM at a given parameter count.


def gsm_baseline(model: nnx.Module, train: Any, test: Any | None, *,
                 num_nonzero: int, steps: int, lr: float = 0.01,
                 momentum: float = 0.98, weight_decay: float = 5e-4,
                 seed: int = 0,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
  """``optax_gsm.gsm`` for ``steps`` updates, then magnitude pruning to Q."""
  t0 = time.perf_counter()
  gm = GatedModel(model)
  tx = optax_gsm.gsm(lr, num_nonzero=num_nonzero, momentum=momentum,
                     weight_decay=weight_decay)

  @jax.jit
  def step(params, rest, opt, x, y):
    def loss_fn(params):
      logits, new_rest = gm.apply(params, rest, x, None, train=True)
      return cross_entropy(logits, y).mean(), new_rest
    (loss, rest), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), rest, opt, loss

  params, rest, opt = gm.params, gm.rest, tx.init(gm.params)
  it = batches(train, seed)
  for i in range(steps):
    b = next(it)
    params, rest, opt, loss = step(params, rest, opt, b.image, b.label)
    if (i + 1) % 1000 == 0:
      log(f"  gsm step {i + 1}/{steps} loss {float(loss):.4f}")
  pruned, _ = optax_gsm.magnitude_prune(params, num_nonzero)
  acc = evaluate(gm, pruned, rest, test)["acc"] if test else None
  n_elig = optax_gsm.count_eligible(params)
  log(f"[gsm] Q={num_nonzero} ({n_elig / num_nonzero:.1f}x): acc {acc}")
  return {"method": "gsm", "num_nonzero": num_nonzero, "eligible": n_elig,
          "compression": n_elig / num_nonzero, "steps": steps, "lr": lr,
          "momentum": momentum, "weight_decay": weight_decay, "acc": acc,
          "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------
# Models, data, checkpoints and the command line.


def build_model(name: str, *, seed: int = 0) -> nnx.Module:
  """``lenet5``, ``lenet_300_100``, ``vgg_small``, ``vgg_cifar``,
  ``resnet56`` or ``resnet8`` (the same CIFAR ResNet with one block per
  stage, for CI)."""
  rngs = nnx.Rngs(seed)
  if name == "vgg_small":
    return get_model("vgg_cifar", rngs=rngs, layout=VGG_SMALL_LAYOUT)
  if name == "resnet8":
    return CifarResNet(8, rngs=rngs)
  return get_model(name, rngs=rngs)


def dataset_of(model_name: str) -> str:
  return "mnist" if model_name.startswith("lenet") else "cifar10"


def load_pipelines(dataset: str, *, batch_size: int, seed: int = 0,
                   data_dir: str | None = None, subset: int | None = None,
                   builder: Any = None) -> tuple[Any, Any]:
  """``(train, test)`` pipelines from :func:`experiments.data.load`."""
  from experiments import data  # pylint: disable=import-outside-toplevel
  train = data.load(dataset, "train", batch_size=batch_size, seed=seed,
                    data_dir=data_dir, subset=subset, builder=builder)
  test = data.load(dataset, "test", batch_size=500 if not subset else 100,
                   data_dir=data_dir, builder=builder,
                   subset=None if not subset else max(100, subset // 6))
  return train, test


def save_params(model: nnx.Module, path: Path) -> None:
  """Writes the ``nnx.Param`` and BatchNorm state to an ``.npz`` file."""
  flat = {}
  for kind, state in (("param", nnx.state(model, nnx.Param)),
                      ("stat", nnx.state(model, nnx.BatchStat))):
    for p, leaf in jax.tree_util.tree_flatten_with_path(
        nnx.to_pure_dict(state))[0]:
      flat[kind + jax.tree_util.keystr(p)] = np.asarray(leaf)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, **flat)
  os.replace(tmp, path)


def load_params(model: nnx.Module, path: Path) -> nnx.Module:
  """Reads :func:`save_params` output into ``model`` (in place)."""
  with np.load(path) as f:
    flat = dict(f)
  for kind, cls in (("param", nnx.Param), ("stat", nnx.BatchStat)):
    state = nnx.state(model, cls)
    pure = nnx.to_pure_dict(state)
    leaves, tdef = jax.tree_util.tree_flatten_with_path(pure)
    new = [jax.device_put(flat[kind + jax.tree_util.keystr(p)]) for p, _ in leaves]
    pure = jax.tree_util.tree_unflatten(tdef, new)
    state.replace_by_pure_dict(pure)
    nnx.update(model, state)
  return model


def _json_default(x: Any) -> Any:
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (tuple, set)):
    return list(x)
  return str(x)


def write_result(result: dict, path: Path) -> None:
  """``result`` as JSON at ``path``, atomically (temporary file + rename)."""
  atomic_write_text(path, json.dumps(result, indent=1, default=_json_default)
                    + "\n")


def _work_dir(args: argparse.Namespace) -> Path:
  return Path(args.work_dir or os.environ.get(WORK_DIR_ENV)
              or Path.home() / ".cache" / "optax_gsm" / "structured")


def _pretrained(args, train, log) -> nnx.Module:
  model = build_model(args.model, seed=args.seed)
  path = _work_dir(args) / f"{args.model}_dense_{args.pretrain_steps}.npz"
  if args.mock is None and path.exists():
    log(f"loading the dense model from {path}")
    return load_params(model, path)
  if args.pretrain_steps <= 0:
    return model
  log(f"pretraining {args.model} for {args.pretrain_steps} steps")
  model = train_dense(model, train, steps=args.pretrain_steps, lr=args.lr,
                      log=log)
  if args.mock is None:
    save_params(model, path)
  return model


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m experiments.structured",
      description="Taylor / Fisher feature-map pruning and AutoPrune.")
  p.add_argument("method", choices=("pretrain",) + CRITERIA + (
      "autoprune", "autoprune_structured", "gsm"))
  p.add_argument("--model", default="lenet5", choices=MODEL_NAMES)
  p.add_argument("--dataset", default=None, choices=sorted(DATASETS),
                 help="default: by model")
  p.add_argument("--mock", type=int, default=None, metavar="N",
                 help="use tfds.testing.mock_data with N examples (CI)")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--subset", type=int, default=None)
  p.add_argument("--work-dir", default=None,
                 help=f"pretrained weights cache (default ${WORK_DIR_ENV} or "
                      "~/.cache/optax_gsm/structured)")
  p.add_argument("--out", default=None,
                 help="result JSON path (default runs/structured/"
                      "<model>_<method>.json)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--pretrain-steps", type=int, default=2000)
  p.add_argument("--lr", type=float, default=0.01)
  # greedy
  p.add_argument("--flops-targets", default="0.5,0.25,0.1")
  p.add_argument("--param-targets", default="")
  p.add_argument("--steps-per-removal", type=int, default=10)
  p.add_argument("--cost-weight", type=float, default=0.0)
  p.add_argument("--finetune-steps", type=int, default=500)
  # autoprune
  p.add_argument("--ste", default="softplus", choices=st.STE_KINDS)
  p.add_argument("--regularizer", default="gate_l1", choices=st.REGULARIZERS)
  p.add_argument("--strength", type=float, default=1e-3)
  p.add_argument("--mask-lr", type=float, default=1.0)
  p.add_argument("--mask-init", type=float, default=0.05)
  p.add_argument("--no-decouple", action="store_true")
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--mask-steps", type=int, default=None)
  p.add_argument("--eval-every", type=int, default=0)
  # gsm
  p.add_argument("--num-nonzero", type=int, default=None)
  p.add_argument("--gsm-momentum", type=float, default=0.99)
  p.add_argument("--gsm-weight-decay", type=float, default=5e-3,
                 help="10x the paper's, for short budgets (as experiments."
                      "methods.common.Budget)")
  return p


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(t) for t in text.split(",") if t.strip())


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
  """Runs one method as the command line describes; returns the result."""
  dataset = args.dataset or dataset_of(args.model)
  with contextlib.ExitStack() as stack:
    builder = None
    if args.mock is not None:
      from experiments import data  # pylint: disable=import-outside-toplevel
      tfds = data.import_tfds()
      stack.enter_context(tfds.testing.mock_data(num_examples=args.mock))
      builder = tfds.builder(data.get_spec(dataset).tfds_name,
                             data_dir=args.data_dir or "/tmp/optax_gsm_mock")
      train, test = load_pipelines(dataset, batch_size=args.batch_size,
                                   seed=args.seed, builder=builder)
    else:
      train, test = load_pipelines(dataset, batch_size=args.batch_size,
                                   seed=args.seed, data_dir=args.data_dir,
                                   subset=args.subset)
    model = _pretrained(args, train, log)
    if args.method == "pretrain":
      return {"method": "pretrain", "model": args.model,
              "acc": model_accuracy(model, test)}
    if args.method in CRITERIA:
      cfg = GreedyConfig(
          criterion=args.method, flops_targets=_floats(args.flops_targets),
          param_targets=_floats(args.param_targets),
          steps_per_removal=args.steps_per_removal,
          cost_weight=args.cost_weight, lr=args.lr,
          finetune_steps=args.finetune_steps)
      result = greedy_prune(model, train, test, cfg, seed=args.seed + 1,
                            log=log)
      result.pop("models")
    elif args.method.startswith("autoprune"):
      cfg = AutoPruneConfig(
          structured=args.method == "autoprune_structured", ste=args.ste,
          regularizer=args.regularizer, strength=args.strength,
          mask_lr=args.mask_lr, mask_init=args.mask_init,
          decouple=not args.no_decouple, lr=args.lr, steps=args.steps,
          mask_steps=args.mask_steps, eval_every=args.eval_every)
      result = autoprune(model, train, test, cfg, seed=args.seed + 1, log=log)
      result.pop("model")
    else:
      if args.num_nonzero is None:
        raise SystemExit("gsm needs --num-nonzero")
      result = gsm_baseline(model, train, test, num_nonzero=args.num_nonzero,
                            steps=args.steps, lr=args.lr,
                            momentum=args.gsm_momentum,
                            weight_decay=args.gsm_weight_decay,
                            seed=args.seed + 1,
                            log=log)
  result.update({"model": args.model, "dataset": dataset, "mock": args.mock})
  return result


def output_path(args: argparse.Namespace) -> Path:
  """``--out``, or ``runs/structured/<model>_<method>[_<ste>][_mock].json``."""
  if args.out:
    return Path(args.out).expanduser().absolute()
  tag = args.method + (f"_{args.ste}" if args.method.startswith("autoprune")
                       else "")
  return RESULTS_DIR / f"{args.model}_{tag}{'_mock' if args.mock else ''}.json"


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.method == "gsm" and args.num_nonzero is None:
    parser.error("gsm needs --num-nonzero")
  out = output_path(args)
  if out.is_dir():
    parser.error(f"--out {args.out!r}: {out} is a folder; --out is the result "
                 "JSON file's path")

  def command() -> None:
    # The result file is locked while the method runs: a second process
    # writing the same file refuses instead of overwriting it.
    with lock_output(out.parent, name=f".{out.name}.lock"):
      t0 = time.perf_counter()
      result = run(args)
      result["command"] = "python -m experiments.structured " + " ".join(argv)
      result["wall_seconds"] = time.perf_counter() - t0
      write_result(result, out)
    print(f"wrote {out}")

  from experiments.data import DatasetError  # pylint: disable=import-outside-toplevel
  return run_command(command, DatasetError)


if __name__ == "__main__":
  sys.exit(main())
