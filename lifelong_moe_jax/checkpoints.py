"""Orbax checkpoints of the train state, the input position and a JSON metadata record.

Layout (one folder per saved step, written atomically by orbax)::

    MODEL_DIR/checkpoints/<step>/
        state/       the TrainState pytree (params, opt_state, step, rng), one tensorstore array
                     per leaf; every process writes its own shards (multi-host safe)
        data/        the tf.data iterator position, one file per process: process_<i>-of-<n>.*
                     (absent when the data position is tracked by skipping, see below)
        metadata/    JSON: vocabulary fingerprint, ModelConfig, data settings, mesh, caller extras
        _CHECKPOINT_METADATA
        _MANIFEST.json  sizes and sha256 of every file, written once orbax has finalized the step;
                     restores verify against it and fall back past damaged steps (moved aside to
                     <step>.damaged-<n>), see checkpoint_manifest.py and docs/reliability.md

Restores are sharded: each array is read directly into the sharding of its target leaf, so no
process materialises the whole state. Before reading arrays the stored tree is compared with the
target: a different tree or shape raises ``CheckpointMismatchError`` naming the first differing
params; a different vocabulary raises ``ValueError``; nothing is ever silently re-initialised.

Data position. ``data_position="iterator"`` (default) saves the tf.data iterator state of every
process (``clu.data.TfDatasetIterator``: shuffle buffers and file offsets; O(buffer), independent of
the step), so resume cost does not grow with the run. ``"skip"`` saves nothing and resumes by
re-reading and discarding ``step`` batches (for pipelines with non-checkpointable ops).

This module holds the layout, locating, metadata, shape checks and sharded restores (the read
side); ``checkpoint_manager`` holds the ``Checkpointer`` of a run and ``save_state`` (the write
side).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterator, Mapping, Sequence

from absl import logging
from etils import epath
import gin
import jax
import orbax.checkpoint as ocp
import seqio

from lifelong_moe_jax import checkpoint_manifest
from lifelong_moe_jax import param_tree
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.data import vocab as vocab_lib
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig

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


CheckpointDamagedError = checkpoint_manifest.CheckpointDamagedError
# Files every step holds; checked even when a step has no integrity manifest.
REQUIRED_FILES = (f"{STATE_ITEM}/_METADATA", f"{METADATA_ITEM}/metadata")


class CheckpointReadError(CheckpointDamagedError):
  """Reading a checkpoint step failed: its files are damaged or unreadable."""

  def __init__(self, step_dir: str, what: str, cause: BaseException):
    root = cause  # the innermost cause names the file and byte range (tensorstore)
    while (root.__cause__ or root.__context__) is not None:
      root = root.__cause__ or root.__context__
    lines = str(root).strip().splitlines()
    self.step_dir = step_dir
    self.detail = f"reading {what} failed: {type(root).__name__}: {lines[0][:300] if lines else ''}"
    super().__init__(
      f"Cannot read checkpoint {step_dir} ({self.detail}). The step is damaged or "
      "unreadable: use another step, or restore it from a backup."
    )


@contextlib.contextmanager
def _reading(step_dir: epath.PathLike, what: str) -> Iterator[None]:
  """Turns a failure to read ``what`` of a checkpoint into a one-line ``CheckpointReadError``
  (orbax and tensorstore raise many types); mismatch errors pass through."""
  try:
    yield
  except (CheckpointMismatchError, CheckpointDamagedError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointReadError(os.fspath(step_dir), what, e) from e


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
        "Resume with the same process count, or set train.data_position = 'skip'."
      )
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


# ------------------------------------------------------------------------- configuration and paths
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
      raise ValueError(
        f"CheckpointConfig.save_interval_steps must be positive, got {self.save_interval_steps}."
      )
    if self.max_to_keep is not None and self.max_to_keep <= 0:
      raise ValueError(
        f"CheckpointConfig.max_to_keep must be positive or None, got {self.max_to_keep}."
      )


def absolute(path: epath.PathLike) -> str:
  """``path`` made absolute when it is local (orbax refuses relative checkpoint paths); URLs such as
  ``gs://bucket/run`` are returned unchanged."""
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)


def checkpoints_dir(model_dir: str) -> str:
  return os.path.join(absolute(model_dir), CHECKPOINTS_DIR)


# ----------------------------------------------------------------------------------- locating
def _is_step_dir(path: epath.Path) -> bool:
  return (path / STATE_ITEM).exists() or (path / METADATA_ITEM).exists()


