"""Expert expansion of a checkpoint into a new run folder: the one sequence behind the surgery CLI
and every lifelong phase start.

``expand_checkpoint(source, destination, ...)``:

1. restores the source train state (params and optimizer state) into its shardings on the given
   mesh, with its phase record (``metadata["lifelong"]``; a plain pretrained checkpoint gets a
   one-phase record);
2. refuses a checkpoint already expanded for this phase (``AlreadyExpandedError``), then adds
   ``add_experts`` experts to every MoE layer (params, optimizer state, phase record; validated), or
   only appends the phase to the record when ``add_experts == 0``;
3. runs ``prepare(tmp_dir, source_params)`` (e.g. the EWC Fisher), saves the new state as step
   ``<source step>`` of ``destination + ".tmp"`` and renames it to ``destination``: a crash leaves
   either nothing or a complete folder (a leftover ``.tmp`` is deleted by the next attempt).

The result is an ordinary run folder that training resumes from. The restored source params are
returned too, so a lifelong phase reuses them as its teacher or anchor instead of reading the
checkpoint a second time.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any, Callable, Mapping

from absl import logging
import jax

from lifelong_moe_jax import checkpoint_manager
from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.lifelong import expansion
from lifelong_moe_jax.lifelong import phase_expansion
from lifelong_moe_jax.lifelong.phase_record import METADATA_KEY, PhaseRecord, record_from_metadata
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.models.config import ModelConfig
from lifelong_moe_jax.training import optimizers
from lifelong_moe_jax.training import train_state as ts
from lifelong_moe_jax.training import trainer as trainer_lib

PyTree = Any
# ``source_experts`` and ``router_input_mean`` may be computed from the source model and params
# (e.g. usage or the mean router input on the new data).
SourceExpertsFn = Callable[[lm.LanguageModel, PyTree], Any]


@dataclasses.dataclass
class ExpandedCheckpoint:
  """What ``expand_checkpoint`` wrote.

  Attributes:
    step_dir: the destination's checkpoint step folder.
    step: its step (the source's).
    source_params: the source's params, restored and sharded on the mesh.
    record: the destination's phase record (None for dense models).
    num_experts_before / num_experts_after: experts per MoE layer.
  """

  step_dir: str
  step: int
  source_params: PyTree
  record: PhaseRecord | None
  num_experts_before: int
  num_experts_after: int


def sync_processes(name: str) -> None:
  """Barrier across processes (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    multihost_utils.sync_global_devices(name)


def record_of_checkpoint(metadata: Mapping[str, Any], config: ModelConfig) -> PhaseRecord | None:
  """The checkpoint's phase record, or a one-phase record describing a plain pretrained MoE model
  (None for a dense model)."""
  record = record_from_metadata(metadata)
  if record is not None or not config.is_moe:
    return record
  data = metadata.get("data") or {}
  return PhaseRecord.start(
    "pretrain",
    mixture=str(data.get("mixture_or_task_name", "unknown")),
    steps=int(metadata.get("step", 0)),
    method="pretrain",
    num_experts=config.num_experts,
  )


def expand_checkpoint(
  source: str,
  destination: str,
  *,
  source_config: ModelConfig,
  partitioner: partitioning.Partitioner,
  optimizer: optimizers.Optimizer,
  add_experts: int,
  phase_name: str,
  mixture: str,
  steps: int,
  method: str,
  rng: jax.Array,
  init: expansion.InitMode = "copy",
  noise_scale: float = 0.01,
  source_experts: Any | SourceExpertsFn = "round_robin",
  router_init: expansion.RouterInit = "copy",
  router_offset: float = 1.0,
  router_input_mean: Any | SourceExpertsFn = None,
  router_column_shift: Any | SourceExpertsFn = None,
  new_slice_opt_state: expansion.NewSliceState = "zeros",
  lifelong_info: Mapping[str, Any] | None = None,
  prepare: Callable[[str, PyTree], None] | None = None,
) -> ExpandedCheckpoint:
  """Expands checkpoint ``source`` into the run folder ``destination`` (see the module docstring).

  Args:
    source: a step folder or run folder (latest step).
    destination: the new run folder (must not exist; a leftover ``destination.tmp`` is replaced).
    source_config: the source's model.
    partitioner: the mesh everything is restored onto and saved from.
    optimizer: the optimizer of the source's state (its tree structure).
    add_experts: experts added to every MoE layer (0: the phase is only recorded).
    phase_name / mixture / steps / method: the new phase, as recorded.
    rng: copy-noise / random-init key.
    init / noise_scale: see ``expansion.expand_params``.
    source_experts: "round_robin", usage counts, or ``fn(model, params) -> usage`` evaluated on
      the restored source.
    router_init / router_offset: new router columns (``expansion.expand_params``).
    router_input_mean: "copy_offset": ``[num_moe_layers, embed]`` mean router input on the new
      data, or ``fn(model, params) -> it`` evaluated on the restored source (only when experts
      are added with router_init="copy_offset").
    router_column_shift: "copy_contrast": ``[num_moe_layers, embed]`` added to the copied router
      columns, or ``fn(model, params) -> it`` evaluated on the restored source (only when experts
      are added with router_init="copy_contrast"; ``router_contrast.contrast_shift``).
    new_slice_opt_state: optimizer statistics of new slices
      (``opt_state_expansion.expand_opt_state``).
    lifelong_info: more entries of ``metadata["lifelong"]`` (``phase_record`` is set here).
    prepare: ``fn(tmp_dir, source_params)`` run before the save, e.g. to store an EWC Fisher in
      the new folder.
  Raises:
    expansion.ExpansionError (phase_expansion.AlreadyExpandedError), CheckpointNotFoundError,
    CheckpointMismatchError, ValueError (a dense model asked to grow, or ``destination`` exists).
  """
  if os.path.exists(destination):
    raise ValueError(f"{destination} already exists; expand into a new folder.")
  step_dir = checkpoints.resolve_step_dir(source)
  metadata = checkpoints.read_metadata(step_dir)
  record = record_of_checkpoint(metadata, source_config)
  if add_experts and record is None:
    raise expansion.ExpansionError(
      f"{step_dir} holds a dense model (num_experts=0): nothing to expand."
    )
  new_config = (
    expansion.expanded_config(source_config, add_experts) if add_experts else source_config
  )
  partitioning.validate_model_for_mesh(source_config, partitioner.mesh)
  partitioning.validate_model_for_mesh(new_config, partitioner.mesh)
  model = lm.LanguageModel(source_config)
  trainer = trainer_lib.Trainer(model, partitioner, optimizer)
  state = checkpoints.restore_tree(
    step_dir, trainer.abstract_state, model_config=dataclasses.asdict(source_config)
  )
  params, opt_state = state.params, state.opt_state
  if record is not None:
    if add_experts:
      t0 = time.perf_counter()
      sources = source_experts(model, params) if callable(source_experts) else source_experts
      mean = router_input_mean
      if router_init == "copy_offset" and callable(mean):
        mean = mean(model, params)
      shift = router_column_shift
      if router_init == "copy_contrast" and callable(shift):
        shift = shift(model, params)
      result = phase_expansion.expand_for_phase(
        params,
        trainer.params_axes,
        record,
        phase_name=phase_name,
        mixture=mixture,
        steps=steps,
        method=method,
        add_experts=add_experts,
        init=init,
        rng=rng,
        noise_scale=noise_scale,
        source_experts=sources,
        model_for_random_init=lm.LanguageModel(new_config),
        opt_state=opt_state,
        tx=optimizer.tx,
        router_init=router_init,
        router_offset=router_offset,
        router_input_mean=None if callable(mean) else mean,
        router_column_shift=None if callable(shift) else shift,
        new_slice_opt_state=new_slice_opt_state,
      )
      params, opt_state, record = result.params, result.opt_state, result.record
      logging.info(
        "[%s] surgery for phase %s: %d -> %d experts per MoE layer (%.1f s).",
        method,
        phase_name,
        source_config.num_experts,
        new_config.num_experts,
        time.perf_counter() - t0,
      )
    else:
      phase_expansion.check_not_already_expanded(record, phase_name, params, trainer.params_axes)
      record = record.append_phase(
        phase_name, mixture=mixture, steps=steps, method=method, add_experts=0
      )
  step = int(state.step)
  tmp = destination + ".tmp"
  if jax.process_index() == 0 and os.path.exists(tmp):
    logging.info("Removing the unfinished expansion %s (interrupted before completion).", tmp)
    shutil.rmtree(tmp)
  sync_processes(f"expand-clean-{destination}")
  if prepare is not None:
    prepare(tmp, state.params)
  info = dict(lifelong_info or {}, phase_record=record.to_dict() if record is not None else None)
  new_metadata = checkpoint_manager.state_metadata(
    model_config=new_config,
    vocabulary_fingerprint=metadata.get("vocabulary_fingerprint"),
    optimizer_name=optimizer.name,
    mesh=partitioner.mesh,
    extra={METADATA_KEY: info},
  )
  new_state = ts.TrainState(step=state.step, params=params, opt_state=opt_state, rng=state.rng)
  checkpoint_manager.save_state(tmp, step, new_state, new_metadata)
  sync_processes(f"expand-saved-{destination}")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(destination) or ".", exist_ok=True)
    os.replace(tmp, destination)
  sync_processes(f"expand-renamed-{destination}")
  return ExpandedCheckpoint(
    checkpoints.resolve_step_dir(destination),
    step,
    state.params,
    record,
    source_config.num_experts,
    new_config.num_experts,
  )
