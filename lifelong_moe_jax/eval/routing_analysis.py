"""Routing analysis: which lifelong phase's experts serve each distribution's tokens.

Every MoE layer sows, per batch, the fraction of routed tokens whose first choice is each expert
(``top1_fraction [E]``) and the fraction of (token, choice) assignments that chose each expert
(``expert_fraction [E]``), both before capacity and without padding tokens. Weighted by the
batch's routed tokens they give counts; summed over a distribution's validation batches and
divided by the total they give, per MoE layer, the share of the distribution's top-1 and top-k
assignments taken by each expert (``[M, E]``, rows sum to 1).

A ``PhaseRecord`` says which phase owns which expert slice (``expert_slices()``: ``{phase: (start,
end)}``). Summing the expert shares over each phase's slice gives, per layer, the share of the
distribution's assignments that went to the experts of each phase (``[M, P]``, rows sum to 1), and
the mean over layers. After phase ``i`` of a lifelong run this answers: how much old-distribution
traffic drifted to the experts added later, and how much of the new distribution the new experts
carry.

``routing_entry`` builds the JSON entry stored per distribution in a phase result::

    {"top1": {phase: share}, "topk": {phase: share},            # mean over MoE layers
     "per_layer": {"top1": [[share per phase] per layer], "topk": [[...]]},
     "phases": [phase names, in record order]}

``from_evaluation`` builds it from ``phase_eval.PhaseEvaluator`` results (``expert_usage`` and
``expert_usage_top1``), so the runner needs no extra pass; ``routing_counts`` / ``analyze`` count
directly on given batches.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lifelong_moe_jax.models import lm

PyTree = Any
Slices = Mapping[str, tuple[int, int] | list[int]]


def phase_shares(usage: Any, slices: Slices) -> np.ndarray:
  """Per-layer share of each phase's experts.

  Args:
    usage: ``[M, E]`` per-expert shares (or counts) of one distribution, per MoE layer.
    slices: ``{phase: (start, end)}`` half-open expert ranges covering ``[0, E)`` (record order).
  Returns:
    float64 ``[M, P]``: ``usage`` summed over each phase's slice, normalised per layer (rows sum
    to 1 unless a row is all zero).
  Raises:
    ValueError: the slices do not cover exactly the ``E`` experts.
  """
  usage = np.asarray(usage, np.float64)
  if usage.ndim != 2:
    raise ValueError(f"usage must be [num_moe_layers, num_experts], got shape {usage.shape}.")
  bounds = [(int(s), int(e)) for s, e in slices.values()]
  if not bounds or max(e for _, e in bounds) != usage.shape[1] or min(s for s, _ in bounds) != 0:
    raise ValueError(f"Expert slices {dict(slices)} do not cover the {usage.shape[1]} experts.")
  shares = np.stack([usage[:, s:e].sum(axis=1) for s, e in bounds], axis=1)  # [M, P]
  total = shares.sum(axis=1, keepdims=True)
  return np.divide(shares, total, out=np.zeros_like(shares), where=total > 0)


def routing_entry(top1: Any, topk: Any, slices: Slices) -> dict[str, Any]:
  """The JSON routing entry of one distribution (see the module docstring).

  Args:
    top1: ``[M, E]`` first-choice shares (or counts) per expert.
    topk: ``[M, E]`` top-k assignment shares (or counts) per expert.
    slices: ``{phase: (start, end)}`` expert slices of the phase record.
  """
  names = list(slices)
  entry: dict[str, Any] = {"phases": names, "per_layer": {}}
  for key, usage in (("top1", top1), ("topk", topk)):
    per_layer = phase_shares(usage, slices)
    entry["per_layer"][key] = [[float(x) for x in row] for row in per_layer]
    entry[key] = {name: float(x) for name, x in zip(names, per_layer.mean(axis=0))}
  return entry


def from_evaluation(
  evals: Mapping[str, Mapping[str, Any]], slices: Slices
) -> dict[str, dict[str, Any]]:
  """``{task: routing entry}`` from ``PhaseEvaluator`` results (tasks without usage are skipped)."""
  return {
    task: routing_entry(values["expert_usage_top1"], values["expert_usage"], slices)
    for task, values in evals.items()
    if "expert_usage_top1" in values and "expert_usage" in values
  }


def count_sums(
  model: lm.LanguageModel, params: PyTree, batch: Mapping[str, jax.Array]
) -> dict[str, jax.Array]:
  """Assignment counts of one batch (eval mode), pre-capacity, padding excluded.

  Returns:
    ``top1 [M, E]`` (tokens whose first choice is each expert), ``topk [M, E]`` ((token, choice)
    assignments per expert) and ``tokens []`` (routed tokens).
  """
  _, intermediates, _ = model.apply(params, batch)
  moe = lm.collect_moe_stats(intermediates, model.config, lm.ROUTING_STATS)
  if not moe:
    raise ValueError("Routing analysis needs an MoE model (ModelConfig.num_experts > 0).")
  routed = jnp.sum(lm.token_mask_of(batch).astype(jnp.float32))
  return {
    "top1": moe["top1_fraction"] * routed,
    "topk": moe["expert_fraction"] * routed * model.config.top_k,
    "tokens": routed,
  }


def routing_counts(
  model: lm.LanguageModel, params: PyTree, batches: Iterable[Mapping[str, Any]]
) -> dict[str, np.ndarray]:
  """``count_sums`` added up over ``batches`` (host numpy batches or arrays; single process).

  Returns:
    float64 ``top1 [M, E]``, ``topk [M, E]`` and ``tokens []``: exact integers up to float32
    rounding of each batch's fractions.
  """
  step = jax.jit(lambda p, b: count_sums(model, p, b))
  totals = None
  for batch in batches:
    sums = jax.device_get(step(params, {k: jnp.asarray(v) for k, v in batch.items()}))
    sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
  if totals is None:
    raise ValueError("routing_counts needs at least one batch.")
  return totals


def analyze(
  model: lm.LanguageModel, params: PyTree, batches: Iterable[Mapping[str, Any]], slices: Slices
) -> dict[str, Any]:
  """The routing entry of one distribution, counted on ``batches``."""
  counts = routing_counts(model, params, batches)
  return routing_entry(counts["top1"], counts["topk"], slices)


def format_shares(shares: Mapping[str, float]) -> str:
  """``{"A": 0.8, "B": 0.2}`` -> ``"A 80.0%, B 20.0%"`` (log lines)."""
  return ", ".join(f"{name} {100 * value:.1f}%" for name, value in shares.items())
