"""Subprocess worker for ``test_distributed.py``: GSM on a mesh of CPU devices.

The number of CPU devices is fixed when JAX starts, so the multi-device runs
happen in fresh processes started by the test:

* ``python _distributed_worker.py single OUT`` starts JAX with 8 CPU devices
  and, for each layout (data-parallel, FSDP, 2-D), runs the same problem as on
  one device. It writes ``OUT/single.npz`` (masks, updates, parameters after
  every step, in every layout and on one device) and ``OUT/hlo.json`` (the
  collectives of each compiled function).
* ``python _distributed_worker.py multihost OUT PROCESS_ID NUM_PROCESSES PORT``
  is one of several processes (4 CPU devices each) joined by
  :func:`jax.distributed.initialize` on 127.0.0.1 into one global mesh; it
  writes ``OUT/multihost_<PROCESS_ID>.npz``.

Everything is a deterministic function of fixed seeds, so the parent can
compare the files bitwise. Importing this module has no side effects.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import time

import numpy as np

LAYOUTS = ("dp", "fsdp", "2d")
MULTIHOST_LAYOUTS = ("fsdp", "2d")
STEPS = 4
BATCH = 64
MIN_SIZE = 1024  # leaves smaller than this stay replicated
COMPRESSION = 10
SHAPES = {
  "w0": (12, 100),
  "b0": (100,),
  "w1": (100, 256),
  "b1": (256,),
  "w2": (256, 64),
  "b2": (64,),
  "w3": (64, 10),
  "b3": (10,),
}
# Eligible leaves (ndim >= 2) in jax.tree.leaves order (sorted dict keys).
ELIGIBLE = ("w0", "w1", "w2", "w3")
N_ELIGIBLE = sum(int(np.prod(SHAPES[k])) for k in ELIGIBLE)


def mesh_spec(layout: str, num_devices: int) -> str:
  """The mesh shape string and axes of a layout."""
  if layout == "dp":
    return f"data={num_devices}"
  if layout == "fsdp":
    return f"fsdp={num_devices}"
  if layout == "2d":
    return f"data={num_devices // 2},model=2"
  raise ValueError(layout)


# (batch axis, parameter axis or None) of each layout.
AXES = {
  "dp": ("data", None),
  "fsdp": ("fsdp", "fsdp"),
  "2d": ("data", "model"),
  "ref": ("data", None),
}


def make_params(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  out = {}
  for k, shape in SHAPES.items():
    fan_in = shape[0] if len(shape) == 2 else 1
    out[k] = (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)
  return out


def make_grads(case: str, seed: int = 1):
  """(params, grads) for the update-only checks.

  ``random``: continuous values, ties at the threshold are unlikely.
  ``ties``: small nonzero integers, so ``|g w|`` takes six values and the
  threshold is shared by many entries in several leaves and shards: the
  selection has to break ties by global index across devices.
  """
  rng = np.random.default_rng(seed)
  if case == "random":
    params = make_params(seed + 10)
    grads = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  elif case == "ties":
    values = np.array([-3, -2, -1, 1, 2, 3], np.float32)
    params = {k: rng.choice(values, size=s) for k, s in SHAPES.items()}
    grads = {k: rng.choice(values, size=s) for k, s in SHAPES.items()}
  else:
    raise ValueError(case)
  return params, grads


def make_batches(seed: int = 2):
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(STEPS, BATCH, 12)).astype(np.float32)
  ys = rng.normal(size=(STEPS, BATCH, 10)).astype(np.float32)
  return xs, ys


# ---------------------------------------------------------------------------
# Everything below imports JAX; it runs only in the subprocess.


def _setup_jax(num_cpu_devices: int):
  import jax

  from optax_gsm import fast_select

  jax.config.update("jax_num_cpu_devices", num_cpu_devices)
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # The sampled restart of the search, normally for models of 65,536 keys or
  # more, at the size of this problem: the one-device reference takes it,
  # and on a mesh (where it would gather the sample) it must be left out,
  # which the HLO tests check.
  fast_select.SAMPLE_MIN = 1024
  return jax


def loss_fn(params, x, y):
  import jax.numpy as jnp

  h = jnp.tanh(x @ params["w0"] + params["b0"])
  h = jnp.tanh(h @ params["w1"] + params["b1"])
  h = jnp.tanh(h @ params["w2"] + params["b2"])
  out = h @ params["w3"] + params["b3"]
  return jnp.mean((out - y) ** 2)


def make_tx():
  import optax_gsm

  return optax_gsm.gsm(0.05, compression=COMPRESSION, momentum=0.9, weight_decay=1e-4)


# --- budgets (issue 18) -------------------------------------------------------

BUDGET_CASES = ("random", "ties")


def make_costs(case: str) -> dict[str, np.ndarray]:
  """Integer costs for ``gsm(budget=..., costs=...)`` on the gradients of
  ``make_grads(case)``: leaves of one cost (a count times the cost) beside
  leaves of varying costs (limb sums), both sharded under FSDP.

  ``random``: costs up to ``2**31 - 1``; ``ties``: costs 1, 2 and 4 with the
  integer scores of the ``ties`` gradients, so that thousands of ratios tie
  at the threshold across leaves and shards.
  """
  rng = np.random.default_rng(5)
  if case == "random":
    per_entry = {"w1": (1, 2**31), "w2": (2**30, 2**31)}
    uniform = {"w0": 3, "w3": 2**31 - 1}
  elif case == "ties":
    per_entry = {"w1": None, "w2": None}
    uniform = {"w0": 2, "w3": 4}
  else:
    raise ValueError(case)
  out = {}
  for k, shape in SHAPES.items():
    if k in uniform:
      out[k] = np.full(shape, uniform[k], np.int32)
    elif k in per_entry:
      bounds = per_entry[k]
      if bounds is None:
        out[k] = rng.choice(np.array([1, 2, 4], np.int32), size=shape)
      else:
        out[k] = rng.integers(*bounds, size=shape).astype(np.int32)
    else:  # not eligible
      out[k] = np.zeros(shape, np.int32)
  return out


def make_budget(case: str) -> int:
  """A tenth of the total cost of the eligible weights."""
  costs = make_costs(case)
  return sum(int(costs[k].astype(np.int64).sum()) for k in ELIGIBLE) // 10


def budget_tx(case: str):
  import optax_gsm

  return optax_gsm.gsm(
    0.05, budget=make_budget(case), costs=make_costs(case), momentum=0.9, weight_decay=1e-4
  )


def budget_masks_fn(case: str):
  """``(grads, params) -> masks`` of one budgeted ``global_top_q`` update
  (exact as no eligible gradient entry is 0, as in :func:`masks_fn`)."""
  import optax_gsm

  tx = optax_gsm.global_top_q(budget=make_budget(case), costs=make_costs(case))

  def masks(grads, params):
    updates, _ = tx.update(grads, tx.init(params), params)
    return {k: updates[k] != 0 for k in ELIGIBLE}

  return masks


def with_budget_layout(fn, layout: str):
  """``fn`` traced with ``optax_gsm.budget.LAYOUT = layout``."""
  from optax_gsm import budget

  def traced(*args):
    old, budget.LAYOUT = budget.LAYOUT, layout
    try:
      return fn(*args)
    finally:
      budget.LAYOUT = old

  return traced


def masks_fn(method: str = "auto"):
  """``(grads, params) -> masks`` through the public API.

  It runs one :func:`optax_gsm.global_top_q` update (Taylor score, the
  selection GSM uses) with ``selection=method``; the mask is where the update
  is nonzero, which is exact because no eligible gradient entry is zero in
  these problems (checked by the tests).
  """
  import optax_gsm

  tx = optax_gsm.global_top_q(compression=COMPRESSION, selection=method)

  def masks(grads, params):
    updates, _ = tx.update(grads, tx.init(params), params)
    return {k: updates[k] != 0 for k in ELIGIBLE}

  return masks


def methods() -> list[str]:
  """The selection backends to compile: "auto", then every other backend
  that "auto" does not resolve to."""
  from optax_gsm import selection
  from optax_gsm import transform

  auto = transform.resolve_selection("auto")
  return ["auto"] + [m for m in selection.SELECTIONS if m not in ("auto", auto)]


# --- HLO inspection ---------------------------------------------------------

_COLLECTIVE = re.compile(
  r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s+"
  r"(?P<op>all-reduce|all-gather|all-to-all|reduce-scatter|"
  r"collective-permute|all-reduce-start|all-gather-start|"
  r"collective-permute-start|ragged-all-to-all|collective-broadcast)\("
)
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_GROUPS = re.compile(
  r"replica_groups=(.*?)(?:, (?:use_global_device_ids|to_apply|dimensions|"
  r"channel_id|metadata|constrain_layout|backend_config)=|$)"
)


def collectives(hlo_text: str) -> list[dict]:
  """The collectives of a compiled HLO module: op, result arrays, op_name."""
  out = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.match(line)
    if not m:
      continue
    arrays = []
    for dtype, dims in _ARRAY.findall(m.group("shape")):
      shape = [int(d) for d in dims.split(",") if d]
      arrays.append(
        {"dtype": dtype, "shape": shape, "elements": int(np.prod(shape)) if shape else 1}
      )
    op_name = _OP_NAME.search(line)
    op_name = op_name.group(1) if op_name else ""
    groups = _GROUPS.search(line)
    out.append(
      {
        "groups": groups.group(1) if groups else "",
        "op": m.group("op").replace("-start", ""),
        "arrays": arrays,
        "max_elements": max((a["elements"] for a in arrays), default=0),
        "op_name": op_name,
        "in_while": "/while/" in op_name,
        "in_cond": "/cond/" in op_name or "/switch/" in op_name,
      }
    )
  return out


# --- the runs -----------------------------------------------------------------


def put(tree, shardings):
  """Global arrays from host numpy (the same full values on every process)."""
  import jax

  return jax.tree.map(
    lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx, x=x: np.asarray(x)[idx]),
    tree,
    shardings,
  )


class Layout:
  """Shardings and compiled functions of one layout on one mesh.

  Each function is compiled once, ahead of time and on first use; the same
  executable is run and inspected (:meth:`hlo`).
  """

  def __init__(self, name: str, mesh):
    import jax
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from optax_gsm import sharding

    self.name, self.mesh = name, mesh
    self.tx = tx = make_tx()
    batch_axis, param_axis = AXES[name]
    params_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), make_params())
    state_abs = jax.eval_shape(tx.init, params_abs)
    if param_axis is None:
      spec = lambda tree: jax.tree.map(lambda _: P(), tree)
    else:
      spec = functools.partial(
        sharding.fsdp_partition_specs, mesh=mesh, axis=param_axis, min_size=MIN_SIZE
      )
    self.p_specs, s_specs = spec(params_abs), spec(state_abs)
    sharding.validate_partition_specs(params_abs, self.p_specs, mesh)
    sharding.validate_partition_specs(state_abs, s_specs, mesh)
    self.p_sh = p_sh = sharding.named_shardings(self.p_specs, mesh)
    self.s_sh = s_sh = sharding.named_shardings(s_specs, mesh)
    self.b_sh = b_sh = NamedSharding(mesh, P(batch_axis))
    self.replicated = NamedSharding(mesh, P())
    mask_sh = {k: p_sh[k] for k in ELIGIBLE}
    abs_of = lambda tree, sh: jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh
    )
    p_abs, s_abs = abs_of(params_abs, p_sh), abs_of(state_abs, s_sh)
    b_abs = [jax.ShapeDtypeStruct((BATCH, d), np.float32, sharding=b_sh) for d in (12, 10)]

    def apply(params, state, grads):
      # One GSM step from given (averaged) gradients: what the user calls.
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    def step(params, state, x, y):
      grads = jax.grad(loss_fn)(params, x, y)  # mean over the global batch
      params, state = apply(params, state, grads)
      return params, state, grads

    self._specs = {
      "gsm_apply": (apply, (p_sh, s_sh, p_sh), (p_sh, s_sh), (p_abs, s_abs, p_abs)),
      "train_step": (step, (p_sh, s_sh, b_sh, b_sh), (p_sh, s_sh, p_sh), (p_abs, s_abs, *b_abs)),
      "init": (tx.init, (p_sh,), s_sh, (p_abs,)),
    }
    # The mask of every selection backend ("masks_auto" is what gsm uses).
    for m in methods():
      self._specs[f"masks_{m}"] = (masks_fn(m), (p_sh, p_sh), mask_sh, (p_abs, p_abs))
    # Budgets: the mask and a GSM step with the default layout ("auto":
    # per-leaf on a mesh), and the step forced to the concatenated layout.
    for case in BUDGET_CASES:
      btx = budget_tx(case)
      bs_abs = jax.eval_shape(btx.init, params_abs)
      bs_specs = spec(bs_abs)
      sharding.validate_partition_specs(bs_abs, bs_specs, mesh)
      bs_sh = sharding.named_shardings(bs_specs, mesh)

      def bapply(params, state, grads, btx=btx):
        updates, state = btx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

      step_args = ((p_sh, bs_sh, p_sh), (p_sh, bs_sh), (p_abs, abs_of(bs_abs, bs_sh), p_abs))
      self._specs[f"budget_masks_{case}"] = (
        budget_masks_fn(case),
        (p_sh, p_sh),
        mask_sh,
        (p_abs, p_abs),
      )
      self._specs[f"budget_apply_{case}"] = (bapply, *step_args)
      self._specs[f"budget_apply_concat_{case}"] = (
        with_budget_layout(bapply, "concat"),
        *step_args,
      )
      self._specs[f"budget_init_{case}"] = (btx.init, (p_sh,), bs_sh, (p_abs,))
    self.compiled = {}
    self._gather = jax.jit(lambda t: t, out_shardings=self.replicated)

  def __getattr__(self, name):
    specs = self.__dict__.get("_specs", {})
    if name not in specs:
      raise AttributeError(name)
    if name not in self.compiled:
      import jax

      fn, in_sh, out_sh, args = specs[name]
      self.compiled[name] = (
        jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh).lower(*args).compile()
      )
    return self.compiled[name]

  def fetch(self, tree):
    """``tree`` as numpy on this process (replicated over the mesh first)."""
    import jax

    if all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
      return jax.device_get(tree)
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), self._gather(tree))

  def hlo(self) -> dict:
    """Collectives and per-device memory of every compiled function."""
    out = {}
    for key, c in self.compiled.items():
      mem = c.memory_analysis()
      out[key] = {
        "collectives": collectives(c.as_text()),
        "memory": None
        if mem is None
        else {
          "temp_bytes": int(mem.temp_size_in_bytes),
          "argument_bytes": int(mem.argument_size_in_bytes),
          "output_bytes": int(mem.output_size_in_bytes),
        },
      }
    return out


def run_layout(
  layout: Layout, ref: "Layout | None", out: dict, prefix: str, *, extras: bool = False
):
  """Runs the update-only cases and STEPS training steps on ``layout``.

  With ``ref`` (a one-device layout), also recomputes every training step on
  one device from the gradient this layout computed (``samegrad_*``). With
  ``extras``, also every other selection backend and the budgeted step in
  the concatenated layout.
  """
  import jax

  def record(key, tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(layout.fetch(tree))
    for path, leaf in flat:
      out[f"{prefix}/{key}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)

  for case in ("random", "ties"):
    params_np, grads_np = make_grads(case)
    params = put(params_np, layout.p_sh)
    grads = put(grads_np, layout.p_sh)
    record(f"{case}/mask", layout.masks_auto(grads, params))
    if extras:
      for m in methods()[1:]:
        record(f"{case}/mask_{m}", getattr(layout, f"masks_{m}")(grads, params))
    state = layout.init(params)
    for t in range(2):  # two steps, so that the momentum is used
      params, state = layout.gsm_apply(params, state, grads)
      record(f"{case}/{t}/params", params)
      record(f"{case}/{t}/state", state)

  for case in BUDGET_CASES:
    params_np, grads_np = make_grads(case)
    params = put(params_np, layout.p_sh)
    grads = put(grads_np, layout.p_sh)
    record(f"budget/{case}/mask", getattr(layout, f"budget_masks_{case}")(grads, params))
    init = getattr(layout, f"budget_init_{case}")
    for fn in ("budget_apply", "budget_apply_concat") if extras else ("budget_apply",):
      p, state = params, init(params)
      for t in range(2):  # two steps, so that the momentum is used
        p, state = getattr(layout, f"{fn}_{case}")(p, state, grads)
        record(f"{fn}/{case}/{t}/params", p)
        record(f"{fn}/{case}/{t}/state", state)

  xs, ys = make_batches()
  params = put(make_params(), layout.p_sh)
  state = layout.init(params)
  for t in range(STEPS):
    x = put(xs[t], layout.b_sh)
    y = put(ys[t], layout.b_sh)
    before, state_before = params, state
    params, state, grads = layout.train_step(params, state, x, y)
    record(f"train/{t}/params", params)
    record(f"train/{t}/grads", grads)
    record(f"train/{t}/threshold", state[0].threshold)
    # The mask this step used: the selection for the gradient the step
    # averaged over the mesh and the params it started from.
    record(f"train/{t}/mask", layout.masks_auto(grads, before))
    if ref is not None:
      # The same step on one device, from the same averaged gradient.
      p1, s1, g1 = (
        put(layout.fetch(tree), sh)
        for tree, sh in ((before, ref.p_sh), (state_before, ref.s_sh), (grads, ref.p_sh))
      )
      out.update(
        {
          f"{prefix}/train/{t}/samegrad_mask{k}": v
          for k, v in _flat(ref.fetch(ref.masks_auto(g1, p1)))
        }
      )
      out.update(
        {
          f"{prefix}/train/{t}/samegrad_params{k}": v
          for k, v in _flat(ref.fetch(ref.gsm_apply(p1, s1, g1)[0]))
        }
      )


def _flat(tree):
  import jax

  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(p), np.asarray(v)) for p, v in flat]


def main_single(out_dir: str):
  jax = _setup_jax(8)
  from optax_gsm import sharding
  from optax_gsm import transform
  from tests.optax_gsm import _compat

  assert jax.device_count() == 8, jax.devices()
  t0 = time.time()
  out, hlo, info = {}, {}, {"seconds": {}}
  ref = Layout("ref", sharding.make_mesh("data=1", devices=jax.devices()[:1]))
  run_layout(ref, None, out, "ref")
  info["seconds"]["ref"] = time.time() - t0
  for name in LAYOUTS:
    t1 = time.time()
    mesh = sharding.make_mesh(mesh_spec(name, 8))
    layout = Layout(name, mesh)
    with _compat.set_mesh(mesh):
      auto = transform.resolve_selection("auto")
    info[name] = {
      "auto_resolves_to": auto,
      "methods": methods(),
      "mesh": dict(mesh.shape),
      "param_specs": {k: [str(e) for e in s] for k, s in layout.p_specs.items()},
    }
    run_layout(layout, ref, out, name, extras=name != "dp")
    hlo[name] = layout.hlo()
    info["seconds"][name] = time.time() - t1
  info["seconds"]["total"] = time.time() - t0
  info["n_eligible"] = N_ELIGIBLE
  info["leaf_sizes"] = {k: int(np.prod(s)) for k, s in SHAPES.items()}
  np.savez(os.path.join(out_dir, "single.npz"), **out)
  with open(os.path.join(out_dir, "hlo.json"), "w") as f:
    json.dump({"hlo": hlo, "info": info}, f, indent=1)


def main_multihost(out_dir: str, process_id: int, num_processes: int, port: int):
  jax = _setup_jax(4)
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=60,
  )
  try:
    from optax_gsm import sharding

    n = jax.device_count()
    assert n == 4 * num_processes, jax.devices()
    assert jax.local_device_count() == 4
    assert jax.process_count() == num_processes
    out = {}
    # This process's one-device reference, for "same averaged gradient".
    ref = Layout("ref", sharding.make_mesh("data=1", devices=jax.local_devices()[:1]))
    for name in MULTIHOST_LAYOUTS:
      layout = Layout(name, sharding.make_mesh(mesh_spec(name, n)))
      run_layout(layout, ref, out, name)
    np.savez(os.path.join(out_dir, f"multihost_{process_id}.npz"), **out)
  finally:
    jax.distributed.shutdown()


if __name__ == "__main__":
  sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
  mode = sys.argv[1]
  if mode == "single":
    main_single(sys.argv[2])
  elif mode == "multihost":
    main_multihost(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
  else:
    raise SystemExit(f"unknown mode {mode!r}")
