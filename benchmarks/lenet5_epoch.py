"""End to end: a LeNet-5 training epoch with GSM against the same loop with SGD.

Run ``python benchmarks/lenet5_epoch.py`` (``--help`` for options). The data
are MNIST-sized random images (60,000 x 28 x 28 x 1, 10 classes), batch 256
(234 steps per epoch, the remainder dropped). The model is a plain Flax NNX
LeNet-5 (conv 20@5x5 VALID, max-pool 2, conv 50@5x5 VALID, max-pool 2, dense
500, dense 10, ReLU; 431,080 parameters) defined here. Both loops run the
identical jitted step (forward, backward, ``tx.update``, ``apply_updates``)
with params and optimizer state donated; only ``tx`` differs:

* ``sgd``: ``chain(add_decayed_weights(5e-4), sgd(0.01, momentum=0.9))``;
* ``gsm``: ``optax_gsm.gsm(0.01, compression=..., momentum=0.9,
  weight_decay=5e-4)`` with ``selection="auto"``.

After one warm-up epoch each (compilation), epochs are timed alternately and
the medians compared. The batches are device arrays prepared beforehand, so
the loop measures the training step, not input handling.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import optax_gsm  # noqa: E402  pylint: disable=wrong-import-position


class LeNet5(nnx.Module):
  """LeNet-5 (Caffe variant used by the GSM paper): 431,080 parameters."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 20, (5, 5), padding="VALID", rngs=rngs)
    self.conv2 = nnx.Conv(20, 50, (5, 5), padding="VALID", rngs=rngs)
    self.fc1 = nnx.Linear(4 * 4 * 50, 500, rngs=rngs)
    self.fc2 = nnx.Linear(500, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
    x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    return self.fc2(nnx.relu(self.fc1(x)))


def make_step(graphdef, tx):
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--epochs", type=int, default=3, help="timed epochs per optimizer (after one warm-up)"
  )
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--examples", type=int, default=60000)
  parser.add_argument("--compression", type=float, default=60.0)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)

  rng = np.random.default_rng(0)
  steps = args.examples // args.batch
  xs = jnp.asarray(rng.random((steps, args.batch, 28, 28, 1), np.float32))
  ys = jnp.asarray(rng.integers(0, 10, (steps, args.batch)), jnp.int32)
  xs_list = [xs[i] for i in range(steps)]
  ys_list = [ys[i] for i in range(steps)]

  model = LeNet5(nnx.Rngs(0))
  graphdef, params0 = nnx.split(model, nnx.Param)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params0))

  txs = {
    "sgd": optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.01, momentum=0.9)),
    "gsm": optax_gsm.gsm(
      0.01, compression=args.compression, momentum=0.9, weight_decay=5e-4, selection="auto"
    ),
  }
  runs = {}
  for name, tx in txs.items():
    params = jax.tree.map(lambda a: jnp.array(a, copy=True), params0)
    runs[name] = {
      "step": make_step(graphdef, tx),
      "params": params,
      "state": tx.init(params),
      "times": [],
      "cpu": [],
    }

  def epoch(run, record):
    c0, t0 = time.process_time(), time.perf_counter()
    p, s = run["params"], run["state"]
    loss = None
    for x, y in zip(xs_list, ys_list):
      p, s, loss = run["step"](p, s, x, y)
    jax.block_until_ready((p, loss))
    run["params"], run["state"] = p, s
    if record:
      run["times"].append(time.perf_counter() - t0)
      run["cpu"].append(time.process_time() - c0)
    return float(loss)

  for name, run in runs.items():
    t0 = time.perf_counter()
    epoch(run, record=False)
    print(
      f"{name}: warm-up epoch (with compilation) {time.perf_counter() - t0:.1f} s", file=sys.stderr
    )
  for _ in range(args.epochs):
    for name, run in runs.items():
      loss = epoch(run, record=True)
      print(f"{name}: epoch {run['times'][-1]:.2f} s, loss {loss:.3f}", file=sys.stderr)

  med = {n: float(np.median(r["times"])) for n, r in runs.items()}
  cpu = {n: float(np.median(r["cpu"])) for n, r in runs.items()}
  ratio = med["gsm"] / med["sgd"]
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  print(
    f"LeNet-5 ({n_params:,} params), {steps} steps of {args.batch} per "
    f"epoch, GSM compression {args.compression:g}; jax {jax.__version__},"
    f" {os.cpu_count()} CPU cores, "
    f"{datetime.datetime.now().isoformat(timespec='seconds')}, load "
    f"average {load}"
  )
  print()
  print("| optimizer | median epoch s | min epoch s | median CPU s | epochs |")
  print("|---|---:|---:|---:|---:|")
  for n, r in runs.items():
    print(f"| {n} | {med[n]:.2f} | {min(r['times']):.2f} | {cpu[n]:.2f} | {len(r['times'])} |")
  print()
  print(
    f"GSM epoch / SGD epoch = {ratio:.3f} (median wall), {cpu['gsm'] / cpu['sgd']:.3f} (median CPU)"
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        {
          "median_s": med,
          "cpu_median_s": cpu,
          "ratio": ratio,
          "times": {n: r["times"] for n, r in runs.items()},
          "n_params": n_params,
          "args": vars(args),
        },
        f,
        indent=1,
      )


if __name__ == "__main__":
  main()
