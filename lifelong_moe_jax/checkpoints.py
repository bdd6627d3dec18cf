"""Orbax checkpoints of the train state, the input position and a JSON metadata record.

Layout (one folder per saved step, written atomically by orbax)::

    MODEL_DIR/checkpoints/<step>/
        state/       the TrainState pytree (params, opt_state, step, rng), one tensorstore array
                     per leaf; every process writes its own shards (multi-host safe)
        data/        the tf.data iterator position, one file per process: process_<i>-of-<n>.*
                     (absent when the data position is tracked by skipping, see below)
        metadata/    JSON: vocabulary fingerprint, ModelConfig, data settings, mesh, caller extras
        _CHECKPOINT_METADATA

Restores are sharded: each array is read directly into the sharding of its target leaf, so no
process materialises the whole state. Before reading arrays the stored tree is compared with the
target: a different tree or shape raises ``CheckpointMismatchError`` naming the first differing
params; a different vocabulary raises ``ValueError``; nothing is ever silently re-initialised.

Data position. ``data_position="iterator"`` (default) saves the tf.data iterator state of every
process (``clu.data.TfDatasetIterator``: shuffle buffers and file offsets; O(buffer), independent of
the step), so resume cost does not grow with the run. ``"skip"`` saves nothing and resumes by
re-reading and discarding ``step`` batches (for pipelines with non-checkpointable ops).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

from absl import logging
from etils import epath
import gin
import jax
import orbax.checkpoint as ocp

from lifelong_moe_jax.data import vocab as vocab_lib

PyTree = Any
CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM, DATA_ITEM, METADATA_ITEM = "state", "data", "metadata"
METADATA_FORMAT_VERSION = 1
RESTORE_MODES = ("params", "full")
_MAX_LISTED = 8


class CheckpointMismatchError(ValueError):
  """A checkpoint's tree or shapes differ from the model/optimizer being restored."""


class CheckpointNotFoundError(FileNotFoundError):
  """No (complete) checkpoint at the given path."""


# ------------------------------------------------------------------------------ data iterator item
class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves/restores a ``clu.data.TfDatasetIterator`` per process (``process_<i>-of-<n>``).

  Saving is synchronous (called before ``CheckpointManager.save`` returns), so the saved position
  is exactly the number of batches consumed at the saved step.
  """

  @staticmethod
  def filename(directory: epath.PathLike) -> epath.Path:
    return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}"

  def save(self, directory: epath.Path, args: "DataIteratorSave") -> None:
    args.iterator.save(self.filename(directory))

  def restore(self, directory: epath.Path, args: "DataIteratorRestore") -> Any:
    path = self.filename(directory)
    if not epath.Path(str(path) + ".index").exists():
      saved = sorted(p.name.split(".")[0] for p in epath.Path(directory).glob("process_*.index"))
      raise CheckpointMismatchError(
          f"No data position for this process at {path} (saved: {saved}). The checkpoint was "
          f"written by a different number of processes than the current {jax.process_count()}. "
          "Resume with the same process count, or set train.data_position = 'skip'.")
    args.iterator.restore(path)
    return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


# ----------------------------------------------------------------------------------- manager
@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When and how checkpoints are written.

  Attributes:
    save_interval_steps: save every N steps (the final step is always saved).
    max_to_keep: keep the newest K checkpoints (None keeps all).
    async_checkpointing: write arrays in a background thread while training continues.
    extra_save_steps: additional steps to save at (e.g. phase boundaries).
  """
  save_interval_steps: int = 1000
  max_to_keep: int | None = 3
  async_checkpointing: bool = True
  extra_save_steps: Sequence[int] = ()

  def __post_init__(self):
    if self.save_interval_steps <= 0:
      raise ValueError(f"CheckpointConfig.save_interval_steps must be positive, got "
                       f"{self.save_interval_steps}.")
    if self.max_to_keep is not None and self.max_to_keep <= 0:
      raise ValueError(f"CheckpointConfig.max_to_keep must be positive or None, got "
                       f"{self.max_to_keep}.")


def absolute(path: epath.PathLike) -> str:
  """``path`` made absolute when it is local (orbax refuses relative checkpoint paths); URLs such as
  ``gs://bucket/run`` are returned unchanged."""
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)


def checkpoints_dir(model_dir: str) -> str:
  return os.path.join(absolute(model_dir), CHECKPOINTS_DIR)


