"""What writing the keys into one buffer costs, against a counting pass and an SGD step.

Run ``python benchmarks/key_buffer.py`` (``--help`` for the options). The
``"search"`` selection recomputes each leaf's keys from (g, w) inside every
counting pass, so its program has one counting loop per leaf and its compile
time grows with the number of leaves. A design with a program of fixed size
writes the keys once into one flat int32 buffer and counts over that. This
script times, interleaved round-robin in one process, the pieces that decide
between the two:

* ``sgd step``: ``chain(add_decayed_weights(1e-4), sgd(lr, 0.9))`` and
  ``apply_updates`` under one jit, params and state donated (the floor);
* ``count pass from (g, w)``: one counting pass of ``"search"`` (8
  thresholds) over every eligible leaf, the keys computed inside it;
* ``count pass over a buffer``: the same pass over the flat key buffer;
* ``keys, materialised per leaf``: the keys written, one array per leaf;
* ``keys, concatenated``: the keys written into one padded flat buffer;
* ``keys, dynamic_update_slice``: the same buffer filled leaf by leaf.

Each row reports the median ms per call and the per-round ratio to the sgd
call of the same round (median and quartiles).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import model_shapes  # noqa: E402  pylint: disable=wrong-import-position
from optax_gsm import fast_select  # noqa: E402  pylint: disable=wrong-import-position
from optax_gsm import selection as selection_lib  # noqa: E402  pylint: disable=wrong-import-position
from selection import machine_info  # noqa: E402  pylint: disable=wrong-import-position

CHUNK = 4096  # padding unit of the flat buffer (keys)


def build(size: str):
  """The jitted functions of every row and their arguments, for model ``size``."""
  params = model_shapes.make_params(size)
  leaves = jax.tree.leaves(params)
  eligible = [i for i, x in enumerate(leaves) if x.ndim >= 2]
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
  g = [jax.tree.leaves(grads)[i] for i in eligible]
  w = [jnp.copy(leaves[i]) for i in eligible]  # params are donated to the sgd row
  n = sum(int(x.size) for x in g)
  pad = -n % CHUNK
  nan_key = jnp.int32(selection_lib.NAN_KEY)

  def keys(g, w):
    return [selection_lib.scores_to_keys(jnp.abs(a * b)) for a, b in zip(g, w)]

  # Thresholds near the 80th percentile of the keys (Q = 20%).
  k_all = np.concatenate([np.asarray(k).ravel() for k in jax.jit(keys)(g, w)])
  ts = jnp.asarray(np.quantile(k_all, np.linspace(0.78, 0.82, 8)).astype(np.int32))

  def count(parts):
    return fast_select._count(parts, lambda a: a >= ts, fast_select.M)

  @jax.jit
  def count_from_gw(g, w):
    return sum(count([fast_select._blocks(k)]) for k in keys(g, w))

  @jax.jit
  def keys_per_leaf(g, w):
    return keys(g, w)

  @jax.jit
  def keys_concat(g, w):
    parts = [k.reshape(-1) for k in keys(g, w)]
    return jnp.concatenate(parts + [jnp.full((pad,), nan_key, jnp.int32)])

  @jax.jit
  def keys_dus(g, w):
    buf = jnp.full((n + pad,), nan_key, jnp.int32)
    offset = 0
    for k in keys(g, w):
      buf = jax.lax.dynamic_update_slice(buf, k.reshape(-1), (offset,))
      offset += int(k.size)
    return buf

  buf = keys_concat(g, w)

  @jax.jit
  def count_buffer(buf):
    return count([fast_select._blocks(buf.reshape(-1, 32))])

  np.testing.assert_array_equal(np.asarray(count_buffer(buf)), np.asarray(count_from_gw(g, w)))
  np.testing.assert_array_equal(np.asarray(keys_dus(g, w)), np.asarray(buf))

  sgd = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.01, 0.9))

  def sgd_step(p, s, gr):
    u, s = sgd.update(gr, s, p)
    return optax.apply_updates(p, u), s

  sgd_jit = jax.jit(sgd_step, donate_argnums=(0, 1))
  state = {"p": params, "s": sgd.init(params)}

  def run_sgd():
    state["p"], state["s"] = sgd_jit(state["p"], state["s"], grads)
    return state["p"]

  rows = {
    "sgd step (floor)": run_sgd,
    "count pass from (g, w)": lambda: count_from_gw(g, w),
    "count pass over a buffer": lambda: count_buffer(buf),
    "keys, materialised per leaf": lambda: keys_per_leaf(g, w),
    "keys, concatenated": lambda: keys_concat(g, w),
    "keys, dynamic_update_slice": lambda: keys_dus(g, w),
  }
  return rows, n, len(eligible)


def main(argv=None):
  parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
  parser.add_argument("--size", default="resnet50", choices=model_shapes.SIZES)
  parser.add_argument("--repeats", type=int, default=11)
  parser.add_argument("--json", default=None, help="write the results here")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  rows, n, leaves = build(args.size)
  for fn in rows.values():  # compile and warm up
    jax.block_until_ready(fn())
  times = {name: [] for name in rows}
  for _ in range(args.repeats):
    for name, fn in rows.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  floor = np.asarray(times["sgd step (floor)"])
  meta = {
    **machine_info(),
    "size": args.size,
    "eligible_keys": n,
    "eligible_leaves": leaves,
    "repeats": args.repeats,
  }
  print(json.dumps(meta))
  print("| row | median ms | x sgd per round: median [p25, p75] |")
  print("|---|---:|---:|")
  results = []
  for name, t in times.items():
    ratio = np.asarray(t) / floor
    p25, med, p75 = np.percentile(ratio, [25, 50, 75])
    print(f"| {name} | {np.median(t) * 1e3:.1f} | {med:.2f} [{p25:.2f}, {p75:.2f}] |")
    results.append({"row": name, "median_ms": float(np.median(t) * 1e3), "x_sgd": float(med)})
  if args.json:
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
      json.dump({**meta, "rows": results}, f, indent=1)
    os.replace(tmp, args.json)


if __name__ == "__main__":
  main()
