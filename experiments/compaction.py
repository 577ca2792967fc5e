r"""Exact compaction of pruned NNX models of the zoo, and their sparse execution.

A model pruned by GSM and the magnitude cut keeps its dense shapes: its
zeros still cost their multiply-adds ("mock sparsity"). At 60x-300x many
units (neurons, channels) are left with no outgoing or no incoming weight;
:func:`compact` removes them and returns a smaller dense model of the same
class whose outputs equal the pruned model's up to float32 rounding:

* a unit with **no outgoing weight** (every layer reading it has zeros
  there) is removed outright;
* a unit with **no incoming weight** outputs the constant
  :math:`v = \mathrm{relu}(b)` (:math:`\mathrm{relu}(\mathrm{BN}(b))` with a
  BatchNorm, in evaluation mode; :math:`b = 0` without a bias). Where its
  readers apply their kernels without padding (dense layers, ``VALID``
  convolutions, after pooling, a flatten or the global mean) the constant is
  folded into the readers' biases and the unit removed; where a reader is a
  zero-padded convolution (VGG, ResNet) the constant is not uniform at the
  borders, so the unit is removed only when :math:`v = 0`, else kept.

Removals repeat until nothing changes (a unit fed only by constants becomes
constant, a unit read only by removed units becomes unread). The array part
(dead-unit tests, BatchNorm of a constant, the fold) is
:mod:`optax_gsm.compaction`; the slicing is
:func:`experiments.structured.remove_channels`.

Supported models and their units (groups):

* ``LeNet300100``: ``fc1``, ``fc2``; with ``drop_dead_inputs`` also the input
  pixels that ``fc1`` does not read (``fc1`` becomes a :class:`SelectInputs`
  that gathers the others).
* ``LeNet5``: ``conv1``, ``conv2``, ``fc1``.
* ``VGGCifar``: every conv-BN block.
* ``CifarResNet``: the inner channels of each basic block (``conv1``-``bn1``,
  read by ``conv2``), and the **residual stream** channels, each tied across
  the residual adds: a stream channel is removed only when no layer reads it
  anywhere along the stream (every ``conv1`` of its stage, the next stage's
  first ``conv1`` and projection, the classifier; with option-A shortcuts
  the channel continues into the next stages, zero-padded, and must be
  unread there too). Stream channels are only removed when unread (several
  layers write them). With option-A shortcuts the zero-padded channels of a
  stage are split half before and half after the previous stage's; where
  removing unread ones would unbalance that split, some unread ones are kept.
* ``DenseNet`` is not supported (a channel is read by every later layer of
  its dense block through its own BatchNorm): :func:`compact` raises
  TypeError.

When every unit of a group would go, the model class cannot express the
result; ``on_empty="error"`` (default) raises ValueError, ``"keep_one"``
keeps the group's first unit unchanged (exact).

:func:`sparsify` then replaces layers by sparse kernels, chosen per layer by
timing on this machine (``choice="time"``): :class:`SparseLinear` (the
non-zero entries only, :func:`optax_gsm.compaction.coo_matmul`) for dense
layers and :class:`GatherConv` (the input features of the used
(tap, channel) pairs only, then a dense product) for convolutions.

Example:
  >>> import numpy as np
  >>> from flax import nnx
  >>> from experiments.models.lenet import LeNet300100
  >>> model = LeNet300100(rngs=nnx.Rngs(0))
  >>> k = np.array(model.fc2.kernel[...]); k[:, 50:] = 0   # fc2 units 50.. unfed
  >>> model.fc2.kernel[...] = k
  >>> small, report = compact(model, drop_dead_inputs=False)
  >>> small.fc2.out_features, small.fc3.in_features
  (50, 50)
  >>> x = np.random.default_rng(0).standard_normal((2, 28, 28, 1)).astype(np.float32)
  >>> bool(np.allclose(model(x), small(x), atol=1e-5))
  True
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from optax_gsm import compaction as cl
from experiments import structured as S
from experiments.models.densenet import DenseNet
from experiments.models.lenet import LeNet5, LeNet300100
from experiments.models.resnet import CifarResNet
from experiments.models.vgg import VGGCifar

ModulePath = tuple[Any, ...]
ON_EMPTY = ("error", "keep_one")
CHOICES = ("time", "sparse", "dense")
SUPPORTED = (LeNet300100, LeNet5, VGGCifar, CifarResNet)


# --------------------------------------------------------------------------
# Groups of units.


@dataclasses.dataclass(frozen=True)
class Group:
  """Units that :func:`compact` may remove, and how they are computed.

  Attributes:
    site: the :class:`experiments.structured.Site` (name, producers whose
      output axis holds the units, consumers reading them) that
      :func:`experiments.structured.remove_channels` slices.
    writer: the Conv / Linear whose outputs the units are (then ``norm``,
      then a ReLU); None when several layers write them (the residual
      stream), in which case only unread units are removed.
    norm: the BatchNorm between ``writer`` and the ReLU, or None.
  """

  site: S.Site
  writer: ModulePath | None
  norm: ModulePath | None

  @property
  def name(self) -> str:
    return self.site.name


def _stages(model: CifarResNet) -> list[list[int]]:
  """Block indices per stage (a stage starts at every strided block)."""
  stages: list[list[int]] = []
  for i, block in enumerate(model.blocks):
    if i == 0 or block.stride != 1:
      stages.append([])
    stages[-1].append(i)
  return stages


def _lane_groups(model: CifarResNet) -> list[Group]:
  """One group per stage: the residual stream's channels in that stage."""
  stages = _stages(model)
  groups = []
  for s, blocks in enumerate(stages):
    first = blocks[0]
    if s == 0:
      writers = [("stem_conv",), ("stem_bn",)]
      gate = ("stem_bn",)
    else:
      writers = []
      if model.blocks[first].needs_projection:
        writers = [("blocks", first, "proj_conv"), ("blocks", first, "proj_bn")]
      gate = ("blocks", first, "bn2")
    for i in blocks:
      writers += [("blocks", i, "conv2"), ("blocks", i, "bn2")]
    readers = [(("blocks", i, "conv1"), 1) for i in blocks if s == 0 or i != first]
    if s + 1 < len(stages):
      nxt = stages[s + 1][0]
      readers.append((("blocks", nxt, "conv1"), 1))
      if model.blocks[nxt].needs_projection:
        readers.append((("blocks", nxt, "proj_conv"), 1))
    else:
      readers.append((("fc",), 1))
    groups.append(Group(S.Site(f"stage{s}", gate, tuple(writers), tuple(readers)), None, None))
  return groups


