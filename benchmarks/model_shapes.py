"""Parameter pytrees with the real leaf shapes of the benchmarked models.

Only the shapes (and so the sizes, the leaf count and the leaf order) matter
for timing an optimizer step; the values are random. Convolution kernels are
HWIO, as in Flax; normalisation layers contribute a 1-D scale and bias.
"""

from __future__ import annotations

import numpy as np

SIZES = ("lenet300", "resnet56", "resnet50", "100m")


def lenet300_shapes():
  """LeNet-300-100 (266,610 parameters)."""
  return {
    "fc1": {"kernel": (784, 300), "bias": (300,)},
    "fc2": {"kernel": (300, 100), "bias": (100,)},
    "fc3": {"kernel": (100, 10), "bias": (10,)},
  }


def _bn(c):
  return {"scale": (c,), "bias": (c,)}


def resnet56_shapes():
  """ResNet-56 for CIFAR-10 (He et al. 2016, option-A shortcuts; 853,018)."""
  tree = {"conv0": {"kernel": (3, 3, 3, 16)}, "bn0": _bn(16)}
  cin = 16
  for stage, cout in enumerate((16, 32, 64)):
    for block in range(9):
      tree[f"stage{stage}_block{block}"] = {
        "conv1": {"kernel": (3, 3, cin, cout)},
        "bn1": _bn(cout),
        "conv2": {"kernel": (3, 3, cout, cout)},
        "bn2": _bn(cout),
      }
      cin = cout
  tree["fc"] = {"kernel": (64, 10), "bias": (10,)}
  return tree


def resnet50_shapes():
  """ResNet-50 for ImageNet (bottleneck blocks 3/4/6/3; 25,557,032)."""
  tree = {"conv0": {"kernel": (7, 7, 3, 64)}, "bn0": _bn(64)}
  cin = 64
  for stage, (planes, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
    for block in range(blocks):
      b = {
        "conv1": {"kernel": (1, 1, cin, planes)},
        "bn1": _bn(planes),
        "conv2": {"kernel": (3, 3, planes, planes)},
        "bn2": _bn(planes),
        "conv3": {"kernel": (1, 1, planes, 4 * planes)},
        "bn3": _bn(4 * planes),
      }
      if block == 0:
        b["downsample"] = {"kernel": (1, 1, cin, 4 * planes)}
        b["downsample_bn"] = _bn(4 * planes)
      tree[f"stage{stage}_block{block}"] = b
      cin = 4 * planes
  tree["fc"] = {"kernel": (2048, 1000), "bias": (1000,)}
  return tree


def synthetic100m_shapes():
  """A synthetic 100M model: 40 dense kernels of 1250x2000 plus biases."""
  return {f"layer{i:02d}": {"kernel": (1250, 2000), "bias": (2000,)} for i in range(40)}


def transformer300_shapes():
  """A 300-leaf transformer-shaped pytree (18.6M parameters): 18 pre-norm
  blocks of width 256 (16 leaves each: q, k, v, o, two MLP kernels, their
  biases, two layer norms), embeddings, a final norm and three heads. Sized
  for the compile time of a many-leaf step, not as a real model."""
  d, h, vocab = 256, 1024, 8192
  tree = {
    "wte": {"embedding": (vocab, d)},
    "wpe": {"embedding": (512, d)},
    "ln_emb": {"scale": (d,), "bias": (d,)},
  }
  for i in range(18):
    tree[f"block{i:02d}"] = {
      "ln1": {"scale": (d,), "bias": (d,)},
      **{name: {"kernel": (d, d), "bias": (d,)} for name in ("q", "k", "v", "o")},
      "ln2": {"scale": (d,), "bias": (d,)},
      "fc1": {"kernel": (d, h), "bias": (h,)},
      "fc2": {"kernel": (h, d), "bias": (d,)},
    }
  tree["ln_f"] = {"scale": (d,), "bias": (d,)}
  for name, out in (("head", vocab), ("pooler", d), ("classifier", 10)):
    tree[name] = {"kernel": (d, out), "bias": (out,)}
  return tree


# transformer300 is not in SIZES (the default sizes of the benchmarks): it
# serves benchmarks/selection.py's compile-time rows.
SHAPES = {
  "lenet300": lenet300_shapes,
  "resnet56": resnet56_shapes,
  "resnet50": resnet50_shapes,
  "100m": synthetic100m_shapes,
  "transformer300": transformer300_shapes,
}


def num_params(shapes) -> int:
  import jax

  return sum(
    int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
  )


def make_params(size: str, seed: int = 0):
  """Random float32 params with the shapes of ``size`` (He-style scales)."""
  import jax
  import jax.numpy as jnp

  shapes = SHAPES[size]()
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  rng = np.random.default_rng(seed)
  out = []
  for shape in leaves:
    if len(shape) >= 2:
      fan_in = int(np.prod(shape[:-1]))
      x = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    else:
      x = np.float32(1.0) + np.float32(0.1) * rng.standard_normal(shape, np.float32)
    out.append(jnp.asarray(x))
  return jax.tree.unflatten(treedef, out)
