"""Mixture-of-Experts feed-forward layer with expert parallelism.

Expert weights are stacked: ``wi [expert, embed, mlp]`` (and ``wi_gate`` when gated),
``wo [expert, mlp, embed]``. Tokens ``[batch, length, embed]`` are regrouped into
``[groups, group_size, embed]`` (groups sharded like the batch, over the ``data`` and ``expert``
mesh axes), dispatched into expert buffers ``[groups, expert, capacity, embed]``, and the buffers
are transposed to ``[expert, groups, capacity, embed]`` with the expert dimension on the ``expert``
mesh axis: XLA turns that re-sharding into an all-to-all. Every expert runs as one einsum over its
slice of the stacked weights; the inverse all-to-all brings results back for the combine.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lifelong_moe_jax.layers import routing
from lifelong_moe_jax.layers.dense import activation_fn

Array = jax.Array

# Fan-in is the embed (wi) or mlp (wo) axis; the leading expert axis is a batch axis.
expert_kernel_init = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))


def choose_group_size(num_tokens: int, max_group_size: int) -> int:
  """Largest divisor of ``num_tokens`` that is <= ``max_group_size``."""
  size = min(max_group_size, num_tokens)
  while num_tokens % size:
    size -= 1
  return size


class MoeLayer(nn.Module):
  """Top-k routed mixture of ``num_experts`` feed-forward experts.

  Routing statistics are sown into the ``intermediates`` collection (``aux_loss``, ``z_loss``,
  ``expert_fraction [E]``, ``tokens_per_expert [E]``, ``dropped_fraction``).
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

  @nn.compact
  def __call__(self, x: Array, token_mask: Array | None = None, *, train: bool = False) -> Array:
    """x: [batch, length, embed]; token_mask: bool [batch, length] (False = padding) -> same shape."""
    batch, length, embed = x.shape
    num_tokens = batch * length
    group_size = choose_group_size(num_tokens, self.group_size)
    groups = num_tokens // group_size
    factor = self.train_capacity_factor if train else self.eval_capacity_factor
    capacity = routing.expert_capacity(group_size, self.num_experts, self.top_k, factor)

    xg = x.reshape(groups, group_size, embed)
    xg = nn.with_logical_constraint(xg, ("batch", "length", "embed"))
    mask = None if token_mask is None else token_mask.reshape(groups, group_size)
    routed = routing.TopKRouter(self.num_experts, self.top_k, self.router_jitter,
                                self.normalize_gates, name="router")(
                                    xg, capacity=capacity, token_mask=mask, train=train)

    dispatch_mask = nn.with_logical_constraint(
        routed.dispatch_mask.astype(self.dtype), ("batch", "length", "unmodeled", "expert_capacity"))
    combine_weights = nn.with_logical_constraint(
        routed.combine_weights.astype(self.dtype), ("batch", "length", "unmodeled", "expert_capacity"))
    dispatched = jnp.einsum("gsec,gsd->gecd", dispatch_mask, xg)
    dispatched = nn.with_logical_constraint(
        dispatched, ("batch", "unmodeled", "expert_capacity", "embed"))
    # All-to-all: groups leave the expert mesh axis, experts move onto it.
    expert_in = jnp.swapaxes(dispatched, 0, 1)  # [E, G, C, D]
    expert_in = nn.with_logical_constraint(
        expert_in, ("expert", "expert_group", "expert_capacity", "embed"))

    wi = self.param("wi", nn.with_logical_partitioning(expert_kernel_init, ("expert", "embed", "mlp")),
                    (self.num_experts, embed, self.mlp_dim), jnp.float32)
    hidden = jnp.einsum("egcd,edh->egch", expert_in, wi.astype(self.dtype))
    act = activation_fn(self.activation)
    if self.gated:
      wg = self.param("wi_gate",
                      nn.with_logical_partitioning(expert_kernel_init, ("expert", "embed", "mlp")),
                      (self.num_experts, embed, self.mlp_dim), jnp.float32)
      hidden = act(jnp.einsum("egcd,edh->egch", expert_in, wg.astype(self.dtype))) * hidden
    else:
      hidden = act(hidden)
    hidden = nn.with_logical_constraint(hidden, ("expert", "expert_group", "expert_capacity", "mlp"))
    wo = self.param("wo", nn.with_logical_partitioning(expert_kernel_init, ("expert", "mlp", "embed")),
                    (self.num_experts, self.mlp_dim, embed), jnp.float32)
    expert_out = jnp.einsum("egch,ehd->egcd", hidden, wo.astype(self.dtype))
    expert_out = nn.with_logical_constraint(
        expert_out, ("expert", "expert_group", "expert_capacity", "embed"))
    # Inverse all-to-all back to token-group sharding.
    expert_out = jnp.swapaxes(expert_out, 0, 1)  # [G, E, C, D]
    expert_out = nn.with_logical_constraint(
        expert_out, ("batch", "unmodeled", "expert_capacity", "embed"))
    combined = jnp.einsum("gsec,gecd->gsd", combine_weights, expert_out)

    for name in ("aux_loss", "z_loss", "expert_fraction", "tokens_per_expert", "dropped_fraction"):
      self.sow("intermediates", name, getattr(routed, name))
    return combined.reshape(batch, length, embed)
