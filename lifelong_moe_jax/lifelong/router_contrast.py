"""New router columns that start ahead of their source on the new data and behind it on the old
(``MethodOptions.router_init = "copy_contrast"``).

A copied router column ``w_src`` gets a shift ``s`` per MoE layer, ``w_new = w_src + s`` (plus the
copy noise), so that the new expert's logit minus its source's is ``s . x`` for a router input
``x``. ``contrast_shift`` chooses ``s`` from router-input moments, measured like EWC's Fisher (the
new phase's data under the previous model; each earlier distribution's at the start of the phase
after it, ``router_rehearsal.save_accumulated_moments``): of all shifts with

  ``s . mu_new = +margin`` and ``s . mu_old = -old_margin``

(on average over the new data the copy's logit is ``margin`` above its source's, over the old data
``old_margin`` below; ``old_margin`` defaults to ``margin``), the one whose token-by-token spread
around those means, ``s^T Sigma s``, is the least:

  ``s = Sigma^-1 B (B^T Sigma^-1 B)^-1 [margin, -old_margin]``,  ``B = [mu_new, mu_old]``,

``Sigma`` the mean of the two distributions' covariances (plus ``ridge`` times its mean
eigenvalue), ``mu_old`` and its covariance those of the earlier distributions pooled at equal
weight. It is a linear discriminant with a bias: a router has no bias term, and the minimum-variance
combination of the two means stands in for one. Token by token the split is as good as the two
distributions' router inputs separate linearly (``benchmarks/router_separability.py`` measures the
best a linear router can do).
"""

from __future__ import annotations

import numpy as np


class ContrastError(ValueError):
  """The moments cannot give a contrast direction (shapes, non-finite or degenerate values)."""


def contrast_shift(
  new_mean: np.ndarray,
  new_second_moment: np.ndarray,
  old_means: np.ndarray,
  old_second_moments: np.ndarray,
  margin: float,
  ridge: float = 1e-3,
  old_margin: float | None = None,
) -> np.ndarray:
  """The shift added to copied router columns, float32 ``[M, embed]``.

  Args:
    new_mean: ``[M, embed]`` mean router input of the new phase's data, per MoE layer.
    new_second_moment: ``[M, embed, embed]`` its ``E[x x^T]``.
    old_means: ``[P, M, embed]`` the same for each of P earlier distributions.
    old_second_moments: ``[P, M, embed, embed]``.
    margin: mean logit gap above the source on the new data (>= 0).
    ridge: covariance regulariser, relative to the mean eigenvalue (> 0).
    old_margin: mean logit gap below the source on the earlier distributions (>= 0; None:
      ``margin``).
  Raises:
    ContrastError: bad shapes, non-finite moments, or means the shift cannot tell apart.
  """
  mu_n = np.asarray(new_mean, np.float64)
  s_n = np.asarray(new_second_moment, np.float64)
  mu_p = np.asarray(old_means, np.float64)
  s_p = np.asarray(old_second_moments, np.float64)
  if mu_n.ndim != 2 or s_n.shape != mu_n.shape + mu_n.shape[-1:]:
    raise ContrastError(
      f"new moments must be [M, d] and [M, d, d], got {mu_n.shape} and {s_n.shape}."
    )
  if mu_p.ndim != 3 or mu_p.shape[1:] != mu_n.shape or s_p.shape != mu_p.shape + mu_p.shape[-1:]:
    raise ContrastError(
      f"old moments must be [P, M, d] and [P, M, d, d] with [M, d] = {mu_n.shape}, got "
      f"{mu_p.shape} and {s_p.shape}."
    )
  old_margin = margin if old_margin is None else old_margin
  if margin < 0 or old_margin < 0 or ridge <= 0:
    raise ContrastError(
      f"margin and old_margin must be >= 0 and ridge > 0, got {margin}, {old_margin} and {ridge}."
    )
  if not all(np.all(np.isfinite(a)) for a in (mu_n, s_n, mu_p, s_p)):
    raise ContrastError("router-input moments are not finite; measure them on real tokens.")
  mu_o, s_o = mu_p.mean(axis=0), s_p.mean(axis=0)  # the pooled earlier distributions
  d = mu_n.shape[-1]
  out = np.zeros_like(mu_n)
  target = np.array([margin, -old_margin])
  for layer in range(mu_n.shape[0]):
    a, b = mu_n[layer], mu_o[layer]
    sigma = 0.5 * (s_n[layer] - np.outer(a, a) + s_o[layer] - np.outer(b, b))
    sigma = 0.5 * (sigma + sigma.T)
    sigma += ridge * max(np.trace(sigma) / d, 1e-12) * np.eye(d)
    basis = np.stack([a, b], axis=1)  # [d, 2]
    whitened = np.linalg.solve(sigma, basis)  # Sigma^-1 B
    gram = basis.T @ whitened  # B^T Sigma^-1 B
    scale = np.abs(gram).max()
    if not scale > 0 or abs(np.linalg.det(gram / scale)) < 1e-9:
      raise ContrastError(
        f"MoE layer {layer}: the new and old mean router inputs are (nearly) parallel, so no "
        "shift puts the new data above and the old below its source; use router_init "
        "'copy_offset'."
      )
    out[layer] = whitened @ np.linalg.solve(gram, target)
  return out.astype(np.float32)
