"""Evaluation after a lifelong phase: validation loss/perplexity and expert usage per distribution.

For every task, one deterministic pass over its ``validation`` split (packed, unshuffled, at most
``max_batches`` global batches) computes, in the same jitted forward pass:

* ``loss`` (mean negative log-likelihood per target token), ``perplexity = exp(loss)``,
  ``accuracy`` (argmax hits), ``num_tokens``;
* for MoE models ``expert_usage [num_moe_layers][num_experts]``: the fraction of the task's routing
  assignments (token x top-k choice, before capacity) that went to each expert, per MoE layer
  (rows sum to 1) — the model's ``expert_fraction`` statistic weighted by each batch's routed
  tokens; ``expert_usage_top1 [num_moe_layers][num_experts]``: the same for the tokens' first
  choices only (``top1_fraction``); and ``dropped_fraction [num_moe_layers]`` (assignments over
  capacity, eval factor).

Batches are placed on the mesh like training batches; params stay sharded.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lifelong_moe_jax import partitioning
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.eval import loss_eval
from lifelong_moe_jax.training import losses

PyTree = Any


def eval_sums(
  model: lm.LanguageModel, params: PyTree, batch: Mapping[str, jax.Array]
) -> dict[str, jax.Array]:
  """Sums over one batch (eval mode): nll, correct, weight, and per-layer routing usage."""
  logits, intermediates, _ = model.apply(params, batch)
  out = losses.token_sums(logits, batch)
  moe = lm.collect_moe_stats(intermediates, model.config, lm.ROUTING_STATS)
  if moe:
    routed = jnp.sum(lm.token_mask_of(batch).astype(jnp.float32))
    out["usage_sum"] = moe["expert_fraction"].astype(jnp.float32) * routed  # [M, E]
    out["top1_sum"] = moe["top1_fraction"].astype(jnp.float32) * routed  # [M, E]
    out["dropped_sum"] = moe["dropped_fraction"].astype(jnp.float32) * routed  # [M]
    out["routed_sum"] = routed
  return out


class PhaseEvaluator(loss_eval.Evaluator):
  """Per-task loss, perplexity and expert usage of params on one mesh: ``loss_eval.Evaluator``
  (same arguments, including ``batch_cache`` and ``data_shards``) with ``eval_sums`` per batch."""

  def __init__(
    self,
    model: lm.LanguageModel,
    partitioner: partitioning.Partitioner,
    task_names: Sequence[str],
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    *,
    max_batches: int | None = None,
    data_dir: str | None = None,
    batch_cache: dict | None = None,
    data_shards: int | None = None,
  ):
    super().__init__(
      model,
      partitioner,
      task_names,
      task_feature_lengths,
      batch_size,
      max_batches=max_batches,
      data_dir=data_dir,
      sums_fn=eval_sums,
      batch_cache=batch_cache,
      data_shards=data_shards,
    )

  def evaluate_task(self, params: PyTree, task: str) -> dict[str, Any]:
    """Metrics of one task on its validation split (see the module docstring)."""
    totals, count = self.task_sums(params, task, limit=self.max_batches)
    result: dict[str, Any] = dict(
      loss_eval.loss_metrics(totals), num_tokens=int(totals["weight_sum"]), num_batches=count
    )
    if "usage_sum" in totals:
      usage, dropped = _routing_fractions(totals)
      result["expert_usage"] = [[float(x) for x in row] for row in usage]
      top1 = totals["top1_sum"] / max(float(totals["routed_sum"]), 1.0)
      result["expert_usage_top1"] = [[float(x) for x in row] for row in top1]
      result["dropped_fraction"] = [float(x) for x in dropped]
    return result

  def expert_usage(self, params: PyTree, mixture: str, num_batches: int) -> np.ndarray:
    """``[num_moe_layers, E]`` routing fractions on the first ``num_batches`` train batches of a
    task or mixture (unshuffled): the usage that ``surgery``'s ``source_experts`` ranks."""
    totals, _ = self.task_sums(params, mixture, split="train", limit=num_batches)
    if "usage_sum" not in totals:
      raise ValueError("expert_usage needs an MoE model.")
    return _routing_fractions(totals)[0]


def _routing_fractions(totals: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(usage [M, E], dropped [M]) per routed token from ``eval_sums`` totals."""
  routed = max(float(totals["routed_sum"]), 1.0)
  return totals["usage_sum"] / routed, totals["dropped_sum"] / routed
