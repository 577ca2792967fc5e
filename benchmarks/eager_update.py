"""Time of one un-jitted ``tx.update`` call (an eager loop, a debugger session).

LeNet-300-100 shapes (266,200 kernel weights and the biases), compression 10.
Each row: the median of ``--repeats`` eager calls after one warm-up call, and
whether the eager update and state equal the jitted ones bit for bit.

    python benchmarks/eager_update.py --repeats 20
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import optax_gsm

SHAPES = {
  "dense0": (784, 300),
  "bias0": (300,),
  "dense1": (300, 100),
  "bias1": (100,),
  "dense2": (100, 10),
  "bias2": (10,),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
  grads = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
  print(f"processor: {platform.processor() or platform.machine()}; jax {jax.__version__}")
  rows = {
    "gsm (default)": optax_gsm.gsm(0.1, compression=10),
    "gsm, paper rule": optax_gsm.gsm(0.1, compression=10, unselected_shrink=None),
    "global_top_q": optax_gsm.global_top_q(compression=10),
  }
  for name, tx in rows.items():
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)  # warm-up (compiles)
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      updates, state = tx.update(grads, state, params)
      jax.block_until_ready(updates)
      times.append(time.perf_counter() - t0)
    fresh = tx.init(params)
    eager = tx.update(grads, fresh, params)
    jitted = jax.jit(tx.update)(grads, fresh, params)
    same = all(
      bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted))
    )
    print(
      f"{name:18s} eager median {1e3 * statistics.median(times):7.1f} ms "
      f"(min {1e3 * min(times):.1f}, max {1e3 * max(times):.1f}); eager == jit: {same}"
    )


if __name__ == "__main__":
  main()
