"""Validation loss and perplexity per task, in training and from the command line.

    python -m lifelong_moe_jax.eval --gin_file=models/tiny.gin --gin_file=runs/eval.gin \\
        --gin.MODEL_DIR=\\"/tmp/run\\" --gin.MIXTURE_OR_TASK_NAME=\\"lifelong_all\\" \\
        --gin.TASK_FEATURE_LENGTHS="{'targets': 64}" --gin.BATCH_SIZE=8

Every task of the mixture (or the task itself) and every extra gin-listed task is evaluated on its
``validation`` split: packed batches, one pass (or ``max_batches``). Results are written as
TensorBoard scalars ``<task>/loss``, ``<task>/perplexity``, ``<task>/accuracy``,
``<task>/num_tokens`` under ``MODEL_DIR/eval`` and as one JSON line per evaluation (same keys plus
``step``) in ``MODEL_DIR/eval/metrics.jsonl``.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging
import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.data import pipeline
from lifelong_moe_jax.data import vocab as vocab_lib
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.training import losses
from lifelong_moe_jax.training import summaries

PyTree = Any
EVAL_SPLIT = "validation"


def eval_task_names(mixture_or_task_name: str | None, extra_tasks: Sequence[str] = ()) -> list[str]:
  """Task names to evaluate: the mixture's tasks (or the task), then ``extra_tasks`` (mixtures
  expand to their tasks), without duplicates.

  Raises:
    ValueError: an unknown name, or a task without a validation split.
  """
  names: list[str] = []
  for name in ([mixture_or_task_name] if mixture_or_task_name else []) + list(extra_tasks):
    provider = pipeline.validate_task_name(name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    for task in tasks:
      if EVAL_SPLIT not in task.splits:
        raise ValueError(
          f"Task {task.name!r} has no {EVAL_SPLIT!r} split (splits: "
          f"{sorted(task.splits)}); remove it from the eval tasks."
        )
      if task.name not in names:
        names.append(task.name)
  return names


def _any_process(flag: bool) -> bool:
  """True when ``flag`` is true on any process (all processes must call it together)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def _side_by_side(iterators: Sequence[Iterator], template: Mapping[str, np.ndarray]) -> Iterator:
  """Batches of several shards' iterators concatenated row-wise (``template`` for an exhausted
  shard), until every shard is exhausted."""
  while True:
    items = [next(it, None) for it in iterators]
    if all(item is None for item in items):
      return
    yield {
      k: np.concatenate([template[k] if item is None else item[k] for item in items])
      for k in template
    }


def loss_metrics(totals: Mapping[str, Any]) -> dict[str, float]:
  """``loss`` (mean NLL per target token), ``perplexity`` and ``accuracy`` from summed
  ``nll_sum``, ``correct_sum`` and ``weight_sum``."""
  tokens = max(float(totals["weight_sum"]), 1.0)
  loss = float(totals["nll_sum"]) / tokens
  return {
    "loss": loss,
    "perplexity": math.exp(min(loss, 700.0)),
    "accuracy": float(totals["correct_sum"]) / tokens,
  }


