"""Cost of a GSM step, per selection backend, against a momentum-SGD step.

Run ``python benchmarks/selection.py`` (``--help`` for the options). In one
process, for each model size it times, interleaved round-robin:

* ``optax.sgd`` floor: ``chain(add_decayed_weights(1e-4), sgd(lr, 0.9))``;
* ``optax_gsm.gsm`` with each selection backend, in the steady state:
  consecutive steps whose gradients are fresh random draws (generated
  between the timed calls) with a scale drifting by ``--drift`` (0.5%) per
  step, so the threshold moves every step, as in training;
* for ``"auto"`` (``"search"``, and ``"search-gallop"``: the same without the
  sampled restart) also the cold first step (optimizer state
  just initialised, no threshold to start from) and a warm-start miss (the
  threshold in the state off by 1000x);
* baselines that only compute the Q-th score or the mask over the
  *concatenated* scores, as a sort-based GSM step would need: ``lax.top_k``,
  ``jnp.sort`` and ``jnp.argsort``.

Every step is ``tx.update`` + ``optax.apply_updates`` under one ``jax.jit``
with the params and the optimizer state donated (for SGD and GSM alike); the
gradients are inputs. Times are medians of wall-clock per call (CPU time of
the process alongside, since the machine may be shared); "x sgd" is the
median over the floor's median, and the per-round column the median and
quartiles of each call over the floor's call of the same round. Memory is
XLA's own account of the compiled step (``compiled.memory_analysis()``): the
temporary buffers it allocates beyond its inputs and outputs. Besides the
sizes of ``model_shapes``, ``--sizes transformer300`` times a 300-leaf
transformer-shaped pytree (for the compile time of a many-leaf step).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
import unittest.mock

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import model_shapes  # noqa: E402  pylint: disable=wrong-import-position
import optax_gsm  # noqa: E402  pylint: disable=wrong-import-position
from optax_gsm import fast_select  # noqa: E402  pylint: disable=wrong-import-position
from optax_gsm import selection as selection_lib  # noqa: E402  pylint: disable=wrong-import-position


LR = 0.01
MOMENTUM = 0.9
WD = 1e-4
SLOW_S = 1.5  # a row slower than this per call gets few repeats
SLOW_REPEATS = 3
# A pseudo-backend: "search" without the sampled restart (galloping instead).
GALLOP = "search-gallop"


def machine_info() -> dict:
  cpu = "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "jax": jax.__version__,
    "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__,
    "optax": optax.__version__,
    "backend": jax.default_backend(),
    "python": platform.python_version(),
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "loadavg_at_start": load,
  }


def _temp_mb(compiled) -> float | None:
  try:
    m = compiled.memory_analysis()
    return round(m.temp_size_in_bytes / 2**20, 1)
  except Exception:  # pylint: disable=broad-except
    return None


class Row:
  """One timed row: a jitted function and the arguments of its next call."""

  def __init__(
    self, name, fn, args, *, donate=(), carry=None, note="", shared=None, trace_context=None
  ):
    self.name = name
    # Entered while tracing: a module setting the traced program depends on.
    self.trace_context = trace_context or contextlib.nullcontext
    self.note = note
    self.jitted = jax.jit(fn, donate_argnums=donate)
    self.args = list(args)
    self.carry = carry  # (out, args) -> next args
    self.wall, self.cpu = [], []
    self.compile_s = None
    self.temp_mb = None
    self.cap = None
    self.compiled = None
    self.shared = shared  # a Row whose compiled step this one reuses

  def compile(self):
    if self.shared is not None and self.shared.compiled is not None:
      self.compiled = self.shared.compiled
      self.compile_s, self.temp_mb = self.shared.compile_s, self.shared.temp_mb
      return
    t0 = time.perf_counter()
    with self.trace_context():
      self.compiled = self.jitted.lower(*self.args).compile()
    self.compile_s = time.perf_counter() - t0
    self.temp_mb = _temp_mb(self.compiled)

  def call(self, record=True):
    c0, t0 = time.process_time(), time.perf_counter()
    out = self.compiled(*self.args)
    jax.block_until_ready(out)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if record:
      self.wall.append(wall)
      self.cpu.append(cpu)
    if self.carry is not None:
      self.args = self.carry(out, self.args)
    return wall

  def done(self, repeats):
    return len(self.wall) >= (self.cap or repeats)


def _copy(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _eligible(params):
  return [p for p in jax.tree.leaves(params) if p.ndim >= 2]


def grads_maker(params, drift):
  """``t -> grads``: fresh noise each step, scale drifting by ``drift``/step.

  Each leaf has a fixed gradient scale (log-normal across leaves); every step
  draws new values, like minibatch gradients, and the overall scale moves by
  ``drift`` per step, so the Q-th score moves every step (by ~``drift``
  relative, plus sampling noise), smoothly, as it does in training.
  """
  leaves, treedef = jax.tree.flatten(params)
  scales = [
    np.float32(1e-3 * np.exp(np.random.default_rng(1000 + i).normal(0.0, 0.5)))
    for i in range(len(leaves))
  ]

  @jax.jit
  def gen(t):
    key = jax.random.fold_in(jax.random.key(0), t)
    keys = jax.random.split(key, len(leaves))
    step_scale = 1.0 + drift * t.astype(jnp.float32)
    return jax.tree.unflatten(
      treedef,
      [
        jax.random.normal(k, p.shape, jnp.float32) * (s * step_scale)
        for k, p, s in zip(keys, leaves, scales)
      ],
    )

  def make(t):
    return jax.block_until_ready(gen(jnp.int32(t)))

  return make


def build_rows(size, backends, baselines, compression, drift, log, max_sort_params):
  params = model_shapes.make_params(size)
  n_all = model_shapes.num_params(model_shapes.SHAPES[size]())
  if n_all > max_sort_params:
    skipped = [b for b in backends if b == "top_k"] + [f"{b} baseline" for b in baselines]
    if skipped:
      log(f"[{size}] skipping sort-based rows above --max-sort-params: {skipped}")
    backends = [b for b in backends if b != "top_k"]
    baselines = []
  make_grads = grads_maker(params, drift)
  grads0 = make_grads(0)
  rows = []

  def step_row(name, tx, *, state_fn=None, note="", shared=None, trace_context=None):
    p = _copy(params)
    state = tx.init(p)

    def step(p, state, g):
      updates, state = tx.update(g, state, p)
      return optax.apply_updates(p, updates), state

    counter = {"i": 0}

    def carry(out, args):
      counter["i"] += 1
      new_p, new_state = out
      if state_fn is not None:
        new_state = state_fn(new_state)
      return [new_p, new_state, make_grads(counter["i"])]

    if state_fn is not None:
      state = state_fn(state)
    return Row(
      name,
      step,
      [p, state, grads0],
      donate=(0, 1),
      carry=carry,
      note=note,
      shared=shared,
      trace_context=trace_context,
    )

  rows.append(
    step_row(
      "optax.sgd momentum + wd (floor)",
      optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, MOMENTUM)),
    )
  )
  for b in backends:
    context = None
    if b == GALLOP:
      # "search" as it was before the sampled restart: no sample, so a cold
      # start or a far-off hint gallops.
      def context():
        return unittest.mock.patch.object(fast_select, "SAMPLE_MIN", 2**62)

    tx = optax_gsm.gsm(
      LR,
      compression=compression,
      momentum=MOMENTUM,
      weight_decay=WD,
      selection="search" if b == GALLOP else b,
    )
    label = "auto (search)" if b == "auto" else b
    steady = step_row(f"gsm {label}, steady state", tx, trace_context=context)
    rows.append(steady)
    if b in ("auto", "search", GALLOP):

      def reset(state):
        # Fresh optimizer state: count = 0, no threshold to start from.
        return jax.tree.map(jnp.zeros_like, state)

      def miss(state):
        # A threshold 1000x off the answer (and no drift estimate).
        gs = state[0]
        gs = gs._replace(
          threshold=gs.threshold * 1000.0 + 1.0,
          threshold_drift=jnp.zeros_like(gs.threshold_drift),
          threshold_spread=jnp.zeros_like(gs.threshold_spread),
        )
        return (gs,) + tuple(state[1:])

      rows.append(
        step_row(
          f"gsm {label}, cold first step",
          tx,
          state_fn=reset,
          shared=steady,
          trace_context=context,
          note="state reset before every call",
        )
      )
      # Start the miss row from a warmed-up state (count > 0).
      r = step_row(
        f"gsm {label}, warm-start miss",
        tx,
        state_fn=None,
        shared=steady,
        trace_context=context,
        note="threshold in state x1000 before every call",
      )
      r.pending_state_fn = miss
      rows.append(r)

  leaves = _eligible(params)
  n = sum(int(p.size) for p in leaves)
  q = int(round(n / compression))
  g_leaves = _eligible(grads0)

  def concat_keys(gs, ps):
    return jnp.concatenate(
      [selection_lib.scores_to_keys(jnp.abs(g * p)).reshape(-1) for g, p in zip(gs, ps)]
    )

  def top_k_threshold(gs, ps):
    return jax.lax.top_k(concat_keys(gs, ps), q)[0][-1]

  def sort_threshold(gs, ps):
    return jnp.sort(concat_keys(gs, ps))[n - q]

  def argsort_mask(gs, ps):
    k = concat_keys(gs, ps)
    order = jnp.argsort(~k, stable=True)
    return jnp.zeros((n,), bool).at[order[:q]].set(True)

  base = {
    "top_k": ("lax.top_k threshold (concat)", top_k_threshold),
    "sort": ("jnp.sort threshold (concat)", sort_threshold),
    "argsort": ("jnp.argsort mask (concat)", argsort_mask),
  }
  for b in baselines:
    name, fn = base[b]
    rows.append(Row(name, fn, [g_leaves, leaves], note="threshold only"))
  log(
    f"[{size}] {n} eligible of {model_shapes.num_params(model_shapes.SHAPES[size]())}"
    f" params, Q={q}, {len(rows)} rows"
  )
  return (
    rows,
    {
      "n_params": model_shapes.num_params(model_shapes.SHAPES[size]()),
      "n_eligible": n,
      "q": q,
      "num_leaves": len(jax.tree.leaves(params)),
      "num_eligible_leaves": len(leaves),
    },
    (params, make_grads, q),
  )


def search_passes(params, make_grads, q, steps):
  """Passes of the search backend over a steady-state sequence of steps."""
  leaves = _eligible(params)
  shapes = [p.shape for p in leaves]

  @jax.jit
  def run(gs, ps, last, drift, spread, valid):
    ws = fast_select.warm_start(last, drift, spread, valid)
    _, kth, info = fast_select.select(
      lambda o, i: selection_lib.scores_to_keys(jnp.abs(o[0][i] * o[1][i])),
      (gs, ps),
      shapes,
      q,
      hint=ws.hint,
      sigma=ws.sigma,
      return_info=True,
    )
    d, s = fast_select.update_drift(last, kth, drift, spread, valid)
    return kth, info, d, s

  last, drift, spread, valid = (jnp.int32(0), jnp.float32(0), jnp.float32(0), jnp.bool_(False))
  out = []
  for t in range(steps):
    kth, info, drift, spread = run(_eligible(make_grads(t)), leaves, last, drift, spread, valid)
    out.append([int(x) for x in info])
    last, valid = kth, jnp.bool_(True)
  return out


def run_size(size, args, log):
  rows, meta, (params, make_grads, q) = build_rows(
    size, args.backends, args.baselines, args.compression, args.drift, log, args.max_sort_params
  )
  for r in rows:
    r.compile()
    log(f"  compiled {r.name}: {r.compile_s:.1f} s, temp {r.temp_mb} MB")
  # Warm-up: two steps for every row (the GSM state then holds a threshold
  # and a drift estimate); the miss row gets its bad threshold afterwards.
  for r in rows:
    for _ in range(2):
      wall = r.call(record=False)
      if wall > SLOW_S:
        r.cap = SLOW_REPEATS
        break
    fn = getattr(r, "pending_state_fn", None)
    if fn is not None:
      r.args[1] = fn(r.args[1])
      carry = r.carry

      def carry_with(out, a, carry=carry, fn=fn):
        nxt = carry(out, a)
        nxt[1] = fn(nxt[1])
        return nxt

      r.carry = carry_with
  # Interleaved round-robin timing.
  while not all(r.done(args.repeats) for r in rows):
    for r in rows:
      if not r.done(args.repeats):
        r.call()
  floor_wall = float(np.median(rows[0].wall))
  floor_cpu = float(np.median(rows[0].cpu))
  results = []
  for r in rows:
    w, c = float(np.median(r.wall)), float(np.median(r.cpu))
    # The spread: each call over the floor's call of the same round (the
    # load of a shared machine changes between rounds more than within one).
    k = min(len(r.wall), len(rows[0].wall))
    per_round = np.array(r.wall[:k]) / np.array(rows[0].wall[:k])
    results.append(
      {
        "row": r.name,
        "median_ms": w * 1e3,
        "min_ms": min(r.wall) * 1e3,
        "cpu_median_ms": c * 1e3,
        "x_sgd": w / floor_wall,
        "x_sgd_round_p25": float(np.percentile(per_round, 25)),
        "x_sgd_round_median": float(np.median(per_round)),
        "x_sgd_round_p75": float(np.percentile(per_round, 75)),
        "x_sgd_cpu": c / floor_cpu,
        "repeats": len(r.wall),
        "compile_s": r.compile_s,
        "xla_temp_mb": r.temp_mb,
        "note": r.note,
      }
    )
  passes = None
  if any(b in ("auto", "search") for b in args.backends):
    passes = search_passes(params, make_grads, q, args.pass_steps)
  return {"size": size, **meta, "rows": results, "search_passes": passes}


def markdown(all_results, info) -> str:
  lines = [
    f"Machine: {info['cpu']}, {info['cores']} cores; jax {info['jax']}, "
    f"optax {info['optax']}, backend {info['backend']}; {info['date']}; "
    f"load average at start {info['loadavg_at_start']}.",
    "",
    "| model (params) | row | median ms/step | x sgd | x sgd per round: median [p25, p75] "
    "| CPU ms | x sgd (CPU) | repeats | XLA temp MB | compile s |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for res in all_results:
    model = f"{res['size']} ({res['n_params'] / 1e6:.2f}M)"
    for r in res["rows"]:
      lines.append(
        f"| {model} | {r['row']} | {r['median_ms']:.1f} | "
        f"{r['x_sgd']:.2f} | {r['x_sgd_round_median']:.2f} [{r['x_sgd_round_p25']:.2f}, "
        f"{r['x_sgd_round_p75']:.2f}] | {r['cpu_median_ms']:.1f} | "
        f"{r['x_sgd_cpu']:.2f} | {r['repeats']} | {r['xla_temp_mb']} | "
        f"{r['compile_s']:.1f} |"
      )
  lines.append("")
  for res in all_results:
    p = res.get("search_passes")
    if p:
      arr = np.array(p)
      lines.append(
        f"{res['size']}: search passes per step over {len(p)} steady steps "
        f"(first step cold): passes over the model {arr[:, 0].tolist()}; over the "
        f"collected keys of the bracket: counting {arr[:, 3].tolist()}, masked-min "
        f"{arr[:, 1].tolist()}, tie-break {arr[:, 2].tolist()}."
      )
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="lenet300,resnet56,resnet50,100m")
  parser.add_argument(
    "--backends",
    default="auto,threshold,top_k",
    help="gsm selection backends (auto, search, threshold, top_k; search-gallop: search "
    "without the sampled restart of a cold start or a far-off hint)",
  )
  parser.add_argument(
    "--baselines",
    default="top_k,sort,argsort",
    help="threshold-only baselines over the concatenated "
    "scores (top_k, sort, argsort); '' for none",
  )
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--compression", type=float, default=5.0)
  parser.add_argument(
    "--drift", type=float, default=0.005, help="relative change of the gradient scale per step"
  )
  parser.add_argument("--pass-steps", type=int, default=8)
  parser.add_argument(
    "--max-sort-params",
    type=float,
    default=30e6,
    help="skip the sort-based rows (gsm top_k and the baselines) for models larger than this",
  )
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  args.backends = [b for b in args.backends.split(",") if b]
  args.baselines = [b for b in args.baselines.split(",") if b]
  info = machine_info()

  def log(msg):
    print(msg, file=sys.stderr, flush=True)

  log(json.dumps(info))
  all_results = []
  for size in [s for s in args.sizes.split(",") if s]:
    if size not in model_shapes.SHAPES:
      parser.error(f"unknown size {size!r}; choose from {sorted(model_shapes.SHAPES)}")
    all_results.append(run_size(size, args, log))
  print(markdown(all_results, info))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": info, "args": vars(args), "results": all_results}, f, indent=1)


if __name__ == "__main__":
  main()