class Checkpointer:
  """The checkpoints of one run (``MODEL_DIR/checkpoints``), over an orbax ``CheckpointManager``."""

  def __init__(self, model_dir: str, config: CheckpointConfig | None = None):
    self.config = config or CheckpointConfig()
    self.directory = checkpoints_dir(model_dir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self.config.max_to_keep,
        enable_async_checkpointing=self.config.async_checkpointing,
        create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(STATE_ITEM, DATA_ITEM, METADATA_ITEM))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def should_save(self, step: int) -> bool:
    return step % self.config.save_interval_steps == 0 or step in set(self.config.extra_save_steps)

  def save(self, step: int, state: PyTree, metadata: Mapping[str, Any], *,
           data_iterator: Any = None) -> None:
    """Saves ``state`` (and the iterator position, if given) at ``step``; returns once the arrays
    are copied off the devices (writing continues in the background when async)."""
    items = {STATE_ITEM: ocp.args.PyTreeSave(state),
             METADATA_ITEM: ocp.args.JsonSave(_jsonable(dict(metadata, step=int(step))))}
    if data_iterator is not None:
      items[DATA_ITEM] = DataIteratorSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _jsonable(value: Any) -> Any:
  """Round-trips through JSON so tuples/np scalars are stored as plain JSON values."""
  return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


# ----------------------------------------------------------------------------------- locating
def _is_step_dir(path: epath.Path) -> bool:
  return (path / STATE_ITEM).exists() or (path / METADATA_ITEM).exists()


def resolve_step_dir(path: str, step: int | None = None) -> str:
  """The step folder a path designates: a step dir itself, or the latest (or ``step``) checkpoint
  under ``MODEL_DIR`` or ``MODEL_DIR/checkpoints``.

  Raises:
    CheckpointNotFoundError: no complete checkpoint there.
  """
  p = epath.Path(absolute(path))
  if _is_step_dir(p):
    return str(p)
  root = p / CHECKPOINTS_DIR if (p / CHECKPOINTS_DIR).exists() else p
  if not root.exists():
    raise CheckpointNotFoundError(f"No checkpoint at {path}: the folder does not exist.")
  steps = sorted(ocp.utils.checkpoint_steps(root))  # finalized step folders only
  if not steps:
    raise CheckpointNotFoundError(
        f"No complete checkpoint under {root}. Pass a MODEL_DIR, its checkpoints/ folder or a "
        "checkpoints/<step> folder.")
  if step is not None and step not in steps:
    raise CheckpointNotFoundError(f"No checkpoint for step {step} under {root}; saved: {steps}.")
  return str(root / str(step if step is not None else max(steps)))


def read_metadata(path: str) -> dict[str, Any]:
  """The JSON metadata saved with a checkpoint, without reading any array.

  Args:
    path: a step dir, or a MODEL_DIR / checkpoints dir (its latest checkpoint is used).
  """
  step_dir = epath.Path(resolve_step_dir(path))
  item = step_dir / METADATA_ITEM
  if not item.exists():
    raise CheckpointNotFoundError(f"Checkpoint {step_dir} has no metadata item.")
  return dict(ocp.JsonCheckpointHandler().restore(item))


# ----------------------------------------------------------------------------------- validation
def _key_str(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: Sequence[Any]) -> str:
  return "/".join(_key_str(k) for k in path)


