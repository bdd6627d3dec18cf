r"""Pretraining entry point (t5x-style): ``python -m lifelong_moe_jax.train``.

    python -m lifelong_moe_jax.train --gin_file=models/tiny.gin --gin_file=runs/pretrain.gin \
        --gin.MODEL_DIR=\"/tmp/run\" --gin.MIXTURE_OR_TASK_NAME=\"lifelong_all\" \
        --gin.TASK_FEATURE_LENGTHS="{'targets': 64}" --gin.TRAIN_STEPS=100 --gin.BATCH_SIZE=8

From Python (the lifelong runner calls this once per phase)::

    result = train.train(model_dir=..., mixture_or_task_name=..., task_feature_lengths=...,
                         train_steps=..., batch_size=..., regularizers=[...],
                         optimizer_wrapper=..., initial_state=..., extra_metadata={...})

Everything that can be checked is checked before anything is written to ``model_dir``: gin
bindings, required macros, task names, the vocabulary, the model/mesh/batch combination and the
optimizer settings. Then: ``model_dir/config.gin`` (operative config), resume or initialise, train,
checkpoint, evaluate. See docs/training.md.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

from clu.data import TfDatasetIterator
import gin
import jax

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import gin_utils
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.data import pipeline
from lifelong_moe_jax.data import vocab as vocab_lib
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.training import evaluation
from lifelong_moe_jax.training import losses
from lifelong_moe_jax.training import metrics as metrics_lib
from lifelong_moe_jax.training import optimizers
from lifelong_moe_jax.training import train_state as ts
from lifelong_moe_jax.training import trainer as trainer_lib

DATA_POSITIONS = ("iterator", "skip")
RESERVED_METADATA_KEYS = ("format_version", "step", "vocabulary_fingerprint", "model_config",
                          "optimizer", "mesh", "process_count", "data")
DATA_SETTINGS = ("mixture_or_task_name", "task_feature_lengths", "batch_size", "seed", "pack",
                 "process_count")


@dataclasses.dataclass
class TrainResult:
  """What ``train`` returns.

  Attributes:
    state: the final train state (sharded).
    start_step: the step training started from.
    start_source: how the start state was obtained (see ``trainer.StartPoint.source``).
    model_dir: the run folder.
    trainer: the ``Trainer`` (model, partitioner, shardings) for follow-up work.
  """
  state: ts.TrainState
  start_step: int
  start_source: str
  model_dir: str
  trainer: trainer_lib.Trainer


def _validate_args(train_steps: int, batch_size: int, task_feature_lengths: Mapping[str, int],
                   data_position: str, config: ModelConfig) -> None:
  if train_steps <= 0:
    raise ValueError(f"TRAIN_STEPS must be positive, got {train_steps}.")
  if batch_size <= 0 or batch_size % jax.process_count():
    raise ValueError(f"BATCH_SIZE={batch_size} must be positive and divisible by the "
                     f"{jax.process_count()} processes.")
  if data_position not in DATA_POSITIONS:
    raise ValueError(f"train.data_position must be one of {DATA_POSITIONS}, got {data_position!r}.")
  if set(task_feature_lengths) != {"targets"}:
    raise ValueError("TASK_FEATURE_LENGTHS must be {'targets': LENGTH} for decoder-only LM "
                     f"tasks, got {dict(task_feature_lengths)}.")
  if task_feature_lengths["targets"] > config.max_length:
    raise ValueError(f"TASK_FEATURE_LENGTHS['targets']={task_feature_lengths['targets']} exceeds "
                     f"ModelConfig.max_length={config.max_length}.")


def _check_data_settings(saved: Mapping[str, Any], current: Mapping[str, Any], step_dir: str) -> None:
  diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {current[k]!r}" for k in DATA_SETTINGS
           if k in saved and saved.get(k) != current[k]]
  if diffs:
    raise ValueError(
        f"Cannot resume {step_dir} exactly: the input pipeline changed ({'; '.join(diffs)}). "
        "Use the original settings, or start a new MODEL_DIR from this checkpoint with "
        "train.restore_checkpoint_path (and train.restore_mode = 'full' to keep the optimizer).")


@gin.configurable(denylist=["initial_state", "regularizers", "optimizer_wrapper", "extra_metadata"])
def train(*, model_dir: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED, model_config: ModelConfig | None = None,
          mesh_config: partitioning.MeshConfig | None = None,
          optimizer: optimizers.Optimizer | None = None,
          checkpoint_config: checkpoints.CheckpointConfig | None = None,
          seed: int = 0, data_seed: int | None = None, data_position: str = "iterator",
          pack: bool = True, data_dir: str | None = None,
          summary_every_steps: int = 100, log_every_steps: int = 100,
          eval_every_steps: int = 0, extra_eval_tasks: Sequence[str] = (),
          eval_batch_size: int | None = None, eval_max_batches: int | None = 20,
          restore_checkpoint_path: str | None = None, restore_mode: str = "params",
          initial_state: ts.TrainState | None = None,
          regularizers: Sequence[losses.Regularizer] = (),
          optimizer_wrapper: optimizers.OptimizerWrapper | None = None,
          extra_metadata: Mapping[str, Any] | None = None) -> TrainResult:
  """Trains (or resumes training of) a model in ``model_dir``.

  Args:
    model_dir: run folder (config.gin, checkpoints/, train/, eval/).
    mixture_or_task_name: registered seqio task or mixture to train on.
    task_feature_lengths: ``{"targets": LENGTH}``.
    train_steps: total steps of the run (resume continues up to it).
    batch_size: global batch size (sequences per step, over all processes).
    model_config: default ``ModelConfig()`` from gin; ``vocab_size`` is set from the vocabulary.
    mesh_config: default ``MeshConfig()`` from gin.
    optimizer: default ``optimizers.create_optimizer(train_steps=train_steps)`` from gin.
    checkpoint_config: default ``CheckpointConfig()`` from gin.
    seed: params init and per-step rng.
    data_seed: shuffling/mixing seed (default ``seed``).
    data_position: "iterator" (save tf.data iterator state) or "skip" (re-read and skip).
    pack: pack documents into rows.
    data_dir: prepared data dir (default: --data_dir / env / ./data).
    summary_every_steps / log_every_steps: TensorBoard+JSONL summaries / progress lines.
    eval_every_steps: in-training eval interval (0: no in-training eval).
    extra_eval_tasks: tasks/mixtures evaluated besides the training mixture's tasks.
    eval_batch_size: default ``batch_size``.
    eval_max_batches: per-task eval batch limit (None: whole validation split).
    restore_checkpoint_path: start from this checkpoint when ``model_dir`` has none.
    restore_mode: "params" (fresh optimizer, step 0) or "full" (optimizer and step as saved).
    initial_state: start from this state when ``model_dir`` has no checkpoint (Python only).
    regularizers: extra loss terms (Python only; see ``losses.Regularizer``).
    optimizer_wrapper: ``tx -> tx`` around the optimizer (Python only; e.g. freezing).
    extra_metadata: JSON-able dict merged into every checkpoint's metadata (Python only).
  Returns:
    A ``TrainResult``.
  Raises:
    ValueError (and subclasses such as checkpoints.CheckpointMismatchError): invalid settings,
      raised before anything is written when they can be known up front.
    trainer.NonFiniteLossError: NaN/Inf loss; the latest checkpoint stays the last good one.
  """
  # ---------------------------------------------------------------- validation (writes nothing)
  extra_metadata = dict(extra_metadata or {})
  clash = sorted(set(extra_metadata) & set(RESERVED_METADATA_KEYS))
  if clash:
    raise ValueError(f"extra_metadata keys {clash} are reserved; rename them.")
  data_seed = seed if data_seed is None else data_seed
  task_feature_lengths = dict(task_feature_lengths)
  vocabulary = vocab_lib.get_vocabulary(data_dir=data_dir)
  fingerprint = vocab_lib.vocabulary_fingerprint(vocabulary)
  model = lm.build_model(model_config or ModelConfig(), vocabulary.vocab_size)
  _validate_args(train_steps, batch_size, task_feature_lengths, data_position, model.config)
  pipeline.validate_task_name(mixture_or_task_name)
  eval_tasks = (evaluation.eval_task_names(mixture_or_task_name, extra_eval_tasks)
                if eval_every_steps else [])
  mesh = partitioning.create_mesh(mesh_config or partitioning.MeshConfig())
  partitioning.validate_model_for_mesh(model.config, mesh)
  partitioning.validate_batch_for_mesh(batch_size, mesh)
  partitioner = partitioning.Partitioner(mesh)
  optimizer = optimizer or optimizers.create_optimizer(train_steps=train_steps)
  checkpoint_config = checkpoint_config or checkpoints.CheckpointConfig()
  loop = trainer_lib.LoopConfig(summary_every_steps, log_every_steps, eval_every_steps)
  trainer = trainer_lib.Trainer(model, partitioner, optimizer, seed=seed,
                                regularizers=regularizers, optimizer_wrapper=optimizer_wrapper)
  evaluator = (evaluation.Evaluator(model, partitioner, eval_tasks, task_feature_lengths,
                                    eval_batch_size or batch_size, max_batches=eval_max_batches,
                                    data_dir=data_dir) if eval_tasks else None)
  is_primary = jax.process_index() == 0
  metrics_lib.log_info("Model: %s; mesh %s; %d processes; global batch %d x %d.",
                       model.config, dict(mesh.shape), jax.process_count(), batch_size,
                       task_feature_lengths["targets"])

  # ---------------------------------------------------------------- start (first writes)
  if is_primary:
    gin_utils.write_operative_config(model_dir)
  checkpointer = checkpoints.Checkpointer(model_dir, checkpoint_config)
  train_writer = metrics_lib.MetricsWriter(os.path.join(model_dir, "train"), enabled=is_primary)
  eval_writer = metrics_lib.MetricsWriter(os.path.join(model_dir, "eval"), enabled=is_primary)
  try:
    start = trainer.restore_or_initialize(
        checkpointer, initial_state=initial_state, restore_checkpoint_path=restore_checkpoint_path,
        restore_mode=restore_mode, vocabulary_fingerprint=fingerprint)
    start_step = int(start.state.step)
    metrics_lib.log_info("Start state: %s at step %d%s.", start.source, start_step,
                         f" ({start.step_dir})" if start.step_dir else "")
    train_writer.truncate_after(start_step)
    eval_writer.truncate_after(start_step)

    data_settings = {"mixture_or_task_name": mixture_or_task_name,
                     "task_feature_lengths": task_feature_lengths, "batch_size": batch_size,
                     "seed": data_seed, "pack": pack, "process_count": jax.process_count()}
    saved_data = start.metadata.get("data", {}) if start.source == "resumed" else {}
    if saved_data:
      _check_data_settings(saved_data, data_settings, start.step_dir)
    consumed = int(saved_data.get("batches_consumed", 0))
    ds = pipeline.get_dataset(
        mixture_or_task_name, task_feature_lengths, "train", batch_size // jax.process_count(),
        shuffle=True, seed=data_seed, repeat=True, pack=pack, shard_index=jax.process_index(),
        num_shards=jax.process_count(), data_dir=data_dir)
    restored_position = False
    if data_position == "iterator" and consumed:
      data_iter = TfDatasetIterator(ds, checkpoint=True)
      restored_position = checkpoints.restore_data_iterator(start.step_dir, data_iter)
    if not restored_position:
      if consumed:
        metrics_lib.log_info("Skipping %d consumed batches to restore the data position.",
                             consumed)
        ds = ds.skip(consumed)
      data_iter = TfDatasetIterator(ds, checkpoint=data_position == "iterator")

    def metadata_fn(step: int, batches_consumed: int) -> dict[str, Any]:
      return {"format_version": checkpoints.METADATA_FORMAT_VERSION,
              "vocabulary_fingerprint": fingerprint,
              "model_config": dataclasses.asdict(model.config), "optimizer": optimizer.name,
              "mesh": dict(mesh.shape), "process_count": jax.process_count(),
              "data": dict(data_settings, data_position=data_position,
                           batches_consumed=batches_consumed),
              **extra_metadata}

    def evaluate_fn(step: int, params: Any) -> None:
      evaluation.write_results(eval_writer, step, evaluator.evaluate(params))

    aux_states = trainer.init_aux_states(start.state)
    state = trainer.fit(
        start.state, data_iter, train_steps=train_steps, aux_states=aux_states, loop=loop,
        checkpointer=checkpointer, metadata_fn=metadata_fn,
        data_iterator=data_iter if data_position == "iterator" else None,
        batches_consumed=consumed, writer=train_writer,
        evaluate_fn=evaluate_fn if evaluator is not None else None)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()
    train_writer.close()
    eval_writer.close()
  metrics_lib.log_info("Finished at step %d; checkpoints in %s.", int(state.step),
                       checkpointer.directory)
  return TrainResult(state=state, start_step=start_step, start_source=start.source,
                     model_dir=model_dir, trainer=trainer)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise gin_utils.GinConfigError(f"Unexpected arguments: {argv[1:]}")
  gin_utils.apply_runtime_flags()
  import tasks  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  gin_utils.parse_from_flags()
  train()


if __name__ == "__main__":
  gin_utils.run(main)
