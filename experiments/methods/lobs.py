"""Layer-wise OBS (Dong et al., NeurIPS 2017) in the comparison.

1. Layer inputs of the dense base are recorded over ``budget.calib_batches``
   training batches (every ``nnx.Linear`` and ``nnx.Conv`` call; conv inputs are
   turned into patches, so a conv layer is a dense layer on patches), giving one
   Hessian ``H = mean x x^T`` per layer, with the bias as an extra input.
2. ``optax_gsm.baselines.lobs_prune`` keeps exactly Q weights: each layer keeps
   as many as a global magnitude cut would give it, chosen within the layer by the
   L-OBS sensitivity ``w_q^2 / (2 [H^-1]_qq)``, and each neuron's pruned set is
   removed with the exact OBS compensation of the remaining weights and the bias
   (damping 1e-4 of the mean diagonal).
3. A light retrain with the mask fixed (``budget.epochs`` epochs, as for
   every retraining method, so the budgets stay comparable).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from optax_gsm import baselines
from experiments.methods import common
from experiments.methods.common import Context, MethodResult

DAMPING = 1e-4
# Per-layer counts of the global magnitude cut: ranking L-OBS sensitivities of
# different layers against each other starved fc1 of LeNet-300-100 completely
# (0 weights kept at 30x, 10% accuracy), see optax_gsm.baselines.lobs_prune.
ALLOCATION = "magnitude"


def _pair(v: Any) -> tuple[int, int]:
  if v is None:
    return (1, 1)
  if isinstance(v, int):
    return (v, v)
  return tuple(int(x) for x in v)  # type: ignore[return-value]


def _conv_rows(conv: nnx.Conv, x: Any) -> Any:
  if (
    _pair(conv.kernel_dilation) != (1, 1)
    or _pair(conv.input_dilation) != (1, 1)
    or conv.feature_group_count != 1
  ):
    raise NotImplementedError(
      "L-OBS patches here support plain convolutions only (no dilation, no groups)."
    )
  if isinstance(conv.padding, str) and conv.padding not in ("VALID", "SAME"):
    raise NotImplementedError(f"padding {conv.padding!r} is not supported")
  return baselines.conv_patches(
    x, conv.kernel.shape, strides=_pair(conv.strides), padding=conv.padding
  )


@contextlib.contextmanager
def record_layer_inputs(
  model: nnx.Module, sink: dict[str, baselines.HessianAccumulator]
) -> Iterator[None]:
  """While active, every Linear / Conv call of ``model`` adds its inputs to ``sink``.

  ``sink`` maps the layer's path (``"fc1"``, ``"blocks/0/conv"``) to a
  :class:`optax_gsm.baselines.HessianAccumulator` of its (bias-augmented) inputs.
  Call the model eagerly (not under ``jit``) inside the block.
  """
  paths = {id(m): "/".join(str(p) for p in path) for path, m in nnx.iter_modules(model)}
  orig_linear, orig_conv = nnx.Linear.__call__, nnx.Conv.__call__

  def add(layer: Any, rows: Any) -> None:
    name = paths.get(id(layer))
    if name is None:  # a layer of another model
      return
    sink.setdefault(name, baselines.HessianAccumulator()).add(
      rows, with_bias=layer.bias is not None
    )

  def linear_call(self, inputs, *args, **kwargs):
    add(self, inputs.reshape(-1, inputs.shape[-1]))
    return orig_linear(self, inputs, *args, **kwargs)

  def conv_call(self, inputs, *args, **kwargs):
    add(self, _conv_rows(self, inputs))
    return orig_conv(self, inputs, *args, **kwargs)

  nnx.Linear.__call__, nnx.Conv.__call__ = linear_call, conv_call
  try:
    yield
  finally:
    nnx.Linear.__call__, nnx.Conv.__call__ = orig_linear, orig_conv


def layer_hessians(ctx: Context, params: common.Params) -> dict[str, np.ndarray]:
  """``path -> H`` (bias-augmented) of every Linear / Conv of the model at ``params``."""
  model = nnx.clone(ctx.module)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  model.eval()
  sink: dict[str, baselines.HessianAccumulator] = {}
  with record_layer_inputs(model, sink):
    for batch in common.calibration_batches(ctx):
      jax.block_until_ready(model(batch.image))
  return {name: acc.hessian() for name, acc in sink.items()}


def _get(tree: dict[str, Any], name: str) -> dict[str, Any]:
  for part in name.split("/"):
    tree = tree[int(part) if part.isdigit() and part not in tree else part]
  return tree


def lobs_params(
  ctx: Context, params: common.Params, num_nonzero: int
) -> tuple[common.Params, common.Params, dict[str, int]]:
  """L-OBS of ``params`` to exactly ``num_nonzero`` eligible weights.

  Returns:
    ``(new_params, masks, per-layer kept counts)``.
  """
  hessians = layer_hessians(ctx, params)
  params = common.to_numpy(params)
  kernels = {n: _get(params, n)["kernel"] for n in hessians}
  biases = {n: _get(params, n)["bias"] for n in hessians if "bias" in _get(params, n)}
  covered = sum(int(np.size(k)) for k in kernels.values())
  if covered != ctx.num_eligible:
    raise NotImplementedError(
      f"L-OBS covers Linear and Conv kernels ({covered} weights) but the model has "
      f"{ctx.num_eligible} eligible weights"
    )
  out = baselines.lobs_prune(
    kernels, hessians, num_nonzero, biases=biases, allocation=ALLOCATION, damping=DAMPING
  )
  new = jax.tree.map(np.copy, params)
  for n, r in out.items():
    layer = _get(new, n)
    layer["kernel"] = r["kernel"].astype(layer["kernel"].dtype)
    if r["bias"] is not None:
      layer["bias"] = r["bias"].astype(layer["bias"].dtype)
  masks = jax.tree.map(lambda x: np.ones(np.shape(x), bool), new)
  for n, r in out.items():
    _get(masks, n)["kernel"] = np.asarray(r["mask"])
  # float32 rounding cannot turn a compensated weight into exact zero in
  # practice, but make the count exact regardless.
  new = baselines.apply_masks(new, masks)
  return new, masks, {n: r["num_keep"] for n, r in out.items()}


def run_lobs(ctx: Context) -> MethodResult:
  t0 = time.perf_counter()
  pruned, masks, counts = lobs_params(ctx, ctx.base_params, ctx.num_nonzero)
  t_prune = time.perf_counter() - t0
  acc0 = common.evaluate(ctx, pruned)
  out = common.retrain_fixed_mask(ctx, pruned, masks, ctx.budget.epochs)
  return ctx.result(
    "lobs",
    out.params,
    epochs=ctx.budget.epochs,
    starts_from="base",
    wall_seconds=time.perf_counter() - t0,
    train_seconds=out.seconds,
    extra={
      "acc_before_retrain": acc0,
      "prune_seconds": t_prune,
      "kept_per_layer": counts,
      "allocation": ALLOCATION,
      "damping": DAMPING,
      "calib_batches": ctx.budget.calib_batches,
    },
  )


METHODS = {"lobs": run_lobs}
