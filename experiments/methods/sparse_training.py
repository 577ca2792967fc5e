"""Dynamic sparse training: RigL (Evci et al., ICML 2020) and SET (Mocanu et al., 2018).

Both start from the dense base cut to exactly Q kernel weights **per layer by
magnitude**, with the layer counts of the Erdos-Renyi-Kernel distribution
(``optax_gsm.baselines.layer_densities(..., "erk")`` then ``density_prune``: small
layers stay denser; on LeNet-300-100 the classifier is dense from 10x to 60x).
Then they train ``budget.epochs`` epochs with the retraining recipe (momentum SGD,
lr ``budget.lr`` cosine to 0, weight decay on kernels), and every ``update_interval``
updates until 75% of the updates (RigL's T_end), each layer drops the fraction
0.3 * (1 + cos(pi t / T_end)) / 2 of its weights of smallest magnitude and regrows
as many: ``rigl`` where the dense gradient is largest, ``set`` at random (key: the
budget's seed). The interval is RigL's 100 updates, shortened to T_end / 5 when the
budget has fewer than 500 updates before T_end, so that there are at least five
topology updates. Grown weights start at 0 with zero momentum.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from optax_gsm import baselines
from experiments.methods import common
from experiments.methods.common import Context, MethodResult

DISTRIBUTION = "erk"
DROP_FRACTION = 0.3
END_FRACTION = 0.75
UPDATE_INTERVAL = 100


def topology_schedule(total_steps: int) -> tuple[int, int]:
  """``(end_step, update_interval)`` for a run of ``total_steps`` updates."""
  end = max(1, int(END_FRACTION * total_steps))
  return end, max(1, min(UPDATE_INTERVAL, end // 5))


def _run(ctx: Context, name: str) -> MethodResult:
  t0 = time.perf_counter()
  b = ctx.budget
  total = b.epochs * ctx.steps_per_epoch
  end, interval = topology_schedule(total)
  densities = baselines.layer_densities(
    ctx.base_params, ctx.num_nonzero / ctx.num_eligible, DISTRIBUTION
  )
  pruned, masks = baselines.density_prune(ctx.base_params, densities, num_nonzero=ctx.num_nonzero)
  masks = common.to_numpy(masks)  # kept for the end: the training step donates its state
  acc0 = common.evaluate(ctx, pruned)
  inner = common.sgd(common.cosine(b.lr, total), b)
  kwargs = dict(update_interval=interval, end_step=end, drop_fraction=DROP_FRACTION)
  if name == "rigl":
    tx = baselines.rigl(inner, masks, **kwargs)
  else:
    tx = baselines.sparse_evolutionary_training(inner, masks, key=b.seed, **kwargs)
  out = common.train(ctx, pruned, tx, b.epochs, name=name)
  final = baselines.sparse_training_masks(out.opt_state)
  flags = common.eligible_flags(ctx.base_params)
  start_leaves, final_leaves = jax.tree.leaves(masks), jax.tree.leaves(final)
  moved = sum(
    int(np.sum(np.asarray(f) & ~np.asarray(s)))
    for s, f, e in zip(start_leaves, final_leaves, flags)
    if e
  )
  paths = [
    jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(ctx.base_params)[0]
  ]
  counts = {p: int(np.sum(np.asarray(m))) for p, m, e in zip(paths, final_leaves, flags) if e}
  return ctx.result(
    name,
    out.params,
    epochs=b.epochs,
    starts_from="base",
    wall_seconds=time.perf_counter() - t0,
    train_seconds=out.seconds,
    extra={
      "acc_before_retrain": acc0,
      "distribution": DISTRIBUTION,
      "layer_counts": counts,
      "update_interval": interval,
      "end_step": end,
      "drop_fraction": DROP_FRACTION,
      "mask_updates": (end - 1) // interval,
      "moved": moved,
    },
  )


def run_rigl(ctx: Context) -> MethodResult:
  """RigL (Evci et al. 2020): regrow where the dense gradient is largest."""
  return _run(ctx, "rigl")


def run_set(ctx: Context) -> MethodResult:
  """SET (Mocanu et al. 2018): regrow at random."""
  return _run(ctx, "set")


METHODS = {"rigl": run_rigl, "set": run_set}
