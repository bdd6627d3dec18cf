"""The start of a lifelong phase: its step-0 checkpoint, its phase record and the method's setup.

``build_phase_start`` runs ``checkpoint_expansion.expand_checkpoint`` from the previous phase's
final checkpoint into the phase folder (experts added for methods that expand, the method's
``prepare_phase_start`` work saved with it); ``record_at_start`` reads the phase record back and
checks it against the folder; ``phase_setup`` is what the method sees when it builds its
regularizers and optimizer wrapper (the previous phase's params restored at most once).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import logging
import jax

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax import partitioning
from lifelong_moe_jax.eval import phase_eval
from lifelong_moe_jax.lifelong import checkpoint_expansion
from lifelong_moe_jax.lifelong import methods as methods_lib
from lifelong_moe_jax.lifelong import router_contrast
from lifelong_moe_jax.lifelong import router_input
from lifelong_moe_jax.lifelong import router_rehearsal
from lifelong_moe_jax.lifelong.phase_layout import LayoutError, RunLayout
from lifelong_moe_jax.lifelong.phase_record import METADATA_KEY, PhaseRecord, record_from_metadata
from lifelong_moe_jax.models import lm
from lifelong_moe_jax.training import optimizers

PyTree = Any


def phase_setup(
  layout: RunLayout,
  partitioner: partitioning.Partitioner,
  data_dir: str | None,
  method: str,
  index: int,
  record: PhaseRecord | None,
  previous_params: PyTree | None,
) -> methods_lib.PhaseSetup:
  """The method's view of phase ``index > 0``; ``previous_params`` (if known) saves a restore."""
  cache = {"params": previous_params}

  def restore_previous() -> PyTree:
    if cache["params"] is None:
      model = lm.LanguageModel(layout.config_for(method, index - 1))
      cache["params"] = checkpoints.restore_model_params(
        layout.final_step_dir(method, index - 1), model, partitioner
      )
    return cache["params"]

  return methods_lib.PhaseSetup(
    schedule=layout.schedule,
    index=index,
    options=layout.options_for(method),
    base_config=layout.base_config,
    partitioner=partitioner,
    data_dir=data_dir,
    phase_dir=layout.phase_dir(method, index),
    previous_phase_dir=layout.phase_dir(method, index - 1),
    previous_params=restore_previous,
    record=record,
    data_shards=layout.data_shards,
  )


