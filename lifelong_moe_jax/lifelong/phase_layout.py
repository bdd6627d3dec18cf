"""Where a lifelong run keeps each method's phases, and what each phase trains.

``RunLayout`` answers, for ``(method, phase index)``: the model config, the training mixture,
whether the phase is the shared first phase, its folder, its final checkpoint and the
``metadata["lifelong"]`` entries its checkpoints carry; and reads back the finished phase results.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from lifelong_moe_jax import checkpoints
from lifelong_moe_jax.lifelong import methods as methods_lib
from lifelong_moe_jax.lifelong import phase_results
from lifelong_moe_jax.lifelong.schedule import LifelongSchedule
from lifelong_moe_jax.models.config import ModelConfig

SHARED_DIR = "shared"


class LayoutError(ValueError):
  """A phase folder is missing what the run needs (e.g. its final checkpoint)."""


@dataclasses.dataclass(frozen=True)
class RunLayout:
  """The folders and per-phase plans of one lifelong run.

  Attributes:
    model_dir: the run folder (absolute).
    schedule: the phase schedule.
    options: the method hyperparameters.
    base_config: the first phase's model.
    share_first_phase: methods whose first phase is identical train it once, in ``shared/``.
    data_shards: input shards every global batch (training, evaluation, usage and Fisher
      batches) is assembled from (None: the process count); runs with equal ``data_shards`` read
      equal global batches whatever their process count (``RunnerConfig.data_shards``).
  """

  model_dir: str
  schedule: LifelongSchedule
  options: methods_lib.MethodOptions
  base_config: ModelConfig
  share_first_phase: bool = True
  data_shards: int | None = None

  def options_for(self, method: str) -> methods_lib.MethodOptions:
    """The hyperparameters of ``method``: the run's, with a variant's overrides applied."""
    return methods_lib.get_method(method).options(self.options)

  def config_for(self, method: str, index: int) -> ModelConfig:
    """The model of ``method`` during phase ``index``."""
    return methods_lib.get_method(method).model_config(
      self.base_config, self.schedule, index, self.options_for(method)
    )

  def mixture_for(self, method: str, index: int) -> str:
    """The seqio task/mixture ``method`` trains on in phase ``index``."""
    return methods_lib.get_method(method).mixture(self.schedule, index, self.options_for(method))

  def is_shared(self, method: str, index: int) -> bool:
    return (
      index == 0 and self.share_first_phase and methods_lib.get_method(method).shares_first_phase
    )

  def phase_dir(self, method: str, index: int) -> str:
    folder = f"phase_{index}_{self.schedule.phases[index].name}"
    if self.is_shared(method, index):
      return os.path.join(self.model_dir, SHARED_DIR, folder)
    return os.path.join(self.model_dir, method, folder)

  def result_path(self, method: str, index: int) -> str:
    """The phase's ``phase_result.json`` (it exists once the phase is complete)."""
    return os.path.join(self.phase_dir(method, index), phase_results.RESULT_FILE)

  def final_step_dir(self, method: str, index: int) -> str:
    """The final checkpoint of phase ``index`` of ``method`` (must exist)."""
    pdir, end = self.phase_dir(method, index), self.schedule.end_step(index)
    try:
      return checkpoints.resolve_step_dir(pdir, step=end)
    except checkpoints.CheckpointNotFoundError as e:
      raise LayoutError(
        f"Phase {index} of {method} has no final checkpoint at step {end} in {pdir}: {e}"
      ) from e

  def lifelong_info(self, method: str, index: int) -> dict[str, Any]:
    """``metadata["lifelong"]`` of the phase's checkpoints (the phase record is added by callers)."""
    phase = self.schedule.phases[index]
    return {
      "method": "shared" if self.is_shared(method, index) else method,
      "phase_index": index,
      "phase_name": phase.name,
      "mixture": self.mixture_for(method, index),
      "start_step": self.schedule.start_step(index),
      "end_step": self.schedule.end_step(index),
    }

  def collect_results(self, methods: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
    """``{method: [phase results so far]}`` read from the phase folders (``methods`` first, then
    any other method folder of MODEL_DIR with results)."""
    names = list(methods)
    if os.path.isdir(self.model_dir):
      for entry in sorted(os.listdir(self.model_dir)):
        if (
          entry not in names
          and entry in methods_lib.METHODS
          and os.path.isdir(os.path.join(self.model_dir, entry))
        ):
          names.append(entry)
    results: dict[str, list[dict[str, Any]]] = {}
    for method in names:
      phases = []
      for index in range(len(self.schedule.phases)):
        path = self.result_path(method, index)
        if not os.path.exists(path):
          break
        result = phase_results.read_json(path)
        result["method"] = method
        phases.append(result)
      if phases:
        results[method] = phases
    return results
