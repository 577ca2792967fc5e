"""Dense weights as ``.npz`` files and results as JSON, for the command line.

Example:
  >>> import tempfile
  >>> from pathlib import Path
  >>> from experiments.structured.zoo import build_model
  >>> path = Path(tempfile.mkdtemp()) / "lenet5.npz"
  >>> save_params(build_model("lenet5", seed=1), path)
  >>> model = load_params(build_model("lenet5", seed=2), path)
  >>> bool((model.conv1.kernel[...] == build_model("lenet5", seed=1).conv1.kernel[...]).all())
  True
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from experiments.fileio import atomic_write_text


def save_params(model: nnx.Module, path: Path) -> None:
  """Writes the ``nnx.Param`` and BatchNorm state to an ``.npz`` file."""
  flat = {}
  for kind, state in (
    ("param", nnx.state(model, nnx.Param)),
    ("stat", nnx.state(model, nnx.BatchStat)),
  ):
    for p, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]:
      flat[kind + jax.tree_util.keystr(p)] = np.asarray(leaf)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, **flat)
  os.replace(tmp, path)


def load_params(model: nnx.Module, path: Path) -> nnx.Module:
  """Reads :func:`save_params` output into ``model`` (in place)."""
  with np.load(path) as f:
    flat = dict(f)
  for kind, cls in (("param", nnx.Param), ("stat", nnx.BatchStat)):
    state = nnx.state(model, cls)
    pure = nnx.to_pure_dict(state)
    leaves, tdef = jax.tree_util.tree_flatten_with_path(pure)
    new = [jax.device_put(flat[kind + jax.tree_util.keystr(p)]) for p, _ in leaves]
    pure = jax.tree_util.tree_unflatten(tdef, new)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
  return model


def _json_default(x: Any) -> Any:
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (tuple, set)):
    return list(x)
  return str(x)


def write_result(result: dict, path: Path) -> None:
  """``result`` as JSON at ``path``, atomically (temporary file + rename)."""
  atomic_write_text(path, json.dumps(result, indent=1, default=_json_default) + "\n")
