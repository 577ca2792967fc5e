"""Command line entry point of the GSM experiments.

Usage::

    python -m experiments.run CONFIG [--phase train|gsm|prune|report|all]
        [--overrides key=value ...] [--quick] [--resume] [--out DIR]
        [--manual-dir DIR] [--data-dir DIR] [--base-from DIR] [--mesh data=4,model=2]
    python -m experiments.run --list

Phases (``all`` runs them in this order):

``train``
    Dense base model: momentum SGD with weight decay on the kernels, linear
    warm-up then step decay (``optax.join_schedules`` of ``linear_schedule`` and
    ``piecewise_constant_schedule``).
``gsm``
    GSM training from the final base checkpoint with
    ``optax_gsm.gsm(schedule, num_nonzero=Q, momentum=beta, weight_decay=...)``.
``prune``
    ``optax_gsm.magnitude_prune`` of the GSM model to exactly Q non-zero eligible
    weights and evaluation with no fine-tuning; the same cut of the *base* model
    as the baseline; per-layer sparsity reports and |w| histograms.
``report``
    Re-draws the figures from ``results.json`` and prints the summary table.

Outputs under ``--out`` (default ``<repo>/runs/<CONFIG>``)::

    results.json              config, per-epoch metrics, accuracies before/after
                              pruning, sparsity reports, wall times, versions, device
    curves.png, layer_nonzero.png, weight_hist.png
    train/checkpoints/<epoch>/  orbax checkpoints (last few epochs)
    gsm/checkpoints/<epoch>/
    prune/pruned_model/         the pruned GSM model (orbax)

While a run works on ``--out`` it holds an exclusive lock on the folder
(:func:`experiments.fileio.lock_output`): a second run on the same folder exits
with status 2, naming the holder's PID and host.  Checkpoints carry checksums;
a corrupt latest one is reported and the run resumes from the newest intact one
(see :mod:`experiments.training`).

``--resume`` continues every phase from its latest checkpoint; the final
parameters equal those of an uninterrupted run bitwise (see
:mod:`experiments.training`).  Without ``--resume`` an existing checkpoint is an
error.  ``--base-from DIR`` takes the base model from another run's output folder
(e.g. the two LeNet-5 rows share one base model); the train phase is then
skipped.

``--mesh data=D,model=M`` trains and evaluates on a device mesh of all
``D * M`` devices (on CPU, emulate them with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``): batches are sharded
along ``data``, parameters and optimizer state FSDP-style along ``model``
(replicated without a ``model`` axis); GSM's selection stays global.  The
mesh is recorded in ``results.json``; checkpoints restore on any mesh.

Set ``OPTAX_GSM_JAX_CACHE=DIR`` to keep compiled XLA programs between runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.configs import CONFIGS, ExperimentConfig, config_names, get_config
from experiments.fileio import (
  add_data_arguments,
  atomic_write_json,
  lock_output,
  require_run_checkpoints,
  run_command,
)

if TYPE_CHECKING:
  from jax.sharding import Mesh

REPO_ROOT = Path(__file__).resolve().parents[1]
PHASES = ("train", "gsm", "prune", "report")


# ------------------------------------------------------------------ helpers


def _enable_compilation_cache() -> None:
  cache = os.environ.get("OPTAX_GSM_JAX_CACHE")
  if cache:
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(cache).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# Pool threads per mesh device reserved for XLA:CPU (see _reserve_host_threads).
_THREADS_PER_DEVICE = 4


def _reserve_host_threads(spec: str) -> None:
  """Gives XLA:CPU's thread pools spare threads for a mesh of emulated devices.

  XLA:CPU sizes its thread pools ``max(cores, devices)``, reading ``cores`` from
  the ``NPROC`` environment variable when it is set.  In every collective of a
  step, each device blocks one pool thread until all its peers arrive; with 8
  emulated devices on a 2-core machine that is every thread, and work a late
  device still needs (its multi-threaded kernels, the asynchronously dispatched
  next step, batch transfers) then never runs: the rendezvous times out and XLA
  aborts the process (measured: ``lenet5_125x --quick --mesh data=4,model=2`` on
  2 cores died in its first steps in 3 runs of 3, and ran with ``NPROC=32``).
  So, unless the user set ``NPROC``, this reserves ``_THREADS_PER_DEVICE``
  threads per mesh device (at least one per core).  Idle threads cost nothing;
  the variable only counts when JAX's CPU backend starts, which :func:`main`
  has not done yet.

  Args:
    spec: the ``--mesh`` value; if it does not parse, nothing is changed (the
      error is reported by :func:`build_mesh`).
  """
  if "NPROC" in os.environ or "PJRT_NPROC" in os.environ:
    return
  from optax_gsm.sharding import parse_mesh_shape

  try:
    sizes = parse_mesh_shape(spec)
  except ValueError:
    return
  devices = 1
  for size in sizes.values():
    devices *= max(size, 1)  # a -1 axis: at least the named axes' devices
  os.environ["NPROC"] = str(max(os.cpu_count() or 1, _THREADS_PER_DEVICE * devices))


def new_model(config: ExperimentConfig) -> Any:
  """A freshly initialised model of ``config`` (its architecture, kwargs and seed)."""
  from flax import nnx

  from experiments.models import get_model

  return get_model(config.model, rngs=nnx.Rngs(config.seed), **dict(config.model_kwargs))


def load_pipelines(config: ExperimentConfig, args: argparse.Namespace) -> tuple[Any, Any]:
  """(train, test) pipelines of ``config``'s dataset.

  ``args`` carries the data flags of :func:`experiments.fileio.add_data_arguments`.
  """
  from experiments import data

  d = config.data
  return data.load_splits(
    d.name,
    batch_size=d.batch_size,
    eval_batch_size=d.eval_batch_size,
    seed=config.seed,
    data_dir=args.data_dir,
    manual_dir=args.manual_dir,
    subset=d.train_subset,
    eval_subset=d.eval_subset,
    image_size=d.image_size,
    download=not args.no_download,
  )


def output_dir(config: ExperimentConfig, args: argparse.Namespace) -> Path:
  """``--out``, or ``<repo>/runs/<config name>`` (git-ignored) by default."""
  return Path(args.out).expanduser().absolute() if args.out else REPO_ROOT / "runs" / config.name


def environment() -> dict[str, Any]:
  """Versions of the software stack and a description of the devices."""
  import importlib.metadata as md

  import jax

  versions = {}
  for dist in (
    "jax",
    "jaxlib",
    "optax",
    "flax",
    "orbax-checkpoint",
    "tensorflow-datasets",
    "tensorflow",
    "tensorflow-cpu",
    "numpy",
    "optax-gsm",
  ):
    try:
      versions[dist] = md.version(dist)
    except md.PackageNotFoundError:
      pass
  import optax_gsm

  versions["optax_gsm (imported)"] = getattr(optax_gsm, "__version__", "?")
  devices = jax.devices()
  return {
    "versions": versions,
    "python": sys.version.split()[0],
    "platform": platform.platform(),
    "backend": jax.default_backend(),
    "device": str(devices[0].device_kind),
    "device_count": len(devices),
    "cpu_count": os.cpu_count(),
  }


def phase_config(config: ExperimentConfig, phase: str) -> dict[str, Any]:
  """The part of the configuration a phase's checkpoints depend on.

  The base training does not depend on the GSM settings, so changing, say, the
  compression of a finished base run and resuming is allowed.
  """
  d = config.to_dict()
  for key in ("name", "description", "log_every", "keep_checkpoints", "paper", "quick"):
    d.pop(key, None)
  if phase == "train":
    # Every gsm_* field, so that a new GSM option cannot make a finished base
    # run look changed.
    for key in [k for k in d if k == "gsm" or k.startswith("gsm_")] + [
      "compression",
      "nonzero_ratio",
      "nonzero_threshold",
    ]:
      d.pop(key, None)
  return d


def parse_stop(value: str | None, phases: Sequence[str]) -> tuple[str, int] | None:
  """``"gsm:2"`` -> ``("gsm", 2)``; ``"2"`` -> (first phase, 2)."""
  if value is None:
    return None
  if ":" in value:
    phase, epoch = value.split(":", 1)
  else:
    phase, epoch = phases[0], value
  if phase not in ("train", "gsm"):
    raise SystemExit(f"--stop-after-epoch: phase must be train or gsm, got {phase!r}")
  return phase, int(epoch)


# ------------------------------------------------------------------ the run


class Run:
  """State shared by the phases of one invocation: config, paths, data, results.

  Args:
    config: the experiment configuration.
    args: the parsed command line.
    mesh: the device mesh of ``--mesh`` (``None``: one device).
  """

  def __init__(self, config: ExperimentConfig, args: argparse.Namespace, mesh: Mesh | None = None):
    self.config = config
    self.args = args
    self.mesh = mesh
    self._mesh_info: dict[str, Any] | None = None
    self.out = output_dir(config, args)
    self.out.mkdir(parents=True, exist_ok=True)
    self.base_dir = Path(args.base_from).expanduser().absolute() if args.base_from else self.out
    self.results_path = self.out / "results.json"
    self.results: dict[str, Any] = {}
    if self.results_path.exists():
      with open(self.results_path) as f:
        self.results = json.load(f)
    self.results.setdefault("phases", {})
    self._pipelines: tuple[Any, Any] | None = None
    self._num_eligible: int | None = None

  # --------------------------------------------------------- building blocks

  def new_model(self) -> Any:
    return new_model(self.config)

  def num_eligible(self) -> int:
    if self._num_eligible is None:
      from flax import nnx

      from experiments.models import get_spec, param_counts

      # Shapes only: no parameter is materialised.
      abstract = nnx.eval_shape(
        lambda: get_spec(self.config.model).constructor(
          rngs=nnx.Rngs(0), **dict(self.config.model_kwargs)
        )
      )
      self._num_eligible = param_counts(abstract)["eligible"]
    return self._num_eligible

  def num_nonzero(self) -> int:
    return self.config.num_nonzero(self.num_eligible())

  def pipelines(self) -> tuple[Any, Any]:
    """(train, test) pipelines, built once per process."""
    if self._pipelines is None:
      from experiments import data

      d = self.config.data
      t0 = time.perf_counter()
      train, test = load_pipelines(self.config, self.args)
      load_s = time.perf_counter() - t0
      stats = data.measure_throughput(train, max_batches=50)
      print(
        f"[data] {d.name}: {train.num_examples} train / {test.num_examples} test examples "
        f"(loaded in {load_s:.1f} s); input pipeline alone: "
        f"{stats['images_per_s']:,.0f} images/s",
        flush=True,
      )
      self.results["data"] = {
        "name": d.name,
        "train_examples": train.num_examples,
        "test_examples": test.num_examples,
        "steps_per_epoch": train.steps_per_epoch,
        "load_seconds": load_s,
        "pipeline": stats,
      }
      self._pipelines = (train, test)
    return self._pipelines

  def save_results(self) -> None:
    n = self.num_eligible()
    q = self.num_nonzero()
    self.results.update(
      {
        "config_name": self.config.name,
        "config": self.config.to_dict(),
        "quick": bool(self.args.quick),
        "overrides": list(self.args.overrides or []),
        "out": str(self.out),
        "base_from": str(self.base_dir),
        "model": {"name": self.config.model, "eligible": n},
        "target": {
          "num_nonzero": q,
          "nonzero_ratio": q / n,
          "compression": n / q,
          "label": self.config.target_label,
        },
        "environment": environment(),
        "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
      }
    )
    if self.mesh is not None:
      # The mesh of this invocation (the trained phases keep their own too).
      self.results["environment"]["mesh"] = self.mesh_info()
    atomic_write_json(self.results_path, self.results)

  def mesh_info(self) -> dict[str, Any] | None:
    """The ``--mesh`` layout as recorded in ``results.json`` (``None`` without one)."""
    if self.mesh is None:
      return None
    if self._mesh_info is None:
      from flax import nnx

      from experiments.models import get_spec
      from experiments.training import mesh_record

      # Shapes only, as in num_eligible(): which parameters are sharded how.
      abstract = nnx.eval_shape(
        lambda: get_spec(self.config.model).constructor(
          rngs=nnx.Rngs(0), **dict(self.config.model_kwargs)
        )
      )
      params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
      self._mesh_info = {
        "spec": self.args.mesh,
        **mesh_record(self.mesh, params),
        # XLA:CPU's thread pool size (see _reserve_host_threads).
        "nproc": os.environ.get("NPROC"),
      }
    return self._mesh_info

  def stop_for(self, phase: str) -> int | None:
    stop = self.args.stop
    return stop[1] if stop is not None and stop[0] == phase else None

  # --------------------------------------------------------------- phases

  def phase_train(self) -> None:
    from experiments.models import param_counts
    from experiments.training import Trainer, make_base_tx

    cfg = self.config
    model = self.new_model()
    self.results["model_params"] = param_counts(model)
    if self.base_dir != self.out:
      # The base model is another run's (--base-from): training one here
      # would cost the whole base phase and never be used.
      print(f"[train] skipped: the base model comes from --base-from {self.base_dir}", flush=True)
      self.save_results()
      return
    train, test = self.pipelines()
    schedule = cfg.train.lr_schedule(train.steps_per_epoch)
    tx = make_base_tx(schedule, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
    trainer = Trainer(
      model,
      tx,
      lr_schedule=schedule,
      nonzero_threshold=cfg.nonzero_threshold,
      name="train",
      mesh=self.mesh,
    )
    if self.args.benchmark_step:
      self._benchmark(trainer, train)
    self._fit("train", trainer, train, test, cfg.train.epochs, self.out / "train" / "checkpoints")

  def phase_gsm(self) -> None:
    from experiments.training import Trainer, make_gsm_tx

    cfg = self.config
    train, test = self.pipelines()
    model = self.new_model()
    base_ckpt = self.base_dir / "train" / "checkpoints"
    meta = self._require_complete(base_ckpt, "train", model)
    q = self.num_nonzero()
    schedule = cfg.gsm.lr_schedule(train.steps_per_epoch)
    tx = make_gsm_tx(
      schedule,
      num_nonzero=cfg.gsm_num_nonzero(self.num_eligible(), train.steps_per_epoch),
      **cfg.gsm_rule(train.steps_per_epoch),
    )
    trainer = Trainer(
      model,
      tx,
      lr_schedule=schedule,
      nonzero_threshold=cfg.nonzero_threshold,
      num_nonzero=q,
      eval_cut=True,
      name="gsm",
      mesh=self.mesh,
    )
    if self.args.benchmark_step:
      self._benchmark(trainer, train)
    print(
      f"[gsm] base model: {base_ckpt} (epoch {meta['epoch']}); N={self.num_eligible():,} "
      f"eligible weights, Q={q:,} ({cfg.target_label})",
      flush=True,
    )
    self._fit("gsm", trainer, train, test, cfg.gsm.epochs, self.out / "gsm" / "checkpoints")

  def phase_prune(self) -> None:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx

    import optax_gsm

    from experiments.training import (
      evaluate,
      magnitude_histogram,
      param_dict,
      qth_largest_magnitude,
      set_params,
    )

    cfg = self.config
    _, test = self.pipelines()
    q = self.num_nonzero()
    gsm_model = self.new_model()
    self._require_complete(self.out / "gsm" / "checkpoints", "gsm", gsm_model)
    base_model = self.new_model()
    self._require_complete(self.base_dir / "train" / "checkpoints", "train", base_model)

    section: dict[str, Any] = {"num_nonzero": q, "num_eligible": self.num_eligible()}
    before = {"gsm": param_dict(gsm_model), "base": param_dict(base_model)}
    # One set of log-spaced bins (8 per decade) for both histograms, so that
    # the two curves are comparable.
    ranges = [magnitude_histogram(p) for p in before.values()]
    lo = np.floor(np.log10(min(r["min_nonzero"] for r in ranges if r["min_nonzero"] > 0)))
    hi = np.ceil(np.log10(max(r["max"] for r in ranges)))
    edges = np.logspace(lo, hi, int(8 * (hi - lo)) + 1)
    masks = {}
    for name, model in (("gsm", gsm_model), ("base", base_model)):
      params = before[name]
      t0 = time.perf_counter()
      acc_before = evaluate(model, test, mesh=self.mesh)
      nz_mag, n = _nonzero(params, cfg.nonzero_threshold)
      pruned, mask = optax_gsm.magnitude_prune(params, num_nonzero=q)
      set_params(model, pruned)
      acc_after = evaluate(model, test, mesh=self.mesh)
      report = optax_gsm.sparsity_report(pruned)
      kept = int(
        sum(
          int(np.sum(np.asarray(m)))
          for m, f in zip(jax.tree.leaves(mask), jax.tree.leaves(optax_gsm.default_where(pruned)))
          if f
        )
      )
      masks[name] = mask
      section[name] = {
        "test_before": acc_before,
        "test_after": acc_after,
        "nonzero_by_magnitude_before": nz_mag,
        "kept": kept,
        "nonzeros_after": report.eligible.nonzeros,
        "threshold": qth_largest_magnitude(params, q),
        "histogram": magnitude_histogram(params, bins=edges),
        "sparsity_report": report.to_dict(),
        "seconds": time.perf_counter() - t0,
      }
      label = "GSM" if name == "gsm" else "base"
      print(
        f"[prune] {label}: test acc {100 * acc_before['acc']:.2f}% before, "
        f"{100 * acc_after['acc']:.2f}% after keeping Q={q:,} of N={n:,} "
        f"({report.eligible.nonzeros:,} non-zero)",
        flush=True,
      )
      if name == "gsm":
        print(report, flush=True)
    # How much the GSM-selected set and the base model's largest weights overlap.
    both = sum(
      int(np.sum(np.asarray(a) & np.asarray(b)))
      for a, b, f in zip(
        jax.tree.leaves(masks["gsm"]),
        jax.tree.leaves(masks["base"]),
        jax.tree.leaves(optax_gsm.default_where(before["gsm"])),
      )
      if f
    )
    section["kept_overlap_with_base"] = both / q
    pruned_dir = self.out / "prune" / "pruned_model"
    pruned_dir.parent.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
      # A plain nested dict ({'fc1': {'kernel': ..., 'bias': ...}, ...}, BatchNorm
      # statistics included) so that it restores without this code.
      ckptr.save(pruned_dir, nnx.to_pure_dict(nnx.state(gsm_model)), force=True)
    section["pruned_model"] = str(pruned_dir)
    self.results["phases"]["prune"] = section
    self.save_results()

  def phase_report(self) -> None:
    from experiments import plots

    if not self.results.get("phases"):
      raise SystemExit(f"nothing to report in {self.results_path}")
    written = plots.write_all(self.results, self.out)
    self.results["figures"] = [p.name for p in written]
    self.results["summary"] = summary(self.results)
    self.save_results()
    print(format_summary(self.results), flush=True)
    for p in written:
      print(f"[report] wrote {p}", flush=True)

  # --------------------------------------------------------------- internals

  def _fit(
    self, phase: str, trainer: Any, train: Any, test: Any, epochs: int, ckpt_dir: Path
  ) -> None:
    cfg = self.config
    t0 = time.perf_counter()

    def on_epoch_end(history: list[dict[str, Any]]) -> None:
      # results.json follows the run epoch by epoch, so a crashed run still
      # leaves its curves behind.
      self.results["phases"].setdefault(phase, {})["history"] = history
      self.save_results()

    result = trainer.fit(
      train,
      test,
      epochs=epochs,
      ckpt_dir=ckpt_dir,
      resume=self.args.resume,
      seed=cfg.seed,
      config=phase_config(cfg, phase),
      keep_checkpoints=cfg.keep_checkpoints,
      log_every=cfg.log_every,
      stop_after_epoch=self.stop_for(phase),
      progress=self.args.progress,
      on_epoch_end=on_epoch_end,
    )
    result["process_seconds"] = time.perf_counter() - t0
    result["config"] = phase_config(cfg, phase)
    if self.mesh is not None:
      result["mesh"] = self.mesh_info()
    previous = self.results["phases"].get(phase, {})
    if "step_benchmark" in previous:
      result["step_benchmark"] = previous["step_benchmark"]
    self.results["phases"][phase] = result
    self.save_results()

  def _require_complete(self, ckpt_dir: Path, phase: str, model: Any) -> dict[str, Any]:
    from experiments.training import restore_model_state

    try:
      meta = restore_model_state(ckpt_dir, model)
    except FileNotFoundError:
      raise SystemExit(
        f"no {phase} checkpoint in {ckpt_dir}: run `--phase {phase}` first"
        + (" (or pass --base-from a run folder that has one)" if phase == "train" else "")
      ) from None
    want = meta.get("config", {}).get(phase, {}).get("epochs")
    if want is not None and meta["epoch"] < want:
      raise SystemExit(
        f"the {phase} phase in {ckpt_dir} stopped at epoch {meta['epoch']} of {want}: "
        f"finish it with `--phase {phase} --resume`"
      )
    return meta

  def _benchmark(self, trainer: Any, train: Any) -> None:
    batch = next(train.epoch(0))
    timing = trainer.benchmark_step(batch.image, batch.label)
    print(
      f"[benchmark] step time: split/merge + jax.jit {1e3 * timing['split_merge_jit_s']:.2f} ms, "
      f"nnx.jit {1e3 * timing['nnx_jit_s']:.2f} ms",
      flush=True,
    )
    self.results["phases"].setdefault(trainer.name, {})["step_benchmark"] = timing


def _nonzero(params: Any, threshold: float) -> tuple[int, int]:
  from experiments.training import nonzero_by_magnitude

  return nonzero_by_magnitude(params, threshold)


# ------------------------------------------------------------------ summary


def summary(results: dict[str, Any]) -> dict[str, Any]:
  """The headline numbers of a run (JSON-ready)."""
  phases = results.get("phases", {})
  prune = phases.get("prune", {})

  def last_test(phase: str) -> float | None:
    hist = phases.get(phase, {}).get("history", [])
    accs = [h["test_acc"] for h in hist if h.get("test_acc") is not None]
    return accs[-1] if accs else None

  out = {
    "num_eligible": results.get("model", {}).get("eligible"),
    "num_nonzero": results.get("target", {}).get("num_nonzero"),
    "compression": results.get("target", {}).get("compression"),
    # The base run may live in another folder (--base-from): then the
    # prune phase's evaluation of the base model is the number to show.
    "base_test_acc": prune.get("base", {}).get("test_before", {}).get("acc", last_test("train")),
    "gsm_test_acc_before_cut": prune.get("gsm", {})
    .get("test_before", {})
    .get("acc", last_test("gsm")),
    "gsm_test_acc_after_cut": prune.get("gsm", {}).get("test_after", {}).get("acc"),
    "base_test_acc_after_cut": prune.get("base", {}).get("test_after", {}).get("acc"),
    "nonzeros_after_cut": prune.get("gsm", {}).get("nonzeros_after"),
    "train_wall_seconds": phases.get("train", {}).get("wall_seconds"),
    "gsm_wall_seconds": phases.get("gsm", {}).get("wall_seconds"),
  }
  return out


def format_summary(results: dict[str, Any]) -> str:
  """A small plain-text table of :func:`summary`."""
  s = summary(results)

  def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"

  title = results.get("config", {}).get("description", results.get("config_name", ""))
  q, n = s["num_nonzero"], s["num_eligible"]
  lines = [title, f"eligible weights N = {n:,}, Q = {q:,} ({pct(q / n)}, {n / q:.1f}x)"]
  rows = [
    ("base model (dense)", s["base_test_acc"]),
    ("base model, magnitude cut to Q", s["base_test_acc_after_cut"]),
    ("GSM model, before the cut", s["gsm_test_acc_before_cut"]),
    ("GSM model, magnitude cut to Q", s["gsm_test_acc_after_cut"]),
  ]
  width = max(len(r[0]) for r in rows)
  lines.append(f"{'':{width}}  test accuracy")
  lines += [f"{name:{width}}  {pct(acc):>13}" for name, acc in rows]
  if s["nonzeros_after_cut"] is not None:
    lines.append(f"non-zero eligible weights after the cut: {s['nonzeros_after_cut']:,}")
  return "\n".join(lines)


# ------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.run",
    description="Train, GSM-prune and evaluate one configuration of the GSM paper.",
    epilog="configs: " + ", ".join(config_names()),
  )
  parser.add_argument("config", nargs="?", help="configuration name (see --list)")
  parser.add_argument("--list", action="store_true", help="list the configurations and exit")
  parser.add_argument("--phase", choices=(*PHASES, "all"), default="all")
  parser.add_argument(
    "--overrides",
    nargs="*",
    default=[],
    metavar="KEY=VALUE",
    help="config overrides with dotted keys, e.g. train.epochs=3 compression=100",
  )
  parser.add_argument("--quick", action="store_true", help="use the config's short schedule")
  parser.add_argument(
    "--seed",
    type=int,
    default=None,
    metavar="N",
    help="seed of the model initialisation and the data order (default: the config's, 0)",
  )
  parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoints")
  parser.add_argument("--out", default=None, help="output folder (default <repo>/runs/CONFIG)")
  parser.add_argument(
    "--base-from",
    default=None,
    metavar="DIR",
    help="take the base model from DIR/train/checkpoints (another run's --out)",
  )
  add_data_arguments(parser)
  parser.add_argument(
    "--stop-after-epoch",
    default=None,
    metavar="[PHASE:]N",
    help="crash test: exit abruptly halfway through the epoch after epoch N's checkpoint",
  )
  parser.add_argument(
    "--benchmark-step",
    action="store_true",
    help="time the split/merge + jax.jit step against nnx.jit before training",
  )
  parser.add_argument(
    "--mesh",
    default=None,
    metavar="data=D,model=M",
    help="train on a mesh of all devices: batches sharded along 'data', parameters "
    "and optimizer state FSDP-style along 'model' (sizes multiply to the device "
    "count; either axis may be left out)",
  )
  return parser


def build_mesh(spec: str, config: ExperimentConfig) -> Mesh:
  """The mesh of ``--mesh spec``, checked against the devices and ``config``'s batch sizes.

  Args:
    spec: the flag's value, e.g. ``"data=4,model=2"``.
    config: the run's configuration (its train and evaluation batch sizes must
      divide along the ``data`` axis).

  Returns:
    A mesh over all devices.

  Raises:
    ValueError: what is wrong with ``spec`` (syntax, axis names, device count)
      or with the batch sizes.
  """
  from experiments.training import check_batch_size, make_training_mesh

  mesh = make_training_mesh(spec)
  check_batch_size(config.data.batch_size, mesh, "data.batch_size")
  check_batch_size(config.data.eval_batch_size, mesh, "data.eval_batch_size")
  return mesh


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.list:
    for name in config_names():
      print(f"{name:18s} {CONFIGS[name].description}")
    return 0
  if not args.config:
    parser.error("CONFIG is required (see --list)")
  try:
    config = get_config(args.config, quick=args.quick, overrides=args.overrides)
    if args.seed is not None:
      config = dataclasses.replace(config, seed=args.seed)
  except ValueError as e:
    parser.error(str(e))
  phases = list(PHASES) if args.phase == "all" else [args.phase]
  args.stop = parse_stop(args.stop_after_epoch, phases)
  if args.base_from is not None and {"gsm", "prune"} & set(phases):
    # Before the data is loaded and anything is compiled: a wrong folder is a
    # usage error, not a crash at the start of the GSM phase.
    status = run_command(
      lambda: require_run_checkpoints(
        "--base-from",
        args.base_from,
        "train",
        f"train one with `python -m experiments.run {config.name} --phase train "
        f"--out {args.base_from}`",
      )
    )
    if status:
      return status
  _enable_compilation_cache()
  from experiments.data import DatasetError
  from experiments.training import CheckpointMismatchError

  mesh = None
  if args.mesh is not None:
    _reserve_host_threads(args.mesh)  # before JAX's CPU backend starts
    # Before anything is created or trained: a bad layout is a usage error.
    try:
      mesh = build_mesh(args.mesh, config)
    except ValueError as e:
      print(f"error: --mesh {args.mesh!r}: {e}", file=sys.stderr, flush=True)
      return 2

  def run_phases() -> None:
    # The output folder is locked for the whole run: a second process on
    # the same --out refuses to start instead of replacing this one's files.
    with lock_output(output_dir(config, args)):
      run = Run(config, args, mesh=mesh)
      print(
        f"[run] {config.name}: {config.description}; phases {', '.join(phases)}; output {run.out}",
        flush=True,
      )
      if mesh is not None:
        info = run.mesh_info()
        batches = "batches split along 'data'" if "data" in info["shape"] else "batches replicated"
        params = (
          f"{len(info['sharded_leaves'])} parameter leaves sharded along 'model'"
          if "model" in info["shape"]
          else "parameters replicated"
        )
        print(
          f"[mesh] {args.mesh}: {info['devices']} {info['platform']} devices, {batches}, {params}",
          flush=True,
        )
      for phase in phases:
        getattr(run, f"phase_{phase}")()

  return run_command(run_phases, FileExistsError, DatasetError, CheckpointMismatchError)


if __name__ == "__main__":
  sys.exit(main())
