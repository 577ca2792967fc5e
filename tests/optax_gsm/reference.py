"""Independent numpy references for the selection and the GSM update."""

import numpy as np

INT_MIN = int(np.iinfo(np.int32).min)


def ranked_selection(scores_list, q):
  """Boolean masks of the Q best entries, ranked with numpy's lexsort.

  Order: larger score first; NaN after every number; ties by lower global
  flat index. NaN is never selected unless Q >= N.
  """
  flat = np.concatenate([np.asarray(s, np.float32).ravel() for s in scores_list])
  n = flat.size
  q = int(min(max(q, 0), n))
  nan = np.isnan(flat)
  value = np.where(nan, 0.0, -flat.astype(np.float64))
  order = np.lexsort((np.arange(n), value, nan))  # last key is primary
  sel = np.zeros(n, bool)
  sel[order[:q]] = True
  if q < n:
    sel &= ~nan
  out, start = [], 0
  for s in scores_list:
    size = np.size(s)
    out.append(sel[start : start + size].reshape(np.shape(s)))
    start += size
  return out


def gsm_steps(
  params,
  grads_seq,
  *,
  lr,
  q,
  momentum,
  weight_decay,
  eligible,
  unselected_decay=0.0,
  unselected_shrink=0.0,
):
  """Runs GSM's update in numpy, in float64.

  ``Z <- beta Z + eta W + B g (+ eta_u (1-B) W)``, then
  ``W <- W - lr Z - rho (1-B) W`` with ``rho = unselected_shrink`` (0 for
  the paper's rule), the shrink using W from before the step.

  ``params`` is a list of float64 arrays, ``eligible`` a list of bools and
  ``grads_seq`` a list (over steps) of lists of gradient arrays.
  """
  w = [np.array(p, np.float64) for p in params]
  z = [np.zeros_like(p) for p in w]
  masks_seq = []
  for grads in grads_seq:
    elig_idx = [i for i, e in enumerate(eligible) if e]
    scores = [
      np.abs(np.asarray(grads[i], np.float32) * np.asarray(w[i], np.float32)) for i in elig_idx
    ]
    masks = ranked_selection(scores, q)
    masks_seq.append(masks)
    mask_of = dict(zip(elig_idx, masks))
    for i, g in enumerate(grads):
      g = np.asarray(g, np.float64)
      shrink = 0.0
      if eligible[i]:
        b = mask_of[i]
        u = np.where(b, g, 0.0) + weight_decay * w[i]
        u = u + unselected_decay * np.where(b, 0.0, w[i])
        shrink = unselected_shrink * np.where(b, 0.0, w[i])
      else:
        u = g
      z[i] = momentum * z[i] + u
      w[i] = w[i] - lr * z[i] - shrink
  return w, masks_seq


def int32_keys(scores):
  """int32 keys like selection.scores_to_keys, in numpy."""
  s = np.asarray(scores, np.float32)
  bits = s.view(np.int32).astype(np.int64)
  keys = np.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
  keys = np.where(keys == -1, 0, keys)
  return np.where(np.isnan(s), INT_MIN, keys).astype(np.int64)


def key_selection(leaves, q):
  """``(masks, kth key)`` of the Q largest keys; ties to the lower global flat
  index; NaN keys selected only when Q >= N."""
  keys = np.concatenate([int32_keys(np.asarray(l, np.float32)).ravel() for l in leaves])
  n = keys.size
  q = int(min(max(q, 0), n))
  order = np.lexsort((np.arange(n), -keys))  # last key is primary
  sel = np.zeros(n, bool)
  sel[order[:q]] = True
  if q < n:
    sel &= keys != INT_MIN
  out, start = [], 0
  for l in leaves:
    size = int(np.size(l))
    out.append(sel[start : start + size].reshape(np.shape(l)))
    start += size
  return out, (int(keys[order[q - 1]]) if q > 0 else INT_MIN)
