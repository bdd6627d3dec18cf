"""Mixture-of-Experts feed-forward layer with expert parallelism.

Expert weights are stacked: ``wi [expert, embed, mlp]`` (and ``wi_gate`` when gated),
``wo [expert, mlp, embed]``. Tokens ``[batch, length, embed]`` are regrouped into
``[groups, group_size, embed]`` (groups sharded like the batch, over the ``data`` and ``expert``
mesh axes), dispatched into expert buffers ``[groups, expert, capacity, embed]``, and the buffers
are transposed to ``[expert, groups, capacity, embed]`` with the expert dimension on the ``expert``
mesh axis: XLA turns that re-sharding into an all-to-all. The expert matmuls run on merged
``[expert, groups * capacity, *]`` buffers (one batched matmul per weight, no transposed copy of
the hidden activations); the inverse all-to-all brings results back for the combine.

``dispatch`` selects how tokens reach the experts (params are identical for all three):
  ``"einsum"``: one-hot ``[G, S, E, C]`` dispatch/combine einsums (the reference).
  ``"sort"``: same routing, slots and drops, built by sorting and gathering (``dispatch.py``);
    dispatch/combine cost ``O(tokens * k * embed)`` and no ``[G, S, E, C]`` tensor.
  ``"ragged"``: dropless grouped matmuls (``jax.lax.ragged_dot``), no capacity.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lifelong_moe_jax.layers import dispatch as dispatch_lib
from lifelong_moe_jax.layers import routing
from lifelong_moe_jax.layers.dense import activation_fn

Array = jax.Array
DISPATCHES = ("einsum", "sort", "ragged")

# Fan-in is the embed (wi) or mlp (wo) axis; the leading expert axis is a batch axis.
expert_kernel_init = nn.initializers.variance_scaling(
  1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
)


def choose_group_size(num_tokens: int, max_group_size: int) -> int:
  """Largest divisor of ``num_tokens`` that is <= ``max_group_size``."""
  size = min(max_group_size, num_tokens)
  while num_tokens % size:
    size -= 1
  return size


class MoeLayer(nn.Module):
  """Top-k routed mixture of ``num_experts`` feed-forward experts.

  Routing statistics are sown into the ``intermediates`` collection (``aux_loss``, ``z_loss``,
  ``expert_fraction [E]``, ``tokens_per_expert [E]``, ``dropped_fraction``, ``top1_fraction [E]``)
  by every dispatch.

  Attributes:
    dispatch: "einsum", "sort" or "ragged" (see the module docstring).
    batch_prioritized: fill expert capacity in order of decreasing top-1 router probability
      (V-MoE) instead of token position; capacity-based dispatches only ("ragged" drops nothing).
  """

  num_experts: int
  mlp_dim: int
  top_k: int = 2
  group_size: int = 256
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  router_jitter: float = 0.0
  normalize_gates: bool = True
  activation: str = "gelu"
  gated: bool = False
  dtype: Any = jnp.float32
  dispatch: str = "einsum"
  batch_prioritized: bool = False

  def _experts(self, expert_in: Array, wi: Array, wg: Array | None, wo: Array) -> Array:
    """Expert FFNs on merged buffers: [E, G, C, embed] -> [E, G, C, embed]."""
    num_experts, groups, capacity, embed = expert_in.shape
    merged = expert_in.reshape(num_experts, groups * capacity, embed)
    merged = nn.with_logical_constraint(merged, ("expert", "expert_group", "embed"))
    hidden = jnp.einsum("end,edh->enh", merged, wi.astype(self.dtype))
    act = activation_fn(self.activation)
    if wg is not None:
      hidden = act(jnp.einsum("end,edh->enh", merged, wg.astype(self.dtype))) * hidden
    else:
      hidden = act(hidden)
    hidden = nn.with_logical_constraint(hidden, ("expert", "expert_group", "mlp"))
    out = jnp.einsum("enh,ehd->end", hidden, wo.astype(self.dtype))
    out = nn.with_logical_constraint(out, ("expert", "expert_group", "embed"))
    return out.reshape(num_experts, groups, capacity, embed)

  def _all_to_all_experts(self, dispatched: Array, wi: Array, wg: Array | None, wo: Array) -> Array:
    """[G, E, C, embed] buffers -> all-to-all -> experts -> all-to-all -> [G, E, C, embed]."""
    dispatched = nn.with_logical_constraint(
      dispatched, ("batch", "unmodeled", "expert_capacity", "embed")
    )
    # All-to-all: groups leave the expert mesh axis, experts move onto it.
    expert_in = jnp.swapaxes(dispatched, 0, 1)  # [E, G, C, D]
    expert_in = nn.with_logical_constraint(
      expert_in, ("expert", "expert_group", "expert_capacity", "embed")
    )
    expert_out = self._experts(expert_in, wi, wg, wo)
    expert_out = nn.with_logical_constraint(
      expert_out, ("expert", "expert_group", "expert_capacity", "embed")
    )
    # Inverse all-to-all back to token-group sharding.
    expert_out = jnp.swapaxes(expert_out, 0, 1)  # [G, E, C, D]
    return nn.with_logical_constraint(
      expert_out, ("batch", "unmodeled", "expert_capacity", "embed")
    )

  @nn.compact
  def __call__(self, x: Array, token_mask: Array | None = None, *, train: bool = False) -> Array:
    """x: [batch, length, embed]; token_mask: bool [batch, length] (False = padding) -> same shape."""
    if self.dispatch not in DISPATCHES:
      raise ValueError(f"MoeLayer.dispatch must be one of {DISPATCHES}, got {self.dispatch!r}.")
    batch, length, embed = x.shape
    num_tokens = batch * length
    group_size = choose_group_size(num_tokens, self.group_size)
    groups = num_tokens // group_size
    factor = self.train_capacity_factor if train else self.eval_capacity_factor
    capacity = routing.expert_capacity(group_size, self.num_experts, self.top_k, factor)

    xg = x.reshape(groups, group_size, embed)
    xg = nn.with_logical_constraint(xg, ("batch", "length", "embed"))
    mask = None if token_mask is None else token_mask.reshape(groups, group_size)
    router = routing.TopKRouter(
      self.num_experts, self.top_k, self.router_jitter, self.normalize_gates, name="router"
    )
    routed = router(
      xg,
      capacity=None if self.dispatch == "ragged" else capacity,
      token_mask=mask,
      train=train,
      sorted_form=self.dispatch != "einsum",
      batch_prioritized=self.batch_prioritized,
    )

    wi = self.param(
      "wi",
      nn.with_logical_partitioning(expert_kernel_init, ("expert", "embed", "mlp")),
      (self.num_experts, embed, self.mlp_dim),
      jnp.float32,
    )
    wg = None
    if self.gated:
      wg = self.param(
        "wi_gate",
        nn.with_logical_partitioning(expert_kernel_init, ("expert", "embed", "mlp")),
        (self.num_experts, embed, self.mlp_dim),
        jnp.float32,
      )
    wo = self.param(
      "wo",
      nn.with_logical_partitioning(expert_kernel_init, ("expert", "mlp", "embed")),
      (self.num_experts, self.mlp_dim, embed),
      jnp.float32,
    )

    if self.dispatch == "einsum":
      dispatch_mask = nn.with_logical_constraint(
        routed.dispatch_mask.astype(self.dtype), ("batch", "length", "unmodeled", "expert_capacity")
      )
      combine_weights = nn.with_logical_constraint(
        routed.combine_weights.astype(self.dtype),
        ("batch", "length", "unmodeled", "expert_capacity"),
      )
      dispatched = jnp.einsum("gsec,gsd->gecd", dispatch_mask, xg)
      expert_out = self._all_to_all_experts(dispatched, wi, wg, wo)
      combined = jnp.einsum("gsec,gecd->gsd", combine_weights, expert_out)
    elif self.dispatch == "sort":
      dispatched = dispatch_lib.gather_to_buffers(xg, routed, capacity)
      expert_out = self._all_to_all_experts(dispatched, wi, wg, wo)
      combined = dispatch_lib.combine_from_buffers(expert_out, routed, self.dtype)
    else:
      shape = (batch, length, self.top_k)
      combined = dispatch_lib.ragged_moe(
        x,
        routed.expert_index.reshape(shape),
        routed.expert_gate.reshape(shape),
        routed.token_mask.reshape(batch, length),
        wi,
        wg,
        wo,
        activation=activation_fn(self.activation),
        dtype=self.dtype,
      )

    for name in (
      "aux_loss",
      "z_loss",
      "expert_fraction",
      "tokens_per_expert",
      "dropped_fraction",
      "top1_fraction",
    ):
      self.sow("intermediates", name, getattr(routed, name))
    return combined.reshape(batch, length, embed)
