r"""Greedy removal of feature maps: Taylor (2017), gate Taylor (2019), Fisher (2018).

**Taylor feature-map pruning** (Molchanov et al., ICLR 2017;
``criterion="taylor"``) and its gate variant (Molchanov et al., CVPR 2019;
``criterion="taylor_gate"``), and **Fisher pruning** (Theis et al. 2018;
``criterion="fisher"``), all by :func:`greedy_prune`: fine-tune a few updates
while accumulating per-example gate gradients, remove the globally
lowest-ranked feature map (its gate goes to 0), repeat until each FLOPs (or
parameter) target is met; then fine-tune a snapshot at each target and cut the
removed channels out for real
(:func:`~experiments.structured.surgery.remove_channels`).

Example:
  >>> cfg = GreedyConfig(criterion="fisher", flops_targets=(0.5,),
  ...                    cost_weight=0.05)
  >>> cfg.normalize is None, cfg.steps_per_removal
  (True, 10)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from optax_gsm import structured as st
from experiments.structured.counting import StructureCounter, count_structure
from experiments.structured.gating import GatedModel, gate_vectors
from experiments.structured.plans import plan_for
from experiments.structured.surgery import alive_widths, remove_channels
from experiments.structured.tuning import (
  batches,
  evaluate,
  make_tx,
  max_output_difference,
  probe_inputs,
)
from experiments.training import make_train_step

CRITERIA = ("taylor", "taylor_gate", "fisher")


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
      raise ValueError(f"`criterion` must be one of {CRITERIA}, got {self.criterion!r}.")
    for name in ("flops_targets", "param_targets"):
      for t in getattr(self, name):
        if not 0 < t <= 1:
          raise ValueError(f"`{name}` must hold fractions in (0, 1], got {t!r}.")
    if not self.flops_targets and not self.param_targets:
      raise ValueError("give at least one of `flops_targets`, `param_targets`.")
    if self.steps_per_removal < 1:
      raise ValueError(f"`steps_per_removal` must be >= 1, got {self.steps_per_removal!r}.")


def _scores(
  criterion: str,
  stats: st.GateStats,
  spatial: Mapping[str, int],
  normalize: bool,
  alive: Mapping[str, Any],
) -> dict:
  if criterion == "taylor":
    s = st.taylor_first_order(stats, spatial)
  elif criterion == "taylor_gate":
    s = st.taylor_gate(stats)
  else:
    s = st.fisher(stats)
  return st.l2_normalize(s, alive) if normalize else s


def _make_finetune_step(
  gm: GatedModel, tx: optax.GradientTransformation, collect: bool
) -> Callable:
  """One update with per-example gates; their gradients feed the criterion."""
  update = make_train_step(gm.apply, tx, stateful=True)

  def step(params, rest, opt, stats, gate_vec, x, y):
    n = x.shape[0]
    gates = {k: jnp.broadcast_to(v, (n,) + v.shape) for k, v in gate_vec.items()}
    params, rest, opt, loss, (gg,) = update(params, rest, opt, x, y, gates)
    if collect:
      # The gradient of the mean loss is 1/N of the per-example one.
      stats = st.accumulate_gate_stats(stats, {k: v * n for k, v in gg.items()}, gate_vec)
    return params, rest, opt, stats, loss

  return jax.jit(step)


def _finetune(step, tx, gm, params, rest, alive, train_it, *, steps, lr):
  """``steps`` updates with the gates fixed, from a fresh optimiser state."""
  opt = tx.init(params)
  # The same compiled step as the pruning loop; only the learning rate differs.
  opt.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
  stats = st.init_gate_stats(gm.widths)
  gate_vec = gate_vectors(alive)
  for _ in range(steps):
    b = next(train_it)
    params, rest, opt, stats, _ = step(params, rest, opt, stats, gate_vec, b.image, b.label)
  return params, rest


def greedy_prune(
  model: nnx.Module,
  train: Any,
  test: Any | None,
  config: GreedyConfig,
  *,
  seed: int = 0,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
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

  References:
    Molchanov et al., "Pruning Convolutional Neural Networks for Resource
    Efficient Inference", ICLR 2017; Molchanov et al., "Importance Estimation
    for Neural Network Pruning", CVPR 2019; Theis et al., "Faster gaze
    prediction with dense networks and Fisher pruning", 2018.
  """
  t0 = time.perf_counter()
  plan = plan_for(model)
  gm = GatedModel(model, plan)
  counter = StructureCounter(model, plan)
  normalize = config.criterion == "taylor" if config.normalize is None else config.normalize
  tx = optax.inject_hyperparams(make_tx, static_args=("momentum", "weight_decay"))(
    learning_rate=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
  )
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
  targets = sorted(
    [("flops", t) for t in config.flops_targets] + [("params", t) for t in config.param_targets],
    key=lambda x: -x[1],
  )
  pending = list(targets)
  snapshots = []
  trajectory = []
  dense_acc = evaluate(gm, params, rest, test)["acc"] if test else None
  log(
    f"[{config.criterion}] dense: {counter.dense_macs} MACs, "
    f"{counter.dense_params} params, acc {dense_acc}"
  )
  removals = 0
  while pending and removals < config.max_removals:
    stats = st.init_gate_stats(gm.widths)
    gate_vec = gate_vectors(alive)
    for _ in range(config.steps_per_removal):
      b = next(train_it)
      params, rest, opt, stats, loss = step(params, rest, opt, stats, gate_vec, b.image, b.label)
    # FLOPs saved by removing one more map of each layer, as a fraction.
    costs = {k: np.float32(v / counter.dense_macs) for k, v in counter.removal_macs(alive).items()}
    scores = score_fn(stats, {k: jax.device_put(v) for k, v in alive.items()}, costs)
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
      frac = macs / counter.dense_macs if kind == "flops" else n_params / counter.dense_params
      if frac > t:
        break
      pending.pop(0)
      snapshots.append((kind, t, params, rest, {k: v.copy() for k, v in alive.items()}, removals))
      log(
        f"  reached {kind} {t:.0%} after {removals} removals "
        f"(loss {float(loss):.3f}): widths {alive_widths(alive)}"
      )
  prune_seconds = time.perf_counter() - t0
  levels = []
  models = {}
  for kind, t, p, r, a, n_removed in snapshots:
    t1 = time.perf_counter()
    before = evaluate(gm, p, r, test, a)["acc"] if test else None
    p, r = _finetune(
      step,
      tx,
      gm,
      p,
      r,
      a,
      train_it,
      steps=config.finetune_steps,
      lr=config.finetune_lr or config.lr,
    )
    after = evaluate(gm, p, r, test, a)["acc"] if test else None
    slim = remove_channels(gm.to_model(p, r), a, plan)
    slim_gm = GatedModel(slim, plan_for(slim, plan.input_shape))
    measured = count_structure(slim, plan.input_shape)
    diff = max_output_difference(gm, p, r, a, slim_gm, probe_inputs(test, plan))
    slim_acc = evaluate(slim_gm, slim_gm.params, slim_gm.rest, test)["acc"] if test else None
    macs, n_params = counter.count(a)
    level = {
      "target": f"{kind} {t:g}",
      "removals": n_removed,
      "macs": macs,
      "params": n_params,
      "macs_fraction": macs / counter.dense_macs,
      "params_fraction": n_params / counter.dense_params,
      "measured_macs": measured["macs"],
      "measured_params": measured["params"],
      "widths": alive_widths(a),
      "acc_before_finetune": before,
      "acc": after,
      "slim_acc": slim_acc,
      "max_abs_output_diff": diff,
      "finetune_seconds": time.perf_counter() - t1,
    }
    levels.append(level)
    models[level["target"]] = slim
    log(
      f"  {level['target']}: MACs {macs} ({macs / counter.dense_macs:.1%}), "
      f"params {n_params}, acc {before} -> {after} (slim {slim_acc}), "
      f"|diff| {diff:.2e}"
    )
  return {
    "method": config.criterion,
    "config": dataclasses.asdict(config),
    "normalize": normalize,
    "dense_macs": counter.dense_macs,
    "dense_params": counter.dense_params,
    "dense_acc": dense_acc,
    "widths": gm.widths,
    "levels": levels,
    "trajectory": trajectory,
    "prune_seconds": prune_seconds,
    "models": models,
  }
