"""Token-choice top-k routing (GShard / Switch / GLaM style).

Tokens are routed in groups: ``[groups, group_size, embed]``. Each token picks its ``k`` highest
router probabilities (float32 softmax). Expert buffers hold ``capacity`` slots per group; slots are
filled in priority order "all first choices of the group, in token order, then all second
choices, ...", so a token's top-1 choice is never displaced by another token's top-2. Assignments
that find their expert full are dropped (the residual connection carries the token) and counted.

With ``batch_prioritized`` (V-MoE's batch prioritized routing), the tokens of a group are taken in
order of decreasing top-1 router probability instead of position order (choice rank still comes
first), so confident tokens keep their slots when an expert overflows.

Two outputs describe the same routing:
  ``route_top_k`` (the ``"einsum"`` dispatch), one-hot tensors (G groups, S tokens per group,
    E experts, C capacity, K = top_k):
      dispatch_mask   bool    [G, S, E, C]  1 where token s occupies slot c of expert e
      combine_weights float32 [G, S, E, C]  gate value at the same places, 0 elsewhere
  ``route_top_k_sorted`` (the ``"sort"`` and ``"ragged"`` dispatches), index form without any
    ``[G, S, E, C]`` tensor: assignments sorted by (expert, priority) and each assignment's slot.
Both give identical slots, drops and statistics (the statistics are sums of exact integers).
"""

from __future__ import annotations

import math

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
    top1_fraction: float32 [E] fraction of routed tokens whose first choice is each expert
      (pre-capacity, padding excluded; sums to 1 when any token is routed).
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
  top1_fraction: Array


def _top_k_choices(
  router_logits: Array, top_k: int, token_mask: Array | None, normalize_gates: bool
):
  """float32 logits [G,S,E], mask [G,S] (float), probs [G,S,E], gates [G,S,K], index [G,S,K]."""
  logits = router_logits.astype(jnp.float32)
  groups, size, _ = logits.shape
  if token_mask is None:
    token_mask = jnp.ones((groups, size), bool)
  mask = token_mask.astype(jnp.float32)  # [G, S]
  probs = jax.nn.softmax(logits, axis=-1)  # [G, S, E]
  gates, index = jax.lax.top_k(probs, top_k)  # [G, S, K]
  if normalize_gates:
    gates = gates / jnp.maximum(jnp.sum(gates, axis=-1, keepdims=True), 1e-9)
  return logits, mask, probs, gates, index


def token_priority_order(probs: Array, token_mask: Array) -> Array:
  """Batch-prioritized order: int32 [G, S] token indices by decreasing top-1 probability.

  Args:
    probs: float32 router probabilities [G, S, E].
    token_mask: float or bool [G, S]; padding tokens go last.
  Returns:
    int32 [G, S]; ties keep position order (stable sort).
  """
  score = jnp.where(token_mask > 0, jnp.max(probs, axis=-1), -1.0)
  return jnp.argsort(-score, axis=-1, stable=True).astype(jnp.int32)


def _routing_stats(
  logits: Array,
  probs: Array,
  mask: Array,
  counts: Array,
  kept_counts: Array,
  top_k: int,
  top1_counts: Array,
) -> dict[str, Array]:
  """Losses and statistics shared by every dispatch.

  Args:
    logits, probs: float32 [G, S, E].
    mask: float32 [G, S] token mask.
    counts: float32 [G, E] (token, choice) assignments per expert before capacity.
    kept_counts: float32 [E] assignments each expert processes (after capacity).
    top_k: experts per token.
    top1_counts: float32 [E] routed tokens whose first choice is each expert.
  """
  num_experts = logits.shape[-1]
  tokens_per_group = jnp.maximum(jnp.sum(mask, axis=1), 1.0)  # [G]
  frac_per_group = counts / (tokens_per_group[:, None] * top_k)  # [G, E]
  prob_per_group = jnp.sum(probs * mask[..., None], axis=1) / tokens_per_group[:, None]  # [G, E]
  aux_loss = num_experts * jnp.mean(jnp.sum(frac_per_group * prob_per_group, axis=-1))

  total_tokens = jnp.maximum(jnp.sum(mask), 1.0)
  z = jax.nn.logsumexp(logits, axis=-1)  # [G, S]
  z_loss = jnp.sum(z * z * mask) / total_tokens

  assignments = jnp.sum(counts, axis=0)  # [E]
  total_assignments = jnp.maximum(jnp.sum(assignments), 1.0)
  dropped = 1.0 - jnp.sum(kept_counts) / total_assignments
  return dict(
    aux_loss=aux_loss,
    z_loss=z_loss,
    expert_fraction=assignments / total_assignments,
    tokens_per_expert=kept_counts,
    dropped_fraction=jnp.where(jnp.sum(mask) > 0, dropped, 0.0),
    top1_fraction=top1_counts / total_tokens,
  )


