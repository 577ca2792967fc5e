"""Pruning methods compared with GSM by :mod:`experiments.compare`.

Each module (other than :mod:`experiments.methods.common`) exposes
``METHODS = {name: runner}`` with ``runner(ctx: common.Context) -> common.MethodResult``.
:func:`collect_methods` gathers them all, so adding a method means adding a
module here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

# Table order: GSM first, then the baselines; methods of new modules follow.
PREFERRED_ORDER = (
  "gsm",
  "magnitude_oneshot",
  "magnitude_retrain",
  "magnitude_gradual",
  "dns",
  "lobs",
  "saliency_retrain",
  "imp_ticket",
  "gsm_ticket",
  "random_ticket",
)


def collect_methods() -> dict[str, Callable[[Any], Any]]:
  """``name -> runner`` of every method module in this package, in table order.

  Raises:
    ValueError: if two modules define the same method name.
  """
  found: dict[str, Callable[[Any], Any]] = {}
  owner: dict[str, str] = {}
  for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if info.name.startswith("_") or info.name == "common":
      continue
    module = importlib.import_module(f"{__name__}.{info.name}")
    for name, runner in getattr(module, "METHODS", {}).items():
      if name in found:
        raise ValueError(f"method {name!r} is defined by both {owner[name]} and {info.name}")
      found[name] = runner
      owner[name] = info.name
  ordered = {n: found[n] for n in PREFERRED_ORDER if n in found}
  ordered.update({n: r for n, r in found.items() if n not in ordered})
  return ordered