def groups_for(model: nnx.Module) -> tuple[Group, ...]:
  """The groups of units of a supported model (see the module docstring).

  Args:
    model: a ``LeNet300100``, ``LeNet5``, ``VGGCifar`` or ``CifarResNet``.

  Returns:
    The groups: those of :func:`experiments.structured.plan_for`, plus the
    residual stream's stages (``"stage0"``, ...) for a ``CifarResNet``.

  Raises:
    TypeError: for other models.
  """
  if isinstance(model, DenseNet) or not isinstance(model, SUPPORTED):
    raise TypeError(
      f"`model`: compaction supports {', '.join(c.__name__ for c in SUPPORTED)}; "
      f"got {type(model).__name__}"
      + (
        " (a DenseNet channel is read by every later layer of its block "
        "through its own BatchNorm, which remove_channels does not slice)"
        if isinstance(model, DenseNet)
        else ""
      )
      + "."
    )
  groups = []
  for site in S.plan_for(model).sites:
    norm = next(
      (p for p in site.producers[1:] if isinstance(S.module_at(model, p), nnx.BatchNorm)), None
    )
    groups.append(Group(site, site.producers[0], norm))
  if isinstance(model, CifarResNet):
    groups += _lane_groups(model)
  return tuple(groups)


# --------------------------------------------------------------------------
# Dead units.


def _np(module: Any, name: str) -> np.ndarray | None:
  var = getattr(module, name, None)
  return None if var is None else np.asarray(var[...])


def _set(module: Any, name: str, value: np.ndarray) -> None:
  old = getattr(module, name)
  setattr(module, name, type(old)(jax.device_put(np.asarray(value))))