def route_top_k(
  router_logits: Array,
  *,
  top_k: int,
  capacity: int,
  token_mask: Array | None = None,
  normalize_gates: bool = True,
  batch_prioritized: bool = False,
) -> RoutingResult:
  """Computes top-k token-choice routing from router logits (one-hot dispatch/combine form).

  Args:
    router_logits: [G, S, E] (cast to float32).
    top_k: experts per token.
    capacity: slots per expert per group.
    token_mask: optional bool [G, S]; False tokens (padding) are not routed and do not enter the
      losses or statistics.
    normalize_gates: renormalise the k gates of a token to sum to one.
    batch_prioritized: fill slots in order of decreasing top-1 probability instead of position.
  Returns:
    RoutingResult.
  """
  logits, mask, probs, gates, index = _top_k_choices(
    router_logits, top_k, token_mask, normalize_gates
  )
  groups, size, num_experts = logits.shape

  choice = (
    jax.nn.one_hot(index, num_experts, dtype=jnp.float32) * mask[:, :, None, None]
  )  # [G,S,K,E]
  ordered = choice
  if batch_prioritized:
    order = token_priority_order(probs, mask)  # [G, S]
    ordered = jnp.take_along_axis(choice, order[:, :, None, None], axis=1)
  # Priority order: choice rank first, then token position (or top-1 probability).
  by_rank = jnp.swapaxes(ordered, 1, 2).reshape(groups, top_k * size, num_experts)  # [G, K*S, E]
  slot = jnp.cumsum(by_rank, axis=1) - 1.0
  slot = jnp.sum(slot * by_rank, axis=-1)  # [G, K*S]
  assigned = jnp.sum(by_rank, axis=-1) > 0  # [G, K*S]
  kept = assigned & (slot < capacity)
  slot = jnp.swapaxes(slot.reshape(groups, top_k, size), 1, 2)  # [G, S, K]
  kept = jnp.swapaxes(kept.reshape(groups, top_k, size), 1, 2)  # [G, S, K]
  if batch_prioritized:
    inverse = jnp.argsort(order, axis=-1)[:, :, None]  # position of each token in the order
    slot = jnp.take_along_axis(slot, inverse, axis=1)
    kept = jnp.take_along_axis(kept, inverse, axis=1)

  kept_choice = choice * kept[..., None].astype(jnp.float32)  # [G, S, K, E]
  slot_onehot = jax.nn.one_hot(slot.astype(jnp.int32), capacity, dtype=jnp.float32)  # [G,S,K,C]
  dispatch = jnp.einsum("gske,gskc->gsec", kept_choice, slot_onehot)
  combine = jnp.einsum("gske,gskc,gsk->gsec", kept_choice, slot_onehot, gates)

  stats = _routing_stats(
    logits,
    probs,
    mask,
    jnp.sum(choice, axis=(1, 2)),
    jnp.sum(kept_choice, axis=(0, 1, 2)),
    top_k,
    jnp.sum(choice[:, :, 0], axis=(0, 1)),
  )
  return RoutingResult(
    dispatch_mask=dispatch.astype(bool),
    combine_weights=combine,
    expert_index=index,
    expert_gate=gates,
    **stats,
  )


@flax.struct.dataclass
class SortedRouting:
  """Routing in index form (no ``[G, S, E, C]`` tensor); used by the "sort" and "ragged" paths.

  An assignment is one (token, choice) pair, numbered ``a = k * S + s`` within its group.

  Attributes:
    expert_index: int32 [G, S, K] experts chosen by each token (before capacity).
    expert_gate: float32 [G, S, K] their gates (after optional renormalisation).
    token_mask: bool [G, S] (False = padding, never routed).
    sorted_assignments: int32 [G, K*S] assignment ids sorted by (expert, priority); padding
      tokens' assignments come last.
    expert_start: int32 [G, E] position in ``sorted_assignments`` of each expert's first one.
    expert_count: int32 [G, E] assignments per expert before capacity.
    slot: int32 [G, S, K] rank of the assignment among its expert's assignments in priority order
      (the buffer slot when it is below capacity).
    kept: bool [G, S, K] routed and within capacity (all routed assignments when dropless).
    aux_loss, z_loss, expert_fraction, tokens_per_expert, dropped_fraction, top1_fraction: as in
      RoutingResult.
  """

  expert_index: Array
  expert_gate: Array
  token_mask: Array
  sorted_assignments: Array
  expert_start: Array
  expert_count: Array
  slot: Array
  kept: Array
  aux_loss: Array
  z_loss: Array
  expert_fraction: Array
  tokens_per_expert: Array
  dropped_fraction: Array
  top1_fraction: Array


