r"""Training a model in a run folder: the library entry point behind the train CLI.

    result = run.train_model(model=model, partitioner=partitioner, optimizer=optimizer,
                             vocabulary=vocabulary, model_dir=..., mixture_or_task_name=...,
                             task_feature_lengths={"targets": 512}, train_steps=..., batch_size=...)

Callers build the model, the mesh (``partitioning.Partitioner``) and the optimizer themselves:
``python -m lifelong_moe_jax.train`` builds them from gin, the lifelong runner from its schedule and
its own mesh. Everything that can be checked is checked before anything is written to
``model_dir``: the settings, the task names, the model/mesh/batch combination, and for a run that
already has checkpoints their vocabulary and input pipeline. Then the run config (the callback
``write_run_config``), resume or initialise, train, checkpoint, evaluate. See docs/training.md.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping, Sequence

from clu.data import TfDatasetIterator
import jax
import seqio

from lifelong_moe_jax import checkpoint_manager
from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.data import pipeline
from lifelong_moe_jax.data import vocab as vocab_lib
from lifelong_moe_jax.eval import loss_eval
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.training import losses
from lifelong_moe_jax.training import optimizers
from lifelong_moe_jax.training import pipeline_release
from lifelong_moe_jax.training import summaries
from lifelong_moe_jax.training import train_state as ts
from lifelong_moe_jax.training import trainer as trainer_lib

DATA_POSITIONS = ("iterator", "skip")
DATA_SETTINGS = (
  "mixture_or_task_name",
  "task_feature_lengths",
  "batch_size",
  "seed",
  "pack",
  "process_count",
  "data_shards",
)


@dataclasses.dataclass
class TrainResult:
  """What ``train`` returns.

  Attributes:
    state: the final train state (sharded).
    start_step: the step training started from.
    start_source: how the start state was obtained (see ``trainer.StartPoint.source``).
    model_dir: the run folder.
    trainer: the ``Trainer`` (model, partitioner, shardings) for follow-up work.
    teardown: seconds spent after the last step: ``checkpoint_wait_s`` (async saves finishing),
      ``close_s`` (checkpointer and writers closed, manifests written), ``pipeline_release_s``
      (the tf.data iterator handed to its release thread, ``pipeline_release.release_in_background``),
      which also runs a garbage collection for reference cycles left behind.
  """

  state: ts.TrainState
  start_step: int
  start_source: str
  model_dir: str
  trainer: trainer_lib.Trainer
  teardown: dict[str, float] = dataclasses.field(default_factory=dict)


def _validate_args(
  train_steps: int,
  batch_size: int,
  task_feature_lengths: Mapping[str, int],
  data_position: str,
  config: ModelConfig,
) -> None:
  if train_steps <= 0:
    raise ValueError(f"TRAIN_STEPS must be positive, got {train_steps}.")
  if batch_size <= 0 or batch_size % jax.process_count():
    raise ValueError(
      f"BATCH_SIZE={batch_size} must be positive and divisible by the "
      f"{jax.process_count()} processes."
    )
  if data_position not in DATA_POSITIONS:
    raise ValueError(f"train.data_position must be one of {DATA_POSITIONS}, got {data_position!r}.")
  if set(task_feature_lengths) != {"targets"}:
    raise ValueError(
      "TASK_FEATURE_LENGTHS must be {'targets': LENGTH} for decoder-only LM "
      f"tasks, got {dict(task_feature_lengths)}."
    )
  if task_feature_lengths["targets"] > config.max_length:
    raise ValueError(
      f"TASK_FEATURE_LENGTHS['targets']={task_feature_lengths['targets']} exceeds "
      f"ModelConfig.max_length={config.max_length}."
    )


def resolve_data_shards(data_shards: int | None, batch_size: int) -> int:
  """The number of input shards the global batch is assembled from (default: one per process).

  Shard ``s`` of ``data_shards`` is the seqio ``ShardInfo(s, data_shards)`` stream batched to
  ``batch_size // data_shards`` rows; the global batch is the shards' rows in shard order, and
  process ``p`` reads (only) shards ``p * k ... (p + 1) * k - 1`` (``k = data_shards /
  process_count``). So a run's input does not depend on how many processes read it: a 1-process
  run with ``data_shards=2`` sees exactly the global batches of a 2-process run.

  Raises:
    ValueError: ``data_shards`` not a multiple of the process count or not dividing the batch.
  """
  processes = jax.process_count()
  shards = processes if data_shards is None else int(data_shards)
  if shards < 1 or shards % processes:
    raise ValueError(
      f"train.data_shards={shards} must be a positive multiple of the {processes} processes."
    )
  if batch_size % shards:
    raise ValueError(
      f"BATCH_SIZE={batch_size} is not divisible by train.data_shards={shards}; "
      f"use a multiple of {shards}."
    )
  return shards


def process_dataset(
  mixture_or_task_name: str,
  task_feature_lengths: Mapping[str, int],
  batch_size: int,
  data_shards: int,
  *,
  seed: int,
  pack: bool,
  data_dir: str | None,
) -> Any:
  """This process's rows of every global training batch (see ``resolve_data_shards``)."""
  per_process = data_shards // jax.process_count()
  first = jax.process_index() * per_process
  parts = [
    pipeline.get_dataset(
      mixture_or_task_name,
      task_feature_lengths,
      "train",
      batch_size // data_shards,
      shuffle=True,
      seed=seed,
      repeat=True,
      pack=pack,
      shard_index=first + j,
      num_shards=data_shards,
      data_dir=data_dir,
    )
    for j in range(per_process)
  ]
  if len(parts) == 1:
    return parts[0]
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  return tf.data.Dataset.zip(tuple(parts)).map(
    lambda *bs: {k: tf.concat([b[k] for b in bs], axis=0) for k in bs[0]}
  )


