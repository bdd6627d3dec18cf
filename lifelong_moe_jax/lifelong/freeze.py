"""Partial freezing: exactly zero updates for old expert slices (and optionally shared params).

``freeze_mask`` marks, for every param, which entries are frozen (True): the expert slices
``[0, frozen_experts)`` along the logical ``'expert'`` axis of every expert weight and of the
router kernel (its columns), and, with ``freeze_shared``, every param without an ``expert`` axis.

Masks are small: each mask leaf is a numpy bool array with the param's rank whose dimensions are 1
except the expert axis (and the ``layers`` axis when scanned layers freeze different counts), so it
broadcasts against the param and can be closed over by a jitted step without embedding a
param-sized constant. ``materialize_mask`` gives full-shape masks when needed.

``with_frozen(tx, mask)`` wraps an optimizer: gradients of frozen entries are zeroed before ``tx``
(so clipping and the optimizer's statistics ignore them) and the final updates of frozen entries
are zeroed after the whole chain (so momentum, Adafactor's factored scaling and decoupled weight
decay cannot move them, whatever the optimizer state holds for them). Frozen entries therefore stay
bit-identical. The wrapped optimizer's state is exactly ``tx``'s state (same structure), so
checkpoints do not depend on the freezing.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lifelong_moe_jax.param_tree import flatten_with_axes, moe_layer_rows

FrozenExperts = int | Sequence[int] | None


def freeze_mask(
  params: Any, params_axes: Any, frozen_experts: FrozenExperts, *, freeze_shared: bool = False
) -> Any:
  """Boolean mask pytree (True = frozen), each leaf broadcastable to its param.

  Args:
    params: unboxed params (arrays or ``ShapeDtypeStruct``s).
    params_axes: params-structured pytree of logical ``PartitionSpec``.
    frozen_experts: experts ``[0, k)`` frozen in every MoE layer (int), or one ``k`` per MoE layer
      in layer order (as ``lm.collect_moe_stats`` orders layers); None or 0 freezes no expert.
      For a lifelong phase this is ``record.experts_before(phase)``.
    freeze_shared: also freeze every param without an ``expert`` axis (attention, dense MLPs,
      norms, embeddings, logits).
  Returns:
    params-structured pytree of numpy bool arrays: for an expert leaf of shape
    ``[.., E, ..]`` a mask ``[1, .., E, .., 1]`` (``[L, .., E, .., 1]`` when scanned layers differ),
    for other leaves an all-ones-shaped ``[1, .., 1]`` mask equal to ``freeze_shared``.
  """
  treedef, infos = flatten_with_axes(params, params_axes)
  counts = np.atleast_1d(np.asarray(0 if frozen_experts is None else frozen_experts, np.int64))
  if counts.ndim != 1 or np.any(counts < 0):
    raise ValueError(
      f"frozen_experts must be a non-negative int or one per MoE layer, got {frozen_experts!r}."
    )
  rows = moe_layer_rows(infos, counts[:, None], "frozen_experts")
  masks = []
  for info in infos:
    ndim = len(np.shape(info.value))
    if info.expert_axis is None:
      masks.append(np.full((1,) * ndim, freeze_shared, bool))
      continue
    num_experts = np.shape(info.value)[info.expert_axis]
    k = np.asarray(rows[info.key])[..., 0]  # [] or [layers]
    if np.any(k > num_experts):
      raise ValueError(
        f"{info.key}: cannot freeze {int(np.max(k))} experts, it has only {num_experts}."
      )
    shape = [1] * ndim
    shape[info.expert_axis] = num_experts
    index = np.arange(num_experts)
    if k.ndim == 1 and len(set(k.tolist())) > 1:  # scanned layers with different counts.
      shape[info.layers_axis] = k.shape[0]
      mask = index[None, :] < k[:, None]
      order = sorted([info.layers_axis, info.expert_axis])
      mask = mask if order == [info.layers_axis, info.expert_axis] else mask.T
    else:
      mask = index < (k if k.ndim == 0 else k[0])
    masks.append(np.asarray(mask, bool).reshape(shape))
  return jax.tree_util.tree_unflatten(treedef, masks)


def materialize_mask(mask: Any, params: Any) -> Any:
  """Full-shape bool masks (``np.broadcast_to`` of each mask leaf to its param's shape)."""
  return jax.tree_util.tree_map(lambda m, p: np.broadcast_to(m, np.shape(p)), mask, params)


def frozen_count(mask: Any, params: Any) -> tuple[int, int]:
  """``(frozen entries, total entries)`` over all params (for logging)."""
  frozen = total = 0
  for m, p in zip(jax.tree_util.tree_leaves(mask), jax.tree_util.tree_leaves(params)):
    size = int(np.prod(np.shape(p)))
    frozen += int(np.sum(np.broadcast_to(m, np.shape(p))))
    total += size
  return frozen, total


def _apply_mask(mask: Any, tree: Any) -> Any:
  def zero(m, u):
    return None if u is None else jnp.where(m, jnp.zeros((), u.dtype), u)

  return jax.tree_util.tree_map(zero, mask, tree, is_leaf=lambda x: x is None)


def freeze_updates(mask: Any) -> optax.GradientTransformation:
  """Stateless transformation that sets updates of frozen (True) entries to exactly zero."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return _apply_mask(mask, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def with_frozen(
  tx: optax.GradientTransformation, mask: Any
) -> optax.GradientTransformationExtraArgs:
  """``tx`` with frozen entries receiving exactly zero update (state structure of ``tx`` unchanged).

  Gradients of frozen entries are zeroed before ``tx`` and the final updates after it, so
  momentum, adaptive scaling and decoupled weight decay never move a frozen entry.

  Args:
    tx: any optax optimizer (e.g. ``optax.adamw``, ``optax.adafactor``, a chain with clipping).
    mask: from ``freeze_mask`` (or full-shape bool arrays); None returns ``tx`` unchanged.
  """
  if mask is None:
    return tx
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, **extra_args):
    updates, state = tx.update(_apply_mask(mask, updates), state, params, **extra_args)
    return _apply_mask(mask, updates), state

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
