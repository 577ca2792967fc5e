"""The "search" selection (optax_gsm.fast_select) against a numpy ranking.

Every backend must select exactly the entries of a numpy ``lexsort`` on
(descending key, ascending global flat index), NaN never unless Q >= N, on
random, tie-heavy, NaN-containing and bfloat16 scores over leaves of
different shapes, for any Q (traced or not), and for "search" from any
starting hint (warm-start hits and misses). No timing assertions here.
"""

import functools
import os
import re
import subprocess
import sys
import unittest.mock

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gsm
from optax_gsm import fast_select
from optax_gsm import selection
from tests.optax_gsm import reference

BACKENDS = ("search", "threshold", "top_k")
INT_MIN = reference.INT_MIN
np_keys = reference.int32_keys
np_select = reference.key_selection

# Leaf shapes: last axes that are multiples of 32, not, and shorter than 32,
# a 1-D leaf and a scalar leaf.
SHAPES = ((4, 64), (5, 37), (3, 2, 7), (97,), (), (2, 96))


# --- numpy reference ------------------------------------------------------------


# --- jitted selections (one compilation per leaf shapes and dtype) -------------


@functools.partial(jax.jit, static_argnames=("method",))
def _select(leaves, q, method):
  keys = [selection.scores_to_keys(l) for l in leaves]
  return selection.top_q_keys(keys, q, method=method)


@functools.partial(jax.jit, static_argnames=("collect",))
def _search(leaves, q, hint, sigma, collect=True):
  """The search over ``leaves``; with ``collect``, collecting at any size."""
  keys = [selection.scores_to_keys(l) for l in leaves]
  with unittest.mock.patch.object(fast_select, "COLLECT_MIN", 0):
    return fast_select.select(
      lambda ks, i: ks[i],
      keys,
      [k.shape for k in keys],
      q,
      hint=hint,
      sigma=sigma,
      return_info=True,
      collect=collect,
    )


def _assert_masks(got, want, msg=""):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), w, err_msg=msg)


def _leaves(kind, rng, shapes=SHAPES, dtype=np.float32):
  out = []
  for shape in shapes:
    if kind == "random":
      x = rng.standard_normal(shape)
    elif kind == "zeros":  # mostly exact zeros, a few positives
      x = np.abs(rng.standard_normal(shape)) * (rng.random(shape) < 0.2)
    elif kind == "few":  # few distinct values, signs, -0.0
      x = rng.choice(np.array([-2.0, -0.0, 0.0, 0.5, 1.0, 3.0]), shape)
    elif kind == "nan":
      x = np.where(rng.random(shape) < 0.3, np.nan, rng.standard_normal(shape))
      x = np.where(rng.random(shape) < 0.05, np.inf, x)
    elif kind == "ones":  # every score tied
      x = np.ones(shape)
    elif kind == "tiny":  # subnormals and huge values
      x = rng.choice(np.array([1e-45, 3e-45, 1e-38, 1e30, 3e38, -1e-45]), shape)
    else:
      raise ValueError(kind)
    out.append(np.asarray(x, dtype))
  return out


def _qs(n, rng):
  return sorted({0, 1, 2, n - 1, n, int(rng.integers(0, n + 1)), int(rng.integers(0, n + 1))})


# --- exactness --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "zeros", "few", "nan", "tiny"])
def test_every_backend_matches_numpy(kind):
  rng = np.random.default_rng(hash(kind) % 2**32)
  leaves = _leaves(kind, rng)
  n = sum(int(np.size(l)) for l in leaves)
  for q in _qs(n, rng):
    want, want_kth = np_select(leaves, q)
    for method in BACKENDS:
      masks, kth = _select(leaves, jnp.int32(q), method)
      _assert_masks(masks, want, f"{kind} q={q} {method}")
      if want_kth != INT_MIN and q > 0:
        assert int(kth) == want_kth, (kind, q, method)


def test_bfloat16_scores():
  rng = np.random.default_rng(0)
  leaves = [jnp.asarray(l, jnp.bfloat16) for l in _leaves("random", rng, shapes=((8, 40), (33,)))]
  as_f32 = [np.asarray(l.astype(jnp.float32)) for l in leaves]
  n = sum(l.size for l in as_f32)
  for q in _qs(n, rng):
    want, _ = np_select(as_f32, q)
    for method in BACKENDS:
      masks, _ = _select(leaves, jnp.int32(q), method)
      _assert_masks(masks, want, f"bf16 q={q} {method}")


