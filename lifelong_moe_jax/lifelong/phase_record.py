"""The phase record: which lifelong phase owns which expert slices.

A lifelong run is a sequence of phases. Phase 0 trains ``E0`` experts per MoE layer on its mixture
and owns the expert slices ``[0, E0)``; a later phase that adds ``n`` experts owns
``[E_prev, E_prev + n)`` (an empty slice when it adds none). Every MoE layer has the same number of
experts, so one record describes all layers.

The record is plain data, serialised as JSON and saved next to every checkpoint, so a restarted run
knows what surgery has already happened (see ``surgery.check_not_already_expanded``).

Example::

  record = PhaseRecord.start("A", mixture="wiki_en", steps=1000, method="lifelong_moe",
                             num_experts=4)
  record = record.append_phase("B", mixture="code_py", steps=1000, method="lifelong_moe",
                               add_experts=4, init="copy")
  record.expert_slices()  # {"A": (0, 4), "B": (4, 8)}
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

FORMAT_VERSION = 1


METADATA_KEY = "lifelong"  # checkpoint metadata key of the lifelong info (phase record, ...)


class PhaseRecordError(ValueError):
  """The phase record is inconsistent with itself or with the params it is checked against."""


@dataclasses.dataclass(frozen=True)
class Phase:
  """One lifelong phase.

  Attributes:
    name: unique phase name (e.g. the distribution it trains on).
    mixture: SeqIO mixture or task name trained in the phase.
    steps: planned training steps of the phase.
    method: lifelong method name (``lifelong_moe``, ``finetune``, ...).
    num_experts: experts per MoE layer after the phase's expansion (during and after the phase).
    expert_start: first expert slice owned by the phase.
    expert_end: one past the last expert slice owned by the phase (``== num_experts``).
    init: how the added slices were initialised (``"copy"``/``"random"``), None when none were added
      or for phase 0.
    extra: free-form JSON-serialisable details (noise scale, source experts, ...).
  """

  name: str
  mixture: str
  steps: int
  method: str
  num_experts: int
  expert_start: int
  expert_end: int
  init: str | None = None
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def added_experts(self) -> int:
    return self.expert_end - self.expert_start

  @property
  def expert_slice(self) -> tuple[int, int]:
    """``(start, end)``: the half-open range of expert indices the phase owns."""
    return self.expert_start, self.expert_end

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["extra"] = dict(self.extra)
    return out

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "Phase":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
      raise PhaseRecordError(
        f"Unknown phase fields {sorted(unknown)}; expected a subset of {sorted(known)}."
      )
    return cls(**{**data, "extra": dict(data.get("extra", {}))})


@dataclasses.dataclass(frozen=True)
class PhaseRecord:
  """Ordered phases of one lifelong run (immutable; ``append_phase`` returns a new record)."""

  phases: tuple[Phase, ...]

  def __post_init__(self):
    object.__setattr__(self, "phases", tuple(self.phases))
    self.validate()

  # ----------------------------------------------------------------------------- construction
  @classmethod
  def start(
    cls,
    name: str,
    *,
    mixture: str,
    steps: int,
    method: str,
    num_experts: int,
    extra: Mapping[str, Any] | None = None,
  ) -> "PhaseRecord":
    """A record whose only phase (phase 0) owns experts ``[0, num_experts)``."""
    return cls(
      (
        Phase(
          name=name,
          mixture=mixture,
          steps=steps,
          method=method,
          num_experts=num_experts,
          expert_start=0,
          expert_end=num_experts,
          extra=dict(extra or {}),
        ),
      )
    )

  def append_phase(
    self,
    name: str,
    *,
    mixture: str,
    steps: int,
    method: str,
    add_experts: int = 0,
    init: str | None = None,
    extra: Mapping[str, Any] | None = None,
  ) -> "PhaseRecord":
    """A new record with one more phase that owns ``[E, E + add_experts)``, ``E = num_experts``."""
    if add_experts < 0:
      raise PhaseRecordError(f"add_experts must be >= 0, got {add_experts}.")
    if add_experts and init is None:
      raise PhaseRecordError(
        f"Phase {name!r} adds {add_experts} experts: say how they were "
        "initialised (init='copy' or 'random')."
      )
    start = self.num_experts
    phase = Phase(
      name=name,
      mixture=mixture,
      steps=steps,
      method=method,
      num_experts=start + add_experts,
      expert_start=start,
      expert_end=start + add_experts,
      init=init if add_experts else None,
      extra=dict(extra or {}),
    )
    return PhaseRecord(self.phases + (phase,))

  # ----------------------------------------------------------------------------- queries
  @property
  def num_experts(self) -> int:
    """Experts per MoE layer after the last recorded phase."""
    return self.phases[-1].num_experts

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(p.name for p in self.phases)

  def __contains__(self, name: str) -> bool:
    return name in self.names

  def phase(self, name: str) -> Phase:
    for p in self.phases:
      if p.name == name:
        return p
    raise KeyError(f"No phase {name!r} in the record; phases are {list(self.names)}.")

  def index(self, name: str) -> int:
    return self.names.index(self.phase(name).name)

  def experts_before(self, name: str) -> int:
    """Experts per layer before phase ``name`` expanded the model (0 for the first phase)."""
    i = self.index(name)
    return self.phases[i - 1].num_experts if i else 0

  def expert_slices(self) -> dict[str, tuple[int, int]]:
    """``{phase name: (start, end)}`` half-open expert ranges."""
    return {p.name: p.expert_slice for p in self.phases}

  def owner_of(self, expert: int) -> str:
    """Name of the phase whose slice contains expert index ``expert``."""
    for p in self.phases:
      if p.expert_start <= expert < p.expert_end:
        return p.name
    raise PhaseRecordError(f"Expert {expert} is outside [0, {self.num_experts}).")

  # ----------------------------------------------------------------------------- validation
  def validate(self) -> None:
    """Raises PhaseRecordError unless slices are contiguous, names unique and counts consistent."""
    if not self.phases:
      raise PhaseRecordError("A phase record needs at least one phase.")
    seen: set[str] = set()
    previous = 0
    for i, p in enumerate(self.phases):
      where = f"phase {i} ({p.name!r})"
      if p.name in seen:
        raise PhaseRecordError(f"Duplicate phase name {p.name!r}: phase names must be unique.")
      seen.add(p.name)
      if p.steps < 0:
        raise PhaseRecordError(f"{where}: steps must be >= 0, got {p.steps}.")
      if p.expert_start != previous:
        raise PhaseRecordError(
          f"{where}: its expert slice starts at {p.expert_start} but the "
          f"previous phase ends at {previous}; slices must be contiguous."
        )
      if p.expert_end < p.expert_start:
        raise PhaseRecordError(
          f"{where}: empty-or-negative slice [{p.expert_start}, {p.expert_end})."
        )
      if p.num_experts != p.expert_end:
        raise PhaseRecordError(
          f"{where}: num_experts={p.num_experts} but its slice ends at {p.expert_end}."
        )
      if i == 0 and p.num_experts <= 0:
        raise PhaseRecordError(f"{where}: the first phase must own at least one expert.")
      if p.init not in (None, "copy", "random"):
        raise PhaseRecordError(f"{where}: init must be 'copy', 'random' or None, got {p.init!r}.")
      previous = p.expert_end

  def validate_expert_counts(self, counts: Mapping[str, int] | Sequence[int] | int) -> None:
    """Checks per-leaf (or per-layer) expert counts against ``num_experts``.

    Args:
      counts: an int, a sequence of ints, or ``{name: count}`` (e.g. ``surgery.expert_counts``).
    Raises:
      PhaseRecordError naming the first mismatching entry.
    """
    if isinstance(counts, int):
      counts = {"model": counts}
    elif not isinstance(counts, Mapping):
      counts = {f"layer {i}": c for i, c in enumerate(counts)}
    if not counts:
      raise PhaseRecordError("No expert parameters found to check the phase record against.")
    for name, count in counts.items():
      if count != self.num_experts:
        raise PhaseRecordError(
          f"{name} has {count} experts but the phase record says {self.num_experts} after phase "
          f"{self.phases[-1].name!r}: the checkpoint and its phase record disagree."
        )

  # ----------------------------------------------------------------------------- serialisation
  def to_dict(self) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "phases": [p.to_dict() for p in self.phases]}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "PhaseRecord":
    version = data.get("format_version")
    if version != FORMAT_VERSION:
      raise PhaseRecordError(
        f"Unsupported phase record format_version {version!r} (this code reads {FORMAT_VERSION})."
      )
    return cls(tuple(Phase.from_dict(p) for p in data["phases"]))

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "PhaseRecord":
    return cls.from_dict(json.loads(text))

  def save(self, path: str | os.PathLike) -> None:
    """Writes the JSON atomically (temporary file + rename)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(self.to_json())
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "PhaseRecord":
    with open(os.fspath(path), encoding="utf-8") as f:
      return cls.from_json(f.read())


def record_from_metadata(metadata: Mapping[str, Any]) -> PhaseRecord | None:
  """The phase record saved in a checkpoint's metadata (``metadata["lifelong"]``), or None."""
  saved = (metadata.get(METADATA_KEY) or {}).get("phase_record")
  return PhaseRecord.from_dict(saved) if saved else None
