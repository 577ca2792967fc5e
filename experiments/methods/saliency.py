"""One-shot global saliency pruning by ``|g * w|`` (the control for GSM's metric).

The dense base's Taylor scores ``sum_b |g_b * w|`` over ``budget.calib_batches``
training batches pick the Q weights to keep, once; then ``budget.epochs`` epochs of
retraining with the mask fixed, exactly as ``magnitude_retrain``. Against GSM
this separates what the metric buys from what GSM's training dynamics buy.
"""

from __future__ import annotations

import time

import jax

from optax_gsm import baselines
from experiments.methods import common
from experiments.methods.common import Context, MethodResult
from experiments.training import cross_entropy_loss


def saliency_scores(ctx: Context, params: common.Params) -> common.Params:
  """``sum_b |g_b * w|`` over the calibration batches."""
  apply = ctx.apply

  @jax.jit
  def add(scores, params, images, labels):
    grads = jax.grad(lambda p: cross_entropy_loss(apply(p, images), labels).mean())(params)
    return baselines.accumulate_saliency(scores, grads, params)

  scores = baselines.init_saliency(params)
  for batch in common.calibration_batches(ctx):
    scores = add(scores, params, batch.image, batch.label)
  return scores


def run_saliency(ctx: Context) -> MethodResult:
  t0 = time.perf_counter()
  scores = saliency_scores(ctx, ctx.base_params)
  pruned, masks = baselines.saliency_prune(ctx.base_params, scores, ctx.num_nonzero)
  acc0 = common.evaluate(ctx, pruned)
  out = common.retrain_fixed_mask(ctx, pruned, masks, ctx.budget.epochs)
  return ctx.result(
    "saliency_retrain",
    out.params,
    epochs=ctx.budget.epochs,
    starts_from="base",
    wall_seconds=time.perf_counter() - t0,
    train_seconds=out.seconds,
    extra={"acc_before_retrain": acc0, "calib_batches": ctx.budget.calib_batches},
  )


METHODS = {"saliency_retrain": run_saliency}
