"""experiments.structured: gates, channel surgery, and each method end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import flops as flops_lib
from experiments import structured as S
from experiments.models import param_counts
from optax_gsm import structured as st


def random_alive(widths, seed, keep=0.6):
  rng = np.random.default_rng(seed)
  alive = {k: rng.random(c) < keep for k, c in widths.items()}
  for v in alive.values():
    v[rng.integers(len(v))] = True
  return alive


# --------------------------------------------------------------------------
# Gates against a hand-written LeNet-5 forward pass.


def lenet_direct(p, x, eps):
  """LeNet-5 by hand; ``eps`` are zero perturbations of the post-ReLU maps."""
  dn = ("NHWC", "HWIO", "NHWC")
  conv = lambda x, l: (
    jax.lax.conv_general_dilated(x, p[l]["kernel"], (1, 1), "VALID", dimension_numbers=dn)
    + p[l]["bias"]
  )
  pool = lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2))
  a1 = jax.nn.relu(conv(x, "conv1")) + eps["conv1"]
  a2 = jax.nn.relu(conv(pool(a1), "conv2")) + eps["conv2"]
  h = pool(a2).reshape(x.shape[0], -1)
  a3 = jax.nn.relu(h @ p["fc1"]["kernel"] + p["fc1"]["bias"]) + eps["fc1"]
  return a3 @ p["fc2"]["kernel"] + p["fc2"]["bias"], (a1, a2, a3)


def test_taylor_through_gates_equals_direct_from_activations():
  model = S.build_model("lenet5", seed=1)
  gm = S.GatedModel(model)
  assert gm.spatial == {"conv1": 576, "conv2": 64, "fc1": 1}
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((5, 28, 28, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 5))
  shapes = {"conv1": (5, 24, 24, 20), "conv2": (5, 8, 8, 50), "fc1": (5, 500)}
  eps = {k: jnp.zeros(s) for k, s in shapes.items()}

  def total(eps):
    logits, acts = lenet_direct(gm.params, x, eps)
    return jnp.sum(S.cross_entropy(logits, y)), acts

  g_eps, acts = jax.jit(jax.grad(total, has_aux=True))(eps)
  direct = {k: st.per_example_from_activations(a, g_eps[k]) for k, a in zip(shapes, acts)}
  grads = jax.jit(
    lambda p, r, x, y, method: S.per_example_gate_grads(gm, p, r, x, y, method=method),
    static_argnums=4,
  )
  batched = grads(gm.params, gm.rest, x, y, "batched")
  vmapped = grads(gm.params, gm.rest, x, y, "vmap")
  for k in shapes:
    np.testing.assert_allclose(batched[k], direct[k], rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(vmapped[k], direct[k], rtol=2e-4, atol=1e-6)
  # ... and so do the criteria built from them.
  s_gate = st.accumulate_gate_stats(st.init_gate_stats(gm.widths), batched)
  s_direct = st.accumulate_gate_stats(st.init_gate_stats(gm.widths), direct)
  for crit in (lambda s: st.taylor_first_order(s, gm.spatial), st.fisher, st.taylor_gate):
    for k, v in crit(s_gate).items():
      np.testing.assert_allclose(v, crit(s_direct)[k], rtol=5e-4, atol=1e-9)


# --------------------------------------------------------------------------
# Channel removal is real and exact.


@pytest.mark.parametrize("name", ["lenet5", "vgg_small", "resnet8"])
def test_removed_channels_give_the_masked_outputs(name):
  model = S.build_model(name, seed=2)
  plan = S.plan_for(model)
  gm = S.GatedModel(model, plan)
  if gm.has_batch_stats:  # non-trivial BatchNorm statistics
    gm.rest = jax.tree.map(lambda v: v + 0.3 * jnp.arange(v.shape[-1]) / v.shape[-1], gm.rest)
    model = gm.to_model()
  alive = random_alive(gm.widths, seed=3)
  slim = S.remove_channels(model, alive, plan)
  assert type(slim) is type(model)
  assert S.site_widths(slim, plan) == S.alive_widths(alive)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((3,) + plan.input_shape), jnp.float32)
  masked, _ = jax.jit(lambda p, r, x, g: gm.apply(p, r, x, g, train=False))(
    gm.params, gm.rest, x, S._gate_vectors(alive)
  )
  slim.eval()
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(slim, x), masked, rtol=1e-5, atol=1e-5)
  # Analytic counts == counts measured on the smaller model.
  counter = S.StructureCounter(model, plan)
  macs, params = counter.count(alive)
  assert macs == flops_lib.dense_macs(slim, (1,) + plan.input_shape)
  assert params == param_counts(slim)["total"]
  assert counter.dense_macs == flops_lib.dense_macs(model, (1,) + plan.input_shape)
  assert macs < counter.dense_macs and params < counter.dense_params
  # Removing one more channel saves what removal_macs says.
  saved = counter.removal_macs(alive)
  site = plan.sites[0].name
  fewer = {k: v.copy() for k, v in alive.items()}
  fewer[site][np.flatnonzero(fewer[site])[0]] = False
  assert counter.count(fewer)[0] == macs - saved[site]


def test_lenet5_counts_and_structured_masks_match_gates():
  model = S.build_model("lenet5")
  counter = S.StructureCounter(model)
  assert (counter.dense_macs, counter.dense_params) == (2293000, 431080)
  gm = S.GatedModel(model)
  alive = random_alive(gm.widths, seed=5)
  masks = {k: jnp.where(jnp.asarray(v), 1.0, -1.0) for k, v in alive.items()}
  leaves = S._site_leaves(gm.plan, gm.params)
  assert leaves["conv1"] == [("conv1", "kernel"), ("conv1", "bias")]
  masked_params = S.site_masked_params(
    gm.params, masks, leaves, ste="softplus", alpha=0.2, decouple=True
  )
  x = jnp.ones((2, 28, 28, 1))
  by_masks, _ = gm.apply(masked_params, gm.rest, x, None, train=False)
  by_gates, _ = gm.apply(gm.params, gm.rest, x, S._gate_vectors(alive), train=False)
  np.testing.assert_allclose(by_masks, by_gates, rtol=1e-5, atol=1e-6)


def test_remove_channels_errors():
  model = S.build_model("lenet5")
  gm = S.GatedModel(model)
  alive = {k: np.ones(c, bool) for k, c in gm.widths.items()}
  alive["conv1"][:] = False
  with pytest.raises(ValueError, match="would lose every channel"):
    S.remove_channels(model, alive)
  with pytest.raises(ValueError, match=r"must have shape \(50,\)"):
    S.remove_channels(model, {**alive, "conv1": np.ones(20, bool), "conv2": np.ones(3, bool)})
  with pytest.raises(TypeError, match="No structure plan for Linear"):
    S.plan_for(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="`criterion` must be one of"):
    S.GreedyConfig(criterion="l1")


# --------------------------------------------------------------------------
# End to end on real MNIST, tiny budgets.


@pytest.fixture(scope="module")
def mnist_small(mnist_builder):
  from experiments import data

  train = data.load("mnist", "train", batch_size=32, subset=4096, builder=mnist_builder)
  test = data.load("mnist", "test", batch_size=500, subset=1000, builder=mnist_builder)
  model = S.train_dense(S.build_model("lenet5"), train, steps=150, lr=0.02, log=lambda s: None)
  return model, train, test


@pytest.mark.parametrize("criterion", S.CRITERIA)
def test_greedy_methods_end_to_end(mnist_small, criterion):
  model, train, test = mnist_small
  cfg = S.GreedyConfig(
    criterion=criterion,
    flops_targets=(0.75,),
    steps_per_removal=1,
    cost_weight=5.0,
    finetune_steps=20,
  )
  result = S.greedy_prune(model, train, test, cfg, log=lambda s: None)
  (level,) = result["levels"]
  assert level["macs_fraction"] <= 0.75
  assert level["measured_macs"] == level["macs"]
  assert level["measured_params"] == level["params"]
  assert level["max_abs_output_diff"] < 1e-4
  assert abs(level["slim_acc"] - level["acc"]) <= 2e-3
  assert result["dense_acc"] > 0.85 and level["acc"] > 0.8
  slim = result["models"][level["target"]]
  assert S.site_widths(slim, S.plan_for(slim)) == level["widths"]
  # The FLOPs term sends the expensive convolution maps first.
  assert level["widths"]["conv1"] < 20 or level["widths"]["conv2"] < 50


def test_autoprune_end_to_end(mnist_small):
  model, train, test = mnist_small
  cfg = S.AutoPruneConfig(ste="leaky_relu", strength=1e-3, mask_lr=1.0, mask_init=0.01, steps=30)
  result = S.autoprune(model, train, test, cfg, log=lambda s: None)
  assert 1 < result["compression"]
  assert result["nonzero"] == result["history"][-1]["kept"]
  assert result["sparse_macs"] < result["dense_macs"]
  assert result["acc"] > 0.5
  cfg = S.AutoPruneConfig(
    structured=True, ste="softplus", strength=2e-2, mask_lr=1.0, mask_init=0.01, steps=30
  )
  result = S.autoprune(model, train, test, cfg, log=lambda s: None)
  assert result["macs"] < result["dense_macs"]
  assert result["measured"] == {"macs": result["macs"], "params": result["params"]}
  assert result["max_abs_output_diff"] < 1e-4
  assert abs(result["slim_acc"] - result["acc"]) <= 2e-3


def test_autoprune_to_count_keeps_exactly_q(mnist_small):
  """The comparison-table runner: exactly Q weights survive, accuracy holds."""
  model, train, test = mnist_small
  gm = S.GatedModel(model)
  apply = lambda p, x: gm.apply(p, gm.rest, x, None, train=False)[0]
  q = 43050
  params, info = S.autoprune_to_count(
    apply, gm.params, train, num_nonzero=q, steps=20, log=lambda s: None
  )
  nonzero = sum(
    int(np.count_nonzero(np.asarray(leaf)))
    for leaf in jax.tree.leaves(params)
    if np.ndim(leaf) >= 2
  )
  assert nonzero == q
  assert len(info["history"]) == 14 and info["final_strength"] > 0
  assert S.evaluate(gm, params, gm.rest, test)["acc"] > 0.5


def test_gsm_baseline_end_to_end(mnist_small):
  model, train, test = mnist_small
  result = S.gsm_baseline(model, train, test, num_nonzero=43050, steps=30, log=lambda s: None)
  assert result["compression"] == pytest.approx(10.0)
  assert result["acc"] > 0.8


# --------------------------------------------------------------------------
# The CIFAR-10 configurations run under tfds.testing.mock_data.


@pytest.mark.parametrize(
  "argv",
  [
    [
      "taylor",
      "--model",
      "vgg_small",
      "--flops-targets",
      "0.9",
      "--cost-weight",
      "1",
      "--steps-per-removal",
      "1",
      "--finetune-steps",
      "1",
    ],
    ["autoprune_structured", "--model", "resnet8", "--steps", "2"],
  ],
)
def test_cifar_configurations_under_mock_data(argv, tmp_path):
  out = tmp_path / "result.json"
  args = S.build_parser().parse_args(
    argv
    + [
      "--mock",
      "16",
      "--batch-size",
      "8",
      "--pretrain-steps",
      "0",
      "--data-dir",
      str(tmp_path / "tfds"),
      "--out",
      str(out),
    ]
  )
  result = S.run(args, log=lambda s: None)
  assert result["dataset"] == "cifar10" and result["mock"] == 16
  if argv[0] == "taylor":
    assert result["levels"][0]["max_abs_output_diff"] < 1e-4
  else:
    assert result["max_abs_output_diff"] < 1e-4


def test_command_line_choices_are_checked_while_parsing(tmp_path, capsys):
  out = tmp_path / "r.json"
  for argv, says in (
    (
      ["gsm", "--model", "lenet7"],
      "argument --model: invalid choice: 'lenet7' (choose from "
      + ", ".join(repr(m) for m in S.MODEL_NAMES)
      + ")",
    ),
    (["taylor", "--dataset", "cifar100"], "argument --dataset: invalid choice: 'cifar100'"),
    (["gsm"], "gsm needs --num-nonzero"),
  ):
    with pytest.raises(SystemExit) as info:
      S.main(argv + ["--out", str(out)])
    assert info.value.code == 2
    assert says in capsys.readouterr().err
  assert not out.exists()
