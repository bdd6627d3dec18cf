"""Router-input moments per MoE layer on a task's data: the ``mu`` of ``router_init="copy_offset"``,
the earlier distributions' statistics of the router projection and the router rehearsal.

``measure_router_input_moments`` runs a model (the previous phase's, in eval mode) over the first
``num_batches`` packed, unshuffled train batches of a task or mixture and returns, per MoE layer,
the mean over real tokens of the router's input (the MoE layer's normalised input), float64
``[num_moe_layers, embed]``, and its second moment ``E[x x^T]``, ``[num_moe_layers, embed, embed]``,
in ``lm.collect_moe_stats``'s layer order. A lifelong phase measures them on one phase's own data
only.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from lifelong_moe_jax import partitioning
from lifelong_moe_jax.eval import loss_eval
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models import router_probe
from lifelong_moe_jax.training import losses

PyTree = Any


def router_input_sums(
  model: lm.LanguageModel, params: PyTree, batch: Mapping[str, jax.Array]
) -> dict[str, jax.Array]:
  """Per-batch sums (eval mode): ``token_sums`` plus ``router_input_sum [M, embed]``,
  ``router_input_gram [M, embed, embed]`` and ``router_token_count [M]``."""
  with router_probe.capture_router(logits=False, inputs=True):
    logits, intermediates, _ = model.apply(params, batch)
  out = losses.token_sums(logits, batch)
  stats = router_probe.collect_router_stats(intermediates, model.config)
  out["router_input_sum"] = stats[router_probe.ROUTER_INPUT_SUM]
  out["router_input_gram"] = stats[router_probe.ROUTER_INPUT_GRAM]
  out["router_token_count"] = stats[router_probe.ROUTER_TOKEN_COUNT]
  return out


def measure_router_input_moments(
  model: lm.LanguageModel,
  params: PyTree,
  partitioner: partitioning.Partitioner,
  mixture: str,
  task_feature_lengths: Mapping[str, int],
  batch_size: int,
  num_batches: int,
  data_dir: str | None = None,
  data_shards: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """``(mean [M, embed], second moment [M, embed, embed])``, float64: ``E[x]`` and ``E[x x^T]`` of
  the router input over the real tokens of the first ``num_batches`` train batches of ``mixture``
  (global batches assembled from ``data_shards`` input shards, default the process count; see
  ``loss_eval.Evaluator``).

  Raises:
    ValueError: a dense model, or no routed token.
  """
  if not model.config.is_moe:
    raise ValueError("Router-input moments need an MoE model.")
  evaluator = loss_eval.Evaluator(
    model,
    partitioner,
    (),
    task_feature_lengths,
    batch_size,
    data_dir=data_dir,
    sums_fn=router_input_sums,
    data_shards=data_shards,
  )
  totals, _ = evaluator.task_sums(params, mixture, split="train", limit=num_batches)
  count = totals["router_token_count"]
  if np.any(count <= 0):
    raise ValueError(f"No routed token in {num_batches} train batches of {mixture!r}.")
  mean = totals["router_input_sum"] / count[:, None]
  second_moment = totals["router_input_gram"] / count[:, None, None]
  return mean, second_moment


def measure_router_input_mean(*args, **kwargs) -> np.ndarray:
  """float64 ``[num_moe_layers, embed]``: the mean of ``measure_router_input_moments`` (same
  arguments)."""
  return measure_router_input_moments(*args, **kwargs)[0]


def measure_phase_data_moments(
  model: lm.LanguageModel,
  params: PyTree,
  partitioner: partitioning.Partitioner,
  schedule: Any,
  index: int,
  num_batches: int,
  data_dir: str | None = None,
  data_shards: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """``measure_router_input_moments`` on the own distribution of phase ``index`` of a
  ``LifelongSchedule`` (``phases[index].mixture``, never a replay or joint mixture), with the
  schedule's feature lengths and eval batch size."""
  return measure_router_input_moments(
    model,
    params,
    partitioner,
    schedule.phases[index].mixture,
    schedule.task_feature_lengths,
    schedule.eval_batch,
    num_batches,
    data_dir=data_dir,
    data_shards=data_shards,
  )


def measure_previous_phase_moments(method: Any, setup: Any) -> tuple[np.ndarray, np.ndarray]:
  """``measure_phase_data_moments`` of phase ``setup.index - 1``'s own data under its final
  params (the previous phase's model of ``method``, ``setup.options.usage_batches`` batches): the
  statistic of an earlier distribution that a phase start saves (``lifelong.methods.PhaseSetup``)."""
  schedule, options = setup.schedule, setup.options
  prev_model = lm.LanguageModel(
    method.model_config(setup.base_config, schedule, setup.index - 1, options)
  )
  return measure_phase_data_moments(
    prev_model,
    setup.previous_params(),
    setup.partitioner,
    schedule,
    setup.index - 1,
    options.usage_batches,
    data_dir=setup.data_dir,
    data_shards=setup.data_shards,
  )
