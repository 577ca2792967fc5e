"""FLOPs cost trees of Flax NNX models against hand-counted MACs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import flops
from experiments.models.common import lecun_normal
from experiments.models.lenet import LeNet300100
from experiments.models.lenet import LeNet5
from optax_gsm import budget


class SmallConvNet(nnx.Module):
  """16x16x3 -> conv3x3 SAME (8) -> BN -> conv3x3/2 VALID (16) -> depthwise
  conv3x3 SAME -> flatten -> dense 10."""

  def __init__(self, rngs):
    # The flat-draw initialiser compiles fast (see experiments.models.common).
    init = {"kernel_init": lecun_normal}
    self.conv1 = nnx.Conv(3, 8, (3, 3), padding="SAME", rngs=rngs, **init)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), strides=(2, 2), padding="VALID", rngs=rngs, **init)
    self.dw = nnx.Conv(
      16, 16, (3, 3), padding="SAME", feature_group_count=16, use_bias=False, rngs=rngs, **init
    )
    self.fc = nnx.Linear(7 * 7 * 16, 10, rngs=rngs, **init)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv1(x)))
    x = nnx.relu(self.conv2(x))  # (16 - 3) // 2 + 1 = 7
    x = nnx.relu(self.dw(x))
    return self.fc(x.reshape(x.shape[0], -1))


# Hand count: output positions x kernel entries, per example.
HAND = {
  "conv1": 16 * 16 * (3 * 3 * 3 * 8),
  "conv2": 7 * 7 * (3 * 3 * 8 * 16),
  "dw": 7 * 7 * (3 * 3 * 1 * 16),
  "fc": 784 * 10,
}


@pytest.fixture(scope="module")
def model():
  return SmallConvNet(nnx.Rngs(0))


def test_small_conv_net_costs_equal_hand_count(model):
  stats_before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  costs = flops.flops_cost_tree(model, (1, 16, 16, 3))
  params = nnx.state(model, nnx.Param)
  assert jax.tree.structure(costs) == jax.tree.structure(params)
  assert costs["conv1"]["kernel"].shape == (3, 3, 3, 8)
  assert (costs["conv1"]["kernel"] == 16 * 16).all()
  assert (costs["conv2"]["kernel"] == 7 * 7).all()
  assert (costs["dw"]["kernel"] == 7 * 7).all()
  assert (costs["fc"]["kernel"] == 1).all()
  for name in ("conv1", "conv2", "fc"):
    assert not costs[name]["bias"].any()
  assert not costs["bn"]["scale"].any() and not costs["bn"]["bias"].any()
  assert budget.total_cost(costs) == sum(HAND.values()) == 126_640
  assert flops.dense_macs(model, (1, 16, 16, 3)) == 126_640
  # Costs are per example: the batch size does not matter.
  costs8 = flops.flops_cost_tree(model, (8, 16, 16, 3))
  assert budget.total_cost(costs8) == 126_640
  # The model was not run or modified, and the interception is undone.
  jax.tree.map(
    np.testing.assert_array_equal,
    stats_before,
    jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat)),
  )
  assert "record" not in nnx.Conv.__call__.__qualname__
  assert nnx.Conv.__call__.__module__.startswith("flax")


def test_lenet_models_match_known_mac_counts():
  # Abstract models (no weights allocated) are enough.
  mlp = nnx.eval_shape(lambda: LeNet300100(rngs=nnx.Rngs(0)))
  assert flops.dense_macs(mlp, (1, 28, 28, 1)) == 266_200
  # 24*24*25*20 + 8*8*25*20*50 + 800*500 + 500*10
  lenet5 = nnx.eval_shape(lambda: LeNet5(rngs=nnx.Rngs(0)))
  assert flops.dense_macs(lenet5, (1, 28, 28, 1)) == 2_293_000
  costs = flops.flops_cost_tree(lenet5, (1, 28, 28, 1))
  assert (costs["conv1"]["kernel"] == 24 * 24).all()
  assert (costs["conv2"]["kernel"] == 8 * 8).all()


class Shared(nnx.Module):
  """One dense layer applied twice, and a raw matmul parameter."""

  def __init__(self, rngs):
    self.fc = nnx.Linear(4, 4, rngs=rngs, kernel_init=lecun_normal)
    self.raw = nnx.Param(jnp.ones((4, 2)))

  def __call__(self, x):
    return self.fc(self.fc(x)) @ self.raw[...]


def test_weight_sharing_and_unknown_layers():
  model = nnx.eval_shape(lambda: Shared(nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"No FLOPs rule .*\['raw'\]"):
    flops.flops_cost_tree(model, (1, 4))
  costs = flops.flops_cost_tree(model, (1, 4), default_cost=3)
  assert (costs["fc"]["kernel"] == 2).all()  # called twice per example
  assert (costs["raw"] == 3).all()
  costs = flops.flops_cost_tree(
    model, (1, 4), where=lambda p: jax.tree.map(lambda x: x.ndim >= 2 and x.shape != (4, 2), p)
  )
  assert not costs["raw"].any()
  # A sequence input: each dense entry is used once per position.
  seq = nnx.eval_shape(lambda: nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  assert (flops.flops_cost_tree(seq, (1, 5, 4))["kernel"] == 5).all()


def test_budget_prune_with_flops_costs(model):
  costs = flops.flops_cost_tree(model, (1, 16, 16, 3))
  params = nnx.state(model, nnx.Param)
  half = 126_640 // 2
  pruned, masks = budget.budget_prune(params, costs, half)
  kept = budget.total_cost(costs, masks)
  assert half - 256 < kept <= half  # conv1 entries cost 256, the most
  # Cheap dense weights are favoured: per unit of cost, fc keeps a larger
  # fraction than conv1.
  frac = {n: float(np.mean(masks[n]["kernel"])) for n in ("conv1", "fc")}
  assert frac["fc"] > frac["conv1"]
  assert (np.asarray(pruned["fc"]["bias"]) == np.asarray(params["fc"]["bias"])).all()
