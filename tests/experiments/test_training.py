"""Unit tests of the training-loop helpers (small LeNet-300-100, random data)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_gsm
from experiments import data
from experiments.models import get_model
from experiments.training import (
  Trainer,
  check_batch_size,
  evaluate,
  magnitude_histogram,
  make_gsm_tx,
  make_training_mesh,
  nonzero_by_magnitude,
  param_dict,
  prefetch_to_device,
  qth_largest_magnitude,
  restore_model_state,
  set_params,
)


def random_pipeline(
  n: int, batch_size: int, *, train: bool, seed: int = 0
) -> data.InMemoryPipeline:
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, size=n)
  return data.InMemoryPipeline(
    images, labels, spec=data.DATASETS["mnist"], batch_size=batch_size, train=train, seed=seed
  )


def test_step_compiles_once_even_with_restored_state(tmp_path: Path) -> None:
  """Uncommitted fresh arrays vs committed step outputs used to cost a 2nd compile."""
  model = get_model("lenet_300_100", rngs=nnx.Rngs(0))
  trainer = Trainer(
    model,
    make_gsm_tx(optax.constant_schedule(0.01), num_nonzero=5000, momentum=0.99, weight_decay=5e-4),
    lr_schedule=optax.constant_schedule(0.01),
    name="t",
  )
  if not hasattr(trainer._train_step, "_cache_size"):
    pytest.skip("jax.jit cache introspection unavailable")
  train = random_pipeline(64, 16, train=True)
  trainer.fit(train, None, epochs=1, ckpt_dir=tmp_path / "ckpt", progress=False)
  assert trainer._train_step._cache_size() == 1

  # A new trainer whose model comes from an orbax checkpoint.
  restored = get_model("lenet_300_100", rngs=nnx.Rngs(1))
  meta = restore_model_state(tmp_path / "ckpt", restored)
  assert meta["epoch"] == 1
  same = jax.tree.map(np.array_equal, param_dict(restored), trainer.params())
  assert all(jax.tree.leaves(same))
  again = Trainer(
    restored, optax.sgd(0.01, momentum=0.9), lr_schedule=optax.constant_schedule(0.01)
  )
  for batch in train.epoch(0):
    again.train_step(batch.image, batch.label)
  assert again._train_step._cache_size() == 1


def test_evaluate_ignores_padding() -> None:
  model = get_model("lenet_300_100", rngs=nnx.Rngs(0))
  pipe = random_pipeline(50, 16, train=False)  # 4 batches, the last with 2 real examples
  result = evaluate(model, pipe)
  logits = model(jnp.asarray(pipe.normalize(pipe.images)))
  expected_acc = float(np.mean(np.argmax(logits, -1) == pipe.labels))
  expected_loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, pipe.labels).mean())
  assert result["count"] == 50
  np.testing.assert_allclose(result["acc"], expected_acc)
  np.testing.assert_allclose(result["loss"], expected_loss, rtol=1e-5)


def test_eval_cut_reports_the_accuracy_of_the_cut_model(tmp_path: Path) -> None:
  q = 3000
  model = get_model("lenet_300_100", rngs=nnx.Rngs(0))
  trainer = Trainer(
    model,
    make_gsm_tx(optax.constant_schedule(0.01), num_nonzero=q, momentum=0.99, weight_decay=5e-4),
    lr_schedule=optax.constant_schedule(0.01),
    num_nonzero=q,
    eval_cut=True,
    name="t",
  )
  train, test = random_pipeline(64, 16, train=True), random_pipeline(50, 16, train=False, seed=1)
  result = trainer.fit(train, test, epochs=2, ckpt_dir=tmp_path / "ckpt", progress=False)
  params = trainer.params()
  # Independent check: cut a copy by hand (numpy top-Q over the kernels) and evaluate it.
  kernels = np.concatenate([np.abs(np.asarray(params[k]["kernel"])).ravel() for k in params])
  threshold = np.sort(kernels)[-q]
  cut = {
    k: {
      "kernel": np.where(
        np.abs(np.asarray(v["kernel"])) >= threshold, np.asarray(v["kernel"]), 0.0
      ),
      "bias": np.asarray(v["bias"]),
    }
    for k, v in params.items()
  }
  assert sum(int(np.count_nonzero(v["kernel"])) for v in cut.values()) == q
  other = get_model("lenet_300_100", rngs=nnx.Rngs(5))
  set_params(other, cut)
  assert result["final"]["test_acc_after_cut"] == evaluate(other, test)["acc"]
  assert all(h["test_acc_after_cut"] is not None for h in result["history"])
  # The trainer's own state is not cut.
  assert nonzero_by_magnitude(trainer.params(), 0.0)[0] > q
  # Dense phases do not report it, and asking without Q is an error.
  dense = Trainer(
    get_model("lenet_300_100", rngs=nnx.Rngs(0)),
    optax.sgd(0.01),
    lr_schedule=optax.constant_schedule(0.01),
  )
  hist = dense.fit(train, test, epochs=1, ckpt_dir=tmp_path / "dense", progress=False)["history"]
  assert hist[0]["test_acc_after_cut"] is None
  with pytest.raises(ValueError, match="eval_cut=True needs num_nonzero"):
    Trainer(
      get_model("lenet_300_100", rngs=nnx.Rngs(0)),
      optax.sgd(0.01),
      lr_schedule=optax.constant_schedule(0.01),
      eval_cut=True,
    )


def test_magnitude_helpers() -> None:
  params = {
    "w": jnp.array([[0.0, 1e-5], [3.0, -2.0]]),
    "b": jnp.array([5.0, 0.0]),
    "k": jnp.array([[[1e-3, -4.0]]]),
  }
  assert nonzero_by_magnitude(params, 1e-4) == (4, 6)  # b is not eligible
  assert qth_largest_magnitude(params, 1) == 4.0
  assert qth_largest_magnitude(params, 3) == 2.0
  hist = magnitude_histogram(params)
  assert hist["zeros"] == 1 and sum(hist["counts"]) == 5
  assert hist["max"] == 4.0 and hist["min_nonzero"] == pytest.approx(1e-5)
  pruned, _ = optax_gsm.magnitude_prune(params, num_nonzero=2)
  assert nonzero_by_magnitude(pruned, 0.0) == (2, 6)


def test_param_dict_round_trip() -> None:
  model = get_model("lenet_300_100", rngs=nnx.Rngs(0))
  params = param_dict(model)
  assert set(params) == {"fc1", "fc2", "fc3"}
  zeros = jax.tree.map(jnp.zeros_like, params)
  set_params(model, zeros)
  assert all(float(jnp.abs(x).sum()) == 0 for x in jax.tree.leaves(param_dict(model)))


def test_prefetch_to_device_keeps_order() -> None:
  pipe = random_pipeline(64, 8, train=True)
  direct = [(b.image, b.label) for b in pipe.epoch(3)]
  fetched = list(prefetch_to_device(pipe.epoch(3), size=3))
  assert len(direct) == len(fetched) == 8
  for (x, y), (fx, fy) in zip(direct, fetched):
    assert isinstance(fx, jax.Array)
    np.testing.assert_array_equal(x, np.asarray(fx))
    np.testing.assert_array_equal(y, np.asarray(fy))


def test_trainer_on_a_one_device_mesh_matches_no_mesh(tmp_path: Path) -> None:
  """The ``--mesh`` code path on this process's one device: state placed by
  the FSDP rule, a step jitted with fixed shardings, sharded batches, sharded
  evaluation with a padded last batch, and a resumed fit whose checkpoint is
  restored into the mesh's shardings.  A 1 x 1 mesh splits nothing, so the
  results are those without a mesh (tests/experiments/test_mesh.py runs 8
  devices)."""
  from jax.sharding import NamedSharding, PartitionSpec

  mesh = make_training_mesh("data=1,model=1")
  train = random_pipeline(64, 16, train=True)
  test = random_pipeline(50, 16, train=False)  # the last batch is padded
  schedule = optax.constant_schedule(0.01)

  def trainer(m, seed: int = 0) -> Trainer:
    tx = make_gsm_tx(schedule, num_nonzero=5000, momentum=0.99, weight_decay=5e-4)
    return Trainer(
      get_model("lenet_300_100", rngs=nnx.Rngs(seed)), tx, lr_schedule=schedule, name="t", mesh=m
    )

  plain, on_mesh = trainer(None), trainer(mesh)
  kernel = on_mesh.model_state["fc1"]["kernel"][...]
  assert kernel.sharding == NamedSharding(mesh, PartitionSpec("model"))
  for t, name in ((plain, "plain"), (on_mesh, "mesh")):
    t.fit(train, test, epochs=1, ckpt_dir=tmp_path / name, progress=False)
  want, got = plain.params(), on_mesh.params()
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
  assert on_mesh.evaluate(test)["count"] == 50
  np.testing.assert_allclose(on_mesh.evaluate(test)["acc"], plain.evaluate(test)["acc"])

  resumed = trainer(mesh, seed=1)
  resumed.fit(train, test, epochs=2, ckpt_dir=tmp_path / "mesh", resume=True, progress=False)
  assert resumed.step == 2 * train.steps_per_epoch
  kernel = resumed.model_state["fc1"]["kernel"][...]
  assert kernel.sharding == NamedSharding(mesh, PartitionSpec("model"))
  if hasattr(resumed._train_step, "_cache_size"):
    assert resumed._train_step._cache_size() == 1


def test_check_batch_size() -> None:
  mesh = jax.sharding.AbstractMesh((4, 2), ("data", "model"))
  check_batch_size(256, mesh)
  check_batch_size(7, None)
  with pytest.raises(
    ValueError, match="batch size 100 is not divisible by the size 8 of mesh axis 'data'"
  ):
    check_batch_size(100, jax.sharding.AbstractMesh((8,), ("data",)))
  check_batch_size(3, jax.sharding.AbstractMesh((8,), ("model",)))  # batch replicated