class Evaluator:
  """Evaluates params on the validation split of several tasks.

  Args:
    model: the language model.
    partitioner: mesh + rules; params are expected sharded by their logical axes.
    task_names: tasks to evaluate (see ``eval_task_names``).
    task_feature_lengths: e.g. ``{"targets": 512}``.
    batch_size: global eval batch size (split over processes like training batches).
    max_batches: stop each task after this many global batches (None: the whole split).
    data_dir: data dir for the datasets (None: the usual resolution).
    sums_fn: ``fn(model, params, batch) -> {name: sum}`` computed per batch in one jitted call and
      added up over the pass; it must return at least ``nll_sum``, ``correct_sum`` and
      ``weight_sum`` (default ``losses.evaluation_sums``).
    batch_cache: a dict shared between evaluators (e.g. one per lifelong phase) that keeps the
      host batches of every bounded pass (``max_batches`` set), so later evaluators skip building
      the input pipeline; the batches are deterministic, so results are unchanged.
    data_shards: input shards a global batch is assembled from (default: the process count), as
      in training (``training.run.resolve_data_shards``): shard ``s`` is the seqio
      ``ShardInfo(s, data_shards)`` stream in batches of ``batch_size // data_shards`` rows, the
      global batch is the shards' rows in shard order, and a shard that runs out first
      contributes all-padding rows. Evaluators with equal ``data_shards`` see the same global
      batches whatever the process count.
  """

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
    sums_fn: Callable[..., dict[str, jax.Array]] = losses.evaluation_sums,
    batch_cache: dict | None = None,
    data_shards: int | None = None,
  ):
    if batch_size % jax.process_count():
      raise ValueError(
        f"Eval batch size {batch_size} is not divisible by the {jax.process_count()} processes."
      )
    self.data_shards = jax.process_count() if data_shards is None else int(data_shards)
    if self.data_shards < 1 or self.data_shards % jax.process_count():
      raise ValueError(
        f"data_shards={self.data_shards} must be a positive multiple of the "
        f"{jax.process_count()} processes."
      )
    if batch_size % self.data_shards:
      raise ValueError(
        f"Eval batch size {batch_size} is not divisible by data_shards={self.data_shards}."
      )
    partitioning.validate_batch_for_mesh(batch_size, partitioner.mesh)
    self.model = model
    self.partitioner = partitioner
    self.task_names = list(task_names)
    self.task_feature_lengths = dict(task_feature_lengths)
    self.batch_size = batch_size
    self.max_batches = max_batches
    self.data_dir = data_dir
    self.batch_cache = batch_cache
    self.batch_sharding = partitioner.batch_sharding()
    with partitioner.context():
      params_shardings = partitioner.shardings(model.params_logical_axes())
      self._step = jax.jit(
        lambda p, b: sums_fn(model, p, b),
        in_shardings=(params_shardings, self.batch_sharding),
        out_shardings=partitioner.replicated(),
      )

  def _dataset(self, task: str, split: str) -> tuple[Iterator, dict]:
    """This process's rows of every global batch of one pass (its ``data_shards`` shards side by
    side; an exhausted shard gives all-padding rows until every shard of the process is done)."""
    per_process = self.data_shards // jax.process_count()
    first = jax.process_index() * per_process
    parts = [
      pipeline.get_dataset(
        task,
        self.task_feature_lengths,
        split,
        self.batch_size // self.data_shards,
        shuffle=False,
        seed=0,
        repeat=False,
        pack=True,
        shard_index=first + j,
        num_shards=self.data_shards,
        data_dir=self.data_dir,
      )
      for j in range(per_process)
    ]
    part_template = {
      k: np.zeros(v.shape, v.dtype.as_numpy_dtype) for k, v in parts[0].element_spec.items()
    }
    if per_process == 1:
      return parts[0].as_numpy_iterator(), part_template
    template = {k: np.concatenate([v] * per_process) for k, v in part_template.items()}
    return _side_by_side([p.as_numpy_iterator() for p in parts], part_template), template

  def _local_batches(self, task: str, split: str, limit: int | None) -> tuple[Iterator, dict]:
    """This process's batches of a pass (from ``batch_cache`` when the pass is bounded)."""
    if self.batch_cache is None or limit is None:
      return self._dataset(task, split)
    key = (
      task,
      split,
      limit,
      self.batch_size,
      self.data_shards,
      tuple(sorted(self.task_feature_lengths.items())),
    )
    if key not in self.batch_cache:
      it, template = self._dataset(task, split)
      self.batch_cache[key] = (list(itertools.islice(it, limit)), template)
    batches, template = self.batch_cache[key]
    return iter(batches), template

  def task_sums(
    self, params: PyTree, task: str, *, split: str = EVAL_SPLIT, limit: int | None = None
  ) -> tuple[dict[str, np.ndarray], int]:
    """``sums_fn`` added up over one pass of ``task``'s ``split`` (at most ``limit`` global
    batches), as float64 host arrays, and the number of batches.

    Processes that run out of data first feed all-padding batches (zero loss weight, nothing
    routed) until every process is done, so all processes run the same number of steps.
    """
    it, template = self._local_batches(task, split, limit)
    totals = None
    count = 0
    while limit is None or count < limit:
      local = next(it, None)
      if not _any_process(local is not None):
        break
      local = template if local is None else local
      batch = {
        k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()
      }
      with self.partitioner.context():
        sums = self._step(params, batch)
      totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
      count += 1
    if totals is None:
      raise ValueError(
        f"Task {task!r} produced no {split} batch of {self.batch_size} "
        "sequences; lower the eval batch size."
      )
    return {k: np.asarray(v, np.float64) for k, v in jax.device_get(totals).items()}, count

  def evaluate_task(self, params: PyTree, task: str) -> dict[str, float]:
    """``{"loss", "perplexity", "accuracy", "num_tokens", "num_batches"}`` for one task."""
    totals, count = self.task_sums(params, task, limit=self.max_batches)
    return dict(
      loss_metrics(totals), num_tokens=float(totals["weight_sum"]), num_batches=float(count)
    )

  def evaluate(self, params: PyTree) -> dict[str, dict[str, Any]]:
    """``{task: metrics}`` for every task."""
    return {task: self.evaluate_task(params, task) for task in self.task_names}


