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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging
from etils import epath
import gin
import jax
from jax.experimental import multihost_utils
import numpy as np
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


class Checkpointer:
  """The checkpoints of one run (``MODEL_DIR/checkpoints``), over an orbax ``CheckpointManager``."""

  def __init__(self, model_dir: str, config: CheckpointConfig | None = None):
    self.config = config or CheckpointConfig()
    self.directory = checkpoints_dir(model_dir)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=self.config.max_to_keep,
      enable_async_checkpointing=self.config.async_checkpointing,
      create=True,
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=(STATE_ITEM, DATA_ITEM, METADATA_ITEM)
    )
    self._manifest_thread: threading.Thread | None = None

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def should_save(self, step: int) -> bool:
    return step % self.config.save_interval_steps == 0 or step in set(self.config.extra_save_steps)

  def save(
    self, step: int, state: PyTree, metadata: Mapping[str, Any], *, data_iterator: Any = None
  ) -> None:
    """Saves ``state`` (and the iterator position, if given) at ``step``; returns once the arrays
    are copied off the devices (writing continues in the background when async)."""
    items = {
      STATE_ITEM: ocp.args.PyTreeSave(state),
      METADATA_ITEM: ocp.args.JsonSave(_jsonable(dict(metadata, step=int(step)))),
    }
    if data_iterator is not None:
      items[DATA_ITEM] = DataIteratorSave(data_iterator)
    self._finish_manifest()  # the previous step's, before orbax may delete old steps
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._start_manifest(step)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()
    self._finish_manifest()

  def close(self) -> None:
    self.wait_until_finished()
    self._manager.close()

  # --------------------------------------------------------------------------- integrity
  def _start_manifest(self, step: int) -> None:
    """Records ``step``'s integrity manifest once orbax has finalized it: now when saving is
    synchronous, else in a background thread that first waits for the finalize (joined by the next
    ``save``, ``wait_until_finished`` or ``close``). The primary process writes it."""
    if jax.process_index() != 0:
      return
    if not self.config.async_checkpointing:
      self._write_manifest(step)
      return
    self._manifest_thread = threading.Thread(
      target=self._write_manifest,
      args=(step, True),
      name=f"checkpoint-manifest-{step}",
      daemon=True,
    )
    self._manifest_thread.start()

  def _write_manifest(self, step: int, wait: bool = False) -> None:
    try:
      if wait:
        self._manager.wait_until_finished()
      checkpoint_manifest.write_manifest(self.step_dir(step), step)
    except Exception as e:  # pylint: disable=broad-except  (a save error resurfaces in orbax)
      logging.warning(
        "Checkpoint step %d has no integrity manifest (%s: %s); restoring it will "
        "check it by reading it.",
        step,
        type(e).__name__,
        e,
      )

  def _finish_manifest(self) -> None:
    if self._manifest_thread is not None:
      self._manifest_thread.join()
      self._manifest_thread = None

  def _all_ok(self, ok: bool) -> bool:
    """``ok`` agreed by every process (True only if it is True everywhere)."""
    if jax.process_count() == 1:
      return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))

  def _verify(self, step_dir: str) -> checkpoint_manifest.Verification:
    """Full verification (sizes and checksums) on the primary process, shared with the others."""
    if jax.process_index() == 0:
      result = checkpoint_manifest.verify_step(step_dir, level="full", required=REQUIRED_FILES)
    else:
      result = checkpoint_manifest.Verification(step_dir, checkpoint_manifest.UNVERIFIED)
    if self._all_ok(result.ok) or not result.ok:
      return result
    return checkpoint_manifest.Verification(
      step_dir, checkpoint_manifest.DAMAGED, "damaged (see process 0's log)"
    )

  def restore_latest(self, restore_fn: Callable[[str], Any]) -> tuple[str, Any] | None:
    """``(step_dir, restore_fn(step_dir))`` for the newest intact step; None without steps.

    Steps are tried newest first: each is verified against its integrity manifest (sizes and
    checksums; a step without one must hold ``REQUIRED_FILES``), then read by ``restore_fn``. A
    mismatch, or a ``CheckpointDamagedError`` from ``restore_fn`` (e.g. ``CheckpointReadError``),
    marks the step damaged and the next older step is tried. Once a step restores, the damaged
    newer steps are moved aside (``<step>.damaged-<n>``, never deleted) and named in one warning.
    Other errors of ``restore_fn`` (vocabulary or shape mismatch) propagate unchanged.

    Raises:
      CheckpointDamagedError: there are steps but none is intact; one line naming the newest,
        nothing moved.
    """
    self.wait_until_finished()
    damaged: list[checkpoint_manifest.Verification] = []
    for step in sorted(self.all_steps(), reverse=True):
      step_dir = self.step_dir(step)
      check = self._verify(step_dir)
      if check.ok:
        try:
          result, failure = restore_fn(step_dir), None
        except CheckpointDamagedError as e:
          result, failure = None, getattr(e, "detail", str(e))
        if self._all_ok(failure is None):
          self._move_aside(damaged, step)
          return step_dir, result
        check = checkpoint_manifest.Verification(
          step_dir, checkpoint_manifest.DAMAGED, failure or "read failure on another process"
        )
      damaged.append(check)
    if damaged:
      raise CheckpointDamagedError(checkpoint_manifest.none_intact_message(self.directory, damaged))
    return None

  def _move_aside(self, damaged: Sequence[checkpoint_manifest.Verification], step: int) -> None:
    if not damaged:
      return
    if jax.process_index() == 0:
      moved = [checkpoint_manifest.move_aside(d.step_dir) for d in damaged]
      message = checkpoint_manifest.fallback_warning(damaged, moved, step)
      if {d.step_dir for d in damaged} <= _WARNED_DAMAGED:  # already warned by resolve_step_dir
        logging.info("%s", message)
      else:
        logging.warning("%s", message)
      _WARNED_DAMAGED.difference_update(d.step_dir for d in damaged)  # a new step may take the name
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("lifelong_moe_jax:checkpoints_moved_aside")
    self._manager.reload()