def _no_padding(padding: Any) -> bool:
  if isinstance(padding, str):
    return padding.upper() == "VALID"
  if isinstance(padding, int):
    return padding == 0
  return all(
    int(p) == 0 for pair in padding for p in (pair if isinstance(pair, (tuple, list)) else (pair,))
  )


def _can_fold(module: Any) -> bool:
  """Whether a constant input channel adds the same to every output."""
  if getattr(module, "bias", None) is None:
    return False
  if isinstance(module, nnx.Linear):
    return True
  return isinstance(module, nnx.Conv) and _no_padding(module.padding)


def _constants(model: nnx.Module, g: Group) -> np.ndarray:
  """relu(BN(bias)) per unit: the output of a unit with no incoming weight."""
  w = S.module_at(model, g.writer)
  b = _np(w, "bias")
  pre = np.zeros(w.out_features, np.float32) if b is None else b
  if g.norm is not None:
    bn = S.module_at(model, g.norm)
    pre = cl.batch_norm_constant(
      pre,
      mean=_np(bn, "mean"),
      var=_np(bn, "var"),
      epsilon=bn.epsilon,
      scale=_np(bn, "scale"),
      bias=_np(bn, "bias"),
    )
  return np.maximum(pre, 0)


@dataclasses.dataclass
class _Decision:
  remove: np.ndarray  # bool (C,)
  unread: np.ndarray  # bool (C,): no outgoing weight
  constant: np.ndarray  # bool (C,): no incoming weight, removable
  fold: np.ndarray  # (C,) constants to fold into the readers' biases
  kept_constant: int  # no incoming weight, not removable (padded reader)


def _decide(model: nnx.Module, g: Group) -> _Decision:
  unread = np.logical_and.reduce(
    [
      cl.unread_inputs(_np(S.module_at(model, p), "kernel"), spatial=spatial)
      for p, spatial in g.site.consumers
    ]
  )
  constant = np.zeros_like(unread)
  fold = np.zeros(unread.shape, np.float32)
  kept = 0
  if g.writer is not None:
    unfed = cl.unfed_outputs(_np(S.module_at(model, g.writer), "kernel"))
    value = _constants(model, g)
    foldable = all(_can_fold(S.module_at(model, p)) for p, _ in g.site.consumers)
    constant = unfed & ((value == 0) | foldable)
    fold = np.where(constant & ~unread, value, 0).astype(np.float32)
    kept = int(np.sum(unfed & ~constant & ~unread))
  return _Decision(unread | constant, unread, constant, fold, kept)


def _tie_lanes(model: CifarResNet, groups: Sequence[Group], remove: dict[str, np.ndarray]) -> None:
  """Stream channels: removed only where removable in every stage they cross.

  With option-A shortcuts stage ``s`` channel ``j`` continues as stage
  ``s + 1`` channel ``j + before`` (``before`` zero-padded channels first),
  and the kept padded channels must stay split as the block pads them.
  """
  stages = _stages(model)
  names = [g.name for g in groups if g.writer is None]
  if not names:
    return

  def carried(s: int) -> int | None:
    """Offset of stage s-1's channels in stage s, None with a projection."""
    block = model.blocks[stages[s][0]]
    return None if block.needs_projection else block.pad_channels // 2

  # Backward: a channel goes only if it goes in every later stage it reaches.
  for s in range(len(stages) - 2, -1, -1):
    off = carried(s + 1)
    if off is not None:
      here, nxt = remove[names[s]], remove[names[s + 1]]
      here &= nxt[off : off + len(here)]
  # Forward: the decision at a channel's first stage holds along it, and the
  # padded channels stay split as before: half (rounded down) first.
  for s in range(1, len(stages)):
    off = carried(s)
    if off is None:
      continue
    prev, here = remove[names[s - 1]], remove[names[s]]
    here[off : off + len(prev)] = prev
    before = np.arange(off)
    after = np.arange(off + len(prev), len(here))
    kb, ka = int(np.sum(~here[before])), int(np.sum(~here[after]))
    if ka < kb:
      for i in after[here[after]][: kb - ka]:
        here[i] = False
    elif ka > kb + 1:
      for i in before[here[before]][: ka - 1 - kb]:
        here[i] = False


def _fix_pads(model: CifarResNet) -> None:
  for block in model.blocks:
    if not block.needs_projection:
      block.pad_channels = int(block.conv2.out_features - block.conv1.in_features)


