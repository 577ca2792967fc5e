"""Selection and pruning under ``jax_enable_x64`` and with zero-size leaves.

Issue 17 (A): with x64 on, "search" / "auto" and ``magnitude_prune`` crashed
on every input (an int64 sum in a while-loop carry declared int32). Issue 17
(B): an eligible zero-size leaf crashed "search" and ``magnitude_prune``
(a min over an empty array). Every backend must select exactly the entries
of the numpy ranking in both cases.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_gsm
from optax_gsm import fast_select
from optax_gsm import selection
from tests.optax_gsm import reference
from tests.optax_gsm._compat import enable_x64

BACKENDS = ("auto", "search", "threshold", "top_k")
# top_q_keys maps "auto" to "search" itself: the same code, tested once.
KEY_BACKENDS = ("search", "threshold", "top_k")
INT_MIN = reference.INT_MIN


def np_select(leaves, q):
  """The reference masks (``reference.key_selection`` without the key)."""
  return reference.key_selection(leaves, q)[0]


def _scores():
  rng = np.random.default_rng(17)
  a = rng.normal(size=(4, 40)).astype(np.float32)
  a[0, :6] = 0.5  # ties across the cut
  b = rng.normal(size=(3, 5)).astype(np.float32)
  b[1, 2] = np.nan
  return [np.abs(a), np.abs(b), np.abs(rng.normal(size=(7,))).astype(np.float32)]


@functools.lru_cache(maxsize=None)
def _jitted(method, traced_q):
  if traced_q:
    return jax.jit(lambda ks, q: selection.top_q_keys(ks, q, method=method))
  return jax.jit(lambda ks, q: selection.top_q_keys(ks, q, method=method), static_argnums=1)


def _select(leaves, q, method, traced_q=False):
  """Masks and kth (jitted; one compilation per backend for a traced Q)."""
  keys = [selection.scores_to_keys(jnp.asarray(l)) for l in leaves]
  masks, kth = _jitted(method, traced_q)(keys, jnp.int32(q) if traced_q else q)
  return [np.asarray(m) for m in masks], kth


# --- A: jax_enable_x64 ----------------------------------------------------------


@pytest.mark.parametrize("method", KEY_BACKENDS)
@pytest.mark.parametrize("traced_q", [False, True])
def test_top_q_keys_under_x64_matches_x64_off_and_numpy(method, traced_q):
  leaves = _scores()
  for q in (1, 5, 23, 174, 500) if traced_q else (5, 500):
    off, kth_off = _select(leaves, q, method, traced_q)
    with enable_x64(True):
      on, kth_on = _select(leaves, q, method, traced_q)
    assert kth_on.dtype == jnp.int32
    assert int(kth_on) == int(kth_off)
    for m_off, m_on, ref in zip(off, on, np_select(leaves, q)):
      assert m_on.dtype == bool
      np.testing.assert_array_equal(m_on, ref)
      np.testing.assert_array_equal(m_off, ref)


def test_search_under_x64_with_hint_and_info():
  leaves = [jnp.asarray(l) for l in _scores()]
  keys = [selection.scores_to_keys(l) for l in leaves]
  shapes = [k.shape for k in keys]

  def run(keys):
    return fast_select.select(
      lambda ks, i: ks[i], keys, shapes, 9, hint=keys[0][0, 0], sigma=100.0, return_info=True
    )

  off = jax.jit(run)(keys)
  with enable_x64(True):
    on = jax.jit(run)(keys)
  for a, b in zip(off[0], on[0]):
    np.testing.assert_array_equal(a, b)
  assert int(on[1]) == int(off[1]) and on[1].dtype == jnp.int32
  assert [x.dtype for x in on[2]] == [jnp.int32] * len(fast_select.SearchInfo._fields)


def test_warm_start_and_drift_keep_32_bit_dtypes_under_x64():
  with enable_x64(True):
    w = fast_select.warm_start(
      jnp.int32(1000), jnp.float32(3.0), jnp.float32(10.0), jnp.bool_(True)
    )
    drift, spread = fast_select.update_drift(
      jnp.int32(1000), jnp.int32(1010), jnp.float32(4.0), jnp.float32(2.0), jnp.bool_(True)
    )
  assert (w.hint.dtype, w.sigma.dtype) == (jnp.int32, jnp.float32)
  assert int(w.hint) == 1003 and float(w.sigma) == 64.0
  # drift = (4 + 10) / 2, spread = (2 + |10 - 4|) / 2.
  assert (float(drift), float(spread)) == (7.0, 4.0)
  assert (drift.dtype, spread.dtype) == (jnp.float32, jnp.float32)


def _params(dtype):
  rng = np.random.default_rng(3)
  return {
    "w": jnp.asarray(rng.normal(size=(6, 33)), dtype),
    "k": jnp.asarray(rng.normal(size=(2, 3, 4)), dtype),
    "b": jnp.asarray(rng.normal(size=(5,)), dtype),
  }


@pytest.mark.parametrize("method", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_magnitude_prune_under_x64_matches_x64_off(method, dtype):
  q = 40
  with enable_x64(True):
    params = _params(dtype)
    pruned_on, masks_on = optax_gsm.magnitude_prune(params, q, selection=method)
    assert pruned_on["w"].dtype == jnp.dtype(dtype)
  params32 = _params("float32" if dtype == "float64" else dtype)
  pruned_off, masks_off = optax_gsm.magnitude_prune(params32, q, selection=method)
  # float64 magnitudes are ranked as float32: the same masks.
  for name in params:
    np.testing.assert_array_equal(masks_on[name], masks_off[name])
  ref = np_select([np.abs(np.asarray(params32[n], np.float32)) for n in ("k", "w")], q)
  np.testing.assert_array_equal(masks_on["k"], ref[0])
  np.testing.assert_array_equal(masks_on["w"], ref[1])
  np.testing.assert_array_equal(masks_on["b"], np.ones(5, bool))
  assert sum(int(np.sum(masks_on[n])) for n in ("k", "w")) == q
  np.testing.assert_array_equal(
    np.asarray(pruned_on["w"], np.float32),
    np.where(masks_on["w"], np.asarray(params["w"], np.float32), 0.0),
  )


# --- B: zero-size leaves ----------------------------------------------------------


def _with_empty():
  rng = np.random.default_rng(5)
  return [
    np.zeros((0, 4), np.float32),
    np.abs(rng.normal(size=(3, 5))).astype(np.float32),
    np.zeros((2, 0, 3), np.float32),
    np.abs(rng.normal(size=(2, 32))).astype(np.float32),
    np.zeros((0,), np.float32),
  ]


@pytest.mark.parametrize("method", KEY_BACKENDS)
@pytest.mark.parametrize("traced_q", [False, True])
def test_top_q_keys_with_zero_size_leaves(method, traced_q):
  leaves = _with_empty()
  flat = np.sort(np.concatenate([l.ravel() for l in leaves]))[::-1]
  for q in (0, 1, 4, 78, 79, 100) if traced_q else (4, 79):
    masks, kth = _select(leaves, q, method, traced_q)
    ref = np_select(leaves, q)
    for m, r, l in zip(masks, ref, leaves):
      assert m.shape == l.shape
      np.testing.assert_array_equal(m, r)
    assert sum(int(m.sum()) for m in masks) == min(q, 79)
    if q == 0:
      assert int(kth) == INT_MIN
    else:
      assert float(selection.keys_to_scores(kth)) == flat[min(q, 79) - 1]


def test_search_with_zero_size_leaves_reports_info():
  keys = [selection.scores_to_keys(jnp.asarray(l)) for l in _with_empty()]
  masks, kth, info = fast_select.select(
    lambda ks, i: ks[i], keys, [k.shape for k in keys], 10, return_info=True
  )
  assert [m.shape for m in masks] == [k.shape for k in keys]
  assert sum(int(m.sum()) for m in masks) == 10
  assert int(info.key_passes) >= 1


def test_search_all_leaves_empty_selects_nothing():
  keys = [jnp.zeros((0, 3), jnp.int32), jnp.zeros((0,), jnp.int32)]
  masks, kth = fast_select.select(lambda ks, i: ks[i], keys, [k.shape for k in keys], 5)
  assert [m.shape for m in masks] == [(0, 3), (0,)]
  assert int(kth) == INT_MIN


@pytest.mark.parametrize("method", BACKENDS)
@pytest.mark.parametrize("compression", [1, 2, 7])
def test_magnitude_prune_with_zero_size_leaf(method, compression):
  rng = np.random.default_rng(11)
  params = {"a_empty": jnp.zeros((0, 4)), "w": jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)}
  pruned, masks = optax_gsm.magnitude_prune(params, compression=compression, selection=method)
  q = round(24 / compression)
  assert masks["a_empty"].shape == (0, 4) and pruned["a_empty"].shape == (0, 4)
  ref = np_select([np.abs(np.asarray(params["w"]))], q)[0]
  np.testing.assert_array_equal(masks["w"], ref)
  assert int(np.sum(masks["w"])) == q
  np.testing.assert_array_equal(pruned["w"], np.where(ref, np.asarray(params["w"]), 0.0))


@pytest.mark.parametrize("method", BACKENDS)
def test_global_top_q_with_zero_size_leaf_below_n(method):
  rng = np.random.default_rng(12)
  params = {"a_empty": jnp.zeros((0, 4)), "w": jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)}
  grads = {"a_empty": jnp.zeros((0, 4)), "w": jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)}
  tx = optax_gsm.global_top_q(5, selection=method)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  ref = np_select([np.abs(np.asarray(grads["w"]) * np.asarray(params["w"]))], 5)[0]
  np.testing.assert_array_equal(updates["w"], np.where(ref, np.asarray(grads["w"]), 0.0))
  assert updates["a_empty"].shape == (0, 4)
  assert int(state.num_nonzero) == 5


def test_global_top_q_with_zero_size_leaf_at_compression_1():
  rng = np.random.default_rng(13)
  params = {"a_empty": jnp.zeros((0, 4)), "w": jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)}
  grads = {"a_empty": jnp.zeros((0, 4)), "w": jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)}
  tx = optax_gsm.global_top_q(compression=1)
  updates, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["w"], grads["w"])
  assert int(state.num_nonzero) == 24
  assert float(state.threshold) == float(
    np.min(np.abs(np.asarray(grads["w"]) * np.asarray(params["w"])))
  )
