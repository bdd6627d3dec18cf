"""Load balancing of the new data over the new experts only (``balance_new_experts_only``).

The model's load-balancing loss ``E * sum_e f_e p_e`` (per group, over all E experts; see
docs/architecture.md) is minimal when the new phase's tokens are spread evenly over *all* experts,
so on new data it pays the router to move traffic from the old experts onto the new, trainable
ones. ``NewExpertBalance`` replaces it, without changing the MoE layer, by a balance over the
phase's new experts ``[E_old, E)`` only:

    f'_e = f_e / sum_{new} f,   p'_e = p_e / sum_{new} p        (e in the new experts)
    new_balance = N * sum_{e new} f'_e p'_e                      (per group, mean over groups)

``f_e`` is the fraction of the group's (token, choice) top-k assignments that picked expert e and
``p_e`` its mean router probability over the group's real tokens, exactly as the layer computes
them (from the jitter-free router logits captured by ``models.router_probe``); a group that sends
nothing to the new experts contributes 0. The term balances traffic *within* the new experts and
gives no incentive to move traffic between old and new experts. The regularizer adds
``aux_loss_weight * (mean_layers(new_balance) - mean_layers(aux_loss))``: the subtraction cancels
the model's own all-expert term (the sown ``aux_loss``, the same traced value, so its gradient
cancels), so the total loss carries ``aux_loss_weight * new_balance`` in its place.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models import router_probe
from lifelong_moe_jax.models.config import ModelConfig

Array = jax.Array


def new_expert_balance_loss(
  router_logits: Array, token_mask: Array, num_old: int, top_k: int
) -> Array:
  """Per-layer balance of the assignments over the new experts.

  Args:
    router_logits: float32 ``[M, G, S, E]`` (``router_probe``).
    token_mask: ``[batch, length]`` real tokens (``G * S = batch * length``, token order).
    num_old: E_old; experts ``[E_old, E)`` are the new ones.
    top_k: the router's k.
  Returns:
    float32 ``[M]``: ``mean_g N * sum_{e new} f'_{g,e} p'_{g,e}`` (see the module docstring).
  """
  num_experts = router_logits.shape[-1]
  if not 0 < num_old < num_experts:
    raise ValueError(f"num_old must be in (0, {num_experts}), got {num_old}.")
  new = num_experts - num_old
  mask = token_mask.astype(jnp.float32).reshape(router_logits.shape[1:3])  # [G, S]
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [M, G, S, E]
  _, index = jax.lax.top_k(probs, top_k)  # [M, G, S, K]
  counts = jnp.sum(
    jax.nn.one_hot(index, num_experts) * mask[None, :, :, None, None], axis=(2, 3)
  )  # [M, G, E]
  counts = jax.lax.stop_gradient(counts[..., num_old:])  # [M, G, N]
  f = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
  p = jnp.sum(probs[..., num_old:] * mask[None, :, :, None], axis=2)  # [M, G, N]
  p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-9)
  return jnp.mean(new * jnp.sum(f * p, axis=-1), axis=-1)


class NewExpertBalance:
  """Regularizer replacing the all-expert load balance by one over the new experts.

  Args:
    config: the student model (E experts, ``aux_loss_weight``, ``top_k``, ``moe_every``).
    num_old: experts before this phase (E_old).
    name: the hook's name (metrics ``reg/<name>/new_balance``, ``reg/<name>/replaced_aux``).
  """

  uses_router_logits = True

  def __init__(self, config: ModelConfig, num_old: int, *, name: str = "new_expert_balance"):
    if not config.is_moe or not 0 < num_old < config.num_experts:
      raise ValueError(
        f"NewExpertBalance needs an MoE model with new experts: num_old={num_old}, "
        f"num_experts={config.num_experts}."
      )
    self.config = config
    self.num_old = int(num_old)
    self.name = name

  def init_state(self, ctx: Any) -> tuple[Any, Any]:
    del ctx
    return {}, {}

  def __call__(
    self,
    params: Any,
    batch: lm.Batch,
    student_logits: Array,
    aux_state: Any,
    rng: Array | None = None,
    intermediates: Any = None,
  ) -> tuple[Array, dict[str, Array]]:
    """``aux_loss_weight * (mean new_balance - mean aux_loss)`` and both means as metrics."""
    del params, student_logits, aux_state, rng
    if intermediates is None:
      raise ValueError(
        "NewExpertBalance needs the student's intermediates with router logits "
        "(training.losses.training_loss passes them)."
      )
    logits = router_probe.collect_router_stats(intermediates, self.config).get(
      router_probe.ROUTER_LOGITS
    )
    moe = lm.collect_moe_stats(intermediates, self.config)
    if logits is None or not moe:
      raise ValueError(
        "NewExpertBalance found no router logits / MoE statistics in the student's intermediates."
      )
    balance = jnp.mean(
      new_expert_balance_loss(logits, lm.token_mask_of(batch), self.num_old, self.config.top_k)
    )
    replaced = jnp.mean(moe["aux_loss"])
    term = self.config.aux_loss_weight * (balance - replaced)
    return term, {"new_balance": balance, "replaced_aux": replaced}
