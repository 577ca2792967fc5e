"""Time to build a jitted GSM step, split into tracing, lowering and XLA compilation.

Run ``python benchmarks/compile_time.py`` (``--help`` for the options). Each
measurement runs in a fresh Python process (so no JAX cache of an earlier
measurement helps it), which builds the parameter pytree of a size of
``model_shapes`` and times, for ``optax.sgd`` (momentum and weight decay, the
floor) and for ``optax_gsm.gsm(selection="auto")`` at compression 5, the
three stages of ``jax.jit(step)`` where ``step`` is ``tx.update`` +
``optax.apply_updates``:

* ``trace``: ``jit(step).trace(...)``, Python tracing to a jaxpr;
* ``lower``: ``.lower()``, the jaxpr to StableHLO;
* ``compile``: ``.compile()``, XLA's passes and code generation.

The JSON also records, per process, the number of fusions and of instructions
in the compiled program's HLO text: equal counts across ``--src`` trees show
that a change touched tracing only, not the program XLA runs.

The ``gsm, warm persistent cache`` row is the same GSM step in a second
process that shares a fresh ``jax_compilation_cache_dir`` with a first one:
what a user who sets that option pays from the second run on (tracing and
lowering still run; the compiled program is read from disk).

``--src NAME=PATH`` (repeatable) interleaves source trees of ``optax_gsm``
(for example a worktree of an older commit against this one): the processes
run round-robin over the trees, so that a shared machine's load falls on all
of them alike. Reported: the median and the range over ``--repeats``
processes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STAGES = ("trace", "lower", "compile")


def _child(size: str, rows: list[str]) -> None:
  """Builds the steps of ``rows`` for ``size`` and prints one JSON line each."""
  import jax
  import optax

  sys.path.insert(0, HERE)
  import model_shapes  # pylint: disable=import-outside-toplevel
  import optax_gsm  # pylint: disable=import-outside-toplevel

  params = model_shapes.make_params(size)
  for row in rows:
    if row == "sgd":
      tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.01, momentum=0.9))
    else:
      tx = optax_gsm.gsm(0.01, compression=5.0, momentum=0.9, weight_decay=1e-4)
    state = tx.init(params)

    def step(p, s, g, tx=tx):
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s

    t0 = time.perf_counter()
    traced = jax.jit(step).trace(params, state, params)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    hlo = lowered.compile().as_text()
    t3 = time.perf_counter()
    times = {"trace": t1 - t0, "lower": t2 - t1, "compile": t3 - t2}
    record = {"row": row, **times, "leaves": len(jax.tree.leaves(params))}
    record["fusions"] = len(re.findall(r" fusion\(", hlo))
    record["instructions"] = len(re.findall(r"^\s*(?:ROOT )?%\S+ = ", hlo, re.MULTILINE))
    record["optax_gsm"] = os.path.dirname(optax_gsm.__file__)  # which tree was timed
    print(json.dumps(record), flush=True)


def _run(src: str, size: str, rows: list[str], cache_dir: str | None = None) -> list[dict]:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
  if cache_dir is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    # Cache every program, however fast its compilation.
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  out = subprocess.run(
    [sys.executable, os.path.abspath(__file__), "--child", size, "--rows", ",".join(rows)],
    env=env,
    cwd=src,
    capture_output=True,
    text=True,
  )
  if out.returncode:
    # The child's own error (an import failing in that tree, say), not only its exit status.
    raise SystemExit(
      f"compile_time: building {size} with the tree {src} failed "
      f"(exit {out.returncode}):\n{out.stderr[-4000:]}"
    )
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _summary(values: Sequence[float]) -> str:
  return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
  parser.add_argument("--sizes", default="lenet300,resnet50,transformer300")
  parser.add_argument("--repeats", type=int, default=3, help="processes per row and tree")
  parser.add_argument(
    "--src",
    action="append",
    default=None,
    metavar="NAME=PATH",
    help="a source tree of optax_gsm to time (repeatable; default: this one)",
  )
  parser.add_argument("--json", default=None)
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--rows", default="sgd,gsm", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    _child(args.child, args.rows.split(","))
    return
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  srcs = {}
  for item in args.src or [f"this={ROOT}"]:
    name, sep, path = item.partition("=")
    if not sep or not os.path.isdir(os.path.join(path, "optax_gsm")):
      parser.error(f"--src must be NAME=PATH with PATH/optax_gsm a folder, got {item!r}")
    if name in srcs:
      parser.error(f"--src names must differ, got {name!r} twice")
    srcs[name] = os.path.abspath(path)
  sys.path.insert(0, HERE)
  import model_shapes  # pylint: disable=import-outside-toplevel

  sizes = [s for s in args.sizes.split(",") if s]
  for size in sizes:
    if size not in model_shapes.SHAPES:
      parser.error(f"unknown size {size!r}; choose from {sorted(model_shapes.SHAPES)}")

  from selection import machine_info  # pylint: disable=import-outside-toplevel

  info = machine_info()
  print(json.dumps(info), file=sys.stderr, flush=True)
  results: dict[tuple[str, str, str], list[dict]] = {}
  for rep in range(args.repeats):
    for size in sizes:
      for name, src in srcs.items():
        for rec in _run(src, size, ["sgd", "gsm"]):
          results.setdefault((size, rec["row"], name), []).append(rec)
        with tempfile.TemporaryDirectory() as cache:
          _run(src, size, ["gsm"], cache)  # fills the cache
          (rec,) = _run(src, size, ["gsm"], cache)
        results.setdefault((size, "gsm, warm persistent cache", name), []).append(rec)
        print(f"repeat {rep + 1}/{args.repeats} {size} {name} done", file=sys.stderr, flush=True)

  lines = [
    "| model | row | source | trace s | lower s | compile s | total s |",
    "|---|---|---|---:|---:|---:|---:|",
  ]
  table = []
  for (size, row, name), recs in results.items():
    totals = [sum(r[s] for s in STAGES) for r in recs]
    cells = [_summary([r[s] for r in recs]) for s in STAGES]
    lines.append(f"| {size} | {row} | {name} | " + " | ".join(cells) + f" | {_summary(totals)} |")
    table.append(
      {
        "size": size,
        "row": row,
        "source": name,
        "runs": recs,
        "total_median": statistics.median(totals),
      }
    )
  print(f"median [min, max] over {args.repeats} processes each")
  print("\n".join(lines))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": info, "args": vars(args), "results": table}, f, indent=1)


if __name__ == "__main__":
  main()
