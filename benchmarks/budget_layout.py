"""Compile time and step time of ``gsm(budget=..., costs=...)`` per budget layout.

Builds ``gsm(0.01, budget=total // 10, costs, momentum=0.9, weight_decay=1e-4)``
on a model's leaf shapes (``benchmarks/model_shapes.py``), jits update + apply
with donation once per layout of ``optax_gsm.budget.LAYOUT`` (``concat``,
``per_leaf``), then times interleaved rounds on fresh random gradients in one
process and prints the ratios per_leaf / concat, and whether the params stay
bitwise equal across layouts (the masks are the same; the two programs may
still round the momentum update differently, as at ``--size lenet300``). ``--costs uniform``: one random cost per leaf;
``--costs array``: a random cost per entry.

Usage (repository root)::

    python benchmarks/budget_layout.py --rounds 7 [--costs array] [--size resnet50]
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import model_shapes  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import optax_gsm  # noqa: E402
from optax_gsm import budget as budget_lib  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--size", default="resnet50")
ap.add_argument("--costs", default="uniform", choices=["uniform", "array"])
ap.add_argument("--rounds", type=int, default=7)
ap.add_argument("--layouts", default="concat,per_leaf")
args = ap.parse_args()

params = model_shapes.make_params(args.size)
rng = np.random.default_rng(0)
leaves, treedef = jax.tree.flatten(params)
if args.costs == "uniform":
  per = jax.tree.unflatten(treedef, [int(rng.integers(1, 3000)) for _ in leaves])
  costs = budget_lib.cost_tree(params, per)
else:
  costs = jax.tree.unflatten(
    treedef,
    [
      rng.integers(1, 3000, l.shape).astype(np.int32)
      if l.ndim >= 2
      else np.zeros(l.shape, np.int32)
      for l in leaves
    ],
  )
B = budget_lib.total_cost(costs) // 10


def grads(t):
  r = np.random.default_rng(100 + t)
  return jax.tree.map(
    lambda p: jnp.asarray(r.standard_normal(p.shape, np.float32) * (1 + 0.005 * t)), params
  )


rows = {}
for lay in args.layouts.split(","):
  budget_lib.LAYOUT = lay
  tx = optax_gsm.gsm(0.01, budget=B, costs=costs, momentum=0.9, weight_decay=1e-4)

  def step(p, s, g, tx=tx):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  t0 = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads(0))
  t1 = time.perf_counter()
  c1 = time.process_time()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  c2 = time.process_time()
  mem = compiled.memory_analysis()
  rows[lay] = dict(
    compiled=compiled,
    p=jax.tree.map(jnp.copy, params),
    s=state,
    times=[],
    lower=t1 - t0,
    compile=t2 - t1,
    compile_cpu=c2 - c1,
    temp=mem.temp_size_in_bytes / 2**20 if mem else None,
    hlo_lines=len(compiled.as_text().splitlines()),
  )
  print(
    f"{lay}: lower {t1 - t0:.2f} s compile {t2 - t1:.2f} s (cpu {c2 - c1:.2f} s) temp {rows[lay]['temp']:.1f} MB hlo {rows[lay]['hlo_lines']} lines",
    flush=True,
  )

masks_equal = True
for t in range(args.rounds + 1):
  g = grads(t)
  outs = {}
  for lay, r in rows.items():
    jax.block_until_ready(g)
    t0 = time.perf_counter()
    r["p"], r["s"] = r["compiled"](r["p"], r["s"], g)
    jax.block_until_ready(r["p"])
    if t:
      r["times"].append(time.perf_counter() - t0)
    outs[lay] = r["p"]
  vals = list(outs.values())
  for a, b in zip(jax.tree.leaves(vals[0]), jax.tree.leaves(vals[-1])):
    if not np.array_equal(np.asarray(a), np.asarray(b)):
      masks_equal = False
print("params bitwise equal across layouts:", masks_equal)
for lay, r in rows.items():
  print(
    f"{lay}: step median {statistics.median(r['times']) * 1e3:.1f} ms  (all {[round(x * 1e3) for x in r['times']]})"
  )
if len(rows) == 2:
  a, b = rows["per_leaf"], rows["concat"]
  print(
    f"ratio per_leaf/concat: compile {a['compile'] / b['compile']:.2f} (cpu {a['compile_cpu'] / b['compile_cpu']:.2f})  lower {a['lower'] / b['lower']:.2f}  "
    f"step {statistics.median(a['times']) / statistics.median(b['times']):.2f}  temp {a['temp'] / max(b['temp'], 1e-9):.2f}  hlo lines {a['hlo_lines'] / b['hlo_lines']:.2f}"
  )