def test_static_q_and_python_int():
  rng = np.random.default_rng(1)
  leaves = _leaves("few", rng, shapes=((6, 32), (10,)))
  keys = [selection.scores_to_keys(jnp.asarray(l)) for l in leaves]
  for q in (7, 70):
    want, _ = np_select(leaves, q)
    masks, _ = jax.jit(lambda ks, q=q: selection.top_q_keys(ks, q, method="search"))(keys)
    _assert_masks(masks, want)


def test_traced_q_under_jit():
  rng = np.random.default_rng(2)
  leaves = [jnp.asarray(l) for l in _leaves("random", rng, shapes=((16, 64), (50,)))]

  @jax.jit
  def f(q):
    keys = [selection.scores_to_keys(l) for l in leaves]
    return selection.top_q_keys(keys, q, method="search")[0]

  for q in (0, 1, 333, 1074):
    _assert_masks(f(jnp.int32(q)), np_select(leaves, q)[0])


@pytest.mark.parametrize("collect", [True, False], ids=["collect", "passes"])
@pytest.mark.parametrize(
  "hint_kind", ["exact", "near", "far_above", "far_below", "nan_key", "int_max", "int_min_plus_one"]
)
def test_search_is_exact_from_any_hint(hint_kind, collect):
  """Warm-start hits and misses: the hint only changes the passes."""
  rng = np.random.default_rng(3)
  for kind in ("random", "zeros", "few", "nan"):
    leaves = _leaves(kind, rng)
    n = sum(int(np.size(l)) for l in leaves)
    for q in _qs(n, rng):
      want, want_kth = np_select(leaves, q)
      hint = {
        "exact": want_kth,
        "near": min(max(want_kth + 37, INT_MIN + 1), 2**31 - 1),
        "far_above": 2**30,
        "far_below": -(2**30),
        "nan_key": INT_MIN,
        "int_max": 2**31 - 1,
        "int_min_plus_one": INT_MIN + 1,
      }[hint_kind]
      for sigma in (0.5, 4096.0, 1e9):
        args = (leaves, jnp.int32(q), jnp.int32(hint), jnp.float32(sigma))
        masks, kth, info = _search(*args, collect=collect)
        _assert_masks(masks, want, f"{kind} q={q} hint={hint_kind}")
        if q > 0 and want_kth != INT_MIN:
          assert int(kth) == want_kth
        # Bounded: never more passes than a plain 32-bit radix descent.
        assert int(info.key_passes) <= 40, info


def test_search_with_exact_hint_needs_few_passes():
  rng = np.random.default_rng(4)
  leaves = _leaves("random", rng, shapes=((64, 64), (32, 96)))
  n = sum(l.size for l in leaves)
  q = n // 5
  _, kth = np_select(leaves, q)
  _, got, info = _search(leaves, jnp.int32(q), jnp.int32(kth), jnp.float32(64.0))
  assert int(got) == kth
  assert int(info.key_passes) <= 3, info


@pytest.mark.parametrize("collect", [True, False], ids=["collect", "passes"])
def test_ties_spanning_leaves_are_cut_by_global_index(collect):
  # All entries equal: the first q in global order, across leaf boundaries.
  leaves = [np.ones((3, 40), np.float32), np.ones((7,), np.float32), np.ones((2, 33), np.float32)]
  n = sum(l.size for l in leaves)
  for q in (1, 119, 120, 121, 126, 127, 128, n - 1):
    want, _ = np_select(leaves, q)
    args = (leaves, jnp.int32(q), jnp.int32(INT_MIN), jnp.float32(1.0))
    masks, _, info = _search(*args, collect=collect)
    _assert_masks(masks, want, f"q={q}")
    assert sum(int(np.sum(m)) for m in masks) == q


# Leaves of repeated shapes: each leaf's share of the ties at the cut reaches
# its (shared) kernels as a run-time limit.
REPEATED_SHAPES = ((3, 40), (7,), (3, 40), (3, 40), (7,), (3, 40))


