"""The models: parameter counts against the paper, forward passes, BatchNorm modes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_gsm
from experiments.models import MODELS, get_model, get_spec, param_counts

# Exact eligible (kernel) counts of our implementations; the paper quotes the
# rounded totals in MODELS[...].paper_params.
EXPECTED_ELIGIBLE = {
  "lenet_300_100": 266_200,  # 784*300 + 300*100 + 100*10
  "lenet5": 430_500,  # 5*5*20 + 5*5*20*50 + 800*500 + 500*10
  "resnet56": 848_944,  # option-A shortcuts have no parameters
  "densenet40": 1_001_616,
  "resnet50": 25_502_912,  # torchvision's 25,557,032 minus BN and the fc bias
  "vgg_cifar": 1_147_072,
}


def input_for(name: str, batch: int = 2) -> jax.Array:
  shape = get_spec(name).input_shape
  if name == "resnet50":
    shape = (64, 64, 3)  # small resolution keeps CI fast; the net is resolution-agnostic
  return jax.random.normal(jax.random.key(1), (batch, *shape))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_eligible_count_matches_paper(name: str, built_model) -> None:
  counts = param_counts(built_model(name))
  assert counts["eligible"] == EXPECTED_ELIGIBLE[name]
  paper = MODELS[name].paper_params
  if paper is not None:
    assert abs(counts["eligible"] - paper) / paper < 0.03, (counts, paper)
  # Our eligibility rule is the library's.
  params = nnx.to_pure_dict(nnx.state(built_model(name), nnx.Param))
  assert optax_gsm.count_eligible(params) == counts["eligible"]


def test_resnet56_projection_shortcuts() -> None:
  abstract = nnx.eval_shape(lambda: get_model("resnet56", rngs=nnx.Rngs(0), shortcut="B"))
  # Two 1x1 projections: 16->32 and 32->64.
  assert param_counts(abstract)["eligible"] == 848_944 + 16 * 32 + 32 * 64


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_pass(name: str, built_model) -> None:
  model = nnx.clone(built_model(name))  # BatchNorm statistics change in train mode
  x = input_for(name)
  logits = nnx.jit(lambda m, x: m(x))(model, x)
  assert logits.shape == (2, get_spec(name).num_classes)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("name", [n for n, s in sorted(MODELS.items()) if s.has_batch_norm])
def test_train_eval_switches_every_batch_norm(name: str, built_model) -> None:
  model = nnx.clone(built_model(name))
  norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
  assert norms
  model.eval()
  assert all(bn.use_running_average for bn in norms)
  model.train()
  assert not any(bn.use_running_average for bn in norms)


def test_batch_norm_train_vs_eval_semantics(built_model) -> None:
  model = nnx.clone(built_model("resnet56"))
  x = input_for("resnet56", batch=4)
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

  forward = nnx.jit(lambda m, x: m(x))
  model.train()
  train_out = forward(model, x)
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
  # Training mode updates the running statistics ...
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after))
  assert all(changed)
  # ... and normalises with batch statistics: example 0's output depends on the
  # other examples of the batch.
  x_other = x.at[1:].set(x[1:] * 3.0 + 1.0)
  model_copy = nnx.clone(model)
  assert not np.allclose(forward(model_copy, x_other)[0], forward(model_copy, x)[0])

  model.eval()
  frozen = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
  eval_out = forward(model, x)
  # Eval mode leaves the statistics alone and treats examples independently.
  after_eval = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, frozen, after_eval)))
  np.testing.assert_allclose(forward(model, x_other)[0], eval_out[0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(train_out, eval_out)


def test_unknown_model_and_aliases() -> None:
  with pytest.raises(ValueError, match="unknown model"):
    get_model("alexnet", rngs=nnx.Rngs(0))
  assert get_spec("lenet300") is MODELS["lenet_300_100"]
