"""The study behind the default GSM rule: paper rule vs. the unselected shrink.

A fast, self-contained LeNet-300-100 (MLP 784-300-100-10) on the real MNIST or
Fashion-MNIST IDX files, each epoch one jitted ``lax.scan`` (about 1.2 s per
epoch on one CPU core, against about 4 s for the NNX trainer of
``experiments.run``), so that many rules can be compared in minutes. The rows
it prints are the ones quoted in ``optax_gsm.gsm``'s docstring and in
``docs/results/lossless_default.md``.

Two studies:

* ``from-base``: a dense base (``--base-epochs``, lr 3e-2, momentum 0.9), then
  GSM (lr 1e-2 or ``--gsm-lr``, beta 0.99, weight decay 5e-4, x0.1 at 4/7, 5/7 and 6/7 of
  ``--gsm-epochs``, or a cosine schedule) for each ``--shrinks`` value, then
  the magnitude cut to Q.
* ``swap``: a user's program, from scratch: ``optax.sgd(lr, momentum=0.9)``
  for ``--epochs`` then the cut, against ``optax_gsm.gsm(lr,
  compression=C, momentum=0.9)`` with each ``--shrinks`` value.

``--shrinks`` is a comma-separated list of ``none`` (the paper's rule,
``unselected_shrink=None``) and numbers (``unselected_shrink``). Each row is
one JSON line: accuracies before and after the cut, in percent.
``from-base --save-params DIR`` also writes the dense base
(``DIR/base.npz``) and each GSM row's model after the cut
(``DIR/gsm_shrink<value>.npz``), flat ``{"dense0/kernel": array, ...}``
(:func:`save_params`, :func:`load_params`); the printed rows are unchanged.

Example::

    python -m experiments.rule_study from-base --gsm-epochs 40 --shrinks none,1e-2
    python -m experiments.rule_study swap --epochs 3 --compression 10
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gsm

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO_ROOT / ".." / "shared" / "datasets"


def load_idx(root: Path, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """``(float32 images (n, 784) in [0, 1], int32 labels)`` from the IDX files."""
  prefix = "train" if split == "train" else "t10k"
  folder = root / name
  with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz") as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
  with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz") as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)
  return (images / 255.0).astype(np.float32), labels.astype(np.int32)


def init_mlp(key: jax.Array, sizes: Sequence[int] = (784, 300, 100, 10)) -> dict:
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, sub = jax.random.split(key)
    params[f"dense{i}"] = {
      "kernel": jax.random.normal(sub, (fan_in, fan_out)) * jnp.sqrt(1.0 / fan_in),
      "bias": jnp.zeros(fan_out),
    }
  return params


def apply_mlp(params: dict, x: jax.Array) -> jax.Array:
  for i in range(len(params)):
    layer = params[f"dense{i}"]
    x = x @ layer["kernel"] + layer["bias"]
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return x


def _loss(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(apply_mlp(params, x), y).mean()


@jax.jit
def accuracy(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(apply_mlp(params, x), -1) == y)


def train(
  params: dict,
  tx: optax.GradientTransformation,
  epochs: int,
  x: np.ndarray,
  y: np.ndarray,
  *,
  seed: int,
  batch_size: int,
) -> dict:
  """``epochs`` passes over shuffled batches, each pass one jitted ``lax.scan``."""

  @jax.jit
  def epoch(params, state, xs, ys):
    def step(carry, batch):
      params, state = carry
      grads = jax.grad(_loss)(params, *batch)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(step, (params, state), (xs, ys))
    return params, state

  state = tx.init(params)
  rng = np.random.default_rng(seed)
  n = len(x) // batch_size * batch_size
  for _ in range(epochs):
    order = rng.permutation(len(x))[:n]
    params, state = epoch(
      params, state, x[order].reshape(-1, batch_size, 784), y[order].reshape(-1, batch_size)
    )
  return params


def lr_schedule(base_lr: float, epochs: int, steps_per_epoch: int, kind: str) -> optax.Schedule:
  if kind == "cosine":
    return optax.cosine_decay_schedule(base_lr, epochs * steps_per_epoch)
  drops = {int(epochs * f) * steps_per_epoch: 0.1 for f in (4 / 7, 5 / 7, 6 / 7)}
  return optax.piecewise_constant_schedule(base_lr, drops)


def shrink_schedule(
  shrink: float | None, ramp_epochs: float, steps_per_epoch: int
) -> float | None | optax.Schedule:
  """``unselected_shrink``: the constant ``shrink``, or a linear ramp 0 -> shrink.

  With ``ramp_epochs > 0`` the shrink grows linearly from 0 to ``shrink`` over
  the first ``ramp_epochs`` GSM epochs and stays there (an experiment: a
  support chosen later, when the scores have settled).
  """
  if shrink is None or ramp_epochs <= 0:
    return shrink
  return optax.linear_schedule(0.0, shrink, int(ramp_epochs * steps_per_epoch))


def compression_schedule(
  compression: float, ramp_epochs: float, steps_per_epoch: int
) -> float | optax.Schedule:
  """``compression`` for ``gsm``: constant, or ramped from 1 like gradual pruning.

  With ``ramp_epochs > 0``, :func:`optax_gsm.compression_ramp` over the first
  ``ramp_epochs`` GSM epochs (cubic): Q shrinks from N to N / C and the
  selection starts dense.
  """
  if ramp_epochs <= 0:
    return compression
  return optax_gsm.compression_ramp(compression, max(1, int(ramp_epochs * steps_per_epoch)))


def parse_shrinks(text: str) -> list[float | None]:
  out: list[float | None] = []
  for item in text.split(","):
    if item == "none":
      out.append(None)
      continue
    try:
      value = float(item)
    except ValueError:
      raise argparse.ArgumentTypeError(
        f"--shrinks: {item!r} is neither 'none' nor a number"
      ) from None
    if not 0 <= value < 1:
      raise argparse.ArgumentTypeError(f"--shrinks: {value!r} is not in [0, 1)")
    out.append(value)
  return out


def _cut(params, q, x, y) -> tuple[float, float]:
  pruned, _ = optax_gsm.magnitude_prune(params, q)
  return round(100 * float(accuracy(params, x, y)), 2), round(
    100 * float(accuracy(pruned, x, y)), 2
  )


def save_params(params: dict, path: Path) -> None:
  """Writes an MLP's ``{"dense0": {"kernel", "bias"}, ...}`` as a flat ``.npz``."""
  path.parent.mkdir(parents=True, exist_ok=True)
  flat = {
    f"{layer}/{name}": np.asarray(value)
    for layer, leaves in params.items()
    for name, value in leaves.items()
  }
  with open(path, "wb") as f:
    np.savez(f, **flat)


