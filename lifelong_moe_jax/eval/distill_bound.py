"""The best new-data perplexity output distillation allows.

A distilling method trains the student on ``CE(data, p_s) + w * KL(p_t || p_s)`` (temperature 1,
``lifelong/distill.py``). Per context, over all distributions ``p_s``, that objective is smallest at

    p* = (p_data + w * p_t) / (1 + w),

the mixture of the data and the teacher. With a model fitted to the new data without any
regulariser (fine-tuning's) standing in for ``p_data``, the mixture's perplexity on the new data is
what a distilled student reaches when it fits the data as well as fine-tuning does: a student can
beat it only by fitting the data better than fine-tuning. Comparing a distilling method's
measured perplexity with this bound tells whether its gap to fine-tuning is the objective's
(a student at the bound) or the model's (a student above it).

``p*(y) >= p_fit(y) / (1 + w)`` for every token, so the bound's perplexity is at most
``(1 + w)`` times the fit model's.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lifelong_moe_jax.models import lm


def mixture_log_likelihood(fit_ll: Any, teacher_ll: Any, weight: float) -> np.ndarray:
  """``log((p_fit(y) + weight * p_teacher(y)) / (1 + weight))`` per token.

  Args:
    fit_ll, teacher_ll: float ``[...]`` log-likelihoods of the same target tokens.
    weight: the distillation weight ``w >= 0``.
  Returns:
    float64 ``[...]``.
  """
  if weight < 0:
    raise ValueError(f"The distillation weight must be >= 0, got {weight}.")
  fit_ll = np.asarray(fit_ll, np.float64)
  if weight == 0:
    return fit_ll
  teacher_ll = np.asarray(teacher_ll, np.float64)
  return np.logaddexp(fit_ll, np.log(weight) + teacher_ll) - np.log1p(weight)


def perplexity(token_ll: Any, token_weights: Any) -> float:
  """``exp`` of the weighted mean negative log-likelihood (``[...]`` arrays)."""
  token_weights = np.asarray(token_weights, np.float64)
  total = max(float(np.sum(token_weights)), 1.0)
  return float(np.exp(-np.sum(np.asarray(token_ll, np.float64) * token_weights) / total))


def token_log_likelihoods(
  model: lm.LanguageModel, params: Any, batches_by_task: Mapping[str, Sequence[dict[str, Any]]]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{task: (log-likelihoods [tokens], loss weights [tokens])}`` of every target position of
  each task's host batches (``decoder_*`` features) in eval mode, flattened in batch order; one
  compiled step serves every task."""

  @jax.jit
  def step(p, batch):
    logits, _, _ = model.apply(p, batch)
    return lm.token_log_likelihood(logits, batch["decoder_target_tokens"]), lm.loss_weights_of(
      batch
    )

  out = {}
  for task, batches in batches_by_task.items():
    if not batches:
      raise ValueError(f"No batch of {task!r} to evaluate.")
    lls, weights = [], []
    for batch in batches:
      ll, w = step(params, {k: jnp.asarray(v) for k, v in batch.items()})
      lls.append(np.asarray(ll, np.float64).reshape(-1))
      weights.append(np.asarray(w, np.float64).reshape(-1))
    out[task] = np.concatenate(lls), np.concatenate(weights)
  return out