def stored_shapes(step_dir: str) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{"params/layers_1/moe/wi": (shape, dtype), ...}`` of the saved state, read from metadata."""
  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(absolute(step_dir)) / STATE_ITEM)
  tree = getattr(meta, "tree", meta)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_str(p): (tuple(leaf.shape), str(leaf.dtype)) for p, leaf in leaves}


def target_shapes(target: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
  leaves = jax.tree_util.tree_flatten_with_path(target)[0]
  return {path_str(p): (tuple(leaf.shape), str(leaf.dtype)) for p, leaf in leaves}


def _config_diff(metadata: Mapping[str, Any], model_config: Mapping[str, Any] | None) -> str:
  saved = metadata.get("model_config")
  if not saved or not model_config:
    return ""
  diffs = [f"{k}: checkpoint {saved.get(k)!r} vs current {model_config.get(k)!r}"
           for k in sorted(set(saved) | set(model_config)) if saved.get(k) != model_config.get(k)]
  return ("\nModelConfig differences: " + "; ".join(diffs)) if diffs else ""


def compare_shapes(stored: Mapping[str, tuple], wanted: Mapping[str, tuple]) -> list[str]:
  """Human-readable differences between two ``{path: (shape, dtype)}`` maps, params first."""
  problems = []
  for name, (shape, _) in wanted.items():
    if name not in stored:
      problems.append(f"{name}: missing from the checkpoint (model expects shape {shape})")
    elif tuple(stored[name][0]) != tuple(shape):
      problems.append(f"{name}: checkpoint shape {tuple(stored[name][0])} vs model shape {shape}")
  problems += [f"{name}: in the checkpoint but not in the model" for name in stored
               if name not in wanted]
  problems.sort(key=lambda p: not p.startswith("params/"))  # params first: they name the cause
  return problems


def format_problems(problems: Sequence[str]) -> str:
  listed = "\n  ".join(problems[:_MAX_LISTED])
  more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
  return f"  {listed}{more}"


def check_compatible(step_dir: str, target: PyTree, *, only_prefix: str | None = None,
                     model_config: Mapping[str, Any] | None = None) -> None:
  """Raises ``CheckpointMismatchError`` when the saved tree/shapes differ from ``target``.

  Args:
    step_dir: checkpoint step folder.
    target: the pytree to restore into (arrays or ``ShapeDtypeStruct``), paths as saved.
    only_prefix: compare only saved leaves under this path prefix (e.g. "params").
    model_config: current ``ModelConfig`` as a dict, to list config differences in the message.
  """
  stored = stored_shapes(step_dir)
  if only_prefix:
    stored = {k: v for k, v in stored.items() if k == only_prefix or k.startswith(only_prefix + "/")}
  problems = compare_shapes(stored, target_shapes(target))
  if not problems:
    return
  try:
    meta = read_metadata(step_dir)
  except (CheckpointNotFoundError, OSError, ValueError):
    meta = {}
  raise CheckpointMismatchError(
      f"Checkpoint {step_dir} does not match the model being restored ({len(problems)} "
      f"mismatched entries):\n{format_problems(problems)}{_config_diff(meta, model_config)}\n"
      "Restore it with the model configuration it was trained with, convert it (e.g. lifelong "
      "surgery), or use a fresh MODEL_DIR.")


def check_vocabulary(step_dir: str, fingerprint: str | None) -> None:
  """Raises ValueError when the checkpoint was trained with another vocabulary."""
  if fingerprint is None:
    return
  saved = read_metadata(step_dir).get("vocabulary_fingerprint")
  if saved is None:
    logging.warning("Checkpoint %s records no vocabulary fingerprint; not checked.", step_dir)
    return
  vocab_lib.check_vocabulary_fingerprint(saved, fingerprint)


# ----------------------------------------------------------------------------------- restoring
def _restore_args(target: PyTree) -> PyTree:
  return jax.tree_util.tree_map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
      target)


def restore_tree(step_dir: str, target: PyTree, *, partial: bool = False,
                 model_config: Mapping[str, Any] | None = None,
                 only_prefix: str | None = None) -> PyTree:
  """Validates, then restores the saved state (or, ``partial``, a sub-tree of it) into ``target``.

  Args:
    step_dir: checkpoint step folder.
    target: pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` (where each leaf goes).
    partial: ``target`` holds only some top-level entries (e.g. ``{"params": ...}``).
    model_config: for the mismatch message.
    only_prefix: with ``partial``, the saved sub-tree compared against ``target``.
  """
  check_compatible(step_dir, target, only_prefix=only_prefix, model_config=model_config)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    return ckptr.restore(
        epath.Path(absolute(step_dir)) / STATE_ITEM,
        args=ocp.args.PyTreeRestore(target, restore_args=_restore_args(target),
                                    partial_restore=partial))


def restore_params(step_dir: str, abstract_params: PyTree,
                   model_config: Mapping[str, Any] | None = None) -> PyTree:
  """Only the params of a saved train state, sharded like ``abstract_params``."""
  return restore_tree(step_dir, {"params": abstract_params}, partial=True,
                      model_config=model_config, only_prefix="params")["params"]


def restore_data_iterator(step_dir: str, iterator: Any) -> bool:
  """Restores ``iterator``'s position from ``step_dir``; False when no position was saved."""
  item = epath.Path(absolute(step_dir)) / DATA_ITEM
  if not item.exists():
    return False
  DataIteratorHandler().restore(item, DataIteratorRestore(iterator))
  return True


def save_state(model_dir: str, step: int, state: PyTree, metadata: Mapping[str, Any]) -> str:
  """Saves ``state`` as ``MODEL_DIR/checkpoints/<step>`` synchronously (e.g. the result of
  checkpoint surgery, which the trainer then resumes from); returns the step folder."""
  ckpt = Checkpointer(model_dir, CheckpointConfig(async_checkpointing=False, max_to_keep=None))
  try:
    ckpt.save(step, state, dict(metadata, format_version=METADATA_FORMAT_VERSION))
  finally:
    ckpt.close()
  return ckpt.step_dir(step)