def load_params(path: Path) -> dict:
  """The params :func:`save_params` wrote (numpy arrays)."""
  params: dict = {}
  with np.load(path) as data:
    for key in data.files:
      layer, name = key.split("/")
      params.setdefault(layer, {})[name] = data[key]
  return dict(sorted(params.items(), key=lambda kv: int(kv[0][len("dense") :])))


def from_base(args: argparse.Namespace, data) -> None:
  x, y, xt, yt = data
  spe = len(x) // args.batch_size
  base_tx = optax.chain(
    optax.add_decayed_weights(5e-4, mask=optax_gsm.default_where),
    optax.sgd(lr_schedule(3e-2, args.base_epochs, spe, args.schedule), momentum=0.9),
  )
  base = train(
    init_mlp(jax.random.PRNGKey(args.seed)),
    base_tx,
    args.base_epochs,
    x,
    y,
    seed=args.seed,
    batch_size=args.batch_size,
  )
  q = round(optax_gsm.count_eligible(base) / args.compression)
  before, after = _cut(base, q, xt, yt)
  print(
    json.dumps(
      {
        "row": "dense base",
        "epochs": args.base_epochs,
        "batch_size": args.batch_size,
        "before": before,
        "after": after,
      }
    ),
    flush=True,
  )
  if args.save_params is not None:
    save_params(base, args.save_params / "base.npz")
  for shrink in args.shrinks:
    t0 = time.perf_counter()
    tx = optax_gsm.gsm(
      lr_schedule(args.gsm_lr, args.gsm_epochs, spe, args.schedule),
      compression=compression_schedule(args.compression, args.compression_ramp_epochs, spe),
      momentum=args.gsm_momentum,
      weight_decay=args.gsm_weight_decay,
      unselected_shrink=shrink_schedule(shrink, args.shrink_ramp_epochs, spe),
      score_momentum=args.score_momentum,
      metric=args.metric,
    )
    params = train(base, tx, args.gsm_epochs, x, y, seed=args.seed + 1, batch_size=args.batch_size)
    before, after = _cut(params, q, xt, yt)
    print(
      json.dumps(
        {
          "row": "gsm",
          "shrink": shrink,
          "gsm_epochs": args.gsm_epochs,
          "gsm_lr": args.gsm_lr,
          "gsm_momentum": args.gsm_momentum,
          "gsm_weight_decay": args.gsm_weight_decay,
          "score_momentum": args.score_momentum,
          "shrink_ramp_epochs": args.shrink_ramp_epochs,
          "compression_ramp_epochs": args.compression_ramp_epochs,
          "metric": args.metric,
          "schedule": args.schedule,
          "batch_size": args.batch_size,
          "compression": args.compression,
          "seed": args.seed,
          "before": before,
          "after": after,
          "seconds": round(time.perf_counter() - t0),
        }
      ),
      flush=True,
    )
    if args.save_params is not None:
      pruned, _ = optax_gsm.magnitude_prune(params, q)
      save_params(pruned, args.save_params / f"gsm_shrink{shrink}.npz")


