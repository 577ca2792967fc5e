"""Configurations: the authors' hyper-parameters, schedules, overrides, and that
every configuration builds its model and optimizers and takes a few steps."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_gsm
from experiments.configs import CONFIGS, apply_overrides, config_names, get_config
from experiments.models import get_spec, param_counts
from experiments.training import Trainer, make_base_tx, make_gsm_tx


def test_paper_hyper_parameters() -> None:
  c = get_config("lenet300_60x")
  assert (c.data.batch_size, c.train.momentum, c.train.weight_decay) == (256, 0.9, 5e-4)
  assert (c.train.base_lr, c.train.warmup_epochs, c.train.boundaries, c.train.epochs) == (
    3e-2,
    5,
    (40, 80, 120, 160),
    200,
  )
  assert (c.gsm.momentum, c.gsm.base_lr, c.gsm.boundaries, c.gsm.epochs) == (
    0.99,
    1e-2,
    (160, 200, 240),
    280,
  )
  assert {get_config(n).compression for n in ("lenet5_125x", "lenet5_300x")} == {125, 300}
  r = get_config("resnet56_10pct")
  assert (
    r.data.batch_size,
    r.train.base_lr,
    r.train.boundaries,
    r.train.epochs,
    r.train.weight_decay,
  ) == (64, 0.1, (100, 200, 300, 400), 500, 1e-4)
  assert (r.gsm.momentum, r.gsm.base_lr, r.gsm.boundaries, r.gsm.epochs, r.nonzero_ratio) == (
    0.98,
    5e-3,
    (400, 500),
    600,
    0.10,
  )


def test_num_nonzero_rounding() -> None:
  assert get_config("lenet300_60x").num_nonzero(266_200) == round(266_200 / 60) == 4437
  assert get_config("resnet56_10pct").num_nonzero(848_944) == 84_894
  assert get_config("lenet5_300x").num_nonzero(430_500) == 1435


def test_lr_schedule_warmup_and_steps() -> None:
  c = get_config("lenet300_60x").train
  spe = 234  # 60000 // 256
  s = c.lr_schedule(spe)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(5 * spe // 2)), 1.5e-2, rtol=1e-2)  # halfway up the ramp
  np.testing.assert_allclose(float(s(5 * spe)), 3e-2, rtol=1e-6)
  np.testing.assert_allclose(float(s(40 * spe - 1)), 3e-2, rtol=1e-6)
  np.testing.assert_allclose(float(s(40 * spe)), 3e-3, rtol=1e-5)  # x0.1 from epoch 40 on
  np.testing.assert_allclose(float(s(170 * spe)), 3e-6, rtol=1e-4)
  g = get_config("lenet300_60x").gsm.lr_schedule(spe)
  np.testing.assert_allclose(float(g(250 * spe)), 1e-5, rtol=1e-4)


def test_unselected_decay_inverse_lr_keeps_the_decay_rate() -> None:
  spe = 235
  base = ["gsm.warmup_epochs=1", "gsm.boundaries=[25,33,37]", "gsm.epochs=40"]
  assert get_config("lenet5_125x", overrides=base).unselected_decay(spe) is None
  assert (
    get_config("lenet5_125x", overrides=base + ["gsm_unselected_decay=1e-3"]).unselected_decay(spe)
    == 1e-3
  )
  c = get_config(
    "lenet5_125x",
    overrides=base + ["gsm_unselected_decay=1e-3", "gsm_unselected_decay_schedule=inverse_lr"],
  )
  eta_u, lr = c.unselected_decay(spe), c.gsm.lr_schedule(spe)
  # Hand-worked: 1e-3 up to epoch 25 (warm-up included), then x10 at 25, 33 and 37.
  for epoch, want in [
    (0, 1e-3),
    (0.5, 1e-3),
    (24.99, 1e-3),
    (25, 1e-2),
    (32.99, 1e-2),
    (33, 1e-1),
    (37, 1.0),
    (39.99, 1.0),
  ]:
    np.testing.assert_allclose(float(eta_u(int(epoch * spe))), want, rtol=1e-6)
  # lr * eta_u is the base rate 1e-2 * 1e-3 everywhere after the warm-up.
  for step in range(spe, 40 * spe, 97):
    np.testing.assert_allclose(float(lr(step)) * float(eta_u(step)), 1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="gsm_unselected_decay_schedule='cosine'; expected one of"):
    get_config(
      "lenet5_125x", overrides=["gsm_unselected_decay=1e-3", "gsm_unselected_decay_schedule=cosine"]
    )
  for bad in ("nan", "inf", "-1e-3"):
    with pytest.raises(ValueError, match=r"gsm_unselected_decay=.*expected a finite number >= 0"):
      get_config(
        "lenet5_125x",
        overrides=[f"gsm_unselected_decay={bad}", "gsm_unselected_decay_schedule=inverse_lr"],
      )
  with pytest.raises(ValueError, match="needs gsm_unselected_decay"):
    get_config("lenet5_125x", overrides=["gsm_unselected_decay_schedule=inverse_lr"])


def test_unselected_decay_drops_caps_the_inverse_lr_schedule() -> None:
  spe = 235
  base = [
    "gsm.warmup_epochs=1",
    "gsm.boundaries=[40,50,56]",
    "gsm.epochs=60",
    "gsm_unselected_decay=1e-3",
    "gsm_unselected_decay_schedule=inverse_lr",
  ]
  c = get_config("lenet5_300x", overrides=base + ["gsm_unselected_decay_drops=1"])
  assert c.gsm_unselected_decay_drops == 1
  eta_u, lr = c.unselected_decay(spe), c.gsm.lr_schedule(spe)
  # Hand-worked: x10 at epoch 40 only; lr keeps dropping at 50 and 56.
  for epoch, want in [(0, 1e-3), (39.99, 1e-3), (40, 1e-2), (50, 1e-2), (56, 1e-2), (59.99, 1e-2)]:
    np.testing.assert_allclose(float(eta_u(int(epoch * spe))), want, rtol=1e-6)
  for epoch, want in [(45, 1e-5), (53, 1e-6), (58, 1e-7)]:  # lr * eta_u after each drop
    step = int(epoch * spe)
    np.testing.assert_allclose(float(lr(step)) * float(eta_u(step)), want, rtol=1e-5)
  two = get_config(
    "lenet5_300x", overrides=base + ["gsm_unselected_decay_drops=2"]
  ).unselected_decay(spe)
  for epoch, want in [(45, 1e-2), (50, 1e-1), (58, 1e-1)]:
    np.testing.assert_allclose(float(two(int(epoch * spe))), want, rtol=1e-6)
  # As many drops as boundaries is the uncapped schedule.
  full = get_config("lenet5_300x", overrides=base).unselected_decay(spe)
  three = get_config(
    "lenet5_300x", overrides=base + ["gsm_unselected_decay_drops=3"]
  ).unselected_decay(spe)
  for step in range(0, 60 * spe, 401):
    assert float(three(step)) == float(full(step))
  for bad in ("0", "-1", "1.5", "true"):
    with pytest.raises(ValueError, match=r"gsm_unselected_decay_drops=.*expected an integer >= 1"):
      get_config("lenet5_300x", overrides=base + [f"gsm_unselected_decay_drops={bad}"])
  with pytest.raises(
    ValueError, match="needs gsm_unselected_decay_schedule='inverse_lr', not 'constant'"
  ):
    get_config(
      "lenet5_300x", overrides=["gsm_unselected_decay=1e-3", "gsm_unselected_decay_drops=1"]
    )


def test_overrides() -> None:
  c = get_config(
    "lenet300_60x",
    overrides=[
      "train.epochs=3",
      "gsm.boundaries=(1, 2)",
      "data.train_subset=1024",
      "nonzero_ratio=0.05",
    ],
  )
  assert (c.train.epochs, c.gsm.boundaries, c.data.train_subset) == (3, (1, 2), 1024)
  assert (c.compression, c.nonzero_ratio) == (None, 0.05)
  c = apply_overrides(c, {"compression": 10, "gsm.base_lr": "0.02", "train.boundaries": 7})
  assert (c.compression, c.nonzero_ratio, c.gsm.base_lr, c.train.boundaries) == (
    10.0,
    None,
    0.02,
    (7,),
  )
  with pytest.raises(ValueError, match="unknown config key"):
    get_config("lenet300_60x", overrides=["train.epoch=3"])
  with pytest.raises(ValueError, match="integer"):
    get_config("lenet300_60x", overrides=["train.epochs=2.5"])
  with pytest.raises(ValueError, match="key=value"):
    get_config("lenet300_60x", overrides=["train.epochs"])
  with pytest.raises(ValueError, match="unknown config"):
    get_config("alexnet_9x")


@pytest.mark.parametrize("name", config_names())
def test_config_is_complete(name: str) -> None:
  config = CONFIGS[name]
  json.dumps(config.to_dict())
  get_spec(config.model)
  quick = get_config(name, quick=True)
  assert quick.train.epochs < config.train.epochs and quick.gsm.epochs < config.gsm.epochs
  assert all(b < quick.train.epochs for b in quick.train.boundaries)
  assert all(b < quick.gsm.epochs for b in quick.gsm.boundaries)


# XLA:CPU compile times dominate this test.  Measured on a busy 2-core machine:
# compiling a GSM step takes ~70 s for ResNet-50 (and a step ~5 s: the exact top-Q
# selection over 25.5M weights) and ~45 s for DenseNet-40.  For these two models
# the step is traced with jax.eval_shape (everything but XLA compilation) unless
# OPTAX_GSM_SLOW_TESTS=1; their forward passes are compiled in test_models.py.
SLOW = os.environ.get("OPTAX_GSM_SLOW_TESTS") == "1"
HEAVY_MODELS = {"resnet50", "densenet40"}
# The "top_k" selection backend compiles several times faster than the default
# (on ResNet-56, ~11 s instead of ~30 s) and selects the same weights (the core's
# tests check all backends against a numpy reference); the default backend is
# exercised by the MNIST end-to-end and resume tests.
SELECTION = "top_k"


@pytest.mark.parametrize("name", config_names())
def test_config_trains_a_few_steps(name: str, built_model) -> None:
  """Model, GSM optimizer and schedule of each config take two real steps.

  The batch is tiny (and ImageNet runs at 64x64) so the test stays fast; what is
  checked is the plumbing: Q matches the config, the GSM state reports that Q,
  the loss is finite and parameters move.
  """
  config = get_config(name)
  spec = get_spec(config.model)
  shape = (64, 64, 3) if config.model == "resnet50" else spec.input_shape
  model = nnx.clone(built_model(config.model))
  n = param_counts(model)["eligible"]
  q = config.num_nonzero(n)
  schedule = config.gsm.lr_schedule(steps_per_epoch=10)
  tx = make_gsm_tx(
    schedule,
    num_nonzero=q,
    momentum=config.gsm.momentum,
    weight_decay=config.gsm.weight_decay,
    selection=SELECTION,
  )
  trainer = Trainer(model, tx, lr_schedule=schedule, num_nonzero=q, name=name)
  key = jax.random.key(0)
  x = jax.random.normal(key, (2, *shape))
  y = jnp.array([1, 2], jnp.int32)
  if config.model in HEAVY_MODELS and not SLOW:
    out_shapes = jax.eval_shape(trainer._step, trainer.model_state, trainer.opt_state, x, y)
    assert jax.tree.structure(out_shapes[0]) == jax.tree.structure(trainer.model_state)
    assert out_shapes[2]["loss"].shape == ()
    return
  before = jax.tree.map(np.asarray, trainer.params())
  losses = [float(trainer.train_step(x, y)["loss"]) for _ in range(2)]
  after = trainer.params()
  assert all(np.isfinite(losses))
  moved = [
    not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))
  ]
  assert any(moved)
  # The GSM selection state reports the Q it used.
  opt_state = nnx.to_pure_dict(trainer.opt_state)["opt_state"][0]
  assert int(opt_state["num_nonzero"]) == q
  # The dense base optimizer of the config builds and accepts these params too.
  base = make_base_tx(
    config.train.lr_schedule(10),
    momentum=config.train.momentum,
    weight_decay=config.train.weight_decay,
  )
  params = trainer.params()
  state = base.init(params)
  updates, _ = base.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_base_tx_is_pytorch_sgd_with_kernel_only_decay() -> None:
  params = {"w": jnp.full((2, 2), 2.0), "b": jnp.full((2,), 2.0)}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = make_base_tx(optax.constant_schedule(0.1), momentum=0.9, weight_decay=0.5)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  # v = g + wd * w on kernels only; update = -lr * v.
  np.testing.assert_allclose(updates["w"], -0.1 * (1 + 0.5 * 2.0))
  np.testing.assert_allclose(updates["b"], -0.1 * 1.0)
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["w"], -0.1 * (0.9 * 2.0 + 2.0))


def test_score_momentum_from_epoch_is_a_step_schedule() -> None:
  c = get_config(
    "lenet5_300x", overrides=["gsm_score_momentum=0.99", "gsm_score_momentum_from_epoch=40"]
  )
  m = c.score_momentum(235)
  for step, want in [(0, 0.0), (40 * 235 - 1, 0.0), (40 * 235, 0.99), (60 * 235, 0.99)]:
    np.testing.assert_allclose(float(m(step)), want, rtol=1e-7)
  # Without the epoch it stays the plain number; without momentum, None.
  assert get_config("lenet5_300x", overrides=["gsm_score_momentum=0.9"]).score_momentum(235) == 0.9
  assert get_config("lenet5_300x").score_momentum(235) is None
  for bad in ("-1", "1.5", "true", "2.0"):
    with pytest.raises(
      ValueError, match=r"gsm_score_momentum_from_epoch=.*expected an integer >= 0"
    ):
      get_config(
        "lenet5_300x", overrides=["gsm_score_momentum=0.99", f"gsm_score_momentum_from_epoch={bad}"]
      )
  with pytest.raises(ValueError, match="gsm_score_momentum_from_epoch=3 needs gsm_score_momentum"):
    get_config("lenet5_300x", overrides=["gsm_score_momentum_from_epoch=3"])
  for bad in ("1.0", "-0.1", "nan", "'high'"):
    with pytest.raises(ValueError, match=r"gsm_score_momentum=.*expected a number in \[0, 1\)"):
      get_config("lenet5_300x", overrides=[f"gsm_score_momentum={bad}"])


def test_score_momentum_from_epoch_ranks_raw_scores_then_the_average() -> None:
  """Hand-worked: Q = 1 of four weights, lr small enough that w stays ~1.

  Steps 0 and 1 push weight 0 (score 1 against 0.1); step 2 pushes weight 1.
  Raw scores pick weight 1 at step 2; the average switched on at step 2,
  0.99 * 1 + 0.01 * 0.1 against 0.99 * 0.1 + 0.01 * 1, keeps weight 0.
  """
  import optax_gsm

  c = get_config(
    "lenet5_300x", overrides=["gsm_score_momentum=0.99", "gsm_score_momentum_from_epoch=2"]
  )
  grads = [np.array([[1.0, 0.1, 0.1, 0.1]])] * 2 + [np.array([[0.1, 1.0, 0.1, 0.1]])]

  def selected(score_momentum):
    # The paper's rule, so that exactly the selected weight has a non-zero update.
    tx = optax_gsm.gsm(
      1e-3,
      num_nonzero=1,
      momentum=0.0,
      weight_decay=0.0,
      score_momentum=score_momentum,
      unselected_shrink=None,
    )
    params = {"w": jnp.ones((1, 4))}
    state, picks = tx.init(params), []
    for g in grads:
      updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
      params = optax.apply_updates(params, updates)
      picks.append(np.flatnonzero(np.asarray(updates["w"])).tolist())
    return picks

  assert selected(None) == [[0], [0], [1]]
  assert selected(c.score_momentum(1)) == [[0], [0], [0]]
  # Before the switch the schedule ranks exactly as no momentum at all.
  assert selected(
    get_config(
      "lenet5_300x", overrides=["gsm_score_momentum=0.99", "gsm_score_momentum_from_epoch=3"]
    ).score_momentum(1)
  ) == [[0], [0], [1]]


def _ramp_reference(n: int, q: int, step: int, ramp_steps: int) -> int:
  """Q(t) = Q + (N - Q) (1 - min(t, T) / T)^3, worked in float64 numpy."""
  left = 1.0 - min(step, ramp_steps) / ramp_steps
  return int(q + np.round((n - q) * left**3))


def test_target_ramp_schedule_against_a_hand_computation() -> None:
  config = CONFIGS["lenet300_60x_ramp"]
  n, spe = 266_200, 234
  q = config.num_nonzero(n)
  assert q == 4437
  assert CONFIGS["lenet300_60x_short"].gsm_num_nonzero(n, spe) == q  # no ramp: the int Q
  schedule = config.gsm_num_nonzero(n, spe)
  ramp = 40 * spe
  # By hand at the quarter point: (1 - 1/4)^3 = 27/64 of the N - Q extra weights.
  assert int(schedule(ramp // 4)) == q + round((n - q) * 27 / 64) == 114_868
  for step in (0, 1, 17, ramp // 2, ramp - 1, ramp, ramp + 1, 10 * ramp):
    assert int(schedule(step)) == _ramp_reference(n, q, step, ramp), step
  values = [int(schedule(t)) for t in range(0, ramp + 2, 97)]
  assert values[0] == n and values[-1] == q
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_target_ramp_is_the_library_ramp_rounded_in_q() -> None:
  """The configs ramp Q itself (rounding N - Q); ``optax_gsm.compression_ramp``
  ramps C and ``gsm`` rounds N / C. Same cubic schedule: at most one weight
  apart, at every step of the ramp."""
  config = CONFIGS["lenet300_60x_ramp"]
  n, spe = 266_200, 234
  ramp_steps = 40 * spe
  ours = config.gsm_num_nonzero(n, spe)
  library = optax_gsm.compression_ramp(60, ramp_steps)
  steps = jnp.arange(0, ramp_steps + 50)
  q_ours = np.asarray(jax.vmap(ours)(steps))
  q_library = np.rint(n / np.asarray(jax.vmap(library)(steps), np.float64))
  assert np.max(np.abs(q_ours - q_library)) <= 1


def test_target_ramp_reaches_gsm_step_by_step() -> None:
  """The GSM state reports Q(t) of the ramp at every step (4-step ramp)."""
  import dataclasses

  config = dataclasses.replace(CONFIGS["lenet300_60x_ramp"], gsm_target_ramp_epochs=1)
  params = {"w": jnp.linspace(-1.0, 1.0, 600).reshape(20, 30), "b": jnp.zeros(30)}
  n = 600
  q = config.num_nonzero(n)
  tx = make_gsm_tx(
    0.01, num_nonzero=config.gsm_num_nonzero(n, steps_per_epoch=4), **config.gsm_rule(4)
  )
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update)
  for step in range(6):
    _, state = update(grads, state, params)
    assert int(state[0].num_nonzero) == _ramp_reference(n, q, step, 4), step


def test_target_ramp_is_checked() -> None:
  import dataclasses

  base = CONFIGS["lenet300_60x_ramp"]
  with pytest.raises(ValueError, match="gsm_target_ramp_epochs=121 is longer than the 120 GSM"):
    dataclasses.replace(base, gsm_target_ramp_epochs=121)
  with pytest.raises(ValueError, match="gsm_target_ramp_epochs=0; expected an integer >= 1"):
    dataclasses.replace(base, gsm_target_ramp_epochs=0)
  assert get_config("lenet300_60x_ramp", quick=True).gsm_target_ramp_epochs == 1