# --------------------------------------------------------------------------
# Input selection (LeNet-300-100's pixels).


class Index(nnx.Variable):
  """Integer indices of a compacted or sparse layer (not trained)."""


class SelectInputs(nnx.Module):
  """A dense layer applied to some of its inputs: ``layer(x[..., index])``.

  Args:
    layer: the ``nnx.Linear`` on the selected inputs.
    index: ``(layer.in_features,)`` the selected positions of the last axis.
    in_features: the width of the full input.
  """

  def __init__(self, layer: nnx.Linear, index: np.ndarray, in_features: int):
    index = np.asarray(index, np.int32)
    if index.shape != (layer.in_features,):
      raise ValueError(f"`index` must have shape ({layer.in_features},), got {index.shape}.")
    self.layer = layer
    self.index = Index(jnp.asarray(index))
    self.in_features = int(in_features)
    self.out_features = int(layer.out_features)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.layer(jnp.take(x, self.index[...], axis=-1))

  def full(self) -> nnx.Linear:
    """The equivalent ``nnx.Linear`` on every input (zero rows elsewhere)."""
    new = nnx.clone(self.layer)
    kernel = np.zeros((self.in_features, self.out_features), _np(self.layer, "kernel").dtype)
    kernel[np.asarray(self.index[...])] = _np(self.layer, "kernel")
    _set(new, "kernel", kernel)
    new.in_features = self.in_features
    return new


def _select_inputs(model: LeNet300100) -> int:
  """Replaces ``fc1`` by a :class:`SelectInputs` without its unread pixels."""
  fc1 = model.fc1
  kernel = _np(fc1, "kernel")
  read = ~cl.unread_inputs(kernel)
  if read.all() or not read.any():
    return int(kernel.shape[0])
  idx = np.flatnonzero(read)
  inner = nnx.clone(fc1)
  _set(inner, "kernel", kernel[idx])
  inner.in_features = len(idx)
  model.fc1 = SelectInputs(inner, idx, kernel.shape[0])
  return len(idx)


# --------------------------------------------------------------------------
# compact.


@dataclasses.dataclass(frozen=True)
class GroupReport:
  """What :func:`compact` did to one group.

  Attributes:
    name: the group (``"fc1"``, ``"blocks.3"``, ``"stage1"``, ...).
    width: units before.
    kept: units after.
    unread: units removed for having no outgoing weight.
    constant: units removed for having no incoming weight (their constant
      folded into the readers' biases, or zero).
    kept_constant: units with no incoming weight and a non-zero constant,
      kept because a reader pads (at the last round).
  """

  name: str
  width: int
  kept: int
  unread: int
  constant: int
  kept_constant: int


@dataclasses.dataclass(frozen=True)
class CompactionReport:
  """The groups' reports, the inputs kept (of how many) and the rounds run."""

  groups: tuple[GroupReport, ...]
  inputs: tuple[int, int] | None
  rounds: int

  def __str__(self) -> str:
    lines = ["group        width   kept unread constant kept_constant"]
    for g in self.groups:
      lines.append(
        f"{g.name:<12} {g.width:>5} {g.kept:>6} {g.unread:>6} {g.constant:>8} {g.kept_constant:>13}"
      )
    if self.inputs is not None:
      lines.append(f"inputs       {self.inputs[1]:>5} {self.inputs[0]:>6}")
    lines.append(f"rounds: {self.rounds}")
    return "\n".join(lines)