def route_top_k_sorted(
  router_logits: Array,
  *,
  top_k: int,
  capacity: int | None,
  token_mask: Array | None = None,
  normalize_gates: bool = True,
  batch_prioritized: bool = False,
) -> SortedRouting:
  """``route_top_k``'s routing by sorting assignments instead of one-hot cumulative sums.

  Slots, drops and statistics equal ``route_top_k``'s: priority is choice rank first, then token
  position (or decreasing top-1 probability with ``batch_prioritized``). Cost
  ``O(S*K*log(S*K) + S*K*E)`` per group, independent of the capacity.

  Args:
    router_logits: [G, S, E] (cast to float32).
    top_k: experts per token.
    capacity: slots per expert per group, or None for dropless routing (nothing is dropped).
    token_mask: optional bool [G, S]; False tokens are not routed and not counted.
    normalize_gates: renormalise the k gates of a token to sum to one.
    batch_prioritized: batch-prioritized priority order (ignored when dropless).
  Returns:
    SortedRouting.
  """
  logits, mask, probs, gates, index = _top_k_choices(
    router_logits, top_k, token_mask, normalize_gates
  )
  groups, size, num_experts = logits.shape
  valid = mask > 0  # [G, S]
  if batch_prioritized and capacity is not None:
    rank = jnp.argsort(token_priority_order(probs, mask), axis=-1).astype(jnp.int32)  # [G, S]
  else:
    rank = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (groups, size))
  experts = jnp.where(valid[:, None, :], jnp.swapaxes(index, 1, 2), num_experts)  # [G, K, S]
  priority = jnp.arange(top_k, dtype=jnp.int32)[None, :, None] * size + rank[:, None, :]
  key = (experts * (top_k * size) + priority).reshape(groups, top_k * size)  # unique per group
  sorted_assignments = jnp.argsort(key, axis=-1).astype(jnp.int32)  # [G, K*S]
  position = jnp.argsort(sorted_assignments, axis=-1).astype(jnp.int32)  # inverse permutation

  choice = jax.nn.one_hot(index, num_experts, dtype=jnp.float32) * mask[:, :, None, None]
  counts = jnp.sum(choice, axis=(1, 2))  # [G, E], exact integers
  expert_count = counts.astype(jnp.int32)
  expert_start = jnp.cumsum(expert_count, axis=-1) - expert_count
  start = jnp.take_along_axis(
    expert_start, jnp.minimum(experts, num_experts - 1).reshape(groups, top_k * size), axis=-1
  )
  slot = jnp.swapaxes((position - start).reshape(groups, top_k, size), 1, 2)  # [G, S, K]
  kept = jnp.broadcast_to(valid[:, :, None], slot.shape)
  kept_counts = counts
  if capacity is not None:
    kept = kept & (slot < capacity)
    kept_counts = jnp.minimum(counts, float(capacity))
  stats = _routing_stats(
    logits,
    probs,
    mask,
    counts,
    jnp.sum(kept_counts, axis=0),
    top_k,
    jnp.sum(choice[:, :, 0], axis=(0, 1)),
  )
  return SortedRouting(
    expert_index=index,
    expert_gate=gates,
    token_mask=valid,
    sorted_assignments=sorted_assignments,
    expert_start=expert_start,
    expert_count=expert_count,
    slot=slot,
    kept=kept,
    **stats,
  )


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
  def __call__(
    self,
    x: Array,
    *,
    capacity: int | None,
    token_mask: Array | None = None,
    train: bool = False,
    sorted_form: bool = False,
    batch_prioritized: bool = False,
  ) -> RoutingResult | SortedRouting:
    """Routes token groups.

    Args:
      x: [G, S, embed].
      capacity: slots per expert per group (None: dropless, only with ``sorted_form``).
      token_mask: bool [G, S] or None.
      train: training mode (jitter).
      sorted_form: return ``route_top_k_sorted``'s SortedRouting instead of one-hot tensors.
      batch_prioritized: batch-prioritized slot filling.
    Returns:
      RoutingResult, or SortedRouting with ``sorted_form``.
    """
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"), ("embed", "expert")
      ),
      (x.shape[-1], self.num_experts),
      jnp.float32,
    )
    x = x.astype(jnp.float32)
    if train and self.jitter > 0:
      noise = jax.random.uniform(
        self.make_rng("jitter"), x.shape, jnp.float32, 1.0 - self.jitter, 1.0 + self.jitter
      )
      x = x * noise
    logits = jnp.einsum("gsd,de->gse", x, kernel)
    route = route_top_k_sorted if sorted_form else route_top_k
    return route(
      logits,
      top_k=self.top_k,
      capacity=capacity,
      token_mask=token_mask,
      normalize_gates=self.normalize_gates,
      batch_prioritized=batch_prioritized,
    )