@pytest.mark.parametrize("collect", [True, False], ids=["collect", "passes"])
@pytest.mark.parametrize("kind", ["ones", "few", "zeros"])
def test_ties_in_leaves_of_one_shape(kind, collect):
  rng = np.random.default_rng(7)
  leaves = _leaves(kind, rng, shapes=REPEATED_SHAPES)
  n = sum(l.size for l in leaves)
  # Cuts at the first ties of a leaf (a walk) and further in (a radix
  # search), in each leaf.
  qs = {1, 2, 3, 119, 120, 121, 122, 127, 128, 129, 180, 250, 367, 369, 372, 400, n - 1}
  for q in sorted(qs | set(_qs(n, rng))):
    want, want_kth = np_select(leaves, q)
    args = (leaves, jnp.int32(q), jnp.int32(INT_MIN), jnp.float32(1.0))
    masks, kth, _ = _search(*args, collect=collect)
    _assert_masks(masks, want, f"{kind} q={q}")
    if q > 0:
      assert int(kth) == want_kth


def _leaf_kernels(num_leaves: int, collect_min: int) -> int:
  """Distinct XLA kernels that read or write a leaf-sized array in the
  compiled GSM step over ``num_leaves`` leaves of one shape (up to names)."""
  params = {f"w{i}": jnp.ones((64, 96)) for i in range(num_leaves)}
  tx = optax_gsm.gsm(0.1, compression=4.0)
  state = tx.init(params)

  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  with unittest.mock.patch.object(fast_select, "COLLECT_MIN", collect_min):
    hlo = jax.jit(step).lower(params, state, params).compile().as_text()
  kernels = set()
  for block in hlo.split("\n\n"):
    block = block.strip()
    header = block.split("\n", 1)[0]
    if not header.startswith(("%fused", "%wrapped")) or "[64,96]" not in header:
      continue
    block = re.sub(r", metadata=\{[^}]*\}", "", block)
    block = re.sub(r"%[\w.\-]+", "%", block)
    kernels.add(re.sub(r"param_\d+\.\d+", "p", block))
  return len(kernels)


@pytest.mark.parametrize("collect_min", [0, 2**62], ids=["collect", "passes"])
def test_leaves_of_one_shape_share_kernels(collect_min):
  # XLA:CPU compiles a kernel once for identical fused computations: no
  # per-leaf constant may enter the leaves' kernels (the build time would
  # grow with the number of leaves rather than of leaf shapes).
  shared = _leaf_kernels(3, collect_min)
  assert shared > 0  # (the HLO was read)
  assert _leaf_kernels(8, collect_min) == shared


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_FIXED_POINT_PROGRAM = """
import jax, jax.numpy as jnp, optax, optax_gsm
params = {f"w{i:02d}": jnp.ones((64, 96 + 32 * (i % 3))) for i in range(40)}
tx = optax_gsm.gsm(0.1, compression=4.0)
def step(p, s, g):
  updates, s = tx.update(g, s, p)
  return optax.apply_updates(p, updates), s
jax.jit(step).lower(params, tx.init(params), params).compile()
"""


