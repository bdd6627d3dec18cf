"""The Checkpointer of a run: periodic (async) saves, integrity manifests, newest-intact restore.

``Checkpointer`` wraps an orbax ``CheckpointManager`` over ``MODEL_DIR/checkpoints`` (the layout,
the data-position item and every read-side helper are in ``checkpoints``): each save writes the
state, the metadata (``state_metadata``) and optionally the data position, then records the step's
integrity manifest (``checkpoint_manifest``); ``restore_latest`` verifies steps newest first and
moves damaged ones aside. ``save_state`` writes one step synchronously (e.g. after surgery).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from lifelong_moe_jax import checkpoint_manifest
from lifelong_moe_jax.checkpoints import (
  DATA_ITEM,
  METADATA_FORMAT_VERSION,
  METADATA_ITEM,
  REQUIRED_FILES,
  STATE_ITEM,
  WARNED_DAMAGED,
  CheckpointConfig,
  CheckpointDamagedError,
  DataIteratorSave,
  checkpoints_dir,
)

PyTree = Any


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
      if {d.step_dir for d in damaged} <= WARNED_DAMAGED:  # already warned by resolve_step_dir
        logging.info("%s", message)
      else:
        logging.warning("%s", message)
      WARNED_DAMAGED.difference_update(d.step_dir for d in damaged)  # a new step may take the name
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("lifelong_moe_jax:checkpoints_moved_aside")
    self._manager.reload()


def _jsonable(value: Any) -> Any:
  """Round-trips through JSON so tuples/np scalars are stored as plain JSON values."""
  return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


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
