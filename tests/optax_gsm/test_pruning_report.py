"""magnitude_prune and sparsity_report against numpy."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_gsm

from tests.optax_gsm import reference


@pytest.mark.parametrize("selection", ["auto", "threshold", "top_k"])
def test_magnitude_prune_matches_reference(selection):
  rng = np.random.default_rng(0)
  params = {
    "a": jnp.asarray(rng.standard_normal((20, 30)), jnp.float32),
    "b": [
      jnp.asarray(rng.standard_normal((5, 5, 3, 4)), jnp.float32),
      jnp.asarray(rng.standard_normal(4), jnp.float32),
    ],
  }
  q = 77
  pruned, masks = optax_gsm.magnitude_prune(params, q, selection=selection)
  want = reference.ranked_selection([np.abs(params["a"]), np.abs(params["b"][0])], q)
  np.testing.assert_array_equal(masks["a"], want[0])
  np.testing.assert_array_equal(masks["b"][0], want[1])
  assert bool(masks["b"][1].all())
  np.testing.assert_array_equal(pruned["a"], np.where(want[0], params["a"], 0))
  np.testing.assert_array_equal(pruned["b"][1], params["b"][1])
  report = optax_gsm.sparsity_report(pruned)
  assert report.eligible.nonzeros == q


def test_magnitude_prune_exact_q_with_ties_at_zero():
  # Fewer non-zeros than Q: exactly Q entries are kept (some of them zeros),
  # the earliest zeros by global index. Dict leaves are in sorted key order,
  # so "v" comes before "w".
  params = {"w": jnp.array([[0.0, 3.0], [0.0, 0.0]]), "v": jnp.array([[0.0, 1.0]])}
  _, masks = optax_gsm.magnitude_prune(params, 3)
  assert sum(int(m.sum()) for m in jax.tree.leaves(masks)) == 3
  np.testing.assert_array_equal(masks["v"], [[True, True]])
  np.testing.assert_array_equal(masks["w"], [[False, True], [False, False]])
  _, masks = optax_gsm.magnitude_prune(params, 4)
  np.testing.assert_array_equal(masks["w"], [[True, True], [False, False]])


def test_magnitude_prune_compression_and_dtype():
  params = {"w": jnp.arange(1.0, 101.0, dtype=jnp.bfloat16).reshape(10, 10)}
  pruned, _ = optax_gsm.magnitude_prune(params, compression=4)
  assert pruned["w"].dtype == jnp.bfloat16
  kept = np.asarray(pruned["w"], np.float32).ravel()
  np.testing.assert_array_equal(np.nonzero(kept)[0], np.arange(75, 100))


def test_sparsity_report_values_and_json():
  params = {
    "conv": jnp.zeros((3, 3, 2, 2)).at[0, 0, 0, 0].set(1.0),
    "dense": jnp.array([[1.0, 0.0], [2.0, 3.0]]),
    "bias": jnp.array([0.0, 5.0]),
  }
  report = optax_gsm.sparsity_report(params)
  d = json.loads(report.to_json())
  rows = {r["path"]: r for r in d["leaves"]}
  assert rows["['conv']"] == {
    "path": "['conv']",
    "shape": [3, 3, 2, 2],
    "size": 36,
    "nonzeros": 1,
    "nonzero_ratio": 1 / 36,
    "compression": 36.0,
    "eligible": True,
  }
  assert rows["['bias']"]["eligible"] is False
  assert d["eligible"]["size"] == 40 and d["eligible"]["nonzeros"] == 4
  assert d["eligible"]["compression"] == 10.0
  assert d["total"]["size"] == 42 and d["total"]["nonzeros"] == 5
  zero = optax_gsm.sparsity_report({"w": jnp.zeros((2, 2))})
  assert zero.to_dict()["eligible"]["compression"] is None
  assert "inf" in str(zero)
  text = str(report)
  assert "['dense']" in text and "10.00x" in text and "not eligible" in text