def test_build_simplifier_reaches_its_fixed_point():
  # XLA:CPU's simplification pipeline runs until nothing changes, at most 25
  # rounds. A reshape after each leaf's count sum was moved through the
  # chain of additions over the leaves one addition per round: with 40
  # leaves it never stopped early (25 rounds, then 15 more in the next
  # pipeline), which cost over 1 s of the ResNet-50-shaped build. XLA logs
  # each round (a C++ log, so a subprocess reads it).
  env = dict(
    os.environ,
    TF_CPP_MIN_LOG_LEVEL="0",
    TF_CPP_VMODULE="hlo_pass_pipeline=1",
    PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    JAX_PLATFORMS="cpu",
  )
  out = subprocess.run(
    [sys.executable, "-c", _FIXED_POINT_PROGRAM], env=env, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rounds = re.findall(r"pipeline on module jit_step: simplification$", out.stderr, re.MULTILINE)
  if not rounds:
    pytest.skip("this XLA does not log its pass pipelines in the expected form")
  assert len(rounds) < 25


# Collecting the bracket's keys, made to happen with small limits patched in
# (at most 32 keys collected, runs of 4 rows): leaves in rows of 32, 7, 21,
# 25, 5 and 1 keys (a prime size, a scalar), so rows and runs end
# everywhere, and the all-tied kinds take the path of a cut inside one row.
COLLECT_SHAPES = (
  (40, 64), (7,), (33, 96), (3, 2, 7), (2000,), (5, 37), (700, 3), (12, 5, 64), (1021,), (),
  (1000, 1),
)  # fmt: skip


def _small_collect():
  """At any size, at most 32 keys collected, gathered 4 rows at a time (read when tracing)."""
  return unittest.mock.patch.multiple(
    fast_select, COLLECT_ROWS=16, COLLECT_ROWS_MIN=16, GATHER_ROWS=4, COLLECT_MIN=0
  )


@functools.partial(jax.jit, static_argnames=("collect",))
def _small_collect_search(leaves, q, hint, sigma, collect=True):
  with _small_collect():
    return _search.__wrapped__(leaves, q, hint, sigma, collect=collect)


@pytest.mark.parametrize("kind", ["random", "zeros", "few", "nan", "ones", "tiny"])
def test_collected_search_matches_numpy_and_passes(kind):
  """Collecting changes where the search ends, never the answer: the masks
  match the reference and the search by passes only."""
  rng = np.random.default_rng(17)
  leaves = _leaves(kind, rng, shapes=COLLECT_SHAPES)
  n = sum(l.size for l in leaves)
  assert [fast_select._flat_width(l.size) for l in leaves] == [
    32, 7, 32, 21, 25, 5, 25, 32, 1, 1, 25
  ]  # fmt: skip
  qs = set(_qs(n, rng)) | {n // 5, n // 2, 2560, 2567, 2568, 5735, 9000}
  collected = 0
  for q in sorted(qs):
    want, want_kth = np_select(leaves, q)
    hints = {INT_MIN, want_kth, min(max(want_kth + 999, INT_MIN + 1), 2**31 - 1), 2**30}
    for hint in sorted(hints):
      for sigma in (64.0, 1e6):
        args = (leaves, jnp.int32(q), jnp.int32(hint), jnp.float32(sigma))
        masks, kth, info = _small_collect_search(*args)
        _assert_masks(masks, want, f"{kind} q={q} hint={hint}")
        if q > 0 and want_kth != INT_MIN:
          assert int(kth) == want_kth
        _assert_masks(_small_collect_search(*args, collect=False)[0], want, "passes only")
        collected += int(info.buffer_passes) > 0
  assert collected > 0


def test_all_tied_keys_are_cut_inside_a_row():
  """Far more ties than can be collected: the cut's row comes from the
  per-row counts, and only that row is read."""
  leaves = [np.ones(s, np.float32) for s in COLLECT_SHAPES]
  n = sum(l.size for l in leaves)
  for q in (1, 31, 32, 33, 2559, 2560, 2561, 2567, 5735, n - 1, n):
    want, _ = np_select(leaves, q)
    masks, _, _ = _small_collect_search(leaves, jnp.int32(q), jnp.int32(INT_MIN), jnp.float32(1.0))
    _assert_masks(masks, want, f"q={q}")


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
  flags=hnp.arrays(bool, st.sampled_from([32, 64, 320]), elements=st.booleans()),
  cap=st.integers(1, 96),
)
def test_set_bits_lists_the_set_entries_in_order(flags, cap):
  index, ok = fast_select._set_bits(fast_select._words(jnp.asarray(flags)), cap)
  want = np.flatnonzero(flags)[:cap]
  np.testing.assert_array_equal(np.asarray(ok), np.arange(cap) < len(want))
  np.testing.assert_array_equal(np.asarray(index)[: len(want)], want)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
  ties=hnp.arrays(np.uint8, st.sampled_from([32, 96]), elements=st.integers(0, 32)),
  frac=st.floats(0.0, 1.0),
)
def test_tie_row_finds_the_row_of_the_take_th_tie(ties, frac):
  total = int(ties.sum())
  hypothesis.assume(total > 0)
  take = 1 + int(frac * (total - 1))
  row, before = fast_select._tie_row(jnp.asarray(ties), jnp.int32(take))
  cum = np.cumsum(ties.astype(np.int64))
  want = int(np.searchsorted(cum, take))
  assert int(row) == want
  assert int(before) == int(cum[want] - ties[want])


def test_nan_rule():
  s = [np.array([np.nan, 1.0, np.nan, 0.0], np.float32)]
  for q, want in (
    (2, [False, True, False, True]),
    (3, [False, True, False, True]),
    (4, [True, True, True, True]),
  ):
    masks, _, _ = _search(s, jnp.int32(q), jnp.int32(INT_MIN), jnp.float32(1.0))
    np.testing.assert_array_equal(np.asarray(masks[0]), want)


