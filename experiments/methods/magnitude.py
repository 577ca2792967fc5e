"""Magnitude pruning (Han et al., NeurIPS 2015) and gradual pruning (Zhu and Gupta, 2017).

* ``magnitude_oneshot``: global magnitude cut of the dense base to Q, no retraining
  (what GSM's final cut would give without GSM training).
* ``magnitude_retrain``: the same cut, then ``budget.epochs`` epochs of retraining
  with the mask fixed (Han et al.'s prune + retrain, one iteration, global cut).
* ``magnitude_gradual``: from the base, re-prune globally to TF-MOT's polynomial
  sparsity every half epoch over the first 2/3 of ``budget.epochs`` epochs, then
  train the rest with the mask fixed (``scheduled_magnitude_prune``).
"""

from __future__ import annotations

import time

import optax

import optax_gsm
from optax_gsm import baselines
from experiments.methods import common
from experiments.methods.common import Context, MethodResult


def run_oneshot(ctx: Context) -> MethodResult:
  t0 = time.perf_counter()
  pruned, _ = optax_gsm.magnitude_prune(ctx.base_params, ctx.num_nonzero)
  return ctx.result(
    "magnitude_oneshot",
    pruned,
    epochs=0,
    starts_from="base",
    wall_seconds=time.perf_counter() - t0,
    train_seconds=0.0,
  )


def run_retrain(ctx: Context) -> MethodResult:
  t0 = time.perf_counter()
  pruned, masks = optax_gsm.magnitude_prune(ctx.base_params, ctx.num_nonzero)
  acc0 = common.evaluate(ctx, pruned)
  out = common.retrain_fixed_mask(ctx, pruned, masks, ctx.budget.epochs)
  return ctx.result(
    "magnitude_retrain",
    out.params,
    epochs=ctx.budget.epochs,
    starts_from="base",
    wall_seconds=time.perf_counter() - t0,
    train_seconds=out.seconds,
    extra={"acc_before_retrain": acc0},
  )


def run_gradual(ctx: Context) -> MethodResult:
  t0 = time.perf_counter()
  b = ctx.budget
  spe = ctx.steps_per_epoch
  total = b.epochs * spe
  end = max(1, (2 * total) // 3)
  frequency = max(1, spe // 2)
  target = 1.0 - ctx.num_nonzero / ctx.num_eligible
  sparsity = baselines.polynomial_sparsity_schedule(0.0, target, 0, end, power=3)
  tx = optax.chain(
    common.sgd(common.cosine(b.lr, total), b),
    baselines.scheduled_magnitude_prune(
      sparsity, frequency=frequency, begin_step=0, end_step=end, scope="global"
    ),
  )
  out = common.train(ctx, ctx.base_params, tx, b.epochs, name="gradual")
  params = out.params
  nz = common.count_nonzero(params)
  if nz > ctx.num_nonzero:  # only if the last scheduled prune was never reached
    params, _ = optax_gsm.magnitude_prune(params, ctx.num_nonzero)
  return ctx.result(
    "magnitude_gradual",
    params,
    epochs=b.epochs,
    starts_from="base",
    wall_seconds=time.perf_counter() - t0,
    train_seconds=out.seconds,
    extra={
      "prune_every_steps": frequency,
      "prune_end_step": end,
      "schedule": "polynomial, power 3, 0 -> 1 - Q/N",
    },
  )


METHODS = {
  "magnitude_oneshot": run_oneshot,
  "magnitude_retrain": run_retrain,
  "magnitude_gradual": run_gradual,
}
