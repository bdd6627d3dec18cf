"""Index-based token dispatch for ``MoeLayer``: the ``"sort"`` and ``"ragged"`` paths.

``"sort"`` (capacity-based): the routing's ``sorted_assignments`` (assignments sorted by expert,
then priority) give, for every expert buffer slot, the token that fills it, so
``gather_to_buffers`` builds ``[G, E, C, embed]`` with one gather and ``combine_from_buffers``
takes each token's ``k`` results back with one gather and a weighted sum (their transposes, used
in the backward pass, are scatter-adds). Dispatch and combine cost ``O(tokens * k * embed)``; no
``[G, S, E, C]`` tensor exists. The buffers then follow the same all-to-all and expert matmuls as
the ``"einsum"`` path.

``"ragged"`` (dropless): every assignment of a device's tokens is sorted by expert and the experts
run as grouped matmuls (``jax.lax.ragged_dot``) over the sorted rows, with per-expert group sizes
instead of a capacity. Under expert parallelism (a mesh whose ``expert`` axis is larger than one)
the layer runs inside ``shard_map``: the per-expert counts go through an ``all_to_all`` first, then
the rows travel in an ``all_to_all`` of buffers padded to the worst case (all of a device's
assignments going to one expert shard), are re-sorted by local expert, run through the local
experts, and return the same way. ``jax.lax.ragged_all_to_all`` would move only the real rows, but
XLA:CPU does not implement it (``UNIMPLEMENTED: HLO opcode ragged-all-to-all``, jax 0.10.2), so
the padded exchange is used on every backend.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lifelong_moe_jax.layers.routing import SortedRouting

Array = jax.Array


def _rows(x: Array, index: Array) -> Array:
  """x [N, D] rows at ``index`` [...] (out-of-range indices give zero rows)."""
  return x.at[index].get(mode="fill", fill_value=0)


def gather_to_buffers(xg: Array, routed: SortedRouting, capacity: int) -> Array:
  """Fills the expert buffers.

  Args:
    xg: tokens [G, S, embed].
    routed: capacity-based SortedRouting of these groups.
    capacity: C.
  Returns:
    [G, E, C, embed]; slot ``c`` of expert ``e`` holds the token of the expert's ``c``-th
    assignment in priority order (zeros for empty slots).
  """
  _, size, _ = xg.shape
  c = jnp.arange(capacity, dtype=jnp.int32)
  position = routed.expert_start[:, :, None] + c  # [G, E, C] into sorted_assignments
  filled = c < jnp.minimum(routed.expert_count, capacity)[:, :, None]
  assignment = jnp.take_along_axis(
    routed.sorted_assignments,
    jnp.minimum(position, routed.sorted_assignments.shape[1] - 1).reshape(position.shape[0], -1),
    axis=1,
  ).reshape(position.shape)
  token = jnp.where(filled, assignment % size, size)  # size = out of range -> zero row
  return jax.vmap(_rows)(xg, token)


def combine_from_buffers(expert_out: Array, routed: SortedRouting, dtype) -> Array:
  """Weighted sum of every token's expert results.

  Args:
    expert_out: [G, E, C, embed] expert outputs in buffer layout.
    routed: the SortedRouting used by ``gather_to_buffers``.
    dtype: activation dtype of the gates.
  Returns:
    [G, S, embed]; dropped assignments and padding tokens contribute zero.
  """
  groups, num_experts, capacity, embed = expert_out.shape
  flat = expert_out.reshape(groups, num_experts * capacity, embed)
  index = jnp.where(
    routed.kept, routed.expert_index * capacity + routed.slot, num_experts * capacity
  )  # [G, S, K]
  picked = jax.vmap(_rows)(flat, index)  # [G, S, K, embed]
  gates = jnp.where(routed.kept, routed.expert_gate, 0.0).astype(dtype)
  return jnp.einsum("gsk,gskd->gsd", gates, picked)


def _grouped_ffn(
  rows: Array,
  group_sizes: Array,
  wi: Array,
  wg: Array | None,
  wo: Array,
  activation: Callable[[Array], Array],
  dtype,
) -> Array:
  """Experts as grouped matmuls: rows [M, embed] sorted by expert, group_sizes [E] -> [M, embed]."""
  rows = rows.astype(dtype)
  hidden = jax.lax.ragged_dot(rows, wi.astype(dtype), group_sizes)
  if wg is not None:
    hidden = activation(jax.lax.ragged_dot(rows, wg.astype(dtype), group_sizes)) * hidden
  else:
    hidden = activation(hidden)
  return jax.lax.ragged_dot(hidden, wo.astype(dtype), group_sizes)


def _sort_by_expert(experts: Array, num_experts: int):
  """experts int [A] (num_experts = not routed) -> (order [A], counts int32 [E], starts [E])."""
  order = jnp.argsort(experts, stable=True).astype(jnp.int32)
  counts = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.int32), axis=0)
  starts = jnp.cumsum(counts) - counts
  return order, counts, starts


def _ragged_local(
  x: Array,
  index: Array,
  gates: Array,
  mask: Array,
  wi: Array,
  wg: Array | None,
  wo: Array,
  *,
  activation,
  dtype,
  expert_axis: str | None,
  model_axis: str | None,
) -> Array:
  """Dropless experts on one device's tokens (the shard_map body when axes are given).

  Args:
    x: [B, L, embed] tokens of this device.
    index: int32 [B, L, K] chosen experts (global ids); gates: [B, L, K]; mask: bool [B, L].
    wi, wg, wo: this device's expert weights [E_local, embed, mlp_local] (wi, wg) and
      [E_local, mlp_local, embed] (wo).
    activation, dtype: expert activation and activation dtype.
    expert_axis: mesh axis the experts are split over (None: all experts are local).
    model_axis: mesh axis the mlp dimension is split over (None: not split).
  Returns:
    [B, L, embed].
  """
  batch, length, embed = x.shape
  top_k = index.shape[-1]
  tokens = x.reshape(batch * length, embed)
  local_experts = wi.shape[0]
  shards = jax.lax.axis_size(expert_axis) if expert_axis else 1
  num_experts = local_experts * shards
  valid = jnp.broadcast_to(mask.reshape(-1, 1), (batch * length, top_k)).reshape(-1)
  experts = jnp.where(valid, index.reshape(-1), num_experts)  # [A], assignment a = t * K + k
  num = experts.shape[0]
  order, counts, starts = _sort_by_expert(experts, num_experts)
  rows = _rows(tokens, order // top_k)  # [A, embed] sorted by expert (unrouted rows last)

  if shards == 1:
    out = _grouped_ffn(rows, counts, wi, wg, wo, activation, dtype)
  else:
    # Per destination shard: a contiguous run of the sorted rows, padded to A rows.
    shard_counts = counts.reshape(shards, local_experts)
    send_n = jnp.sum(shard_counts, axis=1)  # [shards]
    send_start = starts.reshape(shards, local_experts)[:, 0]
    j = jnp.arange(num, dtype=jnp.int32)
    send_idx = jnp.where(j < send_n[:, None], send_start[:, None] + j, num)  # [shards, A]
    send = _rows(rows, send_idx)  # [shards, A, embed]
    recv = jax.lax.all_to_all(send, expert_axis, 0, 0)  # [src, A, embed]
    recv_counts = jax.lax.all_to_all(shard_counts, expert_axis, 0, 0)  # [src, E_local]
    # Regroup the received rows by local expert (source-major within each expert).
    bounds = jnp.cumsum(recv_counts, axis=1)  # [src, E_local]
    local = jax.vmap(lambda b: jnp.searchsorted(b, j, side="right"))(bounds)  # [src, A]
    local_order, group_sizes, _ = _sort_by_expert(local.reshape(-1), local_experts)
    grouped = _rows(recv.reshape(shards * num, embed), local_order)
    result = _grouped_ffn(grouped, group_sizes, wi, wg, wo, activation, dtype)
    back = jnp.zeros_like(result).at[local_order].set(result).reshape(shards, num, embed)
    if model_axis:
      back = jax.lax.psum(back, model_axis)
    returned = jax.lax.all_to_all(back, expert_axis, 0, 0).reshape(shards * num, embed)
    dest = jnp.minimum(experts[order], num_experts - 1) // local_experts  # [A] sorted rows
    out = _rows(
      returned, jnp.where(j < jnp.sum(counts), dest * num + j - send_start[dest], shards * num)
    )
    model_axis = None  # already summed
  if model_axis:
    out = jax.lax.psum(out, model_axis)
  unsorted = jnp.zeros_like(out).at[order].set(out).reshape(batch * length, top_k, embed)
  weights = jnp.where(valid.reshape(-1, top_k), gates.reshape(-1, top_k), 0.0).astype(out.dtype)
  return jnp.einsum("tk,tkd->td", weights, unsorted).reshape(batch, length, embed)


def _mesh_axes(logical: str) -> tuple[str, ...]:
  """Mesh axes a logical axis maps to under the active flax logical-axis rules."""
  spec = nn.logical_to_mesh_axes((logical,))
  axes = spec[0] if spec is not None and len(spec) else None
  if axes is None:
    return ()
  return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def ragged_moe(
  x: Array,
  index: Array,
  gates: Array,
  mask: Array,
  wi: Array,
  wg: Array | None,
  wo: Array,
  *,
  activation,
  dtype,
) -> Array:
  """Dropless MoE feed-forward with grouped matmuls.

  Without an active mesh (``jax.set_mesh``), or when the batch does not split over the ``batch``
  mesh axes (a batch-1 init), the computation is written for one device; otherwise it runs in
  ``shard_map`` with tokens split like ``batch``, experts like ``expert`` and
  the mlp dimension like ``mlp`` (the flax logical-axis rules in effect).

  Args:
    x: tokens [batch, length, embed].
    index: int32 [batch, length, K] chosen experts; gates: [batch, length, K]; mask: bool
      [batch, length] (False = padding, not routed).
    wi, wg, wo: expert weights [E, embed, mlp] (wg may be None) and [E, mlp, embed].
    activation: elementwise activation; dtype: activation dtype.
  Returns:
    [batch, length, embed].
  """
  mesh = jax.sharding.get_abstract_mesh()
  body = lambda *a, **kw: _ragged_local(*a, activation=activation, dtype=dtype, **kw)
  if mesh.empty or all(size == 1 for size in mesh.shape.values()):
    return body(x, index, gates, mask, wi, wg, wo, expert_axis=None, model_axis=None)
  batch_axes = _mesh_axes("batch")
  expert_axes = _mesh_axes("expert")
  model_axes = _mesh_axes("mlp")
  batch_shards = 1
  for axis in batch_axes:
    batch_shards *= mesh.shape[axis]
  if x.shape[0] % batch_shards:  # e.g. a batch-1 init under a mesh: let the partitioner decide
    return body(x, index, gates, mask, wi, wg, wo, expert_axis=None, model_axis=None)
  if len(expert_axes) > 1 or len(model_axes) > 1:
    raise ValueError(
      f"The ragged dispatch supports one mesh axis for 'expert' and for 'mlp'; the "
      f"logical rules map them to {expert_axes} and {model_axes}."
    )
  expert_axis = expert_axes[0] if expert_axes and mesh.shape[expert_axes[0]] > 1 else None
  model_axis = model_axes[0] if model_axes else None  # psum even at size 1: marks it replicated
  tok = P(batch_axes or None)
  w_in = P(expert_axes[0] if expert_axes else None, None, model_axes[0] if model_axes else None)
  w_out = P(w_in[0], w_in[2], None)
  fn = jax.shard_map(
    lambda x, i, g, m, wi, wg, wo: body(
      x, i, g, m, wi, wg, wo, expert_axis=expert_axis, model_axis=model_axis
    ),
    mesh=mesh,
    in_specs=(tok, tok, tok, tok, w_in, None if wg is None else w_in, w_out),
    out_specs=tok,
  )
  return fn(x, index, gates, mask, wi, wg, wo)
