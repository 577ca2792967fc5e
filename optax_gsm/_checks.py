"""Argument checks shared by the public factories.

Values that are JAX tracers (for example hyperparameters injected by
``optax.inject_hyperparams`` and read inside a jitted update) cannot be
checked in Python; those are clipped at run time instead.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union, cast

import jax
import jax.core  # jax.core.Tracer (pyright needs the submodule imported)
import numpy as np
import optax

Scalar = Union[int, float, jax.Array, np.ndarray]


def concrete(x: Any) -> Optional[float]:
  """Returns ``x`` as a Python number if it is concrete, else None."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    arr = np.asarray(x)
  except Exception:  # pylint: disable=broad-except
    return None
  if arr.shape != () or arr.dtype.kind not in "biuf":
    return None
  return arr.item()


def check_target(
  num_nonzero: Any,
  compression: Any,
  *,
  budget: Any = None,
  costs: Any = None,
  accepts_budget: bool = False,
) -> None:
  """Checks the Q / compression (/ budget) target when the factory is built.

  With ``accepts_budget`` exactly one of the three targets must be given, and
  ``costs`` goes with ``budget``.
  """
  if accepts_budget:
    given = [x is not None for x in (num_nonzero, compression, budget)]
    if sum(given) != 1:
      raise ValueError(
        "Give exactly one of `num_nonzero` (Q, the number of weights kept), "
        "`compression` (C, with Q = round(N_eligible / C)) and `budget` "
        "(the total cost of the kept weights, with `costs`); got "
        f"num_nonzero={num_nonzero!r}, compression={compression!r}, "
        f"budget={budget!r}."
      )
    if budget is None and costs is not None:
      raise ValueError(
        "`costs` is only used with `budget`: give `budget=` (the total "
        "cost of the weights kept) or drop `costs`."
      )
    if budget is not None:
      if costs is None:
        raise ValueError(
          f"`budget={budget!r}` needs `costs`: a pytree of positive "
          "integer costs shaped like params, or a callable params -> that "
          "pytree (see optax_gsm.budget.cost_tree, bytes_cost_tree)."
        )
      check_budget(budget)
      return
  elif (num_nonzero is None) == (compression is None):
    raise ValueError(
      "Give exactly one of `num_nonzero` (Q, the number of weights kept) and "
      f"`compression` (C, with Q = round(N_eligible / C)); got "
      f"num_nonzero={num_nonzero!r}, compression={compression!r}."
    )
  for name, value in (("num_nonzero", num_nonzero), ("compression", compression)):
    if isinstance(value, (bool, np.bool_)):
      raise TypeError(f"`{name}` must be a number, got the bool {value!r}.")
  if num_nonzero is not None and not callable(num_nonzero):
    q = concrete(num_nonzero)
    if q is None and not isinstance(num_nonzero, jax.core.Tracer):
      raise TypeError(f"`num_nonzero` must be an int or a schedule, got {num_nonzero!r}.")
    if q is not None:
      if isinstance(q, float) and not float(q).is_integer():
        raise TypeError(f"`num_nonzero` must be a whole number of weights, got {q!r}.")
      if q <= 0:
        raise ValueError(
          f"`num_nonzero` must be a positive number of weights to keep "
          f"(1 <= Q <= N_eligible), got {q!r}."
        )
  if compression is not None and not callable(compression):
    c = concrete(compression)
    if c is None and not isinstance(compression, jax.core.Tracer):
      raise TypeError(f"`compression` must be a number or a schedule, got {compression!r}.")
    if c is not None and (not math.isfinite(c) or c < 1):
      raise ValueError(
        f"`compression` must be a finite ratio >= 1 (1 keeps every weight), got {c!r}."
      )


def check_budget(budget: Any, *, name: str = "`budget`") -> None:
  """Checks a budget (or a schedule's value): a number >= 0, not NaN.

  Traced values and schedules pass (a schedule is checked at step 0 by
  ``init``).
  """
  if callable(budget) or isinstance(budget, jax.core.Tracer):
    return
  if isinstance(budget, (bool, np.bool_)):
    raise TypeError(f"{name} must be a number (a total cost), got {budget!r}.")
  value = budget if isinstance(budget, int) else concrete(budget)
  if value is None or isinstance(value, bool):
    raise TypeError(
      f"{name} must be a number (a total cost) or a schedule step -> budget, got {budget!r}."
    )
  if isinstance(value, float) and math.isnan(value):
    raise ValueError(f"{name} must be a number >= 0, got nan.")
  if value < 0:
    raise ValueError(f"{name} must be >= 0 (the total cost of the weights kept), got {value!r}.")


