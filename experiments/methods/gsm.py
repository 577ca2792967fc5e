"""GSM (Ding et al., NeurIPS 2019) in the comparison: train from the base with
``optax_gsm.gsm`` (its default rule; Q ramped from N over ``budget.gsm_ramp_fraction`` of the
steps) for ``budget.epochs`` epochs, then the global magnitude cut to exactly Q (no fine-tuning,
as in the paper).

The final masks are kept in ``ctx.artifacts`` and cached on disk for GSM tickets
(:mod:`experiments.methods.lottery`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import optax_gsm
from experiments.methods import common
from experiments.methods.common import Context, MethodResult


def masks_path(ctx: Context) -> Path:
  """Where the GSM masks of this (model, compression, budget) are cached."""
  b = ctx.budget
  # Only what GSM's result depends on, so changing, e.g., the retraining lr
  # does not invalidate the masks that GSM tickets reuse.
  key = common.config_hash(
    {
      "base": b.base_key(),
      "epochs": b.epochs,
      "gsm_lr": b.gsm_lr,
      "gsm_momentum": b.gsm_momentum,
      "gsm_weight_decay": b.gsm_weight_decay,
      "gsm_unselected_shrink": optax_gsm.DEFAULT_UNSELECTED_SHRINK,
      "model": ctx.model,
      "dataset": ctx.dataset,
      "q": ctx.num_nonzero,
      # Only when set, so the masks cached before the field existed still match.
      **({"gsm_ramp_fraction": b.gsm_ramp_fraction} if b.gsm_ramp_fraction else {}),
    }
  )
  return ctx.cache_dir / f"{ctx.dataset}_{ctx.model}_gsm_{ctx.compression:g}x_{key}.npz"


def gsm_target(ctx: Context) -> dict[str, Any]:
  """``gsm``'s target: Q, or with ``budget.gsm_ramp_fraction`` a ramp from N to Q.

  The ramp ends at C = N / Q (float64), which ``gsm`` rounds back to Q (tested).
  """
  b = ctx.budget
  ramp_steps = int(b.gsm_ramp_fraction * b.epochs * ctx.steps_per_epoch)
  if ramp_steps < 1:
    return {"num_nonzero": ctx.num_nonzero}
  return {"compression": optax_gsm.compression_ramp(ctx.num_eligible / ctx.num_nonzero, ramp_steps)}


def run_gsm(ctx: Context) -> MethodResult:
  """GSM from the dense base, then ``magnitude_prune`` to Q."""
  t0 = time.perf_counter()
  b = ctx.budget
  schedule = common.cosine(b.gsm_lr, b.epochs * ctx.steps_per_epoch)
  tx = optax_gsm.gsm(
    schedule, **gsm_target(ctx), momentum=b.gsm_momentum, weight_decay=b.gsm_weight_decay
  )
  out = common.train(ctx, ctx.base_params, tx, b.epochs, name="gsm")
  acc_unpruned = common.evaluate(ctx, out.params)
  pruned, masks = optax_gsm.magnitude_prune(out.params, ctx.num_nonzero)
  ctx.artifacts.setdefault("gsm_masks", {})[ctx.compression] = common.to_numpy(masks)
  common.save_tree(
    masks_path(ctx), masks, {"compression": ctx.compression, "num_nonzero": ctx.num_nonzero}
  )
  return ctx.result(
    "gsm",
    pruned,
    epochs=b.epochs,
    starts_from="base",
    wall_seconds=time.perf_counter() - t0,
    train_seconds=out.seconds,
    extra={"acc_before_cut": acc_unpruned},
  )


def gsm_masks(ctx: Context) -> common.Params:
  """GSM's final masks at ``ctx.compression``: from this invocation, the cache, or a new run."""
  got = ctx.artifacts.get("gsm_masks", {}).get(ctx.compression)
  if got is not None:
    return got
  path = masks_path(ctx)
  if path.exists():
    masks, _ = common.load_tree(path, ctx.base_params)
    return masks
  ctx.log("  [gsm] no GSM masks for this setting yet: running GSM first")
  run_gsm(ctx)
  return ctx.artifacts["gsm_masks"][ctx.compression]


METHODS = {"gsm": run_gsm}
