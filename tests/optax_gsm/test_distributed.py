"""GSM on a device mesh and across processes: the selection stays global.

JAX fixes its CPU device count when it starts, and this pytest process may
already run JAX on one device, so the multi-device runs happen in fresh
subprocesses (``_distributed_worker.py``):

* one process with 8 emulated CPU devices runs the same problem on one device
  and in three layouts: data-parallel (``data=8``, params replicated), FSDP
  (``fsdp=8``, batch and every large leaf of params and optimizer state
  sharded) and 2-D (``data=4,model=2``);
* two processes with 4 CPU devices each, joined by
  ``jax.distributed.initialize`` on 127.0.0.1 (gloo collectives), run the
  FSDP and 2-D layouts on the global 8-device mesh.

The three processes start together (module fixture) and write ``.npz`` files
(and the collectives of every compiled function, ``hlo.json``) that the tests
below compare. The workers compile with
``--xla_backend_optimization_level=0`` only to save time; every side of a
comparison is compiled the same way.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from optax_gsm import selection
from optax_gsm import sharding
from optax_gsm import transform

from tests.optax_gsm import _distributed_worker as worker
from tests.optax_gsm import reference

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORKER = HERE / "_distributed_worker.py"
TIMEOUT_S = 300
LEAVES = tuple(sorted(worker.SHAPES))  # jax.tree.leaves order
N = worker.N_ELIGIBLE


# --- subprocesses -------------------------------------------------------------


def _env() -> dict:
  env = dict(os.environ)
  # The workers size their devices with jax_num_cpu_devices; drop any
  # inherited device-count flag.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  )
  env.setdefault("OMP_NUM_THREADS", "1")
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Proc:
  def __init__(self, args, log: Path):
    self.log_path = log
    self.log = open(log, "w")
    self.args = args
    self.popen = subprocess.Popen(
      [sys.executable, str(WORKER), *args],
      cwd=ROOT,
      env=_env(),
      stdout=self.log,
      stderr=subprocess.STDOUT,
    )

  def wait(self, deadline: float) -> None:
    try:
      rc = self.popen.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      self.popen.kill()
      self.popen.wait()
      pytest.fail(f"worker {self.args} timed out; log tail:\n{self.tail()}")
    if rc != 0:
      pytest.fail(f"worker {self.args} exited with {rc}; log tail:\n{self.tail()}")

  def tail(self) -> str:
    self.log.flush()
    return self.log_path.read_text()[-4000:]

  def close(self) -> None:
    if self.popen.poll() is None:
      self.popen.kill()
      self.popen.wait()
    self.log.close()


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
  """Starts the 8-device process and the two multi-host processes at once."""
  out = tmp_path_factory.mktemp("distributed")
  port = str(_free_port())
  procs = {
    "single": _Proc(["single", str(out)], out / "single.log"),
    "host0": _Proc(["multihost", str(out), "0", "2", port], out / "host0.log"),
    "host1": _Proc(["multihost", str(out), "1", "2", port], out / "host1.log"),
  }
  deadline = time.monotonic() + TIMEOUT_S
  yield out, procs, deadline
  for p in procs.values():
    p.close()


@pytest.fixture(scope="module")
def single(launched):
  out, procs, deadline = launched
  procs["single"].wait(deadline)
  data = dict(np.load(out / "single.npz"))
  with open(out / "hlo.json") as f:
    report = json.load(f)
  return data, report


@pytest.fixture(scope="module")
def multihost(launched):
  out, procs, deadline = launched
  procs["host0"].wait(deadline)
  procs["host1"].wait(deadline)
  return [dict(np.load(out / f"multihost_{i}.npz")) for i in range(2)]


def _tree(data: dict, prefix: str, leaves=LEAVES) -> dict:
  return {k: data[f"{prefix}['{k}']"] for k in leaves}


def _assert_same(got: dict, want: dict, what: str):
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=f"{what}: {k}")


def _state_keys(data: dict, prefix: str) -> list:
  keys = sorted(k for k in data if k.startswith(prefix))
  assert keys, prefix
  return keys


# --- one process, 8 devices ---------------------------------------------------


@pytest.mark.parametrize("layout", worker.LAYOUTS)
@pytest.mark.parametrize("case", ("random", "ties"))
def test_mask_is_bitwise_the_one_device_mask(single, layout, case):
  """Same averaged gradient -> the same global top-Q mask on every layout.

  ``ties`` has thousands of entries tied at the threshold, spread over
  several leaves and shards: the tie-break by global flat index must hold
  across devices.
  """
  data, _ = single
  want = _tree(data, f"ref/{case}/mask", worker.ELIGIBLE)
  # The worker reads the mask off the update: exact as no gradient is 0.
  assert all(np.all(g != 0) for g in worker.make_grads(case)[1].values())
  _assert_same(_tree(data, f"{layout}/{case}/mask", worker.ELIGIBLE), want, f"{layout} mask")
  # And the one-device mask is the independent numpy ranking.
  params, grads = worker.make_grads(case)
  scores = [np.abs(grads[k] * params[k]) for k in worker.ELIGIBLE]
  q = round(N / worker.COMPRESSION)
  for k, m in zip(worker.ELIGIBLE, reference.ranked_selection(scores, q)):
    np.testing.assert_array_equal(want[k], m, err_msg=k)
  assert sum(int(m.sum()) for m in want.values()) == q


@pytest.mark.parametrize("layout", worker.LAYOUTS)
@pytest.mark.parametrize("case", ("random", "ties"))
def test_gsm_update_is_bitwise_the_one_device_update(single, layout, case):
  """Two ``optax_gsm.gsm`` steps from given gradients: params and the whole
  optimizer state (momentum sharded like the params under FSDP) are bitwise
  equal to one device. The update is elementwise given the mask, so no
  floating-point reduction order can differ."""
  data, _ = single
  for t in range(2):
    for kind in ("params", "state"):
      ref_keys = _state_keys(data, f"ref/{case}/{t}/{kind}")
      for rk in ref_keys:
        k = layout + rk[len("ref") :]
        np.testing.assert_array_equal(data[k], data[rk], err_msg=k)


@pytest.mark.parametrize("layout", worker.LAYOUTS)
def test_training_step_uses_the_one_device_mask_for_its_gradient(single, layout):
  """A full jitted training step (loss, gradient averaged over the sharded
  batch, GSM, apply) on the mesh: for the gradient it averaged, its mask and
  its new params are bitwise those of one device given the same gradient."""
  data, _ = single
  for t in range(worker.STEPS):
    grads = _tree(data, f"{layout}/train/{t}/grads", worker.ELIGIBLE)
    assert all(np.all(g != 0) for g in grads.values())
    _assert_same(
      _tree(data, f"{layout}/train/{t}/mask", worker.ELIGIBLE),
      _tree(data, f"{layout}/train/{t}/samegrad_mask", worker.ELIGIBLE),
      f"step {t} mask",
    )
    _assert_same(
      _tree(data, f"{layout}/train/{t}/params"),
      _tree(data, f"{layout}/train/{t}/samegrad_params"),
      f"step {t} params",
    )


@pytest.mark.parametrize("layout", worker.LAYOUTS)
def test_training_trajectory_matches_one_device(single, layout):
  """Several steps from the same data on the mesh and on one device.

  The gradient is a mean over the batch; on the mesh each device sums its
  shard and the partial sums are all-reduced, so the gradient (and hence the
  params) differ from one device in the last bits (float32 reduction order).
  The masks are nevertheless identical at every step on this problem, and
  the params agree to float32 rounding.
  """
  data, _ = single
  for t in range(worker.STEPS):
    _assert_same(
      _tree(data, f"{layout}/train/{t}/mask", worker.ELIGIBLE),
      _tree(data, f"ref/train/{t}/mask", worker.ELIGIBLE),
      f"step {t} mask",
    )
    for kind in ("grads", "params"):
      got = _tree(data, f"{layout}/train/{t}/{kind}")
      want = _tree(data, f"ref/train/{t}/{kind}")
      for k in LEAVES:
        np.testing.assert_allclose(
          got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=f"step {t} {kind} {k}"
        )


def _collectives(report, layout, fn):
  return report["hlo"][layout][fn]["collectives"]


def _is_scalar_all_reduce(c) -> bool:
  return c["op"] == "all-reduce" and all(a["elements"] == 1 for a in c["arrays"])


# "Small": a bound that does not grow with the model.
SMALL = 4096


def _selection_fns(report, layout):
  """The compiled functions that select: the mask of every exact backend
  except top_k, the GSM update and the training step."""
  methods = report["info"][layout]["methods"]
  return [f"masks_{m}" for m in methods if m != "top_k"] + ["gsm_apply", "train_step"]


@pytest.mark.parametrize("layout", ("fsdp", "2d"))
def test_every_backend_gives_the_one_device_mask(single, layout):
  """Each other selection backend (those "auto" does not resolve to, top_k
  included) gives the one-device mask on the mesh."""
  data, report = single
  for m in report["info"][layout]["methods"][1:]:
    for case in ("random", "ties"):
      _assert_same(
        _tree(data, f"{layout}/{case}/mask_{m}", worker.ELIGIBLE),
        _tree(data, f"ref/{case}/mask", worker.ELIGIBLE),
        f"{m} {case}",
      )


def test_data_parallel_selection_needs_no_communication(single):
  """Params replicated: the averaged gradient is already on every device,
  so the selection and the update compile to no collective at all."""
  _, report = single
  assert _collectives(report, "dp", "masks_auto") == []
  assert _collectives(report, "dp", "gsm_apply") == []


def test_data_parallel_step_all_reduces_the_gradient_once(single):
  """The only communication of a data-parallel step is the gradient mean:
  all-reduces totalling exactly one copy of the parameters."""
  _, report = single
  cs = _collectives(report, "dp", "train_step")
  assert cs and all(c["op"] == "all-reduce" for c in cs), cs
  n_params = sum(int(np.prod(s)) for s in worker.SHAPES.values())
  assert sum(a["elements"] for c in cs for a in c["arrays"]) == n_params


def _fmt(fn, cs):
  return (
    fn
    + ": "
    + "; ".join(
      f"{c['op']} {'+'.join(a['dtype'] + str(a['shape']) for a in c['arrays'])}"
      f" at {c['op_name'][:80]}"
      for c in cs
    )
  )


def _small_all_reduce(c) -> bool:
  return c["op"] == "all-reduce" and c["max_elements"] <= SMALL


@pytest.mark.parametrize("layout", ("fsdp", "2d"))
def test_selection_never_moves_the_concatenated_scores(single, layout):
  """No collective of any selecting function (every backend but top_k, the
  GSM update, the training step) carries N entries: the score vector of the
  model is never assembled anywhere."""
  _, report = single
  for fn in _selection_fns(report, layout):
    cs = _collectives(report, layout, fn)
    big = [c for c in cs if c["max_elements"] >= N]
    assert not big, _fmt(fn, big)


@pytest.mark.parametrize("layout", ("fsdp", "2d"))
def test_counting_passes_only_all_reduce_small_counts(single, layout):
  """Params sharded: every pass of the search for the Q-th score (the while
  loops outside the rare branches) communicates only small all-reduces of
  per-leaf counts; with the radix descent of "threshold", one all-reduce of
  k int32 scalars per pass (k = sharded eligible leaves). This includes the
  selection inside the training step, where XLA propagates the shardings of
  the backward pass into the scores."""
  _, report = single
  for fn in _selection_fns(report, layout):
    cs = _collectives(report, layout, fn)
    bad = [c for c in cs if c["in_while"] and not c["in_cond"] and not _small_all_reduce(c)]
    assert not bad, _fmt(fn, bad)


@pytest.mark.parametrize("layout", ("fsdp", "2d"))
def test_selection_outside_rare_branches_is_small_all_reduces(single, layout):
  """Outside the ``lax.cond`` / ``lax.switch`` branches that run only on some
  steps (the tie-break; a cold start), selecting communicates nothing but
  small all-reduces. (The training step is left out: it also has the model's
  own collectives.)"""
  _, report = single
  for fn in _selection_fns(report, layout):
    if fn == "train_step":
      continue
    cs = _collectives(report, layout, fn)
    bad = [c for c in cs if not c["in_cond"] and not _small_all_reduce(c)]
    assert not bad, _fmt(fn, bad)


@pytest.mark.parametrize("layout", ("fsdp", "2d"))
def test_rare_branches_are_small_all_reduces_too(single, layout):
  """Inside the rarely taken branches (the tie-breaks at the threshold; a
  cold start) selecting also communicates only small all-reduces: the
  threshold backend breaks ties by a radix descent over global indices
  (per-leaf counts), not by a cumsum that would gather a leaf. (The training
  step is left out: it also has the model's own collectives.)"""
  _, report = single
  for fn in _selection_fns(report, layout):
    if fn == "train_step":
      continue
    cs = _collectives(report, layout, fn)
    bad = [c for c in cs if c["in_cond"] and not _small_all_reduce(c)]
    assert not bad, _fmt(fn, bad)


@pytest.mark.parametrize("layout", ("fsdp", "2d"))
def test_threshold_tie_break_is_scalar_all_reduces(single, layout):
  """The threshold backend, tie-break included, communicates nothing but
  scalar all-reduces (one per counting pass, over per-leaf counts summed
  on each device)."""
  _, report = single
  cs = _collectives(report, layout, "masks_threshold")
  assert cs and all(_is_scalar_all_reduce(c) for c in cs), _fmt("masks_threshold", cs)


@pytest.mark.parametrize("layout", ("fsdp", "2d"))
def test_top_k_gathers_the_whole_score_vector(single, layout):
  """``selection="top_k"`` gives the same mask but all-gathers the whole
  concatenated key vector (N int32) to every device: why "auto" avoids it."""
  _, report = single
  cs = _collectives(report, layout, "masks_top_k")
  assert any(c["op"] == "all-gather" and c["max_elements"] >= N for c in cs)


@pytest.mark.parametrize("layout", worker.LAYOUTS)
def test_auto_never_picks_top_k_on_a_mesh(single, layout):
  _, report = single
  info = report["info"][layout]
  assert info["auto_resolves_to"] != "top_k"
  assert info["auto_resolves_to"] in selection.SELECTIONS


def test_auto_never_picks_top_k_here():
  assert transform.resolve_selection("auto") != "top_k"
  assert transform.resolve_selection("top_k") == "top_k"


def test_fsdp_layouts_shard_params_and_state(single):
  """The FSDP specs really shard: per-device argument bytes of the update
  (params, momentum, gradient) shrink against the replicated layout."""
  _, report = single
  dp = report["hlo"]["dp"]["gsm_apply"]["memory"]["argument_bytes"]
  fsdp = report["hlo"]["fsdp"]["gsm_apply"]["memory"]["argument_bytes"]
  assert fsdp < dp / 4, (fsdp, dp)
  specs = report["info"]["fsdp"]["param_specs"]
  assert specs["w1"] == ["None", "fsdp"] and specs["w2"] == ["fsdp"]
  assert specs["w0"] == [] and specs["b1"] == []


# --- budgets (issue 18): gsm(budget=..., costs=...) on the mesh --------------


def _budget_reference(case: str) -> dict:
  """The numpy reference of the budgeted mask (test_budget's)."""
  from optax_gsm import budget

  from tests.optax_gsm.test_budget import reference_budget

  params, grads = worker.make_grads(case)
  costs = worker.make_costs(case)
  keys = [
    np.asarray(budget.ratio_keys(np.abs(grads[k] * params[k]), costs[k])) for k in worker.ELIGIBLE
  ]
  want = reference_budget(keys, [costs[k] for k in worker.ELIGIBLE], worker.make_budget(case))
  return dict(zip(worker.ELIGIBLE, want))


@pytest.mark.parametrize("layout", worker.LAYOUTS)
@pytest.mark.parametrize("case", worker.BUDGET_CASES)
def test_budget_mask_is_bitwise_the_one_device_mask(single, layout, case):
  """The budgeted selection on the mesh (per-leaf layout) selects exactly
  the one-device entries, which are the numpy reference's; ``ties`` cuts
  inside thousands of ties spread over leaves and shards."""
  data, _ = single
  want = _tree(data, f"ref/budget/{case}/mask", worker.ELIGIBLE)
  _assert_same(
    _tree(data, f"{layout}/budget/{case}/mask", worker.ELIGIBLE), want, f"{layout} budget mask"
  )
  _assert_same(want, _budget_reference(case), "one device vs numpy")
  costs = worker.make_costs(case)
  chosen = sum(int(costs[k][want[k]].astype(np.int64).sum()) for k in worker.ELIGIBLE)
  assert 0 < chosen <= worker.make_budget(case)
  if case == "ties":  # the cut falls among ties at the threshold
    params, grads = worker.make_grads(case)
    ratio = {k: np.abs(grads[k] * params[k]) / costs[k] for k in worker.ELIGIBLE}
    kth = np.concatenate([ratio[k][want[k]] for k in worker.ELIGIBLE]).min()
    tied = {k: ratio[k] == kth for k in worker.ELIGIBLE}
    assert sum(int((tied[k] & want[k]).sum()) for k in worker.ELIGIBLE) > 0
    assert sum(int((tied[k] & ~want[k]).sum()) for k in worker.ELIGIBLE) > 100


@pytest.mark.parametrize(
  "layout, fn",
  [(layout, "budget_apply") for layout in worker.LAYOUTS]
  + [(layout, "budget_apply_concat") for layout in ("fsdp", "2d")],
)
@pytest.mark.parametrize("case", worker.BUDGET_CASES)
def test_budget_gsm_update_is_bitwise_the_one_device_update(single, layout, case, fn):
  """Two budgeted GSM steps on the mesh, in either layout: params and the
  whole optimizer state are bitwise those of one device."""
  data, _ = single
  for t in range(2):
    for kind in ("params", "state"):
      for rk in _state_keys(data, f"ref/budget_apply/{case}/{t}/{kind}"):
        k = f"{layout}/{fn}" + rk[len("ref/budget_apply") :]
        np.testing.assert_array_equal(data[k], data[rk], err_msg=k)


def _budget_fns(case):
  return [f"budget_masks_{case}", f"budget_apply_{case}"]


# The smallest sharded eligible leaf (w2): a collective this large moves a
# leaf (or the concatenated scores).
LEAF = min(int(np.prod(worker.SHAPES[k])) for k in ("w1", "w2"))


@pytest.mark.parametrize("layout", ("fsdp", "2d"))
@pytest.mark.parametrize("case", worker.BUDGET_CASES)
def test_budget_selection_only_moves_a_few_int32_per_leaf(single, layout, case):
  """Params sharded: the budgeted mask and GSM step (the default layout,
  per-leaf on a mesh) communicate only small collectives (all-reduces of
  per-leaf limb sums, and the per-device (min key, count) pairs of the
  statistics) and never a full-size operand."""
  _, report = single
  assert LEAF > SMALL
  for fn in _budget_fns(case):
    cs = _collectives(report, layout, fn)
    assert cs, fn  # the sums do cross devices
    big = [c for c in cs if c["max_elements"] > SMALL]
    assert not big, _fmt(fn, big)
    assert all(c["op"] in ("all-reduce", "all-gather") for c in cs), _fmt(fn, cs)
    # The search passes: all-reduces of a few int32 per leaf.
    loop = [c for c in cs if c["in_while"] and not c["in_cond"]]
    assert loop and all(_small_all_reduce(c) and c["max_elements"] <= 8 for c in loop), _fmt(
      fn, loop
    )


@pytest.mark.parametrize("layout", ("fsdp", "2d"))
@pytest.mark.parametrize("case", worker.BUDGET_CASES)
def test_budget_concat_layout_gathers_the_leaves(single, layout, case):
  """The concatenated layout gives the same result but moves whole leaves
  (why "auto" takes the per-leaf one on a mesh): the check above would see
  it."""
  _, report = single
  cs = _collectives(report, layout, f"budget_apply_concat_{case}")
  assert any(c["max_elements"] >= LEAF for c in cs), _fmt("concat", cs)


@pytest.mark.parametrize("case", worker.BUDGET_CASES)
def test_budget_data_parallel_needs_no_communication(single, case):
  _, report = single
  for fn in _budget_fns(case):
    assert _collectives(report, "dp", fn) == [], fn


# --- two processes, 4 devices each -------------------------------------------


def test_multihost_processes_agree(multihost):
  """Both processes hold the same (gathered) masks, params and state."""
  a, b = multihost
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("layout", worker.MULTIHOST_LAYOUTS)
@pytest.mark.parametrize("case", ("random", "ties"))
def test_multihost_update_is_bitwise_the_single_process_one(single, multihost, layout, case):
  _assert_hosts_match(single[0], multihost, layout, f"{case}/mask", f"{case}/{{t}}/", "mask")


def _assert_hosts_match(data, multihost, layout: str, mask: str, state: str, what: str) -> None:
  """Every process's mask (``<layout>/<mask>``) and the state of two steps
  (``<layout>/<state>`` with ``{t}`` = 0, 1) equal the single-process ones."""
  for host in multihost:
    _assert_same(
      _tree(host, f"{layout}/{mask}", worker.ELIGIBLE),
      _tree(data, f"ref/{mask}", worker.ELIGIBLE),
      f"{layout} {what}",
    )
    for t in range(2):
      for rk in _state_keys(data, f"ref/{state.format(t=t)}"):
        k = layout + rk[len("ref") :]
        np.testing.assert_array_equal(host[k], data[rk], err_msg=k)


@pytest.mark.parametrize("layout", worker.MULTIHOST_LAYOUTS)
@pytest.mark.parametrize("case", worker.BUDGET_CASES)
def test_multihost_budget_update_is_bitwise_the_single_process_one(single, multihost, layout, case):
  """The budgeted selection across two processes (gloo all-reduces of the
  per-leaf sums): the one-device mask, params and state, bit for bit."""
  _assert_hosts_match(
    single[0],
    multihost,
    layout,
    f"budget/{case}/mask",
    f"budget_apply/{case}/{{t}}/",
    "budget mask",
  )


@pytest.mark.parametrize("layout", worker.MULTIHOST_LAYOUTS)
def test_multihost_training_matches_single_process(single, multihost, layout):
  """Across processes the gradient mean crosses gloo, so params agree with
  one process to float32 rounding; for its own averaged gradient each step's
  mask and params are bitwise the one-device result, and the masks equal the
  single-process ones."""
  data, _ = single
  for host in multihost:
    for t in range(worker.STEPS):
      mask = _tree(host, f"{layout}/train/{t}/mask", worker.ELIGIBLE)
      _assert_same(
        mask, _tree(host, f"{layout}/train/{t}/samegrad_mask", worker.ELIGIBLE), f"step {t} mask"
      )
      _assert_same(
        _tree(host, f"{layout}/train/{t}/params"),
        _tree(host, f"{layout}/train/{t}/samegrad_params"),
        f"step {t} params",
      )
      _assert_same(
        mask, _tree(data, f"ref/train/{t}/mask", worker.ELIGIBLE), f"step {t} mask vs one process"
      )
      got = _tree(host, f"{layout}/train/{t}/params")
      for other in ("ref", layout):
        want = _tree(data, f"{other}/train/{t}/params")
        for k in LEAVES:
          np.testing.assert_allclose(
            got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=f"step {t} {k} vs {other}"
          )


# --- sharding helpers: errors and rules (this process) -----------------------


@pytest.mark.parametrize(
  "spec, match",
  [
    ("", "empty"),
    ("data", "not of the form name=size"),
    ("data=4,model", "entry 'model' is not of the form"),
    ("data=4=2", "not of the form"),
    ("data=x", "size 'x' of axis 'data' is not an integer"),
    ("data=0", "size 0 of axis 'data' must be >= 1"),
    ("data=-2", "size -2 of axis 'data'"),
    ("data=2,data=4", "axis name 'data' appears more than once"),
    ("1data=2", "axis name '1data' is not a Python identifier"),
    ("data=-1,model=-1", "at most one axis size may be -1"),
  ],
)
def test_parse_mesh_shape_errors(spec, match):
  with pytest.raises(ValueError, match=match) as e:
    sharding.parse_mesh_shape(spec)
  assert repr(spec) in str(e.value)


def test_parse_mesh_shape():
  assert sharding.parse_mesh_shape("data=4,model=2") == {"data": 4, "model": 2}
  assert list(sharding.parse_mesh_shape(" b = 1 , a = 8 ")) == ["b", "a"]
  with pytest.raises(TypeError, match="must be a string"):
    sharding.parse_mesh_shape({"data": 4})


def test_make_mesh_device_count_errors():
  n = jax.device_count()
  with pytest.raises(
    ValueError,
    match=(
      rf"mesh shape 'data={n},model=2' has {n} x 2 = {2 * n} devices, but "
      rf"there are {n} devices"
    ),
  ):
    sharding.make_mesh(f"data={n},model=2")
  with pytest.raises(ValueError, match="-1 axis cannot be sized"):
    sharding.make_mesh(f"data=-1,model={n + 1}")
  with pytest.raises(TypeError, match="size of axis 'data' must be an int"):
    sharding.make_mesh({"data": 1.0})
  with pytest.raises(ValueError, match="axis name 'a b'"):
    sharding.make_mesh({"a b": 1})
  with pytest.raises(TypeError, match="mesh shape must be a string"):
    sharding.make_mesh(8)


def test_make_mesh():
  n = jax.device_count()
  mesh = sharding.make_mesh("data=-1,model=1")
  assert dict(mesh.shape) == {"data": n, "model": 1}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2
  mesh = sharding.make_mesh({"x": 1}, devices=jax.devices()[:1])
  assert dict(mesh.shape) == {"x": 1}


def test_fsdp_partition_specs_rule():
  tree = {
    "big": jax.ShapeDtypeStruct((6, 16, 8), jnp.float32),  # 16 wins
    "tie": jax.ShapeDtypeStruct((8, 8), jnp.float32),  # first wins
    "odd": jax.ShapeDtypeStruct((3, 5, 7), jnp.float32),  # replicated
    "small": jnp.zeros((4, 4)),  # below size
    "scalar": jnp.zeros(()),
    "int": 3,
    "none": None,
  }
  specs = sharding.fsdp_partition_specs(tree, {"data": 2, "model": 4}, "model", min_size=64)
  assert specs == {
    "big": P(None, "model"),
    "tie": P("model"),
    "odd": P(),
    "small": P(),
    "scalar": P(),
    "int": P(),
    "none": None,
  }
  specs = sharding.fsdp_partition_specs(
    tree, {"data": 2, "model": 4}, ("data", "model"), min_size=0
  )
  assert specs["big"] == P(None, ("data", "model"))
  assert specs["small"] == P()
  sharding.validate_partition_specs(tree, specs, {"data": 2, "model": 4})


def test_fsdp_partition_specs_keep_the_last_axis_whole_when_they_can():
  """The search backend splits the last axis into rows of up to 32 keys, so
  the rule shards another axis first: a (64, 96) kernel over 8 devices is
  split by rows (96 / 8 = 12 columns would straddle rows of 32), and the
  last axis is only the fallback."""
  tree = {
    "kernel": jax.ShapeDtypeStruct((64, 96), jnp.float32),
    "conv": jax.ShapeDtypeStruct((5, 5, 20, 56), jnp.float32),
    "fallback": jax.ShapeDtypeStruct((5, 96), jnp.float32),
  }
  specs = sharding.fsdp_partition_specs(tree, {"model": 8}, min_size=0)
  assert specs == {
    "kernel": P("model"),
    "conv": P(None, None, None, "model"),
    "fallback": P(None, "model"),
  }
  specs = sharding.fsdp_partition_specs(tree, {"model": 4}, min_size=0)
  assert specs["conv"] == P(None, None, "model")


def test_fsdp_specs_follow_params_into_the_gsm_state():
  import optax_gsm

  params = {
    "w": jax.ShapeDtypeStruct((64, 32), jnp.float32),
    "b": jax.ShapeDtypeStruct((32,), jnp.float32),
  }
  tx = optax_gsm.gsm(0.1, compression=4, score_momentum=0.5)
  state = jax.eval_shape(tx.init, params)
  specs = sharding.fsdp_partition_specs(state, {"model": 8}, "model", min_size=1024)
  leaves = jax.tree.leaves(specs)
  assert leaves.count(P("model")) == 2  # momentum and score average of w
  assert all(s in (P(), P("model")) for s in leaves)
  sharding.validate_partition_specs(state, specs, {"model": 8})


def test_fsdp_partition_specs_errors():
  tree = {"w": jnp.zeros((8, 8))}
  with pytest.raises(
    ValueError,
    match=r"`axis`='modle': 'modle' is not an "
    r"axis of the mesh; the mesh axes are \('data', "
    r"'model'\)",
  ):
    sharding.fsdp_partition_specs(tree, {"data": 2, "model": 4}, "modle")
  with pytest.raises(TypeError, match="`axis` must be a mesh axis name"):
    sharding.fsdp_partition_specs(tree, {"model": 4}, 3)
  with pytest.raises(ValueError, match="names a mesh axis twice"):
    sharding.fsdp_partition_specs(tree, {"model": 4}, ("model", "model"))
  with pytest.raises(ValueError, match="`min_size` must be >= 0, got -1"):
    sharding.fsdp_partition_specs(tree, {"model": 4}, "model", min_size=-1)
  with pytest.raises(TypeError, match="`min_size` must be an int"):
    sharding.fsdp_partition_specs(tree, {"model": 4}, "model", min_size=1.5)
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    sharding.fsdp_partition_specs(tree, ["model"], "model")
  with pytest.raises(TypeError, match="mesh axis 'model' must have a positive int size, got 0"):
    sharding.fsdp_partition_specs(tree, {"model": 0}, "model")


def test_validate_partition_specs_errors():
  tree = {"w": jnp.zeros((6, 8)), "b": jnp.zeros(8)}
  mesh = {"data": 2, "model": 4}
  ok = {"w": P("data", "model"), "b": P("model")}
  sharding.validate_partition_specs(tree, ok, mesh)
  sharding.validate_partition_specs(tree, P(), mesh)
  cases = [
    (
      {"w": P("model"), "b": P()},
      ValueError,
      r"specs\['w'\] = P\('model'\): dimension 0 of the leaf \(shape "
      r"\(6, 8\)\) has size 6, which is not divisible by 4, the size of "
      r"mesh axis 'model'",
    ),
    (
      {"w": P(("data", "model")), "b": P()},
      ValueError,
      r"dimension 0 .* size 6, which is not divisible by 8, the product of "
      r"the sizes of mesh axes \('data', 'model'\)",
    ),
    (
      {"w": P("data", "modle"), "b": P()},
      ValueError,
      r"'modle' is not an axis of the mesh; the mesh axes are "
      r"\('data', 'model'\)",
    ),
    (
      {"w": P("data", "data"), "b": P()},
      ValueError,
      r"uses mesh axis 'data' for more than one dimension",
    ),
    (
      {"w": P(), "b": P("model", None)},
      ValueError,
      r"specs\['b'\] = P\('model', None\) has 2 entries, but the leaf has "
      r"only 1 dimensions",
    ),
    (
      {"w": P(), "b": ("model",)},
      TypeError,
      r"specs\['b'\] must be a jax.sharding.PartitionSpec, got \('model',\)",
    ),
    (
      {"w": P()},
      ValueError,
      r"`specs` must be a pytree of PartitionSpec "
      r"with the structure of the arrays",
    ),
    ({"w": P(3), "b": P()}, TypeError, r"must be a mesh axis name"),
  ]
  for specs, exc, match in cases:
    with pytest.raises(exc, match=match):
      sharding.validate_partition_specs(tree, specs, mesh)


def test_named_shardings_errors():
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  out = sharding.named_shardings({"w": P("data"), "b": P()}, mesh)
  assert out["w"].mesh is mesh and out["w"].spec == P("data")
  with pytest.raises(TypeError, match="`mesh` must be a concrete"):
    sharding.named_shardings({"w": P()}, {"data": 1})
  with pytest.raises(TypeError, match="PartitionSpec leaves, got 'data'"):
    sharding.named_shardings({"w": "data"}, mesh)