def _check_data_settings(
  saved: Mapping[str, Any], current: Mapping[str, Any], step_dir: str
) -> None:
  diffs = [
    f"{k}: checkpoint {saved.get(k)!r} vs now {current[k]!r}"
    for k in DATA_SETTINGS
    if k in saved and saved.get(k) != current[k]
  ]
  if diffs:
    raise ValueError(
      f"Cannot resume {step_dir} exactly: the input pipeline changed ({'; '.join(diffs)}). "
      "Use the original settings, or start a new MODEL_DIR from this checkpoint with "
      "train.restore_checkpoint_path (and train.restore_mode = 'full' to keep the optimizer)."
    )


def _preflight_start(
  model_dir: str,
  fingerprint: str,
  data_settings: Mapping[str, Any],
  initial_state: Any,
  restore_checkpoint_path: str | None,
) -> None:
  """The start checks that read existing checkpoints, run before anything is written.

  A resumable run must have the same vocabulary and input pipeline; a run without checkpoints that
  starts from ``restore_checkpoint_path`` needs that checkpoint to exist with the same vocabulary.
  """
  try:
    latest = checkpoints.resolve_step_dir(model_dir)
  except checkpoints.CheckpointNotFoundError:
    latest = None
  if latest is not None:
    checkpoints.check_vocabulary(latest, fingerprint)
    saved = checkpoints.read_metadata(latest).get("data") or {}
    _check_data_settings(saved, data_settings, latest)
  elif initial_state is None and restore_checkpoint_path:
    checkpoints.check_vocabulary(checkpoints.resolve_step_dir(restore_checkpoint_path), fingerprint)


