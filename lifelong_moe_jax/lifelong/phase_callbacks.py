"""Per-phase callbacks of the lifelong runner: work done after a phase is trained and evaluated.

A callback is ``fn(PhaseContext) -> dict``; its result goes to the phase result and the report under
``callbacks.<name>``. ``FewshotEval`` (gin) builds the few-shot one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import gin

from lifelong_moe_jax import partitioning
from lifelong_moe_jax.eval import fewshot as fewshot_lib
from lifelong_moe_jax.eval import prompts
from lifelong_moe_jax.lifelong.schedule import PhaseSpec, ScheduleError
from lifelong_moe_jax.models import lm

PyTree = Any


@dataclasses.dataclass(frozen=True)
class PhaseContext:
  """What a per-phase callback gets after a phase has been trained.

  Attributes:
    method: method name.
    index: phase index.
    phase: the phase spec.
    model: the phase's model.
    params: its final params (sharded).
    partitioner: mesh + rules.
    vocabulary: the seqio vocabulary.
    phase_dir: the phase folder.
  """

  method: str
  index: int
  phase: PhaseSpec
  model: lm.LanguageModel
  params: PyTree
  partitioner: partitioning.Partitioner
  vocabulary: Any
  phase_dir: str


PhaseCallback = Callable[[PhaseContext], Mapping[str, Any]]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class FewshotEval:
  """Optional few-shot evaluation after every phase (off by default).

  Uses ``lifelong_moe_jax.eval.fewshot.run_fewshot``; results go to the phase result and the report
  under ``callbacks.fewshot``: ``{task: {metric: value, "chance", "num_examples", "primary_metric",
  "num_shots"}}``.

  Attributes:
    enabled: run it.
    task_names: few-shot tasks (None: every embedded task whose data is present).
    k: demonstrations per prompt (None: the few-shot module's gin default).
    max_examples: questions per task (None: the few-shot module's default).
  """

  enabled: bool = False
  task_names: Sequence[str] | None = None
  k: int | None = None
  max_examples: int | None = None

  def callback(self) -> PhaseCallback:
    """The phase callback; unknown task names are refused here, before any training."""
    task_names = list(self.task_names) if self.task_names else None
    for name in task_names or ():
      try:
        prompts.get_task(name)
      except prompts.FewShotError as e:
        raise ScheduleError(f"FewshotEval.task_names: {e}") from e
    extra = {} if self.max_examples is None else {"max_examples": self.max_examples}

    def run(ctx: PhaseContext) -> Mapping[str, Any]:
      results = fewshot_lib.run_fewshot(
        ctx.model, ctx.params, ctx.vocabulary, task_names, self.k, **extra
      )
      num_shots = self.k if self.k is not None else prompts.FewshotDefaults().num_shots
      return {
        name: dict(
          values, primary_metric=prompts.get_task(name).primary_metric, num_shots=num_shots
        )
        for name, values in results.items()
      }

    return run


@gin.configurable
@dataclasses.dataclass(frozen=True)
class HarnessEval:
  """Optional lm-evaluation-harness tasks after every phase (off by default; needs ``.[harness]``).

  Runs ``lifelong_moe_jax.eval.harness_tasks.evaluate`` on the phase's final params (no restore);
  results go to the phase result and the report under ``callbacks.harness``:
  ``{task: {metric: value}}`` (e.g. ``acc``, ``acc_norm``; filters other than ``none`` keep their
  ``metric,filter`` key).

  Attributes:
    enabled: run it.
    tasks: harness task or group names (built-in, or YAMLs under ``include_path``).
    include_path: folder of extra task YAMLs (e.g. over local JSONL, docs/fewshot.md).
    num_fewshot: demonstrations per prompt (None: each task's default).
    limit: examples per task (None: all).
    batch_size: rows per compiled call (a multiple of the mesh's data x expert shards).
  """

  enabled: bool = False
  tasks: Sequence[str] = ()
  include_path: str | None = None
  num_fewshot: int | None = None
  limit: int | None = None
  batch_size: int = 8

  def callback(self) -> PhaseCallback:
    """The phase callback; a missing extra or unknown task is refused here, before any training."""
    from lifelong_moe_jax.eval import harness  # pylint: disable=import-outside-toplevel
    from lifelong_moe_jax.eval import harness_tasks  # pylint: disable=import-outside-toplevel

    try:
      harness.require_harness()
    except harness.HarnessNotInstalledError as e:
      raise ScheduleError(f"HarnessEval: {e}") from e
    if not self.tasks:
      raise ScheduleError("HarnessEval.enabled needs HarnessEval.tasks (harness task names).")
    unknown = harness_tasks.unknown_tasks(list(self.tasks), self.include_path)
    if unknown:
      raise ScheduleError(
        f"HarnessEval.tasks: unknown harness task(s) {unknown} (built-in "
        f"tasks, or YAMLs under include_path={self.include_path!r})."
      )

    def run(ctx: PhaseContext) -> Mapping[str, Any]:
      model = harness.LifelongMoeLM.from_parts(
        ctx.model, ctx.params, ctx.vocabulary, ctx.partitioner, batch_size=self.batch_size
      )
      results = harness_tasks.evaluate(
        model,
        list(self.tasks),
        num_fewshot=self.num_fewshot,
        include_path=self.include_path,
        limit=self.limit,
      )
      return harness_tasks.metric_values(results)

    return run

  def add_to(self, callbacks: dict[str, PhaseCallback]) -> None:
    """Adds the callback as ``callbacks["harness"]`` when enabled (the runner's hook)."""
    if self.enabled:
      callbacks.setdefault("harness", self.callback())