def compact(
  model: nnx.Module,
  *,
  on_empty: str = "error",
  drop_dead_inputs: bool = True,
  max_rounds: int = 100,
) -> tuple[nnx.Module, CompactionReport]:
  r"""A smaller dense copy of a pruned model without its dead units.

  See the module docstring for what is removed. BatchNorm is taken in
  evaluation mode (running statistics): the returned model is in evaluation
  mode and its outputs equal ``model``'s in evaluation mode up to float32
  rounding (the folded biases are summed in float64).

  Args:
    model: a pruned ``LeNet300100``, ``LeNet5``, ``VGGCifar`` or
      ``CifarResNet`` (with zeros in its kernels); it is not modified.
    on_empty: when every unit of a group would be removed (no signal passes
      through that layer any more): ``"error"`` raises ValueError,
      ``"keep_one"`` keeps the group's first unit unchanged.
    drop_dead_inputs: for ``LeNet300100``, also drop the input pixels that
      ``fc1`` does not read (``fc1`` becomes a :class:`SelectInputs`).
    max_rounds: the most rounds of removal (each round removes what is dead
      in the current model; the count reached is reported).

  Returns:
    ``(compacted model, report)``.

  Raises:
    TypeError: for an unsupported model.
    ValueError: for a bad ``on_empty`` or ``max_rounds``, or when a group
      would lose every unit with ``on_empty="error"``.

  Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from experiments.models.lenet import LeNet5
    >>> model = LeNet5(rngs=nnx.Rngs(0))
    >>> small, report = compact(model)       # nothing is dead: same shapes
    >>> small.conv2.kernel[...].shape, report.rounds
    ((5, 5, 20, 50), 1)
  """
  if on_empty not in ON_EMPTY:
    raise ValueError(f"`on_empty` must be one of {ON_EMPTY}, got {on_empty!r}.")
  if not isinstance(max_rounds, int) or max_rounds < 1:
    raise ValueError(f"`max_rounds` must be a positive integer, got {max_rounds!r}.")
  groups = groups_for(model)  # raises TypeError early
  model = nnx.clone(model)
  model.eval()
  inputs = None
  if isinstance(model, LeNet300100) and isinstance(model.fc1, SelectInputs):
    model.fc1 = model.fc1.full()  # a compacted model: start from all inputs
  widths = S.site_widths(model, S.Plan(tuple(g.site for g in groups), (1, 1, 1)))
  totals = {g.name: [0, 0] for g in groups}
  kept_constant = {g.name: 0 for g in groups}
  rounds = 0
  while rounds < max_rounds:
    rounds += 1
    groups = groups_for(model)
    decisions = {g.name: _decide(model, g) for g in groups}
    remove = {k: d.remove.copy() for k, d in decisions.items()}
    if isinstance(model, CifarResNet):
      _tie_lanes(model, groups, remove)
    for g in groups:
      kept_constant[g.name] = decisions[g.name].kept_constant
      if not remove[g.name].all():
        continue
      d = decisions[g.name]
      if on_empty == "error":
        raise ValueError(
          f"compaction would remove every unit of {g.name!r} "
          f"({int(np.sum(d.unread))} of {len(d.remove)} without outgoing "
          f"weight, {int(np.sum(d.constant & ~d.unread))} constant): no "
          "signal passes through it, and the model class needs at least one "
          "unit there. Pass on_empty='keep_one' to keep its first unit "
          "unchanged (exact)."
        )
      remove[g.name][0] = False
      if isinstance(model, CifarResNet):
        _tie_lanes(model, groups, remove)
    if not any(r.any() for r in remove.values()):
      break
    for g in groups:
      d = decisions[g.name]
      r = remove[g.name]
      fold = np.where(r, d.fold, 0)
      totals[g.name][0] += int(np.sum(r & d.unread))
      totals[g.name][1] += int(np.sum(r & ~d.unread))
      if np.any(fold != 0):
        for path, spatial in g.site.consumers:
          reader = S.module_at(model, path)
          _set(
            reader,
            "bias",
            cl.fold_constant_inputs(
              _np(reader, "kernel"), _np(reader, "bias"), fold, spatial=spatial
            ),
          )
    plan = S.Plan(tuple(g.site for g in groups), (1, 1, 1))
    model = S.remove_channels(model, {k: ~r for k, r in remove.items()}, plan)
    if isinstance(model, CifarResNet):
      _fix_pads(model)
  final = S.site_widths(model, S.Plan(tuple(g.site for g in groups), (1, 1, 1)))
  if drop_dead_inputs and isinstance(model, LeNet300100):
    full = int(model.fc1.in_features)
    inputs = (_select_inputs(model), full)
  report = CompactionReport(
    tuple(
      GroupReport(g.name, widths[g.name], final[g.name], *totals[g.name], kept_constant[g.name])
      for g in groups
    ),
    inputs,
    rounds,
  )
  return model, report


