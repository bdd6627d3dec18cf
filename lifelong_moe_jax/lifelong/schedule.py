"""The lifelong phase schedule: which data each phase trains on, for how long, and how many experts
it adds; plus the methods to compare (gin-configurable).

A schedule file (``gin/lifelong/*.gin``) binds ``LifelongSchedule``::

    LifelongSchedule.phases = [
        {"name": "wiki_en", "mixture": "lifelong_wiki_en", "steps": 100},
        {"name": "code_py", "mixture": "lifelong_code_py", "steps": 100, "add_experts": 2},
        {"name": "dialog_en", "mixture": "lifelong_dialog_en", "steps": 100, "add_experts": 2},
    ]
    LifelongSchedule.methods = ["lifelong_moe", "finetune"]

Phase ``i`` trains ``steps`` optimizer steps on ``mixture`` (a seqio task or mixture name). Steps are
counted globally across phases (phase ``i`` ends at the sum of the steps of phases ``0..i``), as in
t5x fine-tuning, so learning-rate schedules continue across phases. The first phase's
``add_experts`` must be 0: it trains the model's own ``ModelConfig.num_experts``.

Every distribution the schedule mentions (the tasks of every phase's mixture, plus
``extra_eval_tasks``) is evaluated after every phase.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import gin

_PHASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PHASE_KEYS = ("name", "mixture", "steps", "add_experts")


class ScheduleError(ValueError):
  """The phase schedule is invalid (raised before any work starts)."""


@dataclasses.dataclass(frozen=True)
class PhaseSpec:
  """One phase of the schedule.

  Attributes:
    name: unique name (used in folder names and the phase record), e.g. ``"code_py"``.
    mixture: seqio task or mixture trained in this phase, e.g. ``"lifelong_code_py"``.
    steps: optimizer steps of this phase (> 0).
    add_experts: experts added to every MoE layer at the start of the phase (methods that expand).
  """

  name: str
  mixture: str
  steps: int
  add_experts: int = 0

  @classmethod
  def from_dict(cls, data: Mapping[str, Any], index: int) -> "PhaseSpec":
    if isinstance(data, PhaseSpec):
      return data
    if not isinstance(data, Mapping):
      raise ScheduleError(f"Phase {index} must be a dict with keys {_PHASE_KEYS}, got {data!r}.")
    unknown = sorted(set(data) - set(_PHASE_KEYS))
    if unknown:
      raise ScheduleError(
        f"Phase {index} has unknown keys {unknown}; allowed: {list(_PHASE_KEYS)}."
      )
    missing = [k for k in ("name", "mixture", "steps") if k not in data]
    if missing:
      raise ScheduleError(f"Phase {index} ({dict(data)}) is missing {missing}.")
    return cls(
      name=str(data["name"]),
      mixture=str(data["mixture"]),
      steps=int(data["steps"]),
      add_experts=int(data.get("add_experts", 0)),
    )

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LifelongSchedule:
  """Phases, methods and evaluation settings of a lifelong run.

  Attributes:
    phases: list of phase dicts (``name``, ``mixture``, ``steps``, optional ``add_experts``).
    methods: method names (see ``baselines.METHODS``); the CLI's ``--methods`` overrides.
    extra_eval_tasks: more seqio tasks/mixtures to evaluate after every phase (never trained on).
    task_feature_lengths: e.g. ``{"targets": 128}``.
    batch_size: global train batch size.
    eval_batch_size: global eval batch size (default: ``batch_size``).
    eval_max_batches: validation batches per distribution (None: the whole validation split).
    seed: run seed (param init, data order, surgery noise).
  """

  phases: Sequence[Any] = gin.REQUIRED
  methods: Sequence[str] = ("lifelong_moe", "finetune")
  extra_eval_tasks: Sequence[str] = ()
  task_feature_lengths: Mapping[str, int] = dataclasses.field(
    default_factory=lambda: {"targets": 128}
  )
  batch_size: int = 8
  eval_batch_size: int | None = None
  eval_max_batches: int | None = 20
  seed: int = 0

  def __post_init__(self):
    phases = tuple(PhaseSpec.from_dict(p, i) for i, p in enumerate(self.phases))
    object.__setattr__(self, "phases", phases)
    object.__setattr__(self, "methods", tuple(self.methods))
    object.__setattr__(self, "extra_eval_tasks", tuple(self.extra_eval_tasks))
    object.__setattr__(self, "task_feature_lengths", dict(self.task_feature_lengths))
    self.validate()

  # --------------------------------------------------------------------------- validation
  def validate(self) -> None:
    """Checks the schedule's own consistency (names, steps, sizes); raises ScheduleError."""
    if not self.phases:
      raise ScheduleError("LifelongSchedule.phases is empty: give at least one phase.")
    seen = set()
    for i, p in enumerate(self.phases):
      where = f"Phase {i} ({p.name!r})"
      if not _PHASE_NAME.match(p.name):
        raise ScheduleError(f"{where}: names may hold letters, digits, '_', '.', '-' only.")
      if p.name in seen:
        raise ScheduleError(f"{where}: duplicate phase name; phase names must be unique.")
      seen.add(p.name)
      if p.steps <= 0:
        raise ScheduleError(f"{where}: steps must be positive, got {p.steps}.")
      if p.add_experts < 0:
        raise ScheduleError(f"{where}: add_experts must be >= 0, got {p.add_experts}.")
      if not p.mixture:
        raise ScheduleError(f"{where}: empty mixture name.")
    if self.phases[0].add_experts:
      raise ScheduleError(
        f"The first phase ({self.phases[0].name!r}) adds {self.phases[0].add_experts} experts: "
        "the first phase trains the model's own ModelConfig.num_experts; set its add_experts to 0."
      )
    if not self.methods:
      raise ScheduleError("LifelongSchedule.methods is empty: name at least one method.")
    if len(set(self.methods)) != len(self.methods):
      raise ScheduleError(f"LifelongSchedule.methods has duplicates: {list(self.methods)}.")
    if self.batch_size <= 0 or (self.eval_batch_size is not None and self.eval_batch_size <= 0):
      raise ScheduleError("batch_size and eval_batch_size must be positive.")
    if self.eval_max_batches is not None and self.eval_max_batches <= 0:
      raise ScheduleError("eval_max_batches must be positive or None (whole validation split).")
    if not self.task_feature_lengths or any(
      int(v) <= 0 for v in self.task_feature_lengths.values()
    ):
      raise ScheduleError(
        f"task_feature_lengths must map features to positive lengths, got "
        f"{self.task_feature_lengths}."
      )

  def validate_experts(self, num_experts: int, expert_axis_size: int = 1) -> None:
    """Checks expert counts per phase against the model and the mesh's expert axis."""
    for i, count in enumerate(self.expert_counts(num_experts)):
      if num_experts <= 0 and self.phases[i].add_experts:
        raise ScheduleError(f"Phase {self.phases[i].name!r} adds experts but the model is dense.")
      if num_experts > 0 and count % expert_axis_size:
        raise ScheduleError(
          f"Phase {self.phases[i].name!r} has {count} experts per MoE layer, not divisible by the "
          f"expert mesh axis ({expert_axis_size}); choose add_experts so every phase's expert "
          f"count is a multiple of {expert_axis_size}."
        )

  def validate_lengths(self, max_length: int) -> None:
    """Checks ``task_feature_lengths`` (``{"targets": L}``) against the model's ``max_length``."""
    length = self.task_feature_lengths.get("targets")
    if set(self.task_feature_lengths) != {"targets"} or length > max_length:
      raise ScheduleError(
        f"task_feature_lengths must be {{'targets': L}} with L <= "
        f"ModelConfig.max_length={max_length}, got {self.task_feature_lengths}."
      )

  def resolve_data_shards(self, data_shards: int | None, process_count: int) -> int:
    """The input shards global batches are assembled from (None: one per process), checked
    against the process count and the train and eval batch sizes; raises ScheduleError."""
    shards = process_count if data_shards is None else int(data_shards)
    if shards < 1 or shards % process_count:
      raise ScheduleError(
        f"RunnerConfig.data_shards={shards} must be a positive multiple of the {process_count} "
        "processes."
      )
    for name, size in (("batch_size", self.batch_size), ("eval_batch_size", self.eval_batch)):
      if size % shards:
        raise ScheduleError(
          f"LifelongSchedule.{name}={size} is not divisible by RunnerConfig.data_shards="
          f"{shards}; use a multiple of {shards}."
        )
    return shards

  # --------------------------------------------------------------------------- queries
  @property
  def names(self) -> tuple[str, ...]:
    return tuple(p.name for p in self.phases)

  @property
  def total_steps(self) -> int:
    return sum(p.steps for p in self.phases)

  def end_step(self, index: int) -> int:
    """Global step at which phase ``index`` ends."""
    return sum(p.steps for p in self.phases[: index + 1])

  def start_step(self, index: int) -> int:
    """Global step at which phase ``index`` starts."""
    return sum(p.steps for p in self.phases[:index])

  def expert_counts(self, num_experts: int) -> list[int]:
    """Experts per MoE layer in each phase when every phase's ``add_experts`` is applied."""
    counts, current = [], num_experts
    for p in self.phases:
      current += p.add_experts
      counts.append(current)
    return counts

  @property
  def eval_batch(self) -> int:
    return self.eval_batch_size or self.batch_size

  def to_dict(self) -> dict[str, Any]:
    return {
      "phases": [p.to_dict() for p in self.phases],
      "methods": list(self.methods),
      "extra_eval_tasks": list(self.extra_eval_tasks),
      "task_feature_lengths": dict(self.task_feature_lengths),
      "batch_size": self.batch_size,
      "eval_batch_size": self.eval_batch,
      "eval_max_batches": self.eval_max_batches,
      "seed": self.seed,
    }