def train_model(
  *,
  model: lm.LanguageModel,
  partitioner: partitioning.Partitioner,
  optimizer: optimizers.Optimizer,
  vocabulary: seqio.Vocabulary,
  model_dir: str,
  mixture_or_task_name: str,
  task_feature_lengths: Mapping[str, int],
  train_steps: int,
  batch_size: int,
  checkpoint_config: checkpoints.CheckpointConfig | None = None,
  seed: int = 0,
  data_seed: int | None = None,
  data_position: str = "iterator",
  pack: bool = True,
  data_dir: str | None = None,
  data_shards: int | None = None,
  summary_every_steps: int = 100,
  log_every_steps: int = 100,
  eval_every_steps: int = 0,
  extra_eval_tasks: Sequence[str] = (),
  eval_batch_size: int | None = None,
  eval_max_batches: int | None = 20,
  restore_checkpoint_path: str | None = None,
  restore_mode: str = "params",
  initial_state: ts.TrainState | None = None,
  regularizers: Sequence[losses.Regularizer] = (),
  optimizer_wrapper: optimizers.OptimizerWrapper | None = None,
  extra_metadata: Mapping[str, Any] | None = None,
  write_run_config: Callable[[str], Any] | None = None,
) -> TrainResult:
  """Trains (or resumes training of) a model in ``model_dir``.

  Args:
    model_dir: run folder (config.gin, checkpoints/, train/, eval/).
    mixture_or_task_name: registered seqio task or mixture to train on.
    task_feature_lengths: ``{"targets": LENGTH}``.
    train_steps: total steps of the run (resume continues up to it).
    batch_size: global batch size (sequences per step, over all processes).
    model: the model (its ``vocab_size`` must be ``vocabulary.vocab_size``).
    partitioner: mesh + logical axis rules the run is sharded on.
    optimizer: the optimizer (``optimizers.create_optimizer``).
    vocabulary: the seqio vocabulary of the data (its fingerprint is checked against checkpoints).
    seed: params init and per-step rng.
    data_seed: shuffling/mixing seed (default ``seed``).
    data_position: "iterator" (save tf.data iterator state) or "skip" (re-read and skip).
    pack: pack documents into rows.
    data_dir: prepared data dir (default: --data_dir / env / ./data).
    data_shards: input shards the global batch is assembled from (default: the process count);
      runs with equal ``data_shards`` read equal global batches whatever their process count
      (``resolve_data_shards``).
    summary_every_steps / log_every_steps: TensorBoard+JSONL summaries / progress lines.
    eval_every_steps: in-training eval interval (0: no in-training eval).
    extra_eval_tasks: tasks/mixtures evaluated besides the training mixture's tasks.
    eval_batch_size: default ``batch_size``.
    eval_max_batches: per-task eval batch limit (None: whole validation split).
    restore_checkpoint_path: start from this checkpoint when ``model_dir`` has none.
    restore_mode: "params" (fresh optimizer, step 0) or "full" (optimizer and step as saved).
    initial_state: start from this state when ``model_dir`` has no checkpoint.
    regularizers: extra loss terms (see ``losses.Regularizer``).
    optimizer_wrapper: ``tx -> tx`` around the optimizer (e.g. freezing).
    extra_metadata: JSON-able dict merged into every checkpoint's metadata.
    write_run_config: ``fn(model_dir)`` called on the primary process right after every check has
      passed and before anything else is written (the CLI writes ``config.gin`` with it).
  Returns:
    A ``TrainResult``.
  Raises:
    ValueError (and subclasses such as checkpoints.CheckpointMismatchError): invalid settings,
      raised before anything is written when they can be known up front.
    trainer.NonFiniteLossError: NaN/Inf loss; the latest checkpoint stays the last good one.
  """
  # ---------------------------------------------------------------- validation (writes nothing)
  extra_metadata = dict(extra_metadata or {})
  clash = sorted(set(extra_metadata) & set(checkpoint_manager.RESERVED_METADATA_KEYS))
  if clash:
    raise ValueError(f"extra_metadata keys {clash} are reserved; rename them.")
  data_seed = seed if data_seed is None else data_seed
  task_feature_lengths = dict(task_feature_lengths)
  fingerprint = vocab_lib.vocabulary_fingerprint(vocabulary)
  if model.config.vocab_size != vocabulary.vocab_size:
    raise ValueError(
      f"The model's vocab_size {model.config.vocab_size} differs from the "
      f"vocabulary's {vocabulary.vocab_size}; build it with lm.build_model."
    )
  _validate_args(train_steps, batch_size, task_feature_lengths, data_position, model.config)
  data_shards = resolve_data_shards(data_shards, batch_size)
  pipeline.validate_task_name(mixture_or_task_name)
  eval_tasks = (
    loss_eval.eval_task_names(mixture_or_task_name, extra_eval_tasks) if eval_every_steps else []
  )
  for name in [mixture_or_task_name, *eval_tasks]:  # builds/verifies local data before any write
    pipeline.ensure_task_data(name, data_dir)
  mesh = partitioner.mesh
  partitioning.validate_model_for_mesh(model.config, mesh)
  partitioning.validate_batch_for_mesh(batch_size, mesh)
  checkpoint_config = checkpoint_config or checkpoints.CheckpointConfig()
  loop = trainer_lib.LoopConfig(summary_every_steps, log_every_steps, eval_every_steps)
  trainer = trainer_lib.Trainer(
    model,
    partitioner,
    optimizer,
    seed=seed,
    regularizers=regularizers,
    optimizer_wrapper=optimizer_wrapper,
  )
  evaluator = (
    loss_eval.Evaluator(
      model,
      partitioner,
      eval_tasks,
      task_feature_lengths,
      eval_batch_size or batch_size,
      max_batches=eval_max_batches,
      data_dir=data_dir,
    )
    if eval_tasks
    else None
  )
  is_primary = jax.process_index() == 0

  data_settings = {
    "mixture_or_task_name": mixture_or_task_name,
    "task_feature_lengths": task_feature_lengths,
    "batch_size": batch_size,
    "seed": data_seed,
    "pack": pack,
    "process_count": jax.process_count(),
    "data_shards": data_shards,
  }
  _preflight_start(model_dir, fingerprint, data_settings, initial_state, restore_checkpoint_path)
  summaries.log_info(
    "Model: %s; mesh %s; %d processes; global batch %d x %d.",
    model.config,
    dict(mesh.shape),
    jax.process_count(),
    batch_size,
    task_feature_lengths["targets"],
  )

  # ---------------------------------------------------------------- start (first writes)
  if is_primary and write_run_config is not None:
    write_run_config(model_dir)
  checkpointer = checkpoint_manager.Checkpointer(model_dir, checkpoint_config)
  teardown: dict[str, float] = {}
  train_writer = summaries.MetricsWriter(os.path.join(model_dir, "train"), enabled=is_primary)
  eval_writer = summaries.MetricsWriter(os.path.join(model_dir, "eval"), enabled=is_primary)
  try:
    start = trainer.restore_or_initialize(
      checkpointer,
      initial_state=initial_state,
      restore_checkpoint_path=restore_checkpoint_path,
      restore_mode=restore_mode,
      vocabulary_fingerprint=fingerprint,
    )
    start_step = int(start.state.step)
    summaries.log_info(
      "Start state: %s at step %d%s.",
      start.source,
      start_step,
      f" ({start.step_dir})" if start.step_dir else "",
    )
    train_writer.truncate_after(start_step)
    eval_writer.truncate_after(start_step)

    saved_data = start.metadata.get("data", {}) if start.source == "resumed" else {}
    if saved_data:  # checked in the preflight too; the fallback step may differ from it
      _check_data_settings(saved_data, data_settings, start.step_dir)
    consumed = int(saved_data.get("batches_consumed", 0))
    ds = process_dataset(
      mixture_or_task_name,
      task_feature_lengths,
      batch_size,
      data_shards,
      seed=data_seed,
      pack=pack,
      data_dir=data_dir,
    )
    restored_position = False
    if data_position == "iterator" and consumed:
      data_iter = TfDatasetIterator(ds, checkpoint=True)
      restored_position = checkpoints.restore_data_iterator(start.step_dir, data_iter)
    if not restored_position:
      if consumed:
        summaries.log_info("Skipping %d consumed batches to restore the data position.", consumed)
        ds = ds.skip(consumed)
      data_iter = TfDatasetIterator(ds, checkpoint=data_position == "iterator")

    def metadata_fn(step: int, batches_consumed: int) -> dict[str, Any]:
      del step  # the checkpointer adds it
      return checkpoint_manager.state_metadata(
        model_config=model.config,
        vocabulary_fingerprint=fingerprint,
        optimizer_name=optimizer.name,
        mesh=mesh,
        data=dict(data_settings, data_position=data_position, batches_consumed=batches_consumed),
        extra=extra_metadata,
      )

    def evaluate_fn(step: int, params: Any) -> None:
      loss_eval.write_results(eval_writer, step, evaluator.evaluate(params))

    aux_states = trainer.init_aux_states(start.state)
    state = trainer.fit(
      start.state,
      data_iter,
      train_steps=train_steps,
      aux_states=aux_states,
      loop=loop,
      checkpointer=checkpointer,
      metadata_fn=metadata_fn,
      data_iterator=data_iter if data_position == "iterator" else None,
      batches_consumed=consumed,
      writer=train_writer,
      evaluate_fn=evaluate_fn if evaluator is not None else None,
    )
    t_end = time.perf_counter()
    checkpointer.wait_until_finished()
    teardown["checkpoint_wait_s"] = time.perf_counter() - t_end
  finally:
    t_close = time.perf_counter()
    checkpointer.close()
    train_writer.close()
    eval_writer.close()
    teardown["close_s"] = time.perf_counter() - t_close
    # The tf.data iterator is torn down in a background thread: its deletion sometimes blocked
    # the caller for 40-50 s after the last step (docs/performance.md), with nothing to wait for.
    t_release = time.perf_counter()
    pipeline_release.release_in_background(data_iter)
    data_iter = ds = None  # noqa: F841
    teardown["pipeline_release_s"] = time.perf_counter() - t_release
  summaries.log_info(
    "Finished at step %d; checkpoints in %s (after the last step: checkpoint "
    "wait %.1f s, close %.1f s, input pipeline handed to a release thread %.1f s).",
    int(state.step),
    checkpointer.directory,
    teardown.get("checkpoint_wait_s", 0.0),
    teardown["close_s"],
    teardown["pipeline_release_s"],
  )
  return TrainResult(
    state=state,
    start_step=start_step,
    start_source=start.source,
    model_dir=model_dir,
    trainer=trainer,
    teardown=teardown,
  )