def flatten_results(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
  """``{task: {name: v}}`` -> ``{"<task>/<name>": v}``."""
  return {
    f"{task}/{name}": value for task, values in results.items() for name, value in values.items()
  }


def write_results(
  writer: summaries.MetricsWriter, step: int, results: Mapping[str, Mapping[str, float]]
) -> None:
  """Writes results (TensorBoard + JSONL) and logs one line per task."""
  writer.write_scalars(step, flatten_results(results))
  writer.flush()
  for task, values in results.items():
    summaries.log_info(
      "eval step %d | %s | loss %.4f | perplexity %.2f | %d tokens",
      step,
      task,
      values["loss"],
      values["perplexity"],
      int(values["num_tokens"]),
    )


def evaluate_checkpoint(
  *,
  model_dir: str = gin.REQUIRED,
  mixture_or_task_name: str | None = gin.REQUIRED,
  task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
  batch_size: int = gin.REQUIRED,
  checkpoint_path: str | None = None,
  extra_eval_tasks: Sequence[str] = (),
  max_batches: int | None = None,
  model_config: ModelConfig | None = None,
  mesh_config: partitioning.MeshConfig | None = None,
  data_dir: str | None = None,
) -> dict[str, dict[str, float]]:
  """Evaluates a checkpoint and writes the results under ``model_dir/eval``.

  Args:
    model_dir: run folder; results go to ``model_dir/eval``.
    mixture_or_task_name: whose tasks to evaluate (None: only ``extra_eval_tasks``).
    task_feature_lengths: e.g. ``{"targets": 512}``.
    batch_size: global eval batch size.
    checkpoint_path: a step dir or run folder (default: the latest checkpoint of ``model_dir``).
    extra_eval_tasks: more tasks or mixtures.
    max_batches: per-task batch limit (None: whole split).
    model_config: the model (default: ``ModelConfig()`` from gin).
    mesh_config: the mesh (default: ``MeshConfig()`` from gin).
    data_dir: data dir (None: the usual resolution).
  Returns:
    ``{task: {"loss", "perplexity", "accuracy", "num_tokens", "num_batches"}}``.
  """
  step_dir = checkpoints.resolve_step_dir(checkpoint_path or model_dir)
  metadata = checkpoints.read_metadata(step_dir)
  vocabulary = vocab_lib.get_vocabulary(data_dir=data_dir)
  checkpoints.check_vocabulary(step_dir, vocab_lib.vocabulary_fingerprint(vocabulary))
  model = lm.build_model(model_config or ModelConfig(), vocabulary.vocab_size)
  mesh = partitioning.create_mesh(mesh_config or partitioning.MeshConfig())
  partitioning.validate_model_for_mesh(model.config, mesh)
  partitioner = partitioning.Partitioner(mesh)
  tasks = eval_task_names(mixture_or_task_name, extra_eval_tasks)
  if not tasks:
    raise ValueError(
      "Nothing to evaluate: set MIXTURE_OR_TASK_NAME or evaluate_checkpoint.extra_eval_tasks."
    )
  evaluator = Evaluator(
    model,
    partitioner,
    tasks,
    task_feature_lengths,
    batch_size,
    max_batches=max_batches,
    data_dir=data_dir,
  )
  params = checkpoints.restore_model_params(step_dir, model, partitioner)
  step = int(metadata.get("step", 0))
  logging.info("Evaluating %s (step %d) on %s.", step_dir, step, ", ".join(tasks))
  results = evaluator.evaluate(params)
  writer = summaries.MetricsWriter(
    os.path.join(model_dir, "eval"), enabled=jax.process_index() == 0
  )
  try:
    write_results(writer, step, results)
  finally:
    writer.close()
  return results
