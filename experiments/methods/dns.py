"""Dynamic Network Surgery (Guo et al., NeurIPS 2016) in the comparison.

DNS sets its compression through the threshold rate ``c`` rather than a count, so
to compare at a given Q:

1. ``c`` (one value for all layers) is found by bisection so that the first
   surgery step on the dense base keeps Q weights (``|w| >= 0.9 t``);
2. surgery + splicing for the first 70% of ``budget.epochs`` epochs, starting
   from the base, with the forward pass on ``W * T``
   (``optax_gsm.baselines.surgery_forward``) and the paper's LeNet settings
   ``gamma = 1e-4``, ``power = 1``;
3. at the stop step the masks freeze; if more than Q weights survive, the
   smallest ``|W * T|`` are cut to leave exactly Q (our adaptation, so that every
   method is compared at the same count; fewer survivors are kept as they are);
4. the remaining 30% of the epochs train with the mask fixed.
"""

from __future__ import annotations

import time

import jax
import numpy as np
import optax

import optax_gsm
from optax_gsm import baselines
from experiments.methods import common
from experiments.methods.common import Context, MethodResult

GAMMA = 1e-4
POWER = 1.0
SURGERY_FRACTION = 0.7


def kept_at_first_surgery(params: common.Params, c: float) -> int:
  """Weights the first DNS step keeps on ``params`` (all masks start at 1)."""
  thresholds = baselines.dns_thresholds(params, c)
  flags = common.eligible_flags(params)
  eligible = [np.abs(np.asarray(l)) for l, f in zip(jax.tree.leaves(params), flags) if f]
  return int(sum(int(np.sum(a >= 0.9 * float(t))) for a, t in zip(eligible, thresholds)))


def calibrate_c(params: common.Params, num_nonzero: int, *, iters: int = 60) -> float:
  """The ``c`` whose first surgery step keeps (as close as possible to) Q weights."""
  lo, hi = -5.0, 5.0
  while kept_at_first_surgery(params, hi) > num_nonzero and hi < 1e3:
    hi *= 2
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    if kept_at_first_surgery(params, mid) > num_nonzero:
      lo = mid
    else:
      hi = mid
  return hi


def run_dns(ctx: Context) -> MethodResult:
  t0 = time.perf_counter()
  b = ctx.budget
  spe = ctx.steps_per_epoch
  e1 = max(1, int(round(SURGERY_FRACTION * b.epochs)))
  e2 = max(0, b.epochs - e1)
  c = calibrate_c(ctx.base_params, ctx.num_nonzero)
  stop = e1 * spe
  schedule = common.cosine(b.lr, b.epochs * spe)
  tx = optax.chain(
    baselines.dynamic_network_surgery(c, gamma=GAMMA, power=POWER, stop_step=stop, seed=b.seed),
    common.sgd(schedule, b),
  )

  def forward(params, opt_state):
    return baselines.surgery_forward(params, baselines.dns_masks(opt_state, params))

  out = common.train(ctx, ctx.base_params, tx, e1, forward=forward, name="dns surgery")
  masks = baselines.dns_masks(out.opt_state, out.params)
  survivors = baselines.count_kept(masks, optax_gsm.default_where(out.params))
  masked = baselines.apply_masks(out.params, masks)
  acc_surgery = common.evaluate(ctx, masked)
  if survivors > ctx.num_nonzero:
    masks = baselines.imp_masks(out.params, masks, ctx.num_nonzero)
  # Phase 2 continues the same cosine schedule where surgery stopped.
  tx2 = optax.chain(
    common.sgd(lambda step: schedule(step + stop), b),
    baselines.masked_updates(masks),
  )
  out2 = common.train(
    ctx, baselines.apply_masks(out.params, masks), tx2, e2, name="dns fixed mask", first_epoch=e1
  )
  return ctx.result(
    "dns",
    out2.params,
    epochs=b.epochs,
    starts_from="base",
    wall_seconds=time.perf_counter() - t0,
    train_seconds=out.seconds + out2.seconds,
    extra={
      "c_rate": c,
      "survivors_at_stop": survivors,
      "acc_at_stop": acc_surgery,
      "surgery_epochs": e1,
      "fixed_mask_epochs": e2,
      "gamma": GAMMA,
      "power": POWER,
    },
  )


METHODS = {"dns": run_dns}