def build_phase_start(
  layout: RunLayout,
  partitioner: partitioning.Partitioner,
  optimizer: optimizers.Optimizer,
  data_dir: str | None,
  method: str,
  index: int,
  *,
  destination: str | None = None,
) -> PyTree | None:
  """Builds the step-0 checkpoint of phase ``index > 0`` unless its folder exists.

  Args:
    destination: build there instead of the phase folder (``phase_analysis`` rebuilds a step-0
      checkpoint that checkpoint rotation deleted); the method's phase-start work
      (``prepare_phase_start``, e.g. the EWC Fisher) is then skipped.
  Returns:
    The previous phase's params when they were restored here (for the teacher / anchors).
  """
  pdir = destination or layout.phase_dir(method, index)
  if os.path.isdir(pdir):
    return None
  method_obj = methods_lib.get_method(method)
  schedule, options = layout.schedule, layout.options_for(method)
  phase = schedule.phases[index]
  source_experts: Any = "round_robin"
  if options.expert_init == "copy" and options.source_experts == "usage":

    def source_experts(model: lm.LanguageModel, params: PyTree) -> Any:
      evaluator = phase_eval.PhaseEvaluator(
        model,
        partitioner,
        (),
        schedule.task_feature_lengths,
        schedule.eval_batch,
        data_dir=data_dir,
        data_shards=layout.data_shards,
      )
      return evaluator.expert_usage(
        params, layout.mixture_for(method, index), options.usage_batches
      )

  def new_data_moments(model: lm.LanguageModel, params: PyTree) -> Any:
    # The new phase's own data only (never earlier phases', even for replay mixtures).
    return router_input.measure_phase_data_moments(
      model,
      params,
      partitioner,
      schedule,
      index,
      options.usage_batches,
      data_dir=data_dir,
      data_shards=layout.data_shards,
    )

  def router_input_mean(model: lm.LanguageModel, params: PyTree) -> Any:
    return new_data_moments(model, params)[0]

  # The earlier distributions' router-input moments measured for copy_contrast, saved by
  # ``prepare`` without measuring them again.
  earlier: dict[str, Any] = {}

  def router_column_shift(model: lm.LanguageModel, params: PyTree) -> Any:
    # The earlier distributions' moments: the previous phase's data under its final params, the
    # older ones as saved at the starts of the phases after them.
    new_mean, new_second = new_data_moments(model, params)
    setup = phase_setup(layout, partitioner, data_dir, method, index, None, params)
    earlier["moments"] = router_rehearsal.accumulated_moments(method_obj, setup)
    old_mean, old_second = earlier["moments"]
    return router_contrast.contrast_shift(
      new_mean, new_second, old_mean, old_second, options.router_offset
    )

  def prepare(tmp_dir: str, previous_params: PyTree) -> None:
    setup = phase_setup(layout, partitioner, data_dir, method, index, None, previous_params)
    setup = dataclasses.replace(setup, earlier_router_moments=earlier.get("moments"))
    method_obj.prepare_phase_start(setup, tmp_dir)

  expanded = checkpoint_expansion.expand_checkpoint(
    layout.final_step_dir(method, index - 1),
    pdir,
    source_config=layout.config_for(method, index - 1),
    partitioner=partitioner,
    optimizer=optimizer,
    add_experts=method_obj.added_experts(schedule, index),
    phase_name=phase.name,
    mixture=layout.mixture_for(method, index),
    steps=phase.steps,
    method=method,
    rng=jax.random.fold_in(jax.random.PRNGKey(schedule.seed), index),
    init=options.expert_init,
    noise_scale=options.noise_scale,
    source_experts=source_experts,
    router_init=options.router_init,
    router_offset=options.router_offset,
    router_input_mean=router_input_mean,
    router_column_shift=router_column_shift,
    new_slice_opt_state=options.new_slice_opt_state,
    lifelong_info=layout.lifelong_info(method, index),
    prepare=prepare if destination is None else None,
  )
  logging.info(
    "[%s] phase %d (%s) starts from %s (step %d).", method, index, phase.name, pdir, expanded.step
  )
  return expanded.source_params


def record_at_start(layout: RunLayout, method: str, index: int) -> PhaseRecord | None:
  """The phase record at the start of phase ``index``, checked against the phase folder.

  Raises:
    LayoutError: the folder holds no checkpoint, or one of another phase, or a record that does not
      end with this phase or disagrees with the model's expert count.
  """
  config = layout.config_for(method, index)
  if index == 0:
    if not config.is_moe:
      return None
    phase = layout.schedule.phases[0]
    return PhaseRecord.start(
      phase.name,
      mixture=layout.mixture_for(method, 0),
      steps=phase.steps,
      method="shared" if layout.is_shared(method, 0) else method,
      num_experts=config.num_experts,
    )
  pdir = layout.phase_dir(method, index)
  try:  # every checkpoint of a phase carries the phase's record: read the latest one
    metadata = checkpoints.read_metadata(checkpoints.resolve_step_dir(pdir))
  except checkpoints.CheckpointNotFoundError as e:
    raise LayoutError(
      f"{pdir} exists but holds no checkpoint ({e}); delete it to rebuild the phase start."
    ) from e
  info = metadata.get(METADATA_KEY) or {}
  name = layout.schedule.phases[index].name
  if info.get("phase_index") != index or info.get("phase_name") != name:
    raise LayoutError(
      f"{pdir}: its checkpoint belongs to phase {info.get('phase_index')} "
      f"({info.get('phase_name')}), not {index}."
    )
  record = record_from_metadata(metadata)
  if record is not None:
    if record.phases[-1].name != name:
      raise LayoutError(
        f"{pdir}: the phase record ends with {record.phases[-1].name!r}, expected {name!r}."
      )
    record.validate_expert_counts(config.num_experts)
  return record
