"""experiments.compaction: exact removal of dead units, on every supported model."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import compaction as C
from experiments.models.densenet import DenseNet
from experiments.models.lenet import LeNet5, LeNet300100
from experiments.models.resnet import CifarResNet
from experiments.models.vgg import VGGCifar


def _set(module, name, value):
  old = getattr(module, name)
  setattr(module, name, type(old)(np.asarray(value, np.float32)))


def prune_randomly(model, seed, *, density=0.5, unfed=0.3, unread=0.3):
  """Random zeros in every kernel, plus whole output columns (units with no
  incoming weight) and whole input rows (no outgoing weight); random biases
  and BatchNorm statistics, so that the constants of unfed units are both
  positive and negative (some removable, some not)."""
  rng = np.random.default_rng(seed)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, (nnx.Linear, nnx.Conv)):
      k = np.array(node.kernel[...])
      k *= rng.random(k.shape) < density
      k[..., rng.random(k.shape[-1]) < unfed] = 0
      k[..., rng.random(k.shape[-2]) < unread, :] = 0
      _set(node, "kernel", k)
      if node.bias is not None:
        _set(node, "bias", rng.normal(0, 0.5, k.shape[-1]))
    elif isinstance(node, nnx.BatchNorm):
      c = node.num_features
      _set(node, "mean", rng.normal(0, 0.5, c))
      _set(node, "var", rng.uniform(0.5, 2, c))
      _set(node, "scale", rng.uniform(0.5, 1.5, c))
      _set(node, "bias", rng.normal(0, 0.5, c))
  return model


_forward = nnx.jit(lambda m, x: m(x))


def assert_same_outputs(model, small, shape, seed=0):
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  model.eval()
  # Jitted: one compilation per model instead of one per eager op.
  want, got = np.asarray(_forward(model, x)), np.asarray(_forward(small, x))
  scale = max(1.0, float(np.max(np.abs(want))))
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale)
  return got


def widths(report):
  return {g.name: (g.width, g.kept) for g in report.groups}


def test_lenet300_100_dead_units_and_pixels():
  model = prune_randomly(LeNet300100(rngs=nnx.Rngs(0)), 1, density=0.3)
  small, report = C.compact(model)
  assert_same_outputs(model, small, (3, 28, 28, 1))
  w = widths(report)
  assert w["fc1"][1] < 300 and w["fc2"][1] < 100
  assert small.fc2.kernel[...].shape == (w["fc1"][1], w["fc2"][1])
  assert isinstance(small.fc1, C.SelectInputs)
  assert report.inputs[0] < 784 == report.inputs[1]
  assert sum(g.constant for g in report.groups) > 0  # folded constants
  again, report2 = C.compact(small)  # idempotent
  assert widths(report2) == {k: (v[1], v[1]) for k, v in w.items()}
  assert_same_outputs(model, again, (3, 28, 28, 1))


def test_lenet5_folds_constants_through_pooling_and_flatten():
  model = prune_randomly(LeNet5(rngs=nnx.Rngs(0)), 2)
  small, report = C.compact(model)
  assert_same_outputs(model, small, (2, 28, 28, 1))
  by = {g.name: g for g in report.groups}
  assert by["conv2"].constant > 0 and by["conv1"].constant > 0
  assert small.fc1.in_features == 16 * small.conv2.out_features


def test_vgg_units_feeding_batch_norm():
  model = prune_randomly(VGGCifar((8, "M", 12, 12, "M", 16), rngs=nnx.Rngs(0)), 3, unread=0.2)
  small, report = C.compact(model)
  assert_same_outputs(model, small, (2, 8, 8, 3))
  by = {g.name: g for g in report.groups}
  # Units with a non-zero constant before a padded conv stay; before the
  # global mean and the classifier they are folded.
  assert sum(g.kept_constant for g in report.groups) > 0
  assert by["convs.3"].kept_constant == 0 and by["convs.3"].constant > 0
  assert [c for c in small.layout if c != "M"] == [by[f"convs.{i}"].kept for i in range(4)]
  assert small.layout[1] == small.layout[4] == "M"


# Stream channels that no layer reads, per stage, and the widths kept. With
# option B (projections) the stages are independent. With option A, widths
# (6, 8, 12): stage-0 channel j continues as stage-1 channel j + 1 and stage-2
# channel j + 3; stage 1 pads channels 0 | 7, stage 2 pads 0, 1 | 10, 11.
# Stage-0 channel 0 goes unread in stages 0 and 1 but is read in stage 2, so it
# stays; padded stage-2 channels 0 and 1 are unread but only one can go (the
# block pads half, rounded down, before: 0 before and 2 after is not a split).
STREAM = {
  "B": ({0: [1, 4], 1: [0, 7], 2: [2, 11]}, [4, 6, 10]),
  "A": ({0: [0, 1, 4], 1: [0, 1, 2, 5], 2: [0, 1, 2, 4, 7]}, [4, 5, 8]),
}


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet_inner_units_and_residual_stream(shortcut):
  model = CifarResNet(14, widths=(6, 8, 12), shortcut=shortcut, rngs=nnx.Rngs(0))
  prune_randomly(model, 4, density=0.6, unfed=0.3, unread=0.0)
  stages = [[0, 1], [2, 3], [4, 5]]
  lanes, kept = STREAM[shortcut]
  for s, blocks in enumerate(stages):
    readers = [model.blocks[i].conv1 for i in blocks if s == 0 or i != blocks[0]]
    readers += [model.blocks[stages[s + 1][0]].conv1] if s < 2 else [model.fc]
    if s < 2 and shortcut == "B":
      readers.append(model.blocks[stages[s + 1][0]].proj_conv)
    for r in readers:
      k = np.array(r.kernel[...])
      k[..., lanes[s], :] = 0
      _set(r, "kernel", k)
  small, report = C.compact(model)
  assert_same_outputs(model, small, (2, 8, 8, 3))
  w = widths(report)
  assert [w[f"stage{s}"][1] for s in range(3)] == kept
  assert sum(w[f"blocks.{i}"][0] - w[f"blocks.{i}"][1] for i in range(6)) > 0
  if shortcut == "A":
    assert [small.blocks[i].pad_channels for i in (2, 4)] == [1, 3]


def test_no_dead_unit_is_the_identity():
  for model in (
    LeNet300100(rngs=nnx.Rngs(0)),
    LeNet5(rngs=nnx.Rngs(0)),
    CifarResNet(8, widths=(4, 4, 8), rngs=nnx.Rngs(0)),
  ):
    model.eval()
    small, report = C.compact(model)
    assert report.rounds == 1 and all(g.kept == g.width for g in report.groups)
    a, b = nnx.state(model, nnx.Param), nnx.state(small, nnx.Param)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_whole_layer_vanishes():
  model = LeNet300100(rngs=nnx.Rngs(0))
  _set(model.fc2, "kernel", np.zeros((300, 100)))
  # fc1's units are all unread and fc2's all constant: fc1 is reported first.
  with pytest.raises(ValueError, match="every unit of 'fc1'.*on_empty='keep_one'"):
    C.compact(model)
  small, report = C.compact(model, on_empty="keep_one")
  assert small.fc2.out_features == 1 and small.fc3.in_features == 1
  out = assert_same_outputs(model, small, (3, 28, 28, 1))
  np.testing.assert_allclose(out[0], out[1], atol=1e-6)  # constant logits


def test_unsupported_and_bad_arguments():
  with pytest.raises(TypeError, match="DenseNet"):
    C.compact(DenseNet(10, 4, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="`on_empty` must be one of"):
    C.compact(LeNet300100(rngs=nnx.Rngs(0)), on_empty="drop")


def test_sparse_path_equals_dense_path():
  for model, shape in (
    (prune_randomly(LeNet300100(rngs=nnx.Rngs(0)), 6), (3, 28, 28, 1)),
    (prune_randomly(LeNet5(rngs=nnx.Rngs(0)), 7), (2, 28, 28, 1)),
    (
      prune_randomly(CifarResNet(8, widths=(4, 6, 8), rngs=nnx.Rngs(0)), 8, unread=0.0),
      (2, 8, 8, 3),
    ),
  ):
    small, _ = C.compact(model)
    sparse, choices = C.sparsify(small, shape, choice="sparse")
    assert all(c.sparse for c in choices) and choices
    assert_same_outputs(model, sparse, shape)
    assert C.executed_macs(sparse, shape) <= C.executed_macs(small, shape)
