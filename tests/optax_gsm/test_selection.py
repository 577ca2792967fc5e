"""Selection backends against the numpy ranking, on hard inputs."""

import functools

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_gsm import selection

from tests.optax_gsm import reference

BACKENDS = ("threshold", "top_k")


def select(scores_list, q, method):
  keys = [selection.scores_to_keys(jnp.asarray(s)) for s in scores_list]
  masks, _ = selection.top_q_keys(keys, q, method=method)
  return [np.asarray(m) for m in masks]


def assert_masks_equal(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def test_keys_order_like_floats():
  values = np.array(
    [-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-45, 1e-30, 2.0, 3.4e38, np.inf], np.float32
  )
  keys = np.asarray(selection.scores_to_keys(jnp.asarray(values)))
  assert keys[3] == keys[4] == 0  # -0.0 and +0.0 are one score
  assert np.all(np.diff(np.delete(keys, 3)) > 0)
  nan_key = int(selection.scores_to_keys(jnp.float32(np.nan)))
  assert nan_key == np.iinfo(np.int32).min < keys.min()
  back = np.asarray(selection.keys_to_scores(jnp.asarray(keys)))
  np.testing.assert_array_equal(back, np.where(values == 0, 0.0, values))


def test_keys_of_bfloat16_are_exact():
  x = jnp.array([0.1, 0.2, 3.0, 1e-20], jnp.bfloat16)
  np.testing.assert_array_equal(
    selection.scores_to_keys(x), selection.scores_to_keys(x.astype(jnp.float32))
  )


@pytest.mark.parametrize("method", BACKENDS)
def test_hand_worked_ties_go_to_lower_global_index(method):
  # Global order: leaf a = [2, 5, 5], leaf b = [[5, 1], [5, 0]].
  a = np.array([2.0, 5.0, 5.0], np.float32)
  b = np.array([[5.0, 1.0], [5.0, 0.0]], np.float32)
  got = select([a, b], 3, method)  # three of the four 5s: a1, a2, b00
  np.testing.assert_array_equal(got[0], [False, True, True])
  np.testing.assert_array_equal(got[1], [[True, False], [False, False]])
  got = select([a, b], 5, method)  # all 5s, then the 2
  np.testing.assert_array_equal(got[0], [True, True, True])
  np.testing.assert_array_equal(got[1], [[True, False], [True, False]])


@pytest.mark.parametrize("method", BACKENDS)
def test_nan_never_selected_unless_everything_is(method):
  s = np.array([np.nan, 1.0, np.nan, 0.0], np.float32)
  np.testing.assert_array_equal(select([s], 2, method)[0], [False, True, False, True])
  # Q = 3 > number of non-NaN scores: only the two numbers are kept.
  np.testing.assert_array_equal(select([s], 3, method)[0], [False, True, False, True])
  np.testing.assert_array_equal(select([s], 4, method)[0], [True] * 4)


@pytest.mark.parametrize("method", BACKENDS)
@pytest.mark.parametrize("q", [0, 1, 7, 499, 999, 1000, 1200])
def test_random_against_reference(method, q):
  rng = np.random.default_rng(q)
  leaves = [
    rng.standard_normal((10, 20)).astype(np.float32),
    np.abs(rng.standard_normal(300)).astype(np.float32),
    rng.standard_normal((5, 5, 4, 5)).astype(np.float32),
  ]
  assert_masks_equal(select(leaves, q, method), reference.ranked_selection(leaves, q))


@pytest.mark.parametrize("method", BACKENDS)
def test_tie_heavy_zeros(method):
  # Pruned weights and dead ReLUs make exact zeros common: 95% zeros here.
  rng = np.random.default_rng(0)
  leaves = [
    np.where(rng.random((40, 50)) < 0.95, 0.0, rng.integers(1, 4, (40, 50))).astype(np.float32),
    np.zeros((3, 3, 8), np.float32),
  ]
  n_pos = int((leaves[0] > 0).sum())
  for q in (n_pos - 3, n_pos, n_pos + 1, n_pos + 500, 2072):
    assert_masks_equal(select(leaves, q, method), reference.ranked_selection(leaves, q))


def test_threshold_accepts_traced_q():
  rng = np.random.default_rng(1)
  leaves = [
    jnp.asarray(rng.standard_normal((30, 30)), jnp.float32),
    jnp.asarray(rng.integers(0, 3, (17, 3)), jnp.float32),
  ]

  @jax.jit
  def run(q):
    keys = [selection.scores_to_keys(x) for x in leaves]
    return selection.top_q_keys(keys, q, method="threshold")[0]

  for q in (1, 300, 951):
    assert_masks_equal([np.asarray(m) for m in run(q)], reference.ranked_selection(leaves, q))


def test_top_k_accepts_traced_q():
  leaves = [jnp.asarray([3.0, 1.0, 3.0, 2.0, np.nan])]

  @jax.jit
  def run(q):
    keys = [selection.scores_to_keys(x) for x in leaves]
    return selection.top_q_keys(keys, q, method="top_k")

  for q in range(6):
    masks, kth = run(q)
    assert_masks_equal([np.asarray(masks[0])], reference.ranked_selection(leaves, q))
  assert float(selection.keys_to_scores(run(2)[1])) == 3.0


def test_kth_largest_key_matches_sort():
  rng = np.random.default_rng(2)
  x = rng.standard_normal(1000).astype(np.float32)
  keys = selection.scores_to_keys(jnp.asarray(x))
  for q in (1, 10, 500, 1000):
    got = selection.keys_to_scores(selection.kth_largest_key([keys[:400], keys[400:]], q))
    assert float(got) == np.sort(x)[::-1][q - 1]


# Exactly representable in float32 (older numpy makes hypothesis refuse 1e-30).
FLOATS = st.sampled_from(
  [
    float(np.float32(v))
    for v in (0.0, -0.0, 1.0, 2.0, 2.0, 3.5, 1e-30, -1.0, np.inf, -np.inf, np.nan)
  ]
)


# A few fixed shapes keep the number of compilations small.
SHAPES = [(7,), (2, 3), (4, 1, 5)]


@functools.partial(jax.jit, static_argnames="method")
def select_jit(leaves, q, method):
  keys = [selection.scores_to_keys(x) for x in leaves]
  return selection.top_q_keys(keys, q, method=method)[0]


@st.composite
def score_lists(draw):
  n_leaves = draw(st.integers(1, 3))
  leaves = []
  for _ in range(n_leaves):
    shape = draw(st.sampled_from(SHAPES))
    if draw(st.booleans()):
      elements = FLOATS
    else:
      elements = st.floats(-1e3, 1e3, width=32) | st.just(np.nan)
    leaves.append(draw(hnp.arrays(np.float32, shape, elements=elements)))
  n = sum(x.size for x in leaves)
  q = draw(st.integers(0, n))
  return leaves, q


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(score_lists())
def test_property_exact_q_ordered_and_backends_agree(case):
  leaves, q = case
  masks = {m: [np.asarray(x) for x in select_jit(leaves, q, m)] for m in BACKENDS}
  assert_masks_equal(masks["threshold"], masks["top_k"])
  assert_masks_equal(masks["threshold"], reference.ranked_selection(leaves, q))

  flat = np.concatenate([x.ravel() for x in leaves])
  sel = np.concatenate([m.ravel() for m in masks["threshold"]])
  n_numbers = int((~np.isnan(flat)).sum())
  expected = q if q == flat.size else min(q, n_numbers)
  assert sel.sum() == expected
  chosen, rest = flat[sel], flat[~sel & ~np.isnan(flat)]
  if chosen.size and rest.size and q < flat.size:
    assert np.nanmin(chosen) >= rest.max()