def test_empty_and_single_entry():
  masks, kth = selection.top_q_keys([jnp.zeros((0,), jnp.int32)], 0, method="search")
  assert masks[0].shape == (0,) and int(kth) == INT_MIN
  k = selection.scores_to_keys(jnp.float32(2.0))
  masks, kth = selection.top_q_keys([k], 1, method="search")
  assert bool(masks[0]) and int(kth) == int(k)


# --- properties -------------------------------------------------------------------

# Values exactly representable in float32 (1e-30 and 3e38 are not, and older
# numpy makes hypothesis refuse an inexact element).
_SPECIAL = (0.0, -0.0, 1.0, 2.0, 0.5, -1.0, 1e-30, 3e38, np.nan, np.inf, -np.inf)
_VALUES = st.sampled_from([float(np.float32(v)) for v in _SPECIAL])


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
  a=hnp.arrays(np.float32, (4, 40), elements=_VALUES | st.floats(-4, 4, width=32)),
  b=hnp.arrays(np.float32, (37,), elements=_VALUES),
  q=st.integers(0, 197),
  hint=st.integers(INT_MIN, 2**31 - 1),
  sigma=st.floats(0.5, 1e9),
)
def test_properties(a, b, q, hint, sigma):
  leaves = [a, b]
  n = a.size + b.size
  args = (leaves, jnp.int32(q), jnp.int32(hint), jnp.float32(sigma))
  masks, _, _ = _search(*args)
  masks = [np.asarray(m) for m in masks]
  want, _ = np_select(leaves, q)
  _assert_masks(masks, want)
  _assert_masks(_search(*args, collect=False)[0], want, "passes only")
  sel = np.concatenate([m.ravel() for m in masks])
  keys = np.concatenate([np_keys(l).ravel() for l in leaves])
  n_real = int(np.sum(keys != INT_MIN))
  # Exactly Q selected (fewer only when NaN would be needed, Q < N).
  assert sel.sum() == (q if q >= n else min(q, n_real))
  # Every selected key >= every unselected non-NaN key.
  if sel.any() and (~sel & (keys != INT_MIN)).any():
    assert keys[sel].min() >= keys[~sel & (keys != INT_MIN)].max()
  # Identical across backends.
  for method in ("threshold", "top_k"):
    other, _ = _select(leaves, jnp.int32(q), method)
    _assert_masks(other, masks, method)


# --- inside GSM: warm start, schedules, MultiSteps --------------------------------


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {
    "a": jnp.asarray(rng.standard_normal((24, 64)), jnp.float32),
    "b": jnp.asarray(rng.standard_normal((10, 9)), jnp.float32),
    "bias": jnp.zeros((9,), jnp.float32),
  }
  grads = [
    jax.tree.map(
      lambda p, s=s: jnp.asarray(
        np.random.default_rng(100 + s).standard_normal(p.shape) * (1.0 + 0.05 * s), jnp.float32
      ),
      params,
    )
    for s in range(6)
  ]
  return params, grads


def _run(tx, params, grads):
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  states, updates = [], []
  for g in grads:
    u, state = step(params, state, g)
    params = optax.apply_updates(params, u)
    states.append(state)
    updates.append(u)
  return params, states, updates


def _assert_same_run(params, got, want):
  """Same final params and the same threshold at every step."""
  (p_got, s_got), (p_want, s_want) = got, want
  for k in params:
    np.testing.assert_array_equal(np.asarray(p_got[k]), np.asarray(p_want[k]))
  for sg, sw in zip(s_got, s_want, strict=True):
    assert float(sg[0].threshold) == float(sw[0].threshold)


def test_gsm_auto_matches_top_k_over_steps():
  params, grads = _problem()
  kw = dict(compression=7, momentum=0.9, weight_decay=1e-3)
  p_auto, s_auto, _ = _run(optax_gsm.gsm(0.05, selection="auto", **kw), params, grads)
  p_ref, s_ref, _ = _run(optax_gsm.gsm(0.05, selection="top_k", **kw), params, grads)
  _assert_same_run(params, (p_auto, s_auto), (p_ref, s_ref))
  # The warm start is in use: the state tracks the threshold's drift.
  last = s_auto[-1][0]
  assert last.threshold_drift.dtype == jnp.float32
  assert last.threshold_spread.shape == ()
  assert float(last.threshold_spread) > 0


