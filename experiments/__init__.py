"""Reproduction experiments for Global Sparse Momentum SGD (Ding et al., NeurIPS 2019).

This package is *not* part of the installable ``optax_gsm`` library; it holds the
code that trains the paper's benchmark models with the library:

* :mod:`experiments.models` -- Flax NNX models (LeNet-300-100, LeNet-5, ResNet-56,
  DenseNet-40, ResNet-50, a small CIFAR VGG) and a name -> constructor registry.
* :mod:`experiments.data` -- TensorFlow-Datasets loaders (MNIST, Fashion-MNIST,
  CIFAR-10, ImageNet) with offline preparation from a manual directory.
* :mod:`experiments.configs` -- one configuration per row of the paper's tables.
* :mod:`experiments.training` -- the NNX training loop, checkpointing and resume.
* :mod:`experiments.plots` -- matplotlib figures written next to ``results.json``.
* :mod:`experiments.run` -- the command line entry point
  (``python -m experiments.run CONFIG --phase all``).
* :mod:`experiments.sensitivity` -- per-layer pruning sensitivity of a run against
  GSM's per-layer choice (``python -m experiments.sensitivity RUN_DIR``).
"""
