"""GSM at a given number of non-zero weights, for comparison with the structured methods.

:func:`gsm_baseline` trains with ``optax_gsm.gsm`` (Ding et al., NeurIPS 2019)
on the same gated-model view, data order and step as the other methods here,
then keeps the Q largest kernel weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

import optax_gsm
from experiments.structured.gating import GatedModel
from experiments.structured.tuning import batches, evaluate
from experiments.training import make_train_step


def gsm_baseline(
  model: nnx.Module,
  train: Any,
  test: Any | None,
  *,
  num_nonzero: int,
  steps: int,
  lr: float = 0.01,
  momentum: float = 0.98,
  weight_decay: float = 5e-4,
  seed: int = 0,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """``optax_gsm.gsm`` for ``steps`` updates, then magnitude pruning to Q.

  Args:
    model: the starting model (unchanged).
    train, test: the pipelines (``test`` may be None).
    num_nonzero: Q, the kernel weights kept.
    steps: GSM updates.
    lr, momentum, weight_decay: GSM's settings.
    seed: first training epoch index of the data order.
    log: progress printer.

  Returns:
    A JSON-ready dict: Q, the eligible count, the compression, the settings,
    the pruned accuracy and the seconds taken.
  """
  t0 = time.perf_counter()
  gm = GatedModel(model)
  tx = optax_gsm.gsm(lr, num_nonzero=num_nonzero, momentum=momentum, weight_decay=weight_decay)
  step = jax.jit(make_train_step(gm.apply, tx, stateful=True))
  params, rest, opt = gm.params, gm.rest, tx.init(gm.params)
  it = batches(train, seed)
  for i in range(steps):
    b = next(it)
    params, rest, opt, loss, _ = step(params, rest, opt, b.image, b.label)
    if (i + 1) % 1000 == 0:
      log(f"  gsm step {i + 1}/{steps} loss {float(loss):.4f}")
  pruned, _ = optax_gsm.magnitude_prune(params, num_nonzero)
  acc = evaluate(gm, pruned, rest, test)["acc"] if test else None
  n_elig = optax_gsm.count_eligible(params)
  log(f"[gsm] Q={num_nonzero} ({n_elig / num_nonzero:.1f}x): acc {acc}")
  return {
    "method": "gsm",
    "num_nonzero": num_nonzero,
    "eligible": n_elig,
    "compression": n_elig / num_nonzero,
    "steps": steps,
    "lr": lr,
    "momentum": momentum,
    "weight_decay": weight_decay,
    "acc": acc,
    "seconds": time.perf_counter() - t0,
  }
