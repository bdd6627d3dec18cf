"""Evaluation after a lifelong phase: validation loss/perplexity and expert usage per distribution.

For every task, one deterministic pass over its ``validation`` split (packed, unshuffled, at most
``max_batches`` global batches) computes, in the same jitted forward pass:

* ``loss`` (mean negative log-likelihood per target token), ``perplexity = exp(loss)``,
  ``accuracy`` (argmax hits), ``num_tokens``;
* for MoE models ``expert_usage [num_moe_layers][num_experts]``: the fraction of the task's routing
  assignments (token x top-k choice, before capacity) that went to each expert, per MoE layer
  (rows sum to 1) — the model's ``expert_fraction`` statistic weighted by each batch's routed
  tokens; and ``dropped_fraction [num_moe_layers]`` (assignments over capacity, eval factor).

Batches are placed on the mesh like training batches; params stay sharded.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lifelong_moe_jax import partitioning
from lifelong_moe_jax.data import pipeline
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.training import losses

PyTree = Any


def _any_process(flag: bool) -> bool:
  """True when ``flag`` is true on any process (all processes call it together)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def eval_sums(model: lm.LanguageModel, params: PyTree, batch: Mapping[str, jax.Array]
              ) -> dict[str, jax.Array]:
  """Sums over one batch (eval mode): nll, correct, weight, and per-layer routing usage."""
  logits, intermediates, _ = model.apply(params, batch)
  out = losses.token_sums(logits, batch)
  moe = lm.collect_moe_stats(intermediates, model.config)
  if moe:
    routed = jnp.sum(lm.token_mask_of(batch).astype(jnp.float32))
    out["usage_sum"] = moe["expert_fraction"].astype(jnp.float32) * routed       # [M, E]
    out["dropped_sum"] = moe["dropped_fraction"].astype(jnp.float32) * routed    # [M]
    out["routed_sum"] = routed
  return out


class PhaseEvaluator:
  """Per-task loss, perplexity and expert usage of params on one mesh.

  Args:
    model: the model of the params.
    partitioner: mesh + rules (params sharded by their logical axes).
    task_feature_lengths: e.g. ``{"targets": 128}``.
    batch_size: global batch size (divisible by the data x expert mesh axes).
    max_batches: per-task limit (None: the whole split).
    data_dir: prepared data dir.
    batch_cache: a dict shared between evaluators (e.g. one per phase) that keeps the host batches
      of every bounded pass (``max_batches`` set), so later phases skip building the input
      pipeline; the batches are deterministic, so results are unchanged.
  """

  def __init__(self, model: lm.LanguageModel, partitioner: partitioning.Partitioner,
               task_feature_lengths: Mapping[str, int], batch_size: int, *,
               max_batches: int | None = None, data_dir: str | None = None,
               batch_cache: dict | None = None):
    partitioning.validate_batch_for_mesh(batch_size, partitioner.mesh)
    if batch_size % jax.process_count():
      raise ValueError(f"Eval batch size {batch_size} is not divisible by the "
                       f"{jax.process_count()} processes.")
    self.model = model
    self.partitioner = partitioner
    self.task_feature_lengths = dict(task_feature_lengths)
    self.batch_size = batch_size
    self.max_batches = max_batches
    self.data_dir = data_dir
    self.batch_cache = batch_cache
    self.batch_sharding = partitioner.batch_sharding()
    with partitioner.context():
      params_shardings = partitioner.shardings(model.params_logical_axes())
      self._step = jax.jit(lambda p, b: eval_sums(model, p, b),
                           in_shardings=(params_shardings, self.batch_sharding),
                           out_shardings=partitioner.replicated())

  def _dataset(self, task: str, split: str):
    ds = pipeline.get_dataset(
        task, self.task_feature_lengths, split, self.batch_size // jax.process_count(),
        shuffle=False, seed=0, repeat=False, pack=True, shard_index=jax.process_index(),
        num_shards=jax.process_count(), data_dir=self.data_dir)
    template = {k: np.zeros(v.shape, v.dtype.as_numpy_dtype) for k, v in ds.element_spec.items()}
    return ds.as_numpy_iterator(), template

  def _local_batches(self, task: str, split: str, limit: int | None) -> tuple[Iterator, dict]:
    """This process's batches of a pass (from the cache when the pass is bounded and seen)."""
    if self.batch_cache is None or limit is None:
      return self._dataset(task, split)
    key = (task, split, limit, self.batch_size, tuple(sorted(self.task_feature_lengths.items())))
    if key not in self.batch_cache:
      it, template = self._dataset(task, split)
      self.batch_cache[key] = (list(itertools.islice(it, limit)), template)
    batches, template = self.batch_cache[key]
    return iter(batches), template

  def evaluate_task(self, params: PyTree, task: str, *, split: str = "validation",
                    max_batches: int | None = -1) -> dict[str, Any]:
    """Metrics of one task (see the module docstring); ``max_batches=-1`` uses the default."""
    limit = self.max_batches if max_batches == -1 else max_batches
    it, template = self._local_batches(task, split, limit)
    totals = None
    count = 0
    while limit is None or count < limit:
      local = next(it, None)
      if not _any_process(local is not None):
        break
      local = template if local is None else local   # all-padding: zero weight, nothing routed
      batch = {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
               for k, v in local.items()}
      with self.partitioner.context():
        sums = self._step(params, batch)
      totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
      count += 1
    if totals is None:
      raise ValueError(f"Task {task!r} produced no {split} batch of {self.batch_size} sequences; "
                       "lower the eval batch size.")
    totals = {k: np.asarray(v, np.float64) for k, v in jax.device_get(totals).items()}
    tokens = max(float(totals["weight_sum"]), 1.0)
    loss = float(totals["nll_sum"]) / tokens
    result: dict[str, Any] = {
        "loss": loss, "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": float(totals["correct_sum"]) / tokens,
        "num_tokens": int(totals["weight_sum"]), "num_batches": count}
    if "usage_sum" in totals:
      routed = max(float(totals["routed_sum"]), 1.0)
      usage = totals["usage_sum"] / routed
      result["expert_usage"] = [[float(x) for x in row] for row in usage]
      result["dropped_fraction"] = [float(x) for x in totals["dropped_sum"] / routed]
    return result

  def evaluate(self, params: PyTree, task_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{task: metrics}`` on the validation split of every task."""
    return {task: self.evaluate_task(params, task) for task in task_names}

  def expert_usage(self, params: PyTree, mixture: str, num_batches: int) -> np.ndarray:
    """``[num_moe_layers, E]`` routing fractions on the first ``num_batches`` train batches of a
    task or mixture (unshuffled): the usage that ``surgery``'s ``source_experts`` ranks."""
    result = self.evaluate_task(params, mixture, split="train", max_batches=num_batches)
    if "expert_usage" not in result:
      raise ValueError("expert_usage needs an MoE model.")
    return np.asarray(result["expert_usage"])
