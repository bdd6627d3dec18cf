"""Router updates of new experts kept orthogonal to the old distributions' mean router inputs.

``MethodOptions.project_new_router_updates``: a router logit is ``w_e . h`` (``h``: the MoE layer's
normalised input). The study (docs/study.md) found that the new experts' router columns, trained on
new data only, move along the direction all tokens share, so old-distribution tokens drift to the
new experts as much as the new distribution's. This option removes that direction from every update
of the phase's new columns: with ``Q_m`` an orthonormal basis (per MoE layer m) of the mean router
inputs ``mu_{m,p}`` of the earlier distributions p, every update ``u`` of a new column becomes
``u - Q_m Q_m^T u``, so ``w_new . mu_{m,p}`` keeps its value at the phase start (for
``router_init="copy_offset"``: about ``router_offset`` below the source's) while the column still
learns every direction that tells the new data apart from the old.

The means are statistics of earlier phases' data, like EWC's Fisher: when a phase starts, the mean
router input of the previous phase's training data under its final params
(``router_input.measure_router_input_mean``) is appended to the means saved with the previous
phase and written with the phase's step-0 checkpoint (``<phase folder>/old_router_means.npy``,
float64 ``[phases, num_moe_layers, embed]``), so a resumed phase projects on the same basis.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from absl import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lifelong_moe_jax import param_tree
from lifelong_moe_jax.lifelong import expansion
from lifelong_moe_jax.lifelong import router_input
from lifelong_moe_jax.lifelong.method_options import MethodError

if TYPE_CHECKING:
  from lifelong_moe_jax.lifelong.methods import Method, PhaseSetup

PyTree = Any
MEANS_FILE = "old_router_means.npy"


def orthonormal_bases(means: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
  """Per MoE layer, an orthonormal basis of the span of the earlier distributions' means.

  Args:
    means: ``[phases, M, embed]`` mean router inputs.
    rtol: directions whose QR diagonal is below ``rtol`` times the largest are dropped (means
      that are (nearly) linearly dependent); their basis columns are zero.
  Returns:
    float32 ``[M, embed, phases]``; ``Q[m]^T Q[m]`` is the identity on the kept directions.
  """
  means = np.asarray(means, np.float64)
  if means.ndim != 3 or means.shape[0] == 0:
    raise ValueError(f"means must be [phases >= 1, num_moe_layers, embed], got {means.shape}.")
  if not np.all(np.isfinite(means)):
    raise ValueError("means has non-finite entries.")
  bases = []
  for m in range(means.shape[1]):
    q, r = np.linalg.qr(means[:, m, :].T)  # [embed, P], [P, P]
    diag = np.abs(np.diag(r))
    keep = diag > rtol * max(float(diag.max()), 1e-30)
    bases.append(q * keep[None, :])
  return np.stack(bases).astype(np.float32)


def _project_leaf(u: jax.Array, basis: jax.Array, embed_axis: int, expert_axis: int, first: int):
  """``u`` with columns ``>= first`` along ``expert_axis`` replaced by ``(I - Q Q^T) u``.

  ``basis``: ``[embed, r]`` (unscanned) or ``[blocks, embed, r]`` with the blocks on the leaf's
  remaining (layers) axis.
  """
  x = jnp.moveaxis(u, (embed_axis, expert_axis), (-2, -1))  # [..., embed, E]
  xf = x.astype(jnp.float32)
  coeff = jnp.einsum("...dr,...de->...re", basis, xf)
  projected = xf - jnp.einsum("...dr,...re->...de", basis, coeff)
  columns = jnp.arange(x.shape[-1]) >= first
  x = jnp.where(columns, projected.astype(x.dtype), x)
  return jnp.moveaxis(x, (-2, -1), (embed_axis, expert_axis))


def router_leaf_bases(infos: list[param_tree.LeafInfo], bases: np.ndarray) -> dict[str, Any]:
  """``{router leaf key: (basis, embed_axis, expert_axis)}`` for every router kernel among
  ``infos`` (``param_tree.flatten_with_axes``; ``bases``: ``[M, embed, r]`` from
  ``orthonormal_bases``, in ``collect_moe_stats``'s layer order)."""
  routers = [i for i in infos if expansion.is_router_leaf(i)]
  if not routers:
    raise ValueError("No router kernel (logical axes ('embed', 'expert')) in params.")
  rows = param_tree.moe_layer_rows(infos, np.asarray(bases), "router means basis")
  out = {}
  for info in routers:
    embed_axis = next(
      d
      for d, e in enumerate(info.spec)
      if e == "embed" or (isinstance(e, (tuple, list)) and "embed" in e)
    )
    if info.layers_axis is not None and info.layers_axis != 0:
      raise ValueError(f"{info.key}: a scanned router kernel must have its layers axis first.")
    out[info.key] = (rows[info.key], embed_axis, info.expert_axis)
  return out


def with_router_projection(
  tx: optax.GradientTransformation,
  params: PyTree,
  params_axes: PyTree,
  bases: np.ndarray,
  first_new_expert: int,
) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose final updates of router columns ``>= first_new_expert`` are projected
  orthogonal to ``bases`` (``[M, embed, r]``); every other update is unchanged.

  Args:
    tx: the (possibly freeze-wrapped) optimizer.
    params: params or abstract params (shapes and tree structure only), unboxed.
    params_axes: their logical axes (``LanguageModel.params_logical_axes()``).
    bases: ``orthonormal_bases(means)``.
    first_new_expert: the first expert of the phase (earlier columns are left as they are).
  """
  treedef, infos = param_tree.flatten_with_axes(params, params_axes)
  leaf_bases = router_leaf_bases(infos, bases)
  keys = [i.key for i in infos]
  tx = optax.with_extra_args_support(tx)

  def project(updates):
    leaves = treedef.flatten_up_to(updates)
    out = []
    for key, u in zip(keys, leaves):
      if key in leaf_bases:
        basis, embed_axis, expert_axis = leaf_bases[key]
        u = _project_leaf(u, jnp.asarray(basis), embed_axis, expert_axis, first_new_expert)
      out.append(u)
    return jax.tree_util.tree_unflatten(treedef, out)

  def update_fn(updates, state, params=None, **extra_args):
    updates, state = tx.update(updates, state, params, **extra_args)
    return project(updates), state

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def save_means(directory: str, means: np.ndarray) -> str:
  """Writes ``means`` (``[phases, M, embed]``) to ``directory/old_router_means.npy`` atomically."""
  path = os.path.join(directory, MEANS_FILE)
  tmp = path + ".tmp.npy"
  np.save(tmp, np.asarray(means, np.float64))
  os.replace(tmp, path)
  return path


def load_means(directory: str) -> np.ndarray | None:
  """The means saved in ``directory`` (None when there are none)."""
  path = os.path.join(directory, MEANS_FILE)
  return np.load(path) if os.path.exists(path) else None


def phase_bases(method_name: str, phase_dir: str, phase_name: str, first_new: int) -> np.ndarray:
  """Orthonormal bases (``orthonormal_bases``) of the means saved when the phase started.

  Raises:
    MethodError: the phase folder has no means (the option was off when the phase started).
  """
  means = load_means(phase_dir)
  if means is None:
    raise MethodError(
      f"{phase_dir} has no {MEANS_FILE} (project_new_router_updates was off when this phase "
      "started): delete the phase folder to rebuild its start."
    )
  logging.info(
    "[%s] phase %s: updates of router columns [%d, ...) projected orthogonal to the mean router "
    "inputs of %d earlier distribution(s).",
    method_name,
    phase_name,
    first_new,
    means.shape[0],
  )
  return orthonormal_bases(means)


def save_accumulated_means(method: Method, setup: PhaseSetup, start_dir: str) -> np.ndarray:
  """The previous phase's mean router input (its own distribution's train data, its final params,
  ``usage_batches`` batches) appended to the means saved with the previous phase; written to
  ``start_dir`` by process 0. Returns ``[phases so far, M, embed]``."""
  t0 = time.perf_counter()
  mean = router_input.measure_previous_phase_moments(method, setup)[0]
  earlier = load_means(setup.previous_phase_dir)
  means = mean[None] if earlier is None else np.concatenate([earlier, mean[None]], axis=0)
  if jax.process_index() == 0:  # every process measured (collectively); one writes
    os.makedirs(start_dir, exist_ok=True)
    save_means(start_dir, means)
  logging.info(
    "[%s] phase %d: mean router inputs of %d earlier distribution(s) saved (%.1f s).",
    method.name,
    setup.index,
    means.shape[0],
    time.perf_counter() - t0,
  )
  return means