# --------------------------------------------------------------------------
# Sparse execution.


class SparseLinear(nnx.Module):
  """``x @ kernel + bias`` from the kernel's non-zero entries only.

  Uses :func:`optax_gsm.compaction.coo_matmul`. The values are an
  ``nnx.Param`` (counted as parameters), the indices an :class:`Index`.

  Args:
    kernel: ``(in_features, out_features)``.
    bias: ``(out_features,)`` or None.
    index: the input positions of the kernel's rows in the layer's input
      (for a :class:`SelectInputs`), or None for ``0..in_features-1``.
    in_features: the width of the layer's input (default: the kernel's).
  """

  def __init__(
    self,
    kernel: np.ndarray,
    bias: np.ndarray | None,
    *,
    index: np.ndarray | None = None,
    in_features: int | None = None,
  ):
    kernel = np.asarray(kernel)
    rows, cols, values = cl.coo_kernel(kernel)
    if index is not None:
      rows = np.asarray(index, np.int32)[rows]
    self.in_features = int(kernel.shape[0] if in_features is None else in_features)
    self.out_features = int(kernel.shape[1])
    self.rows = Index(jnp.asarray(rows))
    self.cols = Index(jnp.asarray(cols))
    self.values = nnx.Param(jnp.asarray(values))
    self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))

  @property
  def nonzeros(self) -> int:
    return int(self.values[...].size)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = cl.coo_matmul(x, self.rows[...], self.cols[...], self.values[...], self.out_features)
    return y if self.bias is None else y + self.bias[...]


class GatherConv(nnx.Module):
  """A 2-D convolution from the (tap, input channel) pairs it uses.

  The input features of every output position that some non-zero weight
  reads are gathered (an im2col restricted to those ``F`` pairs), then
  multiplied by the matching ``(F, out_features)`` rows of the kernel. It
  equals ``conv`` up to rounding; it pays when ``F`` is much smaller than
  ``kh * kw * in_features``.

  Args:
    conv: an ``nnx.Conv`` with 2 spatial dimensions, no feature groups, no
      input dilation and no mask.
  """

  def __init__(self, conv: nnx.Conv):
    kernel = _np(conv, "kernel")
    if (
      kernel.ndim != 4
      or conv.feature_group_count != 1
      or getattr(conv, "mask", None) is not None
      or _tuple2(conv.input_dilation) != (1, 1)
    ):
      raise ValueError(
        "GatherConv takes a plain 2-D convolution (no groups, "
        f"mask or input dilation); got kernel {kernel.shape}."
      )
    used = np.any(kernel != 0, axis=3)  # (kh, kw, cin)
    if not used.any():
      used[0, 0, 0] = True
    dh, dw, ch = np.nonzero(used)
    self.taps = Index(jnp.asarray(np.stack([dh, dw, ch], 1).astype(np.int32)))
    self.kernel = nnx.Param(jnp.asarray(kernel[dh, dw, ch]))  # (F, cout)
    self.bias = None if conv.bias is None else nnx.Param(jnp.asarray(_np(conv, "bias")))
    self.kernel_size = tuple(int(k) for k in kernel.shape[:2])
    self.strides = _tuple2(conv.strides)
    self.dilation = _tuple2(conv.kernel_dilation)
    self.padding = conv.padding
    self.in_features = int(kernel.shape[2])
    self.out_features = int(kernel.shape[3])

  @property
  def features(self) -> int:
    return int(self.kernel[...].shape[0])

  def __call__(self, x: jax.Array) -> jax.Array:
    pads = self.padding
    if isinstance(pads, str):
      eff = [(k - 1) * d + 1 for k, d in zip(self.kernel_size, self.dilation)]
      pads = jax.lax.padtype_to_pads(x.shape[1:3], eff, self.strides, pads)
    elif isinstance(pads, int):
      pads = ((pads, pads), (pads, pads))
    x = jnp.pad(x, ((0, 0), *[tuple(int(v) for v in p) for p in pads], (0, 0)))
    (sh, sw), (ah, aw) = self.strides, self.dilation
    kh, kw = self.kernel_size
    ho = (x.shape[1] - (kh - 1) * ah - 1) // sh + 1
    wo = (x.shape[2] - (kw - 1) * aw - 1) // sw + 1
    taps = self.taps[...]
    rows = (jnp.arange(ho) * sh)[:, None, None] + (taps[:, 0] * ah)[None, None, :]
    cols = (jnp.arange(wo) * sw)[None, :, None] + (taps[:, 1] * aw)[None, None, :]
    patches = x[:, rows, cols, taps[:, 2][None, None, :]]  # (N, ho, wo, F)
    y = patches @ self.kernel[...].astype(x.dtype)
    return y if self.bias is None else y + self.bias[...]