@pytest.mark.parametrize("variant", ["taylor", "score_momentum", "leaf_normalized_metric"])
def test_gsm_auto_matches_top_k_when_collecting(variant):
  """Through the transform, with the built-in metric, stored scores and a
  metric of the caller's (normalised by its leaf's sum: the gathered rows'
  keys still come from the whole leaf), at most 32 keys collected 4 rows at
  a time: every step is exact."""
  params, grads = _problem(2)
  kw = dict(compression=7, momentum=0.9, weight_decay=1e-3)
  if variant == "score_momentum":
    kw["score_momentum"] = 0.5
  elif variant == "leaf_normalized_metric":
    kw["metric"] = lambda g, w: jnp.abs(g * w) / jnp.sum(jnp.abs(g * w))
  with _small_collect():
    p_auto, s_auto, _ = _run(optax_gsm.gsm(0.05, selection="auto", **kw), params, grads)
  p_ref, s_ref, _ = _run(optax_gsm.gsm(0.05, selection="top_k", **kw), params, grads)
  _assert_same_run(params, (p_auto, s_auto), (p_ref, s_ref))


def test_gsm_warm_start_miss_is_exact():
  params, grads = _problem(1)
  tx = optax_gsm.global_top_q(compression=5, selection="auto")
  ref = optax_gsm.global_top_q(compression=5, selection="top_k")
  state = tx.init(params)
  update = jax.jit(tx.update)
  _, state = update(grads[0], state, params)
  # A threshold far from the answer, and a huge drift estimate.
  bad = state._replace(
    threshold=state.threshold * 1e6,
    threshold_drift=jnp.float32(-3e8),
    threshold_spread=jnp.float32(1e9),
  )
  got, _ = update(grads[1], bad, params)
  want, _ = jax.jit(ref.update)(grads[1], ref.init(params), params)
  for k in params:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


def test_inject_hyperparams_traced_compression():
  params, grads = _problem(2)
  tx = optax.inject_hyperparams(optax_gsm.gsm)(
    learning_rate=0.05, compression=6.0, selection="auto"
  )
  ref = optax_gsm.gsm(0.05, compression=6.0, selection="top_k")
  p1, _, _ = _run(tx, params, grads[:3])
  p2, _, _ = _run(ref, params, grads[:3])
  for k in params:
    np.testing.assert_allclose(np.asarray(p1[k]), np.asarray(p2[k]), rtol=0, atol=0)


def test_multisteps():
  params, grads = _problem(3)
  tx = optax.MultiSteps(optax_gsm.gsm(0.05, compression=4), every_k_schedule=2)
  ref = optax.MultiSteps(optax_gsm.gsm(0.05, compression=4, selection="top_k"), every_k_schedule=2)
  p1, _, _ = _run(tx, params, grads[:4])
  p2, _, _ = _run(ref, params, grads[:4])
  for k in params:
    np.testing.assert_array_equal(np.asarray(p1[k]), np.asarray(p2[k]))


def test_magnitude_prune_auto_matches_top_k():
  params, _ = _problem(4)
  a, ma = optax_gsm.magnitude_prune(params, compression=3)
  b, mb = optax_gsm.magnitude_prune(params, compression=3, selection="top_k")
  for k in params:
    np.testing.assert_array_equal(np.asarray(ma[k]), np.asarray(mb[k]))


def test_warm_start_saturates():
  for key in (INT_MIN, INT_MIN + 1, 0, 2**31 - 1, 0x7F800000):
    for drift in (-1e12, -5.0, 0.0, 7.0, 1e12):
      ws = fast_select.warm_start(
        jnp.int32(key), jnp.float32(drift), jnp.float32(10.0), jnp.bool_(True)
      )
      h = int(ws.hint)
      if key == INT_MIN:
        assert h == INT_MIN  # no hint
      else:
        assert INT_MIN < h <= int(fast_select.TOP_KEY)
  ws = fast_select.warm_start(jnp.int32(5), jnp.float32(0.0), jnp.float32(0.0), jnp.bool_(False))
  assert int(ws.hint) == INT_MIN


# --- the sampled restart (models of at least SAMPLE_MIN keys) --------------------

