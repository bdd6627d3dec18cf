"""The input pipeline the trainer and evaluators use: seqio task/mixture -> batched model features.

    ds = get_dataset("lifelong_all", {"targets": 512}, "train", batch_size=8,
                     shuffle=True, seed=0, repeat=True, shard_index=jax.process_index(),
                     num_shards=jax.process_count())
    batch = next(iter(ds.as_numpy_iterator()))
    batch["decoder_input_tokens"].shape == (8, 512)   # int32

Keys (from `seqio.DecoderFeatureConverter(pack=pack)`), each int32 [batch_size, length]:
`decoder_target_tokens`, `decoder_input_tokens`, `decoder_loss_weights`, and with packing also
`decoder_segment_ids` (1, 2, ... per packed document, 0 on padding) and `decoder_positions`.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import seqio
import tensorflow as tf

from lifelong_moe_jax.data import data_dir as data_dir_lib
from lifelong_moe_jax.data import distributions
from lifelong_moe_jax.data import registration
from lifelong_moe_jax.data import shards
from lifelong_moe_jax.data import tfds_builder
from lifelong_moe_jax.data import vocab

PREPARE_COMMAND = "python -m lifelong_moe_jax.data.prepare --data_dir {}"


class DataNotPreparedError(FileNotFoundError):
  """The prepared corpora or the vocabulary are missing; the message says how to build them."""


def validate_task_name(name: str) -> seqio.Task | seqio.Mixture:
  """Returns the registered task or mixture `name`.

  Tasks are registered by task modules (`tasks` by default), which the CLIs import through their
  `--tasks_module` flag and Python code imports itself; this library never imports them. Deferred
  registrations (gin-configured folders, `registration.add_deferred_registration`) run first.

  Raises:
    ValueError: unknown name; the message lists the registered tasks and mixtures and says which
      module registers tasks.
  """
  registration.run_deferred_registrations()
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  if name in seqio.MixtureRegistry.names():
    return seqio.MixtureRegistry.get(name)
  raise ValueError(
    f"Unknown task or mixture '{name}'.\n"
    f"Registered tasks: {', '.join(sorted(seqio.TaskRegistry.names())) or '(none)'}\n"
    f"Registered mixtures: {', '.join(sorted(seqio.MixtureRegistry.names())) or '(none)'}\n"
    "Tasks are registered by importing a task module: the CLIs import the modules named by "
    "--tasks_module (default: tasks, this repository's tasks/ package); in Python, `import tasks` "
    "first. Register your own with tasks.register_text_distribution(...), in a module of your own "
    "passed as --tasks_module=my_tasks, or with the gin binding "
    "register_folder_distributions.folders (see docs/data.md)."
  )


def ensure_task_data(mixture_or_task_name: str, data_dir: str | None = None) -> list[str]:
  """Makes sure the local data of every task of `mixture_or_task_name` can be read, up front.

  Run before a training run writes anything: prepared (built-in) distributions are verified, and
  distributions registered from your own files are built now (into the data dir, as on first use),
  so a missing preparation or an empty or malformed file stops the run before its MODEL_DIR is
  touched. Tasks that read other sources (TFDS catalog datasets, ...) are left to their loaders.

  Returns:
    The distributions checked.

  Raises:
    ValueError: unknown task or mixture; a user file without documents or with a malformed line
      (naming the file and line).
    DataNotPreparedError: a built-in distribution is not prepared (with the prepare command).
  """
  with data_dir_lib.using_data_dir(data_dir):
    provider = validate_task_name(mixture_or_task_name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    names = sorted(
      {
        t.source.distribution
        for t in tasks
        if isinstance(t.source, tfds_builder.LocalTextTfdsSource)
      }
    )
    missing = {}
    for name in names:
      try:
        distributions.ensure_built(name, data_dir)
      except shards.IncompleteBuildError as e:
        missing[name] = str(e).splitlines()[0]
    if missing:
      root = data_dir_lib.resolve_data_dir(data_dir)
      raise DataNotPreparedError(
        f"The data of '{mixture_or_task_name}' is not prepared in {root} "
        f"({'; '.join(missing.values())}). Run: {PREPARE_COMMAND.format(root)} "
        f"--distributions {','.join(missing)}"
      )
  return names


def ensure_prepared(
  data_dir: str | None = None,
  distribution_names: Sequence[str] = distributions.DEFAULT_DISTRIBUTIONS,
  vocabulary: bool = True,
) -> str:
  """Checks that the given distributions (and the SentencePiece model) are completely prepared.

  Returns:
    The resolved data dir.

  Raises:
    DataNotPreparedError: naming what is missing and the prepare command to run.
  """
  root = data_dir_lib.resolve_data_dir(data_dir)
  problems = []
  for name in distribution_names:
    try:
      distributions.ensure_built(name, root)
    except shards.IncompleteBuildError as e:
      problems.append(str(e).split("\n")[0])
  if vocabulary and not _vocab_complete(root):
    problems.append(f"No complete vocabulary at {vocab.model_path(root)}.")
  if problems:
    raise DataNotPreparedError(
      "The training data is not prepared:\n  "
      + "\n  ".join(problems)
      + f"\nRun: {PREPARE_COMMAND.format(root)} --distributions {','.join(distribution_names)}"
    )
  return root


def _vocab_complete(root: str) -> bool:
  return os.path.exists(vocab.model_path(root)) and os.path.exists(
    os.path.join(data_dir_lib.vocab_dir(root), shards.MARKER)
  )


def _to_int32(features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  return {k: tf.cast(v, tf.int32) for k, v in features.items()}


def get_dataset(
  mixture_or_task_name: str,
  task_feature_lengths: Mapping[str, int],
  split: str,
  batch_size: int,
  *,
  shuffle: bool,
  seed: int | None,
  repeat: bool,
  pack: bool = True,
  shard_index: int = 0,
  num_shards: int = 1,
  data_dir: str | None = None,
) -> tf.data.Dataset:
  """A batched, model-ready dataset for one host.

  Args:
    mixture_or_task_name: e.g. "lifelong_wiki_en" or "lifelong_all".
    task_feature_lengths: e.g. {"targets": 128}.
    split: "train" or "validation".
    batch_size: per-shard (per-process) batch size; the last partial batch is dropped.
    shuffle: shuffle files and examples.
    seed: shuffling/mixing seed; with a fixed seed the stream is identical across runs, so a trainer
      can resume by skipping the batches it already consumed.
    repeat: repeat forever (training) or make one pass (evaluation).
    pack: pack several documents per row (segment ids / positions added).
    shard_index: this process's shard.
    num_shards: number of processes reading disjoint shards.
    data_dir: data dir for this call (default: flag / gin / env / ./data resolution).

  Returns:
    tf.data.Dataset of dicts of int32 tensors [batch_size, length] (keys in the module docstring).

  Raises:
    ValueError: unknown task/mixture (lists registered ones), unknown split, bad sizes.
    FileNotFoundError: data or vocabulary not prepared (message gives the prepare command).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"Need 0 <= shard_index < num_shards, got {shard_index} and {num_shards}.")
  if not task_feature_lengths or any(int(v) <= 0 for v in task_feature_lengths.values()):
    raise ValueError(
      f"task_feature_lengths must map features to positive lengths, got {task_feature_lengths}."
    )
  with data_dir_lib.using_data_dir(data_dir):
    provider = validate_task_name(mixture_or_task_name)
    if split not in provider.splits:
      raise ValueError(
        f"'{mixture_or_task_name}' has no split '{split}'; available: {sorted(provider.splits)}."
      )
    ds = seqio.get_dataset(
      provider,
      task_feature_lengths=dict(task_feature_lengths),
      feature_converter=seqio.DecoderFeatureConverter(pack=pack),
      dataset_split=split,
      shuffle=shuffle,
      num_epochs=None if repeat else 1,
      shard_info=seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None,
      seed=seed,
      use_cached=False,
      verbose=False,
    )
    ds = ds.batch(batch_size, drop_remainder=True).map(_to_int32)
    return ds.prefetch(tf.data.AUTOTUNE)
