r"""Pretraining CLI (t5x-style): ``python -m lifelong_moe_jax.train``.

    python -m lifelong_moe_jax.train --gin_file=models/tiny.gin --gin_file=runs/pretrain.gin \
        --gin.MODEL_DIR=\"/tmp/run\" --gin.MIXTURE_OR_TASK_NAME=\"lifelong_all\" \
        --gin.TASK_FEATURE_LENGTHS="{'targets': 64}" --gin.TRAIN_STEPS=100 --gin.BATCH_SIZE=8

Gin configures ``train`` (this module's entry point, registered only here) and the config classes
(``ModelConfig``, ``MeshConfig``, ``create_optimizer``, ``CheckpointConfig``); ``train`` builds the
model, mesh and optimizer from them and calls the library entry point
``lifelong_moe_jax.training.run.train_model`` (docs/training.md). Task modules are imported first
(``--tasks_module``, default ``tasks``). The operative config goes to ``MODEL_DIR/config.gin`` once
every check has passed.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import gin

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import gin_utils
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.data import vocab as vocab_lib
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.training import optimizers
from lifelong_moe_jax.training import run


def train(
  *,
  model_dir: str = gin.REQUIRED,
  mixture_or_task_name: str = gin.REQUIRED,
  task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
  train_steps: int = gin.REQUIRED,
  batch_size: int = gin.REQUIRED,
  model_config: ModelConfig | None = None,
  mesh_config: partitioning.MeshConfig | None = None,
  optimizer: optimizers.Optimizer | None = None,
  checkpoint_config: checkpoints.CheckpointConfig | None = None,
  data_dir: str | None = None,
  data_shards: int | None = None,
  seed: int = 0,
  data_seed: int | None = None,
  data_position: str = "iterator",
  pack: bool = True,
  summary_every_steps: int = 100,
  log_every_steps: int = 100,
  eval_every_steps: int = 0,
  extra_eval_tasks: Sequence[str] = (),
  eval_batch_size: int | None = None,
  eval_max_batches: int | None = 20,
  restore_checkpoint_path: str | None = None,
  restore_mode: str = "params",
  initial_state: Any = None,
  regularizers: Sequence[Any] = (),
  optimizer_wrapper: Any = None,
  extra_metadata: Mapping[str, Any] | None = None,
) -> run.TrainResult:
  """Builds the run's objects from gin and trains (see ``run.train_model`` for ``settings``).

  Args:
    model_dir: run folder (config.gin, checkpoints/, train/, eval/).
    mixture_or_task_name: registered seqio task or mixture.
    task_feature_lengths: ``{"targets": LENGTH}``.
    train_steps: total steps of the run.
    batch_size: global batch size.
    model_config: default ``ModelConfig()`` from gin; ``vocab_size`` comes from the vocabulary.
    mesh_config: default ``MeshConfig()`` from gin.
    optimizer: default ``optimizers.create_optimizer(train_steps=train_steps)`` from gin.
    checkpoint_config: default ``CheckpointConfig()`` from gin.
    data_dir: prepared data dir (default: --data_dir / env / ./data).
    data_shards: input shards of the global batch (default: one per process); equal values give
      equal global batches whatever the process count (``run.resolve_data_shards``).
    seed ... extra_metadata: as in ``run.train_model`` (gin binds the plain ones; the Python-only
      ``initial_state``, ``regularizers``, ``optimizer_wrapper`` and ``extra_metadata`` are denied
      to gin).
  """
  vocabulary = vocab_lib.get_vocabulary(data_dir=data_dir)
  model = lm.build_model(model_config or ModelConfig(), vocabulary.vocab_size)
  mesh = partitioning.create_mesh(mesh_config or partitioning.MeshConfig())
  return run.train_model(
    model=model,
    partitioner=partitioning.Partitioner(mesh),
    optimizer=optimizer or optimizers.create_optimizer(train_steps=train_steps),
    vocabulary=vocabulary,
    model_dir=model_dir,
    mixture_or_task_name=mixture_or_task_name,
    task_feature_lengths=task_feature_lengths,
    train_steps=train_steps,
    batch_size=batch_size,
    checkpoint_config=checkpoint_config or checkpoints.CheckpointConfig(),
    data_dir=data_dir,
    data_shards=data_shards,
    write_run_config=gin_utils.write_operative_config,
    seed=seed,
    data_seed=data_seed,
    data_position=data_position,
    pack=pack,
    summary_every_steps=summary_every_steps,
    log_every_steps=log_every_steps,
    eval_every_steps=eval_every_steps,
    extra_eval_tasks=extra_eval_tasks,
    eval_batch_size=eval_batch_size,
    eval_max_batches=eval_max_batches,
    restore_checkpoint_path=restore_checkpoint_path,
    restore_mode=restore_mode,
    initial_state=initial_state,
    regularizers=regularizers,
    optimizer_wrapper=optimizer_wrapper,
    extra_metadata=extra_metadata,
  )


def configurable_train():
  """``train`` registered with gin as ``train`` (its bindings: ``train.batch_size = ...``)."""
  return gin.external_configurable(
    train,
    name="train",
    denylist=["initial_state", "regularizers", "optimizer_wrapper", "extra_metadata"],
  )


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise gin_utils.GinConfigError(f"Unexpected arguments: {argv[1:]}")
  gin_utils.apply_runtime_flags()
  gin_utils.import_task_modules()
  train_fn = configurable_train()
  gin_utils.parse_from_flags()
  train_fn()


if __name__ == "__main__":
  gin_utils.run(main)