# 77,279 keys: above SAMPLE_MIN, leaves smaller and larger than the stride.
SAMPLED_SHAPES = ((300, 256), (5, 37), (0, 3), (100,), (), (1, 1), (2, 96))


@pytest.mark.parametrize("kind", ["random", "zeros", "few", "nan", "tiny"])
def test_sampled_restart_is_exact(kind):
  """Cold starts and far-off hints on a model large enough to be sampled."""
  rng = np.random.default_rng(hash(kind) % 2**32 + 7)
  leaves = _leaves(kind, rng, shapes=SAMPLED_SHAPES)
  n = sum(int(np.size(l)) for l in leaves)
  assert n >= fast_select.SAMPLE_MIN
  for q in _qs(n, rng) + [n // 5]:
    want, want_kth = np_select(leaves, q)
    for hint in (INT_MIN, 2**30, -(2**30), 2**31 - 1, INT_MIN + 1):
      masks, kth, info = _search(leaves, jnp.int32(q), jnp.int32(hint), jnp.float32(64.0))
      _assert_masks(masks, want, f"{kind} q={q} hint={hint}")
      if q > 0 and want_kth != INT_MIN:
        assert int(kth) == want_kth, (kind, q, hint)
      assert int(info.key_passes) <= 40, info


def test_sampled_restart_saves_passes():
  """On random scores the sample brackets the answer in fewer passes than galloping."""
  rng = np.random.default_rng(11)
  leaves = _leaves("random", rng, shapes=SAMPLED_SHAPES)
  n = sum(int(np.size(l)) for l in leaves)
  q = jnp.int32(n // 5)
  passes = {}
  for name, sample_min in (("sampled", fast_select.SAMPLE_MIN), ("gallop", 2**62)):

    @jax.jit
    def run(leaves, hint, sample_min=sample_min):
      keys = [selection.scores_to_keys(l) for l in leaves]
      with unittest.mock.patch.object(fast_select, "SAMPLE_MIN", sample_min):
        return fast_select.select(
          lambda ks, i: ks[i], keys, [k.shape for k in keys], q, hint=hint, return_info=True
        )[2]

    passes[name] = [int(run(leaves, jnp.int32(h)).key_passes) for h in (INT_MIN, 2**30, -(2**30))]
  # On this input: sampled [3, 4, 4] against gallop [7, 4, 9] (the pattern
  # from a hint of 2.0 happens to close the bracket as fast as the sample).
  assert all(s <= g for s, g in zip(passes["sampled"], passes["gallop"])), passes
  assert sum(passes["sampled"]) < sum(passes["gallop"]), passes
  assert max(passes["sampled"]) <= 5, passes


def test_sample_stride_is_a_prime_of_the_right_size():
  for n in (1, 2**16, 10**6, 25_502_912, 10**8, 2**31 - 1):
    stride = fast_select._sample_stride(n)
    assert stride >= 257 and stride * 2**17 >= n
    assert all(stride % d for d in range(2, int(stride**0.5) + 1)), stride
  assert fast_select._sample_stride(10**6) == 257  # 257 is prime
  assert fast_select._sample_stride(10**8) == 769  # the first prime >= ceil(1e8 / 2**17) = 763


def test_sample_thresholds_by_hand():
  # 100 sample keys 0..99, n = 1000, q = 200: p = 0.2, about 20 sample keys
  # above the answer, spread sqrt(100 * 0.2 * 0.8) + 1 = 5: positions
  # round(80 + [-12, -3, -1, -1/4, 1/4, 1, 3, 12] * 5), clipped to [0, 99].
  keys = jnp.arange(100, dtype=jnp.int32)
  to_u = fast_select._to_u
  got = fast_select._sample_thresholds(
    keys, jnp.uint32(0), jnp.asarray(fast_select._TOP_U), jnp.int32(200), 1000
  )
  assert fast_select._to_i(got).tolist() == [20, 65, 75, 79, 81, 85, 95, 99]
  # Clipped into the bracket [lo + 1, hi - 1] = [71, 89].
  got = fast_select._sample_thresholds(
    keys, to_u(jnp.int32(70)), to_u(jnp.int32(90)), jnp.int32(200), 1000
  )
  assert fast_select._to_i(got).tolist() == [71, 71, 75, 79, 81, 85, 89, 89]