def _jsonable(value: Any) -> Any:
  """Round-trips through JSON so tuples/np scalars are stored as plain JSON values."""
  return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


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


_WARNED_DAMAGED: set[str] = set()


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
  if not {d.step_dir for d in damaged} <= _WARNED_DAMAGED:
    _WARNED_DAMAGED.update(d.step_dir for d in damaged)
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


RESERVED_METADATA_KEYS = (
  "format_version",
  "step",
  "vocabulary_fingerprint",
  "model_config",
  "optimizer",
  "mesh",
  "process_count",
  "data",
)


def state_metadata(
  *,
  model_config: Any,
  vocabulary_fingerprint: str | None,
  optimizer_name: str,
  mesh: Any,
  data: Mapping[str, Any] | None = None,
  extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """The metadata saved with every train state (the one definition of its fields).

  Args:
    model_config: the ``ModelConfig`` of the saved params.
    vocabulary_fingerprint: ``vocab.vocabulary_fingerprint`` of the data's vocabulary.
    optimizer_name: ``Optimizer.name`` of the saved optimizer state.
    mesh: the ``jax.sharding.Mesh`` (or its ``{axis: size}``) the state was trained on.
    data: the input pipeline's settings and position (trainer checkpoints; absent after surgery).
    extra: more keys (e.g. ``"lifelong"``: the phase record); may not use a reserved key.
  Raises:
    ValueError: ``extra`` uses a key of ``RESERVED_METADATA_KEYS``.
  """
  extra = dict(extra or {})
  clash = sorted(set(extra) & set(RESERVED_METADATA_KEYS))
  if clash:
    raise ValueError(f"Metadata keys {clash} are reserved; rename them.")
  shape = getattr(mesh, "shape", mesh)
  out = {
    "format_version": METADATA_FORMAT_VERSION,
    "vocabulary_fingerprint": vocabulary_fingerprint,
    "model_config": dataclasses.asdict(model_config),
    "optimizer": optimizer_name,
    "mesh": dict(shape),
    "process_count": jax.process_count(),
  }
  if data is not None:
    out["data"] = dict(data)
  out.update(extra)
  return out


def save_state(model_dir: str, step: int, state: PyTree, metadata: Mapping[str, Any]) -> str:
  """Saves ``state`` as ``MODEL_DIR/checkpoints/<step>`` synchronously (e.g. the result of
  checkpoint surgery, which the trainer then resumes from); returns the step folder."""
  ckpt = Checkpointer(model_dir, CheckpointConfig(async_checkpointing=False, max_to_keep=None))
  try:
    ckpt.save(step, state, dict(metadata, format_version=METADATA_FORMAT_VERSION))
  finally:
    ckpt.close()
  return ckpt.step_dir(step)


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