def check_q_against(q: Any, n_eligible: int, *, source: str) -> None:
  """Checks a concrete Q against the eligible count (at init)."""
  value = concrete(q)
  if value is None:
    return
  if value < 1:
    raise ValueError(
      f"{source} gives Q={value!r}, but at least one weight must be kept "
      f"(1 <= Q <= N_eligible={n_eligible})."
    )
  if value > n_eligible:
    raise ValueError(
      f"{source} gives Q={value!r}, more than the {n_eligible} eligible "
      f"weights; Q must satisfy 1 <= Q <= N_eligible={n_eligible}."
    )


def static_q(num_nonzero: Any, compression: Any, n_eligible: int) -> int:
  """Q for a one-off cut from a concrete ``num_nonzero`` or ``compression``.

  Assumes :func:`check_target` has passed; checks ``1 <= Q <= N_eligible``.
  """
  if num_nonzero is not None:
    value = concrete(num_nonzero)
    if value is None:
      raise TypeError(
        f"A one-off cut needs a concrete `num_nonzero`, got "
        f"{num_nonzero!r} (a traced value: pass it as a "
        f"static argument)."
      )
    q = int(value)
    check_q_against(q, n_eligible, source=f"num_nonzero={num_nonzero!r}")
    return q
  value = concrete(compression)
  if value is None:
    raise TypeError(
      f"A one-off cut needs a concrete `compression`, got "
      f"{compression!r} (a traced value: pass it as a static "
      f"argument)."
    )
  c = float(value)
  q = int(round(n_eligible / c))
  check_q_against(q, n_eligible, source=f"compression={c!r} over {n_eligible} eligible weights")
  return q


def check_range(
  name: str,
  value: Any,
  lo: float,
  hi: float,
  *,
  allow_schedule: bool = False,
  open_hi: bool = False,
) -> None:
  """Checks ``lo <= value <= hi`` (``< hi`` with ``open_hi``) for a scalar."""
  if value is None:
    return
  if callable(value):
    if allow_schedule:
      return
    raise TypeError(f"`{name}` must be a number, got the callable {value!r}.")
  v = concrete(value)
  if v is None:
    if isinstance(value, jax.core.Tracer):
      return
    raise TypeError(f"`{name}` must be a scalar number, got {value!r}.")
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be a number, got the bool {value!r}.")
  in_range = lo <= v < hi if open_hi else lo <= v <= hi
  if not in_range or (isinstance(v, float) and math.isnan(v)):
    closing = ")" if open_hi else "]"
    raise ValueError(f"`{name}` must be in [{lo}, {hi}{closing}, got {v!r}.")


def check_choice(
  name: str, value: Any, choices: tuple[str, ...], *, allow_callable: bool = False
) -> None:
  if allow_callable and callable(value):
    return
  if isinstance(value, (jax.Array, np.ndarray, jax.core.Tracer)):
    # optax.inject_hyperparams called a callable argument as a schedule and
    # passed on its result.
    from optax_gsm import eligibility  # pylint: disable=import-outside-toplevel

    raise TypeError(
      f"`{name}` must be one of {choices}"
      f"{' or a callable' if allow_callable else ''}, got an array. "
      f"{eligibility.static_args_hint(name)}"
    )
  if value not in choices:
    extra = " or a callable" if allow_callable else ""
    raise ValueError(f"`{name}` must be one of {choices}{extra}, got {value!r}.")


def increment(count: Any) -> jax.Array:
  """``optax.safe_increment``, typed as the array it returns for a count."""
  return cast(jax.Array, optax.safe_increment(count))


def resolve_schedule(value: Union[Scalar, Callable[[Any], Any]], count):
  """Evaluates an optax-style schedule at ``count``, or returns the value."""
  return value(count) if callable(value) else value