def _tuple2(v: Any) -> tuple[int, int]:
  if v is None:
    return (1, 1)
  if isinstance(v, int):
    return (v, v)
  return tuple(int(a) for a in v)  # type: ignore[return-value]


@contextlib.contextmanager
def _patched(classes: tuple[type, ...], record) -> Iterator[None]:
  """``record(module, x, out)`` after every call of ``classes`` instances."""
  originals = {cls: cls.__dict__["__call__"] for cls in classes}

  def wrap(original):
    def __call__(self, x, *args, **kwargs):
      out = original(self, x, *args, **kwargs)
      record(self, x, out)
      return out

    return __call__

  try:
    for cls, original in originals.items():
      cls.__call__ = wrap(original)
    yield
  finally:
    for cls, original in originals.items():
      cls.__call__ = original


def _trace_shapes(
  model: nnx.Module, input_shape: Sequence[int], classes: tuple[type, ...]
) -> dict[tuple, tuple]:
  """``{path: (input shape, output shape)}`` of the calls of ``classes``."""
  graphdef, state = nnx.split(model)
  records: dict[tuple, tuple] = {}
  paths: dict[int, tuple] = {}

  def forward(state, x):
    m = nnx.merge(graphdef, state)
    paths.clear()
    paths.update({id(n): tuple(p) for p, n in nnx.iter_graph(m) if isinstance(n, classes)})
    return m(x)

  def record(module, x, out):
    if id(module) in paths:
      records[paths[id(module)]] = (tuple(x.shape), tuple(out.shape))

  with _patched(classes, record):
    jax.eval_shape(forward, state, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
  return records


def layer_inputs(model: nnx.Module, input_shape: Sequence[int]) -> dict[tuple, tuple]:
  """The input shape of every Conv / Linear / SelectInputs call, by path."""
  traced = _trace_shapes(model, input_shape, (nnx.Conv, nnx.Linear, SelectInputs))
  return {p: shapes[0] for p, shapes in traced.items()}


def sparse_candidate(module: Any) -> nnx.Module | None:
  """The sparse replacement of a layer, or None (a 1-D or grouped conv)."""
  if isinstance(module, SelectInputs):
    return SparseLinear(
      _np(module.layer, "kernel"),
      _np(module.layer, "bias"),
      index=np.asarray(module.index[...]),
      in_features=module.in_features,
    )
  if isinstance(module, nnx.Linear):
    return SparseLinear(_np(module, "kernel"), _np(module, "bias"))
  if isinstance(module, nnx.Conv):
    try:
      return GatherConv(module)
    except ValueError:
      return None
  return None


def time_interleaved(fns: Mapping[str, Any], *args: Any, repeats: int) -> dict[str, list[float]]:
  """Seconds per call of each jitted ``fn(*args)``, the calls interleaved.

  Two warm-up calls each, then ``repeats`` rounds that call every function
  once (in turn), so that load changes hit all of them alike.
  """
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[k].append(time.perf_counter() - t0)
  return times


def _apply_fn(module: nnx.Module):
  graphdef, state = nnx.split(module)

  @jax.jit
  def fn(state, x):
    return nnx.merge(graphdef, state)(x)

  return fn, state


def _set_at(model: nnx.Module, path: ModulePath, value: Any) -> None:
  parent = S.module_at(model, path[:-1])
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


@dataclasses.dataclass(frozen=True)
class LayerChoice:
  """The choice of :func:`sparsify` for one layer (times in seconds)."""

  path: str
  kind: str  # "SparseLinear" or "GatherConv"
  sparse: bool
  dense_s: float | None
  sparse_s: float | None


def sparsify(
  model: nnx.Module,
  input_shape: Sequence[int],
  *,
  choice: str = "time",
  repeats: int = 30,
  margin: float = 1.1,
  seed: int = 0,
) -> tuple[nnx.Module, tuple[LayerChoice, ...]]:
  r"""A copy of ``model`` with sparse layers where they are faster.

  Every ``nnx.Linear`` (or :class:`SelectInputs`) gets a
  :class:`SparseLinear` candidate and every 2-D ``nnx.Conv`` a
  :class:`GatherConv`. With ``choice="time"`` each candidate and the layer
  it would replace are jitted and timed alone, interleaved, on random
  inputs of the layer's input shape for ``input_shape`` (so the batch size
  matters), and the candidate is taken when its median time times
  ``margin`` is below the layer's.

  Args:
    model: a (compacted) model, in evaluation mode; it is not modified.
    input_shape: the model's input shape, batch first.
    choice: ``"time"``, ``"sparse"`` (every candidate) or ``"dense"`` (none).
    repeats: timing rounds per layer.
    margin: how much faster the candidate must be (>= 1).
    seed: of the random timing inputs.

  Returns:
    ``(model, choices)``: the new model and one :class:`LayerChoice` per
    candidate.

  Raises:
    ValueError: for a bad ``choice``, ``repeats`` or ``margin``.

  Example:
    >>> from flax import nnx
    >>> from experiments.models.lenet import LeNet300100
    >>> model = LeNet300100(rngs=nnx.Rngs(0))
    >>> sparse, choices = sparsify(model, (1, 28, 28, 1), choice="sparse")
    >>> [c.kind for c in choices]
    ['SparseLinear', 'SparseLinear', 'SparseLinear']
  """
  if choice not in CHOICES:
    raise ValueError(f"`choice` must be one of {CHOICES}, got {choice!r}.")
  if not isinstance(repeats, int) or repeats < 1:
    raise ValueError(f"`repeats` must be a positive integer, got {repeats!r}.")
  if not margin >= 1:
    raise ValueError(f"`margin` must be >= 1, got {margin!r}.")
  model = nnx.clone(model)
  shapes = layer_inputs(model, input_shape)
  rng = np.random.default_rng(seed)
  choices = []
  inside_select = {
    p + ("layer",) for p in shapes if isinstance(S.module_at(model, p), SelectInputs)
  }
  for path in sorted(shapes, key=str):
    if path in inside_select:
      continue
    module = S.module_at(model, path)
    cand = sparse_candidate(module)
    if cand is None:
      continue
    dense_s = sparse_s = None
    take = choice == "sparse"
    if choice == "time":
      x = jnp.asarray(rng.standard_normal(shapes[path]).astype(np.float32))
      (fd, sd), (fs, ss) = _apply_fn(module), _apply_fn(cand)
      times = time_interleaved(
        {"dense": lambda x: fd(sd, x), "sparse": lambda x: fs(ss, x)}, x, repeats=repeats
      )
      dense_s = statistics.median(times["dense"])
      sparse_s = statistics.median(times["sparse"])
      take = sparse_s * margin < dense_s
    if take:
      _set_at(model, path, cand)
    choices.append(
      LayerChoice("/".join(map(str, path)), type(cand).__name__, take, dense_s, sparse_s)
    )
  return model, tuple(choices)


def executed_macs(model: nnx.Module, input_shape: Sequence[int]) -> int:
  """Multiply-adds per example of the kernels as executed.

  A dense Conv / Linear counts its full kernel at each output position, a
  :class:`SparseLinear` its non-zeros, a :class:`GatherConv` its gathered
  ``F x out_features`` kernel at each output position.
  """
  shape = (1,) + tuple(input_shape)[1:]
  traced = _trace_shapes(model, shape, (nnx.Conv, nnx.Linear, SparseLinear, GatherConv))
  records = {p: shapes[1] for p, shapes in traced.items()}
  total = 0
  for path, out in records.items():
    node = S.module_at(model, path)
    positions = int(np.prod(out[1:-1], dtype=np.int64))
    if isinstance(node, SparseLinear):
      total += positions * node.nonzeros
    else:
      total += positions * int(np.prod(node.kernel[...].shape, dtype=np.int64))
  return total