def resolve_step_dir(path: str, step: int | None = None) -> str:
  """The step folder a path designates: a step dir itself, or the latest (or ``step``) checkpoint
  under ``MODEL_DIR`` or ``MODEL_DIR/checkpoints``.

  A step found under a folder is size-checked against its integrity manifest: a damaged latest step
  is skipped with one warning for the newest intact one (nothing is moved: this may run beside the
  trainer); a damaged requested ``step`` is an error. A step dir given itself is returned as is
  (reading a damaged one raises ``CheckpointReadError``).

  Raises:
    CheckpointNotFoundError: no complete checkpoint there.
    CheckpointDamagedError: the requested step, or every step, is damaged.
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
      "checkpoints/<step> folder."
    )
  if step is not None and step not in steps:
    raise CheckpointNotFoundError(f"No checkpoint for step {step} under {root}; saved: {steps}.")
  return _checked_step_dir(root, steps, step)


# Damaged step folders already named in a warning by ``resolve_step_dir``; when
# ``checkpoint_manager.Checkpointer`` moves them aside it logs that at info level, not again as a
# warning.
WARNED_DAMAGED: set[str] = set()


def _checked_step_dir(root: epath.Path, steps: Sequence[int], step: int | None) -> str:
  """``root/<step>`` (default: the newest intact step) after a size check against its manifest."""
  if step is not None:
    check = checkpoint_manifest.verify_step(
      root / str(step), level="sizes", required=REQUIRED_FILES
    )
    if not check.ok:
      raise CheckpointDamagedError(
        f"Checkpoint step {step} in {root} is damaged ({check.problem}); use another step "
        f"(saved: {list(steps)}) or restore it from a backup."
      )
    return str(root / str(step))
  found, damaged = checkpoint_manifest.find_intact_step(
    root, steps, level="sizes", required=REQUIRED_FILES
  )
  if found is None:
    raise CheckpointDamagedError(checkpoint_manifest.none_intact_message(root, damaged))
  if not {d.step_dir for d in damaged} <= WARNED_DAMAGED:
    WARNED_DAMAGED.update(d.step_dir for d in damaged)
    logging.warning("%s", checkpoint_manifest.fallback_warning(damaged, None, found))
  return str(root / str(found))


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
def stored_shapes(step_dir: str) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{"params/layers_1/moe/wi": (shape, dtype), ...}`` of the saved state, read from metadata."""
  with _reading(step_dir, f"{STATE_ITEM} metadata"):
    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(absolute(step_dir)) / STATE_ITEM)
  tree = getattr(meta, "tree", meta)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {param_tree.path_str(p): (tuple(leaf.shape), str(leaf.dtype)) for p, leaf in leaves}


def target_shapes(target: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
  leaves = jax.tree_util.tree_flatten_with_path(target)[0]
  return {param_tree.path_str(p): (tuple(leaf.shape), str(leaf.dtype)) for p, leaf in leaves}


def _config_diff(metadata: Mapping[str, Any], model_config: Mapping[str, Any] | None) -> str:
  saved = metadata.get("model_config")
  if not saved or not model_config:
    return ""
  diffs = [
    f"{k}: checkpoint {saved.get(k)!r} vs current {model_config.get(k)!r}"
    for k in sorted(set(saved) | set(model_config))
    if saved.get(k) != model_config.get(k)
  ]
  return ("\nModelConfig differences: " + "; ".join(diffs)) if diffs else ""


def compare_shapes(stored: Mapping[str, tuple], wanted: Mapping[str, tuple]) -> list[str]:
  """Human-readable differences between two ``{path: (shape, dtype)}`` maps, params first."""
  problems = []
  for name, (shape, _) in wanted.items():
    if name not in stored:
      problems.append(f"{name}: missing from the checkpoint (model expects shape {shape})")
    elif tuple(stored[name][0]) != tuple(shape):
      problems.append(f"{name}: checkpoint shape {tuple(stored[name][0])} vs model shape {shape}")
  problems += [
    f"{name}: in the checkpoint but not in the model" for name in stored if name not in wanted
  ]
  problems.sort(key=lambda p: not p.startswith("params/"))  # params first: they name the cause
  return problems


def format_problems(problems: Sequence[str]) -> str:
  listed = "\n  ".join(problems[:_MAX_LISTED])
  more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
  return f"  {listed}{more}"


def check_compatible(
  step_dir: str,
  target: PyTree,
  *,
  only_prefix: str | None = None,
  model_config: Mapping[str, Any] | None = None,
) -> None:
  """Raises ``CheckpointMismatchError`` when the saved tree/shapes differ from ``target``.

  Args:
    step_dir: checkpoint step folder.
    target: the pytree to restore into (arrays or ``ShapeDtypeStruct``), paths as saved.
    only_prefix: compare only saved leaves under this path prefix (e.g. "params").
    model_config: current ``ModelConfig`` as a dict, to list config differences in the message.
  """
  stored = stored_shapes(step_dir)
  if only_prefix:
    stored = {
      k: v for k, v in stored.items() if k == only_prefix or k.startswith(only_prefix + "/")
    }
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
    "surgery), or use a fresh MODEL_DIR."
  )


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
    lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), target
  )


