"""AutoPrune (Xiao et al., NeurIPS 2019) in the comparison at a fixed weight count.

``autoprune``: unstructured AutoPrune with the Softplus straight-through
estimate and AutoPrune's sign-decoupled mask update, from the dense base, for
``budget.epochs`` epochs: masks (started at ``|w| / mean|w|`` per
layer, so a short budget degrades towards magnitude pruning) and weights
train jointly for 70% of the updates, with the regulariser strength steered
towards Q (AutoPrune itself has no count target); then the Q weights with the
largest mask parameter are kept (exactly Q) and fine-tune with the masks
frozen for the last 30%.
See :func:`experiments.structured.autoprune_to_count`.

The structured methods of :mod:`experiments.structured` (Taylor and Fisher
feature-map pruning, structured AutoPrune) remove whole channels and cannot
meet an exact weight count, so they are not in this table; they have their
own FLOPs-target runs (``python -m experiments.structured``).
"""

from __future__ import annotations

import time

from experiments import structured
from experiments.methods.common import Context, MethodResult


def run_autoprune(ctx: Context) -> MethodResult:
  t0 = time.perf_counter()
  steps = ctx.budget.epochs * ctx.steps_per_epoch
  params, info = structured.autoprune_to_count(
      ctx.apply, ctx.base_params, ctx.train, num_nonzero=ctx.num_nonzero,
      steps=steps, lr=ctx.budget.lr, momentum=ctx.budget.momentum,
      log=ctx.log)
  seconds = time.perf_counter() - t0
  info.pop("history")
  return ctx.result("autoprune", params, epochs=ctx.budget.epochs,
                    starts_from="base", wall_seconds=seconds,
                    train_seconds=seconds, extra=info)


METHODS = {"autoprune": run_autoprune}