def swap(args: argparse.Namespace, data) -> None:
  x, y, xt, yt = data
  init = init_mlp(jax.random.PRNGKey(args.seed))
  dense = train(
    init,
    optax.sgd(args.lr, momentum=0.9),
    args.epochs,
    x,
    y,
    seed=args.seed,
    batch_size=args.batch_size,
  )
  q = round(optax_gsm.count_eligible(dense) / args.compression)
  before, after = _cut(dense, q, xt, yt)
  print(
    json.dumps(
      {"row": "optax.sgd, then the cut", "epochs": args.epochs, "before": before, "after": after}
    ),
    flush=True,
  )
  for shrink in args.shrinks:
    tx = optax_gsm.gsm(
      args.lr, compression=args.compression, momentum=0.9, unselected_shrink=shrink
    )
    params = train(init, tx, args.epochs, x, y, seed=args.seed, batch_size=args.batch_size)
    before, after = _cut(params, q, xt, yt)
    print(
      json.dumps(
        {
          "row": "gsm",
          "shrink": shrink,
          "epochs": args.epochs,
          "compression": args.compression,
          "before": before,
          "after": after,
        }
      ),
      flush=True,
    )


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.rule_study", description=__doc__.split("\n\n")[0]
  )
  sub = parser.add_subparsers(dest="study", required=True)
  for name, doc in (("from-base", "dense base, then GSM"), ("swap", "gsm in place of sgd")):
    p = sub.add_parser(name, help=doc)
    p.add_argument("--dataset", choices=("mnist", "fashion_mnist"), default="mnist")
    p.add_argument(
      "--data-root",
      type=Path,
      default=DEFAULT_DATA_ROOT,
      help="folder holding <dataset>/ with the four IDX .gz files",
    )
    p.add_argument("--compression", type=float, default=60 if name == "from-base" else 10)
    p.add_argument("--shrinks", type=parse_shrinks, default=parse_shrinks("none,1e-2"))
    p.add_argument("--seed", type=int, default=0)
    if name == "from-base":
      p.add_argument("--base-epochs", type=int, default=20)
      p.add_argument("--gsm-epochs", type=int, default=40)
      p.add_argument("--schedule", choices=("step", "cosine"), default="step")
      p.add_argument("--gsm-lr", type=float, default=1e-2)
      p.add_argument("--gsm-momentum", type=float, default=0.99, help="GSM's beta")
      p.add_argument("--gsm-weight-decay", type=float, default=5e-4, help="GSM's eta")
      p.add_argument("--score-momentum", type=float, default=None)
      p.add_argument(
        "--metric",
        choices=("taylor", "magnitude"),
        default="taylor",
        help="GSM's selection score: |g w| (the paper) or |w|",
      )
      p.add_argument(
        "--compression-ramp-epochs",
        type=float,
        default=0.0,
        help="ramp the compression from 1 to C (cubic in the sparsity) over this many GSM epochs",
      )
      p.add_argument(
        "--shrink-ramp-epochs",
        type=float,
        default=0.0,
        help="ramp each shrink linearly from 0 over this many GSM epochs (0: constant)",
      )
      p.add_argument("--batch-size", type=int, default=256)
      p.add_argument(
        "--save-params",
        type=Path,
        default=None,
        metavar="DIR",
        help="write base.npz and gsm_shrink<value>.npz (after the cut) to DIR",
      )
    else:
      p.add_argument("--epochs", type=int, default=3)
      p.add_argument("--lr", type=float, default=0.05)
      p.add_argument("--batch-size", type=int, default=128)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  folder = args.data_root / args.dataset
  if not (folder / "t10k-labels-idx1-ubyte.gz").is_file():
    parser.error(f"--data-root: {folder} does not hold the {args.dataset} IDX files")
  if args.compression < 1:
    parser.error(f"--compression: {args.compression!r} is below 1")
  for flag in ("compression_ramp_epochs", "shrink_ramp_epochs"):
    value = getattr(args, flag, 0.0)
    if not (math.isfinite(value) and value >= 0):
      parser.error(f"--{flag.replace('_', '-')}: {value!r} is not a finite number >= 0")
  data = (
    *load_idx(args.data_root, args.dataset, "train"),
    *load_idx(args.data_root, args.dataset, "test"),
  )
  (from_base if args.study == "from-base" else swap)(args, data)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