def restore_tree(
  step_dir: str,
  target: PyTree,
  *,
  partial: bool = False,
  model_config: Mapping[str, Any] | None = None,
  only_prefix: str | None = None,
) -> PyTree:
  """Validates, then restores the saved state (or, ``partial``, a sub-tree of it) into ``target``.

  Args:
    step_dir: checkpoint step folder.
    target: pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` (where each leaf goes).
    partial: ``target`` holds only some top-level entries (e.g. ``{"params": ...}``).
    model_config: for the mismatch message.
    only_prefix: with ``partial``, the saved sub-tree compared against ``target``.
  """
  check_compatible(step_dir, target, only_prefix=only_prefix, model_config=model_config)
  with (
    _reading(step_dir, f"{STATE_ITEM} arrays"),
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr,
  ):
    return ckptr.restore(
      epath.Path(absolute(step_dir)) / STATE_ITEM,
      args=ocp.args.PyTreeRestore(
        target, restore_args=_restore_args(target), partial_restore=partial
      ),
    )


def restore_params(
  step_dir: str, abstract_params: PyTree, model_config: Mapping[str, Any] | None = None
) -> PyTree:
  """Only the params of a saved train state, sharded like ``abstract_params``."""
  return restore_tree(
    step_dir,
    {"params": abstract_params},
    partial=True,
    model_config=model_config,
    only_prefix="params",
  )["params"]


def restore_model_params(step_dir: str, model: Any, partitioner: Any) -> PyTree:
  """The params of a checkpoint for ``model`` (a ``LanguageModel``), read directly into their
  shardings on ``partitioner``'s mesh; the model config is checked against the metadata."""
  return restore_params(
    step_dir,
    partitioning.sharded_abstract_params(model, partitioner),
    model_config=dataclasses.asdict(model.config),
  )


def restore_data_iterator(step_dir: str, iterator: Any) -> bool:
  """Restores ``iterator``'s position from ``step_dir``; False when no position was saved."""
  item = epath.Path(absolute(step_dir)) / DATA_ITEM
  if not item.exists():
    return False
  with _reading(step_dir, "the data position"):
    DataIteratorHandler().restore(item, DataIteratorRestore(iterator))
  return True


# ----------------------------------------------------------------------------------- loading
@dataclasses.dataclass
class LoadedCheckpoint:
  """A restored model: params sharded by ``partitioner``."""

  model: lm.LanguageModel
  params: Any
  vocabulary: seqio.Vocabulary
  partitioner: partitioning.Partitioner
  step_dir: str
  step: int
  metadata: dict[str, Any]


def model_config_from_metadata(metadata: Mapping[str, Any]) -> ModelConfig | None:
  """The ModelConfig saved with a checkpoint (``metadata["model_config"]``), or None."""
  saved = metadata.get("model_config")
  if not saved:
    return None
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**{k: v for k, v in saved.items() if k in names})


def load_checkpoint(
  checkpoint_path: str,
  *,
  model_config: ModelConfig | None = None,
  mesh_config: partitioning.MeshConfig | None = None,
  data_dir: str | None = None,
) -> LoadedCheckpoint:
  """Restores the params of a checkpoint for inference.

  Args:
    checkpoint_path: a step dir, ``MODEL_DIR/checkpoints`` or ``MODEL_DIR`` (latest step).
    model_config: the model; default: the config saved in the checkpoint's metadata (so expanded
      lifelong checkpoints load with their expert count), else ``ModelConfig()`` from gin.
    mesh_config: the mesh (default ``MeshConfig()`` from gin).
    data_dir: where the vocabulary is (None: the usual resolution).
  Raises:
    CheckpointNotFoundError / CheckpointMismatchError / ValueError (vocabulary).
  """
  step_dir = resolve_step_dir(checkpoint_path)
  metadata = read_metadata(step_dir)
  vocabulary = vocab_lib.get_vocabulary(data_dir=data_dir)
  check_vocabulary(step_dir, vocab_lib.vocabulary_fingerprint(vocabulary))
  config = model_config or model_config_from_metadata(metadata) or ModelConfig()
  model = lm.build_model(config, vocabulary.vocab_size)
  mesh = partitioning.create_mesh(mesh_config or partitioning.MeshConfig())
  partitioning.validate_model_for_mesh(model.config, mesh)
  partitioner = partitioning.Partitioner(mesh)
  params = restore_model_params(step_dir, model, partitioner)
  return LoadedCheckpoint(
    model, params, vocabulary, partitioner, step_dir, int(metadata.get("step", 0)), metadata
  )
