"""Token-choice top-k routing (GShard / Switch / GLaM style).

Tokens are routed in groups: ``[groups, group_size, embed]``. Each token picks its ``k`` highest
router probabilities (float32 softmax). Expert buffers hold ``capacity`` slots per group; slots are
filled in priority order "all first choices of the group, in token order, then all second
choices, ...", so a token's top-1 choice is never displaced by another token's top-2. Assignments
that find their expert full are dropped (the residual connection carries the token) and counted.

Shapes (G groups, S tokens per group, E experts, C capacity, K = top_k):
  dispatch_mask   bool    [G, S, E, C]  1 where token s occupies slot c of expert e
  combine_weights float32 [G, S, E, C]  gate value at the same places, 0 elsewhere
"""
from __future__ import annotations

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def expert_capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """Slots per expert per group: ``ceil(capacity_factor * k * group_size / num_experts)``."""
  return max(1, int(math.ceil(capacity_factor * top_k * group_size / num_experts)))


@flax.struct.dataclass
class RoutingResult:
  """Output of routing one batch of token groups.

  Attributes:
    dispatch_mask: bool [G, S, E, C].
    combine_weights: float32 [G, S, E, C].
    expert_index: int32 [G, S, K] experts chosen by each token (before capacity).
    expert_gate: float32 [G, S, K] gates of the chosen experts (after optional renormalisation).
    aux_loss: float32 [] load-balancing loss ``E * sum_e f_e * p_e`` averaged over groups, where
      ``f_e`` is the fraction of the group's (token, choice) assignments that chose expert e and
      ``p_e`` the mean router probability of e (1.0 when perfectly balanced).
    z_loss: float32 [] ``mean(logsumexp(logits)^2)`` over routed tokens.
    expert_fraction: float32 [E] fraction of all assignments that chose each expert (pre-capacity).
    tokens_per_expert: float32 [E] assignments each expert actually processes (post-capacity).
    dropped_fraction: float32 [] fraction of assignments dropped because an expert was full.
  """
  dispatch_mask: Array
  combine_weights: Array
  expert_index: Array
  expert_gate: Array
  aux_loss: Array
  z_loss: Array
  expert_fraction: Array
  tokens_per_expert: Array
  dropped_fraction: Array


def route_top_k(router_logits: Array, *, top_k: int, capacity: int, token_mask: Array | None = None,
                normalize_gates: bool = True) -> RoutingResult:
  """Computes top-k token-choice routing from router logits.

  Args:
    router_logits: [G, S, E] (cast to float32).
    top_k: experts per token.
    capacity: slots per expert per group.
    token_mask: optional bool [G, S]; False tokens (padding) are not routed and do not enter the
      losses or statistics.
    normalize_gates: renormalise the k gates of a token to sum to one.
  Returns:
    RoutingResult.
  """
  logits = router_logits.astype(jnp.float32)
  groups, size, num_experts = logits.shape
  if token_mask is None:
    token_mask = jnp.ones((groups, size), bool)
  mask = token_mask.astype(jnp.float32)  # [G, S]
  probs = jax.nn.softmax(logits, axis=-1)  # [G, S, E]
  gates, index = jax.lax.top_k(probs, top_k)  # [G, S, K]
  if normalize_gates:
    gates = gates / jnp.maximum(jnp.sum(gates, axis=-1, keepdims=True), 1e-9)

  choice = jax.nn.one_hot(index, num_experts, dtype=jnp.float32) * mask[:, :, None, None]  # [G,S,K,E]
  # Priority order: choice rank first, then token position.
  by_rank = jnp.swapaxes(choice, 1, 2).reshape(groups, top_k * size, num_experts)  # [G, K*S, E]
  slot = jnp.cumsum(by_rank, axis=1) - 1.0
  slot = jnp.sum(slot * by_rank, axis=-1)  # [G, K*S]
  assigned = jnp.sum(by_rank, axis=-1) > 0  # [G, K*S]
  kept = assigned & (slot < capacity)
  slot = jnp.swapaxes(slot.reshape(groups, top_k, size), 1, 2)  # [G, S, K]
  kept = jnp.swapaxes(kept.reshape(groups, top_k, size), 1, 2)  # [G, S, K]

  kept_choice = choice * kept[..., None].astype(jnp.float32)  # [G, S, K, E]
  slot_onehot = jax.nn.one_hot(slot.astype(jnp.int32), capacity, dtype=jnp.float32)  # [G,S,K,C]
  dispatch = jnp.einsum("gske,gskc->gsec", kept_choice, slot_onehot)
  combine = jnp.einsum("gske,gskc,gsk->gsec", kept_choice, slot_onehot, gates)

  tokens_per_group = jnp.maximum(jnp.sum(mask, axis=1), 1.0)  # [G]
  frac_per_group = jnp.sum(choice, axis=(1, 2)) / (tokens_per_group[:, None] * top_k)  # [G, E]
  prob_per_group = jnp.sum(probs * mask[..., None], axis=1) / tokens_per_group[:, None]  # [G, E]
  aux_loss = num_experts * jnp.mean(jnp.sum(frac_per_group * prob_per_group, axis=-1))

  total_tokens = jnp.maximum(jnp.sum(mask), 1.0)
  z = jax.nn.logsumexp(logits, axis=-1)  # [G, S]
  z_loss = jnp.sum(z * z * mask) / total_tokens

  assignments = jnp.sum(choice, axis=(0, 1, 2))  # [E]
  total_assignments = jnp.maximum(jnp.sum(assignments), 1.0)
  tokens_per_expert = jnp.sum(kept_choice, axis=(0, 1, 2))
  dropped = 1.0 - jnp.sum(tokens_per_expert) / total_assignments
  return RoutingResult(
      dispatch_mask=dispatch.astype(bool), combine_weights=combine, expert_index=index,
      expert_gate=gates, aux_loss=aux_loss, z_loss=z_loss,
      expert_fraction=assignments / total_assignments, tokens_per_expert=tokens_per_expert,
      dropped_fraction=jnp.where(jnp.sum(mask) > 0, dropped, 0.0))


class TopKRouter(nn.Module):
  """Router with kernel ``[embed, expert]`` (logical axes ``('embed', 'expert')``), no bias.

  Attributes:
    num_experts: E.
    top_k: experts per token.
    jitter: multiplicative uniform noise ``U(1-jitter, 1+jitter)`` on the router input in
      training (needs the ``jitter`` rng); 0 disables it.
    normalize_gates: renormalise the k gates of each token.
  """
  num_experts: int
  top_k: int = 2
  jitter: float = 0.0
  normalize_gates: bool = True

  @nn.compact
  def __call__(self, x: Array, *, capacity: int, token_mask: Array | None = None,
               train: bool = False) -> RoutingResult:
    """x: [G, S, embed]; token_mask: bool [G, S] or None."""
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                                     ("embed", "expert")),
        (x.shape[-1], self.num_experts), jnp.float32)
    x = x.astype(jnp.float32)
    if train and self.jitter > 0:
      noise = jax.random.uniform(self.make_rng("jitter"), x.shape, jnp.float32,
                                 1.0 - self.jitter, 1.0 + self.jitter)
      x = x * noise
    logits = jnp.einsum("gsd,de->gse", x, kernel)
    return route_top_k(logits, top_k=self.top_k, capacity=capacity, token_mask=token_mask,
                       normalize_gates=self.normalize_gates)
